package appliance_test

import (
	"context"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/threes-dev/threes/appliance"
	"github.com/threes-dev/threes/appliance/fleet"
	"github.com/threes-dev/threes/appliance/threestest"
	"github.com/threes-dev/threes/hv/hvtest"
	threesv1 "github.com/threes-dev/threes/proto/threes/v1"
)

// waitHosts lists the hosts through api until every one named has written its row
// (its first heartbeat runs in the background of Start), and returns them.
func waitHosts(t *testing.T, ctx context.Context, api threesv1.ThreesClient, names ...string) []*threesv1.Host {
	t.Helper()
	deadline := time.Now().Add(time.Minute)
	for {
		res, err := api.ListHosts(ctx, &threesv1.ListHostsRequest{})
		if err != nil {
			t.Fatalf("list hosts: %v", err)
		}
		var heard []string
		for _, h := range res.GetHosts() {
			if h.GetLastContact() != nil {
				heard = append(heard, h.GetName())
			}
		}
		if slices.Equal(heard, names) && len(res.GetHosts()) == len(names) {
			return res.GetHosts()
		}
		if time.Now().After(deadline) {
			t.Fatalf("hosts = %v, want %v, each with its row written", res.GetHosts(), names)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// TestHostsOneAppliance: a threes that is not clustered lists itself, "alone", with
// the capacity it was given (after overcommit) and its VMs' share of it; it refuses
// to remove itself and says an unknown host is not found.
func TestHostsOneAppliance(t *testing.T) {
	env := threestest.StartWith(t, func(o *appliance.Options) {
		o.Capacity = fleet.Capacity{VCPUs: 3, MemoryMiB: 5000, CPUOvercommit: 2, MemoryOvercommit: 1.5}
	})
	ctx := ctxT(t)
	api := env.Local(t)
	if _, err := api.CreateNetwork(ctx, &threesv1.NetworkRequest{Name: "hostnet"}); err != nil {
		t.Fatal(err)
	}
	if _, err := api.Create(ctx, &threesv1.CreateRequest{Name: "toy0", Network: "hostnet", Image: "base", Type: threesv1.VMType_VM_TYPE_MIDDY}); err != nil {
		t.Fatal(err)
	}
	hosts := waitHosts(t, ctx, api, "threes")
	h := hosts[0]
	if h.GetRole() != fleet.RoleAlone || !h.GetReachable() {
		t.Errorf("the one host: role %q reachable %v, want alone and reachable", h.GetRole(), h.GetReachable())
	}
	if h.GetVcpus() != 6 || h.GetMemoryMib() != 7500 {
		t.Errorf("capacity %d vCPUs, %d MiB; want serve's 3 x 2 and 5000 x 1.5", h.GetVcpus(), h.GetMemoryMib())
	}
	if h.GetVms() != 1 || h.GetVcpusAllocated() != 2 || h.GetMemoryMibAllocated() != 2048 {
		t.Errorf("allocated: %d VMs, %d vCPUs, %d MiB; want the one middy's 1, 2, 2048", h.GetVms(), h.GetVcpusAllocated(), h.GetMemoryMibAllocated())
	}
	_, err := api.RemoveHost(ctx, &threesv1.HostRef{Name: "threes"})
	wantCode(t, err, codes.FailedPrecondition, "ask another host")
	_, err = api.RemoveHost(ctx, &threesv1.HostRef{Name: "nosuch"})
	wantCode(t, err, codes.NotFound, "nosuch")
}

// TestHostsTwoAppliances: two appliances of one cluster each list both hosts, one
// leading and one following, both reachable, with their tailnet IPs. A host
// refuses to remove itself; the other refuses to remove it while a VM lives there
// (naming it), and removes it once the VM is deleted.
func TestHostsTwoAppliances(t *testing.T) {
	env := threestest.StartWith(t, func(o *appliance.Options) {
		o.Hostname = "threes-a"
		o.Tags = []string{fleet.DefaultOwnerTag}
		o.BootstrapExpect = 1
	})
	ctx := ctxT(t)
	dirB := t.TempDir()
	optsB := env.Options
	optsB.Hostname = "threes-b"
	optsB.StateDir = dirB
	optsB.Socket = filepath.Join(dirB, "threes.sock")
	optsB.Hypervisor = hvtest.Open(t)
	optsB.BootstrapExpect = 0
	optsB.Join = []string{"threes-a"}
	threestest.SeedImages(t, dirB, "base")
	b, err := appliance.Start(ctx, optsB)
	if err != nil {
		t.Fatalf("start the joining appliance: %v", err)
	}
	t.Cleanup(func() { b.Close() })
	conn, err := grpc.NewClient("unix:"+optsB.Socket, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	apiA, apiB := env.Local(t), threesv1.NewThreesClient(conn)

	for name, api := range map[string]threesv1.ThreesClient{"a": apiA, "b": apiB} {
		hosts := waitHosts(t, ctx, api, "threes-a", "threes-b")
		roles := []string{hosts[0].GetRole(), hosts[1].GetRole()}
		slices.Sort(roles)
		if !slices.Equal(roles, []string{fleet.RoleFollower, fleet.RoleLeader}) {
			t.Errorf("through %s: roles %v, want one leader and one follower", name, roles)
		}
		for _, h := range hosts {
			if !h.GetReachable() || h.GetTailnetIp() == "" || h.GetVcpus() == 0 {
				t.Errorf("through %s: host %v, want it reachable, with its tailnet IP and capacity", name, h)
			}
		}
		if hosts[0].GetTailnetIp() != env.IP.String() {
			t.Errorf("through %s: threes-a's tailnet IP %s, want %s", name, hosts[0].GetTailnetIp(), env.IP)
		}
	}

	_, err = apiB.RemoveHost(ctx, &threesv1.HostRef{Name: "threes-b"})
	wantCode(t, err, codes.FailedPrecondition, "ask another host")

	if _, err := apiA.CreateNetwork(ctx, &threesv1.NetworkRequest{Name: "hostnet"}); err != nil {
		t.Fatal(err)
	}
	vm, err := apiB.Create(ctx, &threesv1.CreateRequest{Name: "onb", Network: "hostnet", Image: "base",
		Type: threesv1.VMType_VM_TYPE_TEENY, Host: "threes-b"})
	if err != nil {
		t.Fatalf("create a VM on b: %v", err)
	}
	if vm.GetHost() != "threes-b" {
		t.Fatalf("the VM landed on %q, want threes-b", vm.GetHost())
	}
	_, err = apiA.RemoveHost(ctx, &threesv1.HostRef{Name: "threes-b"})
	wantCode(t, err, codes.FailedPrecondition, "live or deleted (1: onb)")

	if _, err := apiB.Delete(ctx, &threesv1.VMRef{Id: vm.GetId()}); err != nil {
		t.Fatalf("delete the VM on b: %v", err)
	}
	// Deleted, its disk is still on b, for purge to remove there.
	_, err = apiA.RemoveHost(ctx, &threesv1.HostRef{Name: "threes-b"})
	wantCode(t, err, codes.FailedPrecondition, "live or deleted (1: onb)")
	if _, err := apiA.Purge(ctx, &threesv1.PurgeRequest{Ids: []string{vm.GetId()}}); err != nil {
		t.Fatalf("purge b's VM through a: %v", err)
	}
	rctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	if _, err := apiA.RemoveHost(rctx, &threesv1.HostRef{Name: "threes-b"}); err != nil {
		t.Fatalf("remove threes-b once its VM is deleted: %v", err)
	}
	res, err := apiA.ListHosts(ctx, &threesv1.ListHostsRequest{})
	if err != nil {
		t.Fatal(err)
	}
	// b still runs, and a heartbeat it sent just before it learnt of its removal may
	// write its row again: then it shows, but as no member (role "").
	hs := res.GetHosts()
	if len(hs) == 0 || hs[0].GetName() != "threes-a" || hs[0].GetRole() != fleet.RoleAlone ||
		len(hs) > 2 || len(hs) == 2 && (hs[1].GetName() != "threes-b" || hs[1].GetRole() != fleet.RoleNone) {
		t.Fatalf("hosts after removing threes-b = %v, want threes-a alone (and b, if at all, as no member)", hs)
	}
}
