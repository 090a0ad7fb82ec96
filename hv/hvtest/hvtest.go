// Package hvtest gives tests a hv.Libvirt on libvirt's test:///default
// driver inside the machine's running libvirtd, and cleans up after them.
//
// test:///default keeps its state in libvirtd, shared by every connection
// (and reset when the last one closes), and has a predefined domain "test".
// hvtest gives each Open its own hv.Config.Owner so a test lists and removes
// only its own domains, and Spec makes IDs unique across test processes.
// It does not start libvirtd: scripts/testenv does.
package hvtest

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/threes-dev/threes/hv"
)

// URI is the libvirt driver hvtest connects to.
const URI = "test:///default"

// Socket is the libvirtd socket hvtest connects through.
const Socket = "/run/libvirt/libvirt-sock"

// runID tells this test process's names from other processes' (and from a
// previous run's with the same pid).
var runID = func() string {
	b := make([]byte, 3)
	rand.Read(b)
	return fmt.Sprintf("%d-%x", os.Getpid(), b)
}()

var seq atomic.Uint64

// Skip skips the test because something it needs is missing, or fails it
// when CI=true, where everything must be present.
func Skip(tb testing.TB, format string, args ...any) {
	tb.Helper()
	if os.Getenv("CI") == "true" {
		tb.Fatalf("CI=true but "+format, args...)
	}
	tb.Skipf(format, args...)
}

// Open returns a Libvirt on test:///default through the running libvirtd,
// with an Owner of its own. It skips the test if there is no libvirtd socket (fails under
// CI=true). When the test ends it removes every domain the returned Libvirt
// created, whether or not the test closed it, and closes it.
func Open(tb testing.TB) *hv.Libvirt {
	tb.Helper()
	return OpenConfig(tb, hv.Config{})
}

// OpenConfig is Open with cfg's StopTimeout, DomainType and DiskDir (a
// temporary directory if empty); URI, Socket and Owner are hvtest's.
func OpenConfig(tb testing.TB, cfg hv.Config) *hv.Libvirt {
	tb.Helper()
	if _, err := os.Stat(Socket); err != nil {
		Skip(tb, "no libvirtd socket (%v): run under scripts/testenv", err)
	}
	cfg.URI = URI
	cfg.Socket = Socket
	cfg.Owner = Owner(tb)
	if cfg.DiskDir == "" {
		cfg.DiskDir = filepath.Join(tb.TempDir(), "disks")
	}
	return OpenSwept(tb, cfg)
}

// Owner returns an hv.Config.Owner no other test uses.
func Owner(tb testing.TB) string {
	return "hvtest-" + runID + "-" + fmt.Sprint(seq.Add(1)) + "-" + tb.Name()
}

// OpenSwept opens cfg as it is and, when the test ends, removes every
// domain and disk the returned Libvirt made, whether or not the test closed
// it, then closes it. cfg.Owner should come from Owner.
func OpenSwept(tb testing.TB, cfg hv.Config) *hv.Libvirt {
	tb.Helper()
	// QEMU's first capability probe on a machine takes seconds, and a
	// KVM probe up to its timeout.
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	h, err := hv.Open(ctx, cfg)
	if err != nil {
		tb.Fatalf("hvtest: %v", err)
	}
	// A second connection for the cleanup: the test may close h, and the
	// test driver forgets everything when its last connection closes. It
	// takes h's accelerator rather than probing again.
	acc, err := h.Accel(ctx)
	if err != nil {
		h.Close()
		tb.Fatalf("hvtest: %v", err)
	}
	cfg.DomainType = acc.DomainType
	sweeper, err := hv.Open(ctx, cfg)
	if err != nil {
		h.Close()
		tb.Fatalf("hvtest: %v", err)
	}
	tb.Cleanup(func() {
		h.Close()
		defer sweeper.Close()
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		doms, err := sweeper.List(ctx)
		if err != nil {
			tb.Errorf("hvtest cleanup: %v", err)
			return
		}
		ids, err := sweeper.Disks(ctx)
		if err != nil {
			tb.Errorf("hvtest cleanup: %v", err)
		}
		for _, d := range doms {
			ids = append(ids, d.ID)
		}
		slices.Sort(ids)
		for _, id := range slices.Compact(ids) {
			if err := sweeper.Remove(ctx, id); err != nil && !errors.Is(err, hv.ErrNotFound) {
				tb.Errorf("hvtest cleanup: %v", err)
			}
		}
	})
	return h
}

// Spec returns a valid Spec with an ID and MAC no other test uses, on a
// bridge that need not exist (the test driver does not look).
func Spec(tb testing.TB) hv.Spec {
	tb.Helper()
	n := seq.Add(1)
	mac := make([]byte, 3)
	rand.Read(mac)
	name := strings.NewReplacer("/", "-", " ", "-").Replace(tb.Name())
	return hv.Spec{
		ID:        fmt.Sprintf("hvtest-%s-%d", runID, n),
		Name:      fmt.Sprintf("%s %d", name, n),
		VCPUs:     1,
		MemoryMiB: 128,
		MAC:       net.HardwareAddr{0x52, 0x54, 0x00, mac[0], mac[1], mac[2]},
		Bridge:    "threes-test0",
	}
}
