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
	l := startLab(t)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	a, c, hs := l.a, l.c, l.hs

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

	// The appliance saw every phase, in order, with no error.
	got := waitPhase(t, ctx, c, vm.GetId(), threesv1.VMPhase_VM_PHASE_ON_TAILNET)
	var seen []threesv1.VMPhase
	for i, p := range got.GetPhases() {
		seen = append(seen, p.GetPhase())
		if p.GetError() != "" {
			t.Errorf("phase %v failed: %s", p.GetPhase(), p.GetError())
		}
		if i > 0 && p.GetAt().AsTime().Before(got.GetPhases()[i-1].GetAt().AsTime()) {
			t.Errorf("phase %v at %v, before the one before it", p.GetPhase(), p.GetAt().AsTime())
		}
	}
	want := []threesv1.VMPhase{threesv1.VMPhase_VM_PHASE_DEFINED, threesv1.VMPhase_VM_PHASE_RUNNING,
		threesv1.VMPhase_VM_PHASE_ADDRESS_LEASED, threesv1.VMPhase_VM_PHASE_CONFIG_FETCHED,
		threesv1.VMPhase_VM_PHASE_KEY_TAKEN, threesv1.VMPhase_VM_PHASE_ON_TAILNET}
	if !slices.Equal(seen, want) {
		t.Errorf("phases %v, want %v", seen, want)
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

// lab is an appliance on real QEMU joined to a real headscale that listens on
// the bridge's address (where guests reach it, as a user's LAN would route
// them), with the lab image imported and a network "lab".
type lab struct {
	a   *appliance.Appliance
	c   threesv1.ThreesClient
	hs  *headscaletest.Server
	dir string // the lab image
}

func startLab(tb testing.TB) *lab {
	l := &lab{dir: hvtest.LabImageDir(tb)}
	q := hvtest.OpenQEMU(tb, hv.Config{StopTimeout: 2 * time.Minute})
	const gw, cidr = "10.78.0.1", "10.78.0.0/24"
	if out, err := exec.Command("ip", "addr", "add", gw+"/24", "dev", q.Bridge).CombinedOutput(); err != nil {
		tb.Fatalf("address the bridge: %v %s", err, out)
	}
	l.hs = headscaletest.StartOn(tb, netip.MustParseAddr(gw))
	headscaletest.SetClientEnv(tb)
	l.hs.SetPolicy(tb, operatorPolicy)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()

	plane, err := control.NewHeadscale(control.HeadscaleConfig{
		URL: l.hs.URL, APIKey: control.NewSecret(l.hs.APIKey),
		Policy: policy.Options{OwnerTag: "tag:threes", Admins: []string{"threes@"}},
	})
	if err != nil {
		tb.Fatal(err)
	}
	l.a, err = appliance.Start(ctx, appliance.Options{
		StateDir:   q.Dir,
		ControlURL: l.hs.URL,
		AuthKey:    l.hs.PreauthKey(tb, "tag:threes"),
		OwnerTag:   "tag:threes",
		Socket:     filepath.Join(q.Dir, "threes.sock"),
		CIDR:       cidr,
		Bridge:     q.Bridge,
		Hypervisor: q.H,
		Plane:      plane,
		Logger:     slog.New(slog.NewTextHandler(tWriter{tb}, nil)),
		TSLogf:     func(string, ...any) {},
	})
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { l.a.Close() })
	if _, err := l.a.Tailnet().Up(ctx); err != nil {
		tb.Fatal(err)
	}
	conn, err := grpc.NewClient("unix:"+filepath.Join(q.Dir, "threes.sock"), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { conn.Close() })
	l.c = threesv1.NewThreesClient(conn)
	uploadImage(tb, ctx, l.c, "lab", l.dir)
	must[*threesv1.Network](tb)(l.c.CreateNetwork(ctx, &threesv1.NetworkRequest{Name: "lab"}))
	return l
}

// waitPhase polls the VM until it has reached phase (up to two minutes).
func waitPhase(tb testing.TB, ctx context.Context, c threesv1.ThreesClient, id string, phase threesv1.VMPhase) *threesv1.VM {
	tb.Helper()
	for deadline := time.Now().Add(2 * time.Minute); ; time.Sleep(200 * time.Millisecond) {
		vm, err := c.Get(ctx, &threesv1.VMRef{Id: id})
		if err != nil {
			tb.Fatal(err)
		}
		for _, p := range vm.GetPhases() {
			if p.GetPhase() == phase {
				return vm
			}
		}
		if time.Now().After(deadline) {
			tb.Fatalf("VM %s did not reach %v; phases %v", id, phase, vm.GetPhases())
		}
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

// BenchmarkJourney times a VM's way onto the tailnet: from `vm create` to each
// phase the appliance records, and to the guest's first line from userspace
// ("threes-test: init") on its console. Beside it, in the same run, the same lab
// image booted by plain qemu-system-x86_64 (TCG, same memory and vCPU, no threes,
// no libvirt) to the same line: the overhead threes adds on the way to a running
// guest, as a ratio.
func BenchmarkJourney(b *testing.B) {
	l := startLab(b)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Minute)
	defer cancel()
	phaseMS := map[threesv1.VMPhase]float64{}
	var initMS, plainMS float64
	for i := 0; i < b.N; i++ {
		start := time.Now()
		vm := must[*threesv1.VM](b)(l.c.Create(ctx, &threesv1.CreateRequest{Name: fmt.Sprintf("bench%d", i), Network: "lab", Image: "lab", Type: threesv1.VMType_VM_TYPE_TEENY}))
		con := hvtest.WatchConsole(b, apiConsole(b, ctx, l.c, vm.GetId()))
		con.WaitFor(b, "threes-test: init", 3*time.Minute)
		initMS += float64(time.Since(start).Milliseconds())
		got := waitPhase(b, ctx, l.c, vm.GetId(), threesv1.VMPhase_VM_PHASE_ON_TAILNET)
		for _, p := range got.GetPhases() {
			phaseMS[p.GetPhase()] += float64(p.GetAt().AsTime().Sub(start).Milliseconds())
		}
		must[*threesv1.VM](b)(l.c.Delete(ctx, &threesv1.VMRef{Id: vm.GetId()}))
		must[*threesv1.PurgeResponse](b)(l.c.Purge(ctx, &threesv1.PurgeRequest{}))

		plainMS += float64(plainQEMUToInit(b, l.dir).Milliseconds())
	}
	n := float64(b.N)
	for p, ms := range phaseMS {
		b.ReportMetric(ms/n, "ms-to-"+strings.ToLower(strings.TrimPrefix(p.String(), "VM_PHASE_")))
	}
	b.ReportMetric(initMS/n, "ms-to-init")
	b.ReportMetric(plainMS/n, "ms-to-init-plain-qemu")
	b.ReportMetric(initMS/plainMS, "x-init-vs-plain-qemu")
}

// plainQEMUToInit boots the image in dir with qemu-system-x86_64 alone, as a user
// would by hand, and returns the time until its first userspace line.
func plainQEMUToInit(b *testing.B, dir string) time.Duration {
	b.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	// The size of a teeny VM; DHCP off, since nothing serves it here.
	cmd := exec.CommandContext(ctx, "qemu-system-x86_64", "-accel", "tcg", "-m", "512", "-smp", "1",
		"-nodefaults", "-nographic", "-no-reboot", "-serial", "stdio", "-monitor", "none",
		"-kernel", filepath.Join(dir, "vmlinuz"), "-initrd", filepath.Join(dir, "initrd.img"),
		"-append", "console=ttyS0 panic=-1 threes.dhcp=off")
	out, err := cmd.StdoutPipe()
	if err != nil {
		b.Fatal(err)
	}
	start := time.Now()
	if err := cmd.Start(); err != nil {
		b.Fatalf("qemu-system-x86_64: %v", err)
	}
	defer func() { cmd.Process.Kill(); cmd.Wait() }()
	con := hvtest.WatchConsole(b, struct {
		io.ReadCloser
		io.Writer
	}{out, io.Discard})
	con.WaitFor(b, "threes-test: init", 3*time.Minute)
	return time.Since(start)
}
