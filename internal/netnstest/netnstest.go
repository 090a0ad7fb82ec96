// Package netnstest builds throwaway network namespaces, bridges and veth
// pairs for tests and benchmarks, and removes them when the test
// ends. It owns nothing outside the namespaces it creates.
package netnstest

import (
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"net"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"

	"github.com/threes-dev/threes/internal/nsdo"
)

// Require skips t when it cannot create network namespaces (not root, no
// ip(8)), or fails it loudly when CI=true, where that must not happen.
func Require(t testing.TB, tools ...string) {
	t.Helper()
	miss := func(why string) {
		t.Helper()
		if os.Getenv("CI") == "true" {
			t.Fatalf("CI=true but %s", why)
		}
		t.Skip(why)
	}
	if os.Geteuid() != 0 {
		miss("needs root for network namespaces")
	}
	for _, tool := range append([]string{"ip"}, tools...) {
		if _, err := exec.LookPath(tool); err != nil {
			miss(fmt.Sprintf("needs %s in PATH", tool))
		}
	}
}

// LoopbackUp brings up loopback in the test's own network namespace when it
// is down, as it is in a fresh one (`unshare -n go test ./PKG`), so that tests
// serving on 127.0.0.1 work there as well as under scripts/testenv. Loopback
// that is already up, as on any host, is left alone. When it is down and
// cannot be brought up (not root), t skips, or fails under CI=true.
func LoopbackUp(t testing.TB) {
	t.Helper()
	lo, err := netlink.LinkByName("lo")
	if err != nil {
		t.Fatalf("find loopback: %v", err)
	}
	if lo.Attrs().Flags&net.FlagUp != 0 {
		return
	}
	if err := netlink.LinkSetUp(lo); err != nil {
		why := fmt.Sprintf("loopback is down in this network namespace and cannot be brought up: %v", err)
		if os.Getenv("CI") == "true" {
			t.Fatalf("CI=true but %s", why)
		}
		t.Skip(why)
	}
}

// NS is a named network namespace that lives until the test ends.
type NS struct {
	Name   string
	Handle netns.NsHandle
}

func suffix() string {
	var b [3]byte
	rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

// Run runs a command on the host, failing t with its output on error.
func Run(t testing.TB, args ...string) string {
	t.Helper()
	out, err := exec.Command(args[0], args[1:]...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return string(out)
}

// NewNS creates a namespace whose name starts with prefix, with loopback up.
func NewNS(t testing.TB, prefix string) *NS {
	t.Helper()
	name := "threes-" + prefix + "-" + suffix()
	Run(t, "ip", "netns", "add", name)
	t.Cleanup(func() {
		// Deleting the namespace removes its links, and the veth peers in
		// other namespaces with them.
		exec.Command("ip", "netns", "del", name).Run()
	})
	h, err := netns.GetFromName(name)
	if err != nil {
		t.Fatalf("open netns %s: %v", name, err)
	}
	t.Cleanup(func() { h.Close() })
	ns := &NS{Name: name, Handle: h}
	ns.Run(t, "ip", "link", "set", "lo", "up")
	return ns
}

// Run runs a command inside the namespace, failing t with its output on error.
func (n *NS) Run(t testing.TB, args ...string) string {
	t.Helper()
	return Run(t, append([]string{"ip", "netns", "exec", n.Name}, args...)...)
}

// Command returns an unstarted command that runs inside the namespace.
func (n *NS) Command(args ...string) *exec.Cmd {
	return exec.Command("ip", append([]string{"netns", "exec", n.Name}, args...)...)
}

// Do runs fn on a thread switched into the namespace; sockets fn opens stay
// in the namespace after it returns.
func (n *NS) Do(fn func() error) error {
	if err := nsdo.Do(n.Handle, fn); err != nil {
		return fmt.Errorf("netns %s: %w", n.Name, err)
	}
	return nil
}

// Bridge creates a bridge in ns with addr (CIDR form) on it, up.
func (n *NS) Bridge(t testing.TB, name, addr string) {
	t.Helper()
	n.Run(t, "ip", "link", "add", name, "type", "bridge")
	n.Run(t, "ip", "addr", "add", addr, "dev", name)
	n.Run(t, "ip", "link", "set", name, "up")
}

// Plug creates a namespace holding one interface eth0 with mac, whose veth
// peer is a port of bridge in n, and returns it. addr (CIDR form) is put on
// eth0 unless empty.
func (n *NS) Plug(t testing.TB, bridge, prefix string, mac net.HardwareAddr, addr string) *NS {
	t.Helper()
	return n.PlugPort(t, bridge, "v"+suffix(), prefix, mac, addr)
}

// PlugPort is Plug with the bridge's end of the veth named port, as a VM's
// tap would be.
func (n *NS) PlugPort(t testing.TB, bridge, port, prefix string, mac net.HardwareAddr, addr string) *NS {
	t.Helper()
	c := NewNS(t, prefix)
	n.Run(t, "ip", "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", c.Name)
	n.Run(t, "ip", "link", "set", port, "master", bridge)
	n.Run(t, "ip", "link", "set", port, "up")
	if mac != nil {
		c.Run(t, "ip", "link", "set", "eth0", "address", mac.String())
	}
	if addr != "" {
		c.Run(t, "ip", "addr", "add", addr, "dev", "eth0")
	}
	c.Run(t, "ip", "link", "set", "eth0", "up")
	return c
}

// Eventually polls cond until it holds or the deadline passes, then fails t.
func Eventually(t testing.TB, within time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(within)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %s waiting for %s", within, what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}
