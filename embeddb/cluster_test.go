package embeddb

import (
	"bytes"
	"compress/gzip"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	cproto "github.com/rqlite/rqlite/v8/cluster/proto"
	"github.com/rqlite/rqlite/v8/command/proto"
	pb "google.golang.org/protobuf/proto"
	"tailscale.com/net/memnet"
)

// testCluster runs nodes on an in-memory network whose addresses are
// 127.0.0.1:4001 and up (no socket is opened). Every node admits every
// connection but counts them, so tests can tell the check ran.
type testCluster struct {
	t        testing.TB
	nw       memnet.Network
	dirs     []string
	admitted atomic.Int64
	quiet    bool // no logs (benchmarks)

	mu  sync.Mutex
	dbs []*DB
}

func newTestCluster(t testing.TB, n int) *testCluster {
	c := &testCluster{t: t}
	_, c.quiet = t.(*testing.B)
	for range n {
		c.dirs = append(c.dirs, t.TempDir())
	}
	c.dbs = make([]*DB, n)
	t.Cleanup(func() {
		for _, db := range c.dbs {
			if db != nil {
				db.Close()
			}
		}
	})
	return c
}

func (c *testCluster) addr(i int) string { return fmt.Sprintf("127.0.0.1:%d", 4001+i) }

func (c *testCluster) addrs() []string {
	var as []string
	for i := range c.dirs {
		as = append(as, c.addr(i))
	}
	return as
}

// config is node i's Config with a fresh listener at its address.
func (c *testCluster) config(i int) Config {
	ln, err := c.nw.Listen("tcp", c.addr(i))
	if err != nil {
		c.t.Fatalf("listen %s: %v", c.addr(i), err)
	}
	cfg := Config{
		Dir: c.dirs[i], NodeID: fmt.Sprintf("node%d", i+1), Listener: ln,
		Dial: func(ctx context.Context, addr string) (net.Conn, error) { return c.nw.Dial(ctx, "tcp", addr) },
		Admit: func(ctx context.Context, conn net.Conn) error {
			c.admitted.Add(1)
			return nil
		},
	}
	if !c.quiet {
		id := cfg.NodeID
		cfg.Logf = func(format string, args ...any) { c.t.Logf(id+": "+format, args...) }
	}
	return cfg
}

// open opens node i (edit changes its Config first) and keeps it for
// closing at the end of the test.
func (c *testCluster) open(i int, edit func(*Config)) (*DB, error) {
	cfg := c.config(i)
	if edit != nil {
		edit(&cfg)
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	db, err := Open(ctx, cfg)
	if err == nil {
		c.mu.Lock()
		c.dbs[i] = db
		c.mu.Unlock()
	}
	return db, err
}

func (c *testCluster) mustOpen(i int, edit func(*Config)) *DB {
	c.t.Helper()
	db, err := c.open(i, edit)
	if err != nil {
		c.t.Fatalf("open node %d: %v", i+1, err)
	}
	return db
}

// openExpect forms a new cluster of all nodes with BootstrapExpect.
func (c *testCluster) openExpect() []*DB {
	c.t.Helper()
	errs := make([]error, len(c.dirs))
	var wg sync.WaitGroup
	for i := range c.dirs {
		wg.Go(func() {
			_, errs[i] = c.open(i, func(cfg *Config) {
				cfg.Join = c.addrs() // its own address too, as an operator would write it
				cfg.BootstrapExpect = len(c.dirs)
			})
		})
	}
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			c.t.Fatalf("open node %d: %v", i+1, err)
		}
	}
	return slices.Clone(c.dbs)
}

// leader returns the index of the open node that leads, waiting for one.
func (c *testCluster) leader() int {
	c.t.Helper()
	deadline := time.Now().Add(time.Minute)
	for time.Now().Before(deadline) {
		c.mu.Lock()
		dbs := slices.Clone(c.dbs)
		c.mu.Unlock()
		for i, db := range dbs {
			if db != nil && db.IsLeader() {
				return i
			}
		}
		time.Sleep(50 * time.Millisecond)
	}
	c.t.Fatal("no leader within a minute")
	return -1
}

// localNetworks reads the network names from this node's own copy of the
// database, without the leader (level NONE): what it has replicated.
func localNetworks(t testing.TB, db *DB) []string {
	t.Helper()
	res, _, err := db.str.Query(&proto.QueryRequest{
		Request: &proto.Request{Statements: []*proto.Statement{{Sql: "SELECT name FROM networks ORDER BY name"}}},
		Level:   proto.QueryRequest_QUERY_REQUEST_LEVEL_NONE,
	})
	if err != nil {
		t.Fatalf("local read: %v", err)
	}
	var names []string
	for _, r := range rows(res[0]) {
		names = append(names, r.str(0))
	}
	return names
}

// waitLocal waits until db's own copy holds the network name.
func waitLocal(t testing.TB, db *DB, name string) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for !slices.Contains(localNetworks(t, db), name) {
		if time.Now().After(deadline) {
			t.Fatalf("network %s never replicated here; have %v", name, localNetworks(t, db))
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func raftNodes(t testing.TB, db *DB) []string {
	t.Helper()
	nodes, err := db.str.Nodes()
	if err != nil {
		t.Fatal(err)
	}
	var ids []string
	for _, n := range nodes {
		ids = append(ids, n.ID+"@"+n.Addr)
	}
	slices.Sort(ids)
	return ids
}

// checkSameAnswers writes through every node and reads every write back
// through every node right after it was made.
func checkSameAnswers(t *testing.T, dbs []*DB, prefix string) {
	t.Helper()
	ctx := context.Background()
	for i, w := range dbs {
		name := fmt.Sprintf("%s-%d", prefix, i+1)
		if err := w.CreateNetwork(ctx, Network{Name: name, Tag: "tag:" + name, CreatedAt: t0}); err != nil {
			t.Fatalf("write %s through node %d (leader %v): %v", name, i+1, w.IsLeader(), err)
		}
		for j, r := range dbs {
			n, err := r.GetNetwork(ctx, name)
			if err != nil || n.Tag != "tag:"+name {
				t.Fatalf("read %s through node %d (leader %v) just after writing it through node %d: %+v, %v",
					name, j+1, r.IsLeader(), i+1, n, err)
			}
		}
	}
	for j, r := range dbs {
		got, err := r.ListNetworks(ctx)
		if err != nil || len(got) < len(dbs) {
			t.Fatalf("list through node %d: %d networks, %v", j+1, len(got), err)
		}
	}
}

// TestClusterBootstrapExpect forms a new cluster of three nodes that each
// name all three, then checks that every node takes writes and sees every
// write at once, whichever node took it.
func TestClusterBootstrapExpect(t *testing.T) {
	t.Parallel()
	c := newTestCluster(t, 3)
	dbs := c.openExpect()
	want := []string{"node1@127.0.0.1:4001", "node2@127.0.0.1:4002", "node3@127.0.0.1:4003"}
	for i, db := range dbs {
		if got := raftNodes(t, db); !slices.Equal(got, want) {
			t.Fatalf("node %d's configuration = %v, want %v", i+1, got, want)
		}
	}
	checkSameAnswers(t, dbs, "expect")
	if c.admitted.Load() == 0 {
		t.Fatal("Admit never ran")
	}
}

// TestClusterJoinFailoverRestart grows a cluster from one node by joins,
// closes its leader (which hands over: the other two keep taking writes),
// and restarts that node with its dir and no Join: it rejoins by itself and
// catches up on what was written while it was away.
func TestClusterJoinFailoverRestart(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	c := newTestCluster(t, 3)
	first := c.mustOpen(0, nil)
	mustNetwork(t, first, "before-join")
	for i := 1; i < 3; i++ {
		c.mustOpen(i, func(cfg *Config) { cfg.Join = []string{c.addr(0)} })
	}
	if got := raftNodes(t, first); len(got) != 3 {
		t.Fatalf("configuration after joins = %v", got)
	}
	for i := 1; i < 3; i++ {
		waitLocal(t, c.dbs[i], "before-join")
	}
	checkSameAnswers(t, slices.Clone(c.dbs), "join")

	// The leader's Close hands over.
	l := c.leader()
	start := time.Now()
	if err := c.dbs[l].Close(); err != nil {
		t.Fatal(err)
	}
	closed := time.Since(start)
	var rest []*DB
	for i, db := range c.dbs {
		if i != l {
			rest = append(rest, db)
		}
	}
	if err := rest[0].CreateNetwork(ctx, Network{Name: "after-close", CreatedAt: t0}); err != nil {
		t.Fatalf("write after the leader closed: %v", err)
	}
	t.Logf("leader's Close took %v; first write acknowledged %v after Close began", closed, time.Since(start))
	checkSameAnswers(t, rest, "two-left")

	// Restart with the same dir and address, no Join.
	c.dbs[l] = nil
	back := c.mustOpen(l, nil)
	waitLocal(t, back, "after-close")
	waitLocal(t, back, "two-left-2")
	if got := raftNodes(t, back); len(got) != 3 {
		t.Fatalf("restarted node's configuration = %v", got)
	}
	checkSameAnswers(t, slices.Clone(c.dbs), "restarted")

	// The restarted node counts towards the quorum again: with the new
	// leader gone, it and the last one still make a majority.
	l2 := c.leader()
	if err := c.dbs[l2].Close(); err != nil {
		t.Fatal(err)
	}
	c.dbs[l2] = nil
	var left []*DB
	for _, db := range c.dbs {
		if db != nil {
			left = append(left, db)
		}
	}
	checkSameAnswers(t, left, "quorum-with-restarted")
}

// TestClusterOpenRefusals: a node that formed a cluster alone cannot join
// another one, and clustering settings that cannot work are refused.
func TestClusterOpenRefusals(t *testing.T) {
	t.Parallel()
	c := newTestCluster(t, 2)
	other := c.mustOpen(1, nil)
	alone := c.mustOpen(0, nil)
	if err := alone.Close(); err != nil {
		t.Fatal(err)
	}
	c.dbs[0] = nil
	_, err := c.open(0, func(cfg *Config) { cfg.Join = []string{c.addr(1)} })
	if !errors.Is(err, ErrInvalid) {
		t.Fatalf("join by a node that bootstrapped alone = %v, want ErrInvalid", err)
	}
	if got := raftNodes(t, other); len(got) != 1 {
		t.Fatalf("refused join changed the other cluster: %v", got)
	}

	ctx := context.Background()
	for name, edit := range map[string]func(*Config){
		"expect without peers": func(cfg *Config) { cfg.BootstrapExpect = 3; cfg.Join = []string{"127.0.0.1:4009"} },
		"negative expect":      func(cfg *Config) { cfg.BootstrapExpect = -1 },
		"join without dial":    func(cfg *Config) { cfg.Join = []string{"127.0.0.1:4009"}; cfg.Dial = nil },
		"join not host:port":   func(cfg *Config) { cfg.Join = []string{"127.0.0.1"} },
	} {
		cfg := testConfig(t, t.TempDir())
		cfg.Dial = func(ctx context.Context, addr string) (net.Conn, error) { return nil, errors.New("unused") }
		edit(&cfg)
		if _, err := Open(ctx, cfg); !errors.Is(err, ErrInvalid) {
			t.Errorf("%s: Open = %v, want ErrInvalid", name, err)
		}
	}
}

// rawCommand sends one command to the cluster service at addr the way a
// stranger on the network could (header byte, length, protobuf) and returns
// the answer's payload, or what it got of it and why it stopped.
func rawCommand(t *testing.T, nw *memnet.Network, addr string, cmd *cproto.Command) ([]byte, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	conn, err := nw.Dial(ctx, "tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	p, err := pb.Marshal(cmd)
	if err != nil {
		t.Fatal(err)
	}
	msg := append([]byte{2}, binary.LittleEndian.AppendUint64(nil, uint64(len(p)))...)
	conn.SetDeadline(time.Now().Add(5 * time.Second))
	conn.Write(append(msg, p...)) // a refused connection may fail this or not
	var n [8]byte
	if k, err := io.ReadFull(conn, n[:]); err != nil {
		return n[:k], err
	}
	out := make([]byte, binary.LittleEndian.Uint64(n[:]))
	k, err := io.ReadFull(conn, out)
	return out[:k], err
}

// TestAdmitGate checks that a connection Admit refuses gets nothing from
// the cluster service (which would otherwise answer any query and hand out
// a backup of the whole database), and that the same request from an
// admitted connection is answered: the gate, not the request, makes the
// difference.
func TestAdmitGate(t *testing.T) {
	t.Parallel()
	c := newTestCluster(t, 1)
	var refuse atomic.Bool
	var checked atomic.Int64
	db := c.mustOpen(0, func(cfg *Config) {
		cfg.Admit = func(ctx context.Context, conn net.Conn) error {
			checked.Add(1)
			if refuse.Load() {
				return errors.New("not an appliance node")
			}
			return nil
		}
	})
	mustNetwork(t, db, "secret-net")

	query := &cproto.Command{
		Type: cproto.Command_COMMAND_TYPE_QUERY,
		Request: &cproto.Command_QueryRequest{QueryRequest: &proto.QueryRequest{
			Request: &proto.Request{Statements: []*proto.Statement{{Sql: "SELECT name FROM networks"}}},
		}},
	}
	backup := &cproto.Command{
		Type:    cproto.Command_COMMAND_TYPE_BACKUP,
		Request: &cproto.Command_BackupRequest{BackupRequest: &proto.BackupRequest{Format: proto.BackupRequest_BACKUP_REQUEST_FORMAT_BINARY}},
	}

	// Admitted: the service answers (so the refusal below is the gate's).
	out, err := rawCommand(t, &c.nw, c.addr(0), query)
	if err != nil {
		t.Fatalf("admitted query: %v", err)
	}
	var resp cproto.CommandQueryResponse
	if err := pb.Unmarshal(out, &resp); err != nil || len(resp.Rows) != 1 || len(resp.Rows[0].Values) != 1 {
		t.Fatalf("admitted query answer: %v, %v", &resp, err)
	}
	out, err = rawCommand(t, &c.nw, c.addr(0), backup)
	if err != nil {
		t.Fatalf("admitted backup: %v", err)
	}
	zr, err := gzip.NewReader(bytes.NewReader(out)) // the service gzips backups
	if err != nil {
		t.Fatal(err)
	}
	plain, err := io.ReadAll(zr)
	var bresp cproto.CommandBackupResponse
	if err != nil || pb.Unmarshal(plain, &bresp) != nil || !bytes.HasPrefix(bresp.Data, []byte("SQLite format 3")) {
		t.Fatalf("admitted backup is not a database: %d bytes, %v", len(plain), err)
	}

	refuse.Store(true)
	before := checked.Load()
	for name, cmd := range map[string]*cproto.Command{"query": query, "backup": backup} {
		out, err := rawCommand(t, &c.nw, c.addr(0), cmd)
		if len(out) != 0 {
			t.Fatalf("refused %s got %d bytes back", name, len(out))
		}
		if !errors.Is(err, io.EOF) {
			t.Fatalf("refused %s: want the gate to close the connection, got %v", name, err)
		}
	}
	if checked.Load()-before != 2 {
		t.Fatalf("Admit ran %d times for 2 connections", checked.Load()-before)
	}
	// The node itself is unharmed.
	if _, err := db.GetNetwork(context.Background(), "secret-net"); err != nil {
		t.Fatal(err)
	}
}

// BenchmarkFailover measures the time from losing the leader of three nodes
// to the next write acknowledged through a survivor: "close" is a clean
// Close (which hands leadership over first), "cut" cuts the leader off the
// network as a crash would, so the others wait out an election. One cluster
// per iteration; the metric is seconds per failover.
func BenchmarkFailover(b *testing.B) {
	for _, mode := range []string{"close", "cut"} {
		b.Run(mode, func(b *testing.B) {
			var total time.Duration
			for i := range b.N {
				b.StopTimer()
				c := newTestCluster(b, 3)
				dbs := c.openExpect()
				l := c.leader()
				survivor := dbs[(l+1)%3]
				mustNetwork(b, survivor, "warm")
				b.StartTimer()
				start := time.Now()
				if mode == "close" {
					dbs[l].Close()
				} else {
					dbs[l].ln.Close()
					dbs[l].conns.closeAll()
				}
				name := fmt.Sprintf("after-%d", i)
				if err := survivor.CreateNetwork(context.Background(), Network{Name: name, CreatedAt: t0}); err != nil {
					b.Fatalf("write after losing the leader: %v", err)
				}
				total += time.Since(start)
				b.StopTimer()
				for _, db := range dbs {
					db.Close()
				}
			}
			b.ReportMetric(total.Seconds()/float64(b.N), "s/failover")
		})
	}
}

// TestClusterRejoinNewAddress restarts a member at another address (as a
// host whose tailnet IP changed) with Join: it joins again, the cluster
// records the new address, and it takes part as before.
func TestClusterRejoinNewAddress(t *testing.T) {
	t.Parallel()
	c := newTestCluster(t, 3)
	dbs := c.openExpect()
	checkSameAnswers(t, dbs, "before-move")
	l := c.leader()
	moved := (l + 1) % 3
	if err := dbs[moved].Close(); err != nil {
		t.Fatal(err)
	}
	c.dbs[moved] = nil
	const newAddr = "127.0.0.1:4013"
	db := c.mustOpen(moved, func(cfg *Config) {
		cfg.Listener.Close()
		ln, err := c.nw.Listen("tcp", newAddr)
		if err != nil {
			t.Fatal(err)
		}
		cfg.Listener = ln
		cfg.Join = c.addrs()
	})
	want := fmt.Sprintf("node%d@%s", moved+1, newAddr)
	deadline := time.Now().Add(30 * time.Second)
	for !slices.Contains(raftNodes(t, c.dbs[l]), want) {
		if time.Now().After(deadline) {
			t.Fatalf("leader's configuration = %v, want %s in it", raftNodes(t, c.dbs[l]), want)
		}
		time.Sleep(20 * time.Millisecond)
	}
	if got := raftNodes(t, c.dbs[l]); len(got) != 3 {
		t.Fatalf("configuration after the move = %v, want 3 nodes", got)
	}
	waitLocal(t, db, "before-move-1")
	checkSameAnswers(t, slices.Clone(c.dbs), "after-move")
}
