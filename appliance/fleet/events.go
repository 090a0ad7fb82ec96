package fleet

import (
	"context"
	"errors"

	"github.com/threes-dev/threes/embeddb"
	"github.com/threes-dev/threes/hv"
)

// followEvents records libvirt's lifecycle events as VMs' observed states until ctx
// ends. The hypervisor starts the stream with every domain's state and sends it
// again after reconnecting to libvirtd, so applying events in order converges.
func (f *Fleet) followEvents(ctx context.Context) {
	events, err := f.hv.Events(ctx)
	if err != nil {
		f.log.Error("follow hypervisor events: vm states follow only reconcile", "err", err)
		return
	}
	for ev := range events {
		f.rec.saw(ev)
		f.observe(ctx, ev)
	}
}

// observe records one event for a live VM that is not being created (the create
// records its own outcome) and ignores domains it has no record of.
func (f *Fleet) observe(ctx context.Context, ev hv.Event) {
	vm, err := f.db.GetVM(ctx, ev.ID)
	switch {
	case errors.Is(err, embeddb.ErrNotFound):
		return
	case err != nil:
		if ctx.Err() == nil {
			f.log.Error("record vm state from event", "vm", ev.ID, "state", ev.State, "err", err)
		}
		return
	case !vm.Live() || vm.State == StateCreating || !f.mine(vm):
		return
	}
	state, ok := observedState(ev.State)
	if ev.State == hv.StateMissing {
		// Recorded, but logged only in passing: when libvirt loses every domain
		// at once, reconcile's pass reports them all in one line.
		state, ok = StateMissing, true
	}
	if !ok {
		return
	}
	// Most events (the sync at every subscription above all) change nothing: skip
	// their write, which costs a Raft entry. The write itself is conditional, so a
	// VM deleted since the read keeps its last state.
	if state != vm.State {
		changed, err := f.db.ObserveVMState(ctx, vm.ID, state, []string{StateCreating}, f.now())
		if err != nil {
			if ctx.Err() == nil {
				f.log.Error("record vm state from event", "vm", vm.ID, "name", vm.Name, "state", state, "err", err)
			}
			return
		}
		if changed && state == StateMissing {
			f.log.Debug("vm state: domain removed outside threes", "vm", vm.ID, "name", vm.Name, "reason", ev.Reason)
		} else if changed {
			f.log.Info("vm state", "vm", vm.ID, "name", vm.Name, "state", state, "reason", ev.Reason)
		}
	}
	if ev.State == hv.StateStopped && ev.Reason == "shutdown" {
		// Out of line: it takes the VM's lock, which a lifecycle call may hold
		// for as long as a graceful stop takes, and other VMs' events should not
		// wait for that.
		f.rec.bg.Go(func() { f.guestShutdown(ctx, vm.ID) })
	}
}

// guestShutdown handles a guest that powered itself off: its owner shut it down from
// inside, so it should stay off, across restarts too, until started through threes.
// A domain that was merely destroyed (libvirtd or the host going down, or a forced
// stop) keeps its desired state, so it is started again, as threes v0.1 did.
func (f *Fleet) guestShutdown(ctx context.Context, id string) {
	defer f.locks.lock(id)()
	vm, err := f.db.GetVM(ctx, id)
	if err != nil || !vm.Live() || vm.State == StateCreating || vm.Desired != StateRunning {
		return
	}
	// Restart powers off through the same ACPI shutdown and then boots again, under
	// this lock: if the domain runs now, the shutdown was part of that.
	if st, err := f.hv.State(ctx, id); err != nil || st != hv.StateStopped {
		f.log.Debug("guest shutdown ignored: the domain is not off any more (restarted or started since)", "vm", vm.ID, "name", vm.Name, "domain", st, "err", err)
		return
	}
	if err := f.db.SetVMDesired(ctx, id, StateStopped, f.now()); err != nil {
		if ctx.Err() == nil {
			f.log.Error("record that the guest shut itself down", "vm", vm.ID, "name", vm.Name, "err", err)
		}
		return
	}
	f.log.Info("guest shut itself down: vm stays stopped until started", "vm", vm.ID, "name", vm.Name)
}
