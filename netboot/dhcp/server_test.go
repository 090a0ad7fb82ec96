package dhcp

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"net"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
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

// capturingConn is a real loopback socket whose replies are recorded
// rather than sent: they go to broadcast or to VMs' addresses, which a
// test must not aim at. failWrites makes WriteTo fail as a full send
// queue would.
type capturingConn struct {
	net.PacketConn
	mu         sync.Mutex
	sent       []sentPacket
	failWrites bool
}

type sentPacket struct {
	dest netip.AddrPort
	pkt  *dhcpv4.DHCPv4
}

func (c *capturingConn) WriteTo(b []byte, addr net.Addr) (int, error) {
	p, err := dhcpv4.FromBytes(b)
	if err != nil {
		return 0, err
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.failWrites {
		return 0, errors.New("no buffer space available")
	}
	c.sent = append(c.sent, sentPacket{addr.(*net.UDPAddr).AddrPort(), p})
	return len(b), nil
}

func (c *capturingConn) replies() []sentPacket {
	c.mu.Lock()
	defer c.mu.Unlock()
	return slices.Clone(c.sent)
}

// TestServe runs the server's own loop on a real socket: each request it
// reads is answered by WriteTo to where Decide says (broadcast for a
// client with no address), requests that get no answer send nothing, a
// failed send is logged, Stats counts each ending by name, and closing
// the socket ends Serve with the error.
func TestServe(t *testing.T) {
	im, err := ipam.New(ipam.Config{}, []ipam.Allocation{{MAC: knownMAC, Hostname: "toy0", IP: vmIP}})
	if err != nil {
		t.Fatal(err)
	}
	raw, err := net.ListenPacket("udp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	conn := &capturingConn{PacketConn: raw}
	var logs bytes.Buffer
	var logMu sync.Mutex
	logged := func() string { logMu.Lock(); defer logMu.Unlock(); return logs.String() }
	s, err := NewServer(ServerConfig{Conn: conn, Reply: testCfg, IPAM: im,
		Log: slog.New(slog.NewTextHandler(lockedWriter{&logMu, &logs}, nil))})
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- s.Serve(context.Background()) }()
	client, err := net.Dial("udp4", raw.LocalAddr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer client.Close()
	send := func(p *dhcpv4.DHCPv4) {
		t.Helper()
		if _, err := client.Write(p.ToBytes()); err != nil {
			t.Fatal(err)
		}
	}
	waitCount := func(r Reason, n uint64) {
		t.Helper()
		netnstest.Eventually(t, 10*time.Second, fmt.Sprintf("%d packets ending %s", n, r), func() bool { return s.Count(r) == n })
	}

	send(packet(t, unknownMAC, dhcpv4.MessageTypeDiscover))
	waitCount(ReasonUnknownMAC, 1)
	send(packet(t, knownMAC, dhcpv4.MessageTypeDiscover))
	// Counted before it is sent: wait for the send.
	netnstest.Eventually(t, 10*time.Second, "a reply", func() bool { return len(conn.replies()) > 0 })
	got := conn.replies()
	if len(got) != 1 || got[0].pkt.MessageType() != dhcpv4.MessageTypeOffer || got[0].dest != netip.MustParseAddrPort("255.255.255.255:68") {
		t.Fatalf("after an unknown MAC's and a known MAC's DISCOVER the server sent %v, want one OFFER to broadcast", got)
	}
	if !got[0].pkt.YourIPAddr.Equal(vmIP.AsSlice()) {
		t.Errorf("OFFER of %s, want %s", got[0].pkt.YourIPAddr, vmIP)
	}

	conn.mu.Lock()
	conn.failWrites = true
	conn.mu.Unlock()
	send(packet(t, knownMAC, dhcpv4.MessageTypeDiscover))
	waitCount(ReasonOffer, 2)
	netnstest.Eventually(t, 10*time.Second, "the failed send logged", func() bool {
		return strings.Contains(logged(), "no buffer space available")
	})
	// One line, for the failed send only, naming where it went.
	if l := logged(); strings.Count(l, "dhcp send failed") != 1 || strings.Count(l, "\n") != 1 || !strings.Contains(l, "255.255.255.255:68") {
		t.Errorf("log:\n%s\nwant one line, for the failed send", l)
	}

	want := map[string]uint64{"unknown_mac": 1, "offer": 2}
	if st := s.Stats(); !maps.Equal(st, want) {
		t.Errorf("Stats = %v, want %v", st, want)
	}
	for _, r := range []Reason{-1, numReasons} {
		if n := s.Count(r); n != 0 {
			t.Errorf("Count(%d) = %d, want 0", r, n)
		}
	}

	s.Close()
	select {
	case err := <-done:
		if err == nil || !strings.Contains(err.Error(), "read dhcp socket") {
			t.Errorf("Serve after Close = %v, want the socket's error", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Serve did not end when its socket closed")
	}
}

type lockedWriter struct {
	mu *sync.Mutex
	w  io.Writer
}

func (l lockedWriter) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.w.Write(p)
}

// TestServeContextEnds checks that cancelling Serve's context ends it
// cleanly (nil, not the closed socket's error).
func TestServeContextEnds(t *testing.T) {
	s, _, _ := newTestServer(t, RateLimit{})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.Serve(ctx) }()
	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Errorf("Serve after cancel = %v, want nil", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Serve did not end with its context")
	}
}

// TestNewServer checks the configuration NewServer refuses, naming what is
// wrong, and that without Conn it opens the DHCP socket on the interface,
// with a receive queue of 4 MiB (root may go past rmem_max), or says
// which interface it could not.
func TestNewServer(t *testing.T) {
	im, err := ipam.New(ipam.Config{}, nil)
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		cfg  ServerConfig
		want string
	}{
		{ServerConfig{Reply: testCfg}, "no ipam"},
		{ServerConfig{IPAM: im, Reply: Config{Prefix: testCfg.Prefix}}, "server ip invalid"},
		{ServerConfig{IPAM: im, Reply: Config{ServerIP: netip.MustParseAddr("fe80::1"), Prefix: testCfg.Prefix}}, "server ip fe80::1"},
		{ServerConfig{IPAM: im, Reply: Config{ServerIP: serverIP}}, "prefix invalid"},
	} {
		if _, err := NewServer(c.cfg); err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("NewServer(%+v) = %v, want an error with %q", c.cfg, err, c.want)
		}
	}

	netnstest.Require(t)
	ns := netnstest.NewNS(t, "dhcpnew")
	ns.Run(t, "ip", "link", "add", "dhcp0", "type", "veth", "peer", "name", "dhcp1")
	var s *Server
	if err := ns.Do(func() (err error) {
		if _, err := NewServer(ServerConfig{Interface: "nosuchif0", IPAM: im, Reply: testCfg}); err == nil || !strings.Contains(err.Error(), "nosuchif0") {
			return fmt.Errorf("on a missing interface: %v, want an error naming it", err)
		}
		s, err = NewServer(ServerConfig{Interface: "dhcp0", IPAM: im, Reply: testCfg})
		return err
	}); err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if port := s.conn.LocalAddr().(*net.UDPAddr).Port; port != 67 {
		t.Errorf("socket on port %d, want 67", port)
	}
	raw, err := s.conn.(syscall.Conn).SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var rcvbuf int
	raw.Control(func(fd uintptr) { rcvbuf, err = syscall.GetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_RCVBUF) })
	// The kernel reports twice what was set.
	if err != nil || rcvbuf < 4<<20 {
		t.Errorf("receive buffer %d (%v), want at least 4 MiB", rcvbuf, err)
	}
}

// TestServerDefaults checks what a zero ServerConfig field means: the
// default rate limit (16 at once, then one every 100 ms), a one-minute
// DECLINE hold, a one-hour lease; and that DeclineHold and LeaseTime are
// honoured when set. Expiries are exact, from the injected clock.
func TestServerDefaults(t *testing.T) {
	im, err := ipam.New(ipam.Config{}, []ipam.Allocation{{MAC: knownMAC, Hostname: "toy0", IP: vmIP}})
	if err != nil {
		t.Fatal(err)
	}
	conn, err := net.ListenPacket("udp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	sid := dhcpv4.WithOption(dhcpv4.OptServerIdentifier(serverIP.AsSlice()))
	req := dhcpv4.WithOption(dhcpv4.OptRequestedIPAddress(vmIP.AsSlice()))
	discover := packet(t, knownMAC, dhcpv4.MessageTypeDiscover).ToBytes()
	request := packet(t, knownMAC, dhcpv4.MessageTypeRequest, sid, req).ToBytes()
	decline := packet(t, knownMAC, dhcpv4.MessageTypeDecline, sid, req).ToBytes()
	for _, c := range []struct {
		name                string
		leaseTime, hold     time.Duration
		wantLease, wantHold time.Duration
	}{
		{"defaults", 0, 0, time.Hour, time.Minute},
		{"set", 10 * time.Minute, 5 * time.Minute, 10 * time.Minute, 5 * time.Minute},
	} {
		t.Run(c.name, func(t *testing.T) {
			clk := &fakeClock{t: time.Unix(1_000_000, 0)}
			reply := testCfg
			reply.LeaseTime = c.leaseTime
			s, err := NewServer(ServerConfig{Conn: conn, Reply: reply, IPAM: im, Now: clk.now, DeclineHold: c.hold})
			if err != nil {
				t.Fatal(err)
			}
			s.Handle(request)
			if l, _ := s.Lease(knownMAC); l.State != StateBound || !l.Expires.Equal(clk.t.Add(c.wantLease)) {
				t.Errorf("lease %+v, want bound until %s", l, clk.t.Add(c.wantLease))
			}
			s.Handle(decline)
			if l, _ := s.Lease(knownMAC); l.State != StateDeclined || !l.Expires.Equal(clk.t.Add(c.wantHold)) {
				t.Errorf("lease %+v, want declined until %s", l, clk.t.Add(c.wantHold))
			}
			start := clk.t
			clk.t = start.Add(c.wantHold - time.Second)
			if _, _, r := s.Handle(discover); r != ReasonDeclined {
				t.Errorf("a second before the hold ends: %s, want %s", r, ReasonDeclined)
			}
			clk.t = start.Add(c.wantHold)
			if _, _, r := s.Handle(discover); r != ReasonOffer {
				t.Errorf("when the hold ends: %s, want %s", r, ReasonOffer)
			}
		})
	}

	t.Run("rate limit", func(t *testing.T) {
		clk := &fakeClock{t: time.Unix(1_000_000, 0)}
		s, err := NewServer(ServerConfig{Conn: conn, Reply: testCfg, IPAM: im, Now: clk.now})
		if err != nil {
			t.Fatal(err)
		}
		for i := range DefaultRateLimit.Burst {
			if _, _, r := s.Handle(discover); r != ReasonOffer {
				t.Fatalf("packet %d of the burst: %s", i, r)
			}
		}
		if _, _, r := s.Handle(discover); r != ReasonRateLimited {
			t.Fatalf("past the burst: %s", r)
		}
		clk.t = clk.t.Add(99 * time.Millisecond)
		if _, _, r := s.Handle(discover); r != ReasonRateLimited {
			t.Fatalf("99 ms later: %s", r)
		}
		clk.t = clk.t.Add(time.Millisecond)
		if _, _, r := s.Handle(discover); r != ReasonOffer {
			t.Fatalf("100 ms later: %s", r)
		}
	})
}

// TestRateLimitEdges checks the two edges of RateLimit: a zero Burst does
// not limit at all, and a zero Every earns nothing back, ever (pruning
// does not hand such a bucket a fresh burst either).
func TestRateLimitEdges(t *testing.T) {
	discover := packet(t, knownMAC, dhcpv4.MessageTypeDiscover).ToBytes()
	s, _, clk := newTestServer(t, RateLimit{Burst: 0, Every: time.Second})
	for i := range 50 {
		if _, _, r := s.Handle(discover); r != ReasonOffer {
			t.Fatalf("Burst 0, packet %d: %s", i, r)
		}
	}
	s, _, clk = newTestServer(t, RateLimit{Burst: 2, Every: 0})
	for i := range 2 {
		if _, _, r := s.Handle(discover); r != ReasonOffer {
			t.Fatalf("Every 0, packet %d: %s", i, r)
		}
	}
	clk.t = clk.t.Add(time.Hour)
	s.prune(clk.t)
	if _, _, r := s.Handle(discover); r != ReasonRateLimited {
		t.Fatalf("Every 0, an hour and a prune later: %s, want %s", r, ReasonRateLimited)
	}
}

// TestPruneBuckets checks which rate buckets a prune drops: one that has
// just refilled to its burst goes, one a token short stays, and a MAC
// with a bucket but no lease (its requests were all NAKed) is handled.
func TestPruneBuckets(t *testing.T) {
	s, _, clk := newTestServer(t, RateLimit{Burst: 3, Every: time.Second})
	wrong := packet(t, knownMAC, dhcpv4.MessageTypeRequest, dhcpv4.WithOption(dhcpv4.OptRequestedIPAddress(otherIP.AsSlice()))).ToBytes()
	if _, _, r := s.Handle(wrong); r != ReasonNakWrongAddress {
		t.Fatalf("request for another address: %s", r)
	}
	if _, ok := s.Lease(knownMAC); ok {
		t.Fatal("a NAK made a lease")
	}
	has := func() bool {
		s.mu.Lock()
		defer s.mu.Unlock()
		return s.bucket[ipam.MACKey(knownMAC)] != nil
	}
	start := clk.t
	s.prune(start.Add(time.Second - time.Millisecond))
	if !has() {
		t.Error("a bucket short of its burst was pruned")
	}
	s.prune(start.Add(time.Second))
	if has() {
		t.Error("a bucket back at its burst was kept")
	}
}

// TestForget checks that Forget drops a MAC's lease and its rate limit,
// and ignores what is not a MAC.
func TestForget(t *testing.T) {
	s, _, _ := newTestServer(t, RateLimit{Burst: 1, Every: time.Hour})
	discover := packet(t, knownMAC, dhcpv4.MessageTypeDiscover).ToBytes()
	s.Handle(discover)
	if _, _, r := s.Handle(discover); r != ReasonRateLimited {
		t.Fatalf("second packet: %s", r)
	}
	s.Forget(knownMAC[:3])
	if _, ok := s.Lease(knownMAC); !ok {
		t.Fatal("Forget of a 3-byte address dropped the lease")
	}
	s.Forget(knownMAC)
	if l, ok := s.Lease(knownMAC); ok {
		t.Errorf("after Forget the lease is %+v", l)
	}
	if _, _, r := s.Handle(discover); r != ReasonOffer {
		t.Errorf("after Forget: %s, want a fresh bucket", r)
	}
	if _, ok := s.Lease(knownMAC[:5]); ok {
		t.Error("Lease of a 5-byte address")
	}
}

// TestLeaseStateNames checks the states' names, and that the zero
// LeaseState is none of them.
func TestLeaseStateNames(t *testing.T) {
	for st, want := range map[LeaseState]string{0: "none", StateOffered: "offered", StateBound: "bound", StateReleased: "released", StateDeclined: "declined", 9: "none"} {
		if got := st.String(); got != want {
			t.Errorf("LeaseState(%d) = %q, want %q", st, got, want)
		}
	}
}

// TestSourceFilter runs the server on a bridge as the appliance does (its
// own socket) with a port that is not the client's and has no guard: its
// DECLINEs for other clients never reach the server, whether the MAC they
// carry differs from the port's in its first four bytes or its last two,
// while a relayed request from it does (and is refused as relayed), and the
// client's own DISCOVER is answered.
func TestSourceFilter(t *testing.T) {
	netnstest.Require(t)
	other := net.HardwareAddr{0x02, 0x99, 0x99, 0x99, 0x00, 0x77} // the port's last two bytes
	im, err := ipam.New(ipam.Config{}, []ipam.Allocation{
		{MAC: knownMAC, Hostname: "toy0", IP: vmIP},
		{MAC: other, Hostname: "toy1", IP: otherIP},
	})
	if err != nil {
		t.Fatal(err)
	}
	ns := netnstest.NewNS(t, "dhcpsrc")
	ns.Bridge(t, "br-src", "10.10.0.1/16")
	var s *Server
	if err := ns.Do(func() (err error) {
		s, err = NewServer(ServerConfig{Interface: "br-src", IPAM: im, Reply: testCfg})
		return err
	}); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.Serve(ctx) }()
	defer func() { cancel(); <-done }()

	portMAC := net.HardwareAddr{0x52, 0x54, 0x00, 0x00, 0x00, 0x77} // knownMAC's first four bytes
	port := ns.Plug(t, "br-src", "srcp", portMAC, "10.10.200.2/16")
	client := ns.Plug(t, "br-src", "srcc", knownMAC, vmIP.String()+"/16")
	from, bcast := netip.MustParseAddr("10.10.200.2"), netip.MustParseAddr("255.255.255.255")
	sid := dhcpv4.WithOption(dhcpv4.OptServerIdentifier(serverIP.AsSlice()))
	for _, victim := range []struct {
		mac net.HardwareAddr
		ip  netip.Addr
	}{{knownMAC, vmIP}, {other, otherIP}} {
		p := packet(t, victim.mac, dhcpv4.MessageTypeDecline, sid, dhcpv4.WithOption(dhcpv4.OptRequestedIPAddress(victim.ip.AsSlice())))
		if err := sendDHCP(port, from, bcast, p.ToBytes()); err != nil {
			t.Fatal(err)
		}
	}
	relayed := packet(t, knownMAC, dhcpv4.MessageTypeDiscover, dhcpv4.WithRelay(from.AsSlice()))
	if err := sendDHCP(port, from, bcast, relayed.ToBytes()); err != nil {
		t.Fatal(err)
	}
	netnstest.Eventually(t, 10*time.Second, "the relayed request", func() bool { return s.Count(ReasonRelayed) == 1 })
	// The client's own.
	if err := sendDHCP(client, vmIP, bcast, packet(t, knownMAC, dhcpv4.MessageTypeDiscover).ToBytes()); err != nil {
		t.Fatal(err)
	}
	netnstest.Eventually(t, 10*time.Second, "the client's DISCOVER read", func() bool {
		return s.Count(ReasonOffer)+s.Count(ReasonDeclined) == 1
	})
	if st, want := s.Stats(), map[string]uint64{"relayed": 1, "offer": 1}; !maps.Equal(st, want) {
		t.Errorf("the server read %v, want only %v: a spoofed DECLINE got through", st, want)
	}
	for _, mac := range []net.HardwareAddr{knownMAC, other} {
		if l, _ := s.Lease(mac); l.State == StateDeclined {
			t.Errorf("%s declined by another port", mac)
		}
	}
}
