package appliance

import (
	"context"

	"google.golang.org/protobuf/types/known/emptypb"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/threes-dev/threes/appliance/fleet"
	threesv1 "github.com/threes-dev/threes/proto/threes/v1"
)

// ListHosts lists the cluster's hosts (one, when not clustered; its role is
// "alone"). A host with a row in the hosts table that Raft does not list has the
// role "".
func (s *service) ListHosts(ctx context.Context, _ *threesv1.ListHostsRequest) (*threesv1.ListHostsResponse, error) {
	hosts, err := s.fleet.Hosts(ctx)
	if err != nil {
		return nil, err
	}
	resp := &threesv1.ListHostsResponse{}
	for _, h := range hosts {
		resp.Hosts = append(resp.Hosts, hostProto(h))
	}
	return resp, nil
}

// RemoveHost takes a host with no live VMs out of the cluster; see fleet.RemoveHost.
func (s *service) RemoveHost(ctx context.Context, ref *threesv1.HostRef) (*emptypb.Empty, error) {
	return &emptypb.Empty{}, s.fleet.RemoveHost(ctx, ref.GetName())
}

func hostProto(h fleet.HostInfo) *threesv1.Host {
	p := &threesv1.Host{
		Name: h.Name, TailnetIp: h.TailnetIP, Role: h.Role, Reachable: h.Reachable,
		Vcpus: uint32(max(h.VCPUs, 0)), MemoryMib: uint64(max(h.MemoryMiB, 0)),
		VcpusAllocated: uint32(max(h.VCPUsAllocated, 0)), MemoryMibAllocated: uint64(max(h.MemoryMiBAllocated, 0)),
		Vms: uint32(max(h.VMs, 0)),
	}
	if !h.LastContact.IsZero() {
		p.LastContact = timestamppb.New(h.LastContact)
	}
	return p
}
