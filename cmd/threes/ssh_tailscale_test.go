package main

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/creack/pty"

	"github.com/threes-dev/threes/appliance"
	"github.com/threes-dev/threes/hv"
	"github.com/threes-dev/threes/hv/hvtest"
	"github.com/threes-dev/threes/tsauth/control/headscaletest"
)

// sshPolicy makes headscale's user threes an admin of the appliance, over the API's
// port and SSH's alike.
const sshPolicy = `{
	"tagOwners": {"tag:threes": ["threes@"]},
	"grants": [
		{"src": ["threes@"], "dst": ["tag:threes"], "ip": ["tcp:9999", "tcp:22"], "app": {"threes.dev/cap/threes": [{"role": "admin"}]}},
	],
}`

// TestSSHTailscaleNC is an admin's own machine against a real appliance: Debian's
// OpenSSH client, with `tailscale nc %h %p` as its ProxyCommand through the user's
// tailscaled (userspace networking, no route from the OS into the tailnet), logged in
// to headscale as a user the policy makes admin; the appliance runs VMs on QEMU. The
// host key is trusted on first use; `vm all` lists the VM; `ssh -t … vm console` on
// a terminal shows the guest booting, takes a command typed into the guest's shell
// and shows its output; Ctrl-] leaves with the CLI's exit status; and a VM stopped
// mid-console ends the session.
func TestSSHTailscaleNC(t *testing.T) {
	sshBin, err := exec.LookPath("ssh")
	if err != nil {
		hvtest.Skip(t, "no ssh client: install openssh-client")
	}
	tsd := sshEnvBin(t, "THREES_TAILSCALED")
	tsc := sshEnvBin(t, "THREES_TAILSCALE")
	sshIsolated(t)
	imgDir := hvtest.TestImageDir(t)
	q := hvtest.OpenQEMU(t, hv.Config{StopTimeout: 2 * time.Minute})
	// The gateway on the bridge, in a range of this test's own, for the guest's DHCP.
	if out, err := exec.Command("ip", "addr", "add", "10.78.0.1/24", "dev", q.Bridge).CombinedOutput(); err != nil {
		t.Fatalf("address the bridge: %v %s", err, out)
	}
	hs := headscaletest.Start(t)
	headscaletest.SetClientEnv(t)
	hs.SetPolicy(t, sshPolicy)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()

	sock := filepath.Join(q.Dir, "threes.sock")
	a, err := appliance.Start(ctx, appliance.Options{
		StateDir: q.Dir, ControlURL: hs.URL, AuthKey: hs.PreauthKey(t, "tag:threes"), OwnerTag: "tag:threes",
		Socket: sock, CIDR: "10.78.0.0/24", Bridge: q.Bridge, Hypervisor: q.H,
		SSH:    sshRun,
		Logger: slog.New(slog.NewTextHandler(sshTestLog{t}, nil)),
		TSLogf: func(string, ...any) {},
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { a.Close() })
	if _, err := a.Tailnet().Up(ctx); err != nil {
		t.Fatal(err)
	}

	// On the appliance's host, the image goes in with the CLI over the local socket
	// (over SSH, image import is refused).
	cmdline, err := os.ReadFile(filepath.Join(imgDir, "cmdline"))
	if err != nil {
		t.Fatal(err)
	}
	if out, errOut, code := runTree("--socket", sock, "image", "import", "bootimg", filepath.Join(imgDir, "disk.qcow2"),
		"--kernel", filepath.Join(imgDir, "vmlinuz"), "--initrd", filepath.Join(imgDir, "initrd.img"),
		"--cmdline", strings.TrimSpace(string(cmdline))); code != 0 {
		t.Fatalf("image import: exit %d: %s%s", code, out, errOut)
	}

	tsSock := hs.UserTailscaled(t, ctx, tsd, "threes")

	known := filepath.Join(t.TempDir(), "known_hosts")
	// As the README tells an admin to connect: the appliance's tailnet name, any
	// user name, tailscale nc carrying the connection.
	sshCmd := func(args ...string) *exec.Cmd {
		return exec.Command(sshBin, append([]string{"-F", "/dev/null",
			"-o", "ProxyCommand=" + tsc + " --socket=" + tsSock + " nc %h %p",
			"-o", "UserKnownHostsFile=" + known, "-o", "StrictHostKeyChecking=accept-new",
			"-o", "BatchMode=yes", "admin@threes"}, args...)...)
	}
	run := func(args ...string) (string, string, int) {
		t.Helper()
		cmd := sshCmd(args...)
		var out, errb bytes.Buffer
		cmd.Stdout, cmd.Stderr = &out, &errb
		err := cmd.Run()
		code := 0
		if ee, ok := err.(*exec.ExitError); ok {
			code = ee.ExitCode()
		} else if err != nil {
			t.Fatalf("ssh %v: %v", args, err)
		}
		return out.String(), errb.String(), code
	}

	// First contact: the host key is trusted and pinned.
	out, errOut, code := run("network", "create", "lab")
	if code != 0 || !strings.Contains(out, "lab") {
		t.Fatalf("first ssh (network create): exit %d, %q, %q", code, out, errOut)
	}
	if b, err := os.ReadFile(known); err != nil || !strings.Contains(string(b), "threes ssh-ed25519 ") {
		t.Fatalf("known_hosts after the first connection: %q, %v", b, err)
	}
	if out, errOut, code := run("whoami"); code != 0 || !strings.Contains(out, "Role: admin") {
		t.Fatalf("whoami: exit %d, %q, %q", code, out, errOut)
	}
	if out, errOut, code := run("vm", "create", "-i", "bootimg", "--network", "lab", "-t", "teeny", "boot1"); code != 0 || !strings.Contains(out, "running") {
		t.Fatalf("vm create: exit %d, %q, %q", code, out, errOut)
	}

	// The console on a terminal, as a person would have it: ssh -t on a pty.
	console := func() (*exec.Cmd, *hvtest.Console, <-chan error) {
		t.Helper()
		cmd := sshCmd("-t", "vm", "console", "boot1")
		ptmx, err := pty.StartWithSize(cmd, &pty.Winsize{Rows: 40, Cols: 120})
		if err != nil {
			t.Fatalf("ssh -t vm console: %v", err)
		}
		done, exited := make(chan error, 1), make(chan struct{})
		go func() {
			done <- cmd.Wait()
			close(exited)
		}()
		t.Cleanup(func() {
			cmd.Process.Kill() // only the ssh started here, by its PID
			<-exited
		})
		return cmd, hvtest.WatchConsole(t, ptmx), done
	}
	ended := func(what string, done <-chan error) int {
		t.Helper()
		select {
		case err := <-done:
			if ee, ok := err.(*exec.ExitError); ok {
				return ee.ExitCode()
			} else if err != nil {
				t.Fatalf("%s: %v", what, err)
			}
			return 0
		case <-time.After(time.Minute):
			t.Fatalf("%s: ssh still running after a minute", what)
			return -1
		}
	}
	_, con, done := console()
	con.WaitFor(t, "Connected to boot1's console", time.Minute)
	con.WaitFor(t, "threes-test: serial ", 4*time.Minute)
	con.WaitFor(t, "threes-test: ready", 3*time.Minute)

	// vm all while the guest runs, from another session.
	if out, errOut, code := run("vm", "all"); code != 0 || !strings.Contains(out, "boot1") || !strings.Contains(out, "running") {
		t.Errorf("vm all: exit %d, %q, %q", code, out, errOut)
	}

	// Typed into the guest's shell: the answer is the shell's, not an echo of
	// what was typed.
	word := sshRandWord(t)
	con.Write(t, "echo hello-$((6*7))-"+word+"\r")
	con.WaitFor(t, "hello-42-"+word, time.Minute)
	con.Write(t, "\x1d") // Ctrl-]
	if code := ended("console left with Ctrl-]", done); code != 0 {
		t.Errorf("ssh after Ctrl-]: exit %d, want 0; it showed:\n%s", code, con.String())
	}

	// A console that cannot be had: the CLI's one line and exit status, on a pty too.
	if out, errOut, code := run("-tt", "vm", "console", "nosuch"); code != 1 || !strings.Contains(out+errOut, "nosuch") {
		t.Errorf("console of nosuch: exit %d, %q, %q", code, out, errOut)
	}

	// The VM stopping mid-console ends the session, with the guest's last words.
	_, con, done = console()
	con.WaitFor(t, "Connected to boot1's console", time.Minute)
	word = sshRandWord(t)
	con.Write(t, "echo again-$((1+1))-"+word+"\r")
	con.WaitFor(t, "again-2-"+word, time.Minute)
	if out, errOut, code := run("vm", "stop", "boot1"); code != 0 || !strings.Contains(out, "stopped") {
		t.Fatalf("vm stop: exit %d, %q, %q", code, out, errOut)
	}
	stopped := time.Now()
	if code := ended("console of a stopped VM", done); code != 0 {
		t.Errorf("ssh after the VM stopped: exit %d, want 0", code)
	}
	t.Logf("session ended %v after vm stop returned", time.Since(stopped).Round(time.Millisecond))
	con.WaitFor(t, "threes-test: power button", time.Second)
}

// runTree runs the CLI's command tree in process, as the threes binary would.
func runTree(args ...string) (string, string, int) {
	root, g := newRoot()
	var out, errb bytes.Buffer
	root.SetArgs(args)
	root.SetOut(&out)
	root.SetErr(&errb)
	err := root.Execute()
	g.close()
	if err != nil {
		fmt.Fprintln(&errb, "threes:", g.errorLine(err))
		return out.String(), errb.String(), exitCode(err)
	}
	return out.String(), errb.String(), 0
}

// sshEnvBin returns the binary $name names (make tailscaled builds them), skipping
// without it, or failing under CI=true.
func sshEnvBin(t *testing.T, name string) string {
	t.Helper()
	b := os.Getenv(name)
	if _, err := os.Stat(b); b == "" || err != nil {
		hvtest.Skip(t, "%s (%q) is not a binary: run make tailscaled", name, b)
	}
	return b
}

// sshIsolated skips t (fails it under CI=true) unless it runs as root in a network
// namespace with no default route, as scripts/testenv arranges: the test adds an
// interface there, and nothing it does can leave the machine.
func sshIsolated(t *testing.T) {
	t.Helper()
	route, err := os.ReadFile("/proc/net/route")
	ok := err == nil && os.Geteuid() == 0
	for _, line := range strings.Split(string(route), "\n")[1:] {
		if f := strings.Fields(line); len(f) > 1 && f[1] == "00000000" {
			ok = false
		}
	}
	v6, _ := os.ReadFile("/proc/net/ipv6_route")
	for _, line := range strings.Split(string(v6), "\n") {
		// ::/0 through anything but lo (where the kernel keeps its reject route).
		if f := strings.Fields(line); len(f) == 10 && f[0] == strings.Repeat("0", 32) && f[1] == "00" && f[9] != "lo" {
			ok = false
		}
	}
	if !ok {
		hvtest.Skip(t, "not root in a network namespace without a default route: run under scripts/testenv")
	}
}

func sshEventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(time.Minute)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func sshRandWord(t *testing.T) string {
	b := make([]byte, 6)
	rand.Read(b)
	return hex.EncodeToString(b)
}

type sshTestLog struct{ t *testing.T }

func (w sshTestLog) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimSuffix(string(p), "\n"))
	return len(p), nil
}
