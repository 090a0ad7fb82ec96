package hvtest

import (
	"bytes"
	"context"
	"crypto/rand"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/vishvananda/netlink"

	"github.com/threes-dev/threes/hv"
	"github.com/threes-dev/threes/hv/images"
)

// QEMUURI is the libvirt driver for real VMs.
const QEMUURI = "qemu:///system"

// TestImageDir returns the directory scripts/mkimage built the test image
// in: $THREES_TESTIMAGE, else bin/testimage at the top of the repository
// (what `make testimage` builds). It skips the test if the image is missing
// (fails under CI=true).
func TestImageDir(tb testing.TB) string {
	tb.Helper()
	return imageDir(tb, "THREES_TESTIMAGE", "testimage", "make testimage")
}

// LabImageDir is TestImageDir for the lab image, the test image with
// tailscaled that joins the tailnet by itself: $THREES_LABIMAGE, else
// bin/labimage (what `make labimage` builds).
func LabImageDir(tb testing.TB) string {
	tb.Helper()
	return imageDir(tb, "THREES_LABIMAGE", "labimage", "make labimage")
}

func imageDir(tb testing.TB, env, name, build string) string {
	tb.Helper()
	dir := os.Getenv(env)
	if dir == "" {
		root, err := repoRoot()
		if err != nil {
			Skip(tb, "no %s: %s is not set and %v", name, env, err)
		}
		dir = filepath.Join(root, "bin", name)
	}
	for _, f := range []string{"vmlinuz", "initrd.img", "disk.qcow2", "cmdline"} {
		if _, err := os.Stat(filepath.Join(dir, f)); err != nil {
			Skip(tb, "no %s in %s (%v): build it with %s", name, dir, err, build)
		}
	}
	return dir
}

// repoRoot finds the directory holding go.mod above the working directory.
func repoRoot() (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for {
		if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
			return dir, nil
		}
		up := filepath.Dir(dir)
		if up == dir {
			return "", fmt.Errorf("no go.mod above the working directory")
		}
		dir = up
	}
}

// Bridge creates a bridge with a name of its own in the test's network
// namespace (libvirtd's, under scripts/testenv), brings it up and deletes
// it when the test ends. It has no address: nothing is routed to or from
// it. It skips the test if not root (fails under CI=true).
func Bridge(tb testing.TB) string {
	tb.Helper()
	if os.Geteuid() != 0 {
		Skip(tb, "not root: cannot create a bridge")
	}
	b := make([]byte, 4)
	rand.Read(b)
	name := fmt.Sprintf("thr%x", b) // 11 bytes; interface names have at most 15
	br := &netlink.Bridge{LinkAttrs: netlink.LinkAttrs{Name: name}}
	if err := netlink.LinkAdd(br); err != nil {
		tb.Fatalf("hvtest: add bridge %s: %v", name, err)
	}
	tb.Cleanup(func() {
		if err := netlink.LinkDel(br); err != nil {
			tb.Errorf("hvtest: delete bridge %s: %v", name, err)
		}
	})
	if err := netlink.LinkSetUp(br); err != nil {
		tb.Fatalf("hvtest: bring bridge %s up: %v", name, err)
	}
	return name
}

// QEMU is what a test needs to run real VMs: an hv.Libvirt on qemu:///system
// with disks in a temporary directory, an image store holding the test
// image, and a bridge.
type QEMU struct {
	// H is the hypervisor; every domain and disk it made is removed
	// when the test ends.
	H *hv.Libvirt
	// Images is the store the test image was imported into.
	Images *images.Store
	// Image is the test image: a kernel image with a 64 MiB qcow2 root
	// disk.
	Image images.Image
	// Bridge is the bridge VMs' NICs join.
	Bridge string
	// Dir is the temporary directory holding the store ("images") and
	// the VMs' disks ("disks"), reachable by QEMU's user.
	Dir string
	// Config is what H was opened with, for opening another Libvirt
	// that sees the same domains.
	Config hv.Config
}

// OpenQEMU returns a QEMU with cfg's StopTimeout and DomainType; it probes
// KVM with the test image's kernel unless cfg.DomainType is set. It skips
// the test without root, libvirtd or the test image (fails under CI=true).
func OpenQEMU(tb testing.TB, cfg hv.Config) *QEMU {
	tb.Helper()
	if os.Geteuid() != 0 {
		Skip(tb, "not root: QEMU domains need the system libvirtd")
	}
	if _, err := os.Stat(Socket); err != nil {
		Skip(tb, "no libvirtd socket (%v): run under scripts/testenv", err)
	}
	img := TestImageDir(tb)
	q := &QEMU{Bridge: Bridge(tb), Dir: ReachableTempDir(tb)}

	var err error
	if q.Images, err = images.Open(filepath.Join(q.Dir, "images")); err != nil {
		tb.Fatalf("hvtest: %v", err)
	}
	cmdline, err := os.ReadFile(filepath.Join(img, "cmdline"))
	if err != nil {
		tb.Fatalf("hvtest: %v", err)
	}
	q.Image, err = q.Images.Import(context.Background(), "tiny", images.Source{
		Kernel:  filepath.Join(img, "vmlinuz"),
		Initrd:  filepath.Join(img, "initrd.img"),
		Disk:    filepath.Join(img, "disk.qcow2"),
		Cmdline: strings.TrimSpace(string(cmdline)),
	})
	if err != nil {
		tb.Fatalf("hvtest: %v", err)
	}
	cfg.URI = QEMUURI
	cfg.Socket = Socket
	cfg.Owner = Owner(tb)
	cfg.DiskDir = filepath.Join(q.Dir, "disks")
	if cfg.DomainType == "" {
		cfg.ProbeKernel = q.Image.Kernel
	}
	q.H = OpenSwept(tb, cfg)
	q.Config = cfg
	return q
}

// ReachableTempDir returns a temporary directory that QEMU's user can
// reach: the test's temporary directories are root's and mode 0700. It is
// removed when the test ends.
func ReachableTempDir(tb testing.TB) string {
	tb.Helper()
	dir, err := os.MkdirTemp("", "hvtest-")
	if err != nil {
		tb.Fatalf("hvtest: %v", err)
	}
	tb.Cleanup(func() { os.RemoveAll(dir) })
	if err := os.Chmod(dir, 0o755); err != nil {
		tb.Fatalf("hvtest: %v", err)
	}
	return dir
}

// Spec returns a valid Spec for the test image on q's bridge, with an ID
// and MAC no other test uses, and DHCP off in the guest (the tests start
// no DHCP server).
func (q *QEMU) Spec(tb testing.TB) hv.Spec {
	tb.Helper()
	s := Spec(tb)
	s.Bridge = q.Bridge
	s.Image = q.Image
	s.Cmdline = "threes.dhcp=off"
	s.MemoryMiB = 256
	return s
}

// Console collects a console's output so a test can wait for lines in it.
type Console struct {
	rwc     io.ReadWriteCloser
	mu      sync.Mutex
	buf     bytes.Buffer
	err     error         // why reading stopped
	changed chan struct{} // closed and replaced whenever buf or err change
}

// WatchConsole reads rwc until it ends, and closes it when the test ends.
func WatchConsole(tb testing.TB, rwc io.ReadWriteCloser) *Console {
	c := &Console{rwc: rwc, changed: make(chan struct{})}
	tb.Cleanup(func() { rwc.Close() })
	go func() {
		b := make([]byte, 4096)
		for {
			n, err := rwc.Read(b)
			c.mu.Lock()
			c.buf.Write(b[:n])
			if err != nil {
				c.err = err
			}
			close(c.changed)
			c.changed = make(chan struct{})
			c.mu.Unlock()
			if err != nil {
				return
			}
		}
	}()
	return c
}

// Write sends s to the guest.
func (c *Console) Write(tb testing.TB, s string) {
	tb.Helper()
	if _, err := io.WriteString(c.rwc, s); err != nil {
		tb.Fatalf("write to console: %v", err)
	}
}

// String returns everything read so far.
func (c *Console) String() string {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.buf.String()
}

// WaitFor waits until the output holds want, failing the test with the
// output's tail if it does not within timeout or the console ends first.
func (c *Console) WaitFor(tb testing.TB, want string, timeout time.Duration) {
	tb.Helper()
	c.wait(tb, fmt.Sprintf("%q", want), timeout, func(out string) bool { return strings.Contains(out, want) })
}

// WaitForMatch waits until re matches the output and returns the first
// match's submatches, failing the test as WaitFor does.
func (c *Console) WaitForMatch(tb testing.TB, re *regexp.Regexp, timeout time.Duration) []string {
	tb.Helper()
	var m []string
	c.wait(tb, "/"+re.String()+"/", timeout, func(out string) bool {
		m = re.FindStringSubmatch(out)
		return m != nil
	})
	return m
}

func (c *Console) wait(tb testing.TB, what string, timeout time.Duration, done func(string) bool) {
	tb.Helper()
	deadline := time.NewTimer(timeout)
	defer deadline.Stop()
	for {
		c.mu.Lock()
		out, err, changed := c.buf.String(), c.err, c.changed
		c.mu.Unlock()
		if done(out) {
			return
		}
		if err != nil {
			tb.Fatalf("console ended (%v) before %s; it said:\n%s", err, what, tail(out))
		}
		select {
		case <-changed:
		case <-deadline.C:
			tb.Fatalf("no %s on the console within %v; it said:\n%s", what, timeout, tail(out))
		}
	}
}

// Ended waits until the console ends and returns why.
func (c *Console) Ended(tb testing.TB, timeout time.Duration) error {
	tb.Helper()
	deadline := time.NewTimer(timeout)
	defer deadline.Stop()
	for {
		c.mu.Lock()
		err, changed := c.err, c.changed
		c.mu.Unlock()
		if err != nil {
			return err
		}
		select {
		case <-changed:
		case <-deadline.C:
			tb.Fatalf("console still open after %v", timeout)
		}
	}
}

func tail(s string) string {
	if len(s) > 3000 {
		return "..." + s[len(s)-3000:]
	}
	return s
}

// Virsh runs virsh on qemu:///system, an independent witness of what hv
// did, and returns its trimmed output.
func Virsh(tb testing.TB, args ...string) (string, error) {
	tb.Helper()
	out, err := exec.Command("virsh", append([]string{"-c", QEMUURI}, args...)...).CombinedOutput()
	s := strings.TrimSpace(string(out))
	if err != nil {
		return s, fmt.Errorf("virsh %s: %w: %s", strings.Join(args, " "), err, s)
	}
	return s, nil
}
