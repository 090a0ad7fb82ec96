package embeddb

import (
	"context"
	"errors"
	"testing"
	"time"
)

// isolate cuts node db off the network, as a crash or a partition would: no
// connection in or out, and no step-down first.
func isolate(db *DB) {
	db.ln.Close()
	db.conns.closeAll()
}

// TestLocalReadsWithoutLeader: a follower's Local view reads its own copy. With
// the leader and the third node cut off, it still answers with what was written
// before, while the follower's ordinary reads (linearizable, which need the
// leader) do not; once the follower has heard from no leader for longer than a
// view's bound, that view's reads are refused with ErrStale rather than
// answered from a copy that may be stale.
func TestLocalReadsWithoutLeader(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	c := newTestCluster(t, 3)
	dbs := c.openExpect()
	l := c.leader()
	f, other := (l+1)%3, (l+2)%3
	mustNetwork(t, dbs[l], "cool")
	vm, cfg, addr := fixture(1, "cool")
	if err := dbs[l].CreateVM(ctx, vm, cfg, addr); err != nil {
		t.Fatal(err)
	}
	if err := dbs[l].UpsertKVs(ctx, vm.ID, []KV{{Key: "role", Value: "web"}}); err != nil {
		t.Fatal(err)
	}
	view := dbs[f].Local(time.Minute)
	// A local read may miss the latest writes: wait until the follower has them.
	deadline := time.Now().Add(30 * time.Second)
	for {
		kvs, err := view.GetKVs(ctx, vm.ID)
		if err == nil && len(kvs) == 1 {
			break
		}
		if (err != nil && !errors.Is(err, ErrNotFound)) || time.Now().After(deadline) {
			t.Fatalf("follower's local key/values = %v, %v; want the one written", kvs, err)
		}
		time.Sleep(20 * time.Millisecond)
	}

	isolate(dbs[l])
	isolate(dbs[other])

	got, err := view.GetVM(ctx, vm.ID)
	if err != nil || got.Name != vm.Name || got.IP != addr.IP.String() || got.Host != vm.Host {
		t.Errorf("local GetVM without a leader = %+v, %v", got, err)
	}
	if gotCfg, err := view.GetVMConfig(ctx, vm.ID); err != nil || gotCfg.Hostname != cfg.Hostname || gotCfg.AuthKey != cfg.AuthKey {
		t.Errorf("local GetVMConfig without a leader: hostname %q, right key %t, %v", gotCfg.Hostname, gotCfg.AuthKey == cfg.AuthKey, err)
	}
	if kvs, err := view.GetKVs(ctx, vm.ID); err != nil || len(kvs) != 1 || kvs[0].Value != "web" {
		t.Errorf("local GetKVs without a leader = %+v, %v", kvs, err)
	}
	if a, err := view.AddressByIP(ctx, vm.Host, addr.IP); err != nil || a.VMID != vm.ID {
		t.Errorf("local AddressByIP without a leader = %+v, %v", a, err)
	}
	_, err = view.GetVM(ctx, "vm-none")
	wantErr(t, err, ErrNotFound, FieldVMID)

	// Ordinary reads, and a view with no bound, need the leader.
	for what, db := range map[string]interface {
		GetVM(context.Context, string) (VM, error)
	}{"the db": dbs[f], "Local(0)": dbs[f].Local(0)} {
		lctx, cancel := context.WithTimeout(ctx, time.Second)
		if _, err := db.GetVM(lctx, vm.ID); err == nil {
			t.Errorf("%s answered a linearizable read with no leader", what)
		}
		cancel()
	}

	// No leader has been heard from for over a second now (the reads above
	// waited that long; the sleep makes sure): a view allowing 100 ms refuses.
	time.Sleep(200 * time.Millisecond)
	short := dbs[f].Local(100 * time.Millisecond)
	if got, err := short.GetVM(ctx, vm.ID); !errors.Is(err, ErrStale) || got.ID != "" {
		t.Errorf("read past the bound = %+v, %v; want ErrStale and nothing", got, err)
	}
	if _, err := short.AddressByIP(ctx, vm.Host, addr.IP); !errors.Is(err, ErrStale) {
		t.Errorf("address read past the bound = %v; want ErrStale", err)
	}
}
