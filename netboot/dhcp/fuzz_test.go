package dhcp

import (
	"net"
	"net/netip"
	"testing"
	"time"

	"github.com/insomniacslk/dhcp/dhcpv4"

	"github.com/threes-dev/threes/netboot/ipam"
)

// FuzzHandle feeds arbitrary bytes through the whole shell (parse, rate
// limit, Decide, lease table, marshal). The seeds in testdata/fuzz/FuzzHandle
// are packets captured from udhcpc, dhclient and dhcpcd by TestRealClients
// with THREES_DHCP_CAPTURE set; their MACs are known here so the fuzzer
// starts deep in Decide rather than at "unknown MAC".
func FuzzHandle(f *testing.F) {
	var allocs []ipam.Allocation
	for n := 1; n <= 3; n++ {
		allocs = append(allocs, allocFor(n, "seed"))
	}
	im, err := ipam.New(ipam.Config{}, allocs)
	if err != nil {
		f.Fatal(err)
	}
	conn, err := net.ListenPacket("udp4", "127.0.0.1:0")
	if err != nil {
		f.Fatal(err)
	}
	defer conn.Close()
	clk := &fakeClock{t: time.Unix(1_000_000, 0)}
	s, err := NewServer(ServerConfig{Conn: conn, Reply: testCfg, IPAM: im, Now: clk.now, RateLimit: RateLimit{Burst: 1000, Every: time.Millisecond}})
	if err != nil {
		f.Fatal(err)
	}
	d, _ := dhcpv4.NewDiscovery(allocs[0].MAC)
	f.Add(d.ToBytes())
	f.Fuzz(func(t *testing.T, pkt []byte) {
		clk.t = clk.t.Add(time.Second)
		out, dest, reason := s.Handle(pkt)
		if reason < 0 || reason >= numReasons {
			t.Fatalf("reason %d out of range", reason)
		}
		if out == nil {
			return
		}
		if !dest.IsValid() || !dest.Addr().Is4() || (dest.Port() != 67 && dest.Port() != 68) {
			t.Fatalf("reply to %s", dest)
		}
		req, err := dhcpv4.FromBytes(pkt)
		if err != nil {
			t.Fatalf("replied to a packet that does not parse: %v", err)
		}
		r, err := dhcpv4.FromBytes(out)
		if err != nil {
			t.Fatalf("reply does not parse: %v", err)
		}
		if r.OpCode != dhcpv4.OpcodeBootReply || r.TransactionID != req.TransactionID {
			t.Fatalf("reply %s does not answer %s", r.Summary(), req.Summary())
		}
		if _, ok := im.ByMAC(r.ClientHWAddr); !ok {
			t.Fatalf("replied to unknown mac %s", r.ClientHWAddr)
		}
		if yi, _ := netip.AddrFromSlice(r.YourIPAddr); yi.Unmap() != netip.IPv4Unspecified() {
			if a, _ := im.ByMAC(r.ClientHWAddr); a.IP != yi.Unmap() {
				t.Fatalf("offered %s to %s, ipam holds %s", yi, r.ClientHWAddr, a.IP)
			}
		}
	})
}
