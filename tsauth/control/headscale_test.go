package control_test

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"net/http"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"tailscale.com/tsnet"

	"github.com/threes-dev/threes/tsauth/control"
	"github.com/threes-dev/threes/tsauth/control/headscaletest"
	"github.com/threes-dev/threes/tsauth/policy"
)

// hsBasePolicy is the operator's own policy: their tag for the appliance, a rule
// of theirs and comments, all of which must survive threes' edits.
const hsBasePolicy = `// The operator's policy.
{
	"tagOwners": {
		// The appliance joins with this tag.
		"tag:threes": ["threes@"],
	},
	"grants": [
		// The operator runs the appliance.
		{"src": ["threes@"], "dst": ["tag:threes"], "ip": ["tcp:9999"], "app": {"threes.dev/cap/threes": [{"role": "admin"}]}},
	],
}
`

// node is one tsnet node joined to headscale.
type node struct {
	name string
	s    *tsnet.Server
	ip   netip.Addr
}

func joinNodes(t *testing.T, hs *headscaletest.Server, keys map[string]control.AuthKey) map[string]*node {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	var mu sync.Mutex
	nodes := map[string]*node{}
	var wg sync.WaitGroup
	errs := make(chan error, len(keys))
	for name, key := range keys {
		s := &tsnet.Server{
			Dir:        t.TempDir(),
			Hostname:   name,
			ControlURL: hs.URL,
			AuthKey:    key.Key.Reveal(),
			Logf:       func(string, ...any) {},
			UserLogf:   func(string, ...any) {},
		}
		t.Cleanup(func() { s.Close() })
		wg.Go(func() {
			st, err := s.Up(ctx)
			if err != nil {
				errs <- fmt.Errorf("%s up: %w", name, err)
				return
			}
			mu.Lock()
			nodes[name] = &node{name: name, s: s, ip: st.TailscaleIPs[0]}
			mu.Unlock()
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	return nodes
}

// serve answers every connection on port with the node's name.
func (n *node) serve(t *testing.T, port int) {
	t.Helper()
	ln, err := n.s.Listen("tcp", fmt.Sprintf(":%d", port))
	if err != nil {
		t.Fatalf("%s listen %d: %v", n.name, port, err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			fmt.Fprintf(c, "%s\n", n.name)
			c.Close()
		}
	}()
}

// errNotRouted means the dialer would not carry the address over the tailnet;
// such an address is never dialed (tsnet would fall back to the host network).
var errNotRouted = errors.New("not routed over the tailnet")

// greet connects from n to dst:port over the tailnet and reads the greeting.
func (n *node) greet(ctx context.Context, dst *node, port uint16) (string, error) {
	addr := netip.AddrPortFrom(dst.ip, port).String()
	_, via, err := n.s.Sys().Dialer.Get().UserDialPlan(ctx, "tcp", addr)
	if err != nil {
		return "", err
	}
	if !via {
		return "", errNotRouted
	}
	c, err := n.s.Dial(ctx, "tcp", addr)
	if err != nil {
		return "", err
	}
	defer c.Close()
	if d, ok := ctx.Deadline(); ok {
		c.SetDeadline(d)
	}
	line, err := bufio.NewReader(c).ReadString('\n')
	return strings.TrimSpace(line), err
}

// waitPeer polls until n's netmap holds peer and both have a home DERP: a
// handshake sent before that is dropped, and WireGuard retries only after 5 s.
func waitPeer(t *testing.T, n, peer *node) {
	t.Helper()
	lc, err := n.s.LocalClient()
	if err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(time.Minute)
	for {
		st, err := lc.Status(context.Background())
		if err == nil && st.Self != nil && st.Self.Relay != "" {
			for _, p := range st.Peer {
				// Relay is the peer's home DERP: known means packets have a way.
				if slices.Contains(p.TailscaleIPs, peer.ip) && p.Relay != "" {
					return
				}
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s never saw %s in its netmap (last error %v)", n.name, peer.name, err)
		}
		time.Sleep(50 * time.Millisecond) // no change notification short of the IPN bus
	}
}

// eventuallyGreets polls until n reaches dst:port, as the netmap with the new
// peers and filters reaches the nodes a moment after they come up.
func eventuallyGreets(t *testing.T, n, dst *node, port uint16) {
	t.Helper()
	deadline := time.Now().Add(time.Minute)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		t1 := time.Now()
		got, err := n.greet(ctx, dst, port)
		cancel()
		if err == nil && got == dst.name {
			return
		}
		t.Logf("%s -> %s:%d after %v: %q, %v; trying again", n.name, dst.name, port, time.Since(t1).Round(time.Millisecond), got, err)
		if time.Now().After(deadline) {
			t.Fatalf("%s -> %s:%d: got %q, %v", n.name, dst.name, port, got, err)
		}
	}
}

func TestHeadscaleNetworks(t *testing.T) {
	t0 := time.Now()
	phase := func(what string) { t.Logf("%6.2fs %s", time.Since(t0).Seconds(), what) }
	hs := headscaletest.Start(t)
	phase("headscale up")
	headscaletest.SetClientEnv(t)
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()

	hs.SetPolicy(t, hsBasePolicy)

	plane, err := control.NewHeadscale(control.HeadscaleConfig{
		URL:    hs.URL,
		APIKey: control.NewSecret(hs.APIKey),
		Policy: policy.Options{OwnerTag: "tag:threes", Admins: []string{"threes@"}},
	})
	if err != nil {
		t.Fatal(err)
	}
	for _, nw := range []string{"cool-network", "other"} {
		if err := plane.EnsureNetwork(ctx, nw); err != nil {
			t.Fatal(err)
		}
	}
	withNets := hs.Policy(t)
	if err := plane.EnsureNetwork(ctx, "cool-network"); err != nil {
		t.Fatal(err)
	}
	if again := hs.Policy(t); again != withNets {
		t.Fatalf("second EnsureNetwork changed the policy:\n%s\nvs\n%s", again, withNets)
	}
	// Every line of the operator's stays, in order: threes only inserted lines.
	rest := strings.Split(withNets, "\n")
	for _, line := range strings.Split(hsBasePolicy, "\n") {
		i := slices.Index(rest, line)
		if i < 0 {
			t.Fatalf("operator's line %q changed or moved:\n%s", line, withNets)
		}
		rest = rest[i+1:]
	}

	keys := map[string]control.AuthKey{}
	for name, nw := range map[string]string{"vm-a1": "cool-network", "vm-a2": "cool-network", "vm-o1": "other"} {
		k, err := plane.MintAuthKey(ctx, control.KeyRequest{Network: nw, VMID: name, Expiry: 10 * time.Minute})
		if err != nil {
			t.Fatal(err)
		}
		keys[name] = k
	}
	phase("networks and keys")
	nodes := joinNodes(t, hs, keys)
	phase("three nodes up")
	a1, a2, o1 := nodes["vm-a1"], nodes["vm-a2"], nodes["vm-o1"]
	for _, n := range nodes {
		n.serve(t, 8080)
		n.serve(t, 443)
	}

	// WhoIs on a member shows the network's tag and no user's ownership.
	lc, err := a2.s.LocalClient()
	if err != nil {
		t.Fatal(err)
	}
	who, err := lc.WhoIs(ctx, a1.ip.String())
	if err != nil {
		t.Fatalf("whois vm-a1: %v", err)
	}
	if !slices.Equal(who.Node.Tags, []string{"tag:threes-cool-network"}) {
		t.Errorf("WhoIs(vm-a1).Node.Tags = %v", who.Node.Tags)
	}

	// Members reach each other on any port; the tailnet reaches 443.
	for _, pair := range [][2]*node{{a1, a2}, {a2, a1}, {o1, a2}, {a2, o1}} {
		waitPeer(t, pair[0], pair[1])
	}
	phase("peers in netmaps")
	eventuallyGreets(t, a1, a2, 8080)
	eventuallyGreets(t, a2, a1, 8080)
	eventuallyGreets(t, o1, a2, 443)
	phase("members reach each other, the tailnet reaches 443")

	// A node outside the network is routed to the member (443 is open to it) but
	// its connection to another port is dropped by the member's filter.
	refused, cancelRefused := context.WithTimeout(ctx, 3*time.Second)
	got, err := o1.greet(refused, a2, 8080)
	cancelRefused()
	if err == nil || errors.Is(err, errNotRouted) {
		t.Errorf("vm-o1 -> vm-a2:8080 = %q, %v; want a dropped connection", got, err)
	}

	phase("outsider refused")
	if err := plane.RemoveNetwork(ctx, "cool-network"); !errors.Is(err, control.ErrNetworkInUse) {
		t.Errorf("RemoveNetwork while members exist = %v, want ErrNetworkInUse", err)
	}

	// Each device names the key it joined with (headscale records it; the guest
	// cannot change it), and deleting the VM removes its device by ID and nothing else.
	devs, err := plane.Devices(ctx)
	if err != nil {
		t.Fatal(err)
	}
	ids := map[string]string{}
	for _, d := range devs {
		if want := keys[d.Hostname].ID; d.AuthKeyID != want || want == "" {
			t.Errorf("device %s (%s) joined with key %q, want %q", d.Hostname, d.ID, d.AuthKeyID, want)
		}
		ids[d.Hostname] = d.ID
	}
	if err := plane.RemoveDevice(ctx, ids["vm-a1"]); err != nil {
		t.Fatal(err)
	}
	if devs, err = plane.Devices(ctx); err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, d := range devs {
		names = append(names, d.Hostname)
	}
	slices.Sort(names)
	if !slices.Equal(names, []string{"vm-a2", "vm-o1"}) {
		t.Errorf("devices after removing vm-a1: %v", names)
	}
	if err := plane.RemoveDevice(ctx, ids["vm-a1"]); err != nil {
		t.Errorf("removing a removed device: %v", err)
	}

	// A key never used is revoked.
	unused, err := plane.MintAuthKey(ctx, control.KeyRequest{Network: "other", VMID: "vm-never"})
	if err != nil {
		t.Fatal(err)
	}
	if err := plane.RevokeAuthKey(ctx, unused.ID); err != nil {
		t.Fatal(err)
	}
	var list struct {
		PreAuthKeys []struct {
			ID         string    `json:"id"`
			Expiration time.Time `json:"expiration"`
			Used       bool      `json:"used"`
			Reusable   bool      `json:"reusable"`
			ACLTags    []string  `json:"aclTags"`
		} `json:"preAuthKeys"`
	}
	hs.API(t, http.MethodGet, "/preauthkey", nil, &list)
	for _, k := range list.PreAuthKeys {
		if k.Reusable {
			t.Errorf("key %s is reusable", k.ID)
		}
		if k.ID == unused.ID && k.Expiration.After(time.Now()) {
			t.Errorf("revoked key %s still expires at %v", k.ID, k.Expiration)
		}
		if k.ID == keys["vm-a1"].ID && !k.Used {
			t.Errorf("vm-a1's key %s not marked used", k.ID)
		}
	}

	// With every device gone, removing both networks gives back the operator's
	// policy byte for byte.
	for _, n := range []*node{a2, o1} {
		n.s.Close()
		if err := plane.RemoveDevice(ctx, ids[n.name]); err != nil {
			t.Fatal(err)
		}
	}
	for _, nw := range []string{"cool-network", "other"} {
		if err := plane.RemoveNetwork(ctx, nw); err != nil {
			t.Fatal(err)
		}
	}
	phase("cleanup")
	if got := hs.Policy(t); got != hsBasePolicy {
		t.Errorf("policy after removing the networks:\n%s\nwant\n%s", got, hsBasePolicy)
	}
}
