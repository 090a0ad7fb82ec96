package fleet_test

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"tailscale.com/net/memnet"

	"github.com/threes-dev/threes/appliance/fleet"
	"github.com/threes-dev/threes/embeddb"
	"github.com/threes-dev/threes/hv"
	"github.com/threes-dev/threes/hv/hvtest"
	"github.com/threes-dev/threes/hv/images"
	"github.com/threes-dev/threes/netboot/ipam"
)

// The fast tier: a Fleet on the in-memory hypervisor (hvtest.Memory, held to
// libvirt's contract by hvtest.Contract), a real embedded rqlite and a real IPAM.
// It needs no root, no libvirtd and no tailnet, and runs in seconds.

// rig is a Fleet and what it works with.
type rig struct {
	f    *fleet.Fleet
	hv   *hvtest.Memory
	db   *embeddb.DB
	ipam *ipam.IPAM
	logs *syncBuffer
}

type syncBuffer struct {
	mu sync.Mutex
	b  strings.Builder
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// newRig opens a Fleet with a network "lab" and a kernel-only image "base" (a file
// that carries the Linux boot header; Memory boots nothing). With run, the fleet's
// background work (events, one reconcile pass at start) runs too.
func newRig(t *testing.T, run bool, hooks fleet.Hooks) *rig {
	t.Helper()
	ctx := context.Background()
	dir := t.TempDir()
	db, err := embeddb.Open(ctx, embeddb.Config{Dir: filepath.Join(dir, "db"), NodeID: "fast",
		Listener: memnet.Listen("threes-raft:4002")})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { db.Close() })
	pool, err := ipam.New(ipam.Config{Prefix: netip.MustParsePrefix("10.10.0.0/24")}, nil)
	if err != nil {
		t.Fatal(err)
	}
	store, err := images.Open(filepath.Join(dir, "images"))
	if err != nil {
		t.Fatal(err)
	}
	kernel := make([]byte, 4096)
	copy(kernel[0x202:], "HdrS")
	kf := filepath.Join(dir, "vmlinuz")
	if err := os.WriteFile(kf, kernel, 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := store.Import(ctx, "base", images.Source{Kernel: kf}); err != nil {
		t.Fatal(err)
	}
	r := &rig{hv: hvtest.NewMemory(), db: db, ipam: pool, logs: &syncBuffer{}}
	r.f = fleet.New(fleet.Config{DB: db, HV: r.hv, IPAM: pool, Images: store, Bridge: "br-fast", Host: "a",
		Log: slog.New(slog.NewTextHandler(r.logs, &slog.HandlerOptions{Level: slog.LevelDebug}))}, hooks)
	if _, err := r.f.CreateNetwork(ctx, "lab"); err != nil {
		t.Fatal(err)
	}
	if run {
		stop := r.f.Run(-1)
		t.Cleanup(func() { stop() })
	}
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("fleet log:\n%s", r.logs)
		}
	})
	return r
}

func (r *rig) create(t *testing.T, name string) embeddb.VM {
	t.Helper()
	vm, err := r.f.Create(context.Background(), fleet.CreateSpec{Name: name, Network: "lab", Image: "base", Type: "teeny"})
	if err != nil {
		t.Fatalf("create %s: %v", name, err)
	}
	return vm
}

// nothingLeft checks that no trace of a VM named name is anywhere: record,
// address (database and IPAM), domain or disk.
func (r *rig) nothingLeft(t *testing.T, name string) {
	t.Helper()
	ctx := context.Background()
	if vm, err := r.db.VMByName(ctx, name); !errors.Is(err, embeddb.ErrNotFound) {
		t.Errorf("vm %s: record left: %+v (%v)", name, vm, err)
	}
	vms, _ := r.db.ListVMs(ctx)
	if len(vms) != 0 {
		t.Errorf("vm records left: %v", vms)
	}
	addrs, _ := r.db.ListAddresses(ctx)
	if len(addrs) != 0 {
		t.Errorf("addresses left in the database: %v", addrs)
	}
	if n := r.ipam.Len(); n != 0 {
		t.Errorf("%d addresses left in the IPAM", n)
	}
	if doms, _ := r.hv.List(ctx); len(doms) != 0 {
		t.Errorf("domains left: %v", doms)
	}
	if disks, _ := r.hv.Disks(ctx); len(disks) != 0 {
		t.Errorf("disks left: %v", disks)
	}
}

// TestCreateFailsWhole: a create that fails at any hypervisor step leaves nothing
// behind (its undo ran), returns the step's error, and the next create works.
func TestCreateFailsWhole(t *testing.T) {
	for _, step := range []hvtest.Step{hvtest.StepDisk, hvtest.StepDefine, hvtest.StepBoot} {
		t.Run(string(step), func(t *testing.T) {
			r := newRig(t, false, fleet.Hooks{})
			boom := errors.New("boom at " + string(step))
			r.hv.FailNext(step, boom)
			_, err := r.f.Create(context.Background(), fleet.CreateSpec{Name: "doomed", Network: "lab", Image: "base", Type: "teeny"})
			if !errors.Is(err, boom) || !strings.Contains(err.Error(), "doomed") {
				t.Fatalf("create = %v, want the injected failure, naming the vm", err)
			}
			r.nothingLeft(t, "doomed")
			if strings.Contains(r.logs.String(), "undo a failed change") {
				t.Errorf("an undo step failed:\n%s", r.logs)
			}
			vm := r.create(t, "doomed")
			if vm.State != fleet.StateRunning {
				t.Errorf("create after the failure: state %s", vm.State)
			}
		})
	}
}

// TestCreateRetriesTakenMAC: a generated MAC that the IPAM already holds is not an
// error: the create tries again with a new one.
func TestCreateRetriesTakenMAC(t *testing.T) {
	var mu sync.Mutex
	queue := []net.HardwareAddr{}
	r := newRig(t, false, fleet.Hooks{NewMAC: func() net.HardwareAddr {
		mu.Lock()
		defer mu.Unlock()
		if len(queue) > 0 {
			m := queue[0]
			queue = queue[1:]
			return m
		}
		return fleet.NewMAC()
	}})
	first := r.create(t, "first")
	hw, _ := net.ParseMAC(first.MAC)
	mu.Lock()
	queue = append(queue, hw)
	mu.Unlock()
	second := r.create(t, "second")
	if second.MAC == first.MAC {
		t.Fatalf("second vm got the first's mac %s", first.MAC)
	}
	if !strings.Contains(r.logs.String(), "generated mac already taken") {
		t.Errorf("no log of the retry")
	}
}

// TestLifecycle: each call does what it says, in the hypervisor and the record,
// and refuses what it cannot do with the error a user should see.
func TestLifecycle(t *testing.T) {
	ctx := context.Background()
	r := newRig(t, false, fleet.Hooks{})
	vm := r.create(t, "toy0")
	if spec, ok := r.hv.SpecOf(vm.ID); !ok || spec.VCPUs != 1 || spec.MemoryMiB != 512 || spec.MAC.String() != vm.MAC || spec.IP.String() != vm.IP || spec.Network != "lab" {
		t.Fatalf("domain spec %+v (exists %v) does not match vm %+v", spec, ok, vm)
	}
	if _, err := r.f.Start(ctx, vm.ID); !errors.Is(err, fleet.ErrState) || !strings.Contains(err.Error(), "already running") {
		t.Errorf("start of a running vm = %v, want ErrState saying it runs", err)
	}
	if r.hv.Boots(vm.ID) != 1 {
		t.Errorf("boots = %d after a refused start, want 1", r.hv.Boots(vm.ID))
	}
	got, err := r.f.Stop(ctx, vm.ID)
	if err != nil || got.State != fleet.StateStopped || got.Desired != fleet.StateStopped {
		t.Fatalf("stop = %+v, %v", got, err)
	}
	if st, _ := r.hv.State(ctx, vm.ID); st != hv.StateStopped {
		t.Errorf("domain %s after stop", st)
	}
	if _, _, err := r.f.Console(ctx, vm.ID); !errors.Is(err, hv.ErrNotRunning) {
		t.Errorf("console of a stopped vm = %v, want hv.ErrNotRunning", err)
	}
	if got, err = r.f.Start(ctx, vm.ID); err != nil || got.State != fleet.StateRunning {
		t.Fatalf("start = %+v, %v", got, err)
	}
	if got, err = r.f.Restart(ctx, vm.ID); err != nil || r.hv.Boots(vm.ID) != 3 {
		t.Fatalf("restart = %+v, %v; boots %d, want 3", got, err, r.hv.Boots(vm.ID))
	}
	con, _, err := r.f.Console(ctx, vm.ID)
	if err != nil {
		t.Fatalf("console: %v", err)
	}
	r.hv.GuestWrite(vm.ID, "login: ")
	buf := make([]byte, 64)
	n, err := io.ReadAtLeast(con, buf, len("login: "))
	if err != nil || !strings.Contains(string(buf[:n]), "login: ") {
		t.Errorf("console read %q, %v", buf[:n], err)
	}
	con.Close()

	if _, err := r.f.Purge(ctx, []string{vm.ID}); !errors.Is(err, fleet.ErrState) {
		t.Errorf("purge of a live vm = %v, want ErrState", err)
	}
	if got, err = r.f.Delete(ctx, vm.ID); err != nil || got.DeletedAt.IsZero() || got.State != fleet.StateStopped {
		t.Fatalf("delete = %+v, %v", got, err)
	}
	// Deleted: kept for a look, but nothing changes it any more.
	if disks, _ := r.hv.Disks(ctx); !slices.Contains(disks, vm.ID) {
		t.Errorf("delete took the disk; purge should")
	}
	for what, call := range map[string]func() error{
		"start":   func() error { _, err := r.f.Start(ctx, vm.ID); return err },
		"kvs":     func() error { _, err := r.f.UpsertKVs(ctx, vm.ID, []embeddb.KV{{Key: "k", Value: "v"}}); return err },
		"console": func() error { _, _, err := r.f.Console(ctx, vm.ID); return err },
		"delete":  func() error { _, err := r.f.Delete(ctx, vm.ID); return err },
	} {
		if err := call(); !errors.Is(err, fleet.ErrState) {
			t.Errorf("%s of a deleted vm = %v, want ErrState", what, err)
		}
	}
	if ids, err := r.f.Purge(ctx, nil); err != nil || !slices.Equal(ids, []string{vm.ID}) {
		t.Fatalf("purge = %v, %v", ids, err)
	}
	r.nothingLeft(t, "toy0")
	if _, err := r.f.Get(ctx, vm.ID); !errors.Is(err, embeddb.ErrNotFound) {
		t.Errorf("get of a purged vm = %v, want not found", err)
	}
}

// TestImageInUse: an image goes only when no VM, deleted or not, has a disk on it.
func TestImageInUse(t *testing.T) {
	ctx := context.Background()
	r := newRig(t, false, fleet.Hooks{})
	vm := r.create(t, "user")
	if _, err := r.f.Delete(ctx, vm.ID); err != nil {
		t.Fatal(err)
	}
	if err := r.f.DeleteImage(ctx, "base"); !errors.Is(err, fleet.ErrImageInUse) || !strings.Contains(err.Error(), "user") {
		t.Fatalf("delete of an image a deleted vm uses = %v, want ErrImageInUse naming it", err)
	}
	if _, err := r.f.Purge(ctx, nil); err != nil {
		t.Fatal(err)
	}
	if err := r.f.DeleteImage(ctx, "base"); err != nil {
		t.Fatalf("delete of an unused image: %v", err)
	}
	if _, err := r.f.Create(ctx, fleet.CreateSpec{Name: "late", Network: "lab", Image: "base", Type: "teeny"}); err == nil || !strings.Contains(err.Error(), "unknown image") {
		t.Errorf("create on a deleted image = %v", err)
	}
}

// eventually polls cond for up to 10 s.
func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(10 * time.Second); !cond(); {
		if time.Now().After(deadline) {
			t.Fatalf("never: %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func (r *rig) state(t *testing.T, id string) embeddb.VM {
	t.Helper()
	vm, err := r.db.GetVM(context.Background(), id)
	if err != nil {
		t.Fatal(err)
	}
	return vm
}

// TestEvents: libvirt's events keep the record's state current; a guest that
// powers itself off stays off (its owner's intent), and a crashed one is marked so.
func TestEvents(t *testing.T) {
	r := newRig(t, true, fleet.Hooks{})
	off := r.create(t, "poweroff")
	crash := r.create(t, "crasher")
	r.hv.PowerOff(off.ID)
	eventually(t, "the guest's own poweroff recorded, and kept", func() bool {
		vm := r.state(t, off.ID)
		return vm.State == fleet.StateStopped && vm.Desired == fleet.StateStopped
	})
	r.hv.Crash(crash.ID)
	eventually(t, "the crash recorded", func() bool { return r.state(t, crash.ID).State == fleet.StateCrashed })
	if vm := r.state(t, crash.ID); vm.Desired != fleet.StateRunning {
		t.Errorf("a crash changed the owner's intent to %s", vm.Desired)
	}
}

// TestReconcile: a pass starts a VM whose owner wants it running, removes what a
// crash left half-created and domains no record claims, and reports a VM whose
// domain is gone as drift (state missing) without making a domain up.
func TestReconcile(t *testing.T) {
	ctx := context.Background()
	r := newRig(t, false, fleet.Hooks{})
	crashed := r.create(t, "crashed")
	lost := r.create(t, "lost")
	kept := r.create(t, "kept")
	r.hv.Crash(crashed.ID)
	r.hv.Lose(lost.ID)
	// A domain and disk of an ID no record has, as a create cut off after its
	// domain was made and its record undone would leave.
	orphan := fleet.NewID(time.Now())
	if err := r.hv.Create(ctx, hv.Spec{ID: orphan, Name: "orphan", VCPUs: 1, MemoryMiB: 64, MAC: net.HardwareAddr{0x52, 0x54, 0, 0, 0, 0x99}, Bridge: "br-fast", DiskGiB: 1}); err != nil {
		t.Fatal(err)
	}
	// A record still "creating": the process died in the middle of a create.
	half := r.create(t, "half")
	if err := r.db.SetVMState(ctx, half.ID, fleet.StateCreating, time.Now()); err != nil {
		t.Fatal(err)
	}

	rep, err := r.f.Reconcile(ctx)
	if err != nil {
		t.Fatalf("reconcile: %v", err)
	}
	if !slices.Equal(rep.Started, []string{crashed.ID}) {
		t.Errorf("started %v, want only the crashed vm %s", rep.Started, crashed.ID)
	}
	slices.Sort(rep.Removed)
	want := []string{orphan, half.ID}
	slices.Sort(want)
	if !slices.Equal(rep.Removed, want) {
		t.Errorf("removed %v, want the orphan and the half-created vm %v", rep.Removed, want)
	}
	if len(rep.Drift) != 1 || rep.Drift[0].VMID != lost.ID || !strings.Contains(rep.Drift[0].Problem, "domain missing") {
		t.Errorf("drift %+v, want the lost vm's missing domain", rep.Drift)
	}
	if st, _ := r.hv.State(ctx, crashed.ID); st != hv.StateRunning {
		t.Errorf("crashed vm's domain is %s after the pass", st)
	}
	if vm := r.state(t, lost.ID); vm.State != fleet.StateMissing {
		t.Errorf("lost vm's state %s, want missing", vm.State)
	}
	if _, ok := r.hv.SpecOf(lost.ID); ok {
		t.Errorf("reconcile made a domain up for the lost vm")
	}
	if _, err := r.db.GetVM(ctx, half.ID); !errors.Is(err, embeddb.ErrNotFound) {
		t.Errorf("half-created vm's record left: %v", err)
	}
	if st, _ := r.hv.State(ctx, kept.ID); st != hv.StateRunning || r.hv.Boots(kept.ID) != 1 {
		t.Errorf("a healthy vm was touched: %s, %d boots", st, r.hv.Boots(kept.ID))
	}
	// A second pass finds nothing new to do.
	rep, err = r.f.Reconcile(ctx)
	if err != nil || len(rep.Started)+len(rep.Removed) != 0 || len(rep.Drift) != 1 {
		t.Errorf("second pass = %+v, %v; want only the drift again", rep, err)
	}
}

// TestKVs: key/values of a live VM are set, read and removed through the fleet,
// with bad input refused by field.
func TestKVs(t *testing.T) {
	ctx := context.Background()
	r := newRig(t, false, fleet.Hooks{})
	vm := r.create(t, "keyed")
	kvs, err := r.f.UpsertKVs(ctx, vm.ID, []embeddb.KV{{Key: "a", Value: "1"}, {Key: "s/t", Value: "x", Secret: true}})
	if err != nil || len(kvs) != 2 {
		t.Fatalf("upsert = %v, %v", kvs, err)
	}
	var fe *fleet.FieldError
	if _, err := r.f.UpsertKVs(ctx, vm.ID, []embeddb.KV{{Key: "../x", Value: "1"}}); !errors.As(err, &fe) || fe.Field != "key" {
		t.Errorf("upsert of a bad key = %v, want a key field error", err)
	}
	if _, err := r.f.UpsertKVs(ctx, vm.ID, nil); !errors.As(err, &fe) || fe.Field != "kvs" {
		t.Errorf("upsert of nothing = %v, want a kvs field error", err)
	}
	if kvs, err = r.f.DeleteKVs(ctx, vm.ID, []string{"a"}); err != nil || len(kvs) != 1 || kvs[0].Key != "s/t" {
		t.Fatalf("delete = %v, %v", kvs, err)
	}
	if kvs, err = r.f.KVs(ctx, vm.ID); err != nil || len(kvs) != 1 || !kvs[0].Secret {
		t.Fatalf("read = %v, %v", kvs, err)
	}
	if _, err := r.f.KVs(ctx, fleet.NewID(time.Now())); !errors.Is(err, embeddb.ErrNotFound) {
		t.Errorf("kvs of no vm = %v, want not found", err)
	}
}

// TestTwoHostsShareADatabase: two fleets (hosts a and b, each with its own
// hypervisor) on one database, as cluster members are. Each judges only its own
// VMs: b's reconcile neither reports a's VMs as drift nor removes a's VM while a
// is still creating it, and a call that needs a's domain, made on b, is refused
// with ErrElsewhere naming the host, changing nothing.
func TestTwoHostsShareADatabase(t *testing.T) {
	ctx := context.Background()
	a := newRig(t, false, fleet.Hooks{})
	hvB := hvtest.NewMemory()
	store, err := images.Open(filepath.Join(t.TempDir(), "images"))
	if err != nil {
		t.Fatal(err)
	}
	pool, err := ipam.New(ipam.Config{Prefix: netip.MustParsePrefix("10.10.0.0/24")}, nil)
	if err != nil {
		t.Fatal(err)
	}
	b := fleet.New(fleet.Config{DB: a.db, HV: hvB, IPAM: pool, Images: store, Bridge: "br-fast", Host: "b",
		Log: slog.New(slog.NewTextHandler(a.logs, nil))}, fleet.Hooks{})

	vm := a.create(t, "on-a")
	if vm.Host != "a" {
		t.Fatalf("vm created on host a records host %q", vm.Host)
	}
	half := a.create(t, "half-on-a")
	if err := a.db.SetVMState(ctx, half.ID, fleet.StateCreating, time.Now()); err != nil {
		t.Fatal(err)
	}
	rep, err := b.Reconcile(ctx)
	if err != nil || len(rep.Started)+len(rep.Removed)+len(rep.Drift) != 0 {
		t.Fatalf("host b's pass judged host a's vms: %+v, %v", rep, err)
	}
	if got := a.state(t, vm.ID); got.State != fleet.StateRunning {
		t.Errorf("a's vm is %s after b's pass", got.State)
	}
	if _, err := a.db.GetVM(ctx, half.ID); err != nil {
		t.Errorf("b's pass removed the vm a is creating: %v", err)
	}
	for what, call := range map[string]func() error{
		"stop":    func() error { _, err := b.Stop(ctx, vm.ID); return err },
		"delete":  func() error { _, err := b.Delete(ctx, vm.ID); return err },
		"console": func() error { _, _, err := b.Console(ctx, vm.ID); return err },
	} {
		if err := call(); !errors.Is(err, fleet.ErrElsewhere) || !strings.Contains(err.Error(), "host a") {
			t.Errorf("%s on host b of a's vm = %v, want ErrElsewhere naming host a", what, err)
		}
	}
	if got := a.state(t, vm.ID); got.State != fleet.StateRunning || got.Desired != fleet.StateRunning || !got.DeletedAt.IsZero() {
		t.Errorf("refused calls changed a's vm: %+v", got)
	}
	// Key/values live in the database: any host sets them.
	if _, err := b.UpsertKVs(ctx, vm.ID, []embeddb.KV{{Key: "from", Value: "b"}}); err != nil {
		t.Errorf("key/values of a's vm through b: %v", err)
	}
	// Purge of everything deleted takes only this host's.
	if _, err := a.f.Delete(ctx, vm.ID); err != nil {
		t.Fatal(err)
	}
	if ids, err := b.Purge(ctx, nil); err != nil || len(ids) != 0 {
		t.Errorf("b purged %v (%v) of a's deleted vms", ids, err)
	}
	if _, err := b.Purge(ctx, []string{vm.ID}); !errors.Is(err, fleet.ErrElsewhere) {
		t.Errorf("b's purge of a's vm = %v, want ErrElsewhere", err)
	}
}

// TestWatch: Watch sends the VM, then each change once, and ends cleanly when the
// VM is purged, or with the context's error when its caller gives up.
func TestWatch(t *testing.T) {
	ctx := context.Background()
	r := newRig(t, false, fleet.Hooks{})
	vm := r.create(t, "watched")
	got := make(chan embeddb.VM, 16)
	done := make(chan error, 1)
	go func() { done <- r.f.Watch(ctx, vm.ID, func(v embeddb.VM) error { got <- v; return nil }) }()
	next := func(what string) embeddb.VM {
		t.Helper()
		select {
		case v := <-got:
			return v
		case <-time.After(10 * time.Second):
			t.Fatalf("no send: %s", what)
		}
		return embeddb.VM{}
	}
	if v := next("the first"); v.State != fleet.StateRunning {
		t.Fatalf("first send: state %s", v.State)
	}
	if _, err := r.f.Stop(ctx, vm.ID); err != nil {
		t.Fatal(err)
	}
	// A stop writes the owner's intent, then the state.
	for v := next("the stop"); v.State != fleet.StateStopped; v = next("the stop") {
	}
	select {
	case v := <-got:
		t.Fatalf("a send with nothing changed: %+v", v)
	case <-time.After(500 * time.Millisecond):
	}
	if _, err := r.f.Delete(ctx, vm.ID); err != nil {
		t.Fatal(err)
	}
	// A delete writes more than once (intent, state, deletion): the last send says deleted.
	for v := next("the delete"); v.DeletedAt.IsZero(); v = next("the delete") {
	}
	if _, err := r.f.Purge(ctx, []string{vm.ID}); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("watch of a purged vm ended with %v, want a clean end", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("watch did not end when the vm was purged")
	}

	other := r.create(t, "given-up")
	cctx, cancel := context.WithCancel(ctx)
	cancel()
	if err := r.f.Watch(cctx, other.ID, func(embeddb.VM) error { return nil }); !errors.Is(err, context.Canceled) {
		t.Errorf("watch whose caller left = %v, want context.Canceled", err)
	}
}
