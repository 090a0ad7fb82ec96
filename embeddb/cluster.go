package embeddb

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/hashicorp/raft"
	"github.com/rqlite/rqlite/v8/cluster"
	cproto "github.com/rqlite/rqlite/v8/cluster/proto"
	"github.com/rqlite/rqlite/v8/command/proto"
	"github.com/rqlite/rqlite/v8/store"
	pb "google.golang.org/protobuf/proto"
)

// Clustering settings.
const (
	// admitTimeout bounds Config.Admit for one connection, so a stuck check
	// cannot hold a connection open for ever.
	admitTimeout = 10 * time.Second
	// forwardTimeout bounds one request carried to the leader: the leader's
	// own apply timeout plus the round trip.
	forwardTimeout = applyTimeout + 5*time.Second
	// leaderWait is how long a request waits for an election to end before
	// it fails with ErrNotLeader. A failover takes 2-4 s on a LAN.
	leaderWait = 15 * time.Second
	// retryPause spaces the attempts made while no leader is known.
	retryPause = 100 * time.Millisecond
	// quorumGrace is how long a request that gets no leader waits before this
	// node asks the voters whether it reaches a majority of them, and again
	// between such checks. An election among a majority ends within a few of
	// these; a node that reaches no majority fails the request at the first
	// check (ErrNoQuorum) rather than at leaderWait.
	quorumGrace = time.Second
	// forwardDialTimeout bounds the connection to the leader: over the tailnet
	// a leader that is gone does not refuse, it never answers, and past this
	// the wait is better spent looking for another leader or a quorum.
	forwardDialTimeout = 3 * time.Second
	// joinInterval spaces join and bootstrap attempts; Open's ctx bounds
	// how many are made.
	joinInterval = time.Second
	// clusteredMarker, a file in Dir, says that this node was part of a
	// cluster of several nodes, so a restart without Join keeps the normal
	// election timing instead of the fast one of a node alone.
	clusteredMarker = "embeddb-clustered"
)

// ErrNoQuorum means no leader could be reached and this node reaches fewer than
// a majority of the voters, so none can be elected until hosts come back (or
// are removed from the cluster by a host on the majority's side).
var ErrNoQuorum = errors.New("no database leader")

// quorum asks every voter of this node's Raft configuration whether it
// answers, and returns an ErrNoQuorum error saying how many this node reaches
// when that is fewer than a majority; nil when it reaches a majority (an
// election can end) or cannot tell.
func (b clusterBackend) quorum(ctx context.Context) error {
	nodes, err := b.local.str.Nodes()
	if err != nil {
		return nil
	}
	voters := slices.DeleteFunc(nodes, func(n *store.Server) bool { return n.Suffrage != "Voter" })
	if len(voters) == 0 {
		return nil
	}
	reach := b.reach(ctx, b.local.str.ID(), voters)
	var lost []string
	for i, n := range voters {
		if !reach[i] {
			lost = append(lost, n.ID)
		}
	}
	got, need := len(voters)-len(lost), len(voters)/2+1
	if got >= need {
		return nil
	}
	return fmt.Errorf("%w: this host reaches %d of %d hosts (needs %d; no answer from %s)",
		ErrNoQuorum, got, len(voters), need, strings.Join(lost, ", "))
}

// clusterOpts validates the clustering part of cfg and returns the Raft
// addresses of the other nodes (this node's own address left out).
func clusterOpts(cfg Config, adv string) ([]string, error) {
	if cfg.BootstrapExpect < 0 {
		return nil, fmt.Errorf("open embeddb: bootstrap expect %d is negative: %w", cfg.BootstrapExpect, ErrInvalid)
	}
	var others []string
	for _, a := range cfg.Join {
		if _, _, err := net.SplitHostPort(a); err != nil {
			return nil, fmt.Errorf("open embeddb: join address %q is not host:port: %w", a, ErrInvalid)
		}
		if a != adv && !slices.Contains(others, a) {
			others = append(others, a)
		}
	}
	if cfg.BootstrapExpect > 1 && len(others) < cfg.BootstrapExpect-1 {
		return nil, fmt.Errorf("open embeddb: bootstrap expect %d needs the Raft addresses of the %d other nodes in Join, got %d: %w",
			cfg.BootstrapExpect, cfg.BootstrapExpect-1, len(others), ErrInvalid)
	}
	if len(others) > 0 && cfg.Dial == nil {
		return nil, fmt.Errorf("open embeddb: joining peers needs Dial: %w", ErrInvalid)
	}
	return others, nil
}

func hasClusteredMarker(dir string) bool {
	_, err := os.Stat(filepath.Join(dir, clusteredMarker))
	return err == nil
}

// markClustered records that this node has peers, once it knows.
func (db *DB) markClustered() {
	if db.clustered.Load() {
		return
	}
	nodes, err := db.str.Nodes()
	if err != nil || len(nodes) < 2 {
		return
	}
	if err := os.WriteFile(filepath.Join(db.dir, clusteredMarker), nil, 0o600); err != nil {
		db.logf("embeddb: record cluster membership: %v", err)
		return
	}
	db.clustered.Store(true)
}

// formCluster makes a node with an empty Raft configuration a member: it
// bootstraps a cluster of BootstrapExpect nodes with the others (as
// rqlited's -bootstrap-expect), joins the cluster one of the others belongs
// to, or bootstraps a cluster of itself alone when there are no others.
// A node that already has a configuration needs none of this: Raft reaches
// its peers from the configuration it stored. It joins again only when
// given peers and its configuration holds it at another address.
func formCluster(ctx context.Context, cfg Config, adv string, others []string, str *store.Store, client *cluster.Client, logf func(string, ...any)) error {
	nodes, err := str.Nodes()
	if err != nil {
		return fmt.Errorf("read raft configuration in %s: %w", cfg.Dir, err)
	}
	if len(nodes) > 0 {
		if len(others) > 0 && len(nodes) == 1 && nodes[0].ID == cfg.NodeID {
			// Raft cannot merge two clusters: a node that formed its own
			// cluster can only be emptied and joined afresh.
			return fmt.Errorf("open embeddb: %s holds a one-node cluster of its own, which cannot join %v; start the node with an empty dir to join: %w",
				cfg.Dir, others, ErrInvalid)
		}
		if len(others) == 0 || slices.ContainsFunc(nodes, func(n *store.Server) bool { return n.ID == cfg.NodeID && n.Addr == adv }) {
			return nil
		}
		// The cluster knows this node by another address (its tailnet IP
		// changed, say): joining again makes the leader record the new one,
		// as rqlited does at every start with -join.
		logf("embeddb: the cluster knows %s by another address; joining again as %s", cfg.NodeID, adv)
	}
	voter := cluster.VoterSuffrage(true)
	switch {
	case len(others) == 0:
		logf("embeddb: bootstrapping new cluster of 1 node in %s", cfg.Dir)
		if err := str.Bootstrap(store.NewServer(cfg.NodeID, adv, true)); err != nil {
			return fmt.Errorf("bootstrap %s: %w", cfg.Dir, err)
		}
	case cfg.BootstrapExpect > 1 && len(nodes) == 0:
		// Count this node itself: the bootstrapper only notifies the others.
		if err := str.Notify(&proto.NotifyRequest{Id: cfg.NodeID, Address: adv}); err != nil {
			return fmt.Errorf("bootstrap %s: %w", cfg.Dir, err)
		}
		logf("embeddb: forming a new cluster of %d nodes with %v", cfg.BootstrapExpect, others)
		bs := cluster.NewBootstrapper(cluster.NewAddressProviderString(others), client)
		bs.Interval = joinInterval
		done := func() bool { leader, _ := str.LeaderAddr(); return leader != "" }
		if err := bs.Boot(ctx, cfg.NodeID, adv, voter, done, 365*24*time.Hour); err != nil {
			return fmt.Errorf("form cluster with %v: %w", others, errors.Join(err, ctx.Err()))
		}
	default:
		logf("embeddb: joining the cluster of %v", others)
		j := cluster.NewJoiner(client, 1<<30, joinInterval)
		if _, err := j.Do(ctx, others, cfg.NodeID, adv, voter); err != nil {
			return fmt.Errorf("join cluster of %v: %w", others, errors.Join(err, ctx.Err()))
		}
	}
	return nil
}

// clusterBackend serves requests on this node when it leads and carries them
// to the leader's cluster service otherwise (as rqlited does), so every node
// gives the same answers.
//
// Each forwarded request gets a connection of its own rather than one from
// rqlite's cluster.Client pool: a pooled connection can be dead (the leader
// restarted at the same address) in a way only noticed after the request
// was written, which for a write leaves its outcome unknown. On a fresh
// connection, a failure before the request is written means it did not
// apply, so it can be retried safely; the price is one connection setup
// per forwarded request, and one Admit check on the leader.
type clusterBackend struct {
	local  localBackend
	dialer *headerDialer // cluster header
	self   string        // this node's Raft address
}

func (b clusterBackend) execute(ctx context.Context, req *proto.ExecuteRequest) ([]*proto.ExecuteQueryResponse, error) {
	return forward(ctx, b, false,
		func() ([]*proto.ExecuteQueryResponse, error) { r, _, err := b.local.str.Execute(req); return r, err },
		func(addr string, t time.Duration) ([]*proto.ExecuteQueryResponse, string, bool, error) {
			var resp cproto.CommandExecuteResponse
			sent, err := b.call(addr, t, &cproto.Command{
				Type:    cproto.Command_COMMAND_TYPE_EXECUTE,
				Request: &cproto.Command_ExecuteRequest{ExecuteRequest: req},
			}, &resp)
			return resp.Response, resp.Error, sent, err
		})
}

func (b clusterBackend) query(ctx context.Context, req *proto.QueryRequest) ([]*proto.QueryRows, error) {
	for moved := false; ; moved = true {
		rows, err := forward(ctx, b, true,
			func() ([]*proto.QueryRows, error) { r, _, err := b.local.str.Query(req); return r, err },
			func(addr string, t time.Duration) ([]*proto.QueryRows, string, bool, error) {
				var resp cproto.CommandQueryResponse
				sent, err := b.call(addr, t, &cproto.Command{
					Type:    cproto.Command_COMMAND_TYPE_QUERY,
					Request: &cproto.Command_QueryRequest{QueryRequest: req},
				}, &resp)
				return resp.Rows, resp.Error, sent, err
			})
		if moved || err == nil || !strings.Contains(err.Error(), store.ErrWaitForFSMTimeout.Error()) {
			return rows, err
		}
		// A linearizable read waits for the leader's state machine to reach
		// the commit index, and a change of members (a join, a removal) is
		// committed without passing through the state machine: until the
		// next write, every such read times out. An empty write moves the
		// state machine on.
		if werr := b.barrier(ctx); werr != nil {
			return rows, err
		}
	}
}

// barrier writes an empty entry through the leader, which changes no data and
// is safe to repeat, so the state machine reaches the commit index.
func (b clusterBackend) barrier(ctx context.Context) error {
	_, err := b.execute(ctx, &proto.ExecuteRequest{Request: &proto.Request{}})
	return err
}

func (b clusterBackend) request(ctx context.Context, req *proto.ExecuteQueryRequest) ([]*proto.ExecuteQueryResponse, error) {
	return forward(ctx, b, false,
		func() ([]*proto.ExecuteQueryResponse, error) { r, _, err := b.local.str.Request(req); return r, err },
		func(addr string, t time.Duration) ([]*proto.ExecuteQueryResponse, string, bool, error) {
			var resp cproto.CommandRequestResponse
			sent, err := b.call(addr, t, &cproto.Command{
				Type:    cproto.Command_COMMAND_TYPE_REQUEST,
				Request: &cproto.Command_ExecuteQueryRequest{ExecuteQueryRequest: req},
			}, &resp)
			return resp.Response, resp.Error, sent, err
		})
}

// maxResponse bounds a response's announced length, so a garbled length
// cannot make this node allocate without limit.
const maxResponse = 1 << 30

// call sends one command to the cluster service at addr on a new
// connection and reads its answer into resp. sent reports whether the
// whole request may have reached the service (only then can it have
// applied).
func (b clusterBackend) call(addr string, timeout time.Duration, cmd *cproto.Command, resp pb.Message) (sent bool, err error) {
	p, err := pb.Marshal(cmd)
	if err != nil {
		return false, fmt.Errorf("marshal request: %w", err)
	}
	conn, err := b.dialer.Dial(addr, min(timeout, forwardDialTimeout))
	if err != nil {
		return false, err
	}
	defer conn.Close()
	if err := conn.SetDeadline(time.Now().Add(timeout)); err != nil {
		return false, err
	}
	msg := binary.LittleEndian.AppendUint64(make([]byte, 0, 8+len(p)), uint64(len(p)))
	if _, err := conn.Write(append(msg, p...)); err != nil {
		// The service decodes a command only once all of it arrived.
		return false, fmt.Errorf("send request to %s: %w", addr, err)
	}
	var n [8]byte
	if _, err := io.ReadFull(conn, n[:]); err != nil {
		return true, fmt.Errorf("read answer from %s: %w", addr, err)
	}
	size := binary.LittleEndian.Uint64(n[:])
	if size > maxResponse {
		return true, fmt.Errorf("answer from %s announces %d bytes", addr, size)
	}
	buf := make([]byte, size)
	if _, err := io.ReadFull(conn, buf); err != nil {
		return true, fmt.Errorf("read answer from %s: %w", addr, err)
	}
	if err := pb.Unmarshal(buf, resp); err != nil {
		return true, fmt.Errorf("decode answer from %s: %w", addr, err)
	}
	return true, nil
}

// forward runs a request on this node and, while this node is not the
// leader, on the leader. It tries again only where the request surely did
// not apply: this node or the leader refused it as not the leader (or
// closing), no leader is known (an election is under way), or the leader
// could not be reached before the request was sent. A write whose answer
// was lost is not sent again (it may have applied): its error wraps
// ErrOutcomeUnknown, so nobody takes it for one that is safe to repeat; so
// does a write whose leader lost the leadership before it committed (a later
// leader may still commit it). Reads are retried. ctx and leaderWait bound
// the whole, and a node that reaches no majority of voters gives up at the
// first quorum check, quorumGrace in (ErrNoQuorum).
func forward[T any](ctx context.Context, b clusterBackend, idempotent bool,
	local func() (T, error),
	remote func(addr string, timeout time.Duration) (res T, remoteErr string, sent bool, err error),
) (T, error) {
	var zero T
	start := time.Now()
	give := start.Add(leaderWait)
	if d, ok := ctx.Deadline(); ok && d.Before(give) {
		give = d
	}
	nextCheck := start.Add(quorumGrace)
	why := "no leader is known"
	for {
		if err := ctx.Err(); err != nil {
			return zero, err
		}
		res, err := local()
		if !idempotent && errors.Is(err, raft.ErrLeadershipLost) {
			note := ""
			if qerr := b.quorum(ctx); qerr != nil {
				note = " (" + qerr.Error() + ")"
			}
			return zero, fmt.Errorf("%w: this node lost the leadership before the write committed%s", ErrOutcomeUnknown, note)
		}
		if !errors.Is(err, store.ErrNotLeader) {
			return res, b.local.mapErr(err)
		}
		leader, _ := b.local.str.LeaderAddr()
		if leader != "" && leader != b.self {
			t := min(forwardTimeout, max(time.Until(give), time.Second))
			res, remoteErr, sent, err := remote(leader, t)
			switch {
			case err == nil && remoteErr == "":
				return res, nil
			case err == nil && refusedUnapplied(remoteErr):
				why = fmt.Sprintf("leader %s answered %q", leader, remoteErr)
			case err == nil && !idempotent && remoteErr == raft.ErrLeadershipLost.Error():
				return zero, fmt.Errorf("%w: leader %s lost the leadership before the write committed", ErrOutcomeUnknown, leader)
			case err == nil:
				return zero, fmt.Errorf("leader %s: %s", leader, remoteErr)
			case sent && !idempotent:
				return zero, fmt.Errorf("%w: forwarded to leader %s: %v", ErrOutcomeUnknown, leader, err)
			default:
				why = fmt.Sprintf("leader %s unreachable: %v", leader, err)
			}
		}
		if !time.Now().Before(nextCheck) {
			if err := b.quorum(ctx); err != nil {
				return zero, err
			}
			nextCheck = time.Now().Add(quorumGrace)
		}
		if time.Now().After(give) {
			return zero, fmt.Errorf("%w: %s", ErrNotLeader, why)
		}
		select {
		case <-ctx.Done():
			return zero, ctx.Err()
		case <-time.After(retryPause):
		}
	}
}

// refusedUnapplied reports whether the leader answered that it did not take
// the request: it is no longer the leader, or it is closing.
func refusedUnapplied(msg string) bool {
	switch msg {
	case store.ErrNotLeader.Error(), store.ErrNotOpen.Error(), store.ErrNotReady.Error():
		return true
	}
	return false
}

// connSet tracks this node's connections, both accepted and dialled, so
// that Close (and tests that cut a node off) can end them: rqlite's cluster
// client keeps a pool with no way to close it, and its service reads an
// idle connection until the peer closes it.
type connSet struct {
	mu     sync.Mutex
	conns  map[*trackedConn]struct{}
	closed bool
}

type trackedConn struct {
	net.Conn
	set  *connSet
	once sync.Once
}

func (c *trackedConn) Close() error {
	c.once.Do(func() {
		c.set.mu.Lock()
		delete(c.set.conns, c)
		c.set.mu.Unlock()
	})
	return c.Conn.Close()
}

// add tracks conn, or closes it and fails if the set is closed.
func (s *connSet) add(conn net.Conn) (net.Conn, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		conn.Close()
		return nil, net.ErrClosed
	}
	if s.conns == nil {
		s.conns = map[*trackedConn]struct{}{}
	}
	tc := &trackedConn{Conn: conn, set: s}
	s.conns[tc] = struct{}{}
	return tc, nil
}

// closeAll closes every connection and refuses new ones.
func (s *connSet) closeAll() {
	s.mu.Lock()
	s.closed = true
	conns := s.conns
	s.conns = nil
	s.mu.Unlock()
	for c := range conns {
		c.Conn.Close()
	}
}

// headerDialer dials peers through Config.Dial and announces the service
// wanted with the mux header byte. It is the cluster.Dialer of the cluster
// client and the dialling half of the Raft layer.
type headerDialer struct {
	header byte
	dial   func(ctx context.Context, addr string) (net.Conn, error)
	conns  *connSet
}

func (d *headerDialer) Dial(addr string, timeout time.Duration) (net.Conn, error) {
	if d.dial == nil {
		return nil, fmt.Errorf("dial peer %s: no Dial configured", addr)
	}
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	conn, err := d.dial(ctx, addr)
	if err != nil {
		return nil, fmt.Errorf("dial peer %s: %w", addr, err)
	}
	if conn, err = d.conns.add(conn); err != nil {
		return nil, fmt.Errorf("dial peer %s: %w", addr, err)
	}
	if err := conn.SetWriteDeadline(time.Now().Add(timeout)); err != nil {
		conn.Close()
		return nil, fmt.Errorf("dial peer %s: %w", addr, err)
	}
	if _, err := conn.Write([]byte{d.header}); err != nil {
		conn.Close()
		return nil, fmt.Errorf("dial peer %s: write header: %w", addr, err)
	}
	if err := conn.SetWriteDeadline(time.Time{}); err != nil {
		conn.Close()
		return nil, fmt.Errorf("dial peer %s: %w", addr, err)
	}
	return conn, nil
}

// admitListener hands the mux only connections that Admit accepted; the
// mux reads nothing from a connection before that. Each check runs on its
// own goroutine so one slow check does not hold up the others.
type admitListener struct {
	inner net.Listener
	admit func(ctx context.Context, conn net.Conn) error
	logf  func(string, ...any)
	conns *connSet

	admitted chan net.Conn
	done     chan struct{}
	once     sync.Once
	errMu    sync.Mutex
	err      error // why the inner listener stopped
	ctx      context.Context
	cancel   context.CancelFunc // ends checks under way at Close
}

func newAdmitListener(inner net.Listener, admit func(context.Context, net.Conn) error, logf func(string, ...any), conns *connSet) *admitListener {
	l := &admitListener{
		inner: inner, admit: admit, logf: logf, conns: conns,
		admitted: make(chan net.Conn),
		done:     make(chan struct{}),
	}
	l.ctx, l.cancel = context.WithCancel(context.Background())
	go l.acceptLoop()
	return l
}

func (l *admitListener) acceptLoop() {
	for {
		conn, err := l.inner.Accept()
		if err != nil {
			var te interface{ Temporary() bool }
			if errors.As(err, &te) && te.Temporary() {
				time.Sleep(10 * time.Millisecond)
				continue
			}
			l.errMu.Lock()
			l.err = err
			l.errMu.Unlock()
			l.Close()
			return
		}
		go l.check(conn)
	}
}

func (l *admitListener) check(conn net.Conn) {
	if l.admit != nil {
		ctx, cancel := context.WithTimeout(l.ctx, admitTimeout)
		err := l.admit(ctx, conn)
		cancel()
		if err != nil {
			l.logf("embeddb: refused connection from %s: %v", conn.RemoteAddr(), err)
			conn.Close()
			return
		}
	}
	tc, err := l.conns.add(conn)
	if err != nil {
		return
	}
	select {
	case l.admitted <- tc:
	case <-l.done:
		tc.Close()
	}
}

func (l *admitListener) Accept() (net.Conn, error) {
	select {
	case c := <-l.admitted:
		return c, nil
	case <-l.done:
		l.errMu.Lock()
		defer l.errMu.Unlock()
		if l.err != nil {
			return nil, l.err
		}
		return nil, net.ErrClosed
	}
}

// Close stops accepting; connections already admitted stay open (the
// connSet closes those).
func (l *admitListener) Close() error {
	var err error
	l.once.Do(func() {
		close(l.done)
		l.cancel()
		err = l.inner.Close()
	})
	return err
}

func (l *admitListener) Addr() net.Addr { return l.inner.Addr() }

// IsNew reports whether dir holds no node yet: Open would make a new one.
func IsNew(dir string) bool { return store.IsNewNode(dir) }
