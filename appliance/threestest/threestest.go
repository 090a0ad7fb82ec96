// Package threestest starts a whole threes in one call for tests: an in-process
// control server with DERP, an appliance on its own tailnet node and state dir, and
// client nodes with chosen users, tags and roles that call the API over the tailnet.
package threestest

import (
	"context"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"tailscale.com/tsnet"

	"github.com/threes-dev/threes/appliance"
	"github.com/threes-dev/threes/appliance/fleet"
	"github.com/threes-dev/threes/hv/hvtest"
	"github.com/threes-dev/threes/hv/images"
	threesv1 "github.com/threes-dev/threes/proto/threes/v1"
	"github.com/threes-dev/threes/tsauth"
	"github.com/threes-dev/threes/tsauth/tailnettest"
)

// Env is a running tailnet with an appliance on it.
type Env struct {
	Tailnet   *tailnettest.Tailnet
	Appliance *appliance.Appliance
	// Options started the appliance; Restart starts it again with them.
	Options appliance.Options
	// IP is the appliance's tailnet address.
	IP netip.Addr
}

// Start brings up a tailnet and an appliance on it, with the appliance's hypervisor on
// libvirt's test driver through the real libvirtd (hvtest), and cleans all up with t.
func Start(t testing.TB) *Env {
	t.Helper()
	return StartWith(t, nil)
}

// StartWith is Start with the appliance's options changed by opt first, e.g. to
// serve SSH with a runner.
func StartWith(t testing.TB, opt func(*appliance.Options)) *Env {
	t.Helper()
	tn := tailnettest.Start(t)
	dir := t.TempDir()
	e := &Env{
		Tailnet: tn,
		Options: appliance.Options{
			StateDir:   dir,
			Hostname:   "threes",
			ControlURL: tn.ControlURL,
			Socket:     filepath.Join(dir, "threes.sock"),
			Hypervisor: hvtest.Open(t),
			Logger:     testLogger(t),
			Ephemeral:  true,
			// The test driver's domains take no CPU or memory: room for far
			// more than any test makes, whatever the machine.
			Capacity: fleet.Capacity{VCPUs: 4096, MemoryMiB: 4 << 20},
		},
	}
	if opt != nil {
		opt(&e.Options)
	}
	SeedImages(t, dir, "base", "arch")
	e.start(t)
	return e
}

// SeedImages imports tiny blank qcow2 disk images with the given names into the
// image store of the appliance whose state dir is stateDir. They boot nothing; they
// stand in for base images where the test driver, not QEMU, runs the domains.
func SeedImages(t testing.TB, stateDir string, names ...string) {
	t.Helper()
	store, err := images.Open(filepath.Join(stateDir, "images"))
	if err != nil {
		t.Fatal(err)
	}
	for _, name := range names {
		file := filepath.Join(t.TempDir(), name+".qcow2")
		if out, err := exec.Command("qemu-img", "create", "-q", "-f", "qcow2", file, "16M").CombinedOutput(); err != nil {
			t.Fatalf("qemu-img create: %v\n%s", err, out)
		}
		if _, err := store.Import(context.Background(), name, images.Source{Disk: file}); err != nil {
			t.Fatalf("import image %s: %v", name, err)
		}
	}
}

func (e *Env) start(t testing.TB) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	a, err := appliance.Start(ctx, e.Options)
	if err != nil {
		t.Fatalf("start appliance: %v", err)
	}
	e.Appliance = a
	t.Cleanup(func() { a.Close() })
	st, err := a.Tailnet().Up(ctx)
	if err != nil {
		t.Fatalf("appliance joining tailnet: %v", err)
	}
	e.IP = st.TailscaleIPs[0]
	for _, ip := range st.TailscaleIPs {
		if ip.Is4() {
			e.IP = ip
		}
	}
}

// Restart stops the appliance and starts it again on the same state dir, as a host
// reboot would.
func (e *Env) Restart(t testing.TB) {
	t.Helper()
	if err := e.Appliance.Close(); err != nil {
		t.Logf("close appliance: %v", err)
	}
	e.start(t)
}

// Client is a tailnet node calling the appliance's API.
type Client struct {
	threesv1.ThreesClient
	Node *tsnet.Server
}

// ClientOptions choose who a client is and what the tailnet grants it.
type ClientOptions struct {
	tailnettest.NodeOptions
	// Role is granted with the threes capability; empty grants nothing.
	Role string
}

// Client starts a tailnet node with the given identity, grants it Role on the
// appliance, and returns an API client that dials through it.
func (e *Env) Client(t testing.TB, o ClientOptions) *Client {
	t.Helper()
	node := e.Tailnet.Node(t, o.NodeOptions)
	if o.Role != "" {
		e.Grant(node, o.Role)
	}
	return e.Dial(t, node)
}

// Grant gives node the role on the appliance (replacing any earlier grant).
func (e *Env) Grant(node *tsnet.Server, role string) {
	e.Tailnet.Grant(e.Appliance.Tailnet(), node, tsauth.Capability, map[string]string{"role": role})
}

// Dial returns an API client that reaches the appliance through node.
func (e *Env) Dial(t testing.TB, node *tsnet.Server) *Client {
	t.Helper()
	dial := tsauth.TailnetDialer(node)
	target := netip.AddrPortFrom(e.IP, 9999).String()
	conn, err := grpc.NewClient("passthrough:///"+target,
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithContextDialer(func(ctx context.Context, addr string) (net.Conn, error) { return dial(ctx, "tcp", addr) }))
	if err != nil {
		t.Fatalf("grpc client to %s: %v", target, err)
	}
	t.Cleanup(func() { conn.Close() })
	return &Client{ThreesClient: threesv1.NewThreesClient(conn), Node: node}
}

// Local returns an API client on the appliance's local socket.
func (e *Env) Local(t testing.TB) threesv1.ThreesClient {
	t.Helper()
	conn, err := grpc.NewClient("unix:"+e.Options.Socket, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatalf("grpc client to %s: %v", e.Options.Socket, err)
	}
	t.Cleanup(func() { conn.Close() })
	return threesv1.NewThreesClient(conn)
}

// testLogger sends the appliance's log to the test's log, so it shows on failure only.
func testLogger(t testing.TB) *slog.Logger {
	level := slog.LevelInfo
	if os.Getenv("THREES_TEST_DEBUG") != "" {
		level = slog.LevelDebug
	}
	w := &tlogWriter{t: t}
	t.Cleanup(func() { w.done.Store(true) }) // registered first, so it runs last
	return slog.New(slog.NewTextHandler(w, &slog.HandlerOptions{Level: level}))
}

// tlogWriter drops lines once the test is over: testing panics on a late Log, and
// background goroutines may still be winding down.
type tlogWriter struct {
	t    testing.TB
	done atomic.Bool
}

func (w *tlogWriter) Write(p []byte) (int, error) {
	if !w.done.Load() {
		w.t.Log(strings.TrimSuffix(string(p), "\n"))
	}
	return len(p), nil
}
