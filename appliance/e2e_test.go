package appliance_test

import (
	"context"
	"errors"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"tailscale.com/tsnet"

	"github.com/threes-dev/threes/appliance"
	"github.com/threes-dev/threes/appliance/threestest"
	"github.com/threes-dev/threes/hv"
	"github.com/threes-dev/threes/hv/hvtest"
	"github.com/threes-dev/threes/internal/netnstest"
	threesv1 "github.com/threes-dev/threes/proto/threes/v1"
	"github.com/threes-dev/threes/tsauth"
	"github.com/threes-dev/threes/tsauth/control"
	"github.com/threes-dev/threes/tsauth/control/headscaletest"
	"github.com/threes-dev/threes/tsauth/policy"
)

// operatorPolicy is the tailnet owner's own policy: the appliance's tag, and the grant
// that makes user threes an admin of the appliance.
const operatorPolicy = `{
	// The owner's own comment, which threes must keep.
	"tagOwners": {"tag:threes": ["threes@"]},
	"grants": [
		{"src": ["threes@"], "dst": ["tag:threes"], "ip": ["tcp:9999"], "app": {"threes.dev/cap/threes": [{"role": "admin"}]}},
	],
}
`

// udhcpcScript puts the lease on the interface, as a distribution's script would.
const udhcpcScript = `#!/bin/sh
case "$1" in
bound|renew) ip addr flush dev "$interface"; ip addr add "$ip/$mask" dev "$interface" ;;
esac
`

// TestVMOnHeadscale runs the whole path but QEMU against a real headscale: the
// appliance joins it, a user gets admin by the policy's grant, a network becomes
// policy, a VM's stand-in on the bridge gets its address by DHCP and its auth key
// from the metadata server (once), joins the tailnet with the network's tag, and
// deleting the VM takes its device off the tailnet.
func TestVMOnHeadscale(t *testing.T) {
	netnstest.Require(t, "busybox")
	hs := headscaletest.Start(t)
	headscaletest.SetClientEnv(t)
	ctx := ctxT(t)
	hs.SetPolicy(t, operatorPolicy)

	plane, err := control.NewHeadscale(control.HeadscaleConfig{
		URL: hs.URL, APIKey: control.NewSecret(hs.APIKey),
		Policy: policy.Options{OwnerTag: "tag:threes", Admins: []string{"threes@"}},
	})
	if err != nil {
		t.Fatal(err)
	}
	hyper := &flakyHV{Hypervisor: hvtest.Open(t)}
	br := netnstest.NewNS(t, "br")
	br.Bridge(t, "threes0", "10.10.0.1/16")
	dir := t.TempDir()
	threestest.SeedImages(t, dir, "base")
	a, err := appliance.Start(ctx, appliance.Options{
		StateDir:    dir,
		ControlURL:  hs.URL,
		AuthKey:     hs.PreauthKey(t, "tag:threes"),
		OwnerTag:    "tag:threes", // the key tags the node; headscale refuses advertised tags on top
		Socket:      filepath.Join(dir, "threes.sock"),
		Hypervisor:  hyper,
		Plane:       plane,
		BridgeNetNS: br.Name,
		Logger:      slog.New(slog.NewTextHandler(tWriter{t}, nil)),
		TSLogf:      func(string, ...any) {},
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { a.Close() })
	st, err := a.Tailnet().Up(ctx)
	if err != nil {
		t.Fatal(err)
	}

	// An admin by the real policy's grant, calling over the tailnet.
	laptop := hs.Node(t, "laptop", hs.PreauthKey(t))
	api := apiVia(t, laptop, st.TailscaleIPs[0])
	me := must[*threesv1.WhoAmIResponse](t)(api.WhoAmI(ctx, &threesv1.WhoAmIRequest{}))
	if me.GetRole() != "admin" || me.GetLogin() == "" {
		t.Fatalf("whoami = %v, want a user with admin from the policy grant", me)
	}

	must[*threesv1.Network](t)(api.CreateNetwork(ctx, &threesv1.NetworkRequest{Name: "cool-network"}))
	if pol := hs.Policy(t); !strings.Contains(pol, `"tag:threes-cool-network"`) || !strings.Contains(pol, "The owner's own comment") {
		t.Fatalf("policy after network create:\n%s", pol)
	}
	// A create that fails after its key was minted revokes the key and leaves
	// nothing behind.
	hyper.failCreate.Store(true)
	_, err = api.Create(ctx, &threesv1.CreateRequest{Name: "broken", Network: "cool-network", Image: "base", Type: threesv1.VMType_VM_TYPE_TEENY})
	hyper.failCreate.Store(false)
	if err == nil || !strings.Contains(err.Error(), "injected") {
		t.Fatalf("create with a failing hypervisor = %v", err)
	}
	if vms := all(t, ctx, api, true); len(vms) != 0 {
		t.Fatalf("failed create left %v", vms)
	}
	keys := networkKeys(t, hs, "tag:threes-cool-network")
	if len(keys) != 1 || keys[0].Expiration.After(time.Now()) {
		t.Fatalf("keys after the failed create = %+v, want one, expired", keys)
	}

	vm := must[*threesv1.VM](t)(api.Create(ctx, &threesv1.CreateRequest{Name: "vm1", Network: "cool-network", Image: "base", Type: threesv1.VMType_VM_TYPE_TEENY}))

	// The VM's stand-in: its MAC on the bridge, its address from DHCP.
	mac, _ := net.ParseMAC(vm.GetMac())
	guest := br.Plug(t, "threes0", "vm", mac, "")
	script := filepath.Join(t.TempDir(), "udhcpc.sh")
	os.WriteFile(script, []byte(udhcpcScript), 0o755)
	guest.Run(t, "busybox", "udhcpc", "-i", "eth0", "-n", "-q", "-t", "5", "-s", script)
	if out := guest.Run(t, "ip", "-4", "addr", "show", "eth0"); !strings.Contains(out, vm.GetManagementIp()+"/16") {
		t.Fatalf("guest got %s, want %s", out, vm.GetManagementIp())
	}

	// Its auth key, once.
	fetch := func(path string) (string, error) {
		out, err := guest.Command("busybox", "wget", "-q", "-O", "-", "--header", "Metadata-Flavor: threes", "http://10.10.0.1"+path).CombinedOutput()
		return strings.TrimSpace(string(out)), err
	}
	key, err := fetch("/v1/token")
	if err != nil || key == "" {
		t.Fatalf("fetch token: %v %q", err, key)
	}
	if again, err := fetch("/v1/token"); err == nil {
		t.Fatalf("token served twice: %q", again)
	}
	if host, err := fetch("/v1/hostname"); err != nil || host != "vm1" {
		t.Fatalf("hostname = %q, %v", host, err)
	}

	// Joining with it puts the VM on the tailnet with its network's tag.
	vmNode := hs.Node(t, "vm1", key)
	ip4, _ := vmNode.TailscaleIPs()
	lc, err := a.Tailnet().LocalClient()
	if err != nil {
		t.Fatal(err)
	}
	who, err := lc.WhoIs(ctx, ip4.String())
	if err != nil || !slices.Contains(who.Node.Tags, "tag:threes-cool-network") {
		t.Fatalf("whois vm = %v, %v; want tag:threes-cool-network", who, err)
	}

	// Delete takes it off the tailnet; purge and the network's delete leave the
	// owner's policy as it was.
	must[*threesv1.VM](t)(api.Delete(ctx, &threesv1.VMRef{Id: vm.GetId()}))
	if hs.HasNode(t, "vm1") {
		t.Fatal("vm's device still on the tailnet after delete")
	}
	must[*threesv1.PurgeResponse](t)(api.Purge(ctx, &threesv1.PurgeRequest{}))
	must[any](t)(api.DeleteNetwork(ctx, &threesv1.NetworkRequest{Name: "cool-network"}))
	if pol := hs.Policy(t); strings.Contains(pol, "cool-network") {
		t.Fatalf("policy after network delete still names it:\n%s", pol)
	}
}

type tWriter struct{ t testing.TB }

func (w tWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimSuffix(string(p), "\n"))
	return len(p), nil
}

func apiVia(t *testing.T, node *tsnet.Server, ip netip.Addr) threesv1.ThreesClient {
	dial := tsauth.TailnetDialer(node)
	conn, err := grpc.NewClient("passthrough:///"+netip.AddrPortFrom(ip, 9999).String(),
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithContextDialer(func(ctx context.Context, addr string) (net.Conn, error) { return dial(ctx, "tcp", addr) }))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return threesv1.NewThreesClient(conn)
}

// flakyHV is the real hypervisor with a switch that makes Create fail, to check
// that a create undoes the steps before it.
type flakyHV struct {
	hv.Hypervisor
	failCreate atomic.Bool
}

func (f *flakyHV) Create(ctx context.Context, s hv.Spec) error {
	if f.failCreate.Load() {
		return errors.New("injected hypervisor failure")
	}
	return f.Hypervisor.Create(ctx, s)
}

type hsKey struct {
	ID         string    `json:"id"`
	Used       bool      `json:"used"`
	Expiration time.Time `json:"expiration"`
	ACLTags    []string  `json:"aclTags"`
}

// networkKeys lists headscale's pre-auth keys that carry tag.
func networkKeys(t *testing.T, hs *headscaletest.Server, tag string) []hsKey {
	var list struct {
		PreAuthKeys []hsKey `json:"preAuthKeys"`
	}
	hs.API(t, http.MethodGet, "/preauthkey", nil, &list)
	var out []hsKey
	for _, k := range list.PreAuthKeys {
		if slices.Contains(k.ACLTags, tag) {
			out = append(out, k)
		}
	}
	return out
}
