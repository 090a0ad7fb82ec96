package dhcp

import (
	"bufio"
	"context"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/insomniacslk/dhcp/dhcpv4"
	"github.com/insomniacslk/dhcp/dhcpv4/server4"

	"github.com/threes-dev/threes/internal/netnstest"
	"github.com/threes-dev/threes/netboot/ipam"
)

// recordingConn hands every packet it reads to record, so a test run can
// save real clients' packets as fuzz seeds.
type recordingConn struct {
	net.PacketConn
	record func([]byte)
}

func (c recordingConn) ReadFrom(b []byte) (int, net.Addr, error) {
	n, a, err := c.PacketConn.ReadFrom(b)
	if err == nil && c.record != nil {
		c.record(append([]byte(nil), b[:n]...))
	}
	return n, a, err
}

// bridgeServer is a DHCP server on a bridge in its own namespace.
type bridgeServer struct {
	ns  *netnstest.NS
	srv *Server
	ipm *ipam.IPAM

	mu   sync.Mutex
	seen map[string][][]byte // by client MAC
	all  [][]byte            // in the order read
}

const bridgeName = "br-threes"

func startBridgeServer(t testing.TB, allocs []ipam.Allocation) *bridgeServer {
	t.Helper()
	netnstest.Require(t)
	ns := netnstest.NewNS(t, "dhcpsrv")
	ns.Bridge(t, bridgeName, "10.10.0.1/16")
	im, err := ipam.New(ipam.Config{}, allocs)
	if err != nil {
		t.Fatal(err)
	}
	b := &bridgeServer{ns: ns, ipm: im, seen: map[string][][]byte{}}
	var conn net.PacketConn
	if err := ns.Do(func() (err error) {
		c, err := server4.NewIPv4UDPConn(bridgeName, &net.UDPAddr{Port: 67})
		if err != nil {
			return err
		}
		// As NewServer does with the socket it opens itself.
		conn = c
		return filterBySource(c)
	}); err != nil {
		t.Fatal(err)
	}
	rc := recordingConn{PacketConn: conn, record: func(p []byte) {
		if len(p) < 34 {
			return
		}
		mac := net.HardwareAddr(p[28:34]).String()
		b.mu.Lock()
		b.seen[mac] = append(b.seen[mac], p)
		b.all = append(b.all, p)
		b.mu.Unlock()
	}}
	b.srv, err = NewServer(ServerConfig{
		Conn: rc,
		Reply: Config{
			ServerIP:  netip.MustParseAddr("10.10.0.1"),
			Prefix:    netip.MustParsePrefix("10.10.0.0/16"),
			DNS:       []netip.Addr{netip.MustParseAddr("10.10.0.1"), netip.MustParseAddr("10.10.0.53")},
			LeaseTime: 10 * time.Minute,
		},
		IPAM: im,
	})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- b.srv.Serve(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("serve: %v", err)
		}
	})
	return b
}

// saveSeeds writes the packets a client sent as fuzz seeds when
// THREES_DHCP_CAPTURE names a directory (testdata/fuzz/FuzzHandle).
func (b *bridgeServer) saveSeeds(t *testing.T, client string, mac net.HardwareAddr) {
	dir := os.Getenv("THREES_DHCP_CAPTURE")
	if dir == "" {
		return
	}
	b.mu.Lock()
	pkts := b.seen[mac.String()]
	b.mu.Unlock()
	for i, p := range pkts {
		mt := "bootp"
		if m, err := dhcpv4.FromBytes(p); err == nil {
			mt = strings.ToLower(m.MessageType().String())
		}
		name := filepath.Join(dir, fmt.Sprintf("%s-%02d-%s", client, i, mt))
		body := "go test fuzz v1\n[]byte(" + strconv.Quote(string(p)) + ")\n"
		if err := os.WriteFile(name, []byte(body), 0o644); err != nil {
			t.Errorf("save seed: %v", err)
		}
	}
}

func allocFor(n int, name string) ipam.Allocation {
	return ipam.Allocation{
		MAC:      net.HardwareAddr{0x52, 0x54, 0x00, 0xab, 0x00, byte(n)},
		Hostname: name,
		IP:       netip.AddrFrom4([4]byte{10, 10, byte(n), byte(40 + n)}),
	}
}

// readEnv reads a file of NAME=value lines written by `env`.
func readEnv(path string) map[string]string {
	f, err := os.Open(path)
	if err != nil {
		return nil
	}
	defer f.Close()
	m := map[string]string{}
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if k, v, ok := strings.Cut(sc.Text(), "="); ok {
			m[k] = v
		}
	}
	return m
}

// writeScript writes a client hook script. Hooks write `env` to a file
// named after the event through a rename, so a poller never reads it half
// written.
func writeScript(t *testing.T, dir, name, body string) string {
	t.Helper()
	p := filepath.Join(dir, name)
	if err := os.WriteFile(p, []byte("#!/bin/sh\n"+body+"\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	return p
}

// wantOptions compares what a client reported with what the IPAM holds.
type reported struct{ ip, mask, router, dns, hostname, broadcast, lease string }

func checkReported(t *testing.T, client string, got reported, a ipam.Allocation) {
	t.Helper()
	want := reported{a.IP.String(), "255.255.0.0", "10.10.0.1", "10.10.0.1 10.10.0.53", a.Hostname, "10.10.255.255", "600"}
	// Clients print the mask as a prefix length or dotted quad.
	if got.mask == "16" {
		got.mask = "255.255.0.0"
	}
	got.dns = strings.Join(strings.Fields(got.dns), " ")
	if got != want {
		t.Errorf("%s reported %+v, want %+v", client, got, want)
	}
}

func waitFile(t *testing.T, path string, within time.Duration) map[string]string {
	t.Helper()
	var env map[string]string
	netnstest.Eventually(t, within, "client script output "+filepath.Base(path), func() bool {
		env = readEnv(path)
		return env != nil
	})
	return env
}

func waitLease(t *testing.T, s *Server, mac net.HardwareAddr, st LeaseState) {
	t.Helper()
	netnstest.Eventually(t, 20*time.Second, fmt.Sprintf("lease of %s %s", mac, st), func() bool {
		l, ok := s.Lease(mac)
		return ok && l.State == st
	})
}

func TestRealClients(t *testing.T) {
	udhcpc, dhclient, dhcpcd := allocFor(1, "vm-udhcpc"), allocFor(2, "vm-dhclient"), allocFor(3, "vm-dhcpcd")
	b := startBridgeServer(t, []ipam.Allocation{udhcpc, dhclient, dhcpcd})

	t.Run("udhcpc", func(t *testing.T) {
		netnstest.Require(t, "busybox")
		dir := t.TempDir()
		c := b.ns.Plug(t, bridgeName, "udhcpc", udhcpc.MAC, "")
		// Like a real script it configures eth0: RELEASE is unicast from
		// the leased address.
		script := writeScript(t, dir, "script", `env > "`+dir+`/.tmp" && mv "`+dir+`/.tmp" "`+dir+`/$1"
case $1 in
bound) ip addr add "$ip/$mask" dev "$interface" ;;
deconfig) ip addr flush dev "$interface" ;;
esac`)
		// busybox 1.35 exits under -q before it counts as bound and so
		// never releases: keep it running and ask for RELEASE with SIGUSR2.
		cmd := c.Command("busybox", "udhcpc", "-i", "eth0", "-f", "-t", "10", "-T", "1", "-s", script)
		stop := startCmd(t, cmd)
		env := waitFile(t, filepath.Join(dir, "bound"), 30*time.Second)
		checkReported(t, "udhcpc", reported{env["ip"], env["subnet"], env["router"], env["dns"], env["hostname"], env["broadcast"], env["lease"]}, udhcpc)
		waitLease(t, b.srv, udhcpc.MAC, StateBound)
		// ip netns exec execs the client, so the PID is udhcpc's.
		cmd.Process.Signal(syscall.SIGUSR2)
		waitLease(t, b.srv, udhcpc.MAC, StateReleased)
		stop()
		b.saveSeeds(t, "udhcpc", udhcpc.MAC)
	})

	t.Run("dhclient", func(t *testing.T) {
		netnstest.Require(t, "dhclient")
		dir := t.TempDir()
		c := b.ns.Plug(t, bridgeName, "dhclient", dhclient.MAC, "")
		script := writeScript(t, dir, "script", `env > "`+dir+`/.tmp" && mv "`+dir+`/.tmp" "`+dir+`/$reason"
case $reason in
BOUND) ip addr add "$new_ip_address/$new_subnet_mask" dev "$interface" ;;
RELEASE|STOP) ip addr flush dev "$interface" ;;
esac`)
		pid := filepath.Join(dir, "pid")
		args := []string{"dhclient", "-4", "-1", "-v", "-sf", script, "-lf", filepath.Join(dir, "leases"), "-pf", pid}
		// Without -d dhclient goes to the background once bound; stop the
		// daemon it left behind by the PID it wrote, whatever happens.
		t.Cleanup(func() {
			if p, err := os.ReadFile(pid); err == nil {
				if n, err := strconv.Atoi(strings.TrimSpace(string(p))); err == nil {
					syscall.Kill(n, syscall.SIGKILL)
				}
			}
		})
		if out, err := c.Command(append(args, "eth0")...).CombinedOutput(); err != nil {
			t.Fatalf("dhclient: %v\n%s", err, out)
		}
		env := waitFile(t, filepath.Join(dir, "BOUND"), 30*time.Second)
		checkReported(t, "dhclient", reported{env["new_ip_address"], env["new_subnet_mask"], env["new_routers"], env["new_domain_name_servers"], env["new_host_name"], env["new_broadcast_address"], env["new_dhcp_lease_time"]}, dhclient)
		waitLease(t, b.srv, dhclient.MAC, StateBound)
		// -r sends RELEASE and stops the daemon.
		if out, err := c.Command(append(args, "-r", "eth0")...).CombinedOutput(); err != nil {
			t.Fatalf("dhclient -r: %v\n%s", err, out)
		}
		waitLease(t, b.srv, dhclient.MAC, StateReleased)
		b.saveSeeds(t, "dhclient", dhclient.MAC)
	})

	t.Run("dhcpcd", func(t *testing.T) {
		netnstest.Require(t, "dhcpcd")
		dir := t.TempDir()
		c := b.ns.Plug(t, bridgeName, "dhcpcd", dhcpcd.MAC, "")
		script := writeScript(t, dir, "script", `env > "`+dir+`/.tmp" && mv "`+dir+`/.tmp" "`+dir+`/$reason"`)
		// noarp skips the address probe; release makes it RELEASE on exit.
		conf := filepath.Join(dir, "dhcpcd.conf")
		if err := os.WriteFile(conf, []byte("noarp\nrelease\noption host_name, domain_name_servers, broadcast_address\n"), 0o644); err != nil {
			t.Fatal(err)
		}
		cmd := c.Command("dhcpcd", "-4", "-B", "-f", conf, "-c", script, "eth0")
		startCmd(t, cmd)
		env := waitFile(t, filepath.Join(dir, "BOUND"), 30*time.Second)
		checkReported(t, "dhcpcd", reported{env["new_ip_address"], env["new_subnet_cidr"], env["new_routers"], env["new_domain_name_servers"], env["new_host_name"], env["new_broadcast_address"], env["new_dhcp_lease_time"]}, dhcpcd)
		// dhcpcd configured eth0 in its namespace with the address.
		if out := c.Run(t, "ip", "-4", "-o", "addr", "show", "dev", "eth0"); !strings.Contains(out, dhcpcd.IP.String()+"/16") {
			t.Errorf("eth0 after dhcpcd: %s", out)
		}
		waitLease(t, b.srv, dhcpcd.MAC, StateBound)
		// SIGTERM stops it; with "release" it sends RELEASE first.
		// ip netns exec execs dhcpcd, so the PID is dhcpcd's.
		cmd.Process.Signal(syscall.SIGTERM)
		waitLease(t, b.srv, dhcpcd.MAC, StateReleased)
		b.saveSeeds(t, "dhcpcd", dhcpcd.MAC)
	})

	t.Run("unknown mac", func(t *testing.T) {
		netnstest.Require(t, "busybox")
		dir := t.TempDir()
		mac := net.HardwareAddr{0x52, 0x54, 0x00, 0xee, 0xee, 0xee}
		c := b.ns.Plug(t, bridgeName, "unknown", mac, "")
		script := writeScript(t, dir, "script", `env > "`+dir+`/.tmp" && mv "`+dir+`/.tmp" "`+dir+`/$1"`)
		before := b.srv.Count(ReasonUnknownMAC)
		out, err := c.Command("busybox", "udhcpc", "-i", "eth0", "-f", "-q", "-n", "-t", "2", "-T", "1", "-s", script).CombinedOutput()
		if err == nil {
			t.Fatalf("udhcpc got a lease for an unknown mac:\n%s", out)
		}
		if _, err := os.Stat(filepath.Join(dir, "bound")); err == nil {
			t.Fatalf("unknown mac was bound")
		}
		if got := b.srv.Count(ReasonUnknownMAC) - before; got < 2 {
			t.Errorf("unknown mac counted %d times, want at least 2 discovers", got)
		}
		if _, ok := b.srv.Lease(mac); ok {
			t.Errorf("unknown mac has a lease")
		}
	})
}

// startCmd starts cmd in a process group of its own, its output in a file
// shown if the test fails, and kills the group (dhcpcd forks privilege
// separation helpers) when the test ends; the returned func does that
// earlier.
func startCmd(t *testing.T, cmd *exec.Cmd) func() {
	t.Helper()
	out, err := os.Create(filepath.Join(t.TempDir(), "output"))
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stdout, cmd.Stderr = out, out
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		t.Fatalf("start %s: %v", cmd.Args, err)
	}
	exited := make(chan struct{})
	go func() { cmd.Wait(); close(exited) }()
	var once sync.Once
	stop := func() {
		once.Do(func() {
			syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
			<-exited
			out.Close()
			if t.Failed() {
				b, _ := os.ReadFile(out.Name())
				t.Logf("%s output:\n%s", cmd.Args, b)
			}
		})
	}
	t.Cleanup(stop)
	return stop
}
