package appliance_test

import (
	"context"
	"errors"
	"io"
	"slices"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/threes-dev/threes/appliance/threestest"
	"github.com/threes-dev/threes/hv"
	threesv1 "github.com/threes-dev/threes/proto/threes/v1"
	"github.com/threes-dev/threes/tsauth/tailnettest"
)

func ctxT(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	t.Cleanup(cancel)
	return ctx
}

func wantCode(t *testing.T, err error, code codes.Code, mention string) {
	t.Helper()
	if status.Code(err) != code {
		t.Fatalf("got %v, want code %v", err, code)
	}
	if mention != "" && !strings.Contains(status.Convert(err).Message(), mention) {
		t.Fatalf("error %q does not mention %q", status.Convert(err).Message(), mention)
	}
}

func must[T any](t testing.TB) func(T, error) T {
	return func(v T, err error) T {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
		return v
	}
}

func all(t *testing.T, ctx context.Context, c threesv1.ThreesClient, deleted bool) []*threesv1.VM {
	t.Helper()
	s, err := c.All(ctx, &threesv1.AllRequest{IncludeDeleted: deleted})
	if err != nil {
		t.Fatal(err)
	}
	var out []*threesv1.VM
	for {
		vm, err := s.Recv()
		if errors.Is(err, io.EOF) {
			return out
		}
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, vm)
	}
}

func domainState(t *testing.T, env *threestest.Env, id string) hv.State {
	t.Helper()
	st, err := env.Options.Hypervisor.State(ctxT(t), id)
	if errors.Is(err, hv.ErrNotFound) {
		return "missing"
	}
	if err != nil {
		t.Fatal(err)
	}
	return st
}

// TestLifecycle drives every VM, network and key/value call over the tailnet as an
// admin, and checks the hypervisor's view of each step.
func TestLifecycle(t *testing.T) {
	env := threestest.Start(t)
	ctx := ctxT(t)
	admin := env.Client(t, threestest.ClientOptions{NodeOptions: tailnettest.NodeOptions{Hostname: "laptop", User: "alice@example.com"}, Role: "admin"})

	net := must[*threesv1.Network](t)(admin.CreateNetwork(ctx, &threesv1.NetworkRequest{Name: "cool-network"}))
	if net.GetTag() != "tag:threes-cool-network" {
		t.Errorf("network tag = %q", net.GetTag())
	}
	_, err := admin.CreateNetwork(ctx, &threesv1.NetworkRequest{Name: "cool-network"})
	wantCode(t, err, codes.AlreadyExists, "cool-network")

	vm := must[*threesv1.VM](t)(admin.Create(ctx, &threesv1.CreateRequest{
		Name: "toy0", Network: "cool-network", Image: "base", Type: threesv1.VMType_VM_TYPE_SMALL,
		Description: "a toy", PublicKey: "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHx me@laptop",
		Kvs: []*threesv1.KV{{Key: "role", Value: "web"}, {Key: "db-password", Value: "hunter2", Secret: true}},
	}))
	if vm.GetState() != threesv1.VMState_VM_STATE_RUNNING || vm.GetVcpus() != 1 || vm.GetMemoryMib() != 1024 ||
		!strings.HasPrefix(vm.GetManagementIp(), "10.10.") || vm.GetMac() == "" || len(vm.GetId()) != 20 {
		t.Fatalf("created vm = %v", vm)
	}
	if st := domainState(t, env, vm.GetId()); st != hv.StateRunning {
		t.Errorf("domain state after create = %s", st)
	}
	_, err = admin.Create(ctx, &threesv1.CreateRequest{Name: "toy0", Network: "cool-network", Image: "base", Type: threesv1.VMType_VM_TYPE_TEENY})
	wantCode(t, err, codes.AlreadyExists, "toy0")

	got := must[*threesv1.VM](t)(admin.Get(ctx, &threesv1.VMRef{Id: vm.GetId()}))
	if got.GetName() != "toy0" || got.GetManagementIp() != vm.GetManagementIp() {
		t.Errorf("get = %v", got)
	}
	id := must[*threesv1.GetIDResponse](t)(admin.GetID(ctx, &threesv1.GetIDRequest{Name: "toy0"}))
	if id.GetId() != vm.GetId() {
		t.Errorf("get-id = %q, want %q", id.GetId(), vm.GetId())
	}
	if vms := all(t, ctx, admin, false); len(vms) != 1 || vms[0].GetId() != vm.GetId() {
		t.Errorf("all = %v", vms)
	}

	ref := &threesv1.VMRef{Id: vm.GetId()}
	if s := must[*threesv1.VM](t)(admin.Stop(ctx, ref)).GetState(); s != threesv1.VMState_VM_STATE_STOPPED {
		t.Errorf("state after stop = %v", s)
	}
	if st := domainState(t, env, vm.GetId()); st != hv.StateStopped {
		t.Errorf("domain state after stop = %s", st)
	}
	if s := must[*threesv1.VM](t)(admin.Start(ctx, ref)).GetState(); s != threesv1.VMState_VM_STATE_RUNNING {
		t.Errorf("state after start = %v", s)
	}
	if st := domainState(t, env, vm.GetId()); st != hv.StateRunning {
		t.Errorf("domain state after start = %s", st)
	}
	must[*threesv1.VM](t)(admin.Restart(ctx, ref))
	if st := domainState(t, env, vm.GetId()); st != hv.StateRunning {
		t.Errorf("domain state after restart = %s", st)
	}

	kvs := must[*threesv1.KVs](t)(admin.UpsertKVs(ctx, &threesv1.KVs{VmId: vm.GetId(), Kvs: []*threesv1.KV{{Key: "role", Value: "db"}, {Key: "zone", Value: "attic"}}}))
	if m := kvMap(kvs); m["role"] != "db" || m["zone"] != "attic" || m["db-password"] != "hunter2" {
		t.Errorf("kvs after upsert = %v", m)
	}
	kvs = must[*threesv1.KVs](t)(admin.DeleteKVs(ctx, &threesv1.DeleteKVsRequest{VmId: vm.GetId(), Keys: []string{"zone"}}))
	if m := kvMap(kvs); len(m) != 2 || m["zone"] != "" {
		t.Errorf("kvs after delete = %v", m)
	}

	_, err = admin.DeleteNetwork(ctx, &threesv1.NetworkRequest{Name: "cool-network"})
	wantCode(t, err, codes.FailedPrecondition, "cool-network")
	_, err = admin.Purge(ctx, &threesv1.PurgeRequest{Ids: []string{vm.GetId()}})
	wantCode(t, err, codes.FailedPrecondition, "not deleted")

	del := must[*threesv1.VM](t)(admin.Delete(ctx, ref))
	if del.GetState() != threesv1.VMState_VM_STATE_DELETED || del.GetDeletedAt() == nil {
		t.Errorf("deleted vm = %v", del)
	}
	if st := domainState(t, env, vm.GetId()); st != hv.StateStopped {
		t.Errorf("domain state after delete = %s, want stopped until purge", st)
	}
	_, err = admin.Start(ctx, ref)
	wantCode(t, err, codes.FailedPrecondition, "deleted")
	_, err = admin.GetID(ctx, &threesv1.GetIDRequest{Name: "toy0"})
	wantCode(t, err, codes.NotFound, "toy0")
	if vms := all(t, ctx, admin, false); len(vms) != 0 {
		t.Errorf("all without deleted = %v", vms)
	}
	if vms := all(t, ctx, admin, true); len(vms) != 1 {
		t.Errorf("all with deleted = %v", vms)
	}

	// The name is free again while the deleted VM awaits purge.
	again := must[*threesv1.VM](t)(admin.Create(ctx, &threesv1.CreateRequest{Name: "toy0", Network: "cool-network", Image: "arch", Type: threesv1.VMType_VM_TYPE_TEENY}))

	purged := must[*threesv1.PurgeResponse](t)(admin.Purge(ctx, &threesv1.PurgeRequest{}))
	if !slices.Equal(purged.GetIds(), []string{vm.GetId()}) {
		t.Errorf("purged = %v, want only %s", purged.GetIds(), vm.GetId())
	}
	if st := domainState(t, env, vm.GetId()); st != "missing" {
		t.Errorf("domain after purge = %s", st)
	}
	_, err = admin.Get(ctx, ref)
	wantCode(t, err, codes.NotFound, vm.GetId())

	must[*threesv1.VM](t)(admin.Delete(ctx, &threesv1.VMRef{Id: again.GetId()}))
	must[*threesv1.PurgeResponse](t)(admin.Purge(ctx, &threesv1.PurgeRequest{Ids: []string{again.GetId()}}))
	must[any](t)(admin.DeleteNetwork(ctx, &threesv1.NetworkRequest{Name: "cool-network"}))
	if ns := must[*threesv1.ListNetworksResponse](t)(admin.ListNetworks(ctx, &threesv1.ListNetworksRequest{})); len(ns.GetNetworks()) != 0 {
		t.Errorf("networks after delete = %v", ns)
	}
}

func kvMap(kvs *threesv1.KVs) map[string]string {
	m := map[string]string{}
	for _, kv := range kvs.GetKvs() {
		m[kv.GetKey()] = kv.GetValue()
	}
	return m
}
