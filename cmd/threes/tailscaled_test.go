package main_test

import (
	"context"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"tailscale.com/client/local"
	"tailscale.com/ipn"

	"github.com/threes-dev/threes/appliance"
	"github.com/threes-dev/threes/appliance/threestest"
	"github.com/threes-dev/threes/hv/hvtest"
	"github.com/threes-dev/threes/tsauth/control/headscaletest"
)

const operatorPolicy = `{
	"tagOwners": {"tag:threes": ["threes@"]},
	"grants": [
		{"src": ["threes@"], "dst": ["tag:threes"], "ip": ["tcp:9999"], "app": {"threes.dev/cap/threes": [{"role": "admin"}]}},
	],
}`

// tailscaledBin returns $THREES_TAILSCALED (make test builds it), skipping without
// it, or failing under CI=true.
func tailscaledBin(t *testing.T) string {
	b := os.Getenv("THREES_TAILSCALED")
	if _, err := os.Stat(b); b == "" || err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatalf("CI=true but THREES_TAILSCALED (%q) is not a tailscaled binary: run make tailscaled", b)
		}
		t.Skip("THREES_TAILSCALED not set: run make tailscaled")
	}
	return b
}

// TestCLIOverTailscaled: on a host whose tailscaled runs in userspace networking (no
// route to the tailnet from the OS), `threes -a` reaches the appliance through
// tailscaled's LocalAPI, and the appliance knows the caller as the user tailscaled
// logged in as, with the role the real policy grants.
func TestCLIOverTailscaled(t *testing.T) {
	tsd := tailscaledBin(t)
	ownNetNS(t)
	hs := headscaletest.Start(t)
	headscaletest.SetClientEnv(t)
	hs.SetPolicy(t, operatorPolicy)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()

	dir := t.TempDir()
	threestest.SeedImages(t, dir, "base")
	a, err := appliance.Start(ctx, appliance.Options{
		StateDir: dir, ControlURL: hs.URL, AuthKey: hs.PreauthKey(t, "tag:threes"), OwnerTag: "tag:threes",
		Socket: filepath.Join(dir, "threes.sock"), Hypervisor: hvtest.Open(t),
		Logger: slog.New(slog.DiscardHandler),
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { a.Close() })
	st, err := a.Tailnet().Up(ctx)
	if err != nil {
		t.Fatal(err)
	}

	// tailscaled keeps away from control until some interface has a usable IPv4
	// address: give it a dummy one from TEST-NET-2, which nothing routes.
	// (A veth pair with both ends here: this kernel has no dummy driver.)
	dummy := fmt.Sprintf("thrd%d", os.Getpid()%100000)
	for _, args := range [][]string{
		{"link", "add", dummy, "type", "veth", "peer", "name", dummy + "p"},
		{"addr", "add", "198.51.100.1/32", "dev", dummy},
		{"link", "set", dummy, "up"},
		{"link", "set", dummy + "p", "up"},
	} {
		if out, err := exec.Command("ip", args...).CombinedOutput(); err != nil {
			t.Fatalf("ip %v: %v\n%s", args, err, out)
		}
	}
	t.Cleanup(func() { exec.Command("ip", "link", "del", dummy).Run() })

	// The user's own tailscaled, logged in as user threes.
	sock := filepath.Join(t.TempDir(), "tailscaled.sock")
	cmd := exec.Command(tsd, "--tun=userspace-networking", "--socket="+sock, "--statedir="+t.TempDir(), "--port=0")
	cmd.Env = append(os.Environ(), "TS_DEBUG_USE_DERP_HTTP=1", "TS_NO_LOGS_NO_SUPPORT=true", "TS_DISABLE_PORTMAPPER=1")
	logf, _ := os.Create(filepath.Join(t.TempDir(), "tailscaled.log"))
	cmd.Stdout, cmd.Stderr = logf, logf
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		cmd.Process.Kill() // only the process started here, by its PID
		cmd.Wait()
		logf.Close()
		if t.Failed() {
			b, _ := os.ReadFile(logf.Name())
			t.Logf("tailscaled log:\n%s", tail(string(b), 40))
		}
	})
	lc := &local.Client{Socket: sock, UseSocketOnly: true}
	eventually(t, "tailscaled's LocalAPI", func() bool { _, err := lc.Status(ctx); return err == nil })
	if err := lc.Start(ctx, ipn.Options{
		AuthKey:     hs.PreauthKey(t),
		UpdatePrefs: &ipn.Prefs{ControlURL: hs.URL, WantRunning: true, Hostname: "desk"},
	}); err != nil {
		t.Fatal(err)
	}
	// As `tailscale up` does for a new node: the auth key is used by the login.
	if err := lc.StartLoginInteractive(ctx); err != nil {
		t.Fatal(err)
	}
	eventually(t, "tailscaled running", func() bool {
		s, err := lc.Status(ctx)
		return err == nil && s.BackendState == ipn.Running.String()
	})

	c := cli{t: t, bin: threesBin(t), global: []string{"-a", netip.AddrPortFrom(st.TailscaleIPs[0], 9999).String(), "--tailscaled-socket", sock}}
	if out := c.ok("whoami"); !strings.Contains(out, "Role: admin") || strings.Contains(out, "local socket") {
		t.Fatalf("whoami through tailscaled = %q", out)
	}
	c.ok("network", "create", "lab")
	if out := c.ok("vm", "create", "-i", "base", "--network", "lab", "web1"); !strings.Contains(out, "web1") {
		t.Fatalf("vm create = %q", out)
	}
	if out := c.ok("vm", "all"); !strings.Contains(out, "web1") {
		t.Fatalf("vm all = %q", out)
	}
}

func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(time.Minute)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func tail(s string, n int) string {
	lines := strings.Split(s, "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// ownNetNS skips t (fails it under CI=true) unless it runs as root in a network
// namespace with no default route, as make test arranges: the test adds an
// interface there, and nothing it does can leave the machine.
func ownNetNS(t *testing.T) {
	route, err := os.ReadFile("/proc/net/route")
	noDefault := err == nil && os.Geteuid() == 0
	for _, line := range strings.Split(string(route), "\n")[1:] {
		if f := strings.Fields(line); len(f) > 1 && f[1] == "00000000" {
			noDefault = false
		}
	}
	v6, _ := os.ReadFile("/proc/net/ipv6_route")
	for _, line := range strings.Split(string(v6), "\n") {
		// ::/0 through anything but lo (where the kernel keeps its reject route).
		if f := strings.Fields(line); len(f) == 10 && f[0] == strings.Repeat("0", 32) && f[1] == "00" && f[9] != "lo" {
			noDefault = false
		}
	}
	if noDefault {
		return
	}
	if os.Getenv("CI") == "true" {
		t.Fatal("CI=true but not root in a network namespace without a default route: run through make test")
	}
	t.Skip("needs root in a network namespace without a default route: run through make test")
}
