package tsauth

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"reflect"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"tailscale.com/client/local"
	"tailscale.com/client/tailscale/apitype"
	"tailscale.com/ipn"
	"tailscale.com/tailcfg"
)

// DefaultMaxAge is how long Identify trusts a cached Principal when no netmap
// change has been seen. It is the safety net for changes that never show on
// the IPN bus: on Linux (tailscale 1.102) a grant change that control sends as
// a packet-filter-only delta raises no bus notification at all.
const DefaultMaxAge = 3 * time.Second

// whoisTimeout bounds one WhoIs call, which runs detached from the callers'
// contexts so that one impatient caller cannot fail the others sharing it.
const whoisTimeout = 10 * time.Second

// rewatchDelay is how long Watch waits before watching the bus again after
// the watch broke.
const rewatchDelay = time.Second

// ErrUnknownPeer is returned by Identify when the address belongs to no node
// in the tailnet map.
var ErrUnknownPeer = errors.New("unknown tailnet peer")

// WhoIser looks up the node, user and capabilities behind a tailnet address;
// *local.Client (tsnet.Server.LocalClient) implements it.
type WhoIser interface {
	WhoIs(ctx context.Context, remoteAddr string) (*apitype.WhoIsResponse, error)
}

// Option configures an Identifier.
type Option func(*Identifier)

// WithLogf makes the Identifier report a broken IPN bus watch to logf.
func WithLogf(logf func(format string, args ...any)) Option {
	return func(i *Identifier) { i.logf = logf }
}

// WithClock makes the Identifier read time from now instead of time.Now.
func WithClock(now func() time.Time) Option {
	return func(i *Identifier) { i.now = now }
}

// WithMaxAge sets how long a cached Principal is trusted without a netmap
// change; zero or less disables the cache (every Identify calls WhoIs).
func WithMaxAge(d time.Duration) Option {
	return func(i *Identifier) { i.maxAge = d }
}

// Identifier turns tailnet peer addresses into Principals. It caches one
// Principal per peer IP, drops the whole cache whenever Watch sees the node's
// netmap change, and never trusts an entry older than its max age.
type Identifier struct {
	w      WhoIser
	now    func() time.Time
	logf   func(format string, args ...any)
	maxAge time.Duration

	mu      sync.Mutex
	gen     uint64 // bumped by every invalidation; entries of older gens are dead
	cache   map[netip.Addr]entry
	flights map[flightKey]*flight

	// invalidations counts cache drops, for tests.
	invalidations atomic.Uint64
}

type entry struct {
	p   Principal
	at  time.Time
	gen uint64
}

// flightKey includes the generation so that a lookup started before an
// invalidation is never shared with callers arriving after it.
type flightKey struct {
	ip  netip.Addr
	gen uint64
}

type flight struct {
	done chan struct{}
	p    Principal
	err  error
}

// NewIdentifier returns an Identifier that asks w. Run Watch beside it so
// that changes are seen at once instead of after the max age.
func NewIdentifier(w WhoIser, opts ...Option) *Identifier {
	i := &Identifier{
		w:       w,
		now:     time.Now,
		logf:    func(string, ...any) {},
		maxAge:  DefaultMaxAge,
		cache:   map[netip.Addr]entry{},
		flights: map[flightKey]*flight{},
	}
	for _, o := range opts {
		o(i)
	}
	return i
}

// Identify returns the Principal calling from remote.
func (i *Identifier) Identify(ctx context.Context, remote netip.AddrPort) (Principal, error) {
	ip := remote.Addr().Unmap()
	if !ip.IsValid() {
		return Principal{}, fmt.Errorf("identify %v: invalid address", remote)
	}

	i.mu.Lock()
	if e, ok := i.cache[ip]; ok && e.gen == i.gen && i.fresh(e.at) {
		i.mu.Unlock()
		return e.p.clone(), nil
	}
	key := flightKey{ip, i.gen}
	f, ok := i.flights[key]
	if !ok {
		f = &flight{done: make(chan struct{})}
		i.flights[key] = f
		go i.fly(context.WithoutCancel(ctx), key, f)
	}
	i.mu.Unlock()

	select {
	case <-f.done:
		if f.err != nil {
			return Principal{}, f.err
		}
		return f.p.clone(), nil
	case <-ctx.Done():
		return Principal{}, fmt.Errorf("identify %v: %w", ip, ctx.Err())
	}
}

// fresh reports whether an entry made at time at may still be used. A clock that
// went backwards also expires it.
func (i *Identifier) fresh(at time.Time) bool {
	age := i.now().Sub(at)
	return age >= 0 && age < i.maxAge
}

// fly performs one WhoIs for key.ip and caches the result if no invalidation
// happened meanwhile.
func (i *Identifier) fly(ctx context.Context, key flightKey, f *flight) {
	ctx, cancel := context.WithTimeout(ctx, whoisTimeout)
	defer cancel()
	at := i.now()
	f.p, f.err = i.lookup(ctx, key.ip)

	i.mu.Lock()
	if f.err == nil && i.maxAge > 0 && key.gen == i.gen {
		i.cache[key.ip] = entry{p: f.p, at: at, gen: key.gen}
	}
	delete(i.flights, key)
	i.mu.Unlock()
	close(f.done)
}

func (i *Identifier) lookup(ctx context.Context, ip netip.Addr) (Principal, error) {
	res, err := i.w.WhoIs(ctx, ip.String())
	if errors.Is(err, local.ErrPeerNotFound) {
		return Principal{}, fmt.Errorf("whois %v: %w", ip, ErrUnknownPeer)
	}
	if err != nil {
		return Principal{}, fmt.Errorf("whois %v: %w", ip, err)
	}
	p, err := principalFromWhoIs(ip, res)
	if err != nil {
		return Principal{}, fmt.Errorf("identify %v: %w", ip, err)
	}
	return p, nil
}

// principalFromWhoIs builds the Principal for a WhoIs answer. A tagged node
// is its tags: control servers still attach a user profile to it (the one
// who enrolled it, or a "tagged-devices" placeholder), which must not count.
func principalFromWhoIs(ip netip.Addr, res *apitype.WhoIsResponse) (Principal, error) {
	if res == nil || res.Node == nil {
		return Principal{}, fmt.Errorf("whois answer without node: %w", ErrUnknownPeer)
	}
	n := res.Node
	p := Principal{
		Node:   strings.TrimSuffix(n.Name, "."),
		NodeID: n.StableID,
		Addr:   ip,
	}
	if p.Node == "" && n.Hostinfo.Valid() {
		p.Node = n.Hostinfo.Hostname()
	}
	if n.IsTagged() {
		p.Tags = slices.Sorted(slices.Values(n.Tags))
	} else {
		if res.UserProfile == nil || res.UserProfile.LoginName == "" {
			return Principal{}, fmt.Errorf("untagged node %s has no user login", p.Node)
		}
		p.Login = res.UserProfile.LoginName
	}
	role, err := RoleFromCapMap(res.CapMap)
	if err != nil {
		return Principal{}, fmt.Errorf("role of %s: %w", p, err)
	}
	p.Role = role
	return p, nil
}

// clone copies the Tags slice so that callers cannot change the cached one.
func (p Principal) clone() Principal {
	p.Tags = slices.Clone(p.Tags)
	return p
}

// Invalidate drops every cached Principal.
func (i *Identifier) Invalidate() {
	i.mu.Lock()
	i.gen++
	clear(i.cache)
	i.mu.Unlock()
	i.invalidations.Add(1)
}

// busMask asks for peer changes as full nodes (tags, user, addresses) and
// for the narrow per-field patches separately, so that endpoint and online
// churn can be told apart and ignored.
const busMask = ipn.NotifyInitialState | ipn.NotifyPeerChanges | ipn.NotifyPeerPatches

// Watch drops the cache whenever lc's netmap changes in a way that can change
// an identity or a grant, until ctx is done. It rewatches the IPN bus if the
// watch breaks, dropping the cache each time since changes may have been
// missed. It returns nil once ctx is done.
func (i *Identifier) Watch(ctx context.Context, lc *local.Client) error {
	if lc == nil {
		return errors.New("watch ipn bus: nil local client")
	}
	for {
		err := i.watchOnce(ctx, lc)
		i.Invalidate()
		if ctx.Err() != nil {
			return nil
		}
		// The bus broke (daemon restart, slow reader): watch again.
		i.logf("tsauth: %v; watching again in %v", err, rewatchDelay)
		t := time.NewTimer(rewatchDelay)
		select {
		case <-ctx.Done():
			t.Stop()
			return nil
		case <-t.C:
		}
	}
}

func (i *Identifier) watchOnce(ctx context.Context, lc *local.Client) error {
	w, err := lc.WatchIPNBus(ctx, busMask)
	if err != nil {
		return fmt.Errorf("watch ipn bus: %w", err)
	}
	defer w.Close()
	for {
		n, err := w.Next()
		if err != nil {
			return fmt.Errorf("watch ipn bus: %w", err)
		}
		if notifyChangesIdentity(&n) {
			i.Invalidate()
		}
	}
}

// notifyChangesIdentity reports whether n may change what WhoIs answers: a
// full netmap (SelfChange), changed or removed peers, user profiles, or a
// state change. Patches that only move endpoints, DERP home or online state
// do not, and are ignored to keep the cache warm.
func notifyChangesIdentity(n *ipn.Notify) bool {
	if n.SelfChange != nil || n.NetMap != nil || n.State != nil || n.LoginFinished != nil ||
		len(n.PeersChanged) > 0 || len(n.PeersRemoved) > 0 || len(n.UserProfiles) > 0 {
		return true
	}
	for _, pc := range n.PeerChangedPatch {
		if pc != nil && !harmlessPatch(*pc) {
			return true
		}
	}
	return false
}

// harmlessPatch reports whether pc changes only fields that do not affect
// identity. Unknown or identity-bearing fields (key, capabilities, expiry and
// any field added later) count as a change.
func harmlessPatch(pc tailcfg.PeerChange) bool {
	pc.NodeID = 0
	pc.DERPRegion = 0
	pc.Endpoints = nil
	pc.DiscoKey = nil
	pc.Online = nil
	pc.LastSeen = nil
	return reflect.ValueOf(pc).IsZero()
}
