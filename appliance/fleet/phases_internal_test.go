package fleet

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"github.com/insomniacslk/dhcp/dhcpv4"
	"tailscale.com/net/memnet"

	"github.com/threes-dev/threes/embeddb"
	"github.com/threes-dev/threes/netboot/dhcp"
	"github.com/threes-dev/threes/netboot/ipam"
	"github.com/threes-dev/threes/netboot/metadata"
	"github.com/threes-dev/threes/tsauth/control"
)

// waitPhases polls the VM's record until it holds want (phase names, with their
// errors after a "!"), or fails the test after a minute.
func waitPhases(t *testing.T, db *embeddb.DB, id string, want ...string) embeddb.VM {
	t.Helper()
	deadline := time.Now().Add(time.Minute)
	for {
		vm, err := db.GetVM(context.Background(), id)
		if err != nil {
			t.Fatal(err)
		}
		var got []string
		for _, p := range vm.Phases {
			got = append(got, p.Phase+map[bool]string{true: "!" + p.Error, false: ""}[p.Error != ""])
		}
		if slices.Equal(got, want) {
			return vm
		}
		if time.Now().After(deadline) {
			t.Fatalf("phases of %s = %q, want %q", id, got, want)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// TestPhaseMarks: DHCP's ACK hook and the metadata source mark the phases the
// VM reaches, once each, off their own path; the neighbour check's lookup marks
// nothing; a VM asking for a key that was taken before it asked gets the phase's
// error, and one asking again after taking it does not.
func TestPhaseMarks(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	db, vm := openDB(t)
	rec := newPhaseRecorder(db, slog.New(slog.NewTextHandler(tWriter{t}, nil)))
	go rec.run(ctx)
	src := newMDSource(db, "", nil, time.Now)
	src.phases = rec
	ip := netip.MustParseAddr("10.10.0.5")
	mac, _ := net.ParseMAC("52:54:00:00:00:05")

	// An ACK for an address with another MAC is no VM's lease; the VM's own is.
	rec.leased(net.HardwareAddr{0x52, 0x54, 0, 0, 0, 0x99}, ip, time.Now())
	rec.leased(mac, ip, time.Now())
	waitPhases(t, db, vm.ID, PhaseAddressLeased)
	first := waitPhases(t, db, vm.ID, PhaseAddressLeased).Phases[0].At
	rec.leased(mac, ip, time.Now().Add(time.Hour)) // a renewal
	if _, err := src.Lookup(ctx, ip); err != nil {
		t.Fatal(err)
	}
	if _, err := src.ByIP(ctx, ip); err != nil {
		t.Fatal(err)
	}
	got := waitPhases(t, db, vm.ID, PhaseAddressLeased, PhaseConfigFetched)
	if !got.Phases[0].At.Equal(first) {
		t.Errorf("a renewal moved address_leased from %v to %v", first, got.Phases[0].At)
	}
	if _, err := src.TakeAuthKey(ctx, vm.ID); err != nil {
		t.Fatal(err)
	}
	if _, err := src.TakeAuthKey(ctx, vm.ID); !errors.Is(err, metadata.ErrAuthKeyTaken) {
		t.Fatalf("second TakeAuthKey = %v", err)
	}
	waitPhases(t, db, vm.ID, PhaseAddressLeased, PhaseConfigFetched, PhaseKeyTaken)

	// A second VM whose key someone else took before it asked.
	now := time.Now()
	other := embeddb.VM{ID: NewID(now), Name: "robbed", Network: "lab", State: StateRunning, Desired: StateRunning, CreatedAt: now}
	if err := db.CreateVM(ctx, other, embeddb.VMConfig{Hostname: "robbed", AuthKey: "tskey-other"},
		embeddb.Address{IP: netip.MustParseAddr("10.10.0.6"), MAC: "52:54:00:00:00:06"}); err != nil {
		t.Fatal(err)
	}
	if _, err := db.TakeAuthKey(ctx, other.ID, now); err != nil {
		t.Fatal(err)
	}
	if _, err := src.TakeAuthKey(ctx, other.ID); !errors.Is(err, metadata.ErrAuthKeyTaken) {
		t.Fatalf("TakeAuthKey of a taken key = %v", err)
	}
	waitPhases(t, db, other.ID, PhaseKeyTaken+"!"+keyTakenAlready)

	// Purge forgets: a VM later given the same MAC and address is marked again.
	rec.forget(vm.ID, mac.String())
	rec.mu.Lock()
	left := len(rec.done)
	rec.mu.Unlock()
	if left != 1 { // the robbed VM's failure
		t.Errorf("recorder remembers %d marks after forgetting the VM, want 1", left)
	}
}

type tWriter struct{ t *testing.T }

func (w tWriter) Write(p []byte) (int, error) {
	w.t.Log(string(p))
	return len(p), nil
}

// BenchmarkPhaseMarks measures what the phase marks add to the hot paths they sit
// on, each beside the same path without them in the same run: a DHCP exchange
// (DISCOVER and REQUEST through dhcp.Server.Handle) with and without the ACK hook,
// and the metadata source's ByIP with and without the config_fetched mark. The VMs
// are in the database, so after the first round every mark is one already made.
func BenchmarkPhaseMarks(b *testing.B) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	db, err := embeddb.Open(ctx, embeddb.Config{Dir: filepath.Join(b.TempDir(), "db"), NodeID: "bench",
		Listener: memnet.Listen("threes-raft:4002")})
	if err != nil {
		b.Fatal(err)
	}
	defer db.Close()
	now := time.Now()
	if err := db.CreateNetwork(ctx, embeddb.Network{Name: "lab", CreatedAt: now}); err != nil {
		b.Fatal(err)
	}
	const n = 64
	var allocs []ipam.Allocation
	for i := range n {
		mac := net.HardwareAddr{0x52, 0x54, 0, 0, 1, byte(i)}
		ip := netip.AddrFrom4([4]byte{10, 10, 1, byte(i + 2)})
		id := fmt.Sprintf("vm%018d", i)
		if err := db.CreateVM(ctx, embeddb.VM{ID: id, Name: fmt.Sprintf("b%d", i), Network: "lab", State: StateRunning, Desired: StateRunning, CreatedAt: now},
			embeddb.VMConfig{}, embeddb.Address{IP: ip, MAC: mac.String()}); err != nil {
			b.Fatal(err)
		}
		allocs = append(allocs, ipam.Allocation{MAC: mac, IP: ip, Hostname: fmt.Sprintf("b%d", i)})
	}
	pool, err := ipam.New(ipam.Config{Prefix: netip.MustParsePrefix("10.10.0.0/16")}, allocs)
	if err != nil {
		b.Fatal(err)
	}
	rec := newPhaseRecorder(db, slog.New(slog.DiscardHandler))
	go rec.run(ctx)
	gw := netip.MustParseAddr("10.10.0.1")
	exchange := make([][2][]byte, n)
	for i, a := range allocs {
		d, _ := dhcpv4.NewDiscovery(a.MAC)
		r, _ := dhcpv4.New(dhcpv4.WithHwAddr(a.MAC), dhcpv4.WithMessageType(dhcpv4.MessageTypeRequest),
			dhcpv4.WithOption(dhcpv4.OptServerIdentifier(gw.AsSlice())),
			dhcpv4.WithOption(dhcpv4.OptRequestedIPAddress(a.IP.AsSlice())))
		exchange[i] = [2][]byte{d.ToBytes(), r.ToBytes()}
	}
	for _, hook := range []struct {
		name  string
		onAck func(net.HardwareAddr, netip.Addr, time.Time)
	}{{"dhcp-without", nil}, {"dhcp-with", rec.leased}} {
		b.Run(hook.name, func(b *testing.B) {
			conn, err := net.ListenPacket("udp4", "127.0.0.1:0")
			if err != nil {
				b.Fatal(err)
			}
			defer conn.Close()
			s, err := dhcp.NewServer(dhcp.ServerConfig{Conn: conn, Reply: dhcp.Config{ServerIP: gw, Prefix: pool.Prefix()},
				IPAM: pool, RateLimit: dhcp.RateLimit{Burst: -1}, OnAck: hook.onAck, Log: slog.New(slog.DiscardHandler)})
			if err != nil {
				b.Fatal(err)
			}
			i := 0
			for b.Loop() {
				p := exchange[i%n]
				i++
				if _, _, r := s.Handle(p[0]); r != dhcp.ReasonOffer {
					b.Fatal(r)
				}
				if _, _, r := s.Handle(p[1]); r != dhcp.ReasonAckSelecting {
					b.Fatal(r)
				}
			}
		})
	}
	for _, with := range []bool{false, true} {
		name := map[bool]string{false: "metadata-without", true: "metadata-with"}[with]
		b.Run(name, func(b *testing.B) {
			src := newMDSource(db, "", nil, time.Now)
			if with {
				src.phases = rec
			}
			i := 0
			for b.Loop() {
				if _, err := src.ByIP(ctx, allocs[i%n].IP); err != nil {
					b.Fatal(err)
				}
				i++
			}
		})
	}
}

// TestDeviceVMWithoutKey: where the control plane does not say which key a device
// joined with (Tailscale), a device is a VM's only when it is the one VM of the
// device's network that took its key and is not on the tailnet yet, or, with
// several, the one whose name the device reports.
func TestDeviceVMWithoutKey(t *testing.T) {
	ctx := context.Background()
	db, first := openDB(t) // "cached", network lab, tag tag:threes-lab
	f := &Fleet{db: db, ownerTag: "tag:threes"}
	dev := control.Device{ID: "n1CNTRL", Hostname: "whatever", Tags: []string{"tag:threes-lab"}}
	if _, err := f.deviceVM(ctx, dev); !errors.Is(err, embeddb.ErrNotFound) {
		t.Fatalf("no VM took its key: deviceVM = %v, want not found", err)
	}
	if _, err := db.RecordVMPhase(ctx, first.ID, PhaseKeyTaken, time.Now(), ""); err != nil {
		t.Fatal(err)
	}
	if vm, err := f.deviceVM(ctx, dev); err != nil || vm.ID != first.ID {
		t.Fatalf("one VM waiting: deviceVM = %s, %v; want %s", vm.ID, err, first.ID)
	}
	other := control.Device{ID: "n2CNTRL", Hostname: "cached", Tags: []string{"tag:threes-elsewhere"}}
	if _, err := f.deviceVM(ctx, other); !errors.Is(err, embeddb.ErrNotFound) {
		t.Fatalf("a device of another network: deviceVM = %v, want not found", err)
	}
	now := time.Now()
	second := embeddb.VM{ID: NewID(now), Name: "second", Network: "lab", State: StateRunning, Desired: StateRunning, CreatedAt: now}
	if err := db.CreateVM(ctx, second, embeddb.VMConfig{}, embeddb.Address{IP: netip.MustParseAddr("10.10.0.7"), MAC: "52:54:00:00:00:07"}); err != nil {
		t.Fatal(err)
	}
	if _, err := db.RecordVMPhase(ctx, second.ID, PhaseKeyTaken, now, ""); err != nil {
		t.Fatal(err)
	}
	if _, err := f.deviceVM(ctx, dev); !errors.Is(err, embeddb.ErrNotFound) {
		t.Fatalf("two waiting, neither named so: deviceVM = %v, want not found", err)
	}
	dev.Hostname = "second"
	if vm, err := f.deviceVM(ctx, dev); err != nil || vm.ID != second.ID {
		t.Fatalf("two waiting: deviceVM = %s, %v; want the one named second", vm.ID, err)
	}
	// Once a VM's node is recorded, it is not waiting any more.
	if err := db.SetVMNodeID(ctx, second.ID, "n9CNTRL"); err != nil {
		t.Fatal(err)
	}
	if vm, err := f.deviceVM(ctx, dev); err != nil || vm.ID != first.ID {
		t.Fatalf("one left waiting: deviceVM = %s, %v; want %s", vm.ID, err, first.ID)
	}
}
