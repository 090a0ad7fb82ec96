// Package tailnettest runs a real tailnet in-process for tests: tailscale's
// testcontrol control server and a DERP+STUN server on loopback, and tsnet
// nodes with chosen user logins, ACL tags and per-source app capability
// grants. It does not model ACLs (every node may reach every other), and it
// is for tests only.
//
// testcontrol itself knows only one user per node, with a generated login,
// and grants that apply from every node to every node. To give each node a
// chosen login and each (source, destination) pair its own grants, the
// Tailnet owns every node's map stream: it regenerates testcontrol's normal
// map response, rewrites the users, adds a named packet filter holding the
// per-source capability grants, and injects that as a raw map response
// whenever anything changed (as a delta when it can, the way production
// control does, else as a full map).
package tailnettest

import (
	"bytes"
	"cmp"
	"context"
	"encoding/json"
	"fmt"
	"maps"
	"net/http/httptest"
	"net/netip"
	"slices"
	"sync"
	"testing"
	"time"

	"tailscale.com/envknob"
	"tailscale.com/ipn/store/mem"
	"tailscale.com/net/netns"
	"tailscale.com/tailcfg"
	"tailscale.com/tsnet"
	"tailscale.com/tstest/integration"
	"tailscale.com/tstest/integration/testcontrol"
	"tailscale.com/types/key"

	"github.com/threes-dev/threes/internal/netnstest"
)

// MagicDNSDomain is the tailnet's DNS suffix; node names are
// "<hostname>.tailnet.test". The .test TLD never resolves on the internet.
const MagicDNSDomain = "tailnet.test"

// grantsFilter names the packet filter chunk that carries the per-source
// capability grants, beside testcontrol's allow-all "base" filter.
const grantsFilter = "tailnettest-grants"

// waitTimeout bounds every wait for the tailnet to converge.
const waitTimeout = 60 * time.Second

// pollInterval is how often waits look again.
const pollInterval = 10 * time.Millisecond

// resyncInterval is how often the Tailnet looks for changes nothing told it
// about (for example a test calling Control.UpdateNode itself).
const resyncInterval = time.Second

// firstUserID is the first user ID given to chosen logins, far above the
// small IDs testcontrol hands out.
const firstUserID tailcfg.UserID = 1 << 20

// Tailnet is an in-process tailnet: a control server, a DERP server and the
// tsnet nodes started on it.
type Tailnet struct {
	// Control is the control server. Changing nodes through it directly
	// works (the Tailnet resyncs every second) but Grant, Revoke and
	// SetTags also wait until the change has arrived.
	Control *testcontrol.Server
	// ControlURL is the control server's URL, for tsnet.Server.ControlURL.
	ControlURL string
	// DERPMap lists the loopback DERP and STUN server.
	DERPMap *tailcfg.DERPMap

	tb   testing.TB
	logs *logBuffer
	wake chan struct{}

	mu        sync.Mutex
	nodes     map[*tsnet.Server]*nodeInfo
	hostnames map[string]bool           // every hostname Nodes was given
	logins    map[string]string         // hostname -> login
	userIDs   map[string]tailcfg.UserID // login -> user ID
	grants    map[key.NodePublic]map[key.NodePublic]tailcfg.PeerCapMap
	streams   map[key.NodePublic]*stream
	nextID    int
}

// nodeInfo is what the Tailnet knows of a node it started.
type nodeInfo struct {
	hostname string
	key      key.NodePublic
	addrs    []netip.Addr
}

// stream is the state of one node's map stream, which the Tailnet owns.
type stream struct {
	full bool  // the next message must be a full map response
	sent *sent // what the node's current map session holds; nil if unknown
}

// sent records the JSON of what a node was last sent, part by part, to
// compute deltas.
type sent struct {
	rest     string // everything but peers, filters and user profiles
	base     string
	grants   string
	peers    map[tailcfg.NodeID]string
	profiles map[tailcfg.UserID]string
	// reachable holds the peers sent with a home DERP region, which the
	// node needs to reach them.
	reachable map[key.NodePublic]bool
}

// Start starts a control server and a DERP+STUN server on loopback, all
// stopped when t ends. Tailscale's logs are kept and printed only if t fails.
func Start(t testing.TB) *Tailnet {
	t.Helper()
	netnstest.LoopbackUp(t)
	quietTailscale(t)
	tn := &Tailnet{
		tb:        t,
		logs:      newLogBuffer(),
		wake:      make(chan struct{}, 1),
		nodes:     map[*tsnet.Server]*nodeInfo{},
		hostnames: map[string]bool{},
		logins:    map[string]string{},
		userIDs:   map[string]tailcfg.UserID{},
		grants:    map[key.NodePublic]map[key.NodePublic]tailcfg.PeerCapMap{},
		streams:   map[key.NodePublic]*stream{},
	}
	t.Cleanup(func() {
		if t.Failed() {
			tn.logs.dump(t)
		}
	})
	tn.DERPMap = integration.RunDERPAndSTUN(t, tn.logs.logf("derp: "), "127.0.0.1")
	tn.Control = &testcontrol.Server{
		DERPMap:        tn.DERPMap,
		MagicDNSDomain: MagicDNSDomain,
		Logf:           tn.logs.logf("control: "),
		// A non-nil TagOwners makes the tags a node asks for at signup stick.
		TagOwners:              map[string][]string{},
		AllOnline:              true,
		HoldMapRequest:         tn.holdMapRequest,
		ModifyFirstMapResponse: tn.modifyFirstMapResponse,
	}
	srv := httptest.NewUnstartedServer(tn.Control)
	tn.Control.HTTPTestServer = srv
	srv.Start()
	tn.ControlURL = srv.URL

	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go tn.syncLoop(ctx, done)
	t.Cleanup(func() {
		cancel()
		<-done
		srv.Close()
	})
	return tn
}

var (
	quietOnce  sync.Once
	netnsMu    sync.Mutex
	netnsUsers int
)

// quietTailscale keeps tsnet nodes on loopback: no port mapping probes to a
// gateway, no endpoints on the host's interface addresses (peers then reach
// each other only at the 127.0.0.1 address the loopback STUN server reports,
// or through the loopback DERP server), and no binding of sockets to the
// default route's interface (which breaks loopback-only namespaces). The
// knobs are process-wide, which is fine in a test binary.
func quietTailscale(t testing.TB) {
	quietOnce.Do(func() {
		envknob.Setenv("TS_DISABLE_PORTMAPPER", "1")
		envknob.Setenv("TS_DEBUG_OMIT_LOCAL_ADDRS", "1")
	})
	netnsMu.Lock()
	if netnsUsers == 0 {
		netns.SetEnabled(false)
	}
	netnsUsers++
	netnsMu.Unlock()
	t.Cleanup(func() {
		netnsMu.Lock()
		netnsUsers--
		if netnsUsers == 0 {
			netns.SetEnabled(true)
		}
		netnsMu.Unlock()
	})
}

// NodeOptions describe a node to start.
type NodeOptions struct {
	// Hostname is the node's name, unique in the tailnet; empty picks one.
	Hostname string
	// User is the login of the node's user, e.g. "alice@example.com";
	// empty keeps testcontrol's generated "user-N@fake-control.example.net".
	User string
	// Tags are ACL tags the node advertises at signup, e.g. "tag:ci".
	Tags []string
}

// Node starts one node and returns it once it is up and every node of the
// tailnet can see it. It is closed when t ends.
func (tn *Tailnet) Node(t testing.TB, opts NodeOptions) *tsnet.Server {
	t.Helper()
	return tn.Nodes(t, opts)[0]
}

// Nodes starts nodes in parallel, like Node.
func (tn *Tailnet) Nodes(t testing.TB, opts ...NodeOptions) []*tsnet.Server {
	t.Helper()
	opts = slices.Clone(opts)
	tn.mu.Lock()
	for i := range opts {
		o := &opts[i]
		for o.Hostname == "" {
			tn.nextID++
			if h := fmt.Sprintf("node%d", tn.nextID); !tn.hostnames[h] {
				o.Hostname = h
			}
		}
		if tn.hostnames[o.Hostname] {
			tn.mu.Unlock()
			t.Fatalf("tailnettest: hostname %q used twice", o.Hostname)
		}
		// Logins are found by hostname, so hostnames stay taken even after
		// their node closed.
		tn.hostnames[o.Hostname] = true
		// Registered before the node starts so that even its first map
		// response carries its login.
		if o.User != "" {
			tn.logins[o.Hostname] = o.User
			if _, ok := tn.userIDs[o.User]; !ok {
				tn.userIDs[o.User] = firstUserID + tailcfg.UserID(len(tn.userIDs))
			}
		}
	}
	tn.mu.Unlock()

	servers := make([]*tsnet.Server, len(opts))
	for i, o := range opts {
		s := &tsnet.Server{
			Dir:           t.TempDir(),
			Store:         new(mem.Store),
			Hostname:      o.Hostname,
			ControlURL:    tn.ControlURL,
			Ephemeral:     true,
			AdvertiseTags: slices.Clone(o.Tags),
			Logf:          tn.logs.logf(o.Hostname + ": "),
			UserLogf:      tn.logs.logf(o.Hostname + ": "),
		}
		servers[i] = s
		t.Cleanup(func() {
			s.Close()
			tn.mu.Lock()
			if n := tn.nodes[s]; n != nil {
				// A closed node streams no more; stop queueing it updates.
				delete(tn.streams, n.key)
			}
			delete(tn.nodes, s)
			tn.mu.Unlock()
		})
	}

	ctx, cancel := context.WithTimeout(context.Background(), waitTimeout)
	defer cancel()
	errs := make([]error, len(servers))
	var wg sync.WaitGroup
	for i, s := range servers {
		wg.Go(func() { errs[i] = tn.up(ctx, s) })
	}
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			t.Fatalf("tailnettest: start node %s: %v", opts[i].Hostname, err)
		}
	}
	if err := tn.waitMeshed(ctx, servers); err != nil {
		t.Fatalf("tailnettest: %v", err)
	}
	return servers
}

// up brings s up and waits until it talks to its home DERP server, so that
// the first packets to it are not dropped.
func (tn *Tailnet) up(ctx context.Context, s *tsnet.Server) error {
	st, err := s.Up(ctx)
	if err != nil {
		return err
	}
	if st.Self == nil {
		return fmt.Errorf("up: no self status")
	}
	tn.mu.Lock()
	tn.nodes[s] = &nodeInfo{hostname: s.Hostname, key: st.Self.PublicKey, addrs: slices.Clone(st.TailscaleIPs)}
	tn.mu.Unlock()
	tn.kick()

	ms, health := s.Sys().MagicSock.Get(), s.Sys().HealthTracker.Get()
	return poll(ctx, "home DERP of "+s.Hostname, func() (bool, error) {
		r := ms.GetLastNetcheckReport(ctx)
		return r != nil && r.PreferredDERP != 0 && !health.GetDERPRegionReceivedTime(r.PreferredDERP).IsZero(), nil
	})
}

// waitMeshed waits until the new nodes and every other live node started
// here see each other with a home DERP region, and until every node whose
// map stream the Tailnet owns (including nodes started elsewhere, such as an
// appliance under test) has been sent the new nodes. A node that fails to
// answer, other than a new one, has been closed and is skipped.
func (tn *Tailnet) waitMeshed(ctx context.Context, added []*tsnet.Server) error {
	tn.mu.Lock()
	nodes := maps.Clone(tn.nodes)
	tn.mu.Unlock()
	isNew := map[*tsnet.Server]bool{}
	var newKeys []key.NodePublic
	for _, s := range added {
		isNew[s] = true
		newKeys = append(newKeys, nodes[s].key)
	}
	for s, self := range nodes {
		lc, err := s.LocalClient()
		if err != nil {
			return fmt.Errorf("local client of %s: %w", self.hostname, err)
		}
		err = poll(ctx, self.hostname+" to see its new peers", func() (bool, error) {
			st, err := lc.Status(ctx)
			if err != nil && !isNew[s] {
				return true, nil // closed
			}
			if err != nil {
				return false, err
			}
			for other, info := range nodes {
				if other == s || !isNew[s] && !isNew[other] {
					continue
				}
				if ps, ok := st.Peer[info.key]; !ok || ps.Relay == "" {
					return false, nil
				}
			}
			return true, nil
		})
		if err != nil {
			return err
		}
	}
	return poll(ctx, "the new nodes to be sent to every node", func() (bool, error) {
		tn.mu.Lock()
		defer tn.mu.Unlock()
		for nk, st := range tn.streams {
			if st.sent == nil || slices.Contains(newKeys, nk) {
				continue
			}
			for _, k := range newKeys {
				if !st.sent.reachable[k] {
					return false, nil
				}
			}
		}
		return true, nil
	})
}

// info returns what the Tailnet knows of s, asking s itself if it was not
// started here.
func (tn *Tailnet) info(s *tsnet.Server) *nodeInfo {
	tn.tb.Helper()
	tn.mu.Lock()
	n := tn.nodes[s]
	tn.mu.Unlock()
	if n != nil {
		return n
	}
	lc, err := s.LocalClient()
	if err != nil {
		tn.tb.Fatalf("tailnettest: local client: %v", err)
	}
	st, err := lc.Status(context.Background())
	if err != nil || st.Self == nil {
		tn.tb.Fatalf("tailnettest: status of %s: %v", s.Hostname, err)
	}
	return &nodeInfo{hostname: s.Hostname, key: st.Self.PublicKey, addrs: st.TailscaleIPs}
}

// Grant gives src the app capability cap with values (each marshalled to
// JSON) when it talks to dst, replacing what src had of cap there, and
// returns once WhoIs on dst reports it. Call it from the goroutine of the
// test that started the Tailnet.
func (tn *Tailnet) Grant(dst, src *tsnet.Server, cap tailcfg.PeerCapability, values ...any) {
	tn.tb.Helper()
	raws := make([]tailcfg.RawMessage, 0, len(values))
	for _, v := range values {
		b, err := json.Marshal(v)
		if err != nil {
			tn.tb.Fatalf("tailnettest: grant %s: marshal %v: %v", cap, v, err)
		}
		raws = append(raws, tailcfg.RawMessage(b))
	}
	d, sr := tn.info(dst), tn.info(src)
	if d.key == sr.key {
		tn.tb.Fatalf("tailnettest: grant %s: a node cannot grant itself", cap)
	}
	tn.mu.Lock()
	bySrc := tn.grants[d.key]
	if bySrc == nil {
		bySrc = map[key.NodePublic]tailcfg.PeerCapMap{}
		tn.grants[d.key] = bySrc
	}
	if bySrc[sr.key] == nil {
		bySrc[sr.key] = tailcfg.PeerCapMap{}
	}
	bySrc[sr.key][cap] = raws
	tn.mu.Unlock()
	tn.kick()
	tn.waitCaps(dst, sr, cap, raws, true)
}

// Revoke takes cap away from src when it talks to dst and returns once WhoIs
// on dst reports it.
func (tn *Tailnet) Revoke(dst, src *tsnet.Server, cap tailcfg.PeerCapability) {
	tn.tb.Helper()
	d, sr := tn.info(dst), tn.info(src)
	tn.mu.Lock()
	delete(tn.grants[d.key][sr.key], cap)
	tn.mu.Unlock()
	tn.kick()
	tn.waitCaps(dst, sr, cap, nil, false)
}

// waitCaps waits until dst's WhoIs of src shows cap with want (present) or
// without cap (!present).
func (tn *Tailnet) waitCaps(dst *tsnet.Server, src *nodeInfo, cap tailcfg.PeerCapability, want []tailcfg.RawMessage, present bool) {
	tn.tb.Helper()
	lc, err := dst.LocalClient()
	if err != nil {
		tn.tb.Fatalf("tailnettest: local client: %v", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), waitTimeout)
	defer cancel()
	err = poll(ctx, fmt.Sprintf("%s to see grant %s of %s", dst.Hostname, cap, src.hostname), func() (bool, error) {
		res, err := lc.WhoIs(ctx, src.addrs[0].String())
		if err != nil {
			return false, err
		}
		got, ok := res.CapMap[cap]
		if !present {
			return !ok, nil
		}
		return ok && sameJSON(got, want), nil
	})
	if err != nil {
		tn.tb.Fatalf("tailnettest: %v", err)
	}
}

// SetTags replaces node's ACL tags (none makes it a user's node again) and
// returns once every live node started here sees them.
func (tn *Tailnet) SetTags(node *tsnet.Server, tags ...string) {
	tn.tb.Helper()
	info := tn.info(node)
	tags = slices.Sorted(slices.Values(tags))
	n := tn.Control.Node(info.key)
	if n == nil {
		tn.tb.Fatalf("tailnettest: set tags: node %s unknown to control", info.hostname)
	}
	// Node returns a copy, so a concurrent endpoint update between it and
	// UpdateNode is lost; the node repeats those, so it only costs time.
	n.Tags = tags
	tn.Control.UpdateNode(n)
	tn.kick()

	tn.mu.Lock()
	nodes := maps.Clone(tn.nodes)
	tn.mu.Unlock()
	ctx, cancel := context.WithTimeout(context.Background(), waitTimeout)
	defer cancel()
	for s, viewer := range nodes {
		lc, err := s.LocalClient()
		if err != nil {
			tn.tb.Fatalf("tailnettest: local client: %v", err)
		}
		err = poll(ctx, fmt.Sprintf("%s to see tags %v of %s", viewer.hostname, tags, info.hostname), func() (bool, error) {
			var got []string
			if viewer.key == info.key {
				st, err := lc.StatusWithoutPeers(ctx)
				if err != nil {
					return false, err
				}
				if st.Self.Tags != nil {
					got = st.Self.Tags.AsSlice()
				}
			} else {
				res, err := lc.WhoIs(ctx, info.addrs[0].String())
				if err != nil {
					return false, err
				}
				got = res.Node.Tags
			}
			return slices.Equal(slices.Sorted(slices.Values(got)), tags), nil
		})
		if err != nil {
			tn.tb.Fatalf("tailnettest: %v", err)
		}
	}
}

// kick asks the sync loop to look for changes now.
func (tn *Tailnet) kick() {
	select {
	case tn.wake <- struct{}{}:
	default:
	}
}

// holdMapRequest is testcontrol's hook at the start of every map request;
// the func it returns runs when the request ends. A non-streaming request
// ends after control stored the node's new endpoints or hostinfo, so peers
// need an update then; a stream that starts or ends means the node's next
// map session needs a full map.
func (tn *Tailnet) holdMapRequest(req *tailcfg.MapRequest) func() {
	streaming := req.Stream && !req.ReadOnly
	if streaming {
		tn.needFull(req.NodeKey)
	}
	tn.kick()
	return func() {
		if streaming {
			tn.needFull(req.NodeKey)
		}
		tn.kick()
	}
}

func (tn *Tailnet) needFull(nk key.NodePublic) {
	tn.mu.Lock()
	if st := tn.streams[nk]; st != nil {
		st.full = true
	}
	tn.mu.Unlock()
}

// modifyFirstMapResponse is testcontrol's hook on the first automatic map
// response of a request. It decorates it like every later one, and for a
// node's first stream it takes the stream over: once a raw map response has
// been queued for a node, testcontrol sends it nothing else.
func (tn *Tailnet) modifyFirstMapResponse(res *tailcfg.MapResponse, req *tailcfg.MapRequest) {
	tn.mu.Lock()
	defer tn.mu.Unlock()
	rules := tn.decorateLocked(res)
	res.PacketFilters = map[string][]tailcfg.FilterRule{grantsFilter: rules}
	if !req.Stream || req.ReadOnly {
		return
	}
	snap, err := snapshot(res, rules)
	if err != nil {
		tn.logs.logf("tailnettest: ")("%v", err)
		return
	}
	tn.streams[req.NodeKey] = &stream{sent: snap}
	tn.Control.AddRawMapResponse(req.NodeKey, &tailcfg.MapResponse{KeepAlive: true})
}

// syncLoop sends owned streams what changed, when kicked and every
// resyncInterval, until ctx is done.
func (tn *Tailnet) syncLoop(ctx context.Context, done chan<- struct{}) {
	defer close(done)
	t := time.NewTicker(resyncInterval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-tn.wake:
		case <-t.C:
		}
		tn.syncAll()
	}
}

func (tn *Tailnet) syncAll() {
	tn.mu.Lock()
	defer tn.mu.Unlock()
	for nk, st := range tn.streams {
		if err := tn.syncLocked(nk, st); err != nil {
			tn.logs.logf("tailnettest: ")("sync %s: %v", nk.ShortString(), err)
		}
	}
}

// syncLocked regenerates nk's map response and sends the node what differs
// from what it has: a full map if its session is new or something beyond
// peers, packet filters and user profiles changed, else a delta.
func (tn *Tailnet) syncLocked(nk key.NodePublic, st *stream) error {
	res, err := tn.Control.MapResponse(&tailcfg.MapRequest{NodeKey: nk})
	if err != nil {
		return err
	}
	if res == nil { // the node is gone
		delete(tn.streams, nk)
		return nil
	}
	rules := tn.decorateLocked(res)
	snap, err := snapshot(res, rules)
	if err != nil {
		return err
	}
	var msg *tailcfg.MapResponse
	if st.full || st.sent == nil || res.PingRequest != nil || snap.rest != st.sent.rest {
		res.PacketFilters = map[string][]tailcfg.FilterRule{grantsFilter: rules}
		msg = res
	} else if msg = delta(st.sent, snap, res, rules); msg == nil {
		return nil
	}
	if !tn.Control.AddRawMapResponse(nk, msg) {
		// Not connected: the next stream gets a full map.
		st.full, st.sent = true, nil
		return nil
	}
	st.full, st.sent = false, snap
	return nil
}

// decorateLocked gives nodes with a chosen login their user, adds those
// users' profiles, and returns the packet filter rules granting res.Node's
// peers their capabilities.
func (tn *Tailnet) decorateLocked(res *tailcfg.MapResponse) []tailcfg.FilterRule {
	if res.Node == nil {
		return nil
	}
	setUser := func(n *tailcfg.Node) {
		if !n.Hostinfo.Valid() {
			return
		}
		if login, ok := tn.logins[n.Hostinfo.Hostname()]; ok {
			n.User = tn.userIDs[login]
		}
	}
	setUser(res.Node)
	for _, p := range res.Peers {
		setUser(p)
	}
	profiles := slices.DeleteFunc(slices.Clone(res.UserProfiles), func(up tailcfg.UserProfile) bool {
		return up.ID >= firstUserID
	})
	for login, id := range tn.userIDs {
		profiles = append(profiles, tailcfg.UserProfile{ID: id, LoginName: login, DisplayName: login})
	}
	slices.SortFunc(profiles, func(a, b tailcfg.UserProfile) int { return cmp.Compare(a.ID, b.ID) })
	res.UserProfiles = profiles

	bySrc := tn.grants[res.Node.Key]
	if len(bySrc) == 0 {
		return nil
	}
	var dsts []netip.Prefix
	for _, p := range res.Node.Addresses {
		if p.IsSingleIP() {
			dsts = append(dsts, p)
		}
	}
	var rules []tailcfg.FilterRule
	for _, p := range res.Peers { // sorted by ID, so the rules are stable
		caps := bySrc[p.Key]
		if len(caps) == 0 {
			continue
		}
		var srcs []string
		for _, a := range p.Addresses {
			if a.IsSingleIP() {
				srcs = append(srcs, a.Addr().String())
			}
		}
		rules = append(rules, tailcfg.FilterRule{
			SrcIPs:   srcs,
			CapGrant: []tailcfg.CapGrant{{Dsts: slices.Clone(dsts), CapMap: maps.Clone(caps)}},
		})
	}
	return rules
}

// snapshot records res part by part.
func snapshot(res *tailcfg.MapResponse, rules []tailcfg.FilterRule) (*sent, error) {
	rest := *res
	rest.Peers, rest.PacketFilter, rest.PacketFilters, rest.UserProfiles, rest.PingRequest = nil, nil, nil, nil, nil
	s := &sent{peers: map[tailcfg.NodeID]string{}, profiles: map[tailcfg.UserID]string{}, reachable: map[key.NodePublic]bool{}}
	var err error
	enc := func(v any) string {
		b, e := json.Marshal(v)
		if e != nil && err == nil {
			err = fmt.Errorf("encode map response: %w", e)
		}
		return string(b)
	}
	s.rest = enc(&rest)
	s.base = enc(res.PacketFilter)
	s.grants = enc(rules)
	for _, p := range res.Peers {
		s.peers[p.ID] = enc(p)
		if p.HomeDERP != 0 {
			s.reachable[p.Key] = true
		}
	}
	for _, up := range res.UserProfiles {
		s.profiles[up.ID] = enc(up)
	}
	return s, err
}

// delta returns the incremental map response that takes a session from old
// to now, or nil if nothing changed.
func delta(old, now *sent, res *tailcfg.MapResponse, rules []tailcfg.FilterRule) *tailcfg.MapResponse {
	d := &tailcfg.MapResponse{}
	changed := false
	if now.base != old.base && res.PacketFilter != nil {
		d.PacketFilter, changed = res.PacketFilter, true
	}
	if now.grants != old.grants {
		d.PacketFilters, changed = map[string][]tailcfg.FilterRule{grantsFilter: rules}, true
	}
	for _, p := range res.Peers {
		if old.peers[p.ID] != now.peers[p.ID] {
			d.PeersChanged, changed = append(d.PeersChanged, p), true
		}
	}
	for _, id := range slices.Sorted(maps.Keys(old.peers)) {
		if _, ok := now.peers[id]; !ok {
			d.PeersRemoved, changed = append(d.PeersRemoved, id), true
		}
	}
	for _, up := range res.UserProfiles {
		if old.profiles[up.ID] != now.profiles[up.ID] {
			d.UserProfiles, changed = append(d.UserProfiles, up), true
		}
	}
	if !changed {
		return nil
	}
	return d
}

// sameJSON reports whether two lists of JSON values are equal once compacted.
func sameJSON(a, b []tailcfg.RawMessage) bool {
	return slices.EqualFunc(a, b, func(x, y tailcfg.RawMessage) bool {
		var cx, cy bytes.Buffer
		return json.Compact(&cx, []byte(x)) == nil && json.Compact(&cy, []byte(y)) == nil &&
			bytes.Equal(cx.Bytes(), cy.Bytes())
	})
}

// poll calls done until it reports true, it fails, or ctx ends.
func poll(ctx context.Context, what string, done func() (bool, error)) error {
	t := time.NewTicker(pollInterval)
	defer t.Stop()
	var last error
	for {
		ok, err := done()
		if ok {
			return nil
		}
		if err != nil {
			last = err
		}
		select {
		case <-ctx.Done():
			if last != nil {
				return fmt.Errorf("wait for %s: %w (last error: %v)", what, ctx.Err(), last)
			}
			return fmt.Errorf("wait for %s: %w", what, ctx.Err())
		case <-t.C:
		}
	}
}
