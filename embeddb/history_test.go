package embeddb

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"maps"
	"math/rand/v2"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/rqlite/rqlite/v8/command/proto"
)

// A leader-loss history test in the manner of Jepsen: clients write and read
// through every node of a three-node cluster while its leader is cut off the
// network, a new one is elected, and the old one is restarted from its dir.
// Every operation is recorded with when it started and ended, on which node,
// and how it ended; a checker then looks for what a correct database never
// does: an acknowledged write lost, a failed write present, a read that went
// back in time.
//
// The model is a set of registers, each holding a version: "vm:<id>" is 1
// once the VM's record exists (0 before; creates are never undone here), and
// "kv:<vm>/<key>" is the number the key's value holds (0 while unset). Each
// key is written by one client only, with versions 1, 2, 3, ... in order, so
// a later version always means a later write.

type histKind int

const (
	histCreate histKind = iota
	histUpsert
	histGetVM
	histGetKVs
	histList
)

func (k histKind) String() string {
	return [...]string{"CreateVM", "UpsertKVs", "GetVM", "GetKVs", "ListVMs"}[k]
}

func (k histKind) write() bool { return k == histCreate || k == histUpsert }

// histOutcome is how an operation ended, as its caller saw it.
type histOutcome int

const (
	histOK      histOutcome = iota // acknowledged (a read: answered)
	histFailed                     // an error that says it did not apply
	histUnknown                    // may or may not have applied
)

func (o histOutcome) String() string { return [...]string{"ok", "failed", "unknown"}[o] }

// classify sorts an error by what it tells about a write: embeddb says a
// write whose fate it cannot know is ErrOutcomeUnknown; a timeout says
// nothing either. Any other error claims the write did not apply.
func classify(err error) histOutcome {
	switch {
	case err == nil:
		return histOK
	case errors.Is(err, ErrOutcomeUnknown), errors.Is(err, context.DeadlineExceeded), errors.Is(err, context.Canceled):
		return histUnknown
	}
	return histFailed
}

// histOp is one client operation.
type histOp struct {
	kind       histKind
	node       int // 0-based
	start, end time.Duration
	outcome    histOutcome
	err        error
	reg        string         // a write's register
	version    int            // the version a write sets
	target     string         // what a read asked for (a VM ID), for the log
	seen       map[string]int // an answered read's registers and versions
}

func (op *histOp) String() string {
	var b strings.Builder
	fmt.Fprintf(&b, "%s via node%d [%v, %v] %s", op.kind, op.node+1,
		op.start.Round(time.Millisecond), op.end.Round(time.Millisecond), op.outcome)
	if op.kind.write() {
		fmt.Fprintf(&b, " %s=%d", op.reg, op.version)
	} else if op.target != "" {
		fmt.Fprintf(&b, " of %s", op.target)
	}
	if op.err != nil {
		fmt.Fprintf(&b, " (%v)", op.err)
	}
	return b.String()
}

// history collects operations from concurrent clients. Times are measured
// on the monotonic clock from start.
type history struct {
	start time.Time
	mu    sync.Mutex
	ops   []*histOp
	vms   []string // every VM ID a create was attempted for, in order
}

func (h *history) now() time.Duration { return time.Since(h.start) }

func (h *history) add(op *histOp) {
	h.mu.Lock()
	h.ops = append(h.ops, op)
	h.mu.Unlock()
}

func (h *history) attempt(vmID string) {
	h.mu.Lock()
	h.vms = append(h.vms, vmID)
	h.mu.Unlock()
}

func (h *history) attempted() []string {
	h.mu.Lock()
	defer h.mu.Unlock()
	return slices.Clone(h.vms)
}

func (h *history) snapshot() []*histOp {
	h.mu.Lock()
	defer h.mu.Unlock()
	return slices.Clone(h.ops)
}

// count returns how many operations match.
func (h *history) count(match func(*histOp) bool) int {
	n := 0
	for _, op := range h.snapshot() {
		if match(op) {
			n++
		}
	}
	return n
}

func vmReg(id string) string        { return "vm:" + id }
func kvReg(vmID, key string) string { return "kv:" + vmID + "/" + key }

// checkHistory returns every way ops and the final states read through each
// node (register -> version; every register written must be there, 0 when
// absent) break the rules: an acknowledged write is present at the end, a
// failed one never seen, a read sees only versions some write that had begun
// set, and never a version older than one acknowledged or read before it
// began.
func checkHistory(ops []*histOp, final []map[string]int) []string {
	var bad []string
	writes := map[string]map[int]*histOp{} // register -> version -> write
	for _, op := range ops {
		if !op.kind.write() {
			continue
		}
		if writes[op.reg] == nil {
			writes[op.reg] = map[int]*histOp{}
		}
		writes[op.reg][op.version] = op
	}

	// The final state, through every node.
	for node, state := range final {
		for reg, byVersion := range writes {
			got, ok := state[reg]
			if !ok {
				bad = append(bad, fmt.Sprintf("final read through node%d lacks %s", node+1, reg))
				continue
			}
			for v, w := range byVersion {
				switch {
				case w.outcome == histOK && got < v:
					bad = append(bad, fmt.Sprintf("acknowledged write lost: %v; node%d holds version %d at the end", w, node+1, got))
				case w.outcome == histFailed && got == v:
					bad = append(bad, fmt.Sprintf("failed write applied: %v; node%d holds it at the end", w, node+1))
				}
			}
			if got > 0 && byVersion[got] == nil {
				bad = append(bad, fmt.Sprintf("node%d holds version %d of %s, which no one wrote", node+1, got, reg))
			}
		}
		if node > 0 && !maps.Equal(state, final[0]) {
			bad = append(bad, fmt.Sprintf("node%d's final state differs from node1's", node+1))
		}
	}

	// What each register was known to hold, and when that became known: an
	// acknowledged write, or an answered read. A read that began after such
	// evidence ended must see that version or a later one.
	type evidence struct {
		end     time.Duration
		version int
		op      *histOp
	}
	known := map[string][]evidence{}
	for _, op := range ops {
		if op.outcome != histOK {
			continue
		}
		if op.kind.write() {
			known[op.reg] = append(known[op.reg], evidence{op.end, op.version, op})
			continue
		}
		for reg, v := range op.seen {
			known[reg] = append(known[reg], evidence{op.end, v, op})
		}
	}
	// Per register, by end time, with the newest version known by then.
	type prefix struct {
		end     time.Duration
		version int
		op      *histOp
	}
	newest := map[string][]prefix{}
	for reg, evs := range known {
		slices.SortFunc(evs, func(a, b evidence) int { return cmp.Compare(a.end, b.end) })
		ps := make([]prefix, len(evs))
		best := prefix{version: -1}
		for i, e := range evs {
			if e.version > best.version {
				best = prefix{e.end, e.version, e.op}
			}
			ps[i] = prefix{e.end, best.version, best.op}
		}
		newest[reg] = ps
	}
	for _, op := range ops {
		if op.kind.write() || op.outcome != histOK {
			continue
		}
		for reg, v := range op.seen {
			if v > 0 {
				w := writes[reg][v]
				switch {
				case w == nil:
					bad = append(bad, fmt.Sprintf("%v saw version %d of %s, which no one wrote", op, v, reg))
				case w.outcome == histFailed:
					bad = append(bad, fmt.Sprintf("%v saw %s=%d, written by a failed write: %v", op, reg, v, w))
				case w.start > op.end:
					bad = append(bad, fmt.Sprintf("%v saw %s=%d before its write began: %v", op, reg, v, w))
				}
			}
			ps := newest[reg]
			// The last evidence that ended before op began.
			i := sort.Search(len(ps), func(i int) bool { return ps[i].end >= op.start }) - 1
			if i >= 0 && ps[i].version > v {
				bad = append(bad, fmt.Sprintf("read went back in time: %v saw %s=%d, but %d was known before it began: %v",
					op, reg, v, ps[i].version, ps[i].op))
			}
		}
	}
	slices.Sort(bad)
	return bad
}

// cutOff cuts db off the network as a crash would: it accepts nothing more
// and every connection it has, dialled or accepted, is closed, so it neither
// hands leadership over nor hears of the next leader. It keeps running (and
// may still believe it leads for a while) until closed.
func cutOff(db *DB) {
	db.ln.Close()
	db.conns.closeAll()
}

// node returns node i's open DB, nil while it is down.
func (c *testCluster) node(i int) *DB {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.dbs[i]
}

// histWorkload is the clients' shared state.
type histWorkload struct {
	c       *testCluster
	h       *history
	stop    atomic.Bool
	nextVM  atomicCounter
	targets []string            // VMs the key/values are set on
	keys    map[string][]string // target -> the keys set on it
}

// writer creates VMs and sets its own key, alternately at random, through
// node i until stopped.
func (w *histWorkload) writer(node int, target, key string, rng *rand.Rand) {
	ctx := context.Background()
	version := 0
	for !w.stop.Load() {
		db := w.c.node(node)
		if db == nil {
			time.Sleep(20 * time.Millisecond)
			continue
		}
		op := &histOp{node: node}
		if rng.IntN(2) == 0 {
			vm, cfg, addr := fixture(1000+w.nextVM.add(), "hist")
			op.kind, op.reg, op.version = histCreate, vmReg(vm.ID), 1
			w.h.attempt(vm.ID)
			op.start = w.h.now()
			op.err = db.CreateVM(ctx, vm, cfg, addr)
		} else {
			version++
			op.kind, op.reg, op.version = histUpsert, kvReg(target, key), version
			op.start = w.h.now()
			op.err = db.UpsertKVs(ctx, target, []KV{{Key: key, Value: strconv.Itoa(version)}})
		}
		op.end = w.h.now()
		op.outcome = classify(op.err)
		w.h.add(op)
	}
}

// reader reads key/values, single VMs and the whole VM list through node i
// until stopped.
func (w *histWorkload) reader(node int, rng *rand.Rand) {
	ctx := context.Background()
	for !w.stop.Load() {
		db := w.c.node(node)
		if db == nil {
			time.Sleep(20 * time.Millisecond)
			continue
		}
		op := &histOp{node: node, seen: map[string]int{}}
		switch n := rng.IntN(8); {
		case n < 4:
			target := w.targets[rng.IntN(len(w.targets))]
			op.kind, op.target = histGetKVs, target
			op.start = w.h.now()
			kvs, err := db.GetKVs(ctx, target)
			op.end, op.err = w.h.now(), err
			for _, key := range w.keys[target] {
				op.seen[kvReg(target, key)] = 0
			}
			for _, kv := range kvs {
				reg := kvReg(target, kv.Key)
				if _, ok := op.seen[reg]; !ok {
					op.err = fmt.Errorf("unexpected key %q", kv.Key)
					break
				}
				v, perr := strconv.Atoi(kv.Value)
				if perr != nil {
					op.err = fmt.Errorf("key %q holds %q", kv.Key, kv.Value)
					break
				}
				op.seen[reg] = v
			}
		case n < 7:
			ids := w.h.attempted()
			if len(ids) == 0 {
				continue
			}
			// Mostly recent creates, whose fate is being decided.
			id := ids[len(ids)-1-rng.IntN(min(len(ids), 20))]
			op.kind, op.target = histGetVM, id
			op.start = w.h.now()
			_, err := db.GetVM(ctx, id)
			op.end = w.h.now()
			switch {
			case err == nil:
				op.seen[vmReg(id)] = 1
			case errors.Is(err, ErrNotFound):
				op.seen[vmReg(id)] = 0
			default:
				op.err = err
			}
		default:
			op.kind = histList
			op.start = w.h.now()
			vms, err := db.ListVMs(ctx)
			op.end, op.err = w.h.now(), err
			// Every create attempted by now: what the list lacks, it saw absent.
			for _, id := range w.h.attempted() {
				op.seen[vmReg(id)] = 0
			}
			for _, vm := range vms {
				if slices.Contains(w.targets, vm.ID) {
					continue
				}
				if _, ok := op.seen[vmReg(vm.ID)]; !ok {
					op.err = fmt.Errorf("listed vm %s, which no one created", vm.ID)
					break
				}
				op.seen[vmReg(vm.ID)] = 1
			}
		}
		if op.err != nil {
			op.outcome, op.seen = histFailed, nil
		}
		w.h.add(op)
	}
}

// localState reads what db's own copy holds (level NONE, without the
// leader) in the history's registers.
func localState(t testing.TB, db *DB) map[string]int {
	t.Helper()
	res, _, err := db.str.Query(&proto.QueryRequest{
		Request: &proto.Request{Statements: []*proto.Statement{
			{Sql: "SELECT id FROM vms"},
			{Sql: "SELECT vm_id, name, value FROM kvs"},
		}},
		Level: proto.QueryRequest_QUERY_REQUEST_LEVEL_NONE,
	})
	if err != nil {
		t.Fatalf("local read: %v", err)
	}
	state := map[string]int{}
	for _, r := range rows(res[0]) {
		state[vmReg(r.str(0))] = 1
	}
	for _, r := range rows(res[1]) {
		v, err := strconv.Atoi(r.str(2))
		if err != nil {
			t.Fatalf("local read: key %s of %s holds %q", r.str(1), r.str(0), r.str(2))
		}
		state[kvReg(r.str(0), r.str(1))] = v
	}
	return state
}

// readState reads the history's registers through db's API (linearizable,
// through the leader), with every register in regs present (0: absent).
func readState(ctx context.Context, db *DB, w *histWorkload, regs []string) (map[string]int, error) {
	state := map[string]int{}
	for _, reg := range regs {
		state[reg] = 0
	}
	vms, err := db.ListVMs(ctx)
	if err != nil {
		return nil, err
	}
	for _, vm := range vms {
		state[vmReg(vm.ID)] = 1
	}
	for _, target := range w.targets {
		kvs, err := db.GetKVs(ctx, target)
		if err != nil {
			return nil, err
		}
		for _, kv := range kvs {
			v, err := strconv.Atoi(kv.Value)
			if err != nil {
				return nil, fmt.Errorf("key %s of %s holds %q", kv.Key, target, kv.Value)
			}
			state[kvReg(target, kv.Key)] = v
		}
	}
	return state, nil
}

// waitFor polls cond until it holds; a deadline only guards against a hang
// (this is not a timing assert).
func waitFor(t testing.TB, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(time.Minute)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("%s: not within a minute", what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// TestHistoryLeaderLoss: clients create VMs, set key/values and read them
// back through all three nodes while the leader is cut off the network (as
// a crash would: no handover), a new leader takes over, writes go on, and
// the old leader is restarted from its dir and catches up. The history of
// every operation must show no acknowledged write lost, no failed write
// applied, and no read going back in time; at the end every node, the
// restarted one included, holds the same state and answers alike.
func TestHistoryLeaderLoss(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	c := newTestCluster(t, 3)
	dbs := c.openExpect()
	mustNetwork(t, dbs[0], "hist")

	const writersPerNode, readersPerNode = 2, 1
	w := &histWorkload{c: c, h: &history{start: time.Now()}, keys: map[string][]string{}}
	for i := range 3 {
		vm := mustCreateVM(t, dbs[0], i+1, "hist")
		w.targets = append(w.targets, vm.ID)
	}
	seed := uint64(time.Now().UnixNano())
	t.Logf("seed %d", seed)
	var wg sync.WaitGroup
	k := 0
	for node := range 3 {
		for range writersPerNode {
			target, key := w.targets[k%len(w.targets)], fmt.Sprintf("w%d", k)
			w.keys[target] = append(w.keys[target], key)
			rng := rand.New(rand.NewPCG(seed, uint64(k)))
			wg.Go(func() { w.writer(node, target, key, rng) })
			k++
		}
	}
	for node := range 3 {
		for j := range readersPerNode {
			rng := rand.New(rand.NewPCG(seed, uint64(100+node*readersPerNode+j)))
			wg.Go(func() { w.reader(node, rng) })
		}
	}
	defer func() { // on a failure below, stop the clients before the cluster closes
		w.stop.Store(true)
		wg.Wait()
	}()
	h := w.h
	acked := func(node int, after time.Duration) func(*histOp) bool {
		return func(op *histOp) bool {
			return op.kind.write() && op.outcome == histOK && op.start > after && (node < 0 || op.node == node)
		}
	}
	answered := func(node int, after time.Duration) func(*histOp) bool {
		return func(op *histOp) bool {
			return !op.kind.write() && op.outcome == histOK && op.start > after && op.node == node
		}
	}

	// Writes and reads flow through every node.
	for node := range 3 {
		waitFor(t, fmt.Sprintf("writes and reads through node%d", node+1), func() bool {
			return h.count(acked(node, 0)) >= 30 && h.count(answered(node, 0)) >= 10
		})
	}

	// Cut the leader off.
	l := c.leader()
	old := c.node(l)
	cutAt := h.now()
	cutOff(old)
	t.Logf("%v: cut node%d (leader) off", cutAt.Round(time.Millisecond), l+1)
	waitFor(t, "a new leader", func() bool {
		for i := range 3 {
			if i != l && c.node(i).IsLeader() {
				return true
			}
		}
		return false
	})
	t.Logf("%v: a new leader", h.now().Round(time.Millisecond))
	waitFor(t, "writes after the failover", func() bool { return h.count(acked(-1, cutAt)) >= 100 })

	// Restart it from its dir, as after a crash.
	c.mu.Lock()
	c.dbs[l] = nil
	c.mu.Unlock()
	if err := old.Close(); err != nil {
		t.Logf("close the cut node: %v", err)
	}
	downAt := h.now()
	back := c.mustOpen(l, nil)
	backAt := h.now()
	t.Logf("%v: node%d down; %v: back", downAt.Round(time.Millisecond), l+1, backAt.Round(time.Millisecond))
	waitFor(t, "writes and reads through the restarted node", func() bool {
		return h.count(acked(l, backAt)) >= 30 && h.count(answered(l, backAt)) >= 10
	})
	w.stop.Store(true)
	wg.Wait()

	// Every node's own copy converges: the restarted one has caught up.
	var local []map[string]int
	waitFor(t, "the nodes' own copies to agree", func() bool {
		local = local[:0]
		for i := range 3 {
			local = append(local, localState(t, c.node(i)))
		}
		return maps.Equal(local[0], local[1]) && maps.Equal(local[0], local[2])
	})
	if got := raftNodes(t, back); len(got) != 3 {
		t.Fatalf("restarted node's configuration = %v", got)
	}

	ops := h.snapshot()
	regs := map[string]bool{}
	for _, op := range ops {
		if op.kind.write() {
			regs[op.reg] = true
		}
	}
	var final []map[string]int
	for i := range 3 {
		state, err := readState(ctx, c.node(i), w, slices.Sorted(maps.Keys(regs)))
		if err != nil {
			t.Fatalf("final read through node%d: %v", i+1, err)
		}
		final = append(final, state)
	}
	// The API answers what the nodes' own copies hold (0 is absent; the
	// copies hold the targets' records too).
	for _, pair := range [][2]map[string]int{{final[0], local[0]}, {local[0], final[0]}} {
		for reg, v := range pair[0] {
			if pair[1][reg] != v {
				t.Errorf("the final read and the nodes' own copies differ on %s: %d, %d", reg, final[0][reg], local[0][reg])
			}
		}
	}

	tally := map[string]int{}
	for _, op := range ops {
		tally[op.kind.String()+" "+op.outcome.String()]++
	}
	t.Logf("%d operations: %v", len(ops), tally)
	n := 0
	for _, op := range ops {
		if op.kind.write() && op.outcome != histOK && n < 20 {
			t.Logf("not acknowledged: %v", op)
			n++
		}
	}
	bad := checkHistory(ops, final)
	for i, b := range bad {
		if i == 30 {
			t.Errorf("... and %d more", len(bad)-i)
			break
		}
		t.Error(b)
	}
	if len(bad) > 0 {
		t.Logf("cut at %v, node%d closed at %v, back at %v", cutAt, l+1, downAt, backAt)
	}
}

// TestHistoryChecker shows that checkHistory catches each kind of anomaly
// in small hand-made histories, and passes a correct one.
func TestHistoryChecker(t *testing.T) {
	t.Parallel()
	ms := func(n int) time.Duration { return time.Duration(n) * time.Millisecond }
	write := func(kind histKind, reg string, v, start, end int, o histOutcome) *histOp {
		return &histOp{kind: kind, reg: reg, version: v, start: ms(start), end: ms(end), outcome: o}
	}
	read := func(start, end int, seen map[string]int) *histOp {
		return &histOp{kind: histGetKVs, start: ms(start), end: ms(end), seen: seen}
	}
	const k, vm = "kv:vm-1/w0", "vm:vm-2"
	good := []*histOp{
		write(histUpsert, k, 1, 0, 10, histOK),
		write(histUpsert, k, 2, 10, 20, histUnknown),
		write(histUpsert, k, 3, 20, 30, histFailed),
		write(histCreate, vm, 1, 5, 15, histUnknown),
		read(12, 18, map[string]int{k: 1}),
		read(15, 25, map[string]int{k: 2, vm: 0}), // concurrent with the create
		read(26, 28, map[string]int{k: 2, vm: 1}),
	}
	final := []map[string]int{{k: 2, vm: 1}, {k: 2, vm: 1}}
	if bad := checkHistory(good, final); len(bad) > 0 {
		t.Fatalf("a correct history was flagged: %q", bad)
	}
	for name, tc := range map[string]struct {
		ops   []*histOp
		final []map[string]int
		want  string
	}{
		"lost ack": {
			ops:   []*histOp{write(histCreate, vm, 1, 0, 10, histOK)},
			final: []map[string]int{{vm: 1}, {vm: 0}},
			want:  "acknowledged write lost",
		},
		"failed applied": {
			ops:   []*histOp{write(histUpsert, k, 1, 0, 10, histFailed)},
			final: []map[string]int{{k: 1}},
			want:  "failed write applied",
		},
		"failed seen": {
			ops: []*histOp{
				write(histUpsert, k, 1, 0, 10, histFailed),
				read(5, 8, map[string]int{k: 1}),
			},
			final: []map[string]int{{k: 0}},
			want:  "written by a failed write",
		},
		"stale after ack": {
			ops: []*histOp{
				write(histUpsert, k, 1, 0, 10, histOK),
				read(11, 12, map[string]int{k: 0}),
			},
			final: []map[string]int{{k: 1}},
			want:  "read went back in time",
		},
		"stale after read": {
			ops: []*histOp{
				write(histCreate, vm, 1, 0, 100, histUnknown),
				read(10, 20, map[string]int{vm: 1}),
				read(21, 22, map[string]int{vm: 0}),
			},
			final: []map[string]int{{vm: 1}},
			want:  "read went back in time",
		},
		"nodes disagree": {
			ops:   []*histOp{write(histUpsert, k, 1, 0, 10, histUnknown)},
			final: []map[string]int{{k: 1}, {k: 0}},
			want:  "differs from node1's",
		},
	} {
		bad := checkHistory(tc.ops, tc.final)
		if !slices.ContainsFunc(bad, func(s string) bool { return strings.Contains(s, tc.want) }) {
			t.Errorf("%s: want a complaint about %q, got %q", name, tc.want, bad)
		}
	}
}
