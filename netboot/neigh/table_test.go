package neigh

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/vishvananda/netlink"

	"github.com/threes-dev/threes/internal/netnstest"
)

func TestErrorsSay(t *testing.T) {
	ip := netip.MustParseAddr("10.10.0.5")
	for _, tc := range []struct {
		err  error
		is   error
		text string
	}{
		{&MismatchError{IP: ip, Want: macA, Got: macB}, ErrMismatch, "10.10.0.5 is at 52:54:00:00:0b:01 by neighbour table, want 52:54:00:00:0a:01"},
		{&MismatchError{IP: ip, Want: macA, Got: macB, Probed: true}, ErrMismatch, "10.10.0.5 is at 52:54:00:00:0b:01 by arp reply, want 52:54:00:00:0a:01"},
		{&PortError{IP: ip, MAC: macA}, ErrWrongPort, "10.10.0.5 at 52:54:00:00:0a:01: bridge has the mac on no port"},
		{&PortError{IP: ip, MAC: macA, Got: "tap-h"}, ErrWrongPort, "10.10.0.5 at 52:54:00:00:0a:01: bridge has the mac behind port tap-h"},
		{&PortError{IP: ip, MAC: macA, Want: "tap-a"}, ErrWrongPort, "10.10.0.5 at 52:54:00:00:0a:01: bridge has the mac on no port, want port tap-a"},
		{&PortError{IP: ip, MAC: macA, Want: "tap-a", Got: "tap-h"}, ErrWrongPort, "10.10.0.5 at 52:54:00:00:0a:01: bridge has the mac behind port tap-h, want port tap-a"},
	} {
		if tc.err.Error() != tc.text || !errors.Is(tc.err, tc.is) {
			t.Errorf("%q (is %v: %v), want %q", tc.err, tc.is, errors.Is(tc.err, tc.is), tc.text)
		}
	}
}

func TestStates(t *testing.T) {
	for _, tc := range []struct {
		state     int
		name      string
		confirmed bool
	}{
		{0, "none", false},
		{netlink.NUD_INCOMPLETE, "incomplete", false},
		{netlink.NUD_REACHABLE, "reachable", true},
		{netlink.NUD_STALE, "stale", false},
		{netlink.NUD_DELAY, "delay", false},
		{netlink.NUD_PROBE, "probe", false},
		{netlink.NUD_FAILED, "failed", false},
		{netlink.NUD_NOARP, "noarp", true},
		{netlink.NUD_PERMANENT, "permanent", true},
	} {
		if got := stateName(tc.state); got != tc.name {
			t.Errorf("stateName(%#x) = %q, want %q", tc.state, got, tc.name)
		}
		if got := (Entry{MAC: macA, State: tc.state}).Confirmed(); got != tc.confirmed {
			t.Errorf("%s: Confirmed() = %v", tc.name, got)
		}
	}
}

// peek reads the event-fed table without draining the socket, as it is
// between requests.
func (c *Checker) peek(ip netip.Addr) (Entry, bool) {
	c.tableMu.Lock()
	defer c.tableMu.Unlock()
	e, ok := c.table[ip]
	return e, ok
}

// TestTableFollowsKernel changes the kernel's table by hand and checks
// that Lookup and Query follow, that entries of other links are not taken,
// and that the table is kept fresh between lookups.
func TestTableFollowsKernel(t *testing.T) {
	l := newLab(t)
	l.srv.Run(t, "ip", "link", "add", "other", "type", "bridge")
	l.srv.Run(t, "ip", "link", "set", "other", "up")
	// Loaded at New: taken from the dump.
	l.srv.Run(t, "ip", "neigh", "add", "10.10.0.40", "lladdr", macB.String(), "nud", "permanent", "dev", bridge)
	c := l.checker(t, ProbeNever)
	ip := netip.MustParseAddr("10.10.0.41")
	for _, tc := range []struct {
		cmd   []string
		ip    netip.Addr
		ok    bool
		mac   net.HardwareAddr
		state int
	}{
		{nil, netip.MustParseAddr("10.10.0.40"), true, macB, netlink.NUD_PERMANENT},
		{[]string{"add", "10.10.0.41", "lladdr", macA.String(), "nud", "permanent", "dev", bridge}, ip, true, macA, netlink.NUD_PERMANENT},
		{[]string{"change", "10.10.0.41", "lladdr", macS.String(), "nud", "stale", "dev", bridge}, ip, true, macS, netlink.NUD_STALE},
		{[]string{"del", "10.10.0.41", "dev", bridge}, ip, false, nil, 0},
		{[]string{"add", "10.10.0.42", "lladdr", macA.String(), "nud", "permanent", "dev", "other"}, netip.MustParseAddr("10.10.0.42"), false, nil, 0},
		{[]string{"add", "fd00::42", "lladdr", macA.String(), "nud", "permanent", "dev", bridge}, netip.MustParseAddr("fd00::42"), false, nil, 0},
	} {
		if tc.cmd != nil {
			l.srv.Run(t, append([]string{"ip", "neigh"}, tc.cmd...)...)
			// The watcher applies the event with no lookup asking.
			netnstest.Eventually(t, 5*time.Second, "event applied: "+strings.Join(tc.cmd, " "), func() bool {
				e, ok := c.peek(tc.ip)
				return ok == tc.ok && (!ok || e.MAC.String() == tc.mac.String() && e.State == tc.state)
			})
		}
		for name, look := range map[string]func(netip.Addr) (Entry, bool, error){"Lookup": c.Lookup, "Query": c.Query} {
			e, ok, err := look(tc.ip)
			if err != nil || ok != tc.ok || ok && (e.MAC.String() != tc.mac.String() || e.State != tc.state) {
				t.Errorf("after %v: %s(%s) = %+v %v %v, want %v %s %s", tc.cmd, name, tc.ip, e, ok, err, tc.ok, tc.mac, stateName(tc.state))
			}
		}
	}
}

// TestPortCheck gives the bridge forwarding entries by hand and checks
// Verify against what PortOf names.
func TestPortCheck(t *testing.T) {
	l := newLab(t)
	l.srv.PlugPort(t, bridge, "tap-x", "x", nil, "")
	l.srv.PlugPort(t, bridge, "tap-y", "y", nil, "")
	ports := map[netip.Addr]string{}
	var c *Checker
	if err := l.srv.Do(func() (err error) {
		c, err = New(Config{Interface: bridge, Probe: ProbeNever, PortOf: portsOf(ports)})
		return err
	}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	// The bridge's own MAC, and a port device's, are local entries.
	brMAC := net.HardwareAddr{0x02, 0, 0, 0, 0, 0x01}
	l.srv.Run(t, "ip", "link", "set", bridge, "address", brMAC.String())
	yMAC, err := net.ParseMAC(strings.TrimSpace(l.srv.Run(t, "cat", "/sys/class/net/tap-y/address")))
	if err != nil {
		t.Fatal(err)
	}
	onX := netip.MustParseAddr("10.10.0.50") // macA, forwarded to tap-x
	nowhere := netip.MustParseAddr("10.10.0.51")
	bridgeOwn := netip.MustParseAddr("10.10.0.52")
	portOwn := netip.MustParseAddr("10.10.0.53")
	l.srv.Run(t, "bridge", "fdb", "add", macA.String(), "dev", "tap-x", "master", "static")
	for ip, mac := range map[netip.Addr]net.HardwareAddr{onX: macA, nowhere: macB, bridgeOwn: brMAC, portOwn: yMAC} {
		l.srv.Run(t, "ip", "neigh", "add", ip.String(), "lladdr", mac.String(), "nud", "permanent", "dev", bridge)
	}
	ctx := context.Background()
	for _, tc := range []struct {
		ip        netip.Addr
		mac       net.HardwareAddr
		port      string
		want, got string // "" and "" for ok
		ok        bool
	}{
		{onX, macA, "tap-x", "", "", true},
		{onX, macA, "", "", "", true},
		{onX, macA, "tap-y", "tap-y", "tap-x", false},
		{nowhere, macB, "", "", "", false},
		{nowhere, macB, "tap-y", "tap-y", "", false},
		{bridgeOwn, brMAC, "", "", "", false},
		{portOwn, yMAC, "", "", "", false},
		{portOwn, yMAC, "tap-y", "tap-y", "", false},
	} {
		ports[tc.ip] = tc.port
		err := c.Verify(ctx, tc.ip, tc.mac)
		var pe *PortError
		switch {
		case tc.ok && err != nil:
			t.Errorf("%s at %s, port %q: %v", tc.ip, tc.mac, tc.port, err)
		case !tc.ok && (!errors.As(err, &pe) || pe.Want != tc.want || pe.Got != tc.got || pe.IP != tc.ip || pe.MAC.String() != tc.mac.String()):
			t.Errorf("%s at %s, port %q: %v, want port error want %q got %q", tc.ip, tc.mac, tc.port, err, tc.want, tc.got)
		}
	}
}

// TestProbe checks the probe's refusals and that it leaves no waiter
// behind, answered or not.
func TestProbe(t *testing.T) {
	l := newLab(t)
	c := l.checker(t, ProbeUnsure)
	never := l.checker(t, ProbeNever)
	l.srv.Plug(t, bridge, "a", macA, ipA.String()+"/16")
	ctx := context.Background()
	if got, err := c.ProbeARP(ctx, ipA); err != nil || got.String() != macA.String() {
		t.Errorf("probe a: %s %v", got, err)
	}
	if _, err := c.ProbeARP(ctx, netip.MustParseAddr("10.10.9.9")); !errors.Is(err, ErrNoEntry) {
		t.Errorf("probe of nobody: %v", err)
	}
	if _, err := c.ProbeARP(ctx, netip.MustParseAddr("192.168.7.7")); !errors.Is(err, ErrNoEntry) || !strings.Contains(err.Error(), "no address") {
		t.Errorf("probe outside the bridge's network: %v", err)
	}
	if _, err := never.ProbeARP(ctx, ipA); !errors.Is(err, ErrNoEntry) {
		t.Errorf("probe with probing off: %v", err)
	}
	cctx, cancel := context.WithCancel(ctx)
	cancel()
	if _, err := c.ProbeARP(cctx, netip.MustParseAddr("10.10.9.9")); !errors.Is(err, context.Canceled) {
		t.Errorf("probe with a cancelled context: %v", err)
	}
	// Two at once for the same address both get the answer.
	errs := make(chan error, 2)
	for range 2 {
		go func() {
			got, err := c.ProbeARP(ctx, ipA)
			if err == nil && got.String() != macA.String() {
				err = errors.New("got " + got.String())
			}
			errs <- err
		}()
	}
	for range 2 {
		if err := <-errs; err != nil {
			t.Errorf("concurrent probe: %v", err)
		}
	}
	c.mu.Lock()
	n := len(c.waiters)
	c.mu.Unlock()
	if n != 0 {
		t.Errorf("%d addresses still have waiters after every probe ended", n)
	}
}

// TestCloseReleases checks that Close gives back every descriptor New
// took, and that a second Close is harmless.
func TestCloseReleases(t *testing.T) {
	l := newLab(t)
	// Sockets only: New opens nothing else, and other descriptors (the
	// directory read here, namespace handles) come and go meanwhile.
	sockets := func() int {
		es, err := os.ReadDir("/proc/self/fd")
		if err != nil {
			t.Fatal(err)
		}
		n := 0
		for _, e := range es {
			if to, _ := os.Readlink("/proc/self/fd/" + e.Name()); strings.HasPrefix(to, "socket:") {
				n++
			}
		}
		return n
	}
	for _, p := range []Probe{ProbeUnsure, ProbeNever} {
		before := sockets()
		var c *Checker
		if err := l.srv.Do(func() (err error) {
			c, err = New(Config{Interface: bridge, Probe: p})
			return err
		}); err != nil {
			t.Fatal(err)
		}
		if sockets() <= before {
			t.Fatalf("probe %d: New opened no socket", p)
		}
		c.Close()
		c.Close()
		// A socket a goroutine is blocked reading is released when that
		// read returns, a moment after Close.
		netnstest.Eventually(t, 5*time.Second, "sockets back to before New", func() bool { return sockets() <= before })
		if _, _, err := c.Query(ipA); err == nil {
			t.Errorf("probe %d: Query after Close worked", p)
		}
	}
	if err := l.srv.Do(func() error {
		_, err := New(Config{Interface: "nosuchbridge"})
		return err
	}); err == nil || !strings.Contains(err.Error(), "nosuchbridge") {
		t.Errorf("New on a missing interface: %v", err)
	}
}
