package appliance_test

import (
	"bufio"
	"context"
	"net"
	"net/http"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/insomniacslk/dhcp/dhcpv4"
	"github.com/insomniacslk/dhcp/dhcpv4/server4"

	"github.com/threes-dev/threes/appliance"
	"github.com/threes-dev/threes/appliance/fleet"
	"github.com/threes-dev/threes/appliance/threestest"
	"github.com/threes-dev/threes/embeddb"
	"github.com/threes-dev/threes/internal/netnstest"
	threesv1 "github.com/threes-dev/threes/proto/threes/v1"
)

// queue hands out the values queued first, then those of fallback.
type queue[T any] struct {
	mu       sync.Mutex
	next     []T
	fallback func() T
}

func (q *queue[T]) push(v T) {
	q.mu.Lock()
	defer q.mu.Unlock()
	q.next = append(q.next, v)
}

func (q *queue[T]) pop() T {
	q.mu.Lock()
	defer q.mu.Unlock()
	if len(q.next) == 0 {
		return q.fallback()
	}
	v := q.next[0]
	q.next = q.next[1:]
	return v
}

func (q *queue[T]) left() int {
	q.mu.Lock()
	defer q.mu.Unlock()
	return len(q.next)
}

// TestCreateRetriesCollisions: a generated MAC or ID that is already taken, on this
// host or (in the shared database) on another host of the cluster, does not fail the
// create: it tries again with new ones.
func TestCreateRetriesCollisions(t *testing.T) {
	env := threestest.Start(t)
	macs := &queue[string]{fallback: func() string { return fleet.NewMAC().String() }}
	ids := &queue[string]{fallback: func() string { return fleet.NewID(time.Now()) }}
	appliance.SetGenerators(&env.Options, func() net.HardwareAddr {
		hw, _ := net.ParseMAC(macs.pop())
		return hw
	}, func(time.Time) string { return ids.pop() })
	logs := restartWith(t, env, -1)
	ctx := ctxT(t)
	c := env.Local(t)
	must[*threesv1.Network](t)(c.CreateNetwork(ctx, &threesv1.NetworkRequest{Name: "lab"}))
	create := func(name string) *threesv1.VM {
		t.Helper()
		return must[*threesv1.VM](t)(c.Create(ctx, &threesv1.CreateRequest{Name: name, Network: "lab", Image: "base", Type: threesv1.VMType_VM_TYPE_TEENY}))
	}
	first := create("first")

	// The MAC of a VM on this host (held in the IPAM).
	macs.push(first.GetMac())
	b := create("same-mac")
	if macs.left() != 0 || b.GetMac() == first.GetMac() {
		t.Fatalf("create with a taken mac: got mac %s (first has %s), %d queued left", b.GetMac(), first.GetMac(), macs.left())
	}
	// The ID of a VM.
	ids.push(first.GetId())
	d := create("same-id")
	if ids.left() != 0 || d.GetId() == first.GetId() {
		t.Fatalf("create with a taken id: got id %s (first has %s), %d queued left", d.GetId(), first.GetId(), ids.left())
	}
	// A MAC only the database knows: another host of the cluster holds it.
	const far = "52:54:00:fa:fa:fa"
	now := time.Now()
	if err := env.Appliance.DB().CreateVM(ctx, embeddb.VM{ID: fleet.NewID(now), Name: "elsewhere", Network: "lab",
		State: fleet.StateRunning, Desired: fleet.StateRunning, CreatedAt: now},
		embeddb.VMConfig{Hostname: "elsewhere"},
		embeddb.Address{IP: netip.MustParseAddr("10.10.250.250"), MAC: far, Hostname: "elsewhere"}); err != nil {
		t.Fatal(err)
	}
	macs.push(far)
	e := create("far-mac")
	if macs.left() != 0 || e.GetMac() == far {
		t.Fatalf("create with a mac another host holds: got %s, %d queued left", e.GetMac(), macs.left())
	}
	for _, what := range []string{"mac", "id", "mac"} {
		if !strings.Contains(logs.String(), `msg="create: generated `+what+` already taken; trying new ones"`) {
			t.Errorf("no log of the %s collision being retried", what)
		}
	}
	seen := map[string]bool{}
	for _, vm := range all(t, ctx, c, false) {
		if seen[vm.GetMac()] {
			t.Errorf("mac %s held twice", vm.GetMac())
		}
		seen[vm.GetMac()] = true
	}
}

// TestServesBeforeReconcile: a restarted appliance answers the API, DHCP and
// metadata while its first reconcile pass is still held back.
func TestServesBeforeReconcile(t *testing.T) {
	netnstest.Require(t)
	env := threestest.Start(t)
	ns := netnstest.NewNS(t, "sfbr")
	ns.Bridge(t, "br-sf", "10.79.0.1/24")
	env.Options.BridgeNetNS, env.Options.Bridge, env.Options.CIDR = ns.Name, "br-sf", "10.79.0.0/24"
	restartWith(t, env, -1)
	ctx := ctxT(t)
	c := env.Local(t)
	must[*threesv1.Network](t)(c.CreateNetwork(ctx, &threesv1.NetworkRequest{Name: "lab"}))
	vm := must[*threesv1.VM](t)(c.Create(ctx, &threesv1.CreateRequest{Name: "early", Network: "lab", Image: "base", Type: threesv1.VMType_VM_TYPE_TEENY}))

	// The first pass after the restart waits for release; later passes do not.
	entered, release := make(chan struct{}), make(chan struct{})
	var once sync.Once
	appliance.SetBeforeReconcile(&env.Options, func(ctx context.Context) {
		held := false
		once.Do(func() { held = true })
		if !held {
			return
		}
		close(entered)
		select {
		case <-release:
		case <-ctx.Done():
		}
	})
	var releaseOnce sync.Once
	t.Cleanup(func() { releaseOnce.Do(func() { close(release) }) })
	restartServing(t, env, -1)
	select {
	case <-entered:
	case <-ctx.Done():
		t.Fatal("the first reconcile pass never started")
	}

	// The API.
	c = env.Local(t)
	if got := must[*threesv1.VM](t)(c.Get(ctx, &threesv1.VMRef{Id: vm.GetId()})); got.GetName() != "early" {
		t.Fatalf("get while reconcile is held = %v", got)
	}
	// DHCP, to the VM's MAC from a namespace plugged into the bridge as its tap would be.
	hw, err := net.ParseMAC(vm.GetMac())
	if err != nil {
		t.Fatal(err)
	}
	guest := ns.Plug(t, "br-sf", "sfvm", hw, "")
	var dc net.PacketConn
	if err := guest.Do(func() (err error) {
		dc, err = server4.NewIPv4UDPConn("eth0", &net.UDPAddr{Port: dhcpv4.ClientPort})
		return err
	}); err != nil {
		t.Fatal(err)
	}
	defer dc.Close()
	offer := dhcpOffer(t, dc, hw)
	if got := offer.YourIPAddr.String(); got != vm.GetManagementIp() {
		t.Fatalf("dhcp offered %s, want %s", got, vm.GetManagementIp())
	}
	// Metadata, from the leased address.
	guest.Run(t, "ip", "addr", "add", vm.GetManagementIp()+"/24", "dev", "eth0")
	var conn net.Conn
	if err := guest.Do(func() (err error) {
		conn, err = net.DialTimeout("tcp", "10.79.0.1:80", 10*time.Second)
		return err
	}); err != nil {
		t.Fatalf("metadata while reconcile is held: %v", err)
	}
	defer conn.Close()
	req, _ := http.NewRequest("GET", "http://10.79.0.1/v1/hostname", nil)
	if err := req.Write(conn); err != nil {
		t.Fatal(err)
	}
	conn.SetReadDeadline(time.Now().Add(10 * time.Second))
	resp, err := http.ReadResponse(bufio.NewReader(conn), req)
	if err != nil {
		t.Fatal(err)
	}
	var body strings.Builder
	bufio.NewReader(resp.Body).WriteTo(&body)
	if resp.StatusCode != 200 || strings.TrimSpace(body.String()) != "early" {
		t.Fatalf("metadata hostname while reconcile is held: %d %q", resp.StatusCode, body.String())
	}

	// Released, the pass finishes (a pass asked for now waits for it).
	releaseOnce.Do(func() { close(release) })
	if _, err := env.Appliance.Reconcile(ctx); err != nil {
		t.Fatal(err)
	}
}

// dhcpOffer broadcasts a DISCOVER for hw on conn until an OFFER comes back.
func dhcpOffer(t *testing.T, conn net.PacketConn, hw net.HardwareAddr) *dhcpv4.DHCPv4 {
	t.Helper()
	disc, err := dhcpv4.NewDiscovery(hw, dhcpv4.WithBroadcast(true))
	if err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 1500)
	for range 10 {
		if _, err := conn.WriteTo(disc.ToBytes(), &net.UDPAddr{IP: net.IPv4bcast, Port: dhcpv4.ServerPort}); err != nil {
			t.Fatal(err)
		}
		conn.SetReadDeadline(time.Now().Add(time.Second))
		for {
			n, _, err := conn.ReadFrom(buf)
			if err != nil {
				break // timed out: ask again
			}
			m, err := dhcpv4.FromBytes(buf[:n])
			if err == nil && m.TransactionID == disc.TransactionID && m.MessageType() == dhcpv4.MessageTypeOffer {
				return m
			}
		}
	}
	t.Fatalf("no dhcp offer for %s", hw)
	return nil
}

// TestDriftOneLinePerPass: when libvirt loses every domain, `vm all` says each VM is
// missing, and each reconcile pass reports the drift in one line, not one per VM.
func TestDriftOneLinePerPass(t *testing.T) {
	env := threestest.Start(t)
	logs := restartWith(t, env, -1)
	ctx := ctxT(t)
	c := env.Local(t)
	must[*threesv1.Network](t)(c.CreateNetwork(ctx, &threesv1.NetworkRequest{Name: "lab"}))
	var ids []string
	for _, name := range []string{"lost-a", "lost-b", "lost-c", "lost-d"} {
		ids = append(ids, newVM(t, c, name))
	}
	for _, id := range ids {
		behindBack(t, "destroy", id)
		behindBack(t, "undefine", id)
	}
	waitFor(t, "every vm missing in `vm all`", func() bool {
		for _, vm := range all(t, ctx, c, false) {
			if vm.GetState() != threesv1.VMState_VM_STATE_MISSING {
				return false
			}
		}
		return true
	})
	for pass := range 2 {
		rep, err := env.Appliance.Reconcile(ctx)
		if err != nil || len(rep.Drift) != len(ids) || len(rep.Started) != 0 {
			t.Fatalf("pass %d: %+v, %v; want %d drifted, none started", pass, rep, err, len(ids))
		}
	}
	if n := strings.Count(logs.String(), "reconcile: drift"); n != 2 {
		t.Errorf("%d drift lines in the log for 2 passes, want 2:\n%s", n, logs)
	}
	if !strings.Contains(logs.String(), "vms=4") {
		t.Errorf("drift line does not count the vms:\n%s", logs)
	}
	for _, vm := range all(t, ctx, c, false) {
		if vm.GetState() != threesv1.VMState_VM_STATE_MISSING {
			t.Errorf("%s after the passes: %s, want missing", vm.GetName(), vm.GetState())
		}
	}
}
