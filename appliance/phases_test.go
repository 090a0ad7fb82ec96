package appliance_test

import (
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"tailscale.com/ipn"

	"github.com/threes-dev/threes/appliance"
	"github.com/threes-dev/threes/appliance/threestest"
	"github.com/threes-dev/threes/hv/hvtest"
	"github.com/threes-dev/threes/internal/netnstest"
	threesv1 "github.com/threes-dev/threes/proto/threes/v1"
	"github.com/threes-dev/threes/tsauth/control"
	"github.com/threes-dev/threes/tsauth/control/headscaletest"
	"github.com/threes-dev/threes/tsauth/policy"
)

// hsNodes lists headscale's nodes by ID: name is the hostname the node reports.
func hsNodes(t *testing.T, hs *headscaletest.Server) map[string]string {
	var out struct {
		Nodes []struct {
			ID   string `json:"id"`
			Name string `json:"name"`
		} `json:"nodes"`
	}
	hs.API(t, http.MethodGet, "/node", nil, &out)
	m := map[string]string{}
	for _, n := range out.Nodes {
		m[n.ID] = n.Name
	}
	return m
}

// TestPhasesOnHeadscale: a VM's stand-in on the bridge (DHCP client, metadata
// fetches, a tsnet node joining a real headscale with the key it fetched) goes
// through every phase, and Watch reports each as it is recorded, in order. The
// appliance records the node it joined as; when root in the guest renames the node,
// delete still takes that device off the tailnet (issue 10 item 5: removal went by
// the hostname the guest reports).
func TestPhasesOnHeadscale(t *testing.T) {
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
	br := netnstest.NewNS(t, "br")
	br.Bridge(t, "threes0", "10.10.0.1/16")
	dir := t.TempDir()
	threestest.SeedImages(t, dir, "base")
	a, err := appliance.Start(ctx, appliance.Options{
		StateDir: dir, ControlURL: hs.URL, AuthKey: hs.PreauthKey(t, "tag:threes"), OwnerTag: "tag:threes",
		Socket: filepath.Join(dir, "threes.sock"), Hypervisor: hvtest.Open(t), Plane: plane, BridgeNetNS: br.Name,
		Logger: slog.New(slog.NewTextHandler(tWriter{t}, nil)), TSLogf: func(string, ...any) {},
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { a.Close() })
	st, err := a.Tailnet().Up(ctx)
	if err != nil {
		t.Fatal(err)
	}
	laptop := hs.Node(t, "laptop", hs.PreauthKey(t))
	api := apiVia(t, laptop, st.TailscaleIPs[0])
	must[*threesv1.Network](t)(api.CreateNetwork(ctx, &threesv1.NetworkRequest{Name: "cool-network"}))

	vm := must[*threesv1.VM](t)(api.Create(ctx, &threesv1.CreateRequest{Name: "vm1", Network: "cool-network", Image: "base", Type: threesv1.VMType_VM_TYPE_TEENY}))
	if got := phaseNames(vm); !slices.Equal(got, []string{"defined", "running"}) {
		t.Fatalf("phases after create = %v, want defined, running", got)
	}

	// Watch, as create --wait does: each phase once, in order, as it is recorded.
	watch, err := api.Watch(ctx, &threesv1.VMRef{Id: vm.GetId()})
	if err != nil {
		t.Fatal(err)
	}
	var seen []string
	next := func(want string) *threesv1.VM {
		t.Helper()
		for {
			got, err := watch.Recv()
			if err != nil {
				t.Fatalf("watch, waiting for %s: %v (seen %v)", want, err, seen)
			}
			for _, p := range phaseNames(got)[len(seen):] {
				seen = append(seen, p)
			}
			if slices.Contains(seen, want) {
				return got
			}
		}
	}
	next("running")

	mac, _ := net.ParseMAC(vm.GetMac())
	guest := br.Plug(t, "threes0", "vm", mac, "")
	script := filepath.Join(t.TempDir(), "udhcpc.sh")
	os.WriteFile(script, []byte(udhcpcScript), 0o755)
	guest.Run(t, "busybox", "udhcpc", "-i", "eth0", "-n", "-q", "-t", "5", "-s", script)
	next("address_leased")

	fetch := func(path string) (string, error) {
		out, err := guest.Command("busybox", "wget", "-q", "-O", "-", "--header", "Metadata-Flavor: threes", "http://10.10.0.1"+path).CombinedOutput()
		return strings.TrimSpace(string(out)), err
	}
	if host, err := fetch("/v1/hostname"); err != nil || host != "vm1" {
		t.Fatalf("hostname = %q, %v", host, err)
	}
	next("config_fetched")
	key, err := fetch("/v1/token")
	if err != nil || key == "" {
		t.Fatalf("fetch token: %v", err)
	}
	next("key_taken")

	vmNode := hs.Node(t, "vm1", key)
	joined := next("on_tailnet")
	want := []string{"defined", "running", "address_leased", "config_fetched", "key_taken", "on_tailnet"}
	if !slices.Equal(seen, want) || !slices.Equal(phaseNames(joined), want) {
		t.Fatalf("phases seen by watch %v, recorded %v; want %v", seen, phaseNames(joined), want)
	}
	for i, p := range joined.GetPhases() {
		if p.GetError() != "" || (i > 0 && p.GetAt().AsTime().Before(joined.GetPhases()[i-1].GetAt().AsTime())) {
			t.Fatalf("phase %v out of order or failed: %v", p, joined.GetPhases())
		}
	}
	node := joined.GetTailnetNodeId()
	if nodes := hsNodes(t, hs); node == "" || nodes[node] != "vm1" {
		t.Fatalf("recorded node %q; headscale's nodes %v", node, nodes)
	}
	// Asking for the key again (a reboot) does not fail a phase it reached.
	if _, err := fetch("/v1/token"); err == nil {
		t.Fatal("token served twice")
	}

	// Root in the guest renames its node.
	lc, err := vmNode.LocalClient()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := lc.EditPrefs(ctx, &ipn.MaskedPrefs{Prefs: ipn.Prefs{Hostname: "innocent"}, HostnameSet: true}); err != nil {
		t.Fatal(err)
	}
	for hsNodes(t, hs)[node] != "innocent" {
		if ctx.Err() != nil {
			t.Fatalf("headscale never saw the rename: %v", hsNodes(t, hs))
		}
		time.Sleep(100 * time.Millisecond)
	}

	// Delete removes the node it joined as, renamed or not; purge and the
	// network's delete go through (no device left holds the tag).
	must[*threesv1.VM](t)(api.Delete(ctx, &threesv1.VMRef{Id: vm.GetId()}))
	if nodes := hsNodes(t, hs); nodes[node] != "" {
		t.Fatalf("vm's renamed device %s (%s) still on the tailnet after delete", node, nodes[node])
	}
	must[*threesv1.PurgeResponse](t)(api.Purge(ctx, &threesv1.PurgeRequest{}))
	must[any](t)(api.DeleteNetwork(ctx, &threesv1.NetworkRequest{Name: "cool-network"}))
	// Watch ends when the VM is purged.
	for {
		if _, err := watch.Recv(); err != nil {
			if err != io.EOF {
				t.Fatalf("watch after purge ended with %v, want its end", err)
			}
			break
		}
	}
}

func phaseNames(vm *threesv1.VM) []string {
	var out []string
	for _, p := range vm.GetPhases() {
		out = append(out, strings.ToLower(strings.TrimPrefix(p.GetPhase().String(), "VM_PHASE_")))
	}
	return out
}
