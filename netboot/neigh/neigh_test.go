package neigh

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/threes-dev/threes/internal/netnstest"
)

const bridge = "br-threes"

var (
	macA = net.HardwareAddr{0x52, 0x54, 0x00, 0x00, 0x0a, 0x01}
	macB = net.HardwareAddr{0x52, 0x54, 0x00, 0x00, 0x0b, 0x01}
	macS = net.HardwareAddr{0x52, 0x54, 0x00, 0x00, 0x5b, 0x01} // a spoofer's
	ipA  = netip.MustParseAddr("10.10.0.5")
	ipB  = netip.MustParseAddr("10.10.0.6")
)

type lab struct {
	srv  *netnstest.NS
	addr string // a TCP listener on the gateway
}

func newLab(t *testing.T) *lab {
	t.Helper()
	netnstest.Require(t)
	srv := netnstest.NewNS(t, "neigh")
	srv.Bridge(t, bridge, "10.10.0.1/16")
	var ln net.Listener
	if err := srv.Do(func() (err error) {
		ln, err = net.Listen("tcp4", "10.10.0.1:0")
		return err
	}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			c.Close()
		}
	}()
	return &lab{srv: srv, addr: ln.Addr().String()}
}

func (l *lab) checker(t *testing.T, p Probe) *Checker {
	t.Helper()
	var c *Checker
	if err := l.srv.Do(func() (err error) {
		c, err = New(Config{Interface: bridge, Probe: p})
		return err
	}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// connect opens and closes a TCP connection from ns to the gateway, as a VM
// fetching metadata does, so the gateway's kernel learns ns's MAC.
func (l *lab) connect(t *testing.T, ns *netnstest.NS) {
	t.Helper()
	if err := ns.Do(func() error {
		c, err := net.Dial("tcp4", l.addr)
		if err != nil {
			return err
		}
		return c.Close()
	}); err != nil {
		t.Fatalf("connect from %s: %v", ns.Name, err)
	}
}

func TestVerify(t *testing.T) {
	l := newLab(t)
	never, unsure, always := l.checker(t, ProbeNever), l.checker(t, ProbeUnsure), l.checker(t, ProbeAlways)
	ctx := context.Background()

	a := l.srv.Plug(t, bridge, "a", macA, ipA.String()+"/16")
	l.connect(t, a)
	// The gateway learnt a's MAC from a's ARP request, which leaves the
	// entry unconfirmed (stale, then delay) while the connection is served.
	for _, look := range []func(netip.Addr) (Entry, bool, error){never.Lookup, never.Query} {
		if e, ok, err := look(ipA); err != nil || !ok || e.Confirmed() || e.MAC.String() != macA.String() {
			t.Fatalf("entry after connect: %+v %v %v", e, ok, err)
		}
	}
	if err := never.Verify(ctx, ipA, macA); !errors.Is(err, ErrNoEntry) {
		t.Fatalf("never: unconfirmed entry accepted: %v", err)
	}
	// A probe answered by a confirms it, for the kernel too; the kernel
	// takes the reply a moment after the probe's own socket does.
	if err := unsure.Verify(ctx, ipA, macA); err != nil {
		t.Fatalf("unsure: right mac and ip: %v", err)
	}
	netnstest.Eventually(t, 5*time.Second, "entry confirmed by the probe", func() bool {
		e, ok, err := never.Lookup(ipA)
		return err == nil && ok && e.Confirmed()
	})
	for _, c := range []*Checker{unsure, never, always} {
		if err := c.Verify(ctx, ipA, macA); err != nil {
			t.Errorf("mode %d: right mac and ip: %v", c.cfg.Probe, err)
		}
		var me *MismatchError
		if err := c.Verify(ctx, ipA, macB); !errors.As(err, &me) || me.Got.String() != macA.String() {
			t.Errorf("mode %d: wrong expected mac: %v", c.cfg.Probe, err)
		}
	}

	t.Run("stale entry", func(t *testing.T) {
		l.srv.Run(t, "ip", "neigh", "change", ipA.String(), "lladdr", macA.String(), "nud", "stale", "dev", bridge)
		if err := never.Verify(ctx, ipA, macA); !errors.Is(err, ErrNoEntry) {
			t.Fatalf("never: stale entry accepted: %v", err)
		}
		// The probe is answered by a's kernel, confirming the entry.
		if err := unsure.Verify(ctx, ipA, macA); err != nil {
			t.Fatalf("unsure: stale entry, real owner: %v", err)
		}
	})

	t.Run("stale entry naming another mac", func(t *testing.T) {
		l.srv.Run(t, "ip", "neigh", "replace", ipA.String(), "lladdr", macS.String(), "nud", "stale", "dev", bridge)
		// Even though a would answer a probe, whoever taught the kernel
		// macS spoke as ipA.
		if err := unsure.Verify(ctx, ipA, macA); !errors.Is(err, ErrMismatch) {
			t.Fatalf("stale entry with another mac: %v", err)
		}
		l.srv.Run(t, "ip", "neigh", "del", ipA.String(), "dev", bridge)
	})

	t.Run("no entry", func(t *testing.T) {
		nobody := netip.MustParseAddr("10.10.9.9")
		if err := never.Verify(ctx, nobody, macA); !errors.Is(err, ErrNoEntry) {
			t.Fatalf("never: %v", err)
		}
		if err := unsure.Verify(ctx, nobody, macA); !errors.Is(err, ErrNoEntry) {
			t.Fatalf("unsure: probe of nobody: %v", err)
		}
		// A probe finds a, whose entry was just deleted.
		if got, err := unsure.ProbeARP(ctx, ipA); err != nil || got.String() != macA.String() {
			t.Fatalf("probe a: %s, %v", got, err)
		}
	})

	t.Run("spoofed mac", func(t *testing.T) {
		// Another interface holding b's IP with a MAC of its own: the IPAM
		// says ipB is macB.
		s := l.srv.Plug(t, bridge, "smac", macS, ipB.String()+"/16")
		l.connect(t, s)
		for name, c := range map[string]*Checker{"never": never, "unsure": unsure, "always": always} {
			var me *MismatchError
			if err := c.Verify(ctx, ipB, macB); !errors.As(err, &me) || me.Got.String() != macS.String() {
				t.Errorf("%s: spoofed mac accepted: %v", name, err)
			}
		}
	})

	t.Run("spoofed ip", func(t *testing.T) {
		// b (known as macB at ipB) claims a's address.
		l.srv.Run(t, "ip", "neigh", "flush", "dev", bridge)
		b := l.srv.Plug(t, bridge, "sip", macB, ipA.String()+"/16")
		l.connect(t, b)
		for name, c := range map[string]*Checker{"never": never, "unsure": unsure, "always": always} {
			var me *MismatchError
			if err := c.Verify(ctx, ipA, macA); !errors.As(err, &me) || me.Got.String() != macB.String() {
				t.Errorf("%s: spoofed ip accepted: %v", name, err)
			}
		}
	})
}

// TestTwoVMs puts two VMs on the bridge, one after the other: the second
// one's neighbour events must not change what is known of the first.
func TestTwoVMs(t *testing.T) {
	l := newLab(t)
	c := l.checker(t, ProbeUnsure)
	ctx := context.Background()
	a := l.srv.Plug(t, bridge, "a", macA, ipA.String()+"/16")
	b := l.srv.Plug(t, bridge, "b", macB, ipB.String()+"/16")
	l.connect(t, a)
	if err := c.Verify(ctx, ipA, macA); err != nil {
		t.Fatalf("a alone: %v", err)
	}
	l.connect(t, b)
	for _, tc := range []struct {
		ip  netip.Addr
		mac net.HardwareAddr
		ok  bool
	}{
		{ipA, macA, true}, {ipB, macB, true},
		// The latest event's MAC must not pass for another address.
		{ipA, macB, false}, {ipB, macA, false},
	} {
		err := c.Verify(ctx, tc.ip, tc.mac)
		if tc.ok && err != nil || !tc.ok && !errors.Is(err, ErrMismatch) {
			t.Errorf("Verify(%s, %s) = %v, want ok %v", tc.ip, tc.mac, err, tc.ok)
		}
	}
	for ip, mac := range map[netip.Addr]net.HardwareAddr{ipA: macA, ipB: macB} {
		if e, ok, err := c.Lookup(ip); err != nil || !ok || e.MAC.String() != mac.String() {
			t.Errorf("Lookup(%s) = %+v %v %v, want %s", ip, e, ok, err, mac)
		}
	}
}

// portsOf returns a Config.PortOf over a fixed map of ports.
func portsOf(m map[netip.Addr]string) func(netip.Addr, net.HardwareAddr) string {
	return func(ip netip.Addr, _ net.HardwareAddr) string { return m[ip] }
}

// TestStoppedVMForged has a hostile VM take a stopped VM's MAC and IP at
// layer 2 (what the bridge guard stops, when it is there): only the
// bridge's forwarding entry, on the hostile VM's port, gives it away.
func TestStoppedVMForged(t *testing.T) {
	l := newLab(t)
	ports := map[netip.Addr]string{ipA: "tap-a", ipB: "tap-b"}
	var named, any *Checker
	if err := l.srv.Do(func() (err error) {
		if named, err = New(Config{Interface: bridge, PortOf: portsOf(ports)}); err != nil {
			return err
		}
		any, err = New(Config{Interface: bridge})
		return err
	}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { named.Close(); any.Close() })
	ctx := context.Background()

	a := l.srv.PlugPort(t, bridge, "tap-a", "a", macA, ipA.String()+"/16")
	l.connect(t, a)
	b := l.srv.PlugPort(t, bridge, "tap-b", "b", macB, ipB.String()+"/16")
	l.connect(t, b)
	for _, c := range []*Checker{named, any} {
		if err := c.Verify(ctx, ipA, macA); err != nil {
			t.Fatalf("a on its own port: %v", err)
		}
	}
	// a stops: its tap goes, and the bridge forgets what it learnt there.
	l.srv.Run(t, "ip", "link", "del", "tap-a")
	for _, c := range []*Checker{named, any} {
		// Refused by the port check if the table still says
		// reachable, else by the probe nobody answers.
		if err := c.Verify(ctx, ipA, macA); !errors.Is(err, ErrWrongPort) && !errors.Is(err, ErrNoEntry) {
			t.Errorf("a stopped: %v, want refused", err)
		}
		if err := c.Verify(ctx, ipB, macB); err != nil {
			t.Errorf("b running beside: %v", err)
		}
	}
	h := l.srv.PlugPort(t, bridge, "tap-h", "h", macA, ipA.String()+"/16")
	l.connect(t, h)
	var pe *PortError
	if err := named.Verify(ctx, ipA, macA); !errors.As(err, &pe) || pe.Got != "tap-h" || pe.Want != "tap-a" {
		t.Errorf("hostile as a, port known: %v, want refused as behind tap-h", err)
	}
	// Without the port's name the check cannot tell: what the README says.
	if err := any.Verify(ctx, ipA, macA); err != nil {
		t.Errorf("hostile as a, port unknown: %v", err)
	}
}

// TestForgedARPReply has a hostile VM answer probes for a's address with
// a's MAC inside the ARP payload, sent from its own: the probe must not
// take the payload's word for it.
func TestForgedARPReply(t *testing.T) {
	l := newLab(t)
	c := l.checker(t, ProbeUnsure)
	h := l.srv.Plug(t, bridge, "h", macS, "")
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	frame := make([]byte, 14+28)
	copy(frame[0:6], []byte{0xff, 0xff, 0xff, 0xff, 0xff, 0xff})
	copy(frame[6:12], macS)
	frame[12], frame[13] = 0x08, 0x06
	copy(frame[14:22], []byte{0, 1, 8, 0, 6, 4, 0, 2})
	copy(frame[22:28], macA)
	copy(frame[28:32], ipA.AsSlice())
	copy(frame[32:38], macS)
	copy(frame[38:42], []byte{10, 10, 0, 1})
	var fd int
	if err := h.Do(func() (err error) {
		fd, err = unix.Socket(unix.AF_PACKET, unix.SOCK_RAW, 0)
		return err
	}); err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fd)
	ifi, err := nsInterfaceIndex(h, "eth0")
	if err != nil {
		t.Fatal(err)
	}
	to := &unix.SockaddrLinklayer{Ifindex: ifi, Halen: 6, Addr: [8]byte{0xff, 0xff, 0xff, 0xff, 0xff, 0xff}}
	sent := make(chan struct{})
	go func() {
		defer close(sent)
		for ctx.Err() == nil {
			if err := unix.Sendto(fd, frame, 0, to); err != nil {
				t.Errorf("send forged reply: %v", err)
				return
			}
			time.Sleep(5 * time.Millisecond)
		}
	}()
	got, err := c.ProbeARP(ctx, ipA)
	if !errors.Is(err, ErrNoEntry) {
		t.Errorf("probe answered only by forged replies: %s, %v", got, err)
	}
	cancel()
	<-sent
}

// nsInterfaceIndex returns the index of name inside ns.
func nsInterfaceIndex(ns *netnstest.NS, name string) (idx int, err error) {
	err = ns.Do(func() error {
		ifi, err := net.InterfaceByName(name)
		if err == nil {
			idx = ifi.Index
		}
		return err
	})
	return idx, err
}

// BenchmarkVerify measures the per-request cost of a table lookup over a
// confirmed entry, what the metadata server pays on each request.
func BenchmarkVerify(b *testing.B) {
	netnstest.Require(b)
	srv := netnstest.NewNS(b, "neighb")
	srv.Bridge(b, bridge, "10.10.0.1/16")
	// The check wants the bridge to forward to macA through a port.
	srv.PlugPort(b, bridge, "tap-a", "a", nil, "")
	srv.Run(b, "bridge", "fdb", "add", macA.String(), "dev", "tap-a", "master", "static")
	// After the port: a bridge taking a port's MAC flushes its neighbours.
	srv.Run(b, "ip", "neigh", "add", ipA.String(), "lladdr", macA.String(), "nud", "permanent", "dev", bridge)
	var c *Checker
	if err := srv.Do(func() (err error) {
		c, err = New(Config{Interface: bridge, Probe: ProbeNever})
		return err
	}); err != nil {
		b.Fatal(err)
	}
	defer c.Close()
	ctx := context.Background()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			if err := c.Verify(ctx, ipA, macA); err != nil {
				b.Error(err)
				return
			}
		}
	})
}
