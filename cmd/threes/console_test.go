package main_test

import (
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/threes-dev/threes/appliance"
	"github.com/threes-dev/threes/appliance/threestest"
	"github.com/threes-dev/threes/hv"
	"github.com/threes-dev/threes/hv/hvtest"
)

// TestConsoleNoStdin: `vm console VM </dev/null` on a QEMU VM keeps printing after
// stdin ends (the boot goes on arriving, until the VM stops: exit 0), and one started
// after the boot first shows what it missed (the kernel's banner, the shell being
// ready), until its --timeout (exit 0). Issue 14.
func TestConsoleNoStdin(t *testing.T) {
	imgDir := hvtest.TestImageDir(t)
	q := hvtest.OpenQEMU(t, hv.Config{StopTimeout: 2 * time.Minute})
	if out, err := exec.Command("ip", "addr", "add", "10.79.0.1/24", "dev", q.Bridge).CombinedOutput(); err != nil {
		t.Fatalf("address the bridge: %v %s", err, out)
	}
	env := threestest.StartWith(t, func(o *appliance.Options) {
		o.StateDir, o.Hypervisor, o.Bridge, o.CIDR = q.Dir, q.H, q.Bridge, "10.79.0.0/24"
	})
	c := cli{t: t, bin: threesBin(t), global: []string{"--socket", env.Options.Socket}}
	cmdline, err := os.ReadFile(filepath.Join(imgDir, "cmdline"))
	if err != nil {
		t.Fatal(err)
	}
	c.ok("image", "import", "bootimg", filepath.Join(imgDir, "disk.qcow2"),
		"--kernel", filepath.Join(imgDir, "vmlinuz"), "--initrd", filepath.Join(imgDir, "initrd.img"),
		"--cmdline", strings.TrimSpace(string(cmdline)))
	c.ok("network", "create", "lab")
	c.ok("vm", "create", "-i", "bootimg", "--network", "lab", "-t", "teeny", "boot1")

	// console starts the CLI's console with stdin at EOF from the start.
	console := func(args ...string) (*hvtest.Console, <-chan int) {
		t.Helper()
		cmd := exec.Command(c.bin, append(append([]string{}, c.global...), append([]string{"vm", "console"}, args...)...)...)
		cmd.Stdin = nil // /dev/null
		out, err := cmd.StdoutPipe()
		if err != nil {
			t.Fatal(err)
		}
		cmd.Stderr = os.Stderr
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		con := hvtest.WatchConsole(t, struct {
			io.Reader
			io.Writer
			io.Closer
		}{out, io.Discard, io.NopCloser(nil)})
		code := make(chan int, 1)
		go func() {
			err := cmd.Wait()
			if ee, ok := err.(*exec.ExitError); ok {
				code <- ee.ExitCode()
				return
			}
			code <- 0
		}()
		t.Cleanup(func() { cmd.Process.Kill() })
		return con, code
	}
	exited := func(what string, code <-chan int) int {
		t.Helper()
		select {
		case n := <-code:
			return n
		case <-time.After(2 * time.Minute):
			t.Fatalf("%s: still running", what)
			return -1
		}
	}

	// Attached during the boot, with stdin already at EOF: the boot keeps coming.
	con, code := console("boot1")
	con.WaitFor(t, "threes-test: ready", 3*time.Minute)
	c.ok("vm", "stop", "boot1")
	if n := exited("console of a VM that stopped", code); n != 0 {
		t.Errorf("console of a VM that stopped: exit %d, want 0", n)
	}
	con.WaitFor(t, "threes-test: power button", time.Second)

	// Attached after the boot: what it missed first, until --timeout.
	c.ok("vm", "start", "boot1")
	watch, _ := console("--timeout", "10m", "boot1")
	watch.WaitFor(t, "threes-test: ready", 3*time.Minute)
	late, code := console("--timeout", "15s", "boot1")
	late.WaitFor(t, "Linux version", time.Minute)
	late.WaitFor(t, "threes-test: ready", time.Minute)
	if n := exited("console with --timeout", code); n != 0 {
		t.Errorf("console ended by --timeout: exit %d, want 0", n)
	}
	c.ok("vm", "stop", "boot1")
}
