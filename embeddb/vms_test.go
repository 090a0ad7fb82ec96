package embeddb

import (
	"context"
	"errors"
	"io/fs"
	"net/netip"
	"reflect"
	"strings"
	"testing"
	"testing/fstest"
	"time"
)

func TestCreateAndGetVM(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	db := newDB(t)
	mustNetwork(t, db, "cool")
	vm, cfg, addr := fixture(1, "cool")
	addr.MAC = strings.ToUpper(addr.MAC) // stored canonical
	if err := db.CreateVM(ctx, vm, cfg, addr); err != nil {
		t.Fatal(err)
	}

	want := vm
	want.MAC = "52:54:00:00:00:01"
	want.IP = "10.10.0.1"
	want.UpdatedAt = vm.CreatedAt
	got, err := db.GetVM(ctx, vm.ID)
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("GetVM:\n got %+v\nwant %+v", got, want)
	}
	if got.CreatedAt.Location() != time.UTC || !got.Live() {
		t.Fatalf("times should come back in UTC and the vm live: %+v", got)
	}
	byName, err := db.VMByName(ctx, vm.Name)
	if err != nil || !reflect.DeepEqual(byName, want) {
		t.Fatalf("VMByName = %+v, %v", byName, err)
	}
	gotCfg, err := db.GetVMConfig(ctx, vm.ID)
	if err != nil {
		t.Fatal(err)
	}
	cfg.VMID = vm.ID
	if gotCfg != cfg {
		t.Fatalf("GetVMConfig:\n got %#v\nwant %#v", gotCfg, cfg)
	}
	if gotCfg.AuthKey != cfg.AuthKey {
		t.Fatalf("auth key did not round-trip")
	}
	a, err := db.AddressByIP(ctx, vm.Host, addr.IP)
	if err != nil {
		t.Fatal(err)
	}
	if want := (Address{Host: vm.Host, IP: addr.IP, MAC: want.MAC, Hostname: addr.Hostname, VMID: vm.ID, LeasedAt: addr.LeasedAt}); a != want {
		t.Fatalf("AddressByIP:\n got %+v\nwant %+v", a, want)
	}

	_, err = db.GetVM(ctx, "nope")
	wantErr(t, err, ErrNotFound, FieldVMID)
	_, err = db.VMByName(ctx, "nope")
	wantErr(t, err, ErrNotFound, FieldVMName)
	_, err = db.GetVMConfig(ctx, "nope")
	wantErr(t, err, ErrNotFound, FieldVMID)
}

func TestCreateVMUniqueness(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	db := newDB(t)
	mustNetwork(t, db, "cool")
	first := mustCreateVM(t, db, 1, "cool")

	tests := []struct {
		name   string
		mutate func(vm *VM, addr *Address)
		err    error
		field  string
	}{
		{"same id", func(vm *VM, a *Address) { vm.ID = first.ID }, ErrExists, FieldVMID},
		{"same live name", func(vm *VM, a *Address) { vm.Name = first.Name }, ErrExists, FieldVMName},
		{"same mac", func(vm *VM, a *Address) { a.MAC = "52:54:00:00:00:01" }, ErrExists, FieldMAC},
		{"same ip", func(vm *VM, a *Address) { a.IP = netip.MustParseAddr("10.10.0.1") }, ErrExists, FieldIP},
		{"unknown network", func(vm *VM, a *Address) { vm.Network = "nope" }, ErrNotFound, FieldNetworkName},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			vm, cfg, addr := fixture(2, "cool")
			tt.mutate(&vm, &addr)
			err := db.CreateVM(ctx, vm, cfg, addr)
			wantErr(t, err, tt.err, tt.field)
			// The transaction left nothing behind: vm 2's own row, config and
			// address are absent, and vm 1 is untouched.
			if vm.ID != first.ID {
				if _, err := db.GetVM(ctx, vm.ID); !isNotFound(err) {
					t.Fatalf("vm row left behind: %v", err)
				}
				if _, err := db.GetVMConfig(ctx, vm.ID); !isNotFound(err) {
					t.Fatalf("vm config left behind: %v", err)
				}
			}
			if _, err := db.AddressByMAC(ctx, "52:54:00:00:00:02"); !isNotFound(err) {
				t.Fatalf("address left behind: %v", err)
			}
			if got, err := db.GetVM(ctx, first.ID); err != nil || got.Name != first.Name || got.IP != "10.10.0.1" {
				t.Fatalf("first vm changed: %+v, %v", got, err)
			}
		})
	}
	vms, err := db.ListVMs(ctx)
	if err != nil || len(vms) != 1 {
		t.Fatalf("ListVMs = %d vms, %v; want 1", len(vms), err)
	}
}

func isNotFound(err error) bool { return err != nil && errors.Is(err, ErrNotFound) }

func TestSoftDeleteAndPurge(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	db := newDB(t)
	mustNetwork(t, db, "cool")
	old := mustCreateVM(t, db, 1, "cool")
	if err := db.UpsertKVs(ctx, old.ID, []KV{{Key: "a", Value: "1"}}); err != nil {
		t.Fatal(err)
	}

	delAt := t0.Add(time.Hour)
	if err := db.MarkVMDeleted(ctx, old.ID, delAt); err != nil {
		t.Fatal(err)
	}
	wantErr(t, db.MarkVMDeleted(ctx, old.ID, delAt), ErrNotFound, FieldVMID)
	wantErr(t, db.MarkVMDeleted(ctx, "nope", delAt), ErrNotFound, FieldVMID)
	got, err := db.GetVM(ctx, old.ID)
	if err != nil || !got.DeletedAt.Equal(delAt) || !got.UpdatedAt.Equal(delAt) || got.Live() {
		t.Fatalf("soft-deleted vm = %+v, %v", got, err)
	}
	_, err = db.VMByName(ctx, old.Name)
	wantErr(t, err, ErrNotFound, FieldVMName)

	// The name is free again; the soft-deleted VM still holds its MAC and IP.
	again, cfg, addr := fixture(2, "cool")
	again.Name = old.Name
	if err := db.CreateVM(ctx, again, cfg, addr); err != nil {
		t.Fatalf("reuse name after soft delete: %v", err)
	}
	if got, err := db.VMByName(ctx, old.Name); err != nil || got.ID != again.ID {
		t.Fatalf("VMByName after reuse = %+v, %v", got, err)
	}
	reuseAddr, cfg3 := fixture3(t)
	reuseAddr.MAC = "52:54:00:00:00:01"
	wantErr(t, db.CreateVM(ctx, VM{ID: "vm-x", Name: "x", Network: "cool", CreatedAt: t0}, cfg3, reuseAddr), ErrExists, FieldMAC)
	// A second live VM may not take the name.
	dup, cfg4, addr4 := fixture(4, "cool")
	dup.Name = old.Name
	wantErr(t, db.CreateVM(ctx, dup, cfg4, addr4), ErrExists, FieldVMName)

	// ListVMs includes soft-deleted VMs, oldest first.
	vms, err := db.ListVMs(ctx)
	if err != nil || len(vms) != 2 || vms[0].ID != old.ID || vms[1].ID != again.ID {
		t.Fatalf("ListVMs = %+v, %v", vms, err)
	}

	// Purge cascades to config, KVs and address, and frees MAC and IP.
	if err := db.PurgeVM(ctx, old.ID); err != nil {
		t.Fatal(err)
	}
	wantErr(t, db.PurgeVM(ctx, old.ID), ErrNotFound, FieldVMID)
	_, err = db.GetVM(ctx, old.ID)
	wantErr(t, err, ErrNotFound, FieldVMID)
	_, err = db.GetVMConfig(ctx, old.ID)
	wantErr(t, err, ErrNotFound, FieldVMID)
	_, err = db.GetKVs(ctx, old.ID)
	wantErr(t, err, ErrNotFound, FieldVMID)
	_, err = db.AddressByMAC(ctx, "52:54:00:00:00:01")
	wantErr(t, err, ErrNotFound, FieldMAC)
	var kvRows int64
	res, err := db.query(ctx, q(`SELECT count(*) FROM kvs WHERE vm_id = ?`, old.ID))
	if err != nil {
		t.Fatal(err)
	}
	kvRows = rows(res[0])[0].int(0)
	if kvRows != 0 {
		t.Fatalf("%d kv rows survived the purge", kvRows)
	}
	if err := db.CreateVM(ctx, VM{ID: "vm-x", Name: "x", Network: "cool", CreatedAt: t0}, cfg3, reuseAddr); err != nil {
		t.Fatalf("reuse mac after purge: %v", err)
	}
	_, cfg5, addr5 := fixture(5, "cool")
	addr5.IP = netip.MustParseAddr("10.10.0.1")
	if err := db.CreateVM(ctx, VM{ID: "vm-y", Name: "y", Network: "cool", CreatedAt: t0}, cfg5, addr5); err != nil {
		t.Fatalf("reuse ip after purge: %v", err)
	}
	if err := db.PurgeVM(ctx, again.ID); err != nil {
		t.Fatalf("purge of a live vm: %v", err)
	}
}

// fixture3 is an address and config for a hand-made VM with id vm-x.
func fixture3(t *testing.T) (Address, VMConfig) {
	t.Helper()
	_, cfg, addr := fixture(3, "cool")
	return addr, cfg
}

func TestSetVMState(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	db := newDB(t)
	mustNetwork(t, db, "cool")
	vm := mustCreateVM(t, db, 1, "cool")
	at := t0.Add(time.Minute)
	if err := db.SetVMState(ctx, vm.ID, "running", at); err != nil {
		t.Fatal(err)
	}
	got, err := db.GetVM(ctx, vm.ID)
	if err != nil || got.State != "running" || !got.UpdatedAt.Equal(at) || !got.CreatedAt.Equal(vm.CreatedAt) {
		t.Fatalf("after SetVMState: %+v, %v", got, err)
	}
	wantErr(t, db.SetVMState(ctx, "nope", "running", at), ErrNotFound, FieldVMID)
	wantErr(t, db.SetVMState(ctx, vm.ID, "running", time.Time{}), ErrInvalid, "")
}

func TestSetVMDesired(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	db := newDB(t)
	mustNetwork(t, db, "cool")
	vm := mustCreateVM(t, db, 1, "cool")
	if vm.Desired != "running" {
		t.Fatalf("fixture desired = %q", vm.Desired)
	}
	at := t0.Add(time.Minute)
	if err := db.SetVMDesired(ctx, vm.ID, "stopped", at); err != nil {
		t.Fatal(err)
	}
	got, err := db.GetVM(ctx, vm.ID)
	if err != nil || got.Desired != "stopped" || got.State != vm.State || !got.UpdatedAt.Equal(at) {
		t.Fatalf("after SetVMDesired: %+v, %v", got, err)
	}
	wantErr(t, db.SetVMDesired(ctx, "nope", "running", at), ErrNotFound, FieldVMID)
	wantErr(t, db.SetVMDesired(ctx, vm.ID, "running", time.Time{}), ErrInvalid, "")
}

func TestObserveVMState(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	db := newDB(t)
	mustNetwork(t, db, "cool")
	creating := mustCreateVM(t, db, 1, "cool") // the fixture's state is "creating"
	live := mustCreateVM(t, db, 2, "cool")
	deleted := mustCreateVM(t, db, 3, "cool")
	at := t0.Add(time.Hour)
	for _, id := range []string{live.ID, deleted.ID} {
		if err := db.SetVMState(ctx, id, "running", at); err != nil {
			t.Fatal(err)
		}
	}
	if err := db.MarkVMDeleted(ctx, deleted.ID, at); err != nil {
		t.Fatal(err)
	}
	keep := []string{"creating", "rebuilding"}
	later := at.Add(time.Minute)
	for _, c := range []struct {
		id, state   string
		changed     bool
		wantState   string
		wantUpdated time.Time
	}{
		{creating.ID, "running", false, "creating", creating.CreatedAt},
		{live.ID, "running", false, "running", at}, // no change, no write
		{live.ID, "crashed", true, "crashed", later},
		{deleted.ID, "stopped", false, "running", at},
		{"nope", "stopped", false, "", time.Time{}},
	} {
		changed, err := db.ObserveVMState(ctx, c.id, c.state, keep, later)
		if err != nil || changed != c.changed {
			t.Errorf("ObserveVMState(%s, %s) = %t, %v; want %t", c.id, c.state, changed, err, c.changed)
		}
		if c.id == "nope" {
			continue
		}
		got, err := db.GetVM(ctx, c.id)
		if err != nil || got.State != c.wantState || !got.UpdatedAt.Equal(c.wantUpdated) {
			t.Errorf("after ObserveVMState(%s, %s): state %q updated %v (%v), want %q %v",
				c.id, c.state, got.State, got.UpdatedAt, err, c.wantState, c.wantUpdated)
		}
	}
	// No keep list: only deleted VMs are left alone.
	if changed, err := db.ObserveVMState(ctx, creating.ID, "stopped", nil, later); err != nil || !changed {
		t.Errorf("ObserveVMState without keep = %t, %v", changed, err)
	}
	if _, err := db.ObserveVMState(ctx, live.ID, "running", keep, time.Time{}); !errors.Is(err, ErrInvalid) {
		t.Errorf("ObserveVMState at zero time = %v, want ErrInvalid", err)
	}
}

// TestDesiredMigration: a database from before desired states keeps its stopped and
// deleted VMs stopped, and wants the rest running, as a restart used to treat them.
func TestDesiredMigration(t *testing.T) {
	t.Parallel()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	db, err := open(ctx, testConfig(t, t.TempDir()), nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { db.Close() })
	old := fstest.MapFS{}
	for _, f := range []string{"migrations/0001_init.sql", "migrations/0002_auth_key_id.sql"} {
		b, err := fs.ReadFile(migrationFS, f)
		if err != nil {
			t.Fatal(err)
		}
		old[f] = &fstest.MapFile{Data: b}
	}
	if _, err := db.migrate(ctx, old); err != nil {
		t.Fatal(err)
	}
	if _, err := db.exec(ctx, q(`INSERT INTO networks (name, created_at) VALUES ('cool', 1)`)); err != nil {
		t.Fatal(err)
	}
	states := map[string]string{"vm-run": "running", "vm-stop": "stopped", "vm-crash": "crashed", "vm-new": "creating", "vm-del": "running"}
	for id, st := range states {
		if _, err := db.exec(ctx, q(`INSERT INTO vms (id, name, network, state, created_at, updated_at) VALUES (?, ?, 'cool', ?, 1, 1)`, id, id, st)); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := db.exec(ctx, q(`UPDATE vms SET deleted_at = 2 WHERE id = 'vm-del'`)); err != nil {
		t.Fatal(err)
	}
	if applied, err := db.migrate(ctx, migrationFS); err != nil || len(applied) == 0 {
		t.Fatalf("migrate = %v, %v", applied, err)
	}
	want := map[string]string{"vm-run": "running", "vm-stop": "stopped", "vm-crash": "running", "vm-new": "running", "vm-del": "stopped"}
	for id, desired := range want {
		vm, err := db.GetVM(ctx, id)
		if err != nil || vm.Desired != desired || vm.State != states[id] {
			t.Errorf("%s after migration: state %q desired %q (%v), want %q %q", id, vm.State, vm.Desired, err, states[id], desired)
		}
	}
}

func TestTakeAuthKey(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	db := newDB(t)
	mustNetwork(t, db, "cool")
	vm, cfg, addr := fixture(1, "cool")
	cfg.AuthKeyID = "kAbC123CNTRL"
	if err := db.CreateVM(ctx, vm, cfg, addr); err != nil {
		t.Fatal(err)
	}
	servedAt := t0.Add(2 * time.Minute)
	key, err := db.TakeAuthKey(ctx, vm.ID, servedAt)
	if err != nil || key != cfg.AuthKey {
		t.Fatalf("first TakeAuthKey: err %v, right key %t", err, key == cfg.AuthKey)
	}
	key, err = db.TakeAuthKey(ctx, vm.ID, servedAt.Add(time.Second))
	wantErr(t, err, ErrAlreadyServed, FieldVMID)
	if key != "" {
		t.Fatalf("second TakeAuthKey returned a key")
	}
	got, err := db.GetVMConfig(ctx, vm.ID)
	if err != nil || !got.AuthKeyServedAt.Equal(servedAt) || got.AuthKeyID != cfg.AuthKeyID {
		t.Fatalf("served_at = %v, key id %q, %v; want %v, %q", got.AuthKeyServedAt, got.AuthKeyID, err, servedAt, cfg.AuthKeyID)
	}
	_, err = db.TakeAuthKey(ctx, "nope", servedAt)
	wantErr(t, err, ErrNotFound, FieldVMID)
	_, err = db.TakeAuthKey(ctx, vm.ID, time.Time{})
	wantErr(t, err, ErrInvalid, "")
}

// TestTakeAuthKeyConcurrent races many takers: exactly one gets the key.
func TestTakeAuthKeyConcurrent(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	db := newDB(t)
	mustNetwork(t, db, "cool")
	vm := mustCreateVM(t, db, 1, "cool")
	const n = 8
	errs := make(chan error, n)
	for i := range n {
		go func() {
			_, err := db.TakeAuthKey(ctx, vm.ID, t0.Add(time.Duration(i)*time.Second))
			errs <- err
		}()
	}
	var ok, served int
	for range n {
		switch err := <-errs; {
		case err == nil:
			ok++
		case errors.Is(err, ErrAlreadyServed):
			served++
		default:
			t.Fatal(err)
		}
	}
	if ok != 1 || served != n-1 {
		t.Fatalf("%d takers got the key and %d were refused; want 1 and %d", ok, served, n-1)
	}
}

func TestCreateVMBadInput(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	db := newDB(t)
	mustNetwork(t, db, "cool")
	tests := []struct {
		name   string
		mutate func(*VM, *VMConfig, *Address)
		field  string
	}{
		{"no id", func(v *VM, c *VMConfig, a *Address) { v.ID = "" }, ""},
		{"no name", func(v *VM, c *VMConfig, a *Address) { v.Name = "" }, ""},
		{"no network", func(v *VM, c *VMConfig, a *Address) { v.Network = "" }, ""},
		{"no created_at", func(v *VM, c *VMConfig, a *Address) { v.CreatedAt = time.Time{} }, ""},
		{"pre-1970 time", func(v *VM, c *VMConfig, a *Address) { v.CreatedAt = time.Date(1960, 1, 1, 0, 0, 0, 0, time.UTC) }, ""},
		{"already deleted", func(v *VM, c *VMConfig, a *Address) { v.DeletedAt = t0 }, ""},
		{"no ip", func(v *VM, c *VMConfig, a *Address) { a.IP = netip.Addr{} }, FieldIP},
		{"bad mac", func(v *VM, c *VMConfig, a *Address) { a.MAC = "not-a-mac" }, FieldMAC},
		{"long mac", func(v *VM, c *VMConfig, a *Address) {
			a.MAC = "00:00:00:00:fe:80:00:00:00:00:00:00:02:00:5e:10:00:00:00:01"
		}, FieldMAC},
		{"vm ip differs", func(v *VM, c *VMConfig, a *Address) { v.IP = "10.10.9.9" }, ""},
		{"vm mac differs", func(v *VM, c *VMConfig, a *Address) { v.MAC = "52:54:00:99:99:99" }, ""},
		{"config of another vm", func(v *VM, c *VMConfig, a *Address) { c.VMID = "other" }, ""},
		{"address of another vm", func(v *VM, c *VMConfig, a *Address) { a.VMID = "other" }, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			vm, cfg, addr := fixture(1, "cool")
			tt.mutate(&vm, &cfg, &addr)
			wantErr(t, db.CreateVM(ctx, vm, cfg, addr), ErrInvalid, tt.field)
		})
	}
	// Matching optional fields are accepted.
	vm, cfg, addr := fixture(1, "cool")
	vm.IP, vm.MAC, cfg.VMID, addr.VMID = addr.IP.String(), strings.ToUpper(addr.MAC), vm.ID, vm.ID
	if err := db.CreateVM(ctx, vm, cfg, addr); err != nil {
		t.Fatal(err)
	}
	if vms, err := db.ListVMs(ctx); err != nil || len(vms) != 1 {
		t.Fatalf("ListVMs = %d, %v; want only the valid vm", len(vms), err)
	}
}
