package appliance_test

import (
	"errors"
	"log/slog"
	"os/exec"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/threes-dev/threes/appliance/fleet"
	"github.com/threes-dev/threes/appliance/threestest"
	"github.com/threes-dev/threes/hv"
	"github.com/threes-dev/threes/hv/hvtest"
	threesv1 "github.com/threes-dev/threes/proto/threes/v1"
)

// behindBack runs virsh on the test driver inside the running libvirtd, the one the
// appliance's hypervisor uses: a hand that changes domains without threes knowing.
func behindBack(t *testing.T, args ...string) string {
	t.Helper()
	cmd := exec.Command("virsh", append([]string{"-c", "test+unix:///default?socket=" + hvtest.Socket}, args...)...)
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("virsh %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return strings.TrimSpace(string(out))
}

// restartWith restarts env's appliance with a reconcile interval and a debug log the
// test can read (and sees printed if it fails), and waits until the first reconcile
// pass, which runs behind the serving appliance, is done.
func restartWith(t *testing.T, env *threestest.Env, interval time.Duration) *lockedBuffer {
	t.Helper()
	logs := restartServing(t, env, interval)
	waitPass(t, logs)
	return logs
}

// waitPass waits until the log says a reconcile pass is done.
func waitPass(t *testing.T, logs interface{ String() string }) {
	t.Helper()
	waitFor(t, "a reconcile pass done", func() bool { return strings.Contains(logs.String(), `msg="reconcile: pass done"`) })
}

// restartServing is restartWith without waiting for the first reconcile pass.
func restartServing(t *testing.T, env *threestest.Env, interval time.Duration) *lockedBuffer {
	t.Helper()
	logs := &lockedBuffer{}
	env.Options.Logger = slog.New(slog.NewTextHandler(logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
	env.Options.ReconcileInterval = interval
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("appliance log:\n%s", logs)
		}
	})
	env.Restart(t)
	return logs
}

func newVM(t *testing.T, c threesv1.ThreesClient, name string) string {
	t.Helper()
	vm := must[*threesv1.VM](t)(c.Create(ctxT(t), &threesv1.CreateRequest{Name: name, Network: "lab", Image: "base", Type: threesv1.VMType_VM_TYPE_TEENY}))
	return vm.GetId()
}

func vmState(t *testing.T, c threesv1.ThreesClient, id string) threesv1.VMState {
	t.Helper()
	return must[*threesv1.VM](t)(c.Get(ctxT(t), &threesv1.VMRef{Id: id})).GetState()
}

// TestStateFollowsLibvirt: a VM's state follows its domain when it changes behind
// threes' back. A domain destroyed from outside (as libvirtd or the host going down
// do) still should run and is started by reconcile; a guest that shuts itself down
// stays down, across a restart too, until started through threes; a restart through
// threes is not mistaken for the guest shutting down.
func TestStateFollowsLibvirt(t *testing.T) {
	env := threestest.Start(t)
	logs := restartWith(t, env, -1) // no periodic pass: this test runs them
	ctx := ctxT(t)
	c := env.Local(t)
	must[*threesv1.Network](t)(c.CreateNetwork(ctx, &threesv1.NetworkRequest{Name: "lab"}))
	hostDown := newVM(t, c, "host-down")
	selfOff := newVM(t, c, "self-off")

	behindBack(t, "destroy", hostDown)
	waitFor(t, "state stopped after destroy", func() bool { return vmState(t, c, hostDown) == threesv1.VMState_VM_STATE_STOPPED })
	// The test driver's shutdown is what a guest powering off looks like to libvirt.
	if err := env.Options.Hypervisor.Stop(ctx, selfOff); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "state stopped after guest shutdown", func() bool { return vmState(t, c, selfOff) == threesv1.VMState_VM_STATE_STOPPED })
	waitFor(t, "guest shutdown taken as intent", func() bool {
		return strings.Contains(logs.String(), `msg="guest shut itself down: vm stays stopped until started" vm=`+selfOff)
	})

	rep, err := env.Appliance.Reconcile(ctx)
	if err != nil || !slices.Equal(rep.Started, []string{hostDown}) || len(rep.Removed)+len(rep.Drift) != 0 {
		t.Fatalf("reconcile = %+v, %v; want only %s started", rep, err, hostDown)
	}
	if st := domainState(t, env, hostDown); st != hv.StateRunning {
		t.Errorf("destroyed domain after reconcile = %s, want running", st)
	}
	if st := vmState(t, c, hostDown); st != threesv1.VMState_VM_STATE_RUNNING {
		t.Errorf("destroyed vm's state after reconcile = %s", st)
	}
	if st := domainState(t, env, selfOff); st != hv.StateStopped {
		t.Errorf("domain of the guest that shut itself down = %s, want stopped", st)
	}

	// A restart through threes shuts the guest down the same way, then boots it.
	must[*threesv1.VM](t)(c.Restart(ctx, &threesv1.VMRef{Id: hostDown}))
	ignored := `msg="guest shutdown ignored: the domain is not off any more (restarted or started since)" vm=` + hostDown
	taken := `msg="guest shut itself down: vm stays stopped until started" vm=` + hostDown
	waitFor(t, "the restart's shutdown event handled", func() bool {
		return strings.Contains(logs.String(), ignored) || strings.Contains(logs.String(), taken)
	})
	if strings.Contains(logs.String(), taken) {
		t.Fatal("a restart through threes was taken for the guest shutting itself down")
	}

	// Across a restart of the appliance: the guest's own shutdown holds.
	behindBack(t, "destroy", hostDown)
	logs = restartWith(t, env, -1)
	c = env.Local(t)
	if st := domainState(t, env, hostDown); st != hv.StateRunning {
		t.Errorf("destroyed domain after appliance restart = %s, want running", st)
	}
	if st := domainState(t, env, selfOff); st != hv.StateStopped {
		t.Errorf("domain of the guest that shut itself down, after appliance restart = %s, want stopped", st)
	}
	if st := vmState(t, c, selfOff); st != threesv1.VMState_VM_STATE_STOPPED {
		t.Errorf("state of the guest that shut itself down = %s", st)
	}

	// Started through threes, it should run again, so a destroy is undone.
	must[*threesv1.VM](t)(c.Start(ctx, &threesv1.VMRef{Id: selfOff}))
	behindBack(t, "destroy", selfOff)
	waitFor(t, "state stopped after destroy", func() bool { return vmState(t, c, selfOff) == threesv1.VMState_VM_STATE_STOPPED })
	rep, err = env.Appliance.Reconcile(ctx)
	if err != nil || !slices.Equal(rep.Started, []string{selfOff}) {
		t.Fatalf("reconcile = %+v, %v; want %s started", rep, err, selfOff)
	}
}

// TestReconcileDriftAndOrphans: reconcile removes domains and disks of the appliance
// that no VM claims, reports a live VM whose domain is gone (its state says missing)
// without making one up,
// leaves VMs their owner stopped, and leaves deleted VMs' domains for purge.
func TestReconcileDriftAndOrphans(t *testing.T) {
	env := threestest.Start(t)
	logs := restartWith(t, env, -1)
	ctx := ctxT(t)
	c := env.Local(t)
	h := env.Options.Hypervisor
	must[*threesv1.Network](t)(c.CreateNetwork(ctx, &threesv1.NetworkRequest{Name: "lab"}))

	gone := newVM(t, c, "gone")
	behindBack(t, "destroy", gone)
	behindBack(t, "undefine", gone)
	waitFor(t, "state of the vm whose domain went to say missing", func() bool { return vmState(t, c, gone) == threesv1.VMState_VM_STATE_MISSING })
	resting := newVM(t, c, "resting")
	must[*threesv1.VM](t)(c.Stop(ctx, &threesv1.VMRef{Id: resting}))
	binned := newVM(t, c, "binned")
	must[*threesv1.VM](t)(c.Delete(ctx, &threesv1.VMRef{Id: binned}))

	// Leftovers of the appliance's own (same owner, same disk dir) with no record:
	// a domain with its disk, and a disk alone.
	orphanDom, orphanDisk := hvtest.Spec(t), hvtest.Spec(t)
	for _, s := range []hv.Spec{orphanDom, orphanDisk} {
		s.DiskGiB = 1
		if err := h.Create(ctx, s); err != nil {
			t.Fatal(err)
		}
	}
	behindBack(t, "destroy", orphanDisk.ID)
	behindBack(t, "undefine", orphanDisk.ID)
	if disks := must[[]string](t)(h.Disks(ctx)); !slices.Contains(disks, orphanDisk.ID) || !slices.Contains(disks, gone) {
		t.Fatalf("disks before reconcile = %v, want %s and %s among them", disks, orphanDisk.ID, gone)
	}

	for pass := range 2 {
		rep, err := env.Appliance.Reconcile(ctx)
		if err != nil {
			t.Fatal(err)
		}
		wantDrift := []fleet.Drift{{VMID: gone, Name: "gone", Problem: "domain missing (disk present)"}}
		if !slices.Equal(rep.Drift, wantDrift) {
			t.Errorf("pass %d: drift = %+v, want %+v", pass, rep.Drift, wantDrift)
		}
		if len(rep.Started) != 0 {
			t.Errorf("pass %d: started %v, want none", pass, rep.Started)
		}
		wantRemoved := []string{orphanDisk.ID, orphanDom.ID}
		slices.Sort(wantRemoved)
		if pass > 0 {
			wantRemoved = nil
		}
		if !slices.Equal(rep.Removed, wantRemoved) {
			t.Errorf("pass %d: removed %v, want %v", pass, rep.Removed, wantRemoved)
		}
	}
	if !strings.Contains(logs.String(), `vms=1 first="gone (`+gone+`): domain missing (disk present)"`) {
		t.Error("drift not logged with the vm's id and name")
	}
	for _, id := range []string{orphanDom.ID, orphanDisk.ID} {
		if _, err := h.State(ctx, id); !errors.Is(err, hv.ErrNotFound) {
			t.Errorf("orphan %s after reconcile: %v, want no domain", id, err)
		}
	}
	disks := must[[]string](t)(h.Disks(ctx))
	if slices.Contains(disks, orphanDom.ID) || slices.Contains(disks, orphanDisk.ID) || !slices.Contains(disks, gone) {
		t.Errorf("disks after reconcile = %v: orphans should be gone, the drifted vm's disk kept", disks)
	}
	if st := domainState(t, env, resting); st != hv.StateStopped {
		t.Errorf("vm stopped by its owner = %s after reconcile, want stopped", st)
	}
	if st := domainState(t, env, binned); st != hv.StateStopped {
		t.Errorf("deleted vm's domain = %s after reconcile, want kept, stopped, until purge", st)
	}
	if st := vmState(t, c, gone); st != threesv1.VMState_VM_STATE_MISSING {
		t.Errorf("drifted vm's state = %s, want missing", st)
	}
}

// TestPeriodicReconcile: between starts, the periodic pass starts a VM whose domain
// was destroyed behind threes' back.
func TestPeriodicReconcile(t *testing.T) {
	env := threestest.Start(t)
	restartWith(t, env, 100*time.Millisecond)
	ctx := ctxT(t)
	c := env.Local(t)
	must[*threesv1.Network](t)(c.CreateNetwork(ctx, &threesv1.NetworkRequest{Name: "lab"}))
	id := newVM(t, c, "phoenix")
	// libvirt numbers each run of a domain anew: a new number means a new boot, however
	// quickly the pass comes.
	first := behindBack(t, "domid", id)
	behindBack(t, "destroy", id)
	waitFor(t, "periodic reconcile starting the domain again", func() bool {
		st, err := env.Options.Hypervisor.State(ctx, id)
		return err == nil && st == hv.StateRunning
	})
	if again := behindBack(t, "domid", id); again == first || again == "-" {
		t.Fatalf("domain id %q after the pass, %q before the destroy: not a new boot", again, first)
	}
	waitFor(t, "state running", func() bool { return vmState(t, c, id) == threesv1.VMState_VM_STATE_RUNNING })
}
