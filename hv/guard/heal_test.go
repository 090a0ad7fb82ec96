package guard_test

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"net"
	"net/netip"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/threes-dev/threes/hv/guard"
	"github.com/threes-dev/threes/internal/netnstest"
)

var (
	macVM2   = net.HardwareAddr{0x52, 0x54, 0x00, 0x9a, 0x00, 0x0b}
	macStray = net.HardwareAddr{0x52, 0x54, 0x00, 0x9a, 0x00, 0x0c}
)

// TestIntact damages the table the ways a firewall reload or an admin
// would, and checks that Intact sees each, that Set and Delete then refuse
// to patch it (a table holding one VM's rules would cut off the others)
// and that Sync puts it back whole. A tap with the prefix but no VM never
// reaches the gateway.
func TestIntact(t *testing.T) {
	r := newRig(t)
	ctx := context.Background()
	vm2 := guard.Port{Dev: guard.DevName("t3zz", "vm-2"), MAC: macVM2, IP: netip.MustParseAddr("10.10.0.11")}
	ns2 := r.host.PlugPort(t, "br0", vm2.Dev, "gvm2", macVM2, "10.10.0.11/16")
	both := []guard.Port{r.port, vm2}
	must(t, r.table.Sync(ctx, both))
	must(t, r.table.Intact(ctx))
	if !ping(r.vm, "10.10.0.1") || !ping(ns2, "10.10.0.1") {
		t.Fatal("after Sync the VMs cannot reach the gateway")
	}

	dev1 := r.port.Dev
	for _, c := range []struct {
		name   string
		damage []string
	}{
		{"flush ruleset", []string{"nft", "flush", "ruleset"}},
		{"table deleted", []string{"nft", "delete", "table", "bridge", "threes_test"}},
		{"a VM's rules flushed", []string{"nft", "flush", "chain", "bridge", "threes_test", "vm_" + dev1}},
		{"a VM's map entry deleted", []string{"nft", "delete", "element", "bridge", "threes_test", "ports", "{ " + dev1 + " }"}},
		{"dispatch flushed", []string{"nft", "flush", "chain", "bridge", "threes_test", "from_vm"}},
		{"a rule added", []string{"nft", "insert", "rule", "bridge", "threes_test", "from_vm", "accept"}},
		{"the host's inet table deleted", []string{"nft", "delete", "table", "inet", "threes_test"}},
		{"the host's arp check flushed", []string{"nft", "flush", "chain", "arp", "threes_test", "to_host"}},
		{"a bridge let open", []string{"nft", "delete", "element", "inet", "threes_test", "bridges", "{ br0 }"}},
		{"a VM's MAC free for other ports", []string{"nft", "delete", "element", "bridge", "threes_test", "macs", "{ " + macVM.String() + " }"}},
	} {
		t.Run(c.name, func(t *testing.T) {
			r.host.Run(t, c.damage...)
			if err := r.table.Intact(ctx); !errors.Is(err, guard.ErrNotIntact) {
				t.Errorf("Intact after %s = %v, want ErrNotIntact", c.name, err)
			}
			if err := r.table.Set(ctx, vm2); !errors.Is(err, guard.ErrNotIntact) {
				t.Errorf("Set after %s = %v, want ErrNotIntact", c.name, err)
			}
			if err := r.table.Delete(ctx, vm2.Dev); !errors.Is(err, guard.ErrNotIntact) {
				t.Errorf("Delete after %s = %v, want ErrNotIntact", c.name, err)
			}
			must(t, r.table.Sync(ctx, both))
			must(t, r.table.Intact(ctx))
		})
	}

	t.Run("a start after a flush cuts no one off", func(t *testing.T) {
		r.host.Run(t, "nft", "flush", "ruleset")
		// What a VM start does: set its port; on ErrNotIntact, rebuild
		// from every VM (as hv does from every domain).
		if err := r.table.Set(ctx, vm2); errors.Is(err, guard.ErrNotIntact) {
			must(t, r.table.Sync(ctx, both))
		} else {
			must(t, err)
		}
		r.host.Run(t, "ip", "neigh", "flush", "dev", "br0")
		if !ping(r.vm, "10.10.0.1") {
			t.Error("the other running VM was cut off by its neighbour's start")
		}
		if !ping(ns2, "10.10.0.1") {
			t.Error("the started VM cannot reach the gateway")
		}
		must(t, r.table.Intact(ctx))
	})

	t.Run("set and delete keep it intact", func(t *testing.T) {
		vm2.Network = "other"
		must(t, r.table.Set(ctx, vm2))
		must(t, r.table.Intact(ctx))
		must(t, r.table.Delete(ctx, vm2.Dev))
		must(t, r.table.Intact(ctx))
		must(t, r.table.Delete(ctx, vm2.Dev))
		if ping(ns2, "10.10.0.1") {
			t.Error("a deleted VM's tap still reaches the gateway")
		}
		must(t, r.table.Set(ctx, vm2))
		must(t, r.table.Intact(ctx))
	})

	t.Run("a stray tap with the prefix reaches nothing", func(t *testing.T) {
		stray := r.host.PlugPort(t, "br0", "t3zzstray", "gstray", macStray, "10.10.0.30/16")
		if ping(stray, "10.10.0.1") {
			t.Error("a stray tap pinged the gateway")
		}
		r.drain()
		stray.Command("busybox", "udhcpc", "-i", "eth0", "-n", "-q", "-t", "1", "-T", "1", "-s", "/bin/true").Run()
		sendUDP(t, stray, "10.10.0.30:12345", "10.10.0.1:80", []byte("GET / HTTP/1.0\r\n\r\n"))
		// The marker, from an honest VM, sent again if a loaded host
		// lost it: what the stray sent came before the first.
		bad, marked := false, false
		for i := 0; i < 3 && !marked; i++ {
			arping(t, r.vm, "10.10.0.9")
			marked = r.seen(func(f []byte) bool {
				bad = bad || (len(f) >= 12 && bytes.Equal(f[6:12], macStray))
				return arpFrom(macVM, "10.10.0.9")(f)
			})
		}
		if !marked {
			t.Fatal("the marker frame did not arrive")
		}
		if bad {
			t.Error("a frame from a stray tap reached the gateway")
		}
	})
}

// bootp returns a DHCP request of type mt (1 DISCOVER, 3 REQUEST, 4
// DECLINE) with chaddr and giaddr as given.
func bootp(mt byte, chaddr net.HardwareAddr, giaddr [4]byte) []byte {
	p := make([]byte, 240, 300)
	p[0], p[1], p[2] = 1, 1, 6
	binary.BigEndian.PutUint32(p[4:], 0x7e57)
	copy(p[24:28], giaddr[:])
	copy(p[28:34], chaddr)
	copy(p[236:], []byte{99, 130, 83, 99})
	return append(p, 53, 1, mt, 255)
}

// sendUDP sends one datagram from ns, from the address from to to.
func sendUDP(t *testing.T, ns *netnstest.NS, from, to string, payload []byte) {
	t.Helper()
	err := ns.Do(func() error {
		fd, err := syscall.Socket(syscall.AF_INET, syscall.SOCK_DGRAM, 0)
		if err != nil {
			return err
		}
		defer syscall.Close(fd)
		syscall.SetsockoptInt(fd, syscall.SOL_SOCKET, syscall.SO_REUSEADDR, 1)
		syscall.SetsockoptInt(fd, syscall.SOL_SOCKET, syscall.SO_BROADCAST, 1)
		f, d := netip.MustParseAddrPort(from), netip.MustParseAddrPort(to)
		if err := syscall.Bind(fd, &syscall.SockaddrInet4{Port: int(f.Port()), Addr: f.Addr().As4()}); err != nil {
			return err
		}
		return syscall.Sendto(fd, payload, 0, &syscall.SockaddrInet4{Port: int(d.Port()), Addr: d.Addr().As4()})
	})
	if err != nil {
		t.Fatalf("send UDP %s -> %s: %v", from, to, err)
	}
}

// dhcpFrom matches a DHCP request from mac (Ethernet source) whose chaddr
// is chaddr and giaddr giaddr.
func dhcpFrom(mac, chaddr net.HardwareAddr, giaddr [4]byte) func([]byte) bool {
	return func(f []byte) bool {
		// Ethernet 14, IPv4 20 (no options from these senders), UDP 8.
		const bo = 14 + 20 + 8
		return len(f) >= bo+240 && bytes.Equal(f[6:12], mac) && binary.BigEndian.Uint16(f[12:]) == syscall.ETH_P_IP &&
			f[23] == syscall.IPPROTO_UDP &&
			bytes.Equal(f[bo+24:bo+28], giaddr[:]) && bytes.Equal(f[bo+28:bo+34], chaddr)
	}
}

// TestDHCPBoundToPort sends DHCP requests from a guarded VM that speak
// for another client or claim to be relayed, and DHCP replies as a rogue
// server would: none gets past the tap, the VM's own request does, and a
// flood of its own requests is cut to the port's rate.
func TestDHCPBoundToPort(t *testing.T) {
	r := newRig(t)
	ctx := context.Background()
	must(t, r.table.Sync(ctx, []guard.Port{r.port}))
	// The host answers no ARP from a port that is not a VM's, so the
	// control port is told the gateway's MAC to send it unicast.
	gw := strings.TrimSpace(r.host.Run(t, "cat", "/sys/class/net/br0/address"))
	r.other.Run(t, "ip", "neigh", "replace", "10.10.0.1", "lladdr", gw, "dev", "eth0")
	var zero [4]byte
	relay := [4]byte{10, 10, 0, 9}
	own := "10.10.0.9:68"
	for _, c := range []struct {
		name   string
		from   string
		to     string
		pkt    []byte
		chaddr net.HardwareAddr
		giaddr [4]byte
	}{
		{"decline for a neighbour", own, "10.10.0.1:67", bootp(4, macOther, zero), macOther, zero},
		{"discover for a neighbour, broadcast", own, "255.255.255.255:67", bootp(1, macOther, zero), macOther, zero},
		{"request for a neighbour", own, "10.10.0.1:67", bootp(3, macOther, zero), macOther, zero},
		{"relayed discover", "10.10.0.9:67", "10.10.0.1:67", bootp(1, macVM, relay), macVM, relay},
		{"relayed, own port", own, "10.10.0.1:67", bootp(1, macVM, relay), macVM, relay},
		{"a rogue server's offer", "10.10.0.9:67", "255.255.255.255:68", bootp(2, macOther, zero), macOther, zero},
	} {
		t.Run(c.name, func(t *testing.T) {
			// Control: through an unguarded port the same bytes pass.
			r.drain()
			sendUDP(t, r.other, "10.10.0.10"+c.from[len("10.10.0.9"):], c.to, c.pkt)
			if !r.seen(dhcpFrom(macOther, c.chaddr, c.giaddr)) {
				t.Fatal("control: the packet did not pass an unguarded port")
			}
			sendUDP(t, r.vm, c.from, c.to, c.pkt)
			marker := bootp(1, macVM, zero)
			sendUDP(t, r.vm, own, "10.10.0.1:67", marker)
			if r.before(t, dhcpFrom(macVM, c.chaddr, c.giaddr), dhcpFrom(macVM, macVM, zero)) {
				t.Errorf("%s got past the guard", c.name)
			}
		})
	}

	t.Run("rate", func(t *testing.T) {
		// Let the bucket refill from the requests above.
		time.Sleep(3 * time.Second)
		r.drain()
		const n = 200
		start := time.Now()
		for range n {
			sendUDP(t, r.vm, own, "10.10.0.1:67", bootp(1, macVM, zero))
		}
		elapsed := time.Since(start)
		arping(t, r.vm, "10.10.0.9")
		got := 0
		r.seen(func(f []byte) bool {
			if dhcpFrom(macVM, macVM, zero)(f) {
				got++
			}
			return arpFrom(macVM, "10.10.0.9")(f)
		})
		// What the limit lets through in the time the sending took.
		limit := guard.DHCPBurst + int(elapsed.Seconds()*guard.DHCPRate) + 1
		if got > limit || got == 0 {
			t.Errorf("%d of %d requests sent in %v got through, want 1 to %d", got, n, elapsed, limit)
		}
	})
}
