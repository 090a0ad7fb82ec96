package dhcp

import (
	"context"
	"net"
	"net/netip"
	"sync/atomic"
	"testing"
	"time"

	"github.com/insomniacslk/dhcp/dhcpv4"

	"github.com/threes-dev/threes/internal/netnstest"
	"github.com/threes-dev/threes/netboot/ipam"
)

// fakeClock is an injected clock that only moves when told.
type fakeClock struct{ t time.Time }

func (c *fakeClock) now() time.Time { return c.t }

func newTestServer(t testing.TB, rl RateLimit) (*Server, *ipam.IPAM, *fakeClock) {
	t.Helper()
	im, err := ipam.New(ipam.Config{}, []ipam.Allocation{
		{MAC: knownMAC, Hostname: "toy0", IP: vmIP},
		{MAC: declMAC, Hostname: "pending", IP: otherIP, Pending: true},
	})
	if err != nil {
		t.Fatal(err)
	}
	clk := &fakeClock{t: time.Unix(1_000_000, 0)}
	// Conn is a closed-over loopback socket: Handle never touches it.
	conn, err := net.ListenPacket("udp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	// Relays on: several tests speak through one, as a relay agent would.
	s, err := NewServer(ServerConfig{Conn: conn, Reply: testCfg, IPAM: im, RateLimit: rl, Now: clk.now, Relays: true})
	if err != nil {
		t.Fatal(err)
	}
	return s, im, clk
}

func TestServerLeaseStates(t *testing.T) {
	s, _, clk := newTestServer(t, RateLimit{})
	sid := dhcpv4.WithOption(dhcpv4.OptServerIdentifier(serverIP.AsSlice()))
	req := dhcpv4.WithOption(dhcpv4.OptRequestedIPAddress(vmIP.AsSlice()))
	steps := []struct {
		pkt    *dhcpv4.DHCPv4
		reason Reason
		state  LeaseState
	}{
		{packet(t, knownMAC, dhcpv4.MessageTypeDiscover), ReasonOffer, StateOffered},
		{packet(t, knownMAC, dhcpv4.MessageTypeRequest, sid, req), ReasonAckSelecting, StateBound},
		{packet(t, knownMAC, dhcpv4.MessageTypeRelease, dhcpv4.WithClientIP(vmIP.AsSlice()), sid), ReasonRelease, StateReleased},
		{packet(t, knownMAC, dhcpv4.MessageTypeDecline, req, sid), ReasonDecline, StateDeclined},
		{packet(t, knownMAC, dhcpv4.MessageTypeDiscover), ReasonDeclined, StateDeclined},
	}
	for i, st := range steps {
		out, _, reason := s.Handle(st.pkt.ToBytes())
		if reason != st.reason {
			t.Fatalf("step %d: reason %s, want %s", i, reason, st.reason)
		}
		if (out != nil) != (st.reason == ReasonOffer || st.reason == ReasonAckSelecting) {
			t.Fatalf("step %d: reply %v", i, out != nil)
		}
		l, ok := s.Lease(knownMAC)
		if !ok || l.State != st.state || l.IP != vmIP {
			t.Fatalf("step %d: lease %+v, want %s", i, l, st.state)
		}
	}
	// After the hold the address is offered again.
	clk.t = clk.t.Add(2 * time.Minute)
	if _, _, reason := s.Handle(steps[0].pkt.ToBytes()); reason != ReasonOffer {
		t.Fatalf("after decline hold: %s", reason)
	}
}

func TestServerIgnoresUnknownAndPending(t *testing.T) {
	s, im, _ := newTestServer(t, RateLimit{})
	for _, mac := range []net.HardwareAddr{unknownMAC, declMAC} {
		out, _, reason := s.Handle(packet(t, mac, dhcpv4.MessageTypeDiscover).ToBytes())
		if out != nil || reason != ReasonUnknownMAC {
			t.Fatalf("%s: reason %s, reply %v", mac, reason, out != nil)
		}
	}
	if got := s.Count(ReasonUnknownMAC); got != 2 {
		t.Fatalf("unknown counted %d, want 2", got)
	}
	// Once committed, the pending VM is served.
	if err := im.Commit(declMAC); err != nil {
		t.Fatal(err)
	}
	if _, _, reason := s.Handle(packet(t, declMAC, dhcpv4.MessageTypeDiscover).ToBytes()); reason != ReasonOffer {
		t.Fatalf("committed: %s", reason)
	}
	if _, _, reason := s.Handle([]byte{1, 2, 3}); reason != ReasonUnparsable {
		t.Fatalf("garbage: %s", reason)
	}
}

func TestServerRateLimitPerMAC(t *testing.T) {
	s, im, clk := newTestServer(t, RateLimit{Burst: 3, Every: time.Second})
	second := net.HardwareAddr{0x52, 0x54, 0, 0, 0, 3}
	if _, err := im.Reserve(second, "b"); err != nil {
		t.Fatal(err)
	}
	if err := im.Commit(second); err != nil {
		t.Fatal(err)
	}
	// Both come through the same relay, i.e. the same source address.
	relay := dhcpv4.WithRelay(relayIP.AsSlice())
	flood := packet(t, knownMAC, dhcpv4.MessageTypeDiscover, relay).ToBytes()
	for i := range 3 {
		if _, _, r := s.Handle(flood); r != ReasonOffer {
			t.Fatalf("packet %d within burst: %s", i, r)
		}
	}
	if _, _, r := s.Handle(flood); r != ReasonRateLimited {
		t.Fatalf("packet past burst: %s", r)
	}
	if _, _, r := s.Handle(packet(t, second, dhcpv4.MessageTypeDiscover, relay).ToBytes()); r != ReasonOffer {
		t.Fatalf("another mac behind the same relay: %s", r)
	}
	clk.t = clk.t.Add(time.Second)
	if _, _, r := s.Handle(flood); r != ReasonOffer {
		t.Fatalf("after refill: %s", r)
	}
	if _, _, r := s.Handle(flood); r != ReasonRateLimited {
		t.Fatalf("one token earned, second packet: %s", r)
	}
}

// TestServerRelays checks that a relayed packet (giaddr set) gets no
// answer unless relays are on: on a bridge any VM can claim to be a relay
// and have the reply sent to another VM, to broadcast or to a multicast
// group.
func TestServerRelays(t *testing.T) {
	s, _, _ := newTestServer(t, RateLimit{})
	s.cfg.Relays = false
	for _, gi := range []net.IP{relayIP.AsSlice(), net.IPv4bcast, net.IPv4(224, 0, 0, 1), vmIP.AsSlice()} {
		pkt := packet(t, knownMAC, dhcpv4.MessageTypeDiscover, dhcpv4.WithRelay(gi)).ToBytes()
		if out, dest, r := s.Handle(pkt); out != nil || r != ReasonRelayed {
			t.Errorf("relayed via %s, relays off: reply to %v, reason %s", gi, dest, r)
		}
	}
	if got := s.Count(ReasonRelayed); got != 4 {
		t.Errorf("relayed counted %d, want 4", got)
	}
	if _, ok := s.Lease(knownMAC); ok {
		t.Error("a relayed packet made a lease with relays off")
	}
	// The client itself is still served.
	if _, _, r := s.Handle(packet(t, knownMAC, dhcpv4.MessageTypeDiscover).ToBytes()); r != ReasonOffer {
		t.Errorf("direct discover: %s", r)
	}
	s.cfg.Relays = true
	pkt := packet(t, knownMAC, dhcpv4.MessageTypeDiscover, dhcpv4.WithRelay(relayIP.AsSlice())).ToBytes()
	if out, dest, r := s.Handle(pkt); out == nil || r != ReasonOffer || dest.Addr() != relayIP {
		t.Errorf("relayed, relays on: reply to %v, reason %s", dest, r)
	}
}

// TestServerPrunes checks that Serve drops the lease and rate bucket of a
// MAC the IPAM no longer holds, as after its VM is purged, and buckets
// that refilled, while a live lease stays.
func TestServerPrunes(t *testing.T) {
	s, im, clk := newTestServer(t, RateLimit{Burst: 3, Every: time.Second})
	purged := net.HardwareAddr{0x52, 0x54, 0, 0, 0, 9}
	if _, err := im.Reserve(purged, "purged"); err != nil {
		t.Fatal(err)
	}
	if err := im.Commit(purged); err != nil {
		t.Fatal(err)
	}
	for _, mac := range []net.HardwareAddr{knownMAC, purged} {
		if _, _, r := s.Handle(packet(t, mac, dhcpv4.MessageTypeDiscover).ToBytes()); r != ReasonOffer {
			t.Fatalf("discover from %s: %s", mac, r)
		}
	}
	if err := im.Release(purged); err != nil {
		t.Fatal(err)
	}
	s.pruneEvery = 10 * time.Millisecond
	// Serve's pruning reads the clock from its own goroutine.
	var now atomic.Int64
	now.Store(clk.t.UnixNano())
	s.cfg.Now = func() time.Time { return time.Unix(0, now.Load()) }
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.Serve(ctx) }()
	defer func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("serve: %v", err)
		}
	}()
	gone := func(mac net.HardwareAddr) bool {
		s.mu.Lock()
		defer s.mu.Unlock()
		k := ipam.MACKey(mac)
		return s.leases[k] == nil && s.bucket[k] == nil
	}
	netnstest.Eventually(t, 10*time.Second, "the purged VM's state to go", func() bool { return gone(purged) })
	if _, ok := s.Lease(knownMAC); !ok {
		t.Error("a live VM's lease was pruned")
	}
	s.mu.Lock()
	_, hasBucket := s.bucket[ipam.MACKey(knownMAC)]
	s.mu.Unlock()
	if !hasBucket {
		t.Error("a bucket that has not refilled was pruned")
	}
	// Once refilled, the live VM's bucket goes too.
	now.Add(int64(time.Minute))
	netnstest.Eventually(t, 10*time.Second, "the refilled bucket to go", func() bool {
		s.mu.Lock()
		defer s.mu.Unlock()
		return s.bucket[ipam.MACKey(knownMAC)] == nil
	})
}

// BenchmarkHandle measures a DISCOVER and a REQUEST through the whole shell
// without the socket: parse, decide, lease table, marshal.
func BenchmarkHandle(b *testing.B) {
	s, im, _ := newTestServer(b, RateLimit{Burst: -1})
	const n = 10000
	pkts := make([][2][]byte, n)
	for i := range n {
		mac := net.HardwareAddr{0x02, 0, 0, byte(i >> 16), byte(i >> 8), byte(i)}
		a, err := im.Reserve(mac, "")
		if err != nil {
			b.Fatal(err)
		}
		im.Commit(mac)
		d, _ := dhcpv4.NewDiscovery(mac, dhcpv4.WithRelay(relayIP.AsSlice()))
		r, _ := dhcpv4.New(dhcpv4.WithHwAddr(mac), dhcpv4.WithMessageType(dhcpv4.MessageTypeRequest),
			dhcpv4.WithRelay(relayIP.AsSlice()),
			dhcpv4.WithOption(dhcpv4.OptServerIdentifier(serverIP.AsSlice())),
			dhcpv4.WithOption(dhcpv4.OptRequestedIPAddress(a.IP.AsSlice())))
		pkts[i] = [2][]byte{d.ToBytes(), r.ToBytes()}
	}
	i := 0
	for b.Loop() {
		p := pkts[i%n]
		i++
		if _, _, r := s.Handle(p[0]); r != ReasonOffer {
			b.Fatal(r)
		}
		if _, _, r := s.Handle(p[1]); r != ReasonAckSelecting {
			b.Fatal(r)
		}
	}
}

// TestServerOnAck: the hook hears each ACK, with the client's MAC and address, and
// nothing else (no OFFER, no NAK, no release).
func TestServerOnAck(t *testing.T) {
	s, _, clk := newTestServer(t, RateLimit{})
	type ack struct {
		mac string
		ip  netip.Addr
		at  time.Time
	}
	var got []ack
	s.cfg.OnAck = func(mac net.HardwareAddr, ip netip.Addr, at time.Time) { got = append(got, ack{mac.String(), ip, at}) }
	sid := dhcpv4.WithOption(dhcpv4.OptServerIdentifier(serverIP.AsSlice()))
	req := dhcpv4.WithOption(dhcpv4.OptRequestedIPAddress(vmIP.AsSlice()))
	wrong := dhcpv4.WithOption(dhcpv4.OptRequestedIPAddress(otherIP.AsSlice()))
	for i, p := range []*dhcpv4.DHCPv4{
		packet(t, knownMAC, dhcpv4.MessageTypeDiscover),
		packet(t, knownMAC, dhcpv4.MessageTypeRequest, sid, wrong), // NAK
		packet(t, knownMAC, dhcpv4.MessageTypeRequest, sid, req),   // ACK
		packet(t, declMAC, dhcpv4.MessageTypeRequest, sid, req),    // pending: ignored
		packet(t, knownMAC, dhcpv4.MessageTypeRelease, dhcpv4.WithClientIP(vmIP.AsSlice()), sid),
	} {
		if i == 2 {
			clk.t = clk.t.Add(time.Second)
		}
		s.Handle(p.ToBytes())
	}
	want := []ack{{knownMAC.String(), vmIP, clk.t}}
	if len(got) != 1 || got[0] != want[0] {
		t.Fatalf("OnAck heard %+v, want %+v", got, want)
	}
}
