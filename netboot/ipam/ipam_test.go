package ipam

import (
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"net/netip"
	"slices"
	"strings"
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

func TestNewPrefix(t *testing.T) {
	for _, tc := range []struct {
		prefix    string // "" for the zero Prefix
		want      string // the prefix used, "" when New must refuse
		gateway   string
		broadcast string
		capacity  int
	}{
		{"", "10.10.0.0/16", "10.10.0.1", "10.10.255.255", 65533},
		{"10.10.5.9/16", "10.10.0.0/16", "10.10.0.1", "10.10.255.255", 65533}, // host bits dropped
		{"10.0.0.0/8", "10.0.0.0/8", "10.0.0.1", "10.255.255.255", 1<<24 - 3},
		{"192.168.7.8/29", "192.168.7.8/29", "192.168.7.9", "192.168.7.15", 5},
		{"10.0.0.0/7", "", "", "", 0},
		{"192.168.7.8/30", "", "", "", 0},
		{"192.168.7.8/32", "", "", "", 0},
		{"fd00::/64", "", "", "", 0},
		{"::ffff:10.0.0.0/112", "", "", "", 0},
	} {
		var p netip.Prefix
		if tc.prefix != "" {
			p = netip.MustParsePrefix(tc.prefix)
		}
		i, err := New(Config{Prefix: p}, nil)
		if tc.want == "" {
			if err == nil || !strings.Contains(err.Error(), "prefix") {
				t.Errorf("New(%s) = %v, want an error naming the prefix", tc.prefix, err)
			}
			continue
		}
		if err != nil {
			t.Errorf("New(%s): %v", tc.prefix, err)
			continue
		}
		if got := i.Prefix().String(); got != tc.want {
			t.Errorf("New(%s).Prefix() = %s, want %s", tc.prefix, got, tc.want)
		}
		if got := i.Gateway().String(); got != tc.gateway {
			t.Errorf("New(%s).Gateway() = %s, want %s", tc.prefix, got, tc.gateway)
		}
		if got := i.Broadcast().String(); got != tc.broadcast {
			t.Errorf("New(%s).Broadcast() = %s, want %s", tc.prefix, got, tc.broadcast)
		}
		if got := i.Capacity(); got != tc.capacity {
			t.Errorf("New(%s).Capacity() = %d, want %d", tc.prefix, got, tc.capacity)
		}
	}
}

// TestBadMAC checks that no call takes a MAC that cannot be a VM's interface:
// Reserve refuses it (a multicast or zero MAC would get an address DHCP can
// never serve), and the lookups report it as not found rather than panic.
func TestBadMAC(t *testing.T) {
	i, err := New(Config{}, nil)
	if err != nil {
		t.Fatal(err)
	}
	for _, mac := range []net.HardwareAddr{
		{0x01, 0x00, 0x5e, 0x00, 0x00, 0x01},             // multicast
		{0x53, 0x54, 0x00, 0x00, 0x00, 0x01},             // multicast bit in a QEMU-like MAC
		{0xff, 0xff, 0xff, 0xff, 0xff, 0xff},             // broadcast
		{0, 0, 0, 0, 0, 0},                               // zero
		{0x52, 0x54, 0x00, 0x00, 0x01},                   // 5 bytes
		{0x52, 0x54, 0x00, 0xff, 0xfe, 0x00, 0x00, 0x01}, // EUI-64
		nil,
	} {
		if a, err := i.Reserve(mac, "bad"); !errors.Is(err, ErrInvalidMAC) {
			t.Errorf("Reserve(%s) = %+v, %v, want ErrInvalidMAC", mac, a, err)
		}
		if err := ValidateMAC(mac); !errors.Is(err, ErrInvalidMAC) {
			t.Errorf("ValidateMAC(%s) = %v, want ErrInvalidMAC", mac, err)
		}
		if err := i.Commit(mac); !errors.Is(err, ErrNotFound) {
			t.Errorf("Commit(%s) = %v, want ErrNotFound", mac, err)
		}
		if err := i.Release(mac); !errors.Is(err, ErrNotFound) {
			t.Errorf("Release(%s) = %v, want ErrNotFound", mac, err)
		}
		if a, ok := i.ByMAC(mac); ok {
			t.Errorf("ByMAC(%s) = %+v", mac, a)
		}
	}
	if n := i.Len(); n != 0 {
		t.Errorf("Len = %d after refusing every MAC", n)
	}
	// A good MAC whose first six bytes prefix a longer one is still not it.
	good := testMAC(7)
	if _, err := i.Reserve(good, "good"); err != nil {
		t.Fatal(err)
	}
	long := append(append(net.HardwareAddr{}, good...), 0, 1)
	if err := i.Commit(long); !errors.Is(err, ErrNotFound) {
		t.Errorf("Commit(%s) = %v, want ErrNotFound", long, err)
	}
	if a, ok := i.ByMAC(long); ok {
		t.Errorf("ByMAC(%s) = %+v", long, a)
	}
	if err := i.Commit(testMAC(8)); !errors.Is(err, ErrNotFound) {
		t.Errorf("Commit of a MAC never reserved = %v, want ErrNotFound", err)
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
	if n := i.Len(); n != 2 {
		t.Fatalf("Len = %d after loading 2", n)
	}
	for _, e := range ex {
		got, ok := i.ByIP(e.IP)
		if !ok || got.MAC.String() != e.MAC.String() || got.Hostname != e.Hostname || got.Pending {
			t.Fatalf("ByIP(%s) = %+v, %v, want %+v", e.IP, got, ok, e)
		}
	}
	a, err := i.Reserve(testMAC(3), "c")
	if err != nil {
		t.Fatal(err)
	}
	if a.IP == ex[0].IP || a.IP == ex[1].IP {
		t.Fatalf("reserved %s, already loaded", a.IP)
	}
	all := i.All()
	slices.SortFunc(all, func(x, y Allocation) int { return x.IP.Compare(y.IP) })
	if len(all) != 3 || all[0].IP != ex[0].IP || all[1].IP != ex[1].IP || all[2].IP != a.IP || !all[2].Pending {
		t.Fatalf("All = %+v", all)
	}
	// A pending allocation loaded from the database stays pending.
	p, err := New(Config{}, []Allocation{{MAC: testMAC(4), IP: netip.MustParseAddr("10.10.0.9"), Pending: true}})
	if err != nil {
		t.Fatal(err)
	}
	if got, ok := p.ByMAC(testMAC(4)); !ok || !got.Pending {
		t.Fatalf("loaded pending allocation = %+v, %v", got, ok)
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

// TestRotation checks the order Reserve promises: the first free address after
// the one it handed out last, wrapping past the end, so an address released a
// moment ago is the last to be handed out again. The reference is a plain scan.
// Random reserves and releases, from an empty range and from one loaded nearly
// full, in prefixes of one bitmap word up to a /16 (1024 words under 16
// summary words), reach every branch of the search.
func TestRotation(t *testing.T) {
	for _, prefix := range []string{"192.168.7.0/29", "10.0.0.0/26", "10.0.0.0/25", "10.0.0.0/22", "10.0.0.0/20", "10.0.0.0/16"} {
		for _, holes := range []int{-1, 40, 3} { // -1: start empty
			t.Run(fmt.Sprintf("%s/holes=%d", prefix, holes), func(t *testing.T) {
				rotation(t, netip.MustParsePrefix(prefix), holes)
			})
		}
	}
}

func rotation(t *testing.T, prefix netip.Prefix, holes int) {
	size := uint32(1) << (32 - prefix.Bits())
	r := rand.New(rand.NewPCG(uint64(size), uint64(holes+1)))
	// used[off] is the reference; held lists the allocated offsets and
	// macOf[off] the MAC number holding each.
	used := make([]bool, size)
	macOf := make([]uint32, size)
	var held []uint32
	used[0], used[1], used[size-1] = true, true, true
	var existing []Allocation
	var nextMAC uint32
	if holes >= 0 {
		free := map[uint32]bool{}
		for len(free) < holes && len(free) < int(size)-3 {
			free[2+r.Uint32N(size-3)] = true
		}
		for off := uint32(2); off < size-1; off++ {
			if free[off] {
				continue
			}
			used[off] = true
			macOf[off] = nextMAC
			held = append(held, off)
			existing = append(existing, Allocation{MAC: testMAC(nextMAC), IP: offAddr(prefix, off)})
			nextMAC++
		}
	}
	i, err := New(Config{Prefix: prefix}, existing)
	if err != nil {
		t.Fatal(err)
	}
	hint := uint32(2)
	want := func() (uint32, bool) {
		for k := range size {
			if off := (hint + k) % size; !used[off] {
				return off, true
			}
		}
		return 0, false
	}
	for op := range 3000 {
		if len(held) > 0 && r.IntN(5) < 2 {
			// Release a random allocated address.
			k := r.IntN(len(held))
			off := held[k]
			if err := i.Release(testMAC(macOf[off])); err != nil {
				t.Fatalf("op %d: release %s: %v", op, offAddr(prefix, off), err)
			}
			used[off] = false
			held[k] = held[len(held)-1]
			held = held[:len(held)-1]
			continue
		}
		a, err := i.Reserve(testMAC(nextMAC), "")
		off, ok := want()
		if !ok {
			if !errors.Is(err, ErrFull) {
				t.Fatalf("op %d: reserve in a full range = %+v, %v, want ErrFull", op, a, err)
			}
			continue
		}
		if err != nil || a.IP != offAddr(prefix, off) {
			t.Fatalf("op %d: reserve after %s handed out %s, %v; want %s", op, offAddr(prefix, hint-1), a.IP, err, offAddr(prefix, off))
		}
		used[off] = true
		macOf[off] = nextMAC
		held = append(held, off)
		nextMAC++
		hint = off + 1
	}
	if got := i.Len(); got != len(held) {
		t.Fatalf("Len = %d, want %d", got, len(held))
	}
}

func offAddr(p netip.Prefix, off uint32) netip.Addr {
	b := p.Addr().As4()
	v := uint32(b[0])<<24 | uint32(b[1])<<16 | uint32(b[2])<<8 | uint32(b[3]) + off
	return netip.AddrFrom4([4]byte{byte(v >> 24), byte(v >> 16), byte(v >> 8), byte(v)})
}
