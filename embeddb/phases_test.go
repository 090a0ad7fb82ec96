package embeddb

import (
	"context"
	"testing"
	"time"
)

func TestRecordVMPhase(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	db := newDB(t)
	mustNetwork(t, db, "cool")
	vm, cfg, addr := fixture(1, "cool")
	cfg.AuthKeyID = "42"
	if err := db.CreateVM(ctx, vm, cfg, addr); err != nil {
		t.Fatal(err)
	}
	other := mustCreateVM(t, db, 2, "cool")
	record := func(phase string, at time.Time, failure string, want bool) {
		t.Helper()
		changed, err := db.RecordVMPhase(ctx, vm.ID, phase, at, failure)
		if err != nil || changed != want {
			t.Fatalf("RecordVMPhase(%s, %q) = %t, %v; want %t", phase, failure, changed, err, want)
		}
	}
	record("running", t0.Add(2*time.Second), "", true)
	record("defined", t0.Add(time.Second), "", true)
	// The first time is kept.
	record("running", t0.Add(9*time.Second), "", false)
	// A failure, then a second failure (kept as the first), then success replaces it.
	record("key_taken", t0.Add(3*time.Second), "already taken", true)
	record("key_taken", t0.Add(4*time.Second), "again", false)
	gen := db.VMGen(vm.ID)
	got, err := db.GetVM(ctx, vm.ID)
	if err != nil {
		t.Fatal(err)
	}
	want := []VMPhase{{"defined", t0.Add(time.Second), ""}, {"running", t0.Add(2 * time.Second), ""},
		{"key_taken", t0.Add(3 * time.Second), "already taken"}}
	if !phasesEqual(got.Phases, want) {
		t.Fatalf("phases = %+v, want %+v", got.Phases, want)
	}
	record("key_taken", t0.Add(5*time.Second), "", true)
	if db.VMGen(vm.ID) == gen {
		t.Fatal("recording a phase left the VM's gen as it was: caches would not see it")
	}
	want[2] = VMPhase{"key_taken", t0.Add(5 * time.Second), ""}
	for name, get := range map[string]func() (VM, error){
		"GetVM":         func() (VM, error) { return db.GetVM(ctx, vm.ID) },
		"VMByName":      func() (VM, error) { return db.VMByName(ctx, vm.Name) },
		"VMByAuthKeyID": func() (VM, error) { return db.VMByAuthKeyID(ctx, "42") },
		"ListVMs": func() (VM, error) {
			all, err := db.ListVMs(ctx)
			if err != nil || len(all) != 2 || len(all[1].Phases) != 0 {
				t.Fatalf("ListVMs = %+v, %v; want two, the second without phases", all, err)
			}
			return all[0], nil
		},
	} {
		got, err := get()
		if err != nil || got.ID != vm.ID || !phasesEqual(got.Phases, want) {
			t.Fatalf("%s = %s %+v, %v; want %s %+v", name, got.ID, got.Phases, err, vm.ID, want)
		}
	}
	if _, err := db.VMByAuthKeyID(ctx, "43"); err == nil {
		t.Fatal("VMByAuthKeyID of an unknown key found a VM")
	}

	// The node ID.
	if err := db.SetVMNodeID(ctx, vm.ID, "7"); err != nil {
		t.Fatal(err)
	}
	if got, _ := db.GetVM(ctx, vm.ID); got.NodeID != "7" {
		t.Fatalf("node id = %q, want 7", got.NodeID)
	}
	if got, _ := db.GetVM(ctx, other.ID); got.NodeID != "" {
		t.Fatalf("other vm's node id = %q", got.NodeID)
	}
	wantErr(t, db.SetVMNodeID(ctx, "nope", "7"), ErrNotFound, FieldVMID)

	// Bad input and unknown VMs.
	_, err = db.RecordVMPhase(ctx, "nope", "running", t0, "")
	wantErr(t, err, ErrNotFound, FieldVMID)
	_, err = db.RecordVMPhase(ctx, vm.ID, "", t0, "")
	wantErr(t, err, ErrInvalid, "")
	_, err = db.RecordVMPhase(ctx, vm.ID, "running", time.Time{}, "")
	wantErr(t, err, ErrInvalid, "")

	// Purge takes the phases with it.
	if err := db.MarkVMDeleted(ctx, vm.ID, t0.Add(time.Minute)); err != nil {
		t.Fatal(err)
	}
	if err := db.PurgeVM(ctx, vm.ID); err != nil {
		t.Fatal(err)
	}
	res, err := db.query(ctx, q(`SELECT COUNT(*) FROM vm_phases WHERE vm_id = ?`, vm.ID))
	if err != nil || rows(res[0])[0].int(0) != 0 {
		t.Fatalf("phases left after purge: %v", err)
	}
}

func phasesEqual(a, b []VMPhase) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i].Phase != b[i].Phase || !a[i].At.Equal(b[i].At) || a[i].Error != b[i].Error {
			return false
		}
	}
	return true
}
