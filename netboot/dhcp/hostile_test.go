package dhcp

import (
	"context"
	"encoding/binary"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/insomniacslk/dhcp/dhcpv4"

	"github.com/threes-dev/threes/hv/guard"
	"github.com/threes-dev/threes/internal/netnstest"
	"github.com/threes-dev/threes/netboot/ipam"
)

// guardBridge puts the anti-spoofing table hv writes on b's bridge and
// plugs a guarded port for each allocation, as libvirt plugs VMs' taps.
func guardBridge(t testing.TB, b *bridgeServer, allocs ...ipam.Allocation) (*guard.Table, []*netnstest.NS) {
	t.Helper()
	netnstest.Require(t, "nft")
	tbl, err := guard.New(guard.Config{Name: "threes_dhcp", Prefix: "t3dh",
		Run: func(ctx context.Context, script string) (out string, err error) {
			err = b.ns.Do(func() (err error) {
				out, err = guard.RunNFT(ctx, script)
				return err
			})
			return out, err
		}})
	if err != nil {
		t.Fatal(err)
	}
	var ports []guard.Port
	var nss []*netnstest.NS
	for _, a := range allocs {
		p := guard.Port{Dev: guard.DevName("t3dh", a.Hostname), MAC: a.MAC, IP: a.IP, Bridge: bridgeName}
		ports = append(ports, p)
		nss = append(nss, b.ns.PlugPort(t, bridgeName, p.Dev, a.Hostname, a.MAC, ""))
	}
	if err := tbl.Sync(context.Background(), ports); err != nil {
		t.Fatal(err)
	}
	return tbl, nss
}

// hostileXID marks the hostile VM's packets among what the server read.
const hostileXID = 0xbad00000

// sendDHCP sends pkt from ns's address src, port 68, to dst port 67.
func sendDHCP(ns *netnstest.NS, src, dst netip.Addr, pkt []byte) error {
	return ns.Do(func() error {
		fd, err := syscall.Socket(syscall.AF_INET, syscall.SOCK_DGRAM, 0)
		if err != nil {
			return err
		}
		defer syscall.Close(fd)
		syscall.SetsockoptInt(fd, syscall.SOL_SOCKET, syscall.SO_REUSEADDR, 1)
		syscall.SetsockoptInt(fd, syscall.SOL_SOCKET, syscall.SO_BROADCAST, 1)
		if err := syscall.Bind(fd, &syscall.SockaddrInet4{Port: 68, Addr: src.As4()}); err != nil {
			return err
		}
		return syscall.Sendto(fd, pkt, 0, &syscall.SockaddrInet4{Port: 67, Addr: dst.As4()})
	})
}

// TestHostileNeighbour has a VM flood the bridge with DHCP that speaks for
// its neighbour (DECLINE, DISCOVER, REQUEST carrying the neighbour's MAC),
// that claims to be relayed (replies to another VM, to broadcast, to a
// multicast group) and with its own requests, while the neighbour, a real
// udhcpc, gets its lease: the guard holds each port's DHCP to its own MAC
// and rate, and the server ignores relayed packets on the bridge.
func TestHostileNeighbour(t *testing.T) {
	netnstest.Require(t, "busybox")
	victim, hostile := allocFor(1, "victim"), allocFor(4, "hostile")
	b := startBridgeServer(t, []ipam.Allocation{victim, hostile})
	_, nss := guardBridge(t, b, victim, hostile)
	vns, hns := nss[0], nss[1]
	hns.Run(t, "ip", "addr", "add", hostile.IP.String()+"/16", "dev", "eth0")
	server, bcast := netip.MustParseAddr("10.10.0.1"), netip.MustParseAddr("255.255.255.255")

	xid := uint32(hostileXID)
	mk := func(mt dhcpv4.MessageType, mac net.HardwareAddr, mods ...dhcpv4.Modifier) []byte {
		xid++
		var id dhcpv4.TransactionID
		binary.BigEndian.PutUint32(id[:], xid)
		mods = append([]dhcpv4.Modifier{dhcpv4.WithHwAddr(mac), dhcpv4.WithMessageType(mt), dhcpv4.WithTransactionID(id)}, mods...)
		p, err := dhcpv4.New(mods...)
		if err != nil {
			t.Fatal(err)
		}
		return p.ToBytes()
	}
	sid := dhcpv4.WithOption(dhcpv4.OptServerIdentifier(server.AsSlice()))
	spoofs := [][]byte{
		mk(dhcpv4.MessageTypeDecline, victim.MAC, sid, dhcpv4.WithOption(dhcpv4.OptRequestedIPAddress(victim.IP.AsSlice()))),
		mk(dhcpv4.MessageTypeDiscover, victim.MAC),
		mk(dhcpv4.MessageTypeRequest, victim.MAC, sid, dhcpv4.WithOption(dhcpv4.OptRequestedIPAddress(hostile.IP.AsSlice()))),
		mk(dhcpv4.MessageTypeDiscover, hostile.MAC, dhcpv4.WithRelay(victim.IP.AsSlice())),
		mk(dhcpv4.MessageTypeDiscover, hostile.MAC, dhcpv4.WithRelay(net.IPv4(224, 0, 0, 1))),
		mk(dhcpv4.MessageTypeDiscover, hostile.MAC, dhcpv4.WithRelay(net.IPv4bcast)),
		mk(dhcpv4.MessageTypeDiscover, hostile.MAC),
	}
	flood := func() {
		for _, p := range spoofs {
			for _, dst := range []netip.Addr{server, bcast} {
				if err := sendDHCP(hns, hostile.IP, dst, p); err != nil {
					t.Errorf("hostile send: %v", err)
				}
			}
		}
	}
	// One round before the victim asks: on an unguarded bridge the
	// DECLINE alone keeps it off the network for a minute.
	start := time.Now()
	flood()

	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	// Before the namespaces go, should the test end early.
	t.Cleanup(func() { cancel(); wg.Wait() })
	wg.Add(1)
	go func() {
		defer wg.Done()
		for ctx.Err() == nil {
			flood()
			time.Sleep(5 * time.Millisecond)
		}
	}()
	dir := t.TempDir()
	script := writeScript(t, dir, "script", `env > "`+dir+`/.tmp" && mv "`+dir+`/.tmp" "`+dir+`/$1"`)
	// Ten DISCOVERs a second apart: within the ten the DECLINE's
	// minute-long hold would have cut the victim off.
	cmd := vns.Command("busybox", "udhcpc", "-i", "eth0", "-f", "-t", "10", "-T", "1", "-s", script)
	stop := startCmd(t, cmd)
	env := waitFile(t, filepath.Join(dir, "bound"), 30*time.Second)
	cancel()
	wg.Wait()
	elapsed := time.Since(start)
	stop()
	if env["ip"] != victim.IP.String() {
		t.Errorf("victim bound %s, want %s", env["ip"], victim.IP)
	}
	if n := b.srv.Count(ReasonDecline); n != 0 {
		t.Errorf("the server acted on %d DECLINEs", n)
	}
	if n := b.srv.Count(ReasonRelayed); n != 0 {
		t.Errorf("%d relayed packets reached the server through the guard", n)
	}
	// What reached the server from the hostile VM spoke for itself only.
	b.mu.Lock()
	defer b.mu.Unlock()
	for mac, pkts := range b.seen {
		for _, p := range pkts {
			if len(p) >= 28 && binary.BigEndian.Uint32(p[4:]) > hostileXID && binary.BigEndian.Uint32(p[4:]) <= xid &&
				(mac != hostile.MAC.String() || binary.BigEndian.Uint32(p[24:]) != 0) {
				t.Errorf("the server read a hostile packet with chaddr %s, giaddr %v", mac, net.IP(p[24:28]))
			}
		}
	}
	// The port's rate, not the flood's, reached the server.
	if n, limit := len(b.seen[hostile.MAC.String()]), guard.DHCPBurst+int(elapsed.Seconds()*guard.DHCPRate)+1; n > limit {
		t.Errorf("the server read %d packets from the flooding VM in %v, want at most %d", n, elapsed, limit)
	}
}

// TestNotAVM has a bridge port that is not a VM's tap (a veth an admin
// attached, which has no rules of its own) speak for a VM: REQUEST,
// RELEASE and DECLINE carrying the VM's chaddr, first from its own MAC,
// then from the VM's. None reaches the server: the VM's lease stays bound
// and a real udhcpc on the VM's guarded port gets it again at once (an
// honoured DECLINE would hold the address for a minute). The port cannot
// reach a TCP service on the gateway's address either, as the metadata
// server is, while the VM can.
func TestNotAVM(t *testing.T) {
	netnstest.Require(t, "busybox")
	vm := allocFor(1, "vm")
	b := startBridgeServer(t, []ipam.Allocation{vm})
	_, nss := guardBridge(t, b, vm)
	vns := nss[0]
	outMAC := net.HardwareAddr{0x52, 0x54, 0x00, 0xab, 0xee, 0x01}
	outsider := b.ns.Plug(t, bridgeName, "notvm", outMAC, "10.10.200.1/16")
	server, bcast := netip.MustParseAddr("10.10.0.1"), netip.MustParseAddr("255.255.255.255")
	// The host answers no ARP from the port: it is told the gateway's
	// MAC, so its unicast really reaches the host's side of the bridge.
	gw := strings.TrimSpace(b.ns.Run(t, "cat", "/sys/class/net/"+bridgeName+"/address"))
	outsider.Run(t, "ip", "neigh", "replace", server.String(), "lladdr", gw, "dev", "eth0")

	var ln net.Listener
	if err := b.ns.Do(func() (err error) {
		ln, err = net.Listen("tcp", netip.AddrPortFrom(server, 80).String())
		return err
	}); err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go http.Serve(ln, http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) { io.WriteString(w, "metadata") }))
	fetch := func(ns *netnstest.NS) string {
		var got []byte
		ns.Do(func() error {
			c, err := net.DialTimeout("tcp", netip.AddrPortFrom(server, 80).String(), 2*time.Second)
			if err != nil {
				return err
			}
			defer c.Close()
			c.SetDeadline(time.Now().Add(2 * time.Second))
			io.WriteString(c, "GET /v1/token HTTP/1.0\r\n\r\n")
			got, _ = io.ReadAll(c)
			return nil
		})
		return string(got)
	}

	dir := t.TempDir()
	script := writeScript(t, dir, "script", `env > "`+dir+`/.tmp" && mv "`+dir+`/.tmp" "`+dir+`/$1"`)
	lease := func() string {
		os.Remove(filepath.Join(dir, "bound"))
		cmd := vns.Command("busybox", "udhcpc", "-i", "eth0", "-n", "-q", "-t", "3", "-T", "1", "-s", script)
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Logf("udhcpc: %v\n%s", err, out)
			return ""
		}
		return readEnv(filepath.Join(dir, "bound"))["ip"]
	}
	if got := lease(); got != vm.IP.String() {
		t.Fatalf("the VM leased %q, want %s", got, vm.IP)
	}
	vns.Run(t, "ip", "addr", "add", vm.IP.String()+"/16", "dev", "eth0")
	waitLease(t, b.srv, vm.MAC, StateBound)
	if got := fetch(vns); !strings.HasSuffix(got, "metadata") {
		t.Fatalf("the VM's own request to the gateway got %q", got)
	}

	xid := uint32(hostileXID)
	mk := func(mt dhcpv4.MessageType, mods ...dhcpv4.Modifier) []byte {
		xid++
		var id dhcpv4.TransactionID
		binary.BigEndian.PutUint32(id[:], xid)
		mods = append([]dhcpv4.Modifier{dhcpv4.WithHwAddr(vm.MAC), dhcpv4.WithMessageType(mt), dhcpv4.WithTransactionID(id),
			dhcpv4.WithOption(dhcpv4.OptServerIdentifier(server.AsSlice()))}, mods...)
		p, err := dhcpv4.New(mods...)
		if err != nil {
			t.Fatal(err)
		}
		return p.ToBytes()
	}
	spoof := func() {
		for _, p := range [][]byte{
			mk(dhcpv4.MessageTypeRequest, dhcpv4.WithOption(dhcpv4.OptRequestedIPAddress(vm.IP.AsSlice()))),
			mk(dhcpv4.MessageTypeRelease, dhcpv4.WithClientIP(vm.IP.AsSlice())),
			mk(dhcpv4.MessageTypeDecline, dhcpv4.WithOption(dhcpv4.OptRequestedIPAddress(vm.IP.AsSlice()))),
		} {
			for _, dst := range []netip.Addr{server, bcast} {
				if err := sendDHCP(outsider, netip.MustParseAddr("10.10.200.1"), dst, p); err != nil {
					t.Fatalf("send from the port: %v", err)
				}
			}
		}
	}
	spoof()
	if got := fetch(outsider); got != "" {
		t.Errorf("the port that is not a VM's reached the service on the gateway: %q", got)
	}
	// Then as the VM itself, by its MAC.
	outsider.Run(t, "ip", "link", "set", "eth0", "address", vm.MAC.String())
	outsider.Run(t, "ip", "neigh", "replace", server.String(), "lladdr", gw, "dev", "eth0")
	spoof()
	if got := fetch(outsider); got != "" {
		t.Errorf("the port that is not a VM's, with the VM's MAC, reached the service on the gateway: %q", got)
	}

	// The VM's own exchange comes after the spoofs on the same socket.
	if got := lease(); got != vm.IP.String() {
		t.Errorf("after the spoofs the VM leased %q, want %s", got, vm.IP)
	}
	if l, ok := b.srv.Lease(vm.MAC); !ok || l.State != StateBound || l.IP != vm.IP {
		t.Errorf("the VM's lease after the spoofs: %+v, want bound to %s", l, vm.IP)
	}
	for _, r := range []Reason{ReasonDecline, ReasonRelease} {
		if n := b.srv.Count(r); n != 0 {
			t.Errorf("the server acted on %d %s", n, r)
		}
	}
	if got := fetch(vns); !strings.HasSuffix(got, "metadata") {
		t.Errorf("after the spoofs the VM's own request to the gateway got %q", got)
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	for _, p := range b.all {
		if x := binary.BigEndian.Uint32(p[4:]); x > hostileXID && x <= xid {
			t.Errorf("the server read the port's packet %d", x-hostileXID)
		}
	}
}
