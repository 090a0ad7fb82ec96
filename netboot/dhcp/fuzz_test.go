package dhcp

import (
	"bytes"
	"encoding/binary"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"
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

// FuzzGuardedPort sends arbitrary DHCP payloads from a VM's guarded port
// through the real guard to the real server on a bridge, seeded with real
// clients' packets that carry other VMs' MACs (chaddr/port mismatches)
// and with relayed ones. Whatever the bytes, what the server reads from
// the port speaks for the port's own MAC and is not relayed, and the
// neighbour whose MAC the packets carry gets no state on the server.
func FuzzGuardedPort(f *testing.F) {
	victim, hostile := allocFor(1, "fzvictim"), allocFor(4, "fzhostile")
	others := []ipam.Allocation{victim, allocFor(2, "fzb"), allocFor(3, "fzc"), hostile}
	b := startBridgeServer(f, others)
	_, nss := guardBridge(f, b, victim, hostile)
	hns := nss[1]
	hns.Run(f, "ip", "addr", "add", hostile.IP.String()+"/16", "dev", "eth0")
	server := netip.MustParseAddr("10.10.0.1")

	seeds, _ := filepath.Glob("testdata/fuzz/FuzzHandle/*")
	for _, name := range seeds {
		body, err := os.ReadFile(name)
		if err != nil {
			f.Fatal(err)
		}
		_, lit, _ := strings.Cut(strings.TrimSpace(string(body)), "[]byte(")
		pkt, err := strconv.Unquote(strings.TrimSuffix(lit, ")"))
		if err != nil || len(pkt) < 240 {
			f.Fatalf("seed %s: %v", name, err)
		}
		f.Add([]byte(pkt)) // another VM's MAC from this port
		own := []byte(pkt)
		copy(own[28:34], hostile.MAC)
		f.Add(bytes.Clone(own)) // its own, as an honest VM would
		copy(own[24:28], []byte{224, 0, 0, 1})
		f.Add(own) // its own, relayed to a multicast group
	}
	f.Add([]byte{1, 1, 6, 0})

	var xid uint32
	f.Fuzz(func(t *testing.T, pkt []byte) {
		b.mu.Lock()
		from := len(b.all)
		b.mu.Unlock()
		if err := sendDHCP(hns, hostile.IP, server, pkt); err != nil {
			t.Fatal(err)
		}
		// A request of the port's own, after the packet on the same
		// path: once the server read it, it read the packet too, or
		// the guard dropped it. Repeated while the port's rate limit
		// holds it back.
		xid++
		var id dhcpv4.TransactionID
		binary.BigEndian.PutUint32(id[:], xid)
		marker, _ := dhcpv4.NewDiscovery(hostile.MAC, dhcpv4.WithTransactionID(id))
		deadline := time.Now().Add(10 * time.Second)
		for seen := false; !seen; {
			if time.Now().After(deadline) {
				t.Fatal("the marker never reached the server")
			}
			if err := sendDHCP(hns, hostile.IP, server, marker.ToBytes()); err != nil {
				t.Fatal(err)
			}
			time.Sleep(20 * time.Millisecond)
			b.mu.Lock()
			for _, p := range b.all[from:] {
				seen = seen || (len(p) >= 8 && binary.BigEndian.Uint32(p[4:]) == xid && bytes.Equal(p[28:34], hostile.MAC))
			}
			b.mu.Unlock()
			if !seen {
				time.Sleep(200 * time.Millisecond)
			}
		}
		b.mu.Lock()
		defer b.mu.Unlock()
		for _, p := range b.all[from:] {
			// Shorter than chaddr's end the server cannot parse it.
			if len(p) >= 34 && (!bytes.Equal(p[28:34], hostile.MAC) || binary.BigEndian.Uint32(p[24:]) != 0) {
				t.Fatalf("the server read from the port chaddr %s giaddr %v", net.HardwareAddr(p[28:34]), net.IP(p[24:28]))
			}
		}
		for _, a := range others[:3] {
			if l, ok := b.srv.Lease(a.MAC); ok {
				t.Fatalf("the neighbour %s has a lease %+v", a.MAC, l)
			}
		}
	})
}
