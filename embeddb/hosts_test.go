package embeddb

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"
)

// TestHosts: a host's row is written, replaced by its next heartbeat and listed by
// name; bad rows are refused.
func TestHosts(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	db := newDB(t)
	a := Host{Name: "threes-a", TailnetIP: "100.64.0.1", VCPUs: 8, MemoryMiB: 16384, CPUOvercommit: 4, MemoryOvercommit: 1.5, UpdatedAt: t0}
	b := Host{Name: "threes-b", VCPUs: 2, MemoryMiB: 2048, CPUOvercommit: 1, MemoryOvercommit: 1, UpdatedAt: t0}
	for _, h := range []Host{b, a} {
		if err := db.UpsertHost(ctx, h); err != nil {
			t.Fatal(err)
		}
	}
	got, err := db.ListHosts(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(got, []Host{a, b}) {
		t.Fatalf("ListHosts = %+v, want %+v", got, []Host{a, b})
	}

	// The next heartbeat replaces the row.
	a.TailnetIP, a.VCPUs, a.CPUOvercommit, a.UpdatedAt = "100.64.0.9", 16, 2.125, t0.Add(30*time.Second)
	if err := db.UpsertHost(ctx, a); err != nil {
		t.Fatal(err)
	}
	got, _ = db.ListHosts(ctx)
	if len(got) != 2 || got[0] != a {
		t.Fatalf("after the second heartbeat ListHosts = %+v, want %+v first", got, a)
	}

	for name, h := range map[string]Host{
		"no name":         {VCPUs: 1, CPUOvercommit: 1, MemoryOvercommit: 1, UpdatedAt: t0},
		"bad ip":          {Name: "x", TailnetIP: "threes-a", CPUOvercommit: 1, MemoryOvercommit: 1, UpdatedAt: t0},
		"negative vcpus":  {Name: "x", VCPUs: -1, CPUOvercommit: 1, MemoryOvercommit: 1, UpdatedAt: t0},
		"zero overcommit": {Name: "x", VCPUs: 1, MemoryOvercommit: 1, UpdatedAt: t0},
		"no time":         {Name: "x", VCPUs: 1, CPUOvercommit: 1, MemoryOvercommit: 1},
	} {
		if err := db.UpsertHost(ctx, h); !errors.Is(err, ErrInvalid) {
			t.Errorf("%s: UpsertHost = %v, want ErrInvalid", name, err)
		}
	}
	if got, _ := db.ListHosts(ctx); len(got) != 2 {
		t.Fatalf("refused rows were written: %+v", got)
	}
}

// TestHostLoadsAndDelete: the load counts live VMs by host and type (deleted ones
// not), and a host's row cannot go while a live VM records the host: the refusal
// says how many and names the first few.
func TestHostLoadsAndDelete(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	db := newDB(t)
	mustNetwork(t, db, "lab")
	for _, name := range []string{"threes-a", "threes-b", "threes-c"} {
		if err := db.UpsertHost(ctx, Host{Name: name, VCPUs: 4, MemoryMiB: 4096, CPUOvercommit: 1, MemoryOvercommit: 1, UpdatedAt: t0}); err != nil {
			t.Fatal(err)
		}
	}
	// a: 7 small and 1 middy live, 1 small deleted; b: 1 teeny deleted; c: none.
	n := 0
	mk := func(host, typ string) VM {
		n++
		vm, cfg, addr := fixture(n, "lab")
		vm.Host, vm.Type = host, typ
		if err := db.CreateVM(ctx, vm, cfg, addr); err != nil {
			t.Fatal(err)
		}
		return vm
	}
	for range 7 {
		mk("threes-a", "small")
	}
	mk("threes-a", "middy")
	if err := db.MarkVMDeleted(ctx, mk("threes-a", "small").ID, t0); err != nil {
		t.Fatal(err)
	}
	gone := mk("threes-b", "teeny")
	if err := db.MarkVMDeleted(ctx, gone.ID, t0); err != nil {
		t.Fatal(err)
	}
	loads, err := db.HostLoads(ctx)
	if err != nil {
		t.Fatal(err)
	}
	want := []HostLoad{{"threes-a", "middy", 1}, {"threes-a", "small", 7}}
	if !slices.Equal(loads, want) {
		t.Fatalf("HostLoads = %+v, want %+v", loads, want)
	}

	err = db.DeleteHost(ctx, "threes-a")
	wantErr(t, err, ErrInUse, FieldHostName)
	// Eight live VMs: the count, the first five names by name, and how many more.
	for _, s := range []string{`"threes-a"`, "8 live VMs", "toy1, toy2, toy3, toy4, toy5 and 3 more"} {
		if !strings.Contains(err.Error(), s) {
			t.Errorf("refusal %q does not say %q", err, s)
		}
	}
	if hs, _ := db.ListHosts(ctx); len(hs) != 3 {
		t.Fatalf("the refused delete removed a row: %+v", hs)
	}
	// A host whose VMs are all deleted (not yet purged) can go, as can an idle one.
	for _, name := range []string{"threes-b", "threes-c"} {
		if err := db.DeleteHost(ctx, name); err != nil {
			t.Fatalf("delete %s: %v", name, err)
		}
	}
	wantErr(t, db.DeleteHost(ctx, "threes-c"), ErrNotFound, FieldHostName)
	if hs, _ := db.ListHosts(ctx); len(hs) != 1 || hs[0].Name != "threes-a" {
		t.Fatalf("hosts after the deletes: %+v", hs)
	}
	// Once its one VM goes, the refusal names it alone.
	for _, vm := range mustLiveOn(t, db, "threes-a")[1:] {
		if err := db.MarkVMDeleted(ctx, vm.ID, t0); err != nil {
			t.Fatal(err)
		}
	}
	err = db.DeleteHost(ctx, "threes-a")
	if !errors.Is(err, ErrInUse) || !strings.Contains(err.Error(), "by 1 live VM: toy1") {
		t.Fatalf("refusal with one VM left = %v", err)
	}
}

func mustLiveOn(t *testing.T, db *DB, host string) []VM {
	t.Helper()
	vms, err := db.ListVMs(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	var out []VM
	for _, vm := range vms {
		if vm.Host == host && vm.Live() {
			out = append(out, vm)
		}
	}
	if len(out) == 0 {
		t.Fatal(fmt.Sprintf("no live VM on %s", host))
	}
	return out
}
