package appliance

import (
	"context"
	"errors"

	"github.com/threes-dev/threes/embeddb"
	"github.com/threes-dev/threes/hv"
)

// followEvents records libvirt's lifecycle events as VMs' observed states until ctx
// ends. The hypervisor starts the stream with every domain's state and sends it
// again after reconnecting to libvirtd, so applying events in order converges.
func (l *Lifecycle) followEvents(ctx context.Context) {
	events, err := l.hv.Events(ctx)
	if err != nil {
		l.log.Error("follow hypervisor events: vm states follow only reconcile", "err", err)
		return
	}
	for ev := range events {
		l.rec.saw(ev)
		l.observe(ctx, ev)
	}
}

// observe records one event for a live VM that is not being created (the create
// records its own outcome) and ignores domains it has no record of.
func (l *Lifecycle) observe(ctx context.Context, ev hv.Event) {
	vm, err := l.db.GetVM(ctx, ev.ID)
	switch {
	case errors.Is(err, embeddb.ErrNotFound):
		return
	case err != nil:
		if ctx.Err() == nil {
			l.log.Error("record vm state from event", "vm", ev.ID, "state", ev.State, "err", err)
		}
		return
	case !vm.Live() || vm.State == StateCreating:
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
		changed, err := l.db.ObserveVMState(ctx, vm.ID, state, []string{StateCreating}, l.now())
		if err != nil {
			if ctx.Err() == nil {
				l.log.Error("record vm state from event", "vm", vm.ID, "name", vm.Name, "state", state, "err", err)
			}
			return
		}
		if changed && state == StateMissing {
			l.log.Debug("vm state: domain removed outside threes", "vm", vm.ID, "name", vm.Name, "reason", ev.Reason)
		} else if changed {
			l.log.Info("vm state", "vm", vm.ID, "name", vm.Name, "state", state, "reason", ev.Reason)
		}
	}
	if ev.State == hv.StateStopped && ev.Reason == "shutdown" {
		// Out of line: it takes the VM's lock, which a lifecycle call may hold
		// for as long as a graceful stop takes, and other VMs' events should not
		// wait for that.
		l.rec.bg.Go(func() { l.guestShutdown(ctx, vm.ID) })
	}
}

// guestShutdown handles a guest that powered itself off: its owner shut it down from
// inside, so it should stay off, across restarts too, until started through threes.
// A domain that was merely destroyed (libvirtd or the host going down, or a forced
// stop) keeps its desired state, so it is started again as the original did.
func (l *Lifecycle) guestShutdown(ctx context.Context, id string) {
	defer l.locks.lock(id)()
	vm, err := l.db.GetVM(ctx, id)
	if err != nil || !vm.Live() || vm.State == StateCreating || vm.Desired != StateRunning {
		return
	}
	// Restart powers off through the same ACPI shutdown and then boots again, under
	// this lock: if the domain runs now, the shutdown was part of that.
	if st, err := l.hv.State(ctx, id); err != nil || st != hv.StateStopped {
		l.log.Debug("guest shutdown ignored: the domain is not off any more (restarted or started since)", "vm", vm.ID, "name", vm.Name, "domain", st, "err", err)
		return
	}
	if err := l.db.SetVMDesired(ctx, id, StateStopped, l.now()); err != nil {
		if ctx.Err() == nil {
			l.log.Error("record that the guest shut itself down", "vm", vm.ID, "name", vm.Name, "err", err)
		}
		return
	}
	l.log.Info("guest shut itself down: vm stays stopped until started", "vm", vm.ID, "name", vm.Name)
}
