package fleet_test

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/threes-dev/threes/appliance/fleet"
	"github.com/threes-dev/threes/embeddb"
	"github.com/threes-dev/threes/hv"
	"github.com/threes-dev/threes/hv/hvtest"
	"github.com/threes-dev/threes/hv/images"
)

// maxValue is the largest startup script or key/value value a VM may have (64 KiB).
const maxValue = 64 << 10

// TestCreateSizeLimits: a script or value of exactly the limit is taken, one byte
// more is refused naming the field, and nothing is left of the refused.
func TestCreateSizeLimits(t *testing.T) {
	ctx := context.Background()
	r := newRig(t, false, fleet.Hooks{})
	for _, tc := range []struct {
		name  string
		spec  func(n int) fleet.CreateSpec
		field string
	}{
		{"script", func(n int) fleet.CreateSpec {
			return fleet.CreateSpec{Script: "#!/bin/sh\n" + strings.Repeat("#", n-10)}
		}, "script"},
		{"value", func(n int) fleet.CreateSpec {
			return fleet.CreateSpec{KVs: []embeddb.KV{{Key: "big", Value: strings.Repeat("v", n)}}}
		}, "value"},
	} {
		at := tc.spec(maxValue)
		at.Name, at.Network, at.Image, at.Type = "at-"+tc.name, "lab", "base", "teeny"
		if _, err := r.f.Create(ctx, at); err != nil {
			t.Errorf("create with a %s of exactly %d bytes: %v", tc.name, maxValue, err)
		}
		over := tc.spec(maxValue + 1)
		over.Name, over.Network, over.Image, over.Type = "over-"+tc.name, "lab", "base", "teeny"
		var fe *fleet.FieldError
		_, err := r.f.Create(ctx, over)
		if !errors.As(err, &fe) || !strings.Contains(err.Error(), tc.field) {
			t.Errorf("create with a %s of %d bytes = %v, want a FieldError naming %s", tc.name, maxValue+1, err, tc.field)
		}
		if _, err := r.db.VMByName(ctx, over.Name); !errors.Is(err, embeddb.ErrNotFound) {
			t.Errorf("refused %s: record %v", over.Name, err)
		}
	}
}

// TestCreateResult: what Create returns is the VM as recorded once it runs: its
// phases so far and the key/values it was given, which are also kept.
func TestCreateResult(t *testing.T) {
	ctx := context.Background()
	r := newRig(t, false, fleet.Hooks{})
	kvs := []embeddb.KV{{Key: "colour", Value: "green"}, {Key: "token", Value: "s3cret", Secret: true}}
	vm, err := r.f.Create(ctx, fleet.CreateSpec{Name: "toy", Network: "lab", Image: "base", Type: "teeny", KVs: kvs})
	if err != nil {
		t.Fatal(err)
	}
	var phases []string
	for _, p := range vm.Phases {
		phases = append(phases, p.Phase)
	}
	if got := strings.Join(phases, ","); got != fleet.PhaseDefined+","+fleet.PhaseRunning {
		t.Errorf("phases of the created vm = %s, want %s,%s", got, fleet.PhaseDefined, fleet.PhaseRunning)
	}
	if vm.State != fleet.StateRunning {
		t.Errorf("state of the created vm = %s, want running", vm.State)
	}
	got, err := r.f.KVs(ctx, vm.ID)
	if err != nil || len(got) != 2 {
		t.Fatalf("key/values after create = %v, %v; want the 2 given", got, err)
	}
	for i, kv := range got {
		if kv != kvs[i] {
			t.Errorf("key/value %d = %v, want %v", i, kv, kvs[i])
		}
	}
}

// TestCreateGivesUp: a MAC that is always taken makes Create try a few times and
// then fail, rather than loop or make a second VM with the MAC.
func TestCreateGivesUp(t *testing.T) {
	var taken net.HardwareAddr
	var calls atomic.Int32
	r := newRig(t, false, fleet.Hooks{NewMAC: func() net.HardwareAddr {
		if taken == nil {
			return fleet.NewMAC()
		}
		calls.Add(1)
		return taken
	}})
	first := r.create(t, "first")
	taken, _ = net.ParseMAC(first.MAC)
	_, err := r.f.Create(context.Background(), fleet.CreateSpec{Name: "second", Network: "lab", Image: "base", Type: "teeny"})
	if err == nil || !strings.Contains(err.Error(), first.MAC) {
		t.Fatalf("create with only a taken mac = %v, want an error naming %s", err, first.MAC)
	}
	if n := calls.Load(); n < 2 || n > 16 {
		t.Errorf("create drew %d macs, want a few tries", n)
	}
	if _, err := r.db.VMByName(context.Background(), "second"); !errors.Is(err, embeddb.ErrNotFound) {
		t.Errorf("the failed create left a record: %v", err)
	}
}

// TestCreateUnknownImage: the error names the field and the images there are.
func TestCreateUnknownImage(t *testing.T) {
	r := newRig(t, false, fleet.Hooks{})
	_, err := r.f.Create(context.Background(), fleet.CreateSpec{Name: "toy", Network: "lab", Image: "nosuch", Type: "teeny"})
	var fe *fleet.FieldError
	if !errors.As(err, &fe) || !strings.Contains(err.Error(), "nosuch") || !strings.Contains(err.Error(), "[base]") {
		t.Fatalf("create from an unknown image = %v, want a FieldError naming nosuch and listing base", err)
	}
}

// TestCreateDiskSize: a VM's disk is its size's, or its image's virtual size
// rounded up to whole GiB when that is bigger.
func TestCreateDiskSize(t *testing.T) {
	ctx := context.Background()
	r := newRig(t, false, fleet.Hooks{})
	for i, tc := range []struct {
		bytes int64
		want  int
	}{
		{1 << 30, 5},             // smaller than a teeny's 5 GiB
		{6 << 30, 6},             // whole GiB
		{6<<30 + 512, 7},         // just over
		{7<<30 - 512, 7},         // just under
		{5<<30 + 1<<29 + 512, 6}, // half way
	} {
		name := fmt.Sprintf("disk%d", i)
		if _, err := r.f.ImportImage(ctx, name, func(dir string) (images.Source, error) {
			file := filepath.Join(dir, "disk.qcow2")
			out, err := exec.Command("qemu-img", "create", "-q", "-f", "qcow2", file, fmt.Sprint(tc.bytes)).CombinedOutput()
			if err != nil {
				return images.Source{}, fmt.Errorf("qemu-img create: %v: %s", err, out)
			}
			return images.Source{Disk: file}, nil
		}); err != nil {
			t.Fatal(err)
		}
		vm, err := r.f.Create(ctx, fleet.CreateSpec{Name: "vm-" + name, Network: "lab", Image: name, Type: "teeny"})
		if err != nil {
			t.Fatal(err)
		}
		if spec, _ := r.hv.SpecOf(vm.ID); spec.DiskGiB != tc.want {
			t.Errorf("image of %d bytes: disk %d GiB, want %d", tc.bytes, spec.DiskGiB, tc.want)
		}
	}
}

// TestReconcileCorrects: a pass records the state libvirt reports where the record
// has it wrong, says when it could not remove an orphan (and removes it on a later
// pass), and logs its drift in one line, only when there is some.
func TestReconcileCorrects(t *testing.T) {
	ctx := context.Background()
	r := newRig(t, false, fleet.Hooks{})
	vm := r.create(t, "stopped")
	if _, err := r.f.Stop(ctx, vm.ID); err != nil {
		t.Fatal(err)
	}
	// The record says running (an event went missing); the domain is off and
	// its owner wants it so.
	if err := r.db.SetVMState(ctx, vm.ID, fleet.StateRunning, time.Now()); err != nil {
		t.Fatal(err)
	}
	orphan := fleet.NewID(time.Now())
	if err := r.hv.Create(ctx, hv.Spec{ID: orphan, Name: "orphan", VCPUs: 1, MemoryMiB: 64, MAC: net.HardwareAddr{0x52, 0x54, 0, 0, 0, 0x98}, Bridge: "br-fast", DiskGiB: 1}); err != nil {
		t.Fatal(err)
	}
	boom := errors.New("libvirtd said no")
	r.hv.FailNext(hvtest.StepUndefine, boom)
	rep, err := r.f.Reconcile(ctx)
	if !errors.Is(err, boom) {
		t.Errorf("pass with an orphan that cannot go = %v, want its error", err)
	}
	if got := r.state(t, vm.ID); got.State != fleet.StateStopped {
		t.Errorf("state after the pass = %s, want stopped as libvirt says", got.State)
	}
	if strings.Contains(r.logs.String(), "reconcile: drift:") {
		t.Errorf("a pass without drift logged some:\n%s", r.logs)
	}
	rep, err = r.f.Reconcile(ctx)
	if err != nil || !slices.Equal(rep.Removed, []string{orphan}) {
		t.Errorf("second pass = %+v, %v; want the orphan removed", rep, err)
	}

	lost := r.create(t, "lost")
	r.hv.Lose(lost.ID)
	if _, err := r.f.Reconcile(ctx); err != nil {
		t.Fatal(err)
	}
	if n := strings.Count(r.logs.String(), "reconcile: drift:"); n != 1 {
		t.Errorf("%d drift lines after a pass with one lost vm, want 1:\n%s", n, r.logs)
	}
}

// listCounter counts the hypervisor's full listings.
type listCounter struct {
	*hvtest.Memory
	lists atomic.Int32
}

func (c *listCounter) List(ctx context.Context) ([]hv.Domain, error) {
	c.lists.Add(1)
	return c.Memory.List(ctx)
}

// TestReconcileCadence: Run passes at the interval it is given, and only the pass
// at start and every tenth after it ask libvirt for its domains; the others take
// them from its events, which costs libvirtd nothing.
func TestReconcileCadence(t *testing.T) {
	r := newRig(t, false, fleet.Hooks{})
	counter := &listCounter{Memory: r.hv}
	held := make(chan struct{})
	release := make(chan struct{})
	var n, afterSix atomic.Int32
	f := fleet.New(fleet.Config{DB: r.db, HV: counter, IPAM: r.ipam, Bridge: "br-fast", Host: "a"},
		fleet.Hooks{BeforePass: func(ctx context.Context) {
			switch n.Add(1) {
			case 7: // the start's pass and six periodic ones are done
				afterSix.Store(counter.lists.Load())
			case 13: // and twelve
				close(held)
				select {
				case <-release:
				case <-ctx.Done():
				}
			}
		}})
	stop := f.Run(5 * time.Millisecond)
	// Last in, first out: the held pass goes on, then Run stops, however the
	// test ends.
	defer stop()
	defer close(release)
	select {
	case <-held:
	case <-time.After(30 * time.Second):
		t.Fatalf("%d passes in 30 s at a 5 ms interval", n.Load())
	}
	if got := afterSix.Load(); got != 1 {
		t.Errorf("%d full listings in the first seven passes, want 1 (the start's)", got)
	}
	if got := counter.lists.Load(); got != 2 {
		t.Errorf("%d full listings in thirteen passes, want 2 (the start's and the tenth periodic one)", got)
	}
}

// TestReconcileReturnsFailures: a VM the pass cannot fix (its crashed domain will
// not start) does not stop the pass, and its error comes back.
func TestReconcileReturnsFailures(t *testing.T) {
	ctx := context.Background()
	r := newRig(t, false, fleet.Hooks{})
	broken, fine := r.create(t, "broken"), r.create(t, "fine")
	r.hv.Crash(broken.ID)
	r.hv.Crash(fine.ID)
	boom := errors.New("no such emulator")
	r.hv.FailNext(hvtest.StepBoot, boom)
	rep, err := r.f.Reconcile(ctx)
	if !errors.Is(err, boom) {
		t.Errorf("pass = %v, want the failed start's error", err)
	}
	if len(rep.Started) != 1 {
		t.Errorf("started %v, want the other crashed vm", rep.Started)
	}
}

// TestReconcileStartsRecordedCrash: a VM whose crash is already recorded (libvirt's
// event came in) is started by the next pass all the same, as its owner wants it
// running; one its owner stopped is left alone.
func TestReconcileStartsRecordedCrash(t *testing.T) {
	ctx := context.Background()
	r := newRig(t, false, fleet.Hooks{})
	crashed, stopped := r.create(t, "crashed"), r.create(t, "stopped")
	r.hv.Crash(crashed.ID)
	if err := r.db.SetVMState(ctx, crashed.ID, fleet.StateCrashed, time.Now()); err != nil {
		t.Fatal(err)
	}
	if _, err := r.f.Stop(ctx, stopped.ID); err != nil {
		t.Fatal(err)
	}
	rep, err := r.f.Reconcile(ctx)
	if err != nil || !slices.Equal(rep.Started, []string{crashed.ID}) {
		t.Fatalf("pass = %+v, %v; want only the crashed vm started", rep, err)
	}
	if st, _ := r.hv.State(ctx, stopped.ID); st != hv.StateStopped {
		t.Errorf("the stopped vm's domain is %s after the pass", st)
	}
}
