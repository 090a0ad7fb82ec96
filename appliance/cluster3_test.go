package appliance_test

import (
	"context"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/threes-dev/threes/appliance"
	"github.com/threes-dev/threes/appliance/fleet"
	"github.com/threes-dev/threes/appliance/threestest"
	"github.com/threes-dev/threes/hv"
	"github.com/threes-dev/threes/hv/hvtest"
	threesv1 "github.com/threes-dev/threes/proto/threes/v1"
	"github.com/threes-dev/threes/tsauth/tailnettest"
)

// clusterHost is one appliance of a test cluster.
type clusterHost struct {
	name string
	api  threesv1.ThreesClient // its local socket: root, an admin
	hv   hv.Hypervisor
	app  *appliance.Appliance
}

// startCluster starts n appliances on one tailnet (the first forms the cluster,
// the others join it by name), each with its own state, hypervisor connection
// and images, host i offering vcpus[i] vCPUs, and returns them with the first
// one's environment.
func startCluster(t *testing.T, vcpus ...int) (*threestest.Env, []clusterHost) {
	t.Helper()
	// Memory to spare: placement weighs the vCPUs.
	capacity := func(n int) fleet.Capacity {
		return fleet.Capacity{VCPUs: n, MemoryMiB: 1 << 20, CPUOvercommit: 1, MemoryOvercommit: 1}
	}
	var hvA hv.Hypervisor
	env := threestest.StartWith(t, func(o *appliance.Options) {
		o.Hostname = "threes-a"
		o.Tags = []string{fleet.DefaultOwnerTag}
		o.BootstrapExpect = 1
		o.Capacity = capacity(vcpus[0])
		hvA = o.Hypervisor
	})
	hosts := []clusterHost{{name: "threes-a", api: env.Local(t), hv: hvA, app: env.Appliance}}
	for i := 1; i < len(vcpus); i++ {
		o := env.Options
		o.Capacity = capacity(vcpus[i])
		o.Hostname = "threes-" + string(rune('a'+i))
		o.StateDir = t.TempDir()
		o.Socket = filepath.Join(o.StateDir, "threes.sock")
		o.Hypervisor = hvtest.Open(t)
		o.BootstrapExpect = 0
		o.Join = []string{"threes-a"}
		threestest.SeedImages(t, o.StateDir, "base")
		a, err := appliance.Start(ctxT(t), o)
		if err != nil {
			t.Fatalf("start %s: %v", o.Hostname, err)
		}
		t.Cleanup(func() { a.Close() })
		conn, err := grpc.NewClient("unix:"+o.Socket, grpc.WithTransportCredentials(insecure.NewCredentials()))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { conn.Close() })
		hosts = append(hosts, clusterHost{name: o.Hostname, api: threesv1.NewThreesClient(conn), hv: o.Hypervisor, app: a})
	}
	return env, hosts
}

// hostDomainState is the state of the domain of VM id among h's own domains (the
// hosts share one libvirtd, whose other domains h's List leaves out), and
// StateMissing when h has none.
func hostDomainState(t *testing.T, h clusterHost, id string) hv.State {
	t.Helper()
	doms, err := h.hv.List(ctxT(t))
	if err != nil {
		t.Fatalf("list %s's domains: %v", h.name, err)
	}
	for _, d := range doms {
		if d.ID == id {
			return d.State
		}
	}
	return hv.StateMissing
}

// TestClusterThreeAppliances: VMs created through any host run where the call
// or placement says, every host sees them, and a call that needs a VM's domain
// (stop, start, restart, console, delete, purge) made on another host is carried
// to the VM's.
func TestClusterThreeAppliances(t *testing.T) {
	env, hosts := startCluster(t, 2, 4, 3)
	ctx := ctxT(t)
	a, b, c := hosts[0], hosts[1], hosts[2]
	if _, err := a.api.CreateNetwork(ctx, &threesv1.NetworkRequest{Name: "lab"}); err != nil {
		t.Fatalf("create network: %v", err)
	}

	// Each VM is created through one host for another.
	type placed struct {
		via, on clusterHost
		vm      *threesv1.VM
	}
	var vms []placed
	for i, p := range [][2]clusterHost{{a, b}, {b, c}, {c, a}, {b, b}} {
		name := "vm-" + p[1].name + "-via-" + p[0].name
		vm, err := p[0].api.Create(ctx, &threesv1.CreateRequest{Name: name, Network: "lab", Image: "base",
			Type: threesv1.VMType_VM_TYPE_TEENY, Host: p[1].name})
		if err != nil {
			t.Fatalf("create %d (%s) through %s: %v", i, name, p[0].name, err)
		}
		if vm.GetHost() != p[1].name {
			t.Errorf("%s: host %q, want %q", name, vm.GetHost(), p[1].name)
		}
		vms = append(vms, placed{via: p[0], on: p[1], vm: vm})
	}

	// The domain is on the VM's host's hypervisor and no other, and every host
	// reports the VM alike.
	for _, p := range vms {
		for _, h := range hosts {
			st := hostDomainState(t, h, p.vm.GetId())
			mine := h.name == p.on.name
			if mine && st != hv.StateRunning {
				t.Errorf("%s on its host %s: %v, want running", p.vm.GetName(), h.name, st)
			}
			if !mine && st != hv.StateMissing {
				t.Errorf("%s has a domain on %s too (%v)", p.vm.GetName(), h.name, st)
			}
			got, err := h.api.Get(ctx, &threesv1.VMRef{Id: p.vm.GetId()})
			if err != nil || got.GetHost() != p.on.name || got.GetState() != threesv1.VMState_VM_STATE_RUNNING {
				t.Errorf("%s read through %s: host %q state %v (%v), want %s running", p.vm.GetName(), h.name, got.GetHost(), got.GetState(), err, p.on.name)
			}
		}
	}

	// Stop, start and restart through each of the other hosts.
	onC := vms[1].vm
	onCState := func(want hv.State) {
		t.Helper()
		if st := hostDomainState(t, c, onC.GetId()); st != want {
			t.Fatalf("domain of %s on threes-c: %v, want %v", onC.GetName(), st, want)
		}
	}
	if vm, err := a.api.Stop(ctx, &threesv1.VMRef{Id: onC.GetId()}); err != nil || vm.GetState() != threesv1.VMState_VM_STATE_STOPPED {
		t.Fatalf("stop of c's vm through a = %v %v, want stopped", vm.GetState(), err)
	}
	onCState(hv.StateStopped)

	// A console of a stopped VM is refused by its host, and that refusal (not
	// "runs on another host") is what the caller through another host gets.
	con, err := a.api.Console(ctx)
	if err != nil {
		t.Fatal(err)
	}
	con.Send(&threesv1.ConsoleInput{VmId: onC.GetId()})
	_, err = con.Recv()
	if status.Code(err) != codes.FailedPrecondition || !strings.Contains(err.Error(), "not running") {
		t.Fatalf("console of c's stopped vm through a = %v, want c's FailedPrecondition: not running", err)
	}

	if _, err := b.api.Start(ctx, &threesv1.VMRef{Id: onC.GetId()}); err != nil {
		t.Fatalf("start of c's vm through b: %v", err)
	}
	onCState(hv.StateRunning)
	if _, err := a.api.Restart(ctx, &threesv1.VMRef{Id: onC.GetId()}); err != nil {
		t.Fatalf("restart of c's vm through a: %v", err)
	}
	onCState(hv.StateRunning)

	// Delete through one host, purge several hosts' VMs in one call through another.
	for _, p := range vms[:3] {
		other := hosts[(slices.IndexFunc(hosts, func(h clusterHost) bool { return h.name == p.on.name })+1)%3]
		if _, err := other.api.Delete(ctx, &threesv1.VMRef{Id: p.vm.GetId()}); err != nil {
			t.Fatalf("delete %s through %s: %v", p.vm.GetName(), other.name, err)
		}
	}
	ids := []string{vms[0].vm.GetId(), vms[1].vm.GetId()}
	res, err := b.api.Purge(ctx, &threesv1.PurgeRequest{Ids: ids})
	if err != nil {
		t.Fatalf("purge of two hosts' vms through b: %v", err)
	}
	if got := res.GetIds(); len(got) != 2 {
		t.Errorf("purge through b purged %v, want all of %v", got, ids)
	}
	// No IDs: every deleted VM of the cluster (the one left is a's).
	res, err = b.api.Purge(ctx, &threesv1.PurgeRequest{})
	if err != nil || !slices.Equal(res.GetIds(), []string{vms[2].vm.GetId()}) {
		t.Fatalf("purge of all through b = %v, %v; want %s, a's", res.GetIds(), err, vms[2].vm.GetId())
	}
	for _, p := range vms[:3] {
		if st := hostDomainState(t, p.on, p.vm.GetId()); st != hv.StateMissing {
			t.Errorf("%s still has a domain on %s after purge (%v)", p.vm.GetName(), p.on.name, st)
		}
		if _, err := a.api.Get(ctx, &threesv1.VMRef{Id: p.vm.GetId()}); status.Code(err) != codes.NotFound {
			t.Errorf("%s after purge: %v, want NotFound", p.vm.GetName(), err)
		}
	}

	// Who may forward: only the cluster's hosts (the tag alone is not enough:
	// another deployment's appliances carry it too), and a forwarded call acts
	// with the role the forwarding host gave its caller.
	onB := vms[3].vm
	forged := func(role string) context.Context {
		return metadata.NewOutgoingContext(ctx, metadata.Pairs("threes-forwarded-for", "mallory", "threes-forwarded-role", role))
	}
	stranger := env.Dial(t, env.Tailnet.Node(t, tailnettest.NodeOptions{Hostname: "stranger", User: "eve@example.com"}))
	if _, err := stranger.Stop(forged("admin"), &threesv1.VMRef{Id: onB.GetId()}); status.Code(err) != codes.PermissionDenied {
		t.Errorf("a stranger's forged forwarded stop = %v, want PermissionDenied", err)
	}
	imposter := env.Dial(t, env.Tailnet.Node(t, tailnettest.NodeOptions{Hostname: "tagged", Tags: []string{fleet.DefaultOwnerTag}}))
	if _, err := imposter.Stop(forged("admin"), &threesv1.VMRef{Id: onB.GetId()}); status.Code(err) != codes.PermissionDenied {
		t.Errorf("a forwarded stop from a tagged node of no cluster = %v, want PermissionDenied", err)
	}
	fromC := env.Dial(t, c.app.Tailnet()) // a host of the cluster, calling a
	if _, err := fromC.Stop(forged("viewer"), &threesv1.VMRef{Id: onB.GetId()}); status.Code(err) != codes.PermissionDenied {
		t.Errorf("a forwarded stop for a viewer = %v, want PermissionDenied", err)
	}
	viewer := env.Client(t, threestest.ClientOptions{NodeOptions: tailnettest.NodeOptions{Hostname: "viewer", User: "vic@example.com"}, Role: "viewer"})
	if _, err := viewer.Stop(ctx, &threesv1.VMRef{Id: onB.GetId()}); status.Code(err) != codes.PermissionDenied {
		t.Errorf("a viewer's stop of b's vm through a = %v, want PermissionDenied", err)
	}
	if st := hostDomainState(t, b, onB.GetId()); st != hv.StateRunning {
		t.Fatalf("b's vm after refused stops: %v, want running", st)
	}
	// Placement. Live now: one teeny (1 vCPU) on b. Each goes where the
	// largest share of vCPUs is left once it is there: c (2 of 3) over a and b
	// (1 of 2, 2 of 4); then a and b tie at a half and a is first by name; then
	// b (2 of 4) over a (0 of 2) and c (1 of 3).
	for i, want := range []clusterHost{c, a, b} {
		via := hosts[i]
		vm, err := via.api.Create(ctx, &threesv1.CreateRequest{Name: "placed-" + string(rune('0'+i)), Network: "lab",
			Image: "base", Type: threesv1.VMType_VM_TYPE_TEENY})
		if err != nil {
			t.Fatalf("placed create %d through %s: %v", i, via.name, err)
		}
		if vm.GetHost() != want.name {
			t.Errorf("placed create %d through %s landed on %s, want %s", i, via.name, vm.GetHost(), want.name)
		}
		if st := hostDomainState(t, want, vm.GetId()); st != hv.StateRunning {
			t.Errorf("placed vm %d on %s: %v, want running", i, want.name, st)
		}
	}
	// a has 1 vCPU left: no middy (2) there, and no fatlad (8) anywhere.
	_, err = c.api.Create(ctx, &threesv1.CreateRequest{Name: "too-big", Network: "lab", Image: "base",
		Type: threesv1.VMType_VM_TYPE_MIDDY, Host: a.name})
	if status.Code(err) != codes.ResourceExhausted || !strings.Contains(err.Error(), "threes-a") {
		t.Errorf("a middy on full-ish threes-a = %v, want ResourceExhausted naming it", err)
	}
	_, err = b.api.Create(ctx, &threesv1.CreateRequest{Name: "too-big", Network: "lab", Image: "base",
		Type: threesv1.VMType_VM_TYPE_FATLAD})
	if status.Code(err) != codes.ResourceExhausted {
		t.Errorf("a fatlad with no host of 8 vCPUs = %v, want ResourceExhausted", err)
	}

	operator := env.Client(t, threestest.ClientOptions{NodeOptions: tailnettest.NodeOptions{Hostname: "operator", User: "olga@example.com"}, Role: "operator"})
	if _, err := operator.Stop(ctx, &threesv1.VMRef{Id: onB.GetId()}); err != nil {
		t.Errorf("an operator's stop of b's vm through a: %v", err)
	}
	if st := hostDomainState(t, b, onB.GetId()); st != hv.StateStopped {
		t.Errorf("b's vm after the operator's stop: %v, want stopped", st)
	}
}
