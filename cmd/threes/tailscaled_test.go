package main_test

import (
	"context"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

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

	// The user's own tailscaled, logged in as user threes.
	sock := hs.UserTailscaled(t, ctx, tsd, "threes")

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
