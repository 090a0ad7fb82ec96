package hvtest

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/threes-dev/threes/hv"
	"github.com/threes-dev/threes/hv/images"
)

// Target is an hv.Hypervisor for Contract, and what Contract needs to know
// about it. Where implementations genuinely differ, a capability says so
// with its reason, and the subtests it rules out skip naming that reason.
type Target struct {
	// H is the implementation under test. Contract's subtests share it,
	// one after another, each with domains of its own.
	H hv.Hypervisor
	// Spec returns a valid Spec for H with an ID no other test uses.
	// Contract sets DiskGiB to 1 where it wants a disk.
	Spec func(tb testing.TB) hv.Spec
	// DomainTypes are the Accel.DomainType values H may report.
	DomainTypes []string
	// Timeout bounds each wait for an event or for console output.
	Timeout time.Duration

	// NoConsole, when set, says why H's consoles carry no guest's
	// input and output (libvirt's test driver has no consoles); then
	// only Console's errors are checked.
	NoConsole string
	// ConsoleReady is what the guest prints on its console once it
	// reads input (what it gets before is lost); empty if it reads at once.
	ConsoleReady string

	// BreakBoot edits a valid Spec so that Create fails at its last
	// step, booting, after the disk and domain were made. Nil when H
	// cannot be made to fail there; NoBreakBoot then says why.
	BreakBoot   func(tb testing.TB, s *hv.Spec)
	NoBreakBoot string

	// BootResumes, when set, says why a boot may report a "resumed"
	// running event just before its "booted" one (QEMU starts a guest's
	// CPUs paused and resumes them before libvirt reports the boot); the
	// suite passes over such an event where it wants "booted".
	BootResumes string

	// Lose makes the domain vanish behind H's back, as libvirt losing it
	// does: another client destroys it if it runs and undefines it; its
	// disk stays.
	Lose func(tb testing.TB, id string)
	// Pause pauses the running domain behind H's back (virsh suspend).
	Pause func(tb testing.TB, id string)
	// Crash makes the running domain's guest crash. Nil when H cannot
	// make a guest crash on demand; NoCrash then says why.
	Crash   func(tb testing.TB, id string)
	NoCrash string
}

// Contract checks that t.H keeps hv.Hypervisor's documented contract: the
// sentinel errors, naming the domain; each state change and no-op of
// Create (and its undo when the boot fails), Start, Stop, Restart and Remove, with the events each sends and
// no others; State and List; Disks, including a disk whose domain is gone;
// Events' "sync" start, two subscriptions at once, and their end with
// ctx; a paused and a crashed domain; consoles (input, output, replay of
// the boot so far, shared sessions, end at ctx, Close and stop);
// Accel. Every implementation runs the same suite: Memory in hvtest's own
// tests, hv.Libvirt on the test driver and on QEMU in hv's.
func Contract(t *testing.T, tg Target) {
	c := &contract{Target: tg}
	if c.Timeout == 0 {
		c.Timeout = time.Minute
	}
	// A domain that runs throughout, whose "sync" event tells a
	// subscription is in place: Events subscribes in the background, so
	// a change made before that shows as its "sync" state instead.
	fence := c.Spec(t)
	if err := c.H.Create(c.ctx(), fence); err != nil {
		t.Fatalf("create the suite's fence domain: %v", err)
	}
	c.fence = fence.ID
	t.Run("Accel", c.accel)
	t.Run("Lifecycle", c.lifecycle)
	t.Run("RestartStopped", c.restartStopped)
	t.Run("NotFound", c.notFound)
	t.Run("CreateExisting", c.createExisting)
	t.Run("CreateConcurrently", c.createConcurrently)
	t.Run("CreateInvalid", c.createInvalid)
	t.Run("CreateFailsToBoot", c.createFailsToBoot)
	t.Run("List", c.list)
	t.Run("Disks", c.disks)
	t.Run("Lost", c.lost)
	t.Run("Events", c.events)
	t.Run("Paused", c.paused)
	t.Run("Crashed", c.crashed)
	t.Run("Console", c.console)
}

type contract struct {
	Target
	fence string // the ID of a domain that runs throughout
}

func (c *contract) ctx() context.Context { return context.Background() }

func (c *contract) must(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

// wantState fails t unless State(id) is want without error.
func (c *contract) wantState(t *testing.T, id string, want hv.State) {
	t.Helper()
	got, err := c.H.State(c.ctx(), id)
	if err != nil || got != want {
		t.Fatalf("State(%s) = %q, %v; want %q", id, got, err, want)
	}
}

// wantMissing fails t unless id has no domain: State says StateMissing
// with ErrNotFound naming it, and List does not have it.
func (c *contract) wantMissing(t *testing.T, id string) {
	t.Helper()
	st, err := c.H.State(c.ctx(), id)
	if st != hv.StateMissing || !errors.Is(err, hv.ErrNotFound) || !strings.Contains(err.Error(), id) {
		t.Fatalf("State(%s) = %q, %v; want missing and ErrNotFound naming it", id, st, err)
	}
	if d, ok := c.listed(t, id); ok {
		t.Fatalf("List has %+v, want no %s", d, id)
	}
}

// listed returns id's entry in List.
func (c *contract) listed(t *testing.T, id string) (hv.Domain, bool) {
	t.Helper()
	doms, err := c.H.List(c.ctx())
	c.must(t, err)
	i := slices.IndexFunc(doms, func(d hv.Domain) bool { return d.ID == id })
	if i < 0 {
		return hv.Domain{}, false
	}
	if slices.IndexFunc(doms[i+1:], func(d hv.Domain) bool { return d.ID == id }) >= 0 {
		t.Fatalf("List has %s twice: %+v", id, doms)
	}
	return doms[i], true
}

// hasDisk reports whether Disks has id.
func (c *contract) hasDisk(t *testing.T, id string) bool {
	t.Helper()
	ids, err := c.H.Disks(c.ctx())
	c.must(t, err)
	return slices.Contains(ids, id)
}

// wantErr fails t unless err wraps target and names id.
func wantErr(t *testing.T, what string, err, target error, id string) {
	t.Helper()
	if !errors.Is(err, target) || !strings.Contains(err.Error(), id) {
		t.Errorf("%s: error %v, want %v naming %s", what, err, target, id)
	}
}

// subscribe starts an Events subscription that ends with the test, and
// waits until it is in place: it reported the fence domain's state. Every
// event before that must be a "sync".
func (c *contract) subscribe(t *testing.T) *eventLog {
	t.Helper()
	ctx, cancel := context.WithCancel(c.ctx())
	t.Cleanup(cancel)
	ch, err := c.H.Events(ctx)
	c.must(t, err)
	e := &eventLog{ch: ch, timeout: c.Timeout, bootResumes: c.BootResumes != ""}
	deadline := time.NewTimer(c.Timeout)
	defer deadline.Stop()
	var early []hv.Event
	for {
		select {
		case ev, ok := <-ch:
			if !ok {
				t.Fatalf("events ended before the fence's sync; saw %+v", early)
			}
			early = append(early, ev)
			if ev.Reason != "sync" {
				t.Fatalf("event %+v before the fence's sync (events: %+v)", ev, early)
			}
			if ev.ID == c.fence {
				if ev.State != hv.StateRunning {
					t.Fatalf("fence %+v, want running", ev)
				}
				// Syncs of other domains may follow.
				e.pending = early
				return e
			}
		case <-deadline.C:
			t.Fatalf("no sync of the fence %s within %v; saw %+v", c.fence, c.Timeout, early)
		}
	}
}

// eventLog reads one Events subscription.
type eventLog struct {
	ch      <-chan hv.Event
	timeout time.Duration
	pending []hv.Event // read by subscribe, not yet by expect
	seen    []hv.Event
	// bootResumes passes over "resumed" where "booted" is wanted (see
	// Target.BootResumes).
	bootResumes bool
}

// next returns the next event, false when the subscription ended, or
// fails t at deadline.
func (e *eventLog) next(t *testing.T, deadline <-chan time.Time, want []hv.Event) (hv.Event, bool) {
	t.Helper()
	if len(e.pending) > 0 {
		ev := e.pending[0]
		e.pending = e.pending[1:]
		return ev, true
	}
	select {
	case ev, ok := <-e.ch:
		return ev, ok
	case <-deadline:
		t.Fatalf("no event %+v within %v; saw %+v", want[0], e.timeout, e.seen)
	}
	panic("unreachable")
}

// expect reads the events about id and fails t unless the next ones are
// exactly want, in order. A guest shutting down may report StateStopping
// on its way off (QEMU does, the test driver does not): such events are
// passed over. Events about other domains are passed over too.
func (e *eventLog) expect(t *testing.T, id string, want ...hv.Event) {
	t.Helper()
	deadline := time.NewTimer(e.timeout)
	defer deadline.Stop()
	for i := 0; i < len(want); {
		ev, ok := e.next(t, deadline.C, want[i:])
		if !ok {
			t.Fatalf("events ended; saw %+v, want %+v", e.seen, want[i:])
		}
		if ev.ID != id || (ev.State == hv.StateStopping && want[i].State != hv.StateStopping) {
			continue
		}
		if e.bootResumes && ev.State == hv.StateRunning && ev.Reason == "resumed" &&
			want[i].State == hv.StateRunning && want[i].Reason == "booted" {
			continue
		}
		e.seen = append(e.seen, ev)
		if ev != want[i] {
			t.Fatalf("event %+v, want %+v (events about %s so far: %+v)", ev, want[i], id, e.seen)
		}
		i++
	}
}

func ev(id string, st hv.State, reason string) hv.Event {
	return hv.Event{ID: id, State: st, Reason: reason}
}

func (c *contract) accel(t *testing.T) {
	acc, err := c.H.Accel(c.ctx())
	c.must(t, err)
	if !slices.Contains(c.DomainTypes, acc.DomainType) || acc.Reason == "" {
		t.Errorf("Accel = %+v, want one of %q with a reason", acc, c.DomainTypes)
	}
}

// lifecycle takes one domain through Create, Start, Stop, Restart and
// Remove, with their no-ops, checking State, List and the events of each:
// a no-op sends none, so the next change's event is the next one seen.
func (c *contract) lifecycle(t *testing.T) {
	ctx := c.ctx()
	events := c.subscribe(t)
	s := c.Spec(t)
	id := s.ID
	c.wantMissing(t, id)

	c.must(t, c.H.Create(ctx, s))
	c.wantState(t, id, hv.StateRunning)
	if d, ok := c.listed(t, id); !ok || d.State != hv.StateRunning {
		t.Fatalf("List has %+v (%v), want %s running", d, ok, id)
	}
	events.expect(t, id, ev(id, hv.StateRunning, "booted"))
	c.must(t, c.H.Start(ctx, id)) // running: nothing happens
	c.wantState(t, id, hv.StateRunning)

	c.must(t, c.H.Stop(ctx, id))
	c.wantState(t, id, hv.StateStopped)
	if d, ok := c.listed(t, id); !ok || d.State != hv.StateStopped {
		t.Fatalf("List has %+v (%v), want %s stopped", d, ok, id)
	}
	c.must(t, c.H.Stop(ctx, id)) // stopped: nothing happens
	c.wantState(t, id, hv.StateStopped)
	events.expect(t, id, ev(id, hv.StateStopped, "shutdown"))

	c.must(t, c.H.Start(ctx, id))
	c.wantState(t, id, hv.StateRunning)
	c.must(t, c.H.Restart(ctx, id))
	c.wantState(t, id, hv.StateRunning)
	events.expect(t, id,
		ev(id, hv.StateRunning, "booted"),
		ev(id, hv.StateStopped, "shutdown"),
		ev(id, hv.StateRunning, "booted"))

	c.must(t, c.H.Remove(ctx, id))
	c.wantMissing(t, id)
	events.expect(t, id,
		ev(id, hv.StateStopped, "destroyed"),
		ev(id, hv.StateMissing, "undefined"))
	wantErr(t, "Remove of a removed domain", c.H.Remove(ctx, id), hv.ErrNotFound, id)
}

// restartStopped: Restart of a stopped domain starts it.
func (c *contract) restartStopped(t *testing.T) {
	ctx := c.ctx()
	s := c.Spec(t)
	c.must(t, c.H.Create(ctx, s))
	c.must(t, c.H.Stop(ctx, s.ID))
	events := c.subscribe(t)
	events.expect(t, s.ID, ev(s.ID, hv.StateStopped, "sync"))
	c.must(t, c.H.Restart(ctx, s.ID))
	c.wantState(t, s.ID, hv.StateRunning)
	events.expect(t, s.ID, ev(s.ID, hv.StateRunning, "booted"))
	// A stopped domain is removed without being destroyed.
	c.must(t, c.H.Stop(ctx, s.ID))
	c.must(t, c.H.Remove(ctx, s.ID))
	events.expect(t, s.ID,
		ev(s.ID, hv.StateStopped, "shutdown"),
		ev(s.ID, hv.StateMissing, "undefined"))
}

// notFound: every call on an ID with no domain (and no disk) fails with
// ErrNotFound naming it.
func (c *contract) notFound(t *testing.T) {
	ctx := c.ctx()
	id := c.Spec(t).ID
	ops := []struct {
		name string
		op   func() error
	}{
		{"Start", func() error { return c.H.Start(ctx, id) }},
		{"Stop", func() error { return c.H.Stop(ctx, id) }},
		{"Restart", func() error { return c.H.Restart(ctx, id) }},
		{"Remove", func() error { return c.H.Remove(ctx, id) }},
		{"Console", func() error {
			rwc, err := c.H.Console(ctx, id)
			if err == nil {
				rwc.Close()
			}
			return err
		}},
	}
	for _, o := range ops {
		wantErr(t, o.name, o.op(), hv.ErrNotFound, id)
	}
	c.wantMissing(t, id)
	if c.hasDisk(t, id) {
		t.Errorf("Disks has %s after calls on a missing domain", id)
	}
}

// createExisting: a second Create of an ID fails with ErrExists and leaves
// the first domain as it was.
func (c *contract) createExisting(t *testing.T) {
	ctx := c.ctx()
	events := c.subscribe(t)
	s := c.Spec(t)
	c.must(t, c.H.Create(ctx, s))
	events.expect(t, s.ID, ev(s.ID, hv.StateRunning, "booted"))
	again := s
	again.MAC = net.HardwareAddr{0x52, 0x54, 0, 0, 0, 0x99}
	wantErr(t, "second Create", c.H.Create(ctx, again), hv.ErrExists, s.ID)
	c.wantState(t, s.ID, hv.StateRunning)
	// The failed Create sent nothing: Stop's event is the next.
	c.must(t, c.H.Stop(ctx, s.ID))
	events.expect(t, s.ID, ev(s.ID, hv.StateStopped, "shutdown"))
	// A stopped domain is still there for Create.
	wantErr(t, "Create over a stopped domain", c.H.Create(ctx, again), hv.ErrExists, s.ID)
	c.wantState(t, s.ID, hv.StateStopped)
}

// createConcurrently: of concurrent Creates of one ID, one succeeds and the
// others fail with ErrExists.
func (c *contract) createConcurrently(t *testing.T) {
	const n = 4
	s := c.Spec(t)
	s.DiskGiB = 1
	errs := make([]error, n)
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() { errs[i] = c.H.Create(c.ctx(), s) })
	}
	wg.Wait()
	created := 0
	for _, err := range errs {
		switch {
		case err == nil:
			created++
		case !errors.Is(err, hv.ErrExists):
			t.Errorf("Create: %v, want nil or ErrExists", err)
		}
	}
	if created != 1 {
		t.Errorf("%d of %d concurrent Creates of one ID succeeded, want 1", created, n)
	}
	c.wantState(t, s.ID, hv.StateRunning)
	if !c.hasDisk(t, s.ID) {
		t.Errorf("Disks has no %s", s.ID)
	}
}

// createInvalid: a Spec that cannot describe a domain fails with
// ErrInvalidSpec and leaves nothing behind.
func (c *contract) createInvalid(t *testing.T) {
	base := c.Spec(t)
	base.DiskGiB = 1
	cases := []struct {
		name string
		edit func(*hv.Spec)
	}{
		{"empty ID", func(s *hv.Spec) { s.ID = "" }},
		{"slash in ID", func(s *hv.Spec) { s.ID += "/x" }},
		{"short MAC", func(s *hv.Spec) { s.MAC = s.MAC[:3] }},
		{"multicast MAC", func(s *hv.Spec) { s.MAC = net.HardwareAddr{0x01, 0x00, 0x5e, 0, 0, 1} }},
		{"no vCPUs", func(s *hv.Spec) { s.VCPUs = 0 }},
		{"no memory", func(s *hv.Spec) { s.MemoryMiB = 0 }},
		{"no bridge", func(s *hv.Spec) { s.Bridge = "" }},
		{"IPv6", func(s *hv.Spec) { s.IP = netip.MustParseAddr("fd00::1") }},
		{"negative disk", func(s *hv.Spec) { s.DiskGiB = -1 }},
	}
	for _, tc := range cases {
		s := base
		tc.edit(&s)
		err := c.H.Create(c.ctx(), s)
		if !errors.Is(err, hv.ErrInvalidSpec) || !strings.Contains(err.Error(), s.ID) {
			t.Errorf("Create with %s: %v, want ErrInvalidSpec naming %q", tc.name, err, s.ID)
		}
		if st, err := c.H.State(c.ctx(), base.ID); st != hv.StateMissing {
			t.Errorf("State(%s) after Create with %s = %q, %v; want missing", base.ID, tc.name, st, err)
		}
	}
	if c.hasDisk(t, base.ID) {
		t.Errorf("Disks has %s after invalid Creates", base.ID)
	}
}

// createFailsToBoot: a Create that fails at its last step leaves no
// domain and no disk behind, and the ID can be created afresh.
func (c *contract) createFailsToBoot(t *testing.T) {
	if c.BreakBoot == nil {
		t.Skipf("no boot failure on demand: %s", c.NoBreakBoot)
	}
	ctx := c.ctx()
	s := c.Spec(t)
	s.DiskGiB = 1
	broken := s
	c.BreakBoot(t, &broken)
	err := c.H.Create(ctx, broken)
	if err == nil || !strings.Contains(err.Error(), s.ID) {
		t.Fatalf("Create that cannot boot: %v, want an error naming %s", err, s.ID)
	}
	t.Logf("Create that cannot boot: %v", err)
	c.wantMissing(t, s.ID)
	if c.hasDisk(t, s.ID) {
		t.Errorf("Disks has %s after a failed Create", s.ID)
	}
	c.must(t, c.H.Create(ctx, s))
	c.wantState(t, s.ID, hv.StateRunning)
}

// list: List has each domain once with its state, and not once removed.
func (c *contract) list(t *testing.T) {
	ctx := c.ctx()
	a, b := c.Spec(t), c.Spec(t)
	c.must(t, c.H.Create(ctx, a))
	c.must(t, c.H.Create(ctx, b))
	c.must(t, c.H.Stop(ctx, b.ID))
	if d, ok := c.listed(t, a.ID); !ok || d.State != hv.StateRunning {
		t.Errorf("List has %+v (%v), want %s running", d, ok, a.ID)
	}
	if d, ok := c.listed(t, b.ID); !ok || d.State != hv.StateStopped {
		t.Errorf("List has %+v (%v), want %s stopped", d, ok, b.ID)
	}
	c.must(t, c.H.Remove(ctx, a.ID))
	c.wantMissing(t, a.ID)
	if _, ok := c.listed(t, b.ID); !ok {
		t.Errorf("List lost %s when %s was removed", b.ID, a.ID)
	}
}

// disks: a Spec with a disk has one from Create until Remove; Stop keeps
// it.
func (c *contract) disks(t *testing.T) {
	ctx := c.ctx()
	s := c.Spec(t)
	s.DiskGiB = 1
	if c.hasDisk(t, s.ID) {
		t.Fatalf("Disks has %s before Create", s.ID)
	}
	c.must(t, c.H.Create(ctx, s))
	if !c.hasDisk(t, s.ID) {
		t.Fatalf("Disks has no %s after Create", s.ID)
	}
	c.must(t, c.H.Stop(ctx, s.ID))
	if !c.hasDisk(t, s.ID) {
		t.Fatalf("Disks has no %s after Stop", s.ID)
	}
	c.must(t, c.H.Remove(ctx, s.ID))
	if c.hasDisk(t, s.ID) {
		t.Fatalf("Disks has %s after Remove", s.ID)
	}
}

// lost: a domain that vanished behind H's back (libvirt lost it) is
// missing, with events saying so, while its disk stays listed; Create of
// its ID fails with ErrExists (with or without a disk of its own) until
// Remove deletes the disk, and a second Remove finds nothing.
func (c *contract) lost(t *testing.T) {
	ctx := c.ctx()
	events := c.subscribe(t)
	s := c.Spec(t)
	s.DiskGiB = 1
	c.must(t, c.H.Create(ctx, s))
	events.expect(t, s.ID, ev(s.ID, hv.StateRunning, "booted"))
	c.Lose(t, s.ID)
	events.expect(t, s.ID,
		ev(s.ID, hv.StateStopped, "destroyed"),
		ev(s.ID, hv.StateMissing, "undefined"))
	c.wantMissing(t, s.ID)
	if !c.hasDisk(t, s.ID) {
		t.Fatalf("Disks has no %s after its domain was lost", s.ID)
	}
	for _, op := range []struct {
		name string
		err  error
	}{
		{"Start", c.H.Start(ctx, s.ID)},
		{"Stop", c.H.Stop(ctx, s.ID)},
	} {
		wantErr(t, op.name+" of a lost domain", op.err, hv.ErrNotFound, s.ID)
	}
	wantErr(t, "Create over a lost domain's disk", c.H.Create(ctx, s), hv.ErrExists, s.ID)
	diskless := s
	diskless.DiskGiB, diskless.Image, diskless.Cmdline = 0, images.Image{}, ""
	if err := c.H.Create(ctx, diskless); !errors.Is(err, hv.ErrExists) {
		t.Fatalf("Create of a Spec without a disk over a lost domain's disk: %v, want ErrExists", err)
	}
	c.wantMissing(t, s.ID)
	if !c.hasDisk(t, s.ID) {
		t.Fatalf("Disks has no %s after failed Creates", s.ID)
	}
	c.must(t, c.H.Remove(ctx, s.ID))
	if c.hasDisk(t, s.ID) {
		t.Errorf("Disks has %s after Remove", s.ID)
	}
	wantErr(t, "second Remove", c.H.Remove(ctx, s.ID), hv.ErrNotFound, s.ID)

	// A lost domain without a disk leaves nothing to remove.
	d := c.Spec(t)
	d.DiskGiB, d.Image, d.Cmdline = 0, images.Image{}, ""
	if err := c.H.Create(ctx, d); err != nil {
		t.Fatal(err)
	}
	c.Lose(t, d.ID)
	c.wantMissing(t, d.ID)
	wantErr(t, "Remove of a lost domain without a disk", c.H.Remove(ctx, d.ID), hv.ErrNotFound, d.ID)
}

// events: a subscription starts with every domain's state (Reason "sync")
// before any change, and closes when its context ends.
func (c *contract) events(t *testing.T) {
	ctx := c.ctx()
	a, b := c.Spec(t), c.Spec(t)
	c.must(t, c.H.Create(ctx, a))
	c.must(t, c.H.Create(ctx, b))
	c.must(t, c.H.Stop(ctx, b.ID))

	evctx, cancel := context.WithCancel(ctx)
	defer cancel()
	ch, err := c.H.Events(evctx)
	c.must(t, err)
	want := map[string]hv.Event{
		a.ID: ev(a.ID, hv.StateRunning, "sync"),
		b.ID: ev(b.ID, hv.StateStopped, "sync"),
	}
	deadline := time.NewTimer(c.Timeout)
	defer deadline.Stop()
	var seen []hv.Event
	for len(want) > 0 {
		select {
		case e, ok := <-ch:
			if !ok {
				t.Fatalf("events ended; saw %+v, still want %+v", seen, want)
			}
			seen = append(seen, e)
			if e.Reason != "sync" {
				t.Fatalf("event %+v before the sync of %+v", e, want)
			}
			if w, ok := want[e.ID]; ok {
				if e != w {
					t.Fatalf("event %+v, want %+v", e, w)
				}
				delete(want, e.ID)
			}
		case <-deadline.C:
			t.Fatalf("saw %+v, still want %+v", seen, want)
		}
	}
	// A second subscription sees the same, and changes after it.
	events := c.subscribe(t)
	events.expect(t, b.ID, ev(b.ID, hv.StateStopped, "sync"))
	c.must(t, c.H.Start(ctx, b.ID))
	events.expect(t, b.ID, ev(b.ID, hv.StateRunning, "booted"))

	cancel()
	deadline.Reset(c.Timeout)
	for {
		select {
		case _, ok := <-ch:
			if !ok {
				return
			}
		case <-deadline.C:
			t.Fatalf("events still open %v after their context ended", c.Timeout)
		}
	}
}

// paused: a domain paused behind H's back is StatePaused; Start resumes
// it (the same boot: "resumed", not "booted") and Stop powers it off at
// once ("destroyed").
func (c *contract) paused(t *testing.T) {
	ctx := c.ctx()
	events := c.subscribe(t)
	s := c.Spec(t)
	c.must(t, c.H.Create(ctx, s))
	c.Pause(t, s.ID)
	c.wantState(t, s.ID, hv.StatePaused)
	c.must(t, c.H.Start(ctx, s.ID))
	c.wantState(t, s.ID, hv.StateRunning)
	c.Pause(t, s.ID)
	c.must(t, c.H.Stop(ctx, s.ID))
	c.wantState(t, s.ID, hv.StateStopped)
	events.expect(t, s.ID,
		ev(s.ID, hv.StateRunning, "booted"),
		ev(s.ID, hv.StatePaused, "suspended"),
		ev(s.ID, hv.StateRunning, "resumed"),
		ev(s.ID, hv.StatePaused, "suspended"),
		ev(s.ID, hv.StateStopped, "destroyed"))
	// Paused is not stopped: Remove destroys it first.
	c.must(t, c.H.Start(ctx, s.ID))
	c.Pause(t, s.ID)
	c.must(t, c.H.Remove(ctx, s.ID))
	c.wantMissing(t, s.ID)
	events.expect(t, s.ID,
		ev(s.ID, hv.StateRunning, "booted"),
		ev(s.ID, hv.StatePaused, "suspended"),
		ev(s.ID, hv.StateStopped, "destroyed"),
		ev(s.ID, hv.StateMissing, "undefined"))
}

// crashed: a crashed guest is StateCrashed and off: its console is
// refused, Stop leaves it as it is and Start boots it again.
func (c *contract) crashed(t *testing.T) {
	if c.Crash == nil {
		t.Skipf("no crash on demand: %s", c.NoCrash)
	}
	ctx := c.ctx()
	events := c.subscribe(t)
	s := c.Spec(t)
	c.must(t, c.H.Create(ctx, s))
	c.Crash(t, s.ID)
	c.wantState(t, s.ID, hv.StateCrashed)
	_, err := c.H.Console(ctx, s.ID)
	wantErr(t, "Console of a crashed domain", err, hv.ErrNotRunning, s.ID)
	c.must(t, c.H.Stop(ctx, s.ID))
	c.wantState(t, s.ID, hv.StateCrashed)
	c.must(t, c.H.Start(ctx, s.ID))
	c.wantState(t, s.ID, hv.StateRunning)
	events.expect(t, s.ID,
		ev(s.ID, hv.StateRunning, "booted"),
		ev(s.ID, hv.StateCrashed, "crashed"),
		ev(s.ID, hv.StateRunning, "booted"))
}

// console: a running domain's console carries input to the guest and its
// output back; a later session first reads the boot's output so far, then
// shares the console with the others; a session ends at Close, when its
// context ends, and with io.EOF when the domain stops; a stopped domain has
// none; a new boot's sessions do not replay the last boot.
func (c *contract) console(t *testing.T) {
	ctx := c.ctx()
	s := c.Spec(t)
	c.must(t, c.H.Create(ctx, s))
	if c.NoConsole != "" {
		c.must(t, c.H.Stop(ctx, s.ID))
		_, err := c.H.Console(ctx, s.ID)
		wantErr(t, "Console of a stopped domain", err, hv.ErrNotRunning, s.ID)
		t.Skipf("no console traffic: %s", c.NoConsole)
	}
	rwc, err := c.H.Console(ctx, s.ID)
	c.must(t, err)
	first := WatchConsole(t, rwc)
	if c.ConsoleReady != "" {
		first.WaitFor(t, c.ConsoleReady, c.Timeout)
	}
	// What the guest's terminal echoes (a tty does, as does Memory's
	// guest) shows the input reached it and its output came back.
	mark1 := marker()
	first.Write(t, mark1+"\n")
	first.WaitFor(t, mark1, c.Timeout)

	// A second session reads what the boot said so far, then shares
	// the console: each sees the other's input echoed.
	cctx, cancel := context.WithCancel(ctx)
	rwc, err = c.H.Console(cctx, s.ID)
	c.must(t, err)
	second := WatchConsole(t, rwc)
	second.WaitFor(t, mark1, c.Timeout)
	mark2 := marker()
	second.Write(t, mark2+"\n")
	second.WaitFor(t, mark2, c.Timeout)
	first.WaitFor(t, mark2, c.Timeout)
	// Its context ending ends it, and not the first.
	cancel()
	second.Ended(t, c.Timeout)
	mark3 := marker()
	first.Write(t, mark3+"\n")
	first.WaitFor(t, mark3, c.Timeout)

	// Close ends a session.
	rwc, err = c.H.Console(ctx, s.ID)
	c.must(t, err)
	third := WatchConsole(t, rwc)
	c.must(t, rwc.Close())
	third.Ended(t, c.Timeout)

	// The domain stopping ends a session with io.EOF.
	c.must(t, c.H.Stop(ctx, s.ID))
	if err := first.Ended(t, c.Timeout); !errors.Is(err, io.EOF) {
		t.Errorf("session ended with %v when the domain stopped, want io.EOF", err)
	}
	_, err = c.H.Console(ctx, s.ID)
	wantErr(t, "Console of a stopped domain", err, hv.ErrNotRunning, s.ID)

	// A new boot replays its own output only.
	c.must(t, c.H.Start(ctx, s.ID))
	rwc, err = c.H.Console(ctx, s.ID)
	c.must(t, err)
	fourth := WatchConsole(t, rwc)
	if c.ConsoleReady != "" {
		fourth.WaitFor(t, c.ConsoleReady, c.Timeout)
	}
	mark4 := marker()
	fourth.Write(t, mark4+"\n")
	fourth.WaitFor(t, mark4, c.Timeout)
	if strings.Contains(fourth.String(), mark1) {
		t.Errorf("a session of the second boot replayed the first boot's output")
	}
}

// marker returns a word no console has said before.
func marker() string {
	b := make([]byte, 6)
	rand.Read(b)
	return fmt.Sprintf("threes-contract-%x", b)
}
