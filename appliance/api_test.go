package appliance

import (
	"testing"

	"github.com/threes-dev/threes/appliance/fleet"
	threesv1 "github.com/threes-dev/threes/proto/threes/v1"
)

// TestVocabulary: every value of the API's enums has its one row in the tables,
// and every name the fleet uses has its value, both ways.
func TestVocabulary(t *testing.T) {
	for v := range threesv1.VMType_name {
		typ := threesv1.VMType(v)
		name, ok := TypeName(typ)
		if typ == threesv1.VMType_VM_TYPE_UNSPECIFIED {
			if ok {
				t.Errorf("TypeName(UNSPECIFIED) = %q, want none", name)
			}
			continue
		}
		if !ok {
			t.Errorf("API type %v has no fleet name", typ)
			continue
		}
		if _, err := fleet.SizeOf(name); err != nil {
			t.Errorf("API type %v is %q, which has no size: %v", typ, name, err)
		}
		if back, ok := TypeOf(name); !ok || back != typ {
			t.Errorf("TypeOf(%q) = %v, %v; want %v", name, back, ok, typ)
		}
	}
	for _, s := range fleet.Sizes {
		if _, ok := TypeOf(s.Type); !ok {
			t.Errorf("fleet size %q has no API type", s.Type)
		}
	}
	if _, ok := TypeOf("huge"); ok {
		t.Error("TypeOf(huge) found a type")
	}

	states := map[threesv1.VMState]string{}
	for name, st := range vmStates {
		if other, dup := states[st]; dup {
			t.Errorf("API state %v stands for both %q and %q", st, name, other)
		}
		states[st] = name
	}
	for v := range threesv1.VMState_name {
		st := threesv1.VMState(v)
		switch _, ok := states[st]; {
		case st == threesv1.VMState_VM_STATE_UNSPECIFIED || st == threesv1.VMState_VM_STATE_DELETED:
			if ok {
				t.Errorf("API state %v is a fleet state; it is not one (deleted is DeletedAt)", st)
			}
		case !ok:
			t.Errorf("API state %v has no fleet state", st)
		}
	}
	for _, name := range fleet.States() {
		if _, ok := vmStates[name]; !ok {
			t.Errorf("fleet state %q has no API state", name)
		}
	}

	phases := map[threesv1.VMPhase]bool{}
	for _, ph := range vmPhases {
		phases[ph] = true
	}
	for v := range threesv1.VMPhase_name {
		if ph := threesv1.VMPhase(v); ph != threesv1.VMPhase_VM_PHASE_UNSPECIFIED && !phases[ph] {
			t.Errorf("API phase %v has no fleet phase", ph)
		}
	}
	for i, name := range fleet.Phases() {
		ph, ok := vmPhases[name]
		if !ok {
			t.Errorf("fleet phase %q has no API phase", name)
		} else if int(ph) != i+1 {
			t.Errorf("fleet phase %q is number %d in the fleet's order and %d in the API's", name, i+1, ph)
		}
	}
}
