package headscaletest

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"tailscale.com/client/local"
	"tailscale.com/ipn"
)

var userNodes atomic.Int32

// UserTailscaled runs a user's own tailscaled (the binary bin) in userspace
// networking, logged in to s as its user under the hostname "desk", and returns
// its LocalAPI socket once its netmap holds a peer named peer ("" for any state
// of the netmap). It needs root in a network namespace of the test's own: it adds
// an interface there (a veth pair with a TEST-NET-2 address, which nothing
// routes), since tailscaled keeps away from control until some interface has a
// usable IPv4 address. tailscaled dies with the test binary (Pdeathsig), so a test
// killed by its timeout leaves none behind.
func (s *Server) UserTailscaled(t testing.TB, ctx context.Context, bin, peer string) string {
	t.Helper()
	n := userNodes.Add(1)
	veth := fmt.Sprintf("thu%d-%d", os.Getpid()%100000, n)
	for _, args := range [][]string{
		{"link", "add", veth, "type", "veth", "peer", "name", veth + "p"},
		{"addr", "add", fmt.Sprintf("198.51.100.%d/32", n), "dev", veth},
		{"link", "set", veth, "up"},
		{"link", "set", veth + "p", "up"},
	} {
		if out, err := exec.Command("ip", args...).CombinedOutput(); err != nil {
			t.Fatalf("ip %v: %v\n%s", args, err, out)
		}
	}
	t.Cleanup(func() { exec.Command("ip", "link", "del", veth).Run() })

	dir := t.TempDir()
	sock := filepath.Join(dir, "tailscaled.sock")
	cmd := exec.Command(bin, "--tun=userspace-networking", "--socket="+sock, "--statedir="+filepath.Join(dir, "state"), "--port=0")
	cmd.Env = append(os.Environ(), "TS_DEBUG_USE_DERP_HTTP=1", "TS_NO_LOGS_NO_SUPPORT=true", "TS_DISABLE_PORTMAPPER=1")
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	logf, err := os.Create(filepath.Join(dir, "tailscaled.log"))
	if err != nil {
		t.Fatal(err)
	}
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
			lines := strings.Split(string(b), "\n")
			t.Logf("tailscaled log:\n%s", strings.Join(lines[max(0, len(lines)-40):], "\n"))
		}
	})
	lc := &local.Client{Socket: sock, UseSocketOnly: true}
	waitUntil(t, "tailscaled's LocalAPI", func() bool { _, err := lc.Status(ctx); return err == nil })
	if err := lc.Start(ctx, ipn.Options{
		AuthKey:     s.PreauthKey(t),
		UpdatePrefs: &ipn.Prefs{ControlURL: s.URL, WantRunning: true, Hostname: "desk"},
	}); err != nil {
		t.Fatal(err)
	}
	// As `tailscale up` does for a new node: the auth key is used by the login.
	if err := lc.StartLoginInteractive(ctx); err != nil {
		t.Fatal(err)
	}
	waitUntil(t, "tailscaled running with "+peer+" in its netmap", func() bool {
		st, err := lc.Status(ctx)
		if err != nil || st.BackendState != ipn.Running.String() {
			return false
		}
		for _, p := range st.Peer {
			if peer == "" || p.HostName == peer {
				return true
			}
		}
		return peer == ""
	})
	return sock
}

func waitUntil(t testing.TB, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(time.Minute)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(50 * time.Millisecond)
	}
}
