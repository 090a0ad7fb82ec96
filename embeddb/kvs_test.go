package embeddb

import (
	"context"
	"reflect"
	"testing"
)

func TestKVs(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	db := newDB(t)
	mustNetwork(t, db, "cool")
	vm := mustCreateVM(t, db, 1, "cool")

	kvs, err := db.GetKVs(ctx, vm.ID)
	if err != nil || len(kvs) != 0 {
		t.Fatalf("GetKVs of a new vm = %v, %v", kvs, err)
	}
	if err := db.UpsertKVs(ctx, vm.ID, []KV{
		{Key: "b", Value: "2"},
		{Key: "a", Value: "1"},
		{Key: "token", Value: "hunter2", Secret: true},
		{Key: "a", Value: "1-again"}, // last wins
	}); err != nil {
		t.Fatal(err)
	}
	want := []KV{{Key: "a", Value: "1-again"}, {Key: "b", Value: "2"}, {Key: "token", Value: "hunter2", Secret: true}}
	if kvs, err := db.GetKVs(ctx, vm.ID); err != nil || !reflect.DeepEqual(kvs, want) {
		t.Fatalf("GetKVs = %v, %v; want %v", kvs, err, want)
	}

	if err := db.UpsertKVs(ctx, vm.ID, []KV{{Key: "b", Value: "two", Secret: true}}); err != nil {
		t.Fatal(err)
	}
	if err := db.DeleteKVs(ctx, vm.ID, []string{"a", "no-such-key"}); err != nil {
		t.Fatal(err)
	}
	want = []KV{{Key: "b", Value: "two", Secret: true}, {Key: "token", Value: "hunter2", Secret: true}}
	if kvs, err := db.GetKVs(ctx, vm.ID); err != nil || !reflect.DeepEqual(kvs, want) {
		t.Fatalf("GetKVs after update and delete = %v, %v; want %v", kvs, err, want)
	}

	// An invalid key refuses the whole batch.
	wantErr(t, db.UpsertKVs(ctx, vm.ID, []KV{{Key: "c", Value: "3"}, {Key: " ", Value: "x"}}), ErrInvalid, FieldKVKey)
	if kvs, err := db.GetKVs(ctx, vm.ID); err != nil || !reflect.DeepEqual(kvs, want) {
		t.Fatalf("GetKVs after refused batch = %v, %v; want %v", kvs, err, want)
	}

	// KVs of a soft-deleted VM are still there until it is purged.
	if err := db.MarkVMDeleted(ctx, vm.ID, t0); err != nil {
		t.Fatal(err)
	}
	if kvs, err := db.GetKVs(ctx, vm.ID); err != nil || len(kvs) != 2 {
		t.Fatalf("GetKVs of soft-deleted vm = %v, %v", kvs, err)
	}
}

func TestKVsUnknownVM(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	db := newDB(t)
	_, err := db.GetKVs(ctx, "nope")
	wantErr(t, err, ErrNotFound, FieldVMID)
	wantErr(t, db.UpsertKVs(ctx, "nope", []KV{{Key: "a", Value: "1"}}), ErrNotFound, FieldVMID)
	wantErr(t, db.UpsertKVs(ctx, "nope", nil), ErrNotFound, FieldVMID)
	wantErr(t, db.UpsertKVs(ctx, "", nil), ErrInvalid, FieldVMID)
	wantErr(t, db.DeleteKVs(ctx, "nope", []string{"a"}), ErrNotFound, FieldVMID)
	wantErr(t, db.DeleteKVs(ctx, "nope", nil), ErrNotFound, FieldVMID)
}
