package hvtest_test

import (
	"context"
	"errors"
	"io"
	"reflect"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/threes-dev/threes/hv"
	"github.com/threes-dev/threes/hv/hvtest"
)

// TestMemoryContract runs the contract suite against Memory: no root, no
// libvirtd.
func TestMemoryContract(t *testing.T) {
	tg, _ := hvtest.MemoryTarget(t)
	hvtest.Contract(t, tg)
}

// wait bounds waiting for a console: Memory's deliver at once, so only a
// bug makes it run out.
const wait = 10 * time.Second

func must(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

// next returns the next event: Memory queues a call's events before the
// call returns.
func next(t *testing.T, ch <-chan hv.Event) hv.Event {
	t.Helper()
	ev, ok := <-ch
	if !ok {
		t.Fatal("events ended")
	}
	return ev
}

// TestMemoryFailNext checks that an injected failure at each step of
// Create leaves nothing behind, that failures at Start, Stop and Remove
// change nothing, and that each injection fails one call only.
func TestMemoryFailNext(t *testing.T) {
	ctx := context.Background()
	m := hvtest.NewMemory()
	ch, err := m.Events(ctx)
	must(t, err)
	boom := errors.New("boom")
	for _, step := range []hvtest.Step{hvtest.StepDisk, hvtest.StepDefine, hvtest.StepBoot} {
		s := hvtest.Spec(t)
		s.DiskGiB = 1
		m.FailNext(step, boom)
		if err := m.Create(ctx, s); !errors.Is(err, boom) || !strings.Contains(err.Error(), s.ID) {
			t.Errorf("Create failing at %s: %v, want boom naming %s", step, err, s.ID)
		}
		if st, err := m.State(ctx, s.ID); st != hv.StateMissing || !errors.Is(err, hv.ErrNotFound) {
			t.Errorf("after Create failed at %s: State = %q, %v; want missing", step, st, err)
		}
		if ids, _ := m.Disks(ctx); slices.Contains(ids, s.ID) {
			t.Errorf("after Create failed at %s: Disks = %v, want no %s", step, ids, s.ID)
		}
		if step == hvtest.StepBoot {
			// Defined, then undefined: libvirt says so too.
			if ev := next(t, ch); ev != (hv.Event{ID: s.ID, State: hv.StateMissing, Reason: "undefined"}) {
				t.Errorf("event %+v after a Create that failed to boot, want undefined", ev)
			}
		}
		must(t, m.Create(ctx, s)) // the injection was used up
		if ev := next(t, ch); ev != (hv.Event{ID: s.ID, State: hv.StateRunning, Reason: "booted"}) {
			t.Errorf("event %+v, want booted", ev)
		}
	}

	s := hvtest.Spec(t)
	must(t, m.Create(ctx, s))
	next(t, ch)
	m.FailNext(hvtest.StepStop, nil)
	if err := m.Stop(ctx, s.ID); err == nil || !strings.Contains(err.Error(), "injected") {
		t.Errorf("Stop: %v, want the injected failure", err)
	}
	m.FailNext(hvtest.StepStop, nil)
	if err := m.Remove(ctx, s.ID); err == nil {
		t.Errorf("Remove with its destroy failing succeeded")
	}
	if st, _ := m.State(ctx, s.ID); st != hv.StateRunning {
		t.Errorf("State after failed Stop and Remove = %q, want running", st)
	}
	must(t, m.Stop(ctx, s.ID))
	next(t, ch)
	m.FailNext(hvtest.StepBoot, hv.ErrUnavailable)
	if err := m.Start(ctx, s.ID); !errors.Is(err, hv.ErrUnavailable) {
		t.Errorf("Start: %v, want ErrUnavailable", err)
	}
	m.FailNext(hvtest.StepUndefine, nil)
	if err := m.Remove(ctx, s.ID); err == nil {
		t.Errorf("Remove with its undefine failing succeeded")
	}
	if st, _ := m.State(ctx, s.ID); st != hv.StateStopped {
		t.Errorf("State after failed Start and Remove = %q, want stopped", st)
	}
	must(t, m.Remove(ctx, s.ID))
	if ev := next(t, ch); ev != (hv.Event{ID: s.ID, State: hv.StateMissing, Reason: "undefined"}) {
		t.Errorf("event %+v, want undefined (and nothing for the failed calls)", ev)
	}
}

// TestMemoryHooks checks the hooks that stand for what happens behind hv's
// back.
func TestMemoryHooks(t *testing.T) {
	ctx := context.Background()
	m := hvtest.NewMemory()
	s := hvtest.Spec(t)
	must(t, m.Create(ctx, s))
	ch, err := m.Events(ctx)
	must(t, err)
	want := func(st hv.State, reason string) {
		t.Helper()
		if ev := next(t, ch); ev != (hv.Event{ID: s.ID, State: st, Reason: reason}) {
			t.Fatalf("event %+v, want %s %s", ev, st, reason)
		}
	}
	want(hv.StateRunning, "sync")

	// The guest powers itself off.
	if !m.PowerOff(s.ID) || m.PowerOff(s.ID) {
		t.Fatal("PowerOff of a running domain failed, or of a stopped one worked")
	}
	want(hv.StateStopped, "shutdown")
	must(t, m.Start(ctx, s.ID))
	want(hv.StateRunning, "booted")
	if n := m.Boots(s.ID); n != 2 {
		t.Errorf("Boots = %d, want 2", n)
	}
	must(t, m.Start(ctx, s.ID)) // no-op: no boot
	if n := m.Boots(s.ID); n != 2 {
		t.Errorf("Boots after Start of a running domain = %d, want 2", n)
	}

	// Resync repeats every state, as a reconnection to libvirtd does.
	m.Resync()
	want(hv.StateRunning, "sync")

	// The guest's own output reaches every session.
	con, err := m.Console(ctx, s.ID)
	must(t, err)
	c := hvtest.WatchConsole(t, con)
	if !m.GuestWrite(s.ID, "login: ") {
		t.Fatal("GuestWrite to a running domain failed")
	}
	c.WaitFor(t, "login: ", wait)
	if got, ok := m.SpecOf(s.ID); !ok || !reflect.DeepEqual(got, s) {
		t.Errorf("SpecOf = %+v, %v; want %+v", got, ok, s)
	}
	if !m.Crash(s.ID) {
		t.Fatal("Crash of a running domain failed")
	}
	want(hv.StateCrashed, "crashed")
	if err := c.Ended(t, wait); !errors.Is(err, io.EOF) {
		t.Errorf("console ended with %v at the crash, want io.EOF", err)
	}
	if m.GuestWrite(s.ID, "x") || m.Pause(s.ID) || m.Crash(s.ID) {
		t.Error("a hook that needs a running domain worked on a crashed one")
	}
	if !m.Lose(s.ID) || m.Lose(s.ID) {
		t.Fatal("Lose of a domain failed, or of a missing one worked")
	}
	want(hv.StateMissing, "undefined")
}

// TestMemoryConsoleCutOff checks that a session that reads nothing is cut
// off once more than ConsoleBehind bytes wait for it, while another that
// reads keeps going.
func TestMemoryConsoleCutOff(t *testing.T) {
	ctx := context.Background()
	m := hvtest.NewMemory()
	s := hvtest.Spec(t)
	must(t, m.Create(ctx, s))
	idle, err := m.Console(ctx, s.ID)
	must(t, err)
	busy, err := m.Console(ctx, s.ID)
	must(t, err)
	c := hvtest.WatchConsole(t, busy)
	chunk := strings.Repeat("x", 1<<10)
	for range hvtest.ConsoleBehind/len(chunk) + 1 {
		m.GuestWrite(s.ID, chunk)
	}
	m.GuestWrite(s.ID, "the end")
	c.WaitFor(t, "the end", wait)
	n, err := io.Copy(io.Discard, idle)
	if err == nil || n != hvtest.ConsoleBehind {
		t.Errorf("idle session read %d bytes and %v, want %d and an error", n, err, hvtest.ConsoleBehind)
	}
	// A new session replays the last ConsoleReplay bytes.
	late, err := m.Console(ctx, s.ID)
	must(t, err)
	b := make([]byte, 2*hvtest.ConsoleReplay)
	n2, err := io.ReadAtLeast(late, b, hvtest.ConsoleReplay)
	if err != nil || n2 != hvtest.ConsoleReplay || !strings.HasSuffix(string(b[:n2]), "the end") {
		t.Errorf("late session read %d bytes, %v; want the last %d ending in 'the end'", n2, err, hvtest.ConsoleReplay)
	}
}

// TestMemoryConcurrent runs every call at once on a few IDs (for the race
// detector) and checks the end state agrees with itself.
func TestMemoryConcurrent(t *testing.T) {
	ctx := context.Background()
	m := hvtest.NewMemory()
	evctx, cancel := context.WithCancel(ctx)
	ch, err := m.Events(evctx)
	must(t, err)
	var drained sync.WaitGroup
	drained.Go(func() {
		for range ch {
		}
	})
	ids := make([]hv.Spec, 3)
	for i := range ids {
		ids[i] = hvtest.Spec(t)
	}
	var wg sync.WaitGroup
	for w := range 8 {
		wg.Go(func() {
			for i := range 200 {
				s := ids[(w+i)%len(ids)]
				switch i % 7 {
				case 0:
					m.Create(ctx, s)
				case 1:
					m.Stop(ctx, s.ID)
				case 2:
					m.Start(ctx, s.ID)
				case 3:
					if con, err := m.Console(ctx, s.ID); err == nil {
						con.Write([]byte("x"))
						con.Close()
					}
				case 4:
					m.Restart(ctx, s.ID)
				case 5:
					m.List(ctx)
				case 6:
					m.Remove(ctx, s.ID)
				}
			}
		})
	}
	wg.Wait()
	cancel()
	drained.Wait()
	doms, err := m.List(ctx)
	must(t, err)
	for _, d := range doms {
		if st, err := m.State(ctx, d.ID); err != nil || st != d.State {
			t.Errorf("List says %+v, State says %q, %v", d, st, err)
		}
	}
}
