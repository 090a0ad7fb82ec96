package tsauth

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"testing"
	"time"

	"github.com/threes-dev/threes/tsauth/tailnettest"
)

func TestTailnetDialerRefusesWithoutDialing(t *testing.T) {
	f := newFixture(t)
	alice := f.tn.Node(t, tailnettest.NodeOptions{Hostname: "alice", User: "alice@example.com"})

	// A loopback listener shows whether anything was dialed: connections
	// queue in accept order, so if the guard had connected, its connection
	// would be accepted before the marker connection made afterwards.
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	loopback := ln.Addr().String()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if c, err := TailnetDialer(alice)(ctx, "tcp", loopback); !errors.Is(err, ErrNotTailnet) {
		if c != nil {
			c.Close()
		}
		t.Fatalf("dial %s: %v; want ErrNotTailnet", loopback, err)
	}
	marker, err := net.Dial("tcp", loopback)
	if err != nil {
		t.Fatal(err)
	}
	defer marker.Close()
	first, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	first.Close()
	if first.RemoteAddr().String() != marker.LocalAddr().String() {
		t.Fatalf("the guard connected to %s (accepted %s before the marker %s)", loopback, first.RemoteAddr(), marker.LocalAddr())
	}

	// Everything else through a dial function that records instead of
	// dialing, so that a broken guard could not send anything anywhere.
	var dialed []string
	guard := dialGuard{
		check: tsnetCheck(alice),
		dial: func(ctx context.Context, network, addr string) (net.Conn, error) {
			dialed = append(dialed, addr)
			return nil, errors.New("recorded, not dialed")
		},
	}
	for _, tc := range []struct{ network, addr string }{
		{"tcp", "127.0.0.1:9999"},
		{"tcp", "10.10.0.1:9999"},
		{"udp", "10.10.0.1:67"},
		{"tcp", "[::1]:9999"},
		{"tcp", "[::ffff:10.10.0.1]:9999"},
		{"tcp", "192.168.1.1:80"},
		{"tcp", "100.115.92.1:80"},           // ChromeOS VM range inside the CGNAT block
		{"tcp", "100.64.99.99:9999"},         // tailnet range, but no such node
		{"tcp", "[fd7a:115c:a1e0::99]:9999"}, // tailnet ULA, no such node
		{"tcp", "server:9999"},               // names are never resolved
		{"tcp", "server.tailnet.test:9999"},
		{"tcp", "localhost:9999"},
		{"tcp", "10.10.0.1"}, // no port
	} {
		_, err := guard.dialContext(ctx, tc.network, tc.addr)
		if !errors.Is(err, ErrNotTailnet) {
			t.Errorf("dial %s %s: %v; want ErrNotTailnet", tc.network, tc.addr, err)
		}
	}
	ip4, _ := f.server.TailscaleIPs()
	if _, err := guard.dialContext(ctx, "unix", netip.AddrPortFrom(ip4, 9999).String()); err == nil {
		t.Error("a unix dial was accepted")
	}
	if len(dialed) > 0 {
		t.Fatalf("refused addresses were dialed: %v", dialed)
	}

	// The real dialer refuses non-tailnet addresses before it needs the
	// context: with a cancelled one the error is still ErrNotTailnet, and a
	// cancelled context stops s.Dial before it could dial anyway.
	cancelled, stop := context.WithCancel(context.Background())
	stop()
	for _, addr := range []string{"10.10.0.1:9999", "127.0.0.1:9999", "[::1]:9999"} {
		if _, err := TailnetDialer(alice)(cancelled, "tcp", addr); !errors.Is(err, ErrNotTailnet) {
			t.Errorf("dial %s: %v; want ErrNotTailnet", addr, err)
		}
	}

	// A known peer's tailnet addresses pass the guard.
	_, ip6 := f.server.TailscaleIPs()
	for _, ip := range []netip.Addr{ip4, ip6} {
		dialed = nil
		guard.dialContext(ctx, "tcp", netip.AddrPortFrom(ip, 9999).String())
		if len(dialed) != 1 {
			t.Errorf("peer address %v was not passed to dial", ip)
		}
	}
}

func TestTailnetDialerDialsPeer(t *testing.T) {
	f := newFixture(t)
	alice := f.tn.Node(t, tailnettest.NodeOptions{Hostname: "alice", User: "alice@example.com"})
	aliceIP, _ := alice.TailscaleIPs()
	// f.remote dials the server with TailnetDialer; the server must see
	// alice's tailnet address.
	if got := f.remote(t, alice); got.Addr() != aliceIP {
		t.Errorf("server saw %v; want alice %v", got, aliceIP)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	_, ip6 := f.server.TailscaleIPs()
	c, err := TailnetDialer(alice)(ctx, "tcp", netip.AddrPortFrom(ip6, f.port).String())
	if err != nil {
		t.Fatalf("dial server over IPv6: %v", err)
	}
	c.Close()
	select {
	case r := <-f.remotes:
		if _, aliceIP6 := alice.TailscaleIPs(); r.Addr() != aliceIP6 {
			t.Errorf("server saw %v; want alice %v", r, aliceIP6)
		}
	case <-ctx.Done():
		t.Fatal("server saw no IPv6 connection")
	}
}
