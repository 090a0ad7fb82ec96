package fleet

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/threes-dev/threes/embeddb"
	"github.com/threes-dev/threes/hv"
)

// DefaultReconcileInterval is how often Run converges libvirt and the disk files
// with the database when given no interval.
const DefaultReconcileInterval = 30 * time.Second

// ReconcileReport says what one reconcile pass found and did. IDs are VM IDs, which
// are also the domains' and the disks' names.
type ReconcileReport struct {
	// Started are live VMs whose owner wants them running and whose domain was
	// not (stopped, crashed or paused): the pass started them.
	Started []string
	// Removed are IDs the pass removed whole: VMs a crash left half-created, and
	// domains or disks of this appliance that no VM record claims.
	Removed []string
	// Drift is what the pass found wrong and left alone.
	Drift []Drift
}

// Drift is a difference between the database and the hypervisor that reconcile
// does not fix by itself, such as a live VM whose domain is gone: making one up
// would hide whatever removed it.
type Drift struct {
	// VMID and Name name the VM.
	VMID, Name string
	// Problem says what is wrong, e.g. "domain missing (disk present)".
	Problem string
}

// reconciler is the lifecycle's part that runs in the background: libvirt's events
// and the periodic reconcile.
type reconciler struct {
	// pass serialises reconcile passes: the periodic one and those asked for.
	pass sync.Mutex
	// bg tracks goroutines that events start, so Close waits for them.
	bg sync.WaitGroup

	// seen is libvirt's domains as its events last told them: the listing of
	// most passes, which then cost libvirtd nothing.
	mu   sync.Mutex
	seen map[string]hv.State

	// beat is this host's row in the hosts table, written at every pass (hosts.go).
	beat heartbeat
}

// fullListEvery is how often, in periodic passes, a pass asks libvirt for its
// domains rather than take them from its events (the first pass, and passes asked
// for through Reconcile, always ask): every so often, in case an event went
// missing. hv's listing is one call, but libvirtd gathers every domain's state
// for it, which at 10,000 domains costs more than all else an idle appliance does.
const fullListEvery = 10

// saw records a domain's state from an event.
func (r *reconciler) saw(ev hv.Event) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.seen == nil {
		r.seen = map[string]hv.State{}
	}
	if ev.State == hv.StateMissing {
		delete(r.seen, ev.ID)
		return
	}
	r.seen[ev.ID] = ev.State
}

// domains returns libvirt's domains of this appliance: from libvirt itself when
// full, else from its events. A domain the events have wrong costs only a look at
// that one VM: reconcileVM asks libvirt again before it acts, and an orphan that is
// not there is not there to remove.
func (f *Fleet) domains(ctx context.Context, full bool) ([]hv.Domain, error) {
	if full {
		return f.hv.List(ctx)
	}
	f.rec.mu.Lock()
	defer f.rec.mu.Unlock()
	doms := make([]hv.Domain, 0, len(f.rec.seen))
	for id, st := range f.rec.seen {
		doms = append(doms, hv.Domain{ID: id, State: st})
	}
	return doms, nil
}

// Reconcile converges libvirt's domains and the disk files with the database:
//   - a live VM whose owner wants it running and whose domain is not is started;
//   - a VM still "creating" (a create the process died in) is removed whole: domain,
//     disk, tailnet key and device, record and address;
//   - a domain or disk of this appliance with no VM record is removed;
//   - a live VM whose domain is missing is drift: its state says "missing", and no
//     domain is made up for it.
//
// A pass reads one listing of the domains (libvirt's events' view of them, most
// passes: see fullListEvery), one of the disks and one of the VMs, and makes a call
// of its own only for a VM whose record and domain disagree: that VM is
// then judged again under its lock, with its domain's state asked afresh, so the pass
// never races a create or another change. Every VM's state is also set to what
// libvirt reports, in case an event was missed. Each fix is logged, and the drift of
// the whole pass in one line. A VM that cannot be fixed does not stop the pass; the
// errors come back joined.
func (f *Fleet) Reconcile(ctx context.Context) (ReconcileReport, error) {
	return f.reconcile(ctx, true)
}

// reconcile is one pass; full asks libvirt for its domains rather than take them
// from its events.
func (f *Fleet) reconcile(ctx context.Context, full bool) (ReconcileReport, error) {
	f.rec.pass.Lock()
	defer f.rec.pass.Unlock()
	if f.hooks.BeforePass != nil {
		f.hooks.BeforePass(ctx)
	}
	start := time.Now()
	var rep ReconcileReport
	// The hypervisor's view first, then the database's: a domain made after the
	// listing has its record already, and an ID that seems to have none is checked
	// again under its lock before anything is removed.
	doms, err := f.domains(ctx, full)
	if err != nil {
		return rep, fmt.Errorf("reconcile: %w", err)
	}
	diskIDs, err := f.hv.Disks(ctx)
	if err != nil {
		return rep, fmt.Errorf("reconcile: %w", err)
	}
	vms, err := f.db.ListVMs(ctx)
	if err != nil {
		return rep, fmt.Errorf("reconcile: %w", err)
	}
	listed := make(map[string]hv.State, len(doms))
	for _, d := range doms {
		listed[d.ID] = d.State
	}
	disks := make(map[string]bool, len(diskIDs))
	for _, id := range diskIDs {
		disks[id] = true
	}
	var errs []error
	known := make(map[string]bool, len(vms))
	for _, vm := range vms {
		// Every host's records count as known, so no domain a record claims is
		// removed; only this host's VMs are judged against this host's libvirt.
		known[vm.ID] = true
		if !f.mine(vm) {
			continue
		}
		st, ok := listed[vm.ID]
		if !ok {
			st = hv.StateMissing
		}
		if !needsLook(vm, st) {
			if vm.Live() && st == hv.StateMissing {
				rep.Drift = append(rep.Drift, Drift{VMID: vm.ID, Name: vm.Name, Problem: missingProblem(disks[vm.ID])})
			}
			continue
		}
		if err := f.reconcileVM(ctx, vm.ID, disks[vm.ID], &rep); err != nil {
			errs = append(errs, err)
		}
	}
	var orphans []string
	for _, d := range doms {
		if !known[d.ID] {
			orphans = append(orphans, d.ID)
		}
	}
	for id := range disks {
		if !known[id] {
			orphans = append(orphans, id)
		}
	}
	slices.Sort(orphans)
	for _, id := range slices.Compact(orphans) {
		if err := f.removeOrphan(ctx, id, &rep); err != nil {
			errs = append(errs, err)
		}
	}
	f.logDrift(rep.Drift)
	f.log.Debug("reconcile: pass done", "full", full, "vms", len(vms), "started", len(rep.Started),
		"removed", len(rep.Removed), "drift", len(rep.Drift), "errors", len(errs), "took", time.Since(start))
	return rep, errors.Join(errs...)
}

// needsLook reports whether a VM as listed needs reconcileVM: anything but a
// deleted VM, or a live one whose record already agrees with its listed domain
// and whose domain runs if it should.
func needsLook(vm embeddb.VM, st hv.State) bool {
	switch {
	case !vm.Live():
		return false // its domain and disk stay until purge
	case vm.State == StateCreating:
		return true
	case st == hv.StateMissing:
		return vm.State != StateMissing
	}
	if observed, ok := observedState(st); ok && observed != vm.State {
		return true
	}
	switch st {
	case hv.StateStopped, hv.StateCrashed, hv.StatePaused:
		return vm.Desired == StateRunning
	}
	return false
}

func missingProblem(hasDisk bool) string {
	if hasDisk {
		return "domain missing (disk present)"
	}
	return "domain missing (disk missing too)"
}

// logDrift reports a pass's drift in one line, however many VMs it holds.
func (f *Fleet) logDrift(drift []Drift) {
	if len(drift) == 0 {
		return
	}
	const shown = 5
	var some []string
	for _, d := range drift[:min(len(drift), shown)] {
		some = append(some, d.Name+" ("+d.VMID+"): "+d.Problem)
	}
	f.log.Warn("reconcile: drift: live vms have no domain; not making them up (their state says missing)",
		"vms", len(drift), "first", strings.Join(some, "; "))
}

// reconcileVM converges one VM that the database listed; hasDisk is whether the
// listing found its disk. It reads the record and the domain's state again, under
// the VM's lock.
func (f *Fleet) reconcileVM(ctx context.Context, id string, hasDisk bool, rep *ReconcileReport) error {
	defer f.locks.lock(id)()
	// Read again under the lock: a create or purge may have finished meanwhile.
	vm, err := f.db.GetVM(ctx, id)
	switch {
	case errors.Is(err, embeddb.ErrNotFound):
		return nil
	case err != nil:
		return fmt.Errorf("reconcile vm %s: %w", id, err)
	case !vm.Live():
		return nil // its domain and disk stay until purge
	case !f.mine(vm):
		return nil // another host's
	case vm.State == StateCreating:
		f.log.Warn("reconcile: removing vm a crash left half-created", "vm", vm.ID, "name", vm.Name)
		if err := f.purgeLocked(ctx, vm); err != nil {
			f.log.Error("reconcile: remove half-created vm", "vm", vm.ID, "name", vm.Name, "err", err)
			return fmt.Errorf("reconcile: remove half-created vm %s (%s): %w", vm.Name, vm.ID, err)
		}
		rep.Removed = append(rep.Removed, vm.ID)
		return nil
	}

	st, err := f.hv.State(ctx, id)
	if errors.Is(err, hv.ErrNotFound) {
		rep.Drift = append(rep.Drift, Drift{VMID: vm.ID, Name: vm.Name, Problem: missingProblem(hasDisk)})
		if _, err := f.db.ObserveVMState(ctx, id, StateMissing, []string{StateCreating}, f.now()); err != nil {
			return fmt.Errorf("reconcile vm %s (%s): %w", vm.Name, vm.ID, err)
		}
		return nil
	}
	if err != nil {
		return fmt.Errorf("reconcile vm %s (%s): %w", vm.Name, vm.ID, err)
	}
	if observed, ok := observedState(st); ok && observed != vm.State {
		if _, err := f.db.ObserveVMState(ctx, id, observed, []string{StateCreating}, f.now()); err != nil {
			return fmt.Errorf("reconcile vm %s (%s): %w", vm.Name, vm.ID, err)
		}
		f.log.Info("reconcile: vm state follows its domain", "vm", vm.ID, "name", vm.Name, "was", vm.State, "now", observed)
	}
	switch st {
	case hv.StateStopped, hv.StateCrashed, hv.StatePaused:
	default:
		return nil
	}
	if vm.Desired != StateRunning {
		return nil
	}
	f.log.Info("reconcile: starting vm that should run", "vm", vm.ID, "name", vm.Name, "domain", st)
	if err := f.hv.Start(ctx, id); err != nil {
		f.log.Error("reconcile: start vm", "vm", vm.ID, "name", vm.Name, "err", err)
		return fmt.Errorf("reconcile: start vm %s (%s): %w", vm.Name, vm.ID, err)
	}
	rep.Started = append(rep.Started, vm.ID)
	return f.setState(ctx, &vm, StateRunning)
}

// removeOrphan removes the domain and disk named id if, under its lock, still no VM
// record claims them.
func (f *Fleet) removeOrphan(ctx context.Context, id string, rep *ReconcileReport) error {
	defer f.locks.lock(id)()
	if _, err := f.db.GetVM(ctx, id); err == nil {
		return nil // created since the listing
	} else if !errors.Is(err, embeddb.ErrNotFound) {
		return fmt.Errorf("reconcile %s: %w", id, err)
	}
	// No record, so no name beyond the ID.
	f.log.Warn("reconcile: removing domain and disk that no vm record claims", "vm", id, "name", "")
	if err := f.hv.Remove(ctx, id); err != nil && !errors.Is(err, hv.ErrNotFound) {
		f.log.Error("reconcile: remove orphan", "vm", id, "err", err)
		return fmt.Errorf("reconcile: remove orphan %s: %w", id, err)
	}
	rep.Removed = append(rep.Removed, id)
	return nil
}

// observedState maps what libvirt reports onto the states the database records;
// false for passing states (stopping, paused) and unknown ones, which leave the
// record as it is.
func observedState(st hv.State) (string, bool) {
	switch st {
	case hv.StateRunning:
		return StateRunning, true
	case hv.StateStopped:
		return StateStopped, true
	case hv.StateCrashed:
		return StateCrashed, true
	}
	return "", false
}

// Run keeps the database following libvirt until the returned stop is called:
// it applies libvirt's events from now on, and runs reconcile passes in the
// background: one at once (recovery from whatever the last run left), then one
// every interval (none if interval is negative). Before each pass it writes this
// host's row in the hosts table (Heartbeat), which tells placement on every host
// that this one is up and what it offers. It returns at once, so the appliance
// serves while the first pass catches up.
func (f *Fleet) Run(interval time.Duration) (stop func() error) {
	bg, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	wg.Go(func() { f.phases.run(bg) })
	// Events first, so a change during the first pass is not missed.
	wg.Go(func() { f.followEvents(bg) })
	// libvirtd being down is one warning until it is back, not an ERROR each pass.
	// Only a full pass asks libvirtd, so only a full pass can say it is back.
	var down bool
	report := func(what string, err error, full bool) {
		switch {
		case err == nil && down && full:
			down = false
			f.log.Info("reconcile: hypervisor reachable again")
		case err == nil || bg.Err() != nil:
		case errors.Is(err, hv.ErrUnavailable):
			if !down {
				down = true
				f.log.Warn(what+": hypervisor not reachable (is libvirtd running?); trying again each pass, quietly until it is", "err", err)
			}
		default:
			f.log.Error(what+"; trying again at the next pass", "err", err)
		}
	}
	if interval == 0 {
		interval = DefaultReconcileInterval
	}
	f.rec.beat.mu.Lock()
	f.rec.beat.interval = interval
	f.rec.beat.mu.Unlock()
	wg.Go(func() {
		// The heartbeat first: placement on every host sees this one from now on.
		f.beat(bg)
		_, err := f.Reconcile(bg)
		report("reconcile at start", err, true)
		if interval < 0 {
			return
		}
		t := time.NewTicker(interval)
		defer t.Stop()
		for n := 1; ; n++ {
			select {
			case <-bg.Done():
				return
			case <-t.C:
			}
			full := n%fullListEvery == 0
			f.beat(bg)
			_, err := f.reconcile(bg, full)
			report("reconcile", err, full)
		}
	})
	return func() error {
		cancel()
		wg.Wait()
		f.rec.bg.Wait()
		return nil
	}
}
