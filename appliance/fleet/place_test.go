package fleet_test

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/netip"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"tailscale.com/net/memnet"

	"github.com/threes-dev/threes/appliance/fleet"
	"github.com/threes-dev/threes/embeddb"
	"github.com/threes-dev/threes/hv/hvtest"
)

// hostRig is a Fleet named "a" with a capacity and a clock the test moves, on a
// database of one node where the test writes other hosts' rows and VMs itself, as
// those hosts would.
type hostRig struct {
	f     *fleet.Fleet
	db    *embeddb.DB
	mu    sync.Mutex
	clock time.Time
	n     int // VMs written so far
}

func newHostRig(t *testing.T, c fleet.Capacity) *hostRig {
	t.Helper()
	ctx := context.Background()
	db, err := embeddb.Open(ctx, embeddb.Config{Dir: filepath.Join(t.TempDir(), "db"), NodeID: "a",
		Listener: memnet.Listen("threes-raft:4002")})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { db.Close() })
	r := &hostRig{db: db, clock: time.Date(2026, 11, 29, 7, 0, 0, 0, time.UTC)}
	r.f = fleet.New(fleet.Config{DB: db, HV: hvtest.NewMemory(), Host: "a", Capacity: c,
		Now: r.now, Log: slog.New(slog.NewTextHandler(io.Discard, nil))}, fleet.Hooks{})
	if err := db.CreateNetwork(ctx, embeddb.Network{Name: "lab", CreatedAt: r.now()}); err != nil {
		t.Fatal(err)
	}
	return r
}

func (r *hostRig) now() time.Time { r.mu.Lock(); defer r.mu.Unlock(); return r.clock }

func (r *hostRig) tick(d time.Duration) { r.mu.Lock(); r.clock = r.clock.Add(d); r.mu.Unlock() }

// host writes another host's row as its heartbeat would, heard from age ago.
func (r *hostRig) host(t *testing.T, name string, vcpus, mem int, age time.Duration) {
	t.Helper()
	if err := r.db.UpsertHost(context.Background(), embeddb.Host{Name: name, VCPUs: vcpus, MemoryMiB: mem,
		CPUOvercommit: 1, MemoryOvercommit: 1, UpdatedAt: r.now().Add(-age)}); err != nil {
		t.Fatal(err)
	}
}

// vm records a live VM of type typ on host, as that host's create would.
func (r *hostRig) vm(t *testing.T, host, typ string) embeddb.VM {
	t.Helper()
	r.n++
	vm := embeddb.VM{ID: fleet.NewID(r.now().Add(time.Duration(r.n))), Name: fmt.Sprintf("vm%d", r.n), Network: "lab",
		Type: typ, Host: host, State: fleet.StateRunning, Desired: fleet.StateRunning, CreatedAt: r.now()}
	addr := embeddb.Address{IP: netip.AddrFrom4([4]byte{10, 10, 0, byte(r.n)}), MAC: fmt.Sprintf("52:54:00:00:00:%02x", r.n)}
	if err := r.db.CreateVM(context.Background(), vm, embeddb.VMConfig{}, addr); err != nil {
		t.Fatal(err)
	}
	return vm
}

// TestPlace: a named host is taken when it exists, has been heard from and has
// room, and refused with an error naming it otherwise; with none named, the host
// with the largest share left of its scarcer resource wins, ties to the first by
// name, and hosts not heard from for several intervals are passed over.
func TestPlace(t *testing.T) {
	ctx := context.Background()
	// a: 2 vCPUs x 2 = 4, 4096 MiB.
	r := newHostRig(t, fleet.Capacity{VCPUs: 2, MemoryMiB: 4096, CPUOvercommit: 2, MemoryOvercommit: 1})
	r.host(t, "b", 8, 8192, 10*time.Second)
	r.host(t, "bb", 8, 8192, 0)
	r.host(t, "c", 2, 2048, 0)
	r.host(t, "d", 64, 65536, 5*time.Minute) // the roomiest, but silent for 10 intervals
	r.vm(t, "c", "small")                    // c: 1 of 2 vCPUs and 1024 of 2048 MiB left

	for _, tc := range []struct {
		typ, want string
		host      string
		err       error
		mention   string
	}{
		{typ: "small", want: "a", host: "a"},
		{typ: "middy", want: "b", host: "b"}, // 10 s old is not stale
		{typ: "small", want: "c", host: "c"}, // exactly the room it has left
		{typ: "middy", want: "c", err: fleet.ErrNoRoom,
			mention: "host c has 1 vCPUs and 1024 MiB free (of 2 and 2048), and a middy needs 2 vCPUs and 2048 MiB"},
		{typ: "small", want: "d", err: fleet.ErrHostSilent, mention: "host d was last heard from 5m0s ago"},
		{typ: "small", want: "nosuch", mention: `unknown host "nosuch": the hosts are a, b, bb, c, d`},
		{typ: "huge", mention: "unknown type"},
		// None named: b and bb keep 75% of each after a middy, a 50% and c cannot
		// take it; b and bb tie, and b comes first by name.
		{typ: "middy", host: "b"},
		// A teeny leaves b and bb 87.5% of their vCPUs, a 75% of its own.
		{typ: "teeny", host: "b"},
	} {
		got, err := r.f.Place(ctx, tc.typ, tc.want)
		switch {
		case tc.mention == "" && (err != nil || got != tc.host):
			t.Errorf("Place(%s, %q) = %q, %v; want %q", tc.typ, tc.want, got, err, tc.host)
		case tc.mention != "" && (err == nil || !strings.Contains(err.Error(), tc.mention)):
			t.Errorf("Place(%s, %q) = %q, %v; want an error saying %q", tc.typ, tc.want, got, err, tc.mention)
		case tc.err != nil && !errors.Is(err, tc.err):
			t.Errorf("Place(%s, %q) = %v; want %v", tc.typ, tc.want, err, tc.err)
		}
	}
	var fe *fleet.FieldError
	if _, err := r.f.Place(ctx, "small", "nosuch"); !errors.As(err, &fe) || fe.Field != "host" {
		t.Errorf("an unknown host is not a field error naming the host: %v", err)
	}

	// A middy on b: bb now has the most room left (75% against b's 50%).
	r.vm(t, "b", "middy")
	if got, err := r.f.Place(ctx, "middy", ""); err != nil || got != "bb" {
		t.Errorf("after a middy on b, Place = %q, %v; want bb", got, err)
	}
	// A biggun on bb leaves it half of each; a teeny then goes to a, whose scarcer
	// share left is 75% (its vCPUs), over b (62.5%) and bb (37.5%).
	r.vm(t, "bb", "biggun")
	if got, err := r.f.Place(ctx, "teeny", ""); err != nil || got != "a" {
		t.Errorf("Place(teeny) = %q, %v; want a", got, err)
	}

	// A fatlad fits nowhere that answers: the error names every host's room and the
	// silent one as possibly down.
	_, err := r.f.Place(ctx, "fatlad", "")
	if !errors.Is(err, fleet.ErrNoRoom) {
		t.Fatalf("Place(fatlad) = %v, want ErrNoRoom", err)
	}
	for _, s := range []string{"no host has room for a fatlad (8 vCPU, 8192 MiB)", "a has 4 of 4 vCPUs and 4096 of 4096 MiB free",
		"b has 6 of 8 vCPUs", "d was last heard from 5m0s ago (it may be down)"} {
		if !strings.Contains(err.Error(), s) {
			t.Errorf("Place(fatlad) error %q does not say %q", err, s)
		}
	}

	// Time passes with no heartbeat from the others: after three intervals only a,
	// which answers, is left.
	r.tick(3*fleet.DefaultReconcileInterval + time.Second)
	if got, err := r.f.Place(ctx, "small", ""); err != nil || got != "a" {
		t.Errorf("with every other host silent, Place = %q, %v; want a", got, err)
	}
	if _, err := r.f.Place(ctx, "small", "bb"); !errors.Is(err, fleet.ErrHostSilent) {
		t.Errorf("Place on silent bb = %v, want ErrHostSilent", err)
	}
}

// TestPlaceUnlimited: a Fleet given no capacity (zero) sets no limit, so a Fleet
// built without one still creates VMs.
func TestPlaceUnlimited(t *testing.T) {
	r := newHostRig(t, fleet.Capacity{})
	for range 3 {
		r.vm(t, "a", "fatlad")
	}
	if got, err := r.f.Place(context.Background(), "fatlad", ""); err != nil || got != "a" {
		t.Fatalf("Place = %q, %v; want a", got, err)
	}
}

// TestHeartbeat: Run writes this host's row at once (name, the address SetAddr
// gave, capacity, the time), and Hosts reports it with its load; RemoveHost refuses
// this host and a host with live VMs (naming them), and removes a row that is not a
// Raft member.
func TestHeartbeat(t *testing.T) {
	ctx := context.Background()
	r := newHostRig(t, fleet.Capacity{VCPUs: 4, MemoryMiB: 8192, CPUOvercommit: 4, MemoryOvercommit: 1.5})
	r.f.SetAddr(netip.MustParseAddr("100.64.0.7"))
	stop := r.f.Run(-1)
	defer stop()
	want := embeddb.Host{Name: "a", TailnetIP: "100.64.0.7", VCPUs: 4, MemoryMiB: 8192, CPUOvercommit: 4, MemoryOvercommit: 1.5, UpdatedAt: r.now()}
	deadline := time.Now().Add(30 * time.Second)
	for {
		hs, err := r.db.ListHosts(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if len(hs) == 1 && hs[0] == want {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("hosts = %+v, want %+v", hs, want)
		}
		time.Sleep(10 * time.Millisecond)
	}
	// A later heartbeat moves the time.
	r.tick(time.Minute)
	if err := r.f.Heartbeat(ctx); err != nil {
		t.Fatal(err)
	}

	r.host(t, "b", 2, 2048, 0)
	r.host(t, "c", 1, 1024, 0)
	r.vm(t, "a", "middy")
	r.vm(t, "b", "small")
	r.vm(t, "b", "teeny")
	hosts, err := r.f.Hosts(ctx)
	if err != nil {
		t.Fatal(err)
	}
	wantHosts := []fleet.HostInfo{
		{Name: "a", TailnetIP: "100.64.0.7", Role: fleet.RoleAlone, Reachable: true, LastContact: r.now(),
			VCPUs: 16, MemoryMiB: 12288, VCPUsAllocated: 2, MemoryMiBAllocated: 2048, VMs: 1},
		{Name: "b", Role: fleet.RoleNone, LastContact: r.now(), VCPUs: 2, MemoryMiB: 2048, VCPUsAllocated: 2, MemoryMiBAllocated: 1536, VMs: 2},
		{Name: "c", Role: fleet.RoleNone, LastContact: r.now(), VCPUs: 1, MemoryMiB: 1024},
	}
	if fmt.Sprint(hosts) != fmt.Sprint(wantHosts) {
		t.Fatalf("Hosts =\n%+v\nwant\n%+v", hosts, wantHosts)
	}

	if err := r.f.RemoveHost(ctx, "a"); !errors.Is(err, fleet.ErrState) || !strings.Contains(err.Error(), "ask another host") {
		t.Errorf("RemoveHost(self) = %v, want a refusal saying to ask another host", err)
	}
	err = r.f.RemoveHost(ctx, "b")
	if !errors.Is(err, embeddb.ErrInUse) || !strings.Contains(err.Error(), "vms, live or deleted (2: vm2, vm3)") {
		t.Errorf("RemoveHost(b) = %v, want a refusal naming vm2 and vm3", err)
	}
	// A deleted VM's disk is still on its host, for purge to remove there; and
	// a host with no row (no heartbeat yet) is checked all the same.
	gone := r.vm(t, "d", "teeny")
	if err := r.db.MarkVMDeleted(ctx, gone.ID, r.now()); err != nil {
		t.Fatal(err)
	}
	if err := r.f.RemoveHost(ctx, "d"); !errors.Is(err, embeddb.ErrInUse) || !strings.Contains(err.Error(), gone.Name) {
		t.Errorf("RemoveHost(d) with a deleted vm = %v, want a refusal naming %s", err, gone.Name)
	}
	if err := r.db.PurgeVM(ctx, gone.ID); err != nil {
		t.Fatal(err)
	}
	if err := r.f.RemoveHost(ctx, "c"); err != nil {
		t.Errorf("RemoveHost(c) = %v", err)
	}
	if err := r.f.RemoveHost(ctx, "nosuch"); !errors.Is(err, embeddb.ErrNotFound) {
		t.Errorf("RemoveHost(nosuch) = %v, want ErrNotFound", err)
	}
	hosts, _ = r.f.Hosts(ctx)
	if len(hosts) != 2 || hosts[0].Name != "a" || hosts[1].Name != "b" {
		t.Errorf("hosts after the removals = %+v, want a and b", hosts)
	}
}

// TestHeartbeatEveryPass: each reconcile pass writes the row again, with the time
// and the address SetAddr gave last.
func TestHeartbeatEveryPass(t *testing.T) {
	ctx := context.Background()
	r := newHostRig(t, fleet.Capacity{VCPUs: 1, MemoryMiB: 1024, CPUOvercommit: 1, MemoryOvercommit: 1})
	stop := r.f.Run(20 * time.Millisecond)
	defer stop()
	r.tick(time.Minute)
	r.f.SetAddr(netip.MustParseAddr("::ffff:100.64.0.8")) // written unmapped
	deadline := time.Now().Add(30 * time.Second)
	for {
		hs, err := r.db.ListHosts(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if len(hs) == 1 && hs[0].UpdatedAt.Equal(r.now()) && hs[0].TailnetIP == "100.64.0.8" {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("hosts = %+v, want a's row at %v with 100.64.0.8", hs, r.now())
		}
		time.Sleep(10 * time.Millisecond)
	}
}
