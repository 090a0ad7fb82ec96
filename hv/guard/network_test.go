package guard_test

import (
	"context"
	"net"
	"net/netip"
	"strings"
	"testing"

	"github.com/threes-dev/threes/hv/guard"
	"github.com/threes-dev/threes/internal/netnstest"
)

// TestNetworks puts VMs of two networks on one bridge: VMs of one network
// reach each other and all reach the gateway, but frames between networks
// are not forwarded, unicast or broadcast, unless the table allows it.
func TestNetworks(t *testing.T) {
	netnstest.Require(t, "nft", "busybox")
	host := netnstest.NewNS(t, "gnet")
	host.Bridge(t, "br0", "10.10.0.1/16")
	ctx := context.Background()
	type vm struct {
		port guard.Port
		ns   *netnstest.NS
	}
	mk := func(n byte, network string) vm {
		mac := net.HardwareAddr{0x52, 0x54, 0x00, 0x9b, 0x00, n}
		ip := netip.AddrFrom4([4]byte{10, 10, 0, n})
		p := guard.Port{Dev: guard.DevName("t3zz", string(rune('a'+n))), MAC: mac, IP: ip, Network: network}
		return vm{p, host.PlugPort(t, "br0", p.Dev, "gn", mac, ip.String()+"/16")}
	}
	red1, blue, red2 := mk(21, "red"), mk(22, "blue"), mk(23, "red")
	ports := []guard.Port{red1.port, blue.port, red2.port}
	reach := func(from, to vm) bool {
		host.Run(t, "ip", "neigh", "flush", "dev", "br0")
		from.ns.Run(t, "ip", "neigh", "flush", "dev", "eth0")
		return ping(from.ns, to.port.IP.String())
	}
	// A broadcast ping: busybox ping -b is not there, so the sender's
	// ARP request, a broadcast, stands for it: the peer only learns the
	// sender's MAC if the broadcast reached it.
	heardBroadcast := func(from, to vm) bool {
		to.ns.Run(t, "ip", "neigh", "flush", "dev", "eth0")
		from.ns.Run(t, "ip", "neigh", "flush", "dev", "eth0")
		ping(from.ns, to.port.IP.String())
		out := to.ns.Run(t, "ip", "neigh", "show", "dev", "eth0")
		return strings.Contains(out, from.port.IP.String()+" ")
	}

	tbl := newTable(t, host, false)
	must(t, tbl.Sync(ctx, ports))
	for _, v := range []vm{red1, blue, red2} {
		if !ping(v.ns, "10.10.0.1") {
			t.Errorf("%s cannot reach the gateway", v.port.Network)
		}
	}
	if !reach(red1, red2) || !reach(red2, red1) {
		t.Error("VMs of one network cannot reach each other")
	}
	if reach(red1, blue) || reach(blue, red2) {
		t.Error("VMs of different networks reach each other")
	}
	if heardBroadcast(red1, blue) {
		t.Error("a broadcast crossed networks")
	}
	if !heardBroadcast(red1, red2) {
		t.Error("control: a broadcast did not reach the same network")
	}

	// Moving a VM to the other network with Set.
	moved := blue.port
	moved.Network = "red"
	must(t, tbl.Set(ctx, moved))
	if !reach(red1, blue) {
		t.Error("after Set into red, red cannot reach it")
	}
	must(t, tbl.Set(ctx, blue.port))
	if reach(red1, blue) {
		t.Error("after Set back into blue, red still reaches it")
	}
	must(t, tbl.Intact(ctx))

	// The option.
	cross := newTable(t, host, true)
	must(t, cross.Sync(ctx, ports))
	if !reach(red1, blue) || !reach(blue, red2) {
		t.Error("with CrossNetwork, VMs of different networks cannot reach each other")
	}
}
