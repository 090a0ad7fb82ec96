package guard_test

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"testing"

	"github.com/threes-dev/threes/hv/guard"
	"github.com/threes-dev/threes/internal/netnstest"
)

// benchPorts returns n ports on distinct taps.
func benchPorts(n int) []guard.Port {
	ports := make([]guard.Port, n)
	for i := range ports {
		ports[i] = guard.Port{
			Dev:     guard.DevName("t3zz", fmt.Sprint("vm-", i)),
			MAC:     net.HardwareAddr{0x52, 0x54, 0, 0x9c, byte(i >> 8), byte(i)},
			IP:      netip.AddrFrom4([4]byte{10, 10, byte(i >> 8), byte(i)}),
			Network: fmt.Sprint("net-", i%4),
			Bridge:  "br0",
		}
	}
	return ports
}

// BenchmarkSet measures what a VM start costs the guard with 100 other
// VMs in the table: check the table is intact, write the port, read the
// table back. The peer, BenchmarkNFTList, is one bare nft run listing the
// same table: Set is about three of those.
func BenchmarkSet(b *testing.B) {
	netnstest.Require(b, "nft")
	host := netnstest.NewNS(b, "gbench")
	tbl := newTable(b, host, false)
	ports := benchPorts(101)
	ctx := context.Background()
	if err := tbl.Sync(ctx, ports[:100]); err != nil {
		b.Fatal(err)
	}
	for b.Loop() {
		if err := tbl.Set(ctx, ports[100]); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkSync measures rebuilding the table of 100 VMs, as a start on a
// table someone changed and the periodic check do.
func BenchmarkSync(b *testing.B) {
	netnstest.Require(b, "nft")
	host := netnstest.NewNS(b, "gbench")
	tbl := newTable(b, host, false)
	ports := benchPorts(100)
	ctx := context.Background()
	for b.Loop() {
		if err := tbl.Sync(ctx, ports); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkNFTList is the peer: one nft run listing the table of 100 VMs.
func BenchmarkNFTList(b *testing.B) {
	netnstest.Require(b, "nft")
	host := netnstest.NewNS(b, "gbench")
	tbl := newTable(b, host, false)
	ctx := context.Background()
	if err := tbl.Sync(ctx, benchPorts(100)); err != nil {
		b.Fatal(err)
	}
	for b.Loop() {
		err := host.Do(func() error {
			_, err := guard.RunNFT(ctx, "list table bridge threes_test\n")
			return err
		})
		if err != nil {
			b.Fatal(err)
		}
	}
}
