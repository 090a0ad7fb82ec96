package fleet

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"tailscale.com/net/memnet"

	"github.com/threes-dev/threes/embeddb"
)

// TestSharedMetadataView: with a database other hosts write to (two embedded
// rqlite nodes of one cluster), a write made through the other node shows in this
// host's metadata view once its entry is SharedMaxAge old; without Shared the
// entry would be kept for ever, since this host's write counter never moved.
func TestSharedMetadataView(t *testing.T) {
	ctx := context.Background()
	var nw memnet.Network
	open := func(i int, edit func(*embeddb.Config)) *embeddb.DB {
		addr := fmt.Sprintf("127.0.0.1:%d", 4101+i)
		ln, err := nw.Listen("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		cfg := embeddb.Config{Dir: filepath.Join(t.TempDir(), "db"), NodeID: fmt.Sprintf("host%d", i), Listener: ln,
			Advertise: addr,
			Dial:      func(ctx context.Context, a string) (net.Conn, error) { return nw.Dial(ctx, "tcp", a) },
			Admit:     func(context.Context, net.Conn) error { return nil }}
		if edit != nil {
			edit(&cfg)
		}
		db, err := embeddb.Open(ctx, cfg)
		if err != nil {
			t.Fatalf("open host%d: %v", i, err)
		}
		t.Cleanup(func() { db.Close() })
		return db
	}
	here := open(0, func(c *embeddb.Config) { c.BootstrapExpect = 1 })
	there := open(1, func(c *embeddb.Config) { c.Join = []string{"127.0.0.1:4101"} })

	now := time.Now()
	vm := embeddb.VM{ID: NewID(now), Name: "shared", Network: "lab", State: StateRunning, Desired: StateRunning, CreatedAt: now}
	if err := there.CreateNetwork(ctx, embeddb.Network{Name: "lab", CreatedAt: now}); err != nil {
		t.Fatal(err)
	}
	ip := netip.MustParseAddr("10.10.0.7")
	if err := there.CreateVM(ctx, vm, embeddb.VMConfig{Hostname: "shared"},
		embeddb.Address{IP: ip, MAC: "52:54:00:00:00:07", Hostname: "shared"}); err != nil {
		t.Fatal(err)
	}

	var mu sync.Mutex
	clock := now
	tick := func(d time.Duration) { mu.Lock(); clock = clock.Add(d); mu.Unlock() }
	src := newMDSource(here, "", nil, func() time.Time { mu.Lock(); defer mu.Unlock(); return clock })
	src.maxAge = SharedMaxAge
	lonely := newMDSource(here, "", nil, func() time.Time { mu.Lock(); defer mu.Unlock(); return clock })

	kvs := func(s *MetadataSource) int {
		t.Helper()
		in, err := s.ByIP(ctx, ip)
		if err != nil {
			t.Fatal(err)
		}
		return len(in.KVs)
	}
	if kvs(src) != 0 || kvs(lonely) != 0 {
		t.Fatal("key/values before any were written")
	}
	if err := there.UpsertKVs(ctx, vm.ID, []embeddb.KV{{Key: "role", Value: "web"}}); err != nil {
		t.Fatal(err)
	}
	tick(SharedMaxAge / 2)
	if kvs(src) != 0 {
		t.Error("the entry was read again before it was SharedMaxAge old (it costs a leader read per request)")
	}
	tick(SharedMaxAge)
	if kvs(src) != 1 {
		t.Error("another host's write never showed in the shared view")
	}
	if kvs(lonely) != 0 {
		t.Error("the unshared view read again without a write of its own host: the test shows nothing")
	}
}
