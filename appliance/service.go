package appliance

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/protobuf/types/known/emptypb"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/threes-dev/threes/embeddb"
	"github.com/threes-dev/threes/hv/images"
	threesv1 "github.com/threes-dev/threes/proto/threes/v1"
	"github.com/threes-dev/threes/tsauth"
)

// service translates the gRPC API to the lifecycle and the database. Authorisation has
// already happened in the gate; the only role check left here is secret redaction.
type service struct {
	threesv1.UnimplementedThreesServer
	life   *Lifecycle
	db     *embeddb.DB
	images *images.Store
}

func (s *service) Create(ctx context.Context, req *threesv1.CreateRequest) (*threesv1.VM, error) {
	typ, err := typeName(req.GetType())
	if err != nil {
		return nil, err
	}
	kvs := make([]embeddb.KV, 0, len(req.GetKvs()))
	for _, kv := range req.GetKvs() {
		kvs = append(kvs, embeddb.KV{Key: kv.GetKey(), Value: kv.GetValue(), Secret: kv.GetSecret()})
	}
	vm, err := s.life.Create(ctx, CreateSpec{
		Name: req.GetName(), Description: req.GetDescription(), Network: req.GetNetwork(),
		Image: req.GetImage(), Type: typ, PublicKey: req.GetPublicKey(), Script: req.GetScript(), KVs: kvs,
	})
	if err != nil {
		return nil, err
	}
	return vmProto(vm), nil
}

func (s *service) Get(ctx context.Context, ref *threesv1.VMRef) (*threesv1.VM, error) {
	vm, err := s.life.Get(ctx, ref.GetId())
	return vmProto(vm), err
}

// watchEvery is how often Watch looks at the VM's write counter, an in-memory read.
const watchEvery = 100 * time.Millisecond

// Watch sends the VM, and again after each write this appliance makes about it,
// until the caller leaves or the VM is purged.
func (s *service) Watch(ref *threesv1.VMRef, stream grpc.ServerStreamingServer[threesv1.VM]) error {
	ctx := stream.Context()
	id := ref.GetId()
	// The counter before the read: a write during the read is sent again.
	gen := s.db.VMGen(id)
	vm, err := s.life.Get(ctx, id)
	if err != nil {
		return err
	}
	if err := stream.Send(vmProto(vm)); err != nil {
		return err
	}
	t := time.NewTicker(watchEvery)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			// Not nil: a caller whose deadline passed must not read "the VM is
			// gone" (a clean end) before its own timer says why.
			return ctx.Err()
		case <-t.C:
		}
		g := s.db.VMGen(id)
		if g == gen {
			continue
		}
		vm, err := s.db.GetVM(ctx, id)
		if errors.Is(err, embeddb.ErrNotFound) {
			return nil
		}
		if err != nil {
			return err
		}
		gen = g
		if err := stream.Send(vmProto(vm)); err != nil {
			return err
		}
	}
}

func (s *service) All(req *threesv1.AllRequest, stream grpc.ServerStreamingServer[threesv1.VM]) error {
	vms, err := s.db.ListVMs(stream.Context())
	if err != nil {
		return err
	}
	for _, vm := range vms {
		if !vm.DeletedAt.IsZero() && !req.GetIncludeDeleted() {
			continue
		}
		if err := stream.Send(vmProto(vm)); err != nil {
			return err
		}
	}
	return nil
}

func (s *service) GetID(ctx context.Context, req *threesv1.GetIDRequest) (*threesv1.GetIDResponse, error) {
	if err := ValidateName("name", req.GetName()); err != nil {
		return nil, err
	}
	vm, err := s.db.VMByName(ctx, req.GetName())
	if err != nil {
		return nil, fmt.Errorf("vm %q: %w", req.GetName(), err)
	}
	return &threesv1.GetIDResponse{Id: vm.ID}, nil
}

func (s *service) Start(ctx context.Context, ref *threesv1.VMRef) (*threesv1.VM, error) {
	vm, err := s.life.Start(ctx, ref.GetId())
	return vmProto(vm), err
}

func (s *service) Stop(ctx context.Context, ref *threesv1.VMRef) (*threesv1.VM, error) {
	vm, err := s.life.Stop(ctx, ref.GetId())
	return vmProto(vm), err
}

func (s *service) Restart(ctx context.Context, ref *threesv1.VMRef) (*threesv1.VM, error) {
	vm, err := s.life.Restart(ctx, ref.GetId())
	return vmProto(vm), err
}

func (s *service) Delete(ctx context.Context, ref *threesv1.VMRef) (*threesv1.VM, error) {
	vm, err := s.life.Delete(ctx, ref.GetId())
	return vmProto(vm), err
}

func (s *service) Purge(ctx context.Context, req *threesv1.PurgeRequest) (*threesv1.PurgeResponse, error) {
	for _, id := range req.GetIds() {
		if err := ValidateID(id); err != nil {
			return nil, err
		}
	}
	ids, err := s.life.Purge(ctx, req.GetIds())
	return &threesv1.PurgeResponse{Ids: ids}, err
}

func (s *service) CreateNetwork(ctx context.Context, req *threesv1.NetworkRequest) (*threesv1.Network, error) {
	n, err := s.life.CreateNetwork(ctx, req.GetName())
	if err != nil {
		return nil, err
	}
	return networkProto(n), nil
}

func (s *service) DeleteNetwork(ctx context.Context, req *threesv1.NetworkRequest) (*emptypb.Empty, error) {
	return &emptypb.Empty{}, s.life.DeleteNetwork(ctx, req.GetName())
}

func (s *service) ListNetworks(ctx context.Context, _ *threesv1.ListNetworksRequest) (*threesv1.ListNetworksResponse, error) {
	ns, err := s.db.ListNetworks(ctx)
	if err != nil {
		return nil, err
	}
	resp := &threesv1.ListNetworksResponse{}
	for _, n := range ns {
		resp.Networks = append(resp.Networks, networkProto(n))
	}
	return resp, nil
}

func (s *service) GetKVs(ctx context.Context, ref *threesv1.VMRef) (*threesv1.KVs, error) {
	if _, err := s.life.Get(ctx, ref.GetId()); err != nil {
		return nil, err
	}
	return s.kvs(ctx, ref.GetId())
}

func (s *service) UpsertKVs(ctx context.Context, req *threesv1.KVs) (*threesv1.KVs, error) {
	kvs := make([]embeddb.KV, 0, len(req.GetKvs()))
	for _, kv := range req.GetKvs() {
		kvs = append(kvs, embeddb.KV{Key: kv.GetKey(), Value: kv.GetValue(), Secret: kv.GetSecret()})
	}
	if len(kvs) == 0 {
		return nil, fieldErr("kvs", "give at least one key/value")
	}
	if err := validateKVs(kvs); err != nil {
		return nil, err
	}
	if _, err := s.life.live(ctx, req.GetVmId()); err != nil {
		return nil, err
	}
	if err := s.db.UpsertKVs(ctx, req.GetVmId(), kvs); err != nil {
		return nil, err
	}
	return s.kvs(ctx, req.GetVmId())
}

func (s *service) DeleteKVs(ctx context.Context, req *threesv1.DeleteKVsRequest) (*threesv1.KVs, error) {
	if len(req.GetKeys()) == 0 {
		return nil, fieldErr("keys", "give at least one key")
	}
	for _, k := range req.GetKeys() {
		if err := ValidateKey(k); err != nil {
			return nil, err
		}
	}
	if _, err := s.life.live(ctx, req.GetVmId()); err != nil {
		return nil, err
	}
	if err := s.db.DeleteKVs(ctx, req.GetVmId(), req.GetKeys()); err != nil {
		return nil, err
	}
	return s.kvs(ctx, req.GetVmId())
}

// kvs reads a VM's key/values, withholding secret values from callers below operator.
func (s *service) kvs(ctx context.Context, id string) (*threesv1.KVs, error) {
	kvs, err := s.db.GetKVs(ctx, id)
	if err != nil {
		return nil, fmt.Errorf("key/values of vm %s: %w", id, err)
	}
	redact := principalFrom(ctx).Role < tsauth.RoleOperator
	out := &threesv1.KVs{VmId: id}
	for _, kv := range kvs {
		p := &threesv1.KV{Key: kv.Key, Value: kv.Value, Secret: kv.Secret}
		if kv.Secret && redact {
			p.Value, p.Redacted = "", true
		}
		out.Kvs = append(out.Kvs, p)
	}
	return out, nil
}

func (s *service) WhoAmI(ctx context.Context, _ *threesv1.WhoAmIRequest) (*threesv1.WhoAmIResponse, error) {
	p := principalFrom(ctx)
	return &threesv1.WhoAmIResponse{
		Principal: p.String(), Login: p.Login, Node: p.Node, Tags: p.Tags,
		Role: p.Role.String(), Local: p.Local,
	}, nil
}

func vmProto(vm embeddb.VM) *threesv1.VM {
	if vm.ID == "" {
		return nil
	}
	p := &threesv1.VM{
		Id: vm.ID, Name: vm.Name, Description: vm.Description, Network: vm.Network, Image: vm.Image,
		Type: typeEnum(vm.Type), ManagementIp: vm.IP, Mac: vm.MAC, State: stateEnum(vm),
		CreatedAt: timestamppb.New(vm.CreatedAt), UpdatedAt: timestamppb.New(vm.UpdatedAt),
		Phases: phasesProto(vm.Phases), TailnetNodeId: vm.NodeID,
	}
	if !vm.DeletedAt.IsZero() {
		p.DeletedAt = timestamppb.New(vm.DeletedAt)
	}
	if size, err := SizeOf(vm.Type); err == nil {
		p.Vcpus, p.MemoryMib = uint32(size.VCPUs), uint32(size.MemoryMiB)
	}
	return p
}

func networkProto(n embeddb.Network) *threesv1.Network {
	return &threesv1.Network{Name: n.Name, Tag: n.Tag, CreatedAt: timestamppb.New(n.CreatedAt)}
}

// typeName turns the API's enum into the size table's name.
func typeName(t threesv1.VMType) (string, error) {
	if t == threesv1.VMType_VM_TYPE_UNSPECIFIED {
		return "", fieldErr("type", "missing: want one of %s", sizeNames())
	}
	name, ok := threesv1.VMType_name[int32(t)]
	if !ok {
		return "", fieldErr("type", "unknown type %d: want one of %s", t, sizeNames())
	}
	return strings.ToLower(strings.TrimPrefix(name, "VM_TYPE_")), nil
}

func typeEnum(name string) threesv1.VMType {
	return threesv1.VMType(threesv1.VMType_value["VM_TYPE_"+strings.ToUpper(name)])
}

func stateEnum(vm embeddb.VM) threesv1.VMState {
	if !vm.DeletedAt.IsZero() {
		return threesv1.VMState_VM_STATE_DELETED
	}
	return threesv1.VMState(threesv1.VMState_value["VM_STATE_"+strings.ToUpper(vm.State)])
}
