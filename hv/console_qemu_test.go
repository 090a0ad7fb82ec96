package hv_test

import (
	"bytes"
	"context"
	"errors"
	"io"
	"os"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/threes-dev/threes/hv"
	"github.com/threes-dev/threes/hv/hvtest"
)

// waitRecorded waits until h's recording of domain id's console holds want,
// without attaching to it.
func waitRecorded(t *testing.T, h *hv.Libvirt, id, want string) {
	t.Helper()
	deadline := time.Now().Add(bootTimeout)
	for {
		got, ok := hv.ConsoleRecorded(h, id)
		if bytes.Contains(got, []byte(want)) {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("no %q recorded from %s's console within %v (recorder: %v); it holds:\n%s", want, id, bootTimeout, ok, got)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// libvirtdFDs counts the open files of the system libvirtd, -1 if unknown.
func libvirtdFDs() int {
	pid, err := os.ReadFile("/run/libvirtd.pid")
	if err != nil {
		return -1
	}
	fds, err := os.ReadDir("/proc/" + strings.TrimSpace(string(pid)) + "/fd")
	if err != nil {
		return -1
	}
	return len(fds)
}

// TestQEMUConsoleReplay: a QEMU domain's console is recorded from Create on,
// with nobody attached; a session attached after the boot reads the boot
// and the shell's prompt it missed, then the live output; a second session
// shares the console with the first (both read the output, both type into
// it) instead of ending it; a second domain's console, recorded over the
// same libvirt connection, carries its own output only; a new boot is a new
// recording; the domain stopping ends its sessions with io.EOF.
func TestQEMUConsoleReplay(t *testing.T) {
	q := hvtest.OpenQEMU(t, hv.Config{StopTimeout: 2 * time.Minute})
	h := q.H
	ctx := context.Background()
	s := q.Spec(t)

	var before runtime.MemStats
	runtime.ReadMemStats(&before)
	goBefore, fdsBefore := runtime.NumGoroutine(), libvirtdFDs()
	must(t, h.Create(ctx, s))
	// Nobody attaches until the guest's shell is up.
	waitRecorded(t, h, s.ID, "threes-test: ready")
	var after runtime.MemStats
	runtime.ReadMemStats(&after)
	t.Logf("a domain created and its console recorded: %+d goroutines, %.1f MiB allocated, %+d open files in libvirtd",
		runtime.NumGoroutine()-goBefore, float64(after.TotalAlloc-before.TotalAlloc)/(1<<20), libvirtdFDs()-fdsBefore)

	con, err := h.Console(ctx, s.ID)
	must(t, err)
	first := hvtest.WatchConsole(t, con)
	// What the guest wrote before anyone attached: its kernel's banner,
	// its ID, its shell being ready.
	first.WaitFor(t, "Linux version", time.Minute)
	first.WaitFor(t, "threes-test: id "+s.ID+"\r\n", time.Minute)
	first.WaitFor(t, "threes-test: ready", time.Minute)

	// Another domain's console shares the recorders' connection.
	other := q.Spec(t)
	must(t, h.Create(ctx, other))
	waitRecorded(t, h, other.ID, "threes-test: ready")
	con, err = h.Console(ctx, other.ID)
	must(t, err)
	oc := hvtest.WatchConsole(t, con)
	oc.WaitFor(t, "threes-test: id "+other.ID+"\r\n", time.Minute)
	oc.Write(t, "echo threes-other-$((2*3))\n")
	oc.WaitFor(t, "threes-other-6", bootTimeout)
	if strings.Contains(oc.String(), s.ID) || strings.Contains(first.String(), other.ID) ||
		strings.Contains(first.String(), "threes-other") {
		t.Errorf("two domains' consoles crossed:\n%s\n----\n%s", first, oc)
	}

	cctx, cancel := context.WithCancel(ctx)
	defer cancel()
	con, err = h.Console(cctx, s.ID)
	must(t, err)
	second := hvtest.WatchConsole(t, con)
	second.WaitFor(t, "threes-test: ready", time.Minute)
	// Both read what either types, and the first goes on: it is shared.
	first.Write(t, "echo threes-$((6*7))\n")
	first.WaitFor(t, "threes-42", bootTimeout)
	second.WaitFor(t, "threes-42", bootTimeout)
	second.Write(t, "echo threes-$((5*5))\n")
	second.WaitFor(t, "threes-25", bootTimeout)
	first.WaitFor(t, "threes-25", bootTimeout)
	// The second's context ending ends the second alone.
	cancel()
	if err := second.Ended(t, time.Minute); errors.Is(err, io.EOF) {
		t.Errorf("second session ended with %v, want its closing", err)
	}
	first.Write(t, "echo threes-$((7*8))\n")
	first.WaitFor(t, "threes-56", bootTimeout)

	// A new boot: the first session ends with the old one; the new boot is
	// recorded with nobody attached, without the old boot's output.
	must(t, h.Restart(ctx, s.ID))
	if err := first.Ended(t, time.Minute); !errors.Is(err, io.EOF) {
		t.Errorf("session of the first boot ended with %v, want io.EOF", err)
	}
	waitRecorded(t, h, s.ID, "threes-test: ready")
	con, err = h.Console(ctx, s.ID)
	must(t, err)
	third := hvtest.WatchConsole(t, con)
	third.WaitFor(t, "Linux version", time.Minute)
	third.WaitFor(t, "threes-test: ready", time.Minute)
	if out := third.String(); strings.Contains(out, "threes-42") {
		t.Errorf("the new boot's console replays the old boot's output:\n%s", out)
	}

	must(t, h.Remove(ctx, other.ID))
	if err := oc.Ended(t, time.Minute); !errors.Is(err, io.EOF) {
		t.Errorf("console ended with %v at Remove, want io.EOF", err)
	}

	must(t, h.Stop(ctx, s.ID))
	if err := third.Ended(t, time.Minute); !errors.Is(err, io.EOF) {
		t.Errorf("console ended with %v at Stop, want io.EOF", err)
	}
	if _, ok := hv.ConsoleRecorded(h, s.ID); ok {
		t.Errorf("a stopped domain's console is still recorded")
	}
	if _, err := h.Console(ctx, s.ID); !errors.Is(err, hv.ErrNotRunning) {
		t.Errorf("Console of a stopped domain: %v, want ErrNotRunning", err)
	}
}
