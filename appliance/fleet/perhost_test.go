package fleet_test

import (
	"context"
	"errors"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/threes-dev/threes/appliance/fleet"
	"github.com/threes-dev/threes/embeddb"
	"github.com/threes-dev/threes/hv/hvtest"
	"github.com/threes-dev/threes/hv/images"
	"github.com/threes-dev/threes/netboot/ipam"
)

// secondHost is another host's fleet on r's database, with a hypervisor, image
// store ("base", as newRig's) and IPAM of its own; the IPAM is loaded from the
// addresses the database holds for host, as the appliance loads it at start.
func secondHost(t *testing.T, r *rig, host string, hooks fleet.Hooks) (*fleet.Fleet, *ipam.IPAM) {
	t.Helper()
	ctx := context.Background()
	dir := t.TempDir()
	store, err := images.Open(filepath.Join(dir, "images"))
	if err != nil {
		t.Fatal(err)
	}
	kernel := make([]byte, 4096)
	copy(kernel[0x202:], "HdrS")
	kf := filepath.Join(dir, "vmlinuz")
	if err := os.WriteFile(kf, kernel, 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := store.Import(ctx, "base", images.Source{Kernel: kf}); err != nil {
		t.Fatal(err)
	}
	pool := loadPool(t, r.db, host)
	f := fleet.New(fleet.Config{DB: r.db, HV: hvtest.NewMemory(), IPAM: pool, Images: store, Bridge: "br-" + host, Host: host,
		Log: slog.New(slog.NewTextHandler(r.logs, nil)).With("host", host)}, hooks)
	return f, pool
}

// loadPool is host's IPAM over the rig's range, from the database.
func loadPool(t *testing.T, db *embeddb.DB, host string) *ipam.IPAM {
	t.Helper()
	addrs, err := db.HostAddresses(context.Background(), host)
	if err != nil {
		t.Fatal(err)
	}
	var existing []ipam.Allocation
	for _, a := range addrs {
		hw, err := net.ParseMAC(a.MAC)
		if err != nil {
			t.Fatal(err)
		}
		existing = append(existing, ipam.Allocation{MAC: hw, Hostname: a.Hostname, IP: a.IP})
	}
	pool, err := ipam.New(ipam.Config{Prefix: netip.MustParsePrefix("10.10.0.0/24")}, existing)
	if err != nil {
		t.Fatal(err)
	}
	return pool
}

// TestHostsShareAnAddressRange: two hosts on one database each have a bridge of
// their own, so each gives its first VM the range's first address, and each
// host's metadata view finds its own VM at that address, never the other's. A
// MAC is the cluster's: a generated MAC that another host's VM holds is refused
// (the create tries a new one), and a create that never gets a free one leaves
// no address behind. A host's IPAM, loaded again, holds only its own addresses.
func TestHostsShareAnAddressRange(t *testing.T) {
	ctx := context.Background()
	a := newRig(t, false, fleet.Hooks{})
	var mu sync.Mutex
	var forced []net.HardwareAddr // what b's MAC generator hands out next
	always := net.HardwareAddr(nil)
	b, poolB := secondHost(t, a, "b", fleet.Hooks{NewMAC: func() net.HardwareAddr {
		mu.Lock()
		defer mu.Unlock()
		if always != nil {
			return always
		}
		if len(forced) > 0 {
			m := forced[0]
			forced = forced[1:]
			return m
		}
		return fleet.NewMAC()
	}})
	spec := func(name string) fleet.CreateSpec {
		return fleet.CreateSpec{Name: name, Network: "lab", Image: "base", Type: "teeny"}
	}

	onA := a.create(t, "on-a")
	onB, err := b.Create(ctx, spec("on-b"))
	if err != nil {
		t.Fatalf("create on host b: %v", err)
	}
	if onA.IP != onB.IP || onA.Host != "a" || onB.Host != "b" {
		t.Fatalf("first vms: a's %s on %q, b's %s on %q; want the same first address on each host", onA.IP, onA.Host, onB.IP, onB.Host)
	}
	ip := netip.MustParseAddr(onA.IP)
	for _, c := range []struct {
		host string
		f    *fleet.Fleet
		want embeddb.VM
	}{{"a", a.f, onA}, {"b", b, onB}} {
		in, err := c.f.MetadataSource().Lookup(ctx, ip)
		if err != nil || in.ID != c.want.ID {
			t.Errorf("host %s's metadata view at %s = %+v, %v; want its own vm %s", c.host, ip, in, err, c.want.ID)
		}
	}

	// b's next draw is a's MAC: refused, and drawn again.
	macA, _ := net.ParseMAC(onA.MAC)
	mu.Lock()
	forced = append(forced, macA)
	mu.Unlock()
	second, err := b.Create(ctx, spec("second-on-b"))
	if err != nil {
		t.Fatalf("create on host b after drawing a's mac: %v", err)
	}
	if second.MAC == onA.MAC {
		t.Fatalf("host b's vm got host a's mac %s", onA.MAC)
	}
	if !strings.Contains(a.logs.String(), "generated mac already taken") {
		t.Errorf("no log of b's retry after drawing a's mac")
	}

	// A create whose every MAC is a's fails, and leaves nothing on b or in the database.
	mu.Lock()
	always = macA
	mu.Unlock()
	if _, err := b.Create(ctx, spec("doomed")); !errors.Is(err, embeddb.ErrExists) {
		t.Fatalf("create with only a taken mac = %v, want ErrExists", err)
	}
	if _, err := a.db.VMByName(ctx, "doomed"); !errors.Is(err, embeddb.ErrNotFound) {
		t.Errorf("the failed create left its record: %v", err)
	}
	if all, err := a.db.ListAddresses(ctx); err != nil || len(all) != 3 {
		t.Errorf("addresses after the failed create: %+v, %v; want a's one and b's two", all, err)
	}
	if poolB.Len() != 2 {
		t.Errorf("host b's IPAM holds %d addresses after the failed create, want 2", poolB.Len())
	}

	// Loaded again (a restart), each host's IPAM holds its own addresses only.
	for host, want := range map[string][]embeddb.VM{"a": {onA}, "b": {onB, second}} {
		all := loadPool(t, a.db, host).All()
		got := map[string]string{}
		for _, al := range all {
			got[al.MAC.String()] = al.IP.String()
		}
		ok := len(got) == len(want)
		for _, vm := range want {
			ok = ok && got[vm.MAC] == vm.IP
		}
		if !ok {
			t.Errorf("host %s's IPAM loaded again: %v; want only its vms' %+v", host, got, want)
		}
	}

	// Purging a's VM leaves b's address and metadata alone.
	if _, err := a.f.Delete(ctx, onA.ID); err != nil {
		t.Fatal(err)
	}
	if _, err := a.f.Purge(ctx, []string{onA.ID}); err != nil {
		t.Fatal(err)
	}
	if in, err := b.MetadataSource().Lookup(ctx, ip); err != nil || in.ID != onB.ID {
		t.Errorf("host b's metadata view after a's vm was purged = %+v, %v", in, err)
	}
	if _, err := a.f.MetadataSource().Lookup(ctx, ip); err == nil {
		t.Errorf("host a's metadata view still answers at %s after its vm was purged", ip)
	}
}
