package appliance

import (
	"fmt"
	"slices"

	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/threes-dev/threes/appliance/fleet"
	"github.com/threes-dev/threes/embeddb"
	"github.com/threes-dev/threes/hv/images"
	threesv1 "github.com/threes-dev/threes/proto/threes/v1"
)

// The API's vocabulary and the fleet's, one table each way. TestVocabulary walks
// every enum value and every fleet name, so neither side can gain one the other
// lacks.
var (
	vmTypes = []struct {
		api  threesv1.VMType
		name string // fleet.Sizes' Type
	}{
		{threesv1.VMType_VM_TYPE_TEENY, "teeny"},
		{threesv1.VMType_VM_TYPE_SMALL, "small"},
		{threesv1.VMType_VM_TYPE_MIDDY, "middy"},
		{threesv1.VMType_VM_TYPE_BIGGUN, "biggun"},
		{threesv1.VMType_VM_TYPE_FATLAD, "fatlad"},
	}
	vmStates = map[string]threesv1.VMState{
		fleet.StateCreating: threesv1.VMState_VM_STATE_CREATING,
		fleet.StateRunning:  threesv1.VMState_VM_STATE_RUNNING,
		fleet.StateStopped:  threesv1.VMState_VM_STATE_STOPPED,
		fleet.StateCrashed:  threesv1.VMState_VM_STATE_CRASHED,
		fleet.StateMissing:  threesv1.VMState_VM_STATE_MISSING,
	}
	vmPhases = map[string]threesv1.VMPhase{
		fleet.PhaseDefined:       threesv1.VMPhase_VM_PHASE_DEFINED,
		fleet.PhaseRunning:       threesv1.VMPhase_VM_PHASE_RUNNING,
		fleet.PhaseAddressLeased: threesv1.VMPhase_VM_PHASE_ADDRESS_LEASED,
		fleet.PhaseConfigFetched: threesv1.VMPhase_VM_PHASE_CONFIG_FETCHED,
		fleet.PhaseKeyTaken:      threesv1.VMPhase_VM_PHASE_KEY_TAKEN,
		fleet.PhaseOnTailnet:     threesv1.VMPhase_VM_PHASE_ON_TAILNET,
	}
)

// TypeName is the fleet's name of an API VM type ("teeny"), and false for
// UNSPECIFIED or a value this build does not know.
func TypeName(t threesv1.VMType) (string, bool) {
	for _, r := range vmTypes {
		if r.api == t {
			return r.name, true
		}
	}
	return "", false
}

// TypeOf is the API VM type of a fleet type name, and false for an unknown one.
func TypeOf(name string) (threesv1.VMType, bool) {
	for _, r := range vmTypes {
		if r.name == name {
			return r.api, true
		}
	}
	return threesv1.VMType_VM_TYPE_UNSPECIFIED, false
}

// typeName turns the API's enum into the size table's name, as a field error.
func typeName(t threesv1.VMType) (string, error) {
	if t == threesv1.VMType_VM_TYPE_UNSPECIFIED {
		return "", &fleet.FieldError{Field: "type", Msg: "missing: want one of " + fleet.SizeNames()}
	}
	name, ok := TypeName(t)
	if !ok {
		return "", &fleet.FieldError{Field: "type", Msg: fmt.Sprintf("unknown type %d: want one of %s", t, fleet.SizeNames())}
	}
	return name, nil
}

func vmProto(vm embeddb.VM) *threesv1.VM {
	if vm.ID == "" {
		return nil
	}
	typ, _ := TypeOf(vm.Type)
	p := &threesv1.VM{
		Id: vm.ID, Name: vm.Name, Description: vm.Description, Network: vm.Network, Image: vm.Image,
		Type: typ, ManagementIp: vm.IP, Mac: vm.MAC, State: stateEnum(vm),
		CreatedAt: timestamppb.New(vm.CreatedAt), UpdatedAt: timestamppb.New(vm.UpdatedAt),
		Phases: phasesProto(vm.Phases), TailnetNodeId: vm.NodeID, Host: vm.Host,
	}
	if !vm.DeletedAt.IsZero() {
		p.DeletedAt = timestamppb.New(vm.DeletedAt)
	}
	if size, err := fleet.SizeOf(vm.Type); err == nil {
		p.Vcpus, p.MemoryMib = uint32(size.VCPUs), uint32(size.MemoryMiB)
	}
	return p
}

// stateEnum is a VM's state as the API says it: a deleted VM is DELETED whatever
// state it was left in.
func stateEnum(vm embeddb.VM) threesv1.VMState {
	if !vm.DeletedAt.IsZero() {
		return threesv1.VMState_VM_STATE_DELETED
	}
	return vmStates[vm.State]
}

// phasesProto gives the VM's phases in phase order; ones this build does not know
// (recorded by a newer one) are left out.
func phasesProto(ps []embeddb.VMPhase) []*threesv1.Phase {
	var out []*threesv1.Phase
	for _, p := range ps {
		if e, ok := vmPhases[p.Phase]; ok {
			out = append(out, &threesv1.Phase{Phase: e, At: timestamppb.New(p.At), Error: p.Error})
		}
	}
	slices.SortStableFunc(out, func(a, b *threesv1.Phase) int { return int(a.Phase) - int(b.Phase) })
	return out
}

func networkProto(n embeddb.Network) *threesv1.Network {
	return &threesv1.Network{Name: n.Name, Tag: n.Tag, CreatedAt: timestamppb.New(n.CreatedAt)}
}

func imageProto(img images.Image) *threesv1.Image {
	return &threesv1.Image{
		Name: img.Name, Kind: string(img.Kind), DiskFormat: img.DiskFormat, DiskBytes: uint64(img.DiskBytes),
		HasInitrd: img.Initrd != "", Cmdline: img.Cmdline, ImportedAt: timestamppb.New(img.ImportedAt),
	}
}
