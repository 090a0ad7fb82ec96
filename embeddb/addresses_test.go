package embeddb

import (
	"context"
	"io/fs"
	"net/netip"
	"path"
	"slices"
	"testing"
	"testing/fstest"
	"time"
)

func TestAddresses(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	db := newDB(t)
	mustNetwork(t, db, "cool")
	// 10.10.0.10 sorts before 10.10.0.2 as text; the list is numeric.
	for _, n := range []int{10, 2, 300} {
		mustCreateVM(t, db, n, "cool")
	}
	as, err := db.ListAddresses(ctx)
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, a := range as {
		got = append(got, a.IP.String()+"="+a.VMID)
	}
	want := []string{"10.10.0.2=vm-000002", "10.10.0.10=vm-000010", "10.10.1.44=vm-000300"}
	if len(got) != len(want) {
		t.Fatalf("ListAddresses = %v; want %v", got, want)
	}
	for i := range want {
		if got[i] != want[i] {
			t.Fatalf("ListAddresses = %v; want %v", got, want)
		}
	}

	byMAC, err := db.AddressByMAC(ctx, "52-54-00-00-00-0A") // another notation, same MAC
	if err != nil || byMAC.IP != netip.MustParseAddr("10.10.0.10") || byMAC.MAC != "52:54:00:00:00:0a" {
		t.Fatalf("AddressByMAC = %+v, %v", byMAC, err)
	}
	byIP, err := db.AddressByIP(ctx, "node1", netip.MustParseAddr("::ffff:10.10.0.2")) // v4-mapped is the same address
	if err != nil || byIP.VMID != "vm-000002" || !byIP.LeasedAt.Equal(t0.Add(2e9)) {
		t.Fatalf("AddressByIP = %+v, %v", byIP, err)
	}

	_, err = db.AddressByIP(ctx, "node1", netip.MustParseAddr("10.10.9.9"))
	wantErr(t, err, ErrNotFound, FieldIP)
	_, err = db.AddressByMAC(ctx, "52:54:00:99:99:99")
	wantErr(t, err, ErrNotFound, FieldMAC)
	_, err = db.AddressByIP(ctx, "node1", netip.Addr{})
	wantErr(t, err, ErrInvalid, FieldIP)
	_, err = db.AddressByMAC(ctx, "zz:zz")
	wantErr(t, err, ErrInvalid, FieldMAC)
}

// hostVM creates VM n on host with the given address, returning its ID.
func hostVM(t *testing.T, db *DB, n int, host, ip, mac string) (VM, error) {
	t.Helper()
	vm, cfg, addr := fixture(n, "cool")
	vm.Host = host
	addr.IP, addr.MAC = netip.MustParseAddr(ip), mac
	return vm, db.CreateVM(context.Background(), vm, cfg, addr)
}

// TestAddressesPerHost: each host has a bridge of its own, so an IP repeats across
// hosts and each host's lookups see only its own (and those recorded with no
// host); a MAC stays unique across the cluster, and a refused create leaves no
// address behind.
func TestAddressesPerHost(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	db := newDB(t)
	mustNetwork(t, db, "cool")
	first := "10.10.0.2"
	onA, err := hostVM(t, db, 1, "a", first, "52:54:00:00:0a:01")
	if err != nil {
		t.Fatal(err)
	}
	onB, err := hostVM(t, db, 2, "b", first, "52:54:00:00:0b:01")
	if err != nil {
		t.Fatalf("host b's first vm at host a's first address: %v", err)
	}
	for host, want := range map[string]VM{"a": onA, "b": onB} {
		got, err := db.AddressByIP(ctx, host, netip.MustParseAddr(first))
		if err != nil || got.VMID != want.ID || got.Host != host {
			t.Errorf("AddressByIP(%s, %s) = %+v, %v; want vm %s", host, first, got, err, want.ID)
		}
		vm, err := db.GetVM(ctx, want.ID)
		if err != nil || vm.IP != first || vm.Host != host {
			t.Errorf("GetVM(%s) = %+v, %v", want.ID, vm, err)
		}
	}
	_, err = db.AddressByIP(ctx, "c", netip.MustParseAddr(first))
	wantErr(t, err, ErrNotFound, FieldIP)

	// The same IP twice on one host, or a MAC another host holds, is refused,
	// and leaves nothing of the new VM.
	for _, c := range []struct {
		name, host, ip, mac, field string
	}{
		{"same ip same host", "a", first, "52:54:00:00:0a:02", FieldIP},
		{"mac of another host", "b", "10.10.0.3", "52:54:00:00:0a:01", FieldMAC},
	} {
		vm, err := hostVM(t, db, 3, c.host, c.ip, c.mac)
		wantErr(t, err, ErrExists, c.field)
		if _, err := db.GetVM(ctx, vm.ID); !isNotFound(err) {
			t.Errorf("%s: vm row left behind: %v", c.name, err)
		}
		if all, err := db.ListAddresses(ctx); err != nil || len(all) != 2 {
			t.Errorf("%s: addresses after the refused create: %+v, %v; want the two", c.name, all, err)
		}
	}
	vm, cfg, addr := fixture(4, "cool")
	vm.Host, addr.Host = "a", "b"
	wantErr(t, db.CreateVM(ctx, vm, cfg, addr), ErrInvalid, "")

	// An address with no host (from before hosts were recorded) is every host's.
	legacy, err := hostVM(t, db, 5, "", "10.10.0.9", "52:54:00:00:00:09")
	if err != nil {
		t.Fatal(err)
	}
	for _, host := range []string{"a", "b"} {
		got, err := db.AddressByIP(ctx, host, netip.MustParseAddr("10.10.0.9"))
		if err != nil || got.VMID != legacy.ID {
			t.Errorf("AddressByIP(%s) of an address with no host = %+v, %v", host, got, err)
		}
	}
	// A host's own address comes before one with no host at the same IP.
	ownNine, err := hostVM(t, db, 6, "b", "10.10.0.9", "52:54:00:00:0b:09")
	if err != nil {
		t.Fatal(err)
	}
	if got, err := db.AddressByIP(ctx, "b", netip.MustParseAddr("10.10.0.9")); err != nil || got.VMID != ownNine.ID {
		t.Errorf("AddressByIP(b) with its own and an unhosted address = %+v, %v; want its own", got, err)
	}

	list := func(as []Address, err error) []string {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
		var out []string
		for _, a := range as {
			out = append(out, a.Host+"/"+a.IP.String())
		}
		return out
	}
	for _, c := range []struct {
		host string
		want []string
	}{
		{"a", []string{"a/10.10.0.2", "/10.10.0.9"}},
		{"b", []string{"b/10.10.0.2", "/10.10.0.9", "b/10.10.0.9"}},
		{"c", []string{"/10.10.0.9"}},
	} {
		got := list(db.HostAddresses(ctx, c.host))
		if !slices.Equal(got, c.want) {
			t.Errorf("HostAddresses(%s) = %v; want %v", c.host, got, c.want)
		}
	}
	if got, want := list(db.ListAddresses(ctx)), []string{"a/10.10.0.2", "b/10.10.0.2", "/10.10.0.9", "b/10.10.0.9"}; !slices.Equal(got, want) {
		t.Errorf("ListAddresses = %v; want %v", got, want)
	}
	// The lookup by MAC is the cluster's.
	if got, err := db.AddressByMAC(ctx, "52:54:00:00:0b:01"); err != nil || got.VMID != onB.ID || got.Host != "b" {
		t.Errorf("AddressByMAC of b's vm = %+v, %v", got, err)
	}
	// Purging b's VM frees its IP on b only.
	if err := db.PurgeVM(ctx, onB.ID); err != nil {
		t.Fatal(err)
	}
	if _, err := db.AddressByIP(ctx, "b", netip.MustParseAddr(first)); !isNotFound(err) {
		t.Errorf("b's address after its vm was purged: %v", err)
	}
	if got, err := db.AddressByIP(ctx, "a", netip.MustParseAddr(first)); err != nil || got.VMID != onA.ID {
		t.Errorf("a's address after b's vm was purged: %+v, %v", got, err)
	}
}

// TestAddressHostMigration: a database from before per-host addresses keeps its
// addresses, each taking its VM's host (empty for a VM with none and for an address
// no VM holds); afterwards an IP may repeat on another host, a MAC may not, and a
// purge still takes the VM's address with it.
func TestAddressHostMigration(t *testing.T) {
	t.Parallel()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	db, err := open(ctx, testConfig(t, t.TempDir()), nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { db.Close() })
	old := fstest.MapFS{}
	files, err := fs.Glob(migrationFS, "migrations/*.sql")
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range files {
		if path.Base(f) >= "0006" {
			continue
		}
		b, err := fs.ReadFile(migrationFS, f)
		if err != nil {
			t.Fatal(err)
		}
		old[f] = &fstest.MapFile{Data: b}
	}
	if _, err := db.migrate(ctx, old); err != nil {
		t.Fatal(err)
	}
	for _, s := range []stmt{
		q(`INSERT INTO networks (name, created_at) VALUES ('cool', 1)`),
		q(`INSERT INTO vms (id, name, network, host, created_at, updated_at) VALUES ('vm-h1', 'one', 'cool', 'h1', 1, 1)`),
		q(`INSERT INTO vms (id, name, network, created_at, updated_at) VALUES ('vm-old', 'old', 'cool', 1, 1)`),
		q(`INSERT INTO vm_configs (vm_id, hostname) VALUES ('vm-h1', 'one')`),
		q(`INSERT INTO addresses (ip, mac, hostname, vm_id, leased_at) VALUES ('10.10.0.2', '52:54:00:00:00:02', 'one', 'vm-h1', 7)`),
		q(`INSERT INTO addresses (ip, mac, hostname, vm_id) VALUES ('10.10.0.3', '52:54:00:00:00:03', 'old', 'vm-old')`),
		q(`INSERT INTO addresses (ip, mac) VALUES ('10.10.0.4', '52:54:00:00:00:04')`),
	} {
		if _, err := db.exec(ctx, s); err != nil {
			t.Fatalf("%s: %v", s.sql, err)
		}
	}
	if applied, err := db.migrate(ctx, migrationFS); err != nil || !slices.Contains(applied, 6) {
		t.Fatalf("migrate = %v, %v; want 6 applied", applied, err)
	}
	all, err := db.ListAddresses(ctx)
	if err != nil {
		t.Fatal(err)
	}
	want := []Address{
		{Host: "h1", IP: netip.MustParseAddr("10.10.0.2"), MAC: "52:54:00:00:00:02", Hostname: "one", VMID: "vm-h1", LeasedAt: time.Unix(0, 7).UTC()},
		{Host: "", IP: netip.MustParseAddr("10.10.0.3"), MAC: "52:54:00:00:00:03", Hostname: "old", VMID: "vm-old"},
		{Host: "", IP: netip.MustParseAddr("10.10.0.4"), MAC: "52:54:00:00:00:04"},
	}
	if !slices.Equal(all, want) {
		t.Fatalf("addresses after the migration:\n got %+v\nwant %+v", all, want)
	}
	if vm, err := db.GetVM(ctx, "vm-h1"); err != nil || vm.IP != "10.10.0.2" || vm.MAC != "52:54:00:00:00:02" {
		t.Errorf("vm-h1 after the migration = %+v, %v", vm, err)
	}

	// h1's address repeats on h2; h1 cannot hold it twice, nor h2 a MAC of h1.
	if _, err := hostVM(t, db, 1, "h2", "10.10.0.2", "52:54:00:00:0f:02"); err != nil {
		t.Errorf("h1's address on h2: %v", err)
	}
	_, err = hostVM(t, db, 2, "h1", "10.10.0.2", "52:54:00:00:0f:03")
	wantErr(t, err, ErrExists, FieldIP)
	_, err = hostVM(t, db, 3, "h2", "10.10.0.5", "52:54:00:00:00:02")
	wantErr(t, err, ErrExists, FieldMAC)
	// The cascade from vms still holds.
	if err := db.PurgeVM(ctx, "vm-h1"); err != nil {
		t.Fatal(err)
	}
	if _, err := db.AddressByMAC(ctx, "52:54:00:00:00:02"); !isNotFound(err) {
		t.Errorf("purged vm's address after the migration: %v", err)
	}
}
