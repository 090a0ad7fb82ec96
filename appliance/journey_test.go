package appliance_test

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/netip"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"tailscale.com/tsnet"

	"github.com/threes-dev/threes/appliance"
	"github.com/threes-dev/threes/hv"
	"github.com/threes-dev/threes/hv/hvtest"
	threesv1 "github.com/threes-dev/threes/proto/threes/v1"
	"github.com/threes-dev/threes/tsauth"
	"github.com/threes-dev/threes/tsauth/control"
	"github.com/threes-dev/threes/tsauth/control/headscaletest"
	"github.com/threes-dev/threes/tsauth/policy"
)

// TestJourney is the promise, with nothing faked: `vm create`, and a little later
// a real guest (the lab image under QEMU TCG, Debian's kernel, busybox and a
// tailscaled built from the pinned module) is on the tailnet with its network's
// tag. It leases its address from threes' DHCP, reads its control URL and
// one-time key from the metadata server, joins headscale by itself, and headscale
// enforces the policy threes wrote: a member of the network reaches the guest's
// port 80, a user's laptop does not (it reaches only 443, which a network opens
// to the tailnet). Delete takes the device off the tailnet.
func TestJourney(t *testing.T) {
	lab := hvtest.LabImageDir(t)
	q := hvtest.OpenQEMU(t, hv.Config{StopTimeout: 2 * time.Minute})
	// The bridge's address is the VMs' gateway and where headscale listens, so
	// guests reach the control server the way a user's LAN would route them.
	const gw, cidr = "10.78.0.1", "10.78.0.0/24"
	if out, err := exec.Command("ip", "addr", "add", gw+"/24", "dev", q.Bridge).CombinedOutput(); err != nil {
		t.Fatalf("address the bridge: %v %s", err, out)
	}
	hs := headscaletest.StartOn(t, netip.MustParseAddr(gw))
	headscaletest.SetClientEnv(t)
	hs.SetPolicy(t, operatorPolicy)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()

	plane, err := control.NewHeadscale(control.HeadscaleConfig{
		URL: hs.URL, APIKey: control.NewSecret(hs.APIKey),
		Policy: policy.Options{OwnerTag: "tag:threes", Admins: []string{"threes@"}},
	})
	if err != nil {
		t.Fatal(err)
	}
	a, err := appliance.Start(ctx, appliance.Options{
		StateDir:   q.Dir,
		ControlURL: hs.URL,
		AuthKey:    hs.PreauthKey(t, "tag:threes"),
		OwnerTag:   "tag:threes",
		Socket:     filepath.Join(q.Dir, "threes.sock"),
		CIDR:       cidr,
		Bridge:     q.Bridge,
		Hypervisor: q.H,
		Plane:      plane,
		Logger:     slog.New(slog.NewTextHandler(tWriter{t}, nil)),
		TSLogf:     func(string, ...any) {},
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { a.Close() })
	if _, err := a.Tailnet().Up(ctx); err != nil {
		t.Fatal(err)
	}
	conn, err := grpc.NewClient("unix:"+filepath.Join(q.Dir, "threes.sock"), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	c := threesv1.NewThreesClient(conn)

	uploadImage(t, ctx, c, "lab", lab)
	must[*threesv1.Network](t)(c.CreateNetwork(ctx, &threesv1.NetworkRequest{Name: "lab"}))
	vm := must[*threesv1.VM](t)(c.Create(ctx, &threesv1.CreateRequest{Name: "lab1", Network: "lab", Image: "lab", Type: threesv1.VMType_VM_TYPE_TEENY}))
	con := hvtest.WatchConsole(t, apiConsole(t, ctx, c, vm.GetId()))
	con.WaitFor(t, "threes-test: ip "+vm.GetManagementIp(), 3*time.Minute)
	con.WaitFor(t, "threes-test: hostname lab1", time.Minute)
	m := con.WaitForMatch(t, regexp.MustCompile(`threes-test: tailnet (\S+)\r?\n`), 4*time.Minute)
	con.WaitFor(t, "threes-test: ready", time.Minute)
	ip, err := netip.ParseAddr(m[1])
	if err != nil {
		t.Fatalf("guest reports tailnet address %q: %v\n%s", m[1], err, con)
	}
	if strings.Contains(con.String(), "tskey") || strings.Contains(con.String(), "hskey") {
		t.Errorf("an auth key reached the console:\n%s", con)
	}

	const labTag = "tag:threes-lab"
	// The appliance's own node sees the guest as a peer with the network's tag.
	lc, err := a.Tailnet().LocalClient()
	if err != nil {
		t.Fatal(err)
	}
	var tags []string
	for deadline := time.Now().Add(time.Minute); ; time.Sleep(time.Second) {
		who, err := lc.WhoIs(ctx, ip.String())
		if err == nil {
			tags = who.Node.Tags
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the appliance does not see the guest at %v: %v", ip, err)
		}
	}
	if !slices.Contains(tags, labTag) {
		t.Fatalf("guest's tags %v, want %s", tags, labTag)
	}

	// Headscale enforces what threes wrote: a member reaches port 80, the
	// laptop of a user who is not a member reaches 443 but not 80.
	member := hs.Node(t, "member", hs.PreauthKey(t, labTag))
	laptop := hs.Node(t, "laptop", hs.PreauthKey(t))
	if body, err := getEventually(ctx, member, ip, 80); err != nil || body != "threes-lab lab1" {
		t.Errorf("member GET :80 = %q, %v; want the guest's page", body, err)
	}
	if body, err := getEventually(ctx, laptop, ip, 443); err != nil || body != "threes-lab lab1" {
		t.Errorf("laptop GET :443 = %q, %v; want the guest's page (networks open 443 to the tailnet)", body, err)
	}
	if body, err := getOver(ctx, laptop, ip, 80); err == nil {
		t.Errorf("laptop GET :80 = %q; a non-member reached a member-only port", body)
	}

	// Delete takes the guest's device off the tailnet; purge removes the rest.
	must[*threesv1.VM](t)(c.Delete(ctx, &threesv1.VMRef{Id: vm.GetId()}))
	if hs.HasNode(t, "lab1") {
		t.Error("the guest's device is still on the tailnet after delete")
	}
	must[*threesv1.PurgeResponse](t)(c.Purge(ctx, &threesv1.PurgeRequest{}))
	if _, err := hvtest.Virsh(t, "domstate", vm.GetId()); err == nil {
		t.Error("domain still defined after purge")
	}
}

// getEventually retries getOver for a minute: a node that just joined learns
// its peers from its next netmap.
func getEventually(ctx context.Context, node *tsnet.Server, ip netip.Addr, port uint16) (string, error) {
	deadline := time.Now().Add(time.Minute)
	for {
		body, err := getOver(ctx, node, ip, port)
		if err == nil || time.Now().After(deadline) {
			return body, err
		}
		time.Sleep(2 * time.Second)
	}
}

// getOver fetches http://ip:port/ through node's tailnet only, giving up after a
// few seconds (a port the policy closes drops packets rather than refusing).
func getOver(ctx context.Context, node *tsnet.Server, ip netip.Addr, port uint16) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, 20*time.Second)
	defer cancel()
	dial := tsauth.TailnetDialer(node)
	hc := &http.Client{Transport: &http.Transport{DialContext: dial, DisableKeepAlives: true}}
	req, err := http.NewRequestWithContext(ctx, "GET", fmt.Sprintf("http://%s/", netip.AddrPortFrom(ip, port)), nil)
	if err != nil {
		return "", err
	}
	resp, err := hc.Do(req)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return strings.TrimSpace(string(b)), err
}
