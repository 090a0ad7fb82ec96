package guard_test

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"net"
	"net/netip"
	"os/exec"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/threes-dev/threes/hv/guard"
	"github.com/threes-dev/threes/internal/netnstest"
)

var (
	macVM    = net.HardwareAddr{0x52, 0x54, 0x00, 0x9a, 0x00, 0x09}
	macOther = net.HardwareAddr{0x52, 0x54, 0x00, 0x9a, 0x00, 0x0a}
	macFake  = net.HardwareAddr{0x52, 0x54, 0x00, 0xde, 0xad, 0x01}
	ipVM     = netip.MustParseAddr("10.10.0.9")
)

// rig is a bridge in a namespace of its own with a guarded port, as a VM's
// tap would be, and an unguarded port that is not a VM's (a veth an admin
// attached).
type rig struct {
	host, vm, other *netnstest.NS
	table           *guard.Table
	port            guard.Port
	frames          <-chan []byte // what reaches the host through the bridge
}

func newRig(t *testing.T) *rig {
	netnstest.Require(t, "nft", "busybox")
	host := netnstest.NewNS(t, "guard")
	host.Bridge(t, "br0", "10.10.0.1/16")
	r := &rig{host: host, table: newTable(t, host, false)}
	r.port = guard.Port{Dev: guard.DevName("t3zz", "vm-1"), MAC: macVM, IP: ipVM, Bridge: "br0"}
	r.vm = host.PlugPort(t, "br0", r.port.Dev, "gvm", macVM, "10.10.0.9/16")
	r.other = host.Plug(t, "br0", "goth", macOther, "10.10.0.10/16")
	r.frames = sniff(t, host, "br0")
	return r
}

// newTable returns a table in host's namespace.
func newTable(t testing.TB, host *netnstest.NS, cross bool) *guard.Table {
	t.Helper()
	tbl, err := guard.New(guard.Config{Name: "threes_test", Prefix: "t3zz", CrossNetwork: cross,
		Run: func(ctx context.Context, script string) (out string, err error) {
			err = host.Do(func() (err error) {
				out, err = guard.RunNFT(ctx, script)
				return err
			})
			return out, err
		}})
	if err != nil {
		t.Fatal(err)
	}
	return tbl
}

// sniff delivers every frame that reaches the bridge device of ns: what the
// guard let through from a port and the host sees.
func sniff(t *testing.T, ns *netnstest.NS, ifname string) <-chan []byte {
	t.Helper()
	var fd int
	err := ns.Do(func() error {
		ifi, err := net.InterfaceByName(ifname)
		if err != nil {
			return err
		}
		proto := int(htons(syscall.ETH_P_ALL))
		if fd, err = syscall.Socket(syscall.AF_PACKET, syscall.SOCK_RAW, proto); err != nil {
			return err
		}
		return syscall.Bind(fd, &syscall.SockaddrLinklayer{Protocol: htons(syscall.ETH_P_ALL), Ifindex: ifi.Index})
	})
	if err != nil {
		t.Fatalf("sniff %s: %v", ifname, err)
	}
	ch := make(chan []byte, 1024)
	done := make(chan struct{})
	go func() {
		defer close(done)
		buf := make([]byte, 65536)
		for {
			n, _, err := syscall.Recvfrom(fd, buf, 0)
			if err != nil {
				return
			}
			select {
			case ch <- bytes.Clone(buf[:n]):
			default: // a slow test drops frames rather than block
			}
		}
	}()
	t.Cleanup(func() {
		syscall.Shutdown(fd, syscall.SHUT_RDWR)
		syscall.Close(fd)
	})
	return ch
}

func htons(v uint16) uint16 { return v<<8 | v>>8 }

// seen waits for a frame that match accepts, up to a deadline, and reports
// whether one came; frames before it are discarded.
func (r *rig) seen(match func(f []byte) bool) bool {
	deadline := time.After(5 * time.Second)
	for {
		select {
		case f := <-r.frames:
			if match(f) {
				return true
			}
		case <-deadline:
			return false
		}
	}
}

// before waits for a frame that marker accepts and reports whether a frame
// that bad accepts came before it. Frames sent before the marker arrive
// before it, so a missing bad frame was dropped, not late.
func (r *rig) before(t *testing.T, bad, marker func([]byte) bool) bool {
	t.Helper()
	got := false
	if !r.seen(func(f []byte) bool {
		got = got || bad(f)
		return marker(f)
	}) {
		t.Fatal("the marker frame did not arrive")
	}
	return got
}

// arpArrives sends an ARP from ns claiming ip and reports whether it
// reached the host with the sender MAC mac.
func (r *rig) arpArrives(t *testing.T, ns *netnstest.NS, mac net.HardwareAddr, ip string) bool {
	t.Helper()
	r.drain()
	arping(t, ns, ip)
	return r.seen(arpFrom(mac, ip))
}

// drain empties the frame queue, so a later seen looks only at new frames.
func (r *rig) drain() {
	for {
		select {
		case <-r.frames:
		default:
			return
		}
	}
}

// arpFrom matches an ARP frame from mac claiming the sender address ip.
func arpFrom(mac net.HardwareAddr, ip string) func([]byte) bool {
	want := netip.MustParseAddr(ip).As4()
	return func(f []byte) bool {
		return len(f) >= 42 && binary.BigEndian.Uint16(f[12:]) == syscall.ETH_P_ARP &&
			bytes.Equal(f[6:12], mac) && bytes.Equal(f[22:28], mac) && bytes.Equal(f[28:32], want[:])
	}
}

// etherFrom matches a frame from mac of the given EtherType.
func etherFrom(mac net.HardwareAddr, etherType uint16) func([]byte) bool {
	return func(f []byte) bool {
		return len(f) >= 14 && bytes.Equal(f[6:12], mac) && binary.BigEndian.Uint16(f[12:]) == etherType
	}
}

// ping reports whether the namespace gets an answer from the host.
func ping(ns *netnstest.NS, args ...string) bool {
	return ns.Command(append([]string{"busybox", "ping", "-c", "1", "-W", "2"}, args...)...).Run() == nil
}

// arping sends, from eth0 in ns, one gratuitous ARP request from the
// interface's MAC claiming ip: a raw frame, so any address can be claimed.
func arping(t *testing.T, ns *netnstest.NS, ip string) {
	t.Helper()
	err := ns.Do(func() error {
		ifi, err := net.InterfaceByName("eth0")
		if err != nil {
			return err
		}
		fd, err := syscall.Socket(syscall.AF_PACKET, syscall.SOCK_RAW, int(htons(syscall.ETH_P_ARP)))
		if err != nil {
			return err
		}
		defer syscall.Close(fd)
		sender := netip.MustParseAddr(ip).As4()
		f := make([]byte, 0, 42)
		f = append(f, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff)
		f = append(f, ifi.HardwareAddr...)
		f = binary.BigEndian.AppendUint16(f, syscall.ETH_P_ARP)
		f = append(f, 0, 1, 8, 0, 6, 4, 0, 1) // Ethernet, IPv4, request
		f = append(f, ifi.HardwareAddr...)
		f = append(f, sender[:]...)
		f = append(f, 0, 0, 0, 0, 0, 0)
		f = append(f, sender[:]...) // gratuitous: target is the sender
		to := &syscall.SockaddrLinklayer{Protocol: htons(syscall.ETH_P_ARP), Ifindex: ifi.Index, Halen: 6}
		copy(to.Addr[:], f[:6])
		return syscall.Sendto(fd, f, 0, to)
	})
	if err != nil {
		t.Fatalf("send ARP claiming %s: %v", ip, err)
	}
}

func must(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

// TestGuard shows each rule working on real traffic through a real bridge:
// what the VM may send gets through, each kind of spoofing does not, and
// the same spoofing gets through an unguarded port (so the test can fail).
func TestGuard(t *testing.T) {
	r := newRig(t)
	ctx := context.Background()

	t.Run("honest", func(t *testing.T) {
		// Set patches a table it wrote; Sync writes the first.
		if err := r.table.Set(ctx, r.port); !errors.Is(err, guard.ErrNotIntact) {
			t.Fatalf("Set before any Sync = %v, want ErrNotIntact", err)
		}
		must(t, r.table.Sync(ctx, nil))
		must(t, r.table.Set(ctx, r.port))
		if !ping(r.vm, "10.10.0.1") {
			t.Fatal("ping from the VM's own MAC and IP did not get through")
		}
		if !ping(r.other, "10.10.0.9") {
			t.Error("a port that is not a VM's cannot reach the VM")
		}
		if !r.arpArrives(t, r.vm, macVM, "10.10.0.9") {
			t.Error("ARP claiming the VM's own address did not get through")
		}
	})

	t.Run("spoofed ip", func(t *testing.T) {
		r.vm.Run(t, "ip", "addr", "add", "10.10.0.66/16", "dev", "eth0")
		defer r.vm.Run(t, "ip", "addr", "del", "10.10.0.66/16", "dev", "eth0")
		// Control: with no address to hold it to, the spoof works.
		must(t, r.table.Set(ctx, guard.Port{Dev: r.port.Dev, MAC: macVM}))
		if !ping(r.vm, "-I", "10.10.0.66", "10.10.0.1") {
			t.Fatal("control: ping from a second address failed without an IP rule")
		}
		must(t, r.table.Set(ctx, r.port))
		r.host.Run(t, "ip", "neigh", "flush", "dev", "br0")
		if ping(r.vm, "-I", "10.10.0.66", "10.10.0.1") {
			t.Error("ping from a spoofed IP got through")
		}
		if !ping(r.vm, "10.10.0.1") {
			t.Error("ping from the VM's own IP stopped working")
		}
	})

	t.Run("spoofed arp", func(t *testing.T) {
		r.drain()
		arping(t, r.vm, "10.10.0.10") // the neighbour's address
		arping(t, r.vm, "10.10.0.9")  // then its own, as a marker
		if r.before(t, arpFrom(macVM, "10.10.0.10"), arpFrom(macVM, "10.10.0.9")) {
			t.Error("ARP claiming the neighbour's address got through")
		}
		// Control: the unguarded neighbour can claim any address.
		if !r.arpArrives(t, r.other, macOther, "10.10.0.77") {
			t.Error("control: an unguarded port's ARP did not arrive")
		}
	})

	t.Run("spoofed mac", func(t *testing.T) {
		r.vm.Run(t, "ip", "link", "set", "eth0", "address", macFake.String())
		defer r.vm.Run(t, "ip", "link", "set", "eth0", "address", macVM.String())
		r.host.Run(t, "ip", "neigh", "flush", "dev", "br0")
		if ping(r.vm, "10.10.0.1") {
			t.Error("ping from a spoofed MAC got through")
		}
		r.drain()
		arping(t, r.vm, "10.10.0.9")
		if r.seen(etherFrom(macFake, syscall.ETH_P_ARP)) {
			t.Error("ARP from a spoofed MAC got through")
		}
	})

	t.Run("dhcp and other protocols", func(t *testing.T) {
		// A client with no address yet: DISCOVER from 0.0.0.0 passes.
		r.vm.Run(t, "ip", "addr", "flush", "dev", "eth0")
		defer r.vm.Run(t, "ip", "addr", "add", "10.10.0.9/16", "dev", "eth0")
		r.drain()
		r.vm.Command("busybox", "udhcpc", "-i", "eth0", "-n", "-q", "-t", "1", "-T", "1", "-s", "/bin/true").Run()
		if !r.seen(func(f []byte) bool {
			return etherFrom(macVM, syscall.ETH_P_IP)(f) && len(f) >= 38 &&
				bytes.Equal(f[26:30], []byte{0, 0, 0, 0}) && binary.BigEndian.Uint16(f[36:]) == 67
		}) {
			t.Error("DHCP DISCOVER from 0.0.0.0 did not get through")
		}
		// IPv6 (and anything but IPv4 and ARP) does not leave the VM.
		r.drain()
		r.vm.Command("busybox", "ping", "-6", "-c", "1", "-W", "1", "-I", "eth0", "ff02::1").Run()
		r.other.Command("busybox", "ping", "-6", "-c", "1", "-W", "1", "-I", "eth0", "ff02::1").Run()
		if r.before(t, etherFrom(macVM, 0x86dd), etherFrom(macOther, 0x86dd)) {
			t.Error("IPv6 from the guarded VM got through")
		}
	})

	t.Run("delete cuts the tap off", func(t *testing.T) {
		must(t, r.table.Delete(ctx, r.port.Dev))
		must(t, r.table.Delete(ctx, r.port.Dev)) // twice is fine
		if ping(r.vm, "10.10.0.1") {
			t.Error("a tap with the prefix and no rules got through")
		}
	})

	t.Run("sync", func(t *testing.T) {
		must(t, r.table.Sync(ctx, []guard.Port{r.port}))
		// The VM gave up resolving the gateway while it was cut off.
		r.vm.Run(t, "ip", "neigh", "flush", "dev", "eth0")
		if !ping(r.vm, "10.10.0.1") {
			t.Error("after Sync with the port, ping did not get through")
		}
		must(t, r.table.Sync(ctx, nil))
		if ping(r.vm, "10.10.0.1") {
			t.Error("after Sync without the port, ping got through")
		}
	})

	t.Run("set after a flush", func(t *testing.T) {
		// A firewall reload that flushes every table takes ours too.
		// Set then refuses to build a table with its port alone, which
		// would cut off every other VM; Sync puts it back whole.
		r.host.Run(t, "nft", "flush", "ruleset")
		if err := r.table.Set(ctx, r.port); !errors.Is(err, guard.ErrNotIntact) {
			t.Fatalf("Set after a flush = %v, want ErrNotIntact", err)
		}
		if out, err := r.host.Command("nft", "list", "table", "bridge", "threes_test").CombinedOutput(); err == nil {
			t.Errorf("Set after a flush wrote a table:\n%s", out)
		}
		must(t, r.table.Sync(ctx, []guard.Port{r.port}))
		out := r.host.Run(t, "nft", "list", "table", "bridge", "threes_test")
		if strings.Count(out, "iifname vmap @ports") != 1 || !strings.Contains(out, r.port.Dev) {
			t.Errorf("table after Sync:\n%s", out)
		}
		if !ping(r.vm, "10.10.0.1") {
			t.Error("after Sync, ping did not get through")
		}
	})
}

// TestBadInput checks that a bad port is refused, naming what is wrong,
// before nft runs.
func TestBadInput(t *testing.T) {
	ran := false
	tbl, err := guard.New(guard.Config{Name: "threes", Prefix: "t3", Run: func(context.Context, string) (string, error) {
		ran = true
		return "", nil
	}})
	must(t, err)
	ctx := context.Background()
	for _, c := range []struct {
		port guard.Port
		want string
	}{
		{guard.Port{Dev: "eth0", MAC: macVM}, `"eth0"`},
		{guard.Port{Dev: "t3;flush", MAC: macVM}, `"t3;flush"`},
		{guard.Port{Dev: "t3aaaaaaaaaaaaaa", MAC: macVM}, "15"},
		{guard.Port{Dev: "t3a", MAC: macVM[:3]}, "MAC"},
		{guard.Port{Dev: "t3a", MAC: macVM, IP: netip.MustParseAddr("fe80::1")}, "not IPv4"},
		{guard.Port{Dev: "t3a", MAC: macVM, Bridge: `br0" }; flush ruleset`}, "bridge"},
		{guard.Port{Dev: "t3a", MAC: macVM, Bridge: "br*"}, `bridge "br*"`},
		{guard.Port{Dev: "t3a", MAC: macVM, Bridge: "averylongbridgename"}, "bridge"},
	} {
		err := tbl.Set(ctx, c.port)
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("Set(%+v) = %v, want an error mentioning %s", c.port, err, c.want)
		}
		if err := tbl.Sync(ctx, []guard.Port{c.port}); err == nil {
			t.Errorf("Sync(%+v) succeeded", c.port)
		}
	}
	if err := tbl.Delete(ctx, "br0"); err == nil {
		t.Error("Delete of a tap without the prefix succeeded")
	}
	if ran {
		t.Error("nft ran for bad input")
	}
	for _, cfg := range []guard.Config{{Name: "", Prefix: "t3"}, {Name: "a b", Prefix: "t3"}, {Name: "x", Prefix: ""}, {Name: "x", Prefix: "t3abc"}} {
		if _, err := guard.New(cfg); err == nil {
			t.Errorf("New(%+v) succeeded", cfg)
		}
	}
}

// TestNFTMissing checks the error when nft is not installed.
func TestNFTMissing(t *testing.T) {
	t.Setenv("PATH", t.TempDir())
	_, err := guard.RunNFT(context.Background(), "")
	if !errors.Is(err, exec.ErrNotFound) || !strings.Contains(err.Error(), "nftables") {
		t.Errorf("RunNFT without nft = %v, want ErrNotFound naming the nftables package", err)
	}
}

// TestDevName checks tap names: the prefix, 15 characters, stable, and
// different for different VMs.
func TestDevName(t *testing.T) {
	a, b := guard.DevName("t3ab", "0123456789abcdefghij"), guard.DevName("t3ab", "0123456789abcdefghik")
	if len(a) != 15 || !strings.HasPrefix(a, "t3ab") || a == b || a != guard.DevName("t3ab", "0123456789abcdefghij") {
		t.Errorf("DevName: %q, %q", a, b)
	}
}
