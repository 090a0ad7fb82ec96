package appliance

import (
	"context"
	"maps"
	"net/netip"
	"path/filepath"
	"testing"
	"time"

	"tailscale.com/net/memnet"

	"github.com/threes-dev/threes/embeddb"
)

// TestLoadIPAMPerHost: a host's IPAM holds its own addresses and those recorded
// with no host (from before hosts were), never another host's, so each host hands
// out the range's addresses on its own bridge.
func TestLoadIPAMPerHost(t *testing.T) {
	ctx := context.Background()
	db, err := embeddb.Open(ctx, embeddb.Config{Dir: filepath.Join(t.TempDir(), "db"), NodeID: "ipam",
		Listener: memnet.Listen("threes-ipam-test:4002")})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { db.Close() })
	now := time.Now()
	if err := db.CreateNetwork(ctx, embeddb.Network{Name: "lab", CreatedAt: now}); err != nil {
		t.Fatal(err)
	}
	for i, v := range []struct{ id, host, ip, mac string }{
		{"vm-a", "a", "10.10.0.2", "52:54:00:00:0a:02"},
		{"vm-b", "b", "10.10.0.2", "52:54:00:00:0b:02"},
		{"vm-old", "", "10.10.0.3", "52:54:00:00:00:03"},
	} {
		vm := embeddb.VM{ID: v.id, Name: v.id, Network: "lab", Host: v.host, CreatedAt: now.Add(time.Duration(i))}
		if err := db.CreateVM(ctx, vm, embeddb.VMConfig{Hostname: v.id},
			embeddb.Address{IP: netip.MustParseAddr(v.ip), MAC: v.mac, Hostname: v.id}); err != nil {
			t.Fatal(err)
		}
	}
	pool, err := loadIPAM(ctx, db, "a", netip.MustParsePrefix("10.10.0.0/24"))
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]string{}
	for _, a := range pool.All() {
		got[a.MAC.String()] = a.IP.String()
	}
	want := map[string]string{"52:54:00:00:0a:02": "10.10.0.2", "52:54:00:00:00:03": "10.10.0.3"}
	if !maps.Equal(got, want) {
		t.Fatalf("host a's IPAM = %v; want %v (its own and the unhosted, not b's)", got, want)
	}
}
