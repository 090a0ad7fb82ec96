package tsauth

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"tailscale.com/client/local"
	"tailscale.com/client/tailscale/apitype"
	"tailscale.com/ipn"
	"tailscale.com/tailcfg"
	"tailscale.com/tsnet"
	"tailscale.com/types/empty"
	"tailscale.com/types/key"
	"tailscale.com/types/netmap"

	"github.com/threes-dev/threes/tsauth/tailnettest"
)

// countingWhoIs wraps the server's real local client and counts WhoIs calls.
type countingWhoIs struct {
	lc *local.Client
	n  atomic.Int64
}

func (c *countingWhoIs) WhoIs(ctx context.Context, addr string) (*apitype.WhoIsResponse, error) {
	c.n.Add(1)
	return c.lc.WhoIs(ctx, addr)
}

// fakeClock is a clock that moves only when told to.
type fakeClock struct {
	mu  sync.Mutex
	now time.Time
}

func newFakeClock() *fakeClock { return &fakeClock{now: time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)} }

func (c *fakeClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

func (c *fakeClock) Advance(d time.Duration) {
	c.mu.Lock()
	c.now = c.now.Add(d)
	c.mu.Unlock()
}

// fixture is a tailnet with a "server" node that accepts connections on
// tailnet port 9999 and reports where each came from, as a gRPC server would
// see its callers.
type fixture struct {
	tn      *tailnettest.Tailnet
	server  *tsnet.Server
	lc      *local.Client
	whois   *countingWhoIs
	port    uint16
	remotes chan netip.AddrPort
}

func newFixture(t testing.TB) *fixture {
	t.Helper()
	tn := tailnettest.Start(t)
	server := tn.Node(t, tailnettest.NodeOptions{Hostname: "server"})
	lc, err := server.LocalClient()
	if err != nil {
		t.Fatal(err)
	}
	f := &fixture{tn: tn, server: server, lc: lc, whois: &countingWhoIs{lc: lc}, port: 9999, remotes: make(chan netip.AddrPort, 16)}
	ln, err := server.Listen("tcp", ":9999")
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
			f.remotes <- c.RemoteAddr().(*net.TCPAddr).AddrPort()
			c.Close()
		}
	}()
	return f
}

// remote connects from client to the server over the tailnet and returns the
// caller address the server saw.
func (f *fixture) remote(t testing.TB, client *tsnet.Server) netip.AddrPort {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	ip4, _ := f.server.TailscaleIPs()
	c, err := TailnetDialer(client)(ctx, "tcp", netip.AddrPortFrom(ip4, f.port).String())
	if err != nil {
		t.Fatalf("dial server from %s: %v", client.Hostname, err)
	}
	defer c.Close()
	select {
	case r := <-f.remotes:
		return r
	case <-ctx.Done():
		t.Fatalf("server saw no connection from %s", client.Hostname)
		return netip.AddrPort{}
	}
}

// watch runs id.Watch on the server until the test ends and returns once the
// watch is established (its first notification invalidates the cache).
func (f *fixture) watch(t testing.TB, id *Identifier) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- id.Watch(ctx, f.lc) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Watch: %v", err)
		}
	})
	waitFor(t, "watch to start", func() bool { return id.invalidations.Load() > 0 })
}

// waitFor polls cond until it is true or 30 s have passed.
func waitFor(t testing.TB, what string, cond func() bool) {
	t.Helper()
	deadline := time.NewTimer(30 * time.Second)
	defer deadline.Stop()
	tick := time.NewTicker(5 * time.Millisecond)
	defer tick.Stop()
	for !cond() {
		select {
		case <-deadline.C:
			t.Fatalf("timed out waiting for %s", what)
		case <-tick.C:
		}
	}
}

func identify(t testing.TB, id *Identifier, remote netip.AddrPort) Principal {
	t.Helper()
	p, err := id.Identify(context.Background(), remote)
	if err != nil {
		t.Fatalf("Identify(%v): %v", remote, err)
	}
	return p
}

func grant(role string) map[string]string { return map[string]string{"role": role} }

func TestIdentifyUsersAndTags(t *testing.T) {
	f := newFixture(t)
	nodes := f.tn.Nodes(t,
		tailnettest.NodeOptions{Hostname: "alice", User: "alice@example.com"},
		// testcontrol keeps bob as the user of his tagged node; the tags win.
		tailnettest.NodeOptions{Hostname: "ci", User: "bob@example.com", Tags: []string{"tag:ci", "tag:build"}},
		tailnettest.NodeOptions{Hostname: "plain"},
	)
	alice, ci, plain := nodes[0], nodes[1], nodes[2]
	id := NewIdentifier(f.whois)
	f.watch(t, id)

	ra := f.remote(t, alice)
	p := identify(t, id, ra)
	aliceIP, _ := alice.TailscaleIPs()
	if p.Login != "alice@example.com" || len(p.Tags) != 0 || p.Node != "alice.tailnet.test" ||
		p.NodeID == "" || p.Addr != aliceIP || p.Role != RoleNone || p.Local || p.String() != "alice@example.com" {
		t.Errorf("alice = %+v", p)
	}

	p = identify(t, id, f.remote(t, ci))
	if p.Login != "" || !slices.Equal(p.Tags, []string{"tag:build", "tag:ci"}) || p.Node != "ci.tailnet.test" ||
		p.String() != "tag:build,tag:ci" {
		t.Errorf("ci = %+v", p)
	}
	// The caller's copy of Tags is its own.
	p.Tags[0] = "tag:changed"
	if p := identify(t, id, f.remote(t, ci)); p.Tags[0] != "tag:build" {
		t.Errorf("changing a returned Tags slice changed the cache: %v", p.Tags)
	}

	if p := identify(t, id, f.remote(t, plain)); p.Login == "" || p.IsTagged() {
		t.Errorf("plain = %+v", p)
	}

	// An IPv6 tailnet address is the same node.
	_, aliceIP6 := alice.TailscaleIPs()
	if p := identify(t, id, netip.AddrPortFrom(aliceIP6, 1)); p.Login != "alice@example.com" {
		t.Errorf("alice by IPv6 = %+v", p)
	}

	for _, addr := range []string{"100.64.99.99:1234", "127.0.0.1:1234", "10.10.0.1:1234"} {
		_, err := id.Identify(context.Background(), netip.MustParseAddrPort(addr))
		if !errors.Is(err, ErrUnknownPeer) {
			t.Errorf("Identify(%s) error = %v; want ErrUnknownPeer", addr, err)
		}
	}
	if _, err := id.Identify(context.Background(), netip.AddrPort{}); err == nil {
		t.Error("Identify of the zero address succeeded")
	}
}

func TestIdentifyRoles(t *testing.T) {
	f := newFixture(t)
	opts := []tailnettest.NodeOptions{
		{Hostname: "alice", User: "alice@example.com"},
		{Hostname: "bob", User: "bob@example.com"},
		{Hostname: "carol", User: "carol@example.com"},
		{Hostname: "dave", User: "dave@example.com"},
		{Hostname: "erin", User: "erin@example.com"},
		{Hostname: "ci", Tags: []string{"tag:ci"}},
	}
	nodes := f.tn.Nodes(t, opts...)
	alice, bob, carol, dave, erin, ci := nodes[0], nodes[1], nodes[2], nodes[3], nodes[4], nodes[5]
	f.tn.Grant(f.server, alice, Capability, grant("admin"))
	f.tn.Grant(f.server, bob, Capability, grant("viewer"), grant("operator"))
	f.tn.Grant(f.server, dave, Capability, "admin")        // not an object
	f.tn.Grant(f.server, erin, Capability, grant("owner")) // no such role
	f.tn.Grant(f.server, ci, Capability, grant("operator"))
	// carol has no grant.

	id := NewIdentifier(f.whois)
	f.watch(t, id)
	for _, tc := range []struct {
		node    *tsnet.Server
		want    Role
		wantErr error
	}{
		{node: alice, want: RoleAdmin},
		{node: bob, want: RoleOperator},
		{node: carol, want: RoleNone},
		{node: ci, want: RoleOperator},
		{node: dave, wantErr: ErrMalformedGrant},
		{node: erin, wantErr: ErrUnknownRole},
	} {
		p, err := id.Identify(context.Background(), f.remote(t, tc.node))
		if tc.wantErr != nil {
			if !errors.Is(err, tc.wantErr) {
				t.Errorf("%s: Identify = %+v, %v; want error %v", tc.node.Hostname, p, err, tc.wantErr)
			}
			continue
		}
		if err != nil || p.Role != tc.want {
			t.Errorf("%s: Identify = %+v, %v; want role %v", tc.node.Hostname, p, err, tc.want)
		}
	}
}

// cacheCheck measures WhoIs calls against cache invalidations: with a clock
// that does not move, every WhoIs beyond the first per address needs an
// invalidation since the previous one.
type cacheCheck struct {
	f        *fixture
	id       *Identifier
	calls    int64
	invalids uint64
	at       time.Time
}

func (f *fixture) cacheCheck(id *Identifier) *cacheCheck {
	return &cacheCheck{f: f, id: id, calls: f.whois.n.Load(), invalids: id.invalidations.Load(), at: time.Now()}
}

// since returns the WhoIs calls and invalidations since c was made.
func (c *cacheCheck) since() (calls int64, invalids uint64) {
	return c.f.whois.n.Load() - c.calls, c.id.invalidations.Load() - c.invalids
}

func TestIdentifyNoticesTagChange(t *testing.T) {
	f := newFixture(t)
	alice := f.tn.Node(t, tailnettest.NodeOptions{Hostname: "alice", User: "alice@example.com"})
	clock := newFakeClock() // never moves: only the IPN bus watch can expire entries
	id := NewIdentifier(f.whois, WithClock(clock.Now))
	f.watch(t, id)
	remote := f.remote(t, alice)

	// The first lookup's WhoIs is the one allowed; an invalidation that races
	// it (a late bus notification) leaves the cache cold, and counts.
	c := f.cacheCheck(id)
	if p := identify(t, id, remote); p.Login != "alice@example.com" {
		t.Fatalf("alice = %+v", p)
	}
	for range 200 {
		identify(t, id, remote)
	}
	if calls, invalids := c.since(); calls > 1+int64(invalids) {
		t.Errorf("201 repeated Identify calls made %d WhoIs calls with %d invalidations", calls, invalids)
	}

	c = f.cacheCheck(id)
	f.tn.SetTags(alice, "tag:ci")
	var p Principal
	polls := 0
	waitFor(t, "Identify to see the new tag", func() bool {
		polls++
		p = identify(t, id, remote)
		return p.IsTagged()
	})
	if p.Login != "" || !slices.Equal(p.Tags, []string{"tag:ci"}) {
		t.Errorf("after tagging: %+v", p)
	}
	calls, invalids := c.since()
	t.Logf("tag change seen after %d polls, %d WhoIs calls, %d invalidations", polls, calls, invalids)
	if calls > int64(invalids) {
		t.Errorf("%d WhoIs calls with only %d invalidations", calls, invalids)
	}

	f.tn.SetTags(alice)
	waitFor(t, "Identify to see the tag removed", func() bool {
		p = identify(t, id, remote)
		return !p.IsTagged()
	})
	if p.Login != "alice@example.com" {
		t.Errorf("after untagging: %+v", p)
	}
}

func TestIdentifyNoticesGrantChange(t *testing.T) {
	f := newFixture(t)
	alice := f.tn.Node(t, tailnettest.NodeOptions{Hostname: "alice", User: "alice@example.com"})
	f.tn.Grant(f.server, alice, Capability, grant("viewer"))
	id := NewIdentifier(f.whois) // real clock, DefaultMaxAge
	f.watch(t, id)
	remote := f.remote(t, alice)
	if p := identify(t, id, remote); p.Role != RoleViewer {
		t.Fatalf("alice = %+v", p)
	}

	for _, step := range []struct {
		change func()
		want   Role
	}{
		{func() { f.tn.Grant(f.server, alice, Capability, grant("admin")) }, RoleAdmin},
		{func() { f.tn.Revoke(f.server, alice, Capability) }, RoleNone},
	} {
		c := f.cacheCheck(id)
		step.change()
		start := time.Now()
		polls := 0
		var p Principal
		waitFor(t, "Identify to see role "+step.want.String(), func() bool {
			polls++
			p = identify(t, id, remote)
			return p.Role == step.want
		})
		elapsed := time.Since(start)
		calls, invalids := c.since()
		t.Logf("role %v seen after %v, %d polls, %d WhoIs calls, %d invalidations", step.want, elapsed.Round(time.Millisecond), polls, calls, invalids)
		// Each WhoIs needs an invalidation or an expiry; entries expire at
		// most once per max age.
		expiries := int64(time.Since(c.at)/DefaultMaxAge) + 1
		if calls > int64(invalids)+expiries {
			t.Errorf("%d WhoIs calls for %d polls: more than %d invalidations + %d expiries", calls, polls, invalids, expiries)
		}
	}
}

func TestIdentifyMaxAge(t *testing.T) {
	f := newFixture(t)
	alice := f.tn.Node(t, tailnettest.NodeOptions{Hostname: "alice", User: "alice@example.com"})
	f.tn.Grant(f.server, alice, Capability, grant("viewer"))
	clock := newFakeClock()
	id := NewIdentifier(f.whois, WithClock(clock.Now), WithMaxAge(5*time.Second))
	// No Watch: only the max age expires entries.
	remote := f.remote(t, alice)
	if p := identify(t, id, remote); p.Role != RoleViewer {
		t.Fatalf("alice = %+v", p)
	}
	f.tn.Grant(f.server, alice, Capability, grant("operator")) // returns once the server's WhoIs says so
	before := f.whois.n.Load()
	clock.Advance(4 * time.Second)
	if p := identify(t, id, remote); p.Role != RoleViewer || f.whois.n.Load() != before {
		t.Errorf("within max age: %+v after %d WhoIs calls; want the cached viewer and none", p, f.whois.n.Load()-before)
	}
	clock.Advance(time.Second)
	if p := identify(t, id, remote); p.Role != RoleOperator || f.whois.n.Load() != before+1 {
		t.Errorf("at max age: %+v after %d WhoIs calls; want operator after one", p, f.whois.n.Load()-before)
	}
	// A clock that jumps back does not make an entry young again.
	clock.Advance(-time.Hour)
	identify(t, id, remote)
	if got := f.whois.n.Load(); got != before+2 {
		t.Errorf("after the clock went back: %d WhoIs calls; want 2", got-before)
	}

	// Without a max age nothing is cached.
	nocache := NewIdentifier(f.whois, WithMaxAge(0))
	before = f.whois.n.Load()
	for range 3 {
		identify(t, nocache, remote)
	}
	if got := f.whois.n.Load() - before; got != 3 {
		t.Errorf("uncached: %d WhoIs calls for 3 Identify calls", got)
	}
}

func TestIdentifyConcurrentCallersShareWhoIs(t *testing.T) {
	f := newFixture(t)
	alice := f.tn.Node(t, tailnettest.NodeOptions{Hostname: "alice", User: "alice@example.com"})
	clock := newFakeClock()
	id := NewIdentifier(f.whois, WithClock(clock.Now))
	f.watch(t, id)
	remote := f.remote(t, alice)

	c := f.cacheCheck(id)
	var wg sync.WaitGroup
	for range 50 {
		wg.Go(func() {
			if p, err := id.Identify(context.Background(), remote); err != nil || p.Login != "alice@example.com" {
				t.Errorf("Identify = %+v, %v", p, err)
			}
		})
	}
	wg.Wait()
	if calls, invalids := c.since(); calls > 1+int64(invalids) {
		t.Errorf("50 concurrent Identify calls made %d WhoIs calls with %d invalidations", calls, invalids)
	}

	// A caller giving up does not fail the others, nor poison the cache.
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	id.Invalidate()
	if _, err := id.Identify(ctx, remote); !errors.Is(err, context.Canceled) {
		t.Errorf("Identify with a cancelled context: %v", err)
	}
	if p := identify(t, id, remote); p.Login != "alice@example.com" {
		t.Errorf("after a cancelled caller: %+v", p)
	}
}

func BenchmarkIdentify(b *testing.B) {
	f := newFixture(b)
	alice := f.tn.Node(b, tailnettest.NodeOptions{Hostname: "alice", User: "alice@example.com"})
	f.tn.Grant(f.server, alice, Capability, grant("operator"))
	remote := f.remote(b, alice)
	for _, bc := range []struct {
		name string
		opts []Option
	}{
		{"cached", nil},
		{"uncached", []Option{WithMaxAge(0)}},
	} {
		b.Run(bc.name, func(b *testing.B) {
			id := NewIdentifier(f.whois, bc.opts...)
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			go id.Watch(ctx, f.lc)
			before := f.whois.n.Load()
			for b.Loop() {
				if _, err := id.Identify(ctx, remote); err != nil {
					b.Fatal(err)
				}
			}
			b.ReportMetric(float64(f.whois.n.Load()-before)/float64(b.N), "whois/op")
		})
	}
}

// gatedWhoIs passes WhoIs calls to the real local client, but holds the first
// one until release is closed, reporting on entered that it started.
type gatedWhoIs struct {
	*countingWhoIs
	entered chan struct{}
	release chan struct{}
	once    sync.Once
}

func (g *gatedWhoIs) WhoIs(ctx context.Context, addr string) (*apitype.WhoIsResponse, error) {
	first := false
	g.once.Do(func() { first = true })
	if first {
		close(g.entered)
		<-g.release
	}
	return g.countingWhoIs.WhoIs(ctx, addr)
}

// TestIdentifyInvalidationRacesWhoIs checks that an answer whose WhoIs was
// under way when the cache was dropped is not cached, and that callers
// arriving after the drop do not wait for that older answer.
func TestIdentifyInvalidationRacesWhoIs(t *testing.T) {
	f := newFixture(t)
	alice := f.tn.Node(t, tailnettest.NodeOptions{Hostname: "alice", User: "alice@example.com"})
	remote := f.remote(t, alice)
	gate := &gatedWhoIs{countingWhoIs: f.whois, entered: make(chan struct{}), release: make(chan struct{})}
	clock := newFakeClock() // never moves: nothing expires by age
	id := NewIdentifier(gate, WithClock(clock.Now))
	before := f.whois.n.Load()

	first := make(chan error, 1)
	go func() {
		_, err := id.Identify(context.Background(), remote)
		first <- err
	}()
	<-gate.entered
	id.Invalidate()

	// A caller after the drop gets its own WhoIs while the first is held.
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if p, err := id.Identify(ctx, remote); err != nil || p.Login != "alice@example.com" {
		t.Fatalf("Identify after the drop, with an older WhoIs held = %+v, %v", p, err)
	}
	close(gate.release)
	if err := <-first; err != nil {
		t.Fatalf("the held Identify: %v", err)
	}
	// The later answer is cached; the raced one did not overwrite it.
	calls := f.whois.n.Load() - before
	identify(t, id, remote)
	if got := f.whois.n.Load() - before; got != calls || calls != 2 {
		t.Errorf("WhoIs calls: %d for the two lookups, %d after one more Identify; want 2 and 2", calls, got)
	}

	// Nothing from before a drop is cached, however the lookups interleave.
	gate2 := &gatedWhoIs{countingWhoIs: f.whois, entered: make(chan struct{}), release: make(chan struct{})}
	id = NewIdentifier(gate2, WithClock(clock.Now))
	go func() {
		_, err := id.Identify(context.Background(), remote)
		first <- err
	}()
	<-gate2.entered
	id.Invalidate()
	close(gate2.release)
	if err := <-first; err != nil {
		t.Fatal(err)
	}
	before = f.whois.n.Load()
	identify(t, id, remote)
	if got := f.whois.n.Load() - before; got != 1 {
		t.Errorf("after an answer that raced a drop: %d WhoIs calls; want 1 (it must not be cached)", got)
	}
}

func TestNotifyChangesIdentity(t *testing.T) {
	running := ipn.Running
	yes := true
	now := time.Now()
	nodeKey := key.NewNode().Public()
	discoKey := key.NewDisco().Public()
	harmless := &tailcfg.PeerChange{NodeID: 7, DERPRegion: 2, Endpoints: []netip.AddrPort{netip.MustParseAddrPort("192.0.2.1:41641")},
		DiscoKey: &discoKey, Online: &yes, LastSeen: &now}
	for _, tc := range []struct {
		name string
		n    ipn.Notify
		want bool
	}{
		{"nothing", ipn.Notify{}, false},
		{"self", ipn.Notify{SelfChange: &tailcfg.Node{ID: 1}}, true},
		{"netmap", ipn.Notify{NetMap: &netmap.NetworkMap{}}, true},
		{"state", ipn.Notify{State: &running}, true},
		{"login", ipn.Notify{LoginFinished: &empty.Message{}}, true},
		{"peer changed", ipn.Notify{PeersChanged: []*tailcfg.Node{{ID: 7}}}, true},
		{"peer removed", ipn.Notify{PeersRemoved: []tailcfg.NodeID{7}}, true},
		{"user profiles", ipn.Notify{UserProfiles: map[tailcfg.UserID]tailcfg.UserProfileView{1: (&tailcfg.UserProfile{ID: 1}).View()}}, true},
		{"endpoints, derp, disco, online", ipn.Notify{PeerChangedPatch: []*tailcfg.PeerChange{harmless, nil}}, false},
		{"node key", ipn.Notify{PeerChangedPatch: []*tailcfg.PeerChange{{NodeID: 7, Key: &nodeKey}}}, true},
		{"key expiry", ipn.Notify{PeerChangedPatch: []*tailcfg.PeerChange{{NodeID: 7, KeyExpiry: &now}}}, true},
		{"capabilities", ipn.Notify{PeerChangedPatch: []*tailcfg.PeerChange{{NodeID: 7, CapMap: tailcfg.NodeCapMap{"x": nil}}}}, true},
		{"capability version", ipn.Notify{PeerChangedPatch: []*tailcfg.PeerChange{{NodeID: 7, Cap: 100}}}, true},
		{"key signature", ipn.Notify{PeerChangedPatch: []*tailcfg.PeerChange{{NodeID: 7, KeySignature: []byte{1}}}}, true},
		{"harmless then key", ipn.Notify{PeerChangedPatch: []*tailcfg.PeerChange{harmless, nil, {NodeID: 8, Key: &nodeKey}}}, true},
	} {
		if got := notifyChangesIdentity(&tc.n); got != tc.want {
			t.Errorf("%s: notifyChangesIdentity = %v; want %v", tc.name, got, tc.want)
		}
	}
}

// TestWatchHealthy checks that a healthy watch sees netmap changes without
// ever reporting a broken bus (which would mean it rewatches, and drops the
// cache, every second), and returns nil once its context ends.
func TestWatchHealthy(t *testing.T) {
	f := newFixture(t)
	node := f.tn.Node(t, tailnettest.NodeOptions{Hostname: "watched"})
	lc, err := node.LocalClient()
	if err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	var logs []string
	logf := func(format string, args ...any) {
		mu.Lock()
		logs = append(logs, fmt.Sprintf(format, args...))
		mu.Unlock()
	}
	nlogs := func() int { mu.Lock(); defer mu.Unlock(); return len(logs) }
	id := NewIdentifier(f.whois, WithLogf(logf))
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	done := make(chan error, 1)
	go func() { done <- id.Watch(ctx, lc) }()
	waitFor(t, "watch to start", func() bool { return id.invalidations.Load() > 0 })

	// A netmap change arrives through the healthy watch, which logs nothing.
	before := id.invalidations.Load()
	other := f.tn.Node(t, tailnettest.NodeOptions{Hostname: "other"})
	f.tn.SetTags(other, "tag:ci")
	waitFor(t, "the watch to see the new node", func() bool { return id.invalidations.Load() > before })
	if n := nlogs(); n != 0 {
		mu.Lock()
		t.Errorf("healthy watch logged: %q", logs)
		mu.Unlock()
	}
	select {
	case err := <-done:
		t.Fatalf("Watch returned (%v) while its context is live", err)
	default:
	}
	cancel()
	if err := <-done; err != nil {
		t.Errorf("Watch after cancel = %v; want nil", err)
	}
}
