package embeddb

import (
	"context"
	"reflect"
	"testing"
	"time"
)

func TestNetworks(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	db := newDB(t)
	b := Network{Name: "b-net", Tag: "tag:b", CreatedAt: t0}
	a := Network{Name: "a-net", Tag: "", CreatedAt: t0.Add(time.Second)}
	c := Network{Name: "c-net", Tag: "", CreatedAt: t0} // two empty tags are fine
	for _, n := range []Network{b, a, c} {
		if err := db.CreateNetwork(ctx, n); err != nil {
			t.Fatal(err)
		}
	}
	wantErr(t, db.CreateNetwork(ctx, Network{Name: "b-net", CreatedAt: t0}), ErrExists, FieldNetworkName)
	wantErr(t, db.CreateNetwork(ctx, Network{Name: "d-net", Tag: "tag:b", CreatedAt: t0}), ErrExists, FieldNetworkTag)
	wantErr(t, db.CreateNetwork(ctx, Network{Name: "", CreatedAt: t0}), ErrInvalid, FieldNetworkName)
	wantErr(t, db.CreateNetwork(ctx, Network{Name: "e-net"}), ErrInvalid, "")

	got, err := db.GetNetwork(ctx, "b-net")
	if err != nil || got != b {
		t.Fatalf("GetNetwork = %+v, %v; want %+v", got, err, b)
	}
	_, err = db.GetNetwork(ctx, "nope")
	wantErr(t, err, ErrNotFound, FieldNetworkName)
	list, err := db.ListNetworks(ctx)
	if err != nil || !reflect.DeepEqual(list, []Network{a, b, c}) {
		t.Fatalf("ListNetworks = %+v, %v", list, err)
	}
	wantErr(t, db.DeleteNetwork(ctx, "nope"), ErrNotFound, FieldNetworkName)
	if err := db.DeleteNetwork(ctx, "c-net"); err != nil {
		t.Fatal(err)
	}
	_, err = db.GetNetwork(ctx, "c-net")
	wantErr(t, err, ErrNotFound, FieldNetworkName)
}

func TestDeleteNetworkInUse(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	db := newDB(t)
	mustNetwork(t, db, "cool")
	mustNetwork(t, db, "other")
	vm1 := mustCreateVM(t, db, 1, "cool")
	vm2 := mustCreateVM(t, db, 2, "cool")
	mustCreateVM(t, db, 3, "other")

	wantErr(t, db.DeleteNetwork(ctx, "cool"), ErrInUse, FieldNetworkName)
	if err := db.MarkVMDeleted(ctx, vm1.ID, t0.Add(time.Hour)); err != nil {
		t.Fatal(err)
	}
	wantErr(t, db.DeleteNetwork(ctx, "cool"), ErrInUse, FieldNetworkName)
	if _, err := db.GetNetwork(ctx, "cool"); err != nil {
		t.Fatalf("refused delete removed the network: %v", err)
	}
	if err := db.MarkVMDeleted(ctx, vm2.ID, t0.Add(time.Hour)); err != nil {
		t.Fatal(err)
	}
	// Only soft-deleted VMs use it now.
	if err := db.DeleteNetwork(ctx, "cool"); err != nil {
		t.Fatalf("delete network used only by soft-deleted vms: %v", err)
	}
	// The soft-deleted VMs keep the network's name as history.
	if got, err := db.GetVM(ctx, vm1.ID); err != nil || got.Network != "cool" {
		t.Fatalf("soft-deleted vm after network delete = %+v, %v", got, err)
	}
	// And no VM can be created into the deleted network.
	vm4, cfg, addr := fixture(4, "cool")
	wantErr(t, db.CreateVM(ctx, vm4, cfg, addr), ErrNotFound, FieldNetworkName)
}
