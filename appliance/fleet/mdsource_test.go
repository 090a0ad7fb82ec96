package fleet

import (
	"context"
	"errors"
	"net/netip"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"tailscale.com/net/memnet"

	"github.com/threes-dev/threes/embeddb"
	"github.com/threes-dev/threes/netboot/metadata"
)

// openDB opens a real embedded rqlite node in a temporary directory, with a
// network "lab" and one VM at 10.10.0.5 whose auth key is "tskey-secret".
func openDB(t *testing.T) (*embeddb.DB, embeddb.VM) {
	t.Helper()
	ctx := context.Background()
	db, err := embeddb.Open(ctx, embeddb.Config{Dir: filepath.Join(t.TempDir(), "db"), NodeID: "test",
		Listener: memnet.Listen("threes-raft:4002")})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { db.Close() })
	now := time.Now()
	if err := db.CreateNetwork(ctx, embeddb.Network{Name: "lab", CreatedAt: now}); err != nil {
		t.Fatal(err)
	}
	vm := embeddb.VM{ID: NewID(now), Name: "cached", Network: "lab", State: StateRunning, Desired: StateRunning, CreatedAt: now}
	ip := netip.MustParseAddr("10.10.0.5")
	if err := db.CreateVM(ctx, vm, embeddb.VMConfig{Hostname: "cached", AuthKey: "tskey-secret"},
		embeddb.Address{IP: ip, MAC: "52:54:00:00:00:05", Hostname: "cached"}); err != nil {
		t.Fatal(err)
	}
	return db, vm
}

// TestMetadataViewFollowsWrites: the metadata source answers from its cache, and
// every write about the VM (key/values, deletion, purge) shows in the next answer.
func TestMetadataViewFollowsWrites(t *testing.T) {
	ctx := context.Background()
	db, vm := openDB(t)
	src := newMDSource(db, "", nil, time.Now)
	ip := netip.MustParseAddr("10.10.0.5")
	in, err := src.ByIP(ctx, ip)
	if err != nil || in.ID != vm.ID || in.Hostname != "cached" || len(in.KVs) != 0 {
		t.Fatalf("ByIP = %+v, %v", in, err)
	}

	if err := db.UpsertKVs(ctx, vm.ID, []embeddb.KV{{Key: "role", Value: "db"}}); err != nil {
		t.Fatal(err)
	}
	in, err = src.ByIP(ctx, ip)
	if err != nil || len(in.KVs) != 1 || in.KVs[0].Value != "db" {
		t.Fatalf("ByIP after a key/value was set = %+v, %v; want it", in, err)
	}
	if err := db.DeleteKVs(ctx, vm.ID, []string{"role"}); err != nil {
		t.Fatal(err)
	}
	if in, err = src.ByIP(ctx, ip); err != nil || len(in.KVs) != 0 {
		t.Fatalf("ByIP after the key/value was deleted = %+v, %v", in, err)
	}
	if err := db.MarkVMDeleted(ctx, vm.ID, time.Now()); err != nil {
		t.Fatal(err)
	}
	if _, err := src.ByIP(ctx, ip); !errors.Is(err, metadata.ErrNotFound) {
		t.Fatalf("ByIP of a deleted vm: %v, want not found", err)
	}
	if err := db.PurgeVM(ctx, vm.ID); err != nil {
		t.Fatal(err)
	}
	if _, err := src.ByIP(ctx, ip); !errors.Is(err, metadata.ErrNotFound) {
		t.Fatalf("ByIP of a purged vm: %v, want not found", err)
	}
}

// TestMetadataViewCostsNoRead: once read, a VM's metadata is served without the
// database: it still answers with the database closed.
func TestMetadataViewCostsNoRead(t *testing.T) {
	ctx := context.Background()
	db, vm := openDB(t)
	src := newMDSource(db, "", nil, time.Now)
	ip := netip.MustParseAddr("10.10.0.5")
	if _, err := src.ByIP(ctx, ip); err != nil {
		t.Fatal(err)
	}
	db.Close()
	if in, err := src.ByIP(ctx, ip); err != nil || in.ID != vm.ID {
		t.Fatalf("ByIP from the cache with the database closed = %+v, %v", in, err)
	}
	// A VM never read goes to the database, which is closed.
	if _, err := src.ByIP(ctx, netip.MustParseAddr("10.10.0.6")); err == nil {
		t.Fatal("ByIP of an unread address answered with the database closed")
	}
}

// TestAuthKeyOnceUnderLoad: many concurrent requests for a VM's auth key, through
// the metadata source, get it exactly once.
func TestAuthKeyOnceUnderLoad(t *testing.T) {
	ctx := context.Background()
	db, vm := openDB(t)
	src := newMDSource(db, "", nil, time.Now)
	const n = 64
	var wg sync.WaitGroup
	keys, taken := make(chan string, n), make(chan error, n)
	start := make(chan struct{})
	for range n {
		wg.Go(func() {
			<-start
			// Each asker reads the instance first, as the metadata server does.
			if _, err := src.ByIP(ctx, netip.MustParseAddr("10.10.0.5")); err != nil {
				taken <- err
				return
			}
			k, err := src.TakeAuthKey(ctx, vm.ID)
			if err != nil {
				taken <- err
				return
			}
			keys <- k
		})
	}
	close(start)
	wg.Wait()
	close(keys)
	close(taken)
	var got []string
	for k := range keys {
		got = append(got, k)
	}
	if len(got) != 1 || got[0] != "tskey-secret" {
		t.Fatalf("%d of %d concurrent requests got a key (%d values); want exactly one, the vm's", len(got), n, len(got))
	}
	for err := range taken {
		if !errors.Is(err, metadata.ErrAuthKeyTaken) {
			t.Errorf("a refused request: %v, want ErrAuthKeyTaken", err)
		}
	}
	if _, err := src.TakeAuthKey(ctx, vm.ID); !errors.Is(err, metadata.ErrAuthKeyTaken) {
		t.Errorf("a later request: %v, want ErrAuthKeyTaken", err)
	}
}
