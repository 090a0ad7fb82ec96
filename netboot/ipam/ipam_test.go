package ipam

import (
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"net/netip"
	"testing"
)

func testMAC(n uint32) net.HardwareAddr {
	// 52:54:00 is QEMU's locally administered unicast prefix.
	return net.HardwareAddr{0x52, 0x54, byte(n >> 24), byte(n >> 16), byte(n >> 8), byte(n)}
}

func TestValidateMAC(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want bool
	}{
		{"52:54:00:12:34:56", true},
		{"02:00:00:00:00:01", true},
		{"01:00:5e:00:00:01", false}, // multicast
		{"ff:ff:ff:ff:ff:ff", false}, // broadcast
		{"00:00:00:00:00:00", false},
		{"00:00:00:00:fe:80:00:00:00:00:00:00:02:00:5e:10:00:00:00:01", false}, // infiniband, 20 bytes
		{"52:54:00:12:34", false},
		{"not a mac", false},
	} {
		_, err := ParseMAC(tc.in)
		if (err == nil) != tc.want {
			t.Errorf("ParseMAC(%q) = %v, want ok=%v", tc.in, err, tc.want)
		}
		if err != nil && !errors.Is(err, ErrInvalidMAC) {
			t.Errorf("ParseMAC(%q) error %v is not ErrInvalidMAC", tc.in, err)
		}
	}
}

func TestNeverNetworkGatewayBroadcast(t *testing.T) {
	i, err := New(Config{Prefix: netip.MustParsePrefix("192.168.7.0/29")}, nil)
	if err != nil {
		t.Fatal(err)
	}
	if got, want := i.Capacity(), 5; got != want {
		t.Fatalf("Capacity = %d, want %d", got, want)
	}
	if got := i.Gateway(); got != netip.MustParseAddr("192.168.7.1") {
		t.Fatalf("Gateway = %s", got)
	}
	seen := map[netip.Addr]bool{}
	for n := range uint32(5) {
		a, err := i.Reserve(testMAC(n), fmt.Sprintf("vm%d", n))
		if err != nil {
			t.Fatalf("reserve %d: %v", n, err)
		}
		if !a.Pending {
			t.Errorf("reserved allocation not pending")
		}
		switch a.IP.String() {
		case "192.168.7.0", "192.168.7.1", "192.168.7.7":
			t.Fatalf("handed out reserved address %s", a.IP)
		}
		if seen[a.IP] {
			t.Fatalf("handed out %s twice", a.IP)
		}
		seen[a.IP] = true
	}
	if _, err := i.Reserve(testMAC(99), "full"); !errors.Is(err, ErrFull) {
		t.Fatalf("reserve in a full range: %v, want ErrFull", err)
	}
}

func TestReserveCommitRelease(t *testing.T) {
	i, err := New(Config{}, nil)
	if err != nil {
		t.Fatal(err)
	}
	mac := testMAC(1)
	a, err := i.Reserve(mac, "toy0")
	if err != nil {
		t.Fatal(err)
	}
	if !DefaultPrefix.Contains(a.IP) {
		t.Fatalf("%s outside %s", a.IP, DefaultPrefix)
	}
	if _, err := i.Reserve(mac, "again"); !errors.Is(err, ErrExists) {
		t.Fatalf("second reserve for one mac: %v, want ErrExists", err)
	}
	if err := i.Commit(mac); err != nil {
		t.Fatal(err)
	}
	got, ok := i.ByIP(a.IP)
	if !ok || got.Pending || got.Hostname != "toy0" || got.MAC.String() != mac.String() {
		t.Fatalf("ByIP(%s) = %+v, %v", a.IP, got, ok)
	}
	got, ok = i.ByMAC(mac)
	if !ok || got.IP != a.IP {
		t.Fatalf("ByMAC = %+v, %v", got, ok)
	}
	if err := i.Release(mac); err != nil {
		t.Fatal(err)
	}
	if _, ok := i.ByIP(a.IP); ok {
		t.Fatalf("released address still found by ip")
	}
	if _, ok := i.ByMAC(mac); ok {
		t.Fatalf("released address still found by mac")
	}
	if err := i.Release(mac); !errors.Is(err, ErrNotFound) {
		t.Fatalf("second release: %v, want ErrNotFound", err)
	}
	if i.Len() != 0 {
		t.Fatalf("Len = %d after release", i.Len())
	}
}

func TestLoadExisting(t *testing.T) {
	ex := []Allocation{
		{MAC: testMAC(1), Hostname: "a", IP: netip.MustParseAddr("10.10.0.2")},
		{MAC: testMAC(2), Hostname: "b", IP: netip.MustParseAddr("10.10.0.3")},
	}
	i, err := New(Config{}, ex)
	if err != nil {
		t.Fatal(err)
	}
	a, err := i.Reserve(testMAC(3), "c")
	if err != nil {
		t.Fatal(err)
	}
	if a.IP == ex[0].IP || a.IP == ex[1].IP {
		t.Fatalf("reserved %s, already loaded", a.IP)
	}
	for _, bad := range [][]Allocation{
		{{MAC: testMAC(1), IP: netip.MustParseAddr("10.10.0.1")}},     // gateway
		{{MAC: testMAC(1), IP: netip.MustParseAddr("10.10.0.0")}},     // network
		{{MAC: testMAC(1), IP: netip.MustParseAddr("10.10.255.255")}}, // broadcast
		{{MAC: testMAC(1), IP: netip.MustParseAddr("10.11.0.5")}},     // outside
		{ex[0], {MAC: testMAC(9), IP: ex[0].IP}},                      // same ip
		{ex[0], {MAC: ex[0].MAC, IP: ex[1].IP}},                       // same mac
		{{MAC: net.HardwareAddr{1, 2, 3, 4, 5, 6}, IP: ex[0].IP}},     // multicast mac
	} {
		if _, err := New(Config{}, bad); err == nil {
			t.Errorf("New(%v) accepted a bad allocation", bad)
		}
	}
}

// TestFillWrapAndReuse fills a /20 completely, frees random addresses and
// checks each is found again, exercising the summary words and the wrap.
func TestFillWrapAndReuse(t *testing.T) {
	i, err := New(Config{Prefix: netip.MustParsePrefix("10.20.0.0/20")}, nil)
	if err != nil {
		t.Fatal(err)
	}
	n := uint32(i.Capacity())
	for k := range n {
		if _, err := i.Reserve(testMAC(k), ""); err != nil {
			t.Fatalf("reserve %d of %d: %v", k, n, err)
		}
	}
	if _, err := i.Reserve(testMAC(n), ""); !errors.Is(err, ErrFull) {
		t.Fatalf("reserve past capacity: %v", err)
	}
	r := rand.New(rand.NewPCG(1, 2))
	for range 500 {
		k := r.Uint32N(n)
		old, ok := i.ByMAC(testMAC(k))
		if !ok {
			t.Fatalf("mac %d lost", k)
		}
		if err := i.Release(testMAC(k)); err != nil {
			t.Fatal(err)
		}
		a, err := i.Reserve(testMAC(k), "")
		if err != nil {
			t.Fatalf("reserve after freeing %s: %v", old.IP, err)
		}
		if a.IP != old.IP {
			t.Fatalf("only %s was free, got %s", old.IP, a.IP)
		}
	}
}

// BenchmarkReserveNearlyFull measures one release and one reserve in a /16
// with a single free address, the worst case for the search.
func BenchmarkReserveNearlyFull(b *testing.B) {
	i, err := New(Config{}, nil)
	if err != nil {
		b.Fatal(err)
	}
	n := uint32(i.Capacity())
	for k := range n {
		if _, err := i.Reserve(testMAC(k), ""); err != nil {
			b.Fatal(err)
		}
	}
	r := rand.New(rand.NewPCG(3, 4))
	b.ResetTimer()
	for b.Loop() {
		k := r.Uint32N(n)
		if err := i.Release(testMAC(k)); err != nil {
			b.Fatal(err)
		}
		if _, err := i.Reserve(testMAC(k), ""); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkByIP measures the lookup the metadata server does per request.
func BenchmarkByIP(b *testing.B) {
	i, err := New(Config{}, nil)
	if err != nil {
		b.Fatal(err)
	}
	a, err := i.Reserve(testMAC(1), "x")
	if err != nil {
		b.Fatal(err)
	}
	for b.Loop() {
		if _, ok := i.ByIP(a.IP); !ok {
			b.Fatal("lost")
		}
	}
}
