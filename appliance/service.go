package appliance

import (
	"context"

	"google.golang.org/grpc"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/emptypb"

	"github.com/threes-dev/threes/appliance/fleet"
	"github.com/threes-dev/threes/embeddb"
	threesv1 "github.com/threes-dev/threes/proto/threes/v1"
	"github.com/threes-dev/threes/tsauth"
)

// service translates the gRPC API to the fleet and back. Authorisation has already
// happened in the gate; the only role check left here is secret redaction.
type service struct {
	threesv1.UnimplementedThreesServer
	fleet *fleet.Fleet
	// hosts carries calls that need another host's domain there (forward.go);
	// nil on a host alone.
	hosts *hosts
}

func (s *service) Create(ctx context.Context, req *threesv1.CreateRequest) (*threesv1.VM, error) {
	typ, err := typeName(req.GetType())
	if err != nil {
		return nil, err
	}
	vm, err := s.fleet.Create(ctx, fleet.CreateSpec{
		Name: req.GetName(), Description: req.GetDescription(), Network: req.GetNetwork(),
		Image: req.GetImage(), Type: typ, PublicKey: req.GetPublicKey(), Script: req.GetScript(), KVs: kvsFrom(req.GetKvs()),
		Host: req.GetHost(),
	})
	if host, ok := s.ownerOf(ctx, err); ok {
		// Placed elsewhere: that host creates it, told where, so it does not place again.
		fwd := proto.CloneOf(req)
		fwd.Host = host
		return onHost(ctx, s, host, func(ctx context.Context, c threesv1.ThreesClient) (*threesv1.VM, error) {
			return c.Create(ctx, fwd)
		})
	}
	if err != nil {
		return nil, err
	}
	return vmProto(vm), nil
}

func (s *service) Get(ctx context.Context, ref *threesv1.VMRef) (*threesv1.VM, error) {
	vm, err := s.fleet.Get(ctx, ref.GetId())
	return vmProto(vm), err
}

// Watch sends the VM, and again each time it changes, until the caller leaves or the
// VM is purged.
func (s *service) Watch(ref *threesv1.VMRef, stream grpc.ServerStreamingServer[threesv1.VM]) error {
	return s.fleet.Watch(stream.Context(), ref.GetId(), func(vm embeddb.VM) error {
		return stream.Send(vmProto(vm))
	})
}

func (s *service) All(req *threesv1.AllRequest, stream grpc.ServerStreamingServer[threesv1.VM]) error {
	vms, err := s.fleet.List(stream.Context(), req.GetIncludeDeleted())
	if err != nil {
		return err
	}
	for _, vm := range vms {
		if err := stream.Send(vmProto(vm)); err != nil {
			return err
		}
	}
	return nil
}

func (s *service) GetID(ctx context.Context, req *threesv1.GetIDRequest) (*threesv1.GetIDResponse, error) {
	vm, err := s.fleet.ByName(ctx, req.GetName())
	if err != nil {
		return nil, err
	}
	return &threesv1.GetIDResponse{Id: vm.ID}, nil
}

func (s *service) Start(ctx context.Context, ref *threesv1.VMRef) (*threesv1.VM, error) {
	vm, err := s.fleet.Start(ctx, ref.GetId())
	if host, ok := s.ownerOf(ctx, err); ok {
		return onHost(ctx, s, host, func(ctx context.Context, c threesv1.ThreesClient) (*threesv1.VM, error) {
			return c.Start(ctx, ref)
		})
	}
	return vmProto(vm), err
}

func (s *service) Stop(ctx context.Context, ref *threesv1.VMRef) (*threesv1.VM, error) {
	vm, err := s.fleet.Stop(ctx, ref.GetId())
	if host, ok := s.ownerOf(ctx, err); ok {
		return onHost(ctx, s, host, func(ctx context.Context, c threesv1.ThreesClient) (*threesv1.VM, error) {
			return c.Stop(ctx, ref)
		})
	}
	return vmProto(vm), err
}

func (s *service) Restart(ctx context.Context, ref *threesv1.VMRef) (*threesv1.VM, error) {
	vm, err := s.fleet.Restart(ctx, ref.GetId())
	if host, ok := s.ownerOf(ctx, err); ok {
		return onHost(ctx, s, host, func(ctx context.Context, c threesv1.ThreesClient) (*threesv1.VM, error) {
			return c.Restart(ctx, ref)
		})
	}
	return vmProto(vm), err
}

func (s *service) Delete(ctx context.Context, ref *threesv1.VMRef) (*threesv1.VM, error) {
	vm, err := s.fleet.Delete(ctx, ref.GetId())
	if host, ok := s.ownerOf(ctx, err); ok {
		return onHost(ctx, s, host, func(ctx context.Context, c threesv1.ThreesClient) (*threesv1.VM, error) {
			return c.Delete(ctx, ref)
		})
	}
	return vmProto(vm), err
}

func (s *service) Purge(ctx context.Context, req *threesv1.PurgeRequest) (*threesv1.PurgeResponse, error) {
	if _, fwd := forwardedFor(ctx); len(req.GetIds()) == 0 && s.hosts != nil && !fwd {
		// Every deleted VM of the cluster, each on its host.
		vms, err := s.fleet.List(ctx, true)
		if err != nil {
			return nil, err
		}
		var ids []string
		for _, vm := range vms {
			if !vm.Live() {
				ids = append(ids, vm.ID)
			}
		}
		if len(ids) == 0 {
			return &threesv1.PurgeResponse{}, nil
		}
		return s.purgeOnHosts(ctx, ids)
	}
	ids, err := s.fleet.Purge(ctx, req.GetIds())
	if _, ok := s.ownerOf(ctx, err); ok {
		return s.purgeOnHosts(ctx, req.GetIds())
	}
	return &threesv1.PurgeResponse{Ids: ids}, err
}

// purgeOnHosts purges VMs of several hosts: each host purges its own. A host's
// refusal (a VM still live) stops the hosts after it, not those before.
func (s *service) purgeOnHosts(ctx context.Context, ids []string) (*threesv1.PurgeResponse, error) {
	byHost := map[string][]string{}
	var order []string
	for _, id := range ids {
		vm, err := s.fleet.Get(ctx, id)
		if err != nil {
			return nil, err
		}
		if _, ok := byHost[vm.Host]; !ok {
			order = append(order, vm.Host)
		}
		byHost[vm.Host] = append(byHost[vm.Host], id)
	}
	resp := &threesv1.PurgeResponse{}
	for _, host := range order {
		some := byHost[host]
		purged, err := s.fleet.Purge(ctx, some)
		if owner, ok := s.ownerOf(ctx, err); ok {
			var r *threesv1.PurgeResponse
			r, err = onHost(ctx, s, owner, func(ctx context.Context, c threesv1.ThreesClient) (*threesv1.PurgeResponse, error) {
				return c.Purge(ctx, &threesv1.PurgeRequest{Ids: some})
			})
			purged = r.GetIds()
		}
		resp.Ids = append(resp.Ids, purged...)
		if err != nil {
			return resp, err
		}
	}
	return resp, nil
}

func (s *service) CreateNetwork(ctx context.Context, req *threesv1.NetworkRequest) (*threesv1.Network, error) {
	n, err := s.fleet.CreateNetwork(ctx, req.GetName())
	if err != nil {
		return nil, err
	}
	return networkProto(n), nil
}

func (s *service) DeleteNetwork(ctx context.Context, req *threesv1.NetworkRequest) (*emptypb.Empty, error) {
	return &emptypb.Empty{}, s.fleet.DeleteNetwork(ctx, req.GetName())
}

func (s *service) ListNetworks(ctx context.Context, _ *threesv1.ListNetworksRequest) (*threesv1.ListNetworksResponse, error) {
	ns, err := s.fleet.Networks(ctx)
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
	kvs, err := s.fleet.KVs(ctx, ref.GetId())
	if err != nil {
		return nil, err
	}
	return kvsProto(ctx, ref.GetId(), kvs), nil
}

func (s *service) UpsertKVs(ctx context.Context, req *threesv1.KVs) (*threesv1.KVs, error) {
	kvs, err := s.fleet.UpsertKVs(ctx, req.GetVmId(), kvsFrom(req.GetKvs()))
	if err != nil {
		return nil, err
	}
	return kvsProto(ctx, req.GetVmId(), kvs), nil
}

func (s *service) DeleteKVs(ctx context.Context, req *threesv1.DeleteKVsRequest) (*threesv1.KVs, error) {
	kvs, err := s.fleet.DeleteKVs(ctx, req.GetVmId(), req.GetKeys())
	if err != nil {
		return nil, err
	}
	return kvsProto(ctx, req.GetVmId(), kvs), nil
}

func kvsFrom(in []*threesv1.KV) []embeddb.KV {
	kvs := make([]embeddb.KV, 0, len(in))
	for _, kv := range in {
		kvs = append(kvs, embeddb.KV{Key: kv.GetKey(), Value: kv.GetValue(), Secret: kv.GetSecret()})
	}
	return kvs
}

// kvsProto gives a VM's key/values, withholding secret values from callers below
// operator.
func kvsProto(ctx context.Context, id string, kvs []embeddb.KV) *threesv1.KVs {
	redact := principalFrom(ctx).Role < tsauth.RoleOperator
	out := &threesv1.KVs{VmId: id}
	for _, kv := range kvs {
		p := &threesv1.KV{Key: kv.Key, Value: kv.Value, Secret: kv.Secret}
		if kv.Secret && redact {
			p.Value, p.Redacted = "", true
		}
		out.Kvs = append(out.Kvs, p)
	}
	return out
}

func (s *service) WhoAmI(ctx context.Context, _ *threesv1.WhoAmIRequest) (*threesv1.WhoAmIResponse, error) {
	p := principalFrom(ctx)
	return &threesv1.WhoAmIResponse{
		Principal: p.String(), Login: p.Login, Node: p.Node, Tags: p.Tags,
		Role: p.Role.String(), Local: p.Local,
	}, nil
}
