package hvtest

import (
	"testing"
	"time"

	"github.com/digitalocean/go-libvirt"
	"github.com/digitalocean/go-libvirt/socket/dialers"

	"github.com/threes-dev/threes/hv"
)

// MemoryTarget returns a Target on a new Memory, which it also returns for
// the test's hooks.
func MemoryTarget(tb testing.TB) (Target, *Memory) {
	m := NewMemory()
	return Target{
		H:            m,
		Spec:         Spec,
		DomainTypes:  []string{"memory"},
		Timeout:      10 * time.Second,
		ConsoleReady: "",
		Lose: func(tb testing.TB, id string) {
			if !m.Lose(id) {
				tb.Fatalf("Lose(%s): no such domain", id)
			}
		},
		Pause: func(tb testing.TB, id string) {
			if !m.Pause(id) {
				tb.Fatalf("Pause(%s): not running", id)
			}
		},
		Crash: func(tb testing.TB, id string) {
			if !m.Crash(id) {
				tb.Fatalf("Crash(%s): not running", id)
			}
		},
		BreakBoot: func(tb testing.TB, s *hv.Spec) { m.FailNext(StepBoot, nil) },
	}, m
}

// TestDriverTarget returns a Target on Open's Libvirt (the test driver),
// with a witness connection of its own doing what happens behind hv's back.
func TestDriverTarget(tb testing.TB) Target {
	tb.Helper()
	h := Open(tb)
	w := witness(tb, URI)
	return Target{
		H:           h,
		Spec:        Spec,
		DomainTypes: []string{"test"},
		Timeout:     time.Minute,
		// virDomainOpenConsole is not among the test driver's calls.
		NoConsole: "libvirt's test driver has no consoles",
		Lose:      w.lose,
		Pause:     w.pause,
		NoCrash:   "libvirt's test driver cannot make a guest crash",
		// It looks at no bridge, disk or kernel when it starts a domain.
		NoBreakBoot: "libvirt's test driver boots any domain it could define",
	}
}

// QEMUTarget returns a Target on q, with a witness connection to
// qemu:///system doing what happens behind hv's back. Its guests boot the
// test image, whose shell reads the console once it prints
// "threes-test: ready".
func QEMUTarget(tb testing.TB, q *QEMU) Target {
	tb.Helper()
	w := witness(tb, QEMUURI)
	return Target{
		H:            q.H,
		Spec:         q.Spec,
		DomainTypes:  []string{"kvm", "qemu"},
		Timeout:      3 * time.Minute, // a TCG boot on a busy machine
		ConsoleReady: "threes-test: ready",
		BootResumes:  "libvirt's QEMU driver starts the CPUs paused and reports their resuming before the boot",
		Lose:         w.lose,
		Pause:        w.pause,
		// libvirt looks the bridge up only when QEMU starts.
		BreakBoot: func(tb testing.TB, s *hv.Spec) { s.Bridge = "thrmissing0" },
		// Without a pvpanic device a guest's panic is not libvirt's
		// business: the guest hangs or reboots by itself.
		NoCrash: "a QEMU guest's crash reaches libvirt only through a panic device, which hv's domains do not have",
	}
}

// witnessConn is a libvirt connection of its own, independent of hv's.
type witnessConn struct {
	conn *libvirt.Libvirt
}

func witness(tb testing.TB, uri string) witnessConn {
	tb.Helper()
	conn := libvirt.NewWithDialer(dialers.NewLocal(dialers.WithSocket(Socket)))
	if err := conn.ConnectToURI(libvirt.ConnectURI(uri)); err != nil {
		tb.Fatalf("hvtest: witness connection to %s: %v", uri, err)
	}
	tb.Cleanup(func() { conn.Disconnect() })
	return witnessConn{conn}
}

// lose destroys the domain if it runs and undefines it, as virsh would.
func (w witnessConn) lose(tb testing.TB, id string) {
	tb.Helper()
	dom, err := w.conn.DomainLookupByName(id)
	if err != nil {
		tb.Fatalf("hvtest: witness lookup %s: %v", id, err)
	}
	if st, _, err := w.conn.DomainGetState(dom, 0); err == nil && libvirt.DomainState(st) != libvirt.DomainShutoff {
		if err := w.conn.DomainDestroy(dom); err != nil {
			tb.Fatalf("hvtest: witness destroy %s: %v", id, err)
		}
	}
	if err := w.conn.DomainUndefine(dom); err != nil {
		tb.Fatalf("hvtest: witness undefine %s: %v", id, err)
	}
}

// pause suspends the domain, as virsh suspend would.
func (w witnessConn) pause(tb testing.TB, id string) {
	tb.Helper()
	dom, err := w.conn.DomainLookupByName(id)
	if err != nil {
		tb.Fatalf("hvtest: witness lookup %s: %v", id, err)
	}
	if err := w.conn.DomainSuspend(dom); err != nil {
		tb.Fatalf("hvtest: witness suspend %s: %v", id, err)
	}
}
