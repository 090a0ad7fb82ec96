package tailnettest

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"io"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	"tailscale.com/ipn/store/mem"
	"tailscale.com/tailcfg"
	"tailscale.com/tsnet"
)

const testCap tailcfg.PeerCapability = "example.com/cap/test"

type role struct {
	Role string `json:"role"`
}

// whois asks viewer who peer is.
func whois(t *testing.T, viewer, peer *tsnet.Server) (login string, tags []string, caps tailcfg.PeerCapMap) {
	t.Helper()
	lc, err := viewer.LocalClient()
	if err != nil {
		t.Fatal(err)
	}
	ip4, _ := peer.TailscaleIPs()
	res, err := lc.WhoIs(context.Background(), ip4.String())
	if err != nil {
		t.Fatalf("whois %s from %s: %v", peer.Hostname, viewer.Hostname, err)
	}
	if res.UserProfile != nil {
		login = res.UserProfile.LoginName
	}
	return login, res.Node.Tags, res.CapMap
}

// echo serves one line-echo listener on s's tailnet port 80.
func echo(t *testing.T, s *tsnet.Server) netip.AddrPort {
	t.Helper()
	ln, err := s.Listen("tcp", ":80")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				io.Copy(c, c)
			}()
		}
	}()
	ip4, _ := s.TailscaleIPs()
	return netip.AddrPortFrom(ip4, 80)
}

// roundTrip sends a line from client to addr over the tailnet and checks it
// comes back.
func roundTrip(t *testing.T, client *tsnet.Server, addr netip.AddrPort) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	c, err := client.Dial(ctx, "tcp", addr.String()) // a tailnet IP literal: never the host network
	if err != nil {
		t.Fatalf("dial %v from %s: %v", addr, client.Hostname, err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(30 * time.Second))
	if _, err := io.WriteString(c, "hello "+client.Hostname+"\n"); err != nil {
		t.Fatal(err)
	}
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil {
		t.Fatalf("read echo from %v: %v", addr, err)
	}
	if line != "hello "+client.Hostname+"\n" {
		t.Fatalf("echo = %q", line)
	}
}

func TestLoginsAndTags(t *testing.T) {
	tn := Start(t)
	nodes := tn.Nodes(t,
		NodeOptions{Hostname: "server"},
		NodeOptions{Hostname: "alice", User: "alice@example.com"},
		NodeOptions{Hostname: "alice2", User: "alice@example.com"},
		NodeOptions{Hostname: "ci", User: "bob@example.com", Tags: []string{"tag:ci"}},
		NodeOptions{Hostname: "plain"},
	)
	server, alice, alice2, ci, plain := nodes[0], nodes[1], nodes[2], nodes[3], nodes[4]

	for _, tc := range []struct {
		peer     *tsnet.Server
		login    string // or suffix, for testcontrol's generated logins
		tags     []string
		isSuffix bool
	}{
		{peer: alice, login: "alice@example.com"},
		{peer: alice2, login: "alice@example.com"},
		{peer: ci, login: "bob@example.com", tags: []string{"tag:ci"}},
		{peer: plain, login: "@fake-control.example.net", isSuffix: true},
	} {
		login, tags, _ := whois(t, server, tc.peer)
		okLogin := login == tc.login || (tc.isSuffix && strings.HasSuffix(login, tc.login))
		if !okLogin || !slices.Equal(tags, tc.tags) {
			t.Errorf("server sees %s as login %q tags %v; want %q %v", tc.peer.Hostname, login, tags, tc.login, tc.tags)
		}
	}
	// Other nodes see the same users, and a node sees its own user.
	if login, _, _ := whois(t, plain, alice); login != "alice@example.com" {
		t.Errorf("plain sees alice as %q", login)
	}
	lc, err := alice.LocalClient()
	if err != nil {
		t.Fatal(err)
	}
	st, err := lc.Status(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if got := st.User[st.Self.UserID].LoginName; got != "alice@example.com" {
		t.Errorf("alice sees herself as %q", got)
	}
}

func TestGrantPerSource(t *testing.T) {
	tn := Start(t)
	nodes := tn.Nodes(t,
		NodeOptions{Hostname: "server"},
		NodeOptions{Hostname: "alice", User: "alice@example.com"},
		NodeOptions{Hostname: "bob", User: "bob@example.com"},
		NodeOptions{Hostname: "carol", User: "carol@example.com"},
	)
	server, alice, bob, carol := nodes[0], nodes[1], nodes[2], nodes[3]
	addr := echo(t, server)

	tn.Grant(server, alice, testCap, role{"admin"})
	tn.Grant(server, bob, testCap, role{"viewer"}, role{"operator"})

	check := func(peer *tsnet.Server, want string) {
		t.Helper()
		_, _, caps := whois(t, server, peer)
		var got string
		if vals, ok := caps[testCap]; ok {
			var parts []string
			for _, v := range vals {
				var b bytes.Buffer
				if err := json.Compact(&b, []byte(v)); err != nil {
					t.Fatal(err)
				}
				parts = append(parts, b.String())
			}
			got = "[" + strings.Join(parts, ",") + "]"
		}
		if got != want {
			t.Errorf("server sees %s with %s = %s; want %s", peer.Hostname, testCap, got, want)
		}
	}
	check(alice, `[{"role":"admin"}]`)
	check(bob, `[{"role":"viewer"},{"role":"operator"}]`)
	check(carol, "")
	// Grants are per destination: alice gets nothing from bob.
	if _, _, caps := whois(t, bob, alice); caps[testCap] != nil {
		t.Errorf("bob sees alice with %v", caps)
	}

	// Traffic still flows on streams the Tailnet owns.
	roundTrip(t, alice, addr)
	roundTrip(t, carol, addr)

	tn.Revoke(server, alice, testCap)
	check(alice, "")
	check(bob, `[{"role":"viewer"},{"role":"operator"}]`)
	tn.Grant(server, bob, testCap, role{"admin"})
	check(bob, `[{"role":"admin"}]`)

	// A node joining later is seen, reachable, and can be granted.
	dave := tn.Node(t, NodeOptions{Hostname: "dave", User: "dave@example.com"})
	roundTrip(t, dave, addr)
	tn.Grant(server, dave, testCap, role{"viewer"})
	check(dave, `[{"role":"viewer"}]`)
	check(bob, `[{"role":"admin"}]`)
}

func TestSetTags(t *testing.T) {
	tn := Start(t)
	nodes := tn.Nodes(t,
		NodeOptions{Hostname: "server"},
		NodeOptions{Hostname: "alice", User: "alice@example.com"},
	)
	server, alice := nodes[0], nodes[1]
	addr := echo(t, server)

	tn.SetTags(alice, "tag:b", "tag:a")
	if _, tags, _ := whois(t, server, alice); !slices.Equal(tags, []string{"tag:a", "tag:b"}) {
		t.Errorf("tags = %v", tags)
	}
	roundTrip(t, alice, addr)
	tn.SetTags(alice)
	if login, tags, _ := whois(t, server, alice); len(tags) != 0 || login != "alice@example.com" {
		t.Errorf("after untagging: login %q tags %v", login, tags)
	}
}

func TestHostnameUnique(t *testing.T) {
	tn := Start(t)
	tn.Node(t, NodeOptions{Hostname: "a"})
	for _, opts := range [][]NodeOptions{
		{{Hostname: "a"}},
		{{Hostname: "b"}, {Hostname: "b"}},
	} {
		ft := &fatalRecorder{TB: t}
		func() {
			defer func() { recover() }()
			tn.Nodes(ft, opts...)
		}()
		if !ft.fatal {
			t.Errorf("Nodes(%v) accepted a hostname twice", opts)
		}
	}
	// Generated hostnames avoid chosen ones.
	tn.Node(t, NodeOptions{Hostname: "node1"})
	if s := tn.Node(t, NodeOptions{}); s.Hostname != "node2" {
		t.Errorf("generated hostname %q", s.Hostname)
	}
}

// fatalRecorder records Fatalf instead of ending the test.
type fatalRecorder struct {
	testing.TB
	fatal bool
}

func (f *fatalRecorder) Fatalf(format string, args ...any) {
	f.fatal = true
	panic("fatal")
}

func TestNodeStartedElsewhere(t *testing.T) {
	tn := Start(t)
	// A node the test builds itself, as an appliance under test does.
	ext := &tsnet.Server{
		Dir:        t.TempDir(),
		Store:      new(mem.Store),
		Hostname:   "appliance",
		ControlURL: tn.ControlURL,
		Ephemeral:  true,
		Logf:       tn.logs.logf("appliance: "),
		UserLogf:   tn.logs.logf("appliance: "),
	}
	t.Cleanup(func() { ext.Close() })
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if _, err := ext.Up(ctx); err != nil {
		t.Fatal(err)
	}
	addr := echo(t, ext)

	alice := tn.Node(t, NodeOptions{Hostname: "alice", User: "alice@example.com"})
	// Node returned only once the outside node was sent alice, so it knows
	// her now, without waiting.
	lc, err := ext.LocalClient()
	if err != nil {
		t.Fatal(err)
	}
	aliceIP, _ := alice.TailscaleIPs()
	res, err := lc.WhoIs(ctx, aliceIP.String())
	if err != nil || res.UserProfile.LoginName != "alice@example.com" {
		t.Fatalf("appliance: whois alice = %+v, %v", res, err)
	}
	roundTrip(t, alice, addr)
	tn.Grant(ext, alice, testCap, role{"admin"})
	if _, _, caps := whois(t, ext, alice); len(caps[testCap]) != 1 {
		t.Errorf("appliance sees alice with %v", caps)
	}
}
