package main_test

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/threes-dev/threes/hv/hvtest"
)

// TestLab runs the README's run command the way a new user meets it: scripts/lab
// (what `sudo make run` starts inside scripts/testenv) brings up headscale, the
// bridge, the appliance, the lab image and a VM that reaches the tailnet; --check
// fetches the VM's page over the tailnet and lists it through the API as the lab's
// user, then tears down. Afterwards nothing of it is left: no bridge, no domain, no
// process, no directory.
func TestLab(t *testing.T) {
	if os.Geteuid() != 0 {
		hvtest.Skip(t, "not root: the lab makes a bridge and VMs")
	}
	if _, err := os.Stat(hvtest.Socket); err != nil {
		hvtest.Skip(t, "no libvirtd socket (%v): run under scripts/testenv", err)
	}
	hvtest.LabImageDir(t)
	root, err := filepath.Abs("../..")
	if err != nil {
		t.Fatal(err)
	}
	for _, b := range []string{"threes", "headscale", "tailscaled", "tailscale"} {
		if _, err := os.Stat(filepath.Join(root, "bin", b)); err != nil {
			hvtest.Skip(t, "bin/%s is missing (make build headscale tailscaled): %v", b, err)
		}
	}
	before, _ := filepath.Glob("/tmp/threes-lab.*")
	domainsBefore, _ := hvtest.Virsh(t, "list", "--all", "--name")

	ctx, cancel := context.WithTimeout(context.Background(), 12*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, filepath.Join(root, "scripts", "lab"), "--check")
	// A timeout ends the lab as Ctrl-C would (SIGINT to its process group), so
	// it still tears down.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	cmd.Cancel = func() error { return syscall.Kill(-cmd.Process.Pid, syscall.SIGINT) }
	cmd.WaitDelay = time.Minute
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("scripts/lab --check: %v\n%s", err, out)
	}
	if !strings.Contains(string(out), "check passed: toy0 is on the tailnet") {
		t.Errorf("scripts/lab --check said:\n%s", out)
	}
	for _, phase := range []string{"defined", "tailnet"} {
		if !strings.Contains(string(out), phase) {
			t.Errorf("vm create --wait printed no %q phase:\n%s", phase, out)
		}
	}

	if err := exec.Command("ip", "link", "show", "threes0").Run(); err == nil {
		t.Error("the lab left its bridge threes0")
	}
	after, _ := hvtest.Virsh(t, "list", "--all", "--name")
	for _, d := range strings.Fields(after) {
		if !slices.Contains(strings.Fields(domainsBefore), d) {
			t.Errorf("the lab left libvirt domain %s", d)
		}
	}
	if dirs, _ := filepath.Glob("/tmp/threes-lab.*"); len(dirs) != len(before) {
		t.Errorf("lab directories before %v, after %v", before, dirs)
	}
	if out, err := exec.Command("pgrep", "-af", "/tmp/threes-lab[.]").CombinedOutput(); err == nil {
		t.Errorf("processes of the lab still run:\n%s", out)
	}
}
