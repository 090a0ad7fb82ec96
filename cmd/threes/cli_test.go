package main_test

import (
	"bytes"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/threes-dev/threes/appliance/threestest"
)

// threesBin returns the threes binary: $THREES_BIN (make test builds it), or one
// built here.
func threesBin(t *testing.T) string {
	if b := os.Getenv("THREES_BIN"); b != "" {
		return b
	}
	bin := filepath.Join(t.TempDir(), "threes")
	out, err := exec.Command("go", "build", "-o", bin, ".").CombinedOutput()
	if err != nil {
		t.Fatalf("build threes: %v\n%s", err, out)
	}
	return bin
}

type cli struct {
	t      *testing.T
	bin    string
	global []string
	uid    uint32 // run as this user when non-zero
}

// run runs the binary and returns stdout, stderr and the exit code.
func (c cli) run(args ...string) (string, string, int) {
	c.t.Helper()
	cmd := exec.Command(c.bin, append(append([]string{}, c.global...), args...)...)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	if c.uid != 0 {
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: c.uid, Gid: c.uid}}
	}
	err := cmd.Run()
	code := 0
	if ee, ok := err.(*exec.ExitError); ok {
		code = ee.ExitCode()
	} else if err != nil {
		c.t.Fatalf("run threes %v: %v", args, err)
	}
	return out.String(), errb.String(), code
}

// ok runs a command that must succeed and returns its stdout.
func (c cli) ok(args ...string) string {
	c.t.Helper()
	out, errOut, code := c.run(args...)
	if code != 0 {
		c.t.Fatalf("threes %s: exit %d: %s", strings.Join(args, " "), code, errOut)
	}
	return out
}

// fail runs a command that must fail with one clear line naming what was wrong.
func (c cli) fail(wantCode int, mention string, args ...string) {
	c.t.Helper()
	out, errOut, code := c.run(args...)
	if code != wantCode {
		c.t.Fatalf("threes %s: exit %d, want %d (stdout %q, stderr %q)", strings.Join(args, " "), code, wantCode, out, errOut)
	}
	if lines := strings.Count(strings.TrimSpace(errOut), "\n") + 1; lines != 1 || !strings.Contains(errOut, mention) {
		c.t.Fatalf("threes %s: stderr %q, want one line mentioning %q", strings.Join(args, " "), errOut, mention)
	}
}

// TestCLI runs the built threes binary end to end against an appliance, through the
// host-local socket (as the host's root).
func TestCLI(t *testing.T) {
	env := threestest.Start(t)
	c := cli{t: t, bin: threesBin(t), global: []string{"--socket", env.Options.Socket}}

	if out := c.ok("whoami"); !strings.Contains(out, "root (local socket)") || !strings.Contains(out, "Role: admin") {
		t.Errorf("whoami = %q", out)
	}
	if out := c.ok("network", "create", "cool-network"); !strings.Contains(out, "tag:threes-cool-network") {
		t.Errorf("network create = %q", out)
	}
	c.fail(1, "already exists", "network", "create", "cool-network")
	if out := c.ok("network", "list"); !strings.Contains(out, "cool-network") {
		t.Errorf("network list = %q", out)
	}

	script := filepath.Join(t.TempDir(), "startup")
	os.WriteFile(script, []byte("#!/bin/sh\necho hello\n"), 0o644)
	out := c.ok("vm", "create", "-i", "base", "--network", "cool-network", "-t", "middy",
		"-k", "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHx me@laptop", "-c", script,
		"--kv", "role=web", "--secret-kv", "password=hunter2", "toy0")
	for _, want := range []string{"toy0", "ID:", "Management Address:", "middy (2 vCPU, 2048 MiB)", "running"} {
		if !strings.Contains(out, want) {
			t.Errorf("vm create output lacks %q:\n%s", want, out)
		}
	}

	var vm map[string]any
	if err := json.Unmarshal([]byte(c.ok("-o", "json", "vm", "get", "toy0")), &vm); err != nil {
		t.Fatalf("vm get -o json: %v", err)
	}
	id, _ := vm["id"].(string)
	if len(id) != 20 || vm["name"] != "toy0" || vm["network"] != "cool-network" || vm["state"] != "VM_STATE_RUNNING" {
		t.Fatalf("vm get json = %v", vm)
	}
	if got := strings.TrimSpace(c.ok("vm", "get-id", "toy0")); got != id {
		t.Errorf("get-id = %q, want %q", got, id)
	}
	if out := c.ok("vm", "all"); !strings.Contains(out, id) || !strings.Contains(out, "running") {
		t.Errorf("vm all = %q", out)
	}
	var list []map[string]any
	if err := json.Unmarshal([]byte(c.ok("-o", "json", "vm", "all")), &list); err != nil || len(list) != 1 || list[0]["id"] != id {
		t.Fatalf("vm all -o json = %v, %v", list, err)
	}

	if out := c.ok("vm", "stop", "toy0"); !strings.Contains(out, "stopped") {
		t.Errorf("vm stop = %q", out)
	}
	// The console of a stopped VM is a state to change first, said in one line.
	c.fail(1, "not running (failed precondition)", "vm", "console", "toy0")
	if out := c.ok("vm", "start", id); !strings.Contains(out, "running") {
		t.Errorf("vm start = %q", out)
	}
	// Starting a running VM is a state to change first, said in one line.
	c.fail(1, "already running (threes vm restart reboots it)", "vm", "start", "toy0")
	c.ok("vm", "restart", "toy0")

	if out := c.ok("vm", "kv", "get", "toy0"); !strings.Contains(out, "hunter2") || !strings.Contains(out, "web") {
		t.Errorf("kv get as admin = %q", out)
	}
	c.ok("vm", "kv", "set", "--secret", "toy0", "token=abc", "zone=attic")
	if out := c.ok("vm", "kv", "delete", "toy0", "zone"); strings.Contains(out, "attic") || !strings.Contains(out, "token") {
		t.Errorf("kv delete = %q", out)
	}
	c.fail(2, "KEY=VALUE", "vm", "kv", "set", "toy0", "novalue")

	// Errors: one line, and the exit status says whether it was usage or the call.
	c.fail(1, "threes: no VM named nosuch\n", "vm", "get", "nosuch")
	c.fail(2, `required flag(s) "network" not set`, "vm", "create", "-i", "base", "toy1")
	c.fail(2, "--type", "vm", "create", "-i", "base", "--network", "cool-network", "-t", "huge", "vm2")
	c.fail(1, "image", "vm", "create", "-i", "windows", "--network", "cool-network", "vm2")
	c.fail(1, "name", "vm", "create", "-i", "base", "--network", "cool-network", "Bad_Name")
	c.fail(2, "missing NAME", "vm", "create", "-i", "base", "--network", "cool-network")
	c.fail(1, "in use", "network", "delete", "cool-network")

	if out := c.ok("vm", "delete", "toy0"); !strings.Contains(out, "deleted") {
		t.Errorf("vm delete = %q", out)
	}
	if out := c.ok("vm", "all"); strings.Contains(out, id) {
		t.Errorf("vm all still lists deleted vm: %q", out)
	}
	if out := c.ok("vm", "all", "--deleted"); !strings.Contains(out, id) {
		t.Errorf("vm all --deleted = %q", out)
	}
	if out := c.ok("vm", "purge"); !strings.Contains(out, "purged "+id) {
		t.Errorf("vm purge = %q", out)
	}
	c.fail(1, "threes: no VM with ID "+id+"\n", "vm", "get", id)
	c.ok("network", "delete", "cool-network")

	// Images: upload, refuse junk and duplicates, refuse deleting one in use.
	disk := filepath.Join(t.TempDir(), "tiny.qcow2")
	if out, err := exec.Command("qemu-img", "create", "-q", "-f", "qcow2", disk, "32M").CombinedOutput(); err != nil {
		t.Fatalf("qemu-img: %v %s", err, out)
	}
	if out := c.ok("image", "import", "tiny", disk); !strings.Contains(out, "qcow2, 32 MiB") {
		t.Errorf("image import = %q", out)
	}
	c.fail(1, "already exists", "image", "import", "tiny", disk)
	junk := filepath.Join(t.TempDir(), "junk.img")
	os.WriteFile(junk, []byte("QFI\xfbnot really a qcow2 image"), 0o644)
	c.fail(1, "invalid argument", "image", "import", "junk", junk)
	// The error names the user's file, not where the server kept the upload.
	if _, errOut, _ := c.run("image", "import", "junk", junk); !strings.Contains(errOut, junk) || strings.Contains(errOut, ".upload-") {
		t.Errorf("image import junk: %q, want it to name %s", errOut, junk)
	}
	// A kernel image without a disk says so in words.
	kernel, initrd := filepath.Join(t.TempDir(), "vmlinuz"), filepath.Join(t.TempDir(), "initrd.img")
	bz := make([]byte, 4096)
	copy(bz[0x202:], "HdrS") // the x86 boot protocol's signature is all the store checks
	os.WriteFile(kernel, bz, 0o644)
	os.WriteFile(initrd, []byte("initrd"), 0o644)
	if out := c.ok("image", "import", "tinyk", "--kernel", kernel, "--initrd", initrd); !strings.Contains(out, "Disk: none") {
		t.Errorf("image import of a kernel image = %q, want Disk: none", out)
	}
	c.ok("image", "delete", "tinyk")
	c.fail(2, "no such file", "image", "import", "nofile", "/nonexistent.qcow2")
	if out := c.ok("image", "list"); !strings.Contains(out, "tiny") || strings.Contains(out, "junk") {
		t.Errorf("image list = %q", out)
	}
	c.ok("network", "create", "imgnet")
	c.ok("vm", "create", "-i", "tiny", "--network", "imgnet", "small1")
	c.fail(1, "small1", "image", "delete", "tiny")
	c.ok("vm", "delete", "small1")
	c.fail(1, "purge them first", "image", "delete", "tiny")
	c.ok("vm", "purge")
	c.ok("image", "delete", "tiny")

	if out := c.ok("version"); !strings.HasPrefix(out, "threes ") {
		t.Errorf("version = %q", out)
	}
	if out := c.ok("completion", "bash"); !strings.Contains(out, "threes") {
		t.Errorf("completion bash printed %d bytes", len(out))
	}
}

// TestLocalSocketNonRoot: the socket is 0660, and a user who can reach it anyway (the
// admin loosened it) gets no rights: the kernel's peer credentials say who they are.
func TestLocalSocketNonRoot(t *testing.T) {
	if os.Geteuid() != 0 {
		if os.Getenv("CI") == "true" {
			t.Fatal("needs root to run the client as another user")
		}
		t.Skip("needs root")
	}
	env := threestest.Start(t)
	fi, err := os.Stat(env.Options.Socket)
	if err != nil {
		t.Fatal(err)
	}
	if perm := fi.Mode().Perm(); perm != 0o660 {
		t.Errorf("socket mode = %o, want 660", perm)
	}
	// Let nobody through the file system: the server must still refuse it.
	openUp(filepath.Dir(env.Options.Socket))
	os.Chmod(env.Options.Socket, 0o666)
	bin := threesBin(t)
	openUp(filepath.Dir(bin))
	nobody := cli{t: t, bin: bin, global: []string{"--socket", env.Options.Socket}, uid: 65534}
	if out := nobody.ok("whoami"); !strings.Contains(out, "uid 65534") || !strings.Contains(out, "Role: none") {
		t.Errorf("whoami as nobody = %q", out)
	}
	nobody.fail(1, "permission denied", "network", "list")
}

// openUp makes dir and its parents up to the temp dir traversable by anyone.
func openUp(dir string) {
	for d := dir; d != os.TempDir() && d != "/" && d != "."; d = filepath.Dir(d) {
		os.Chmod(d, 0o755)
	}
}
