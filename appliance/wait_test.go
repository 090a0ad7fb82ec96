package appliance_test

import (
	"bytes"
	"context"
	"log/slog"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/threes-dev/threes/appliance"
	"github.com/threes-dev/threes/appliance/fleet"
	"github.com/threes-dev/threes/appliance/threestest"
	"github.com/threes-dev/threes/hv"
	"github.com/threes-dev/threes/hv/hvtest"
	threesv1 "github.com/threes-dev/threes/proto/threes/v1"
	"github.com/threes-dev/threes/tsauth/control"
	"github.com/threes-dev/threes/tsauth/control/headscaletest"
	"github.com/threes-dev/threes/tsauth/policy"
)

// TestCreateWait runs `vm create --wait` through the binary: phases print as the
// appliance records them and the command exits 0 once the VM is on the tailnet; a
// failed phase, or a timeout, exits 1 with one line naming the phase, and the VM is
// left whole for delete and purge to remove. The phases after running are written
// into the appliance's database here, as the appliance's DHCP, metadata server and
// tailnet watcher (tested in appliance) or another host of a cluster write them.
func TestCreateWait(t *testing.T) {
	env := threestest.Start(t)
	c := waitCLI{t: t, bin: threesBinary(t), global: []string{"--socket", env.Options.Socket}}
	c.ok("network", "create", "cool-network")
	db := env.Appliance.DB()
	ctx := context.Background()

	// Nothing past running on the test driver: the timeout names the next phase.
	out, errOut, code := c.run("vm", "create", "--wait", "--timeout", "3s", "-i", "base", "--network", "cool-network", "slow")
	if code != 1 || strings.Count(strings.TrimSpace(errOut), "\n") != 0 ||
		!strings.Contains(errOut, `waiting for phase "address leased"`) || !strings.Contains(errOut, "vm slow: timed out") {
		t.Fatalf("create --wait with no DHCP: exit %d, stderr %q", code, errOut)
	}
	if !strings.Contains(out, "defined") || !strings.Contains(out, "running") {
		t.Errorf("create --wait printed %q, want defined and running", out)
	}

	// start runs create --wait in the background and returns the VM's ID once the
	// record exists, and a function that waits for the command's end.
	start := func(name string) (string, func() (string, string, int)) {
		t.Helper()
		cmd := exec.Command(c.bin, append(c.global, "vm", "create", "--wait", "--timeout", "1m", "-i", "base", "--network", "cool-network", name)...)
		var o, e bytes.Buffer
		cmd.Stdout, cmd.Stderr = &o, &e
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		deadline := time.Now().Add(time.Minute)
		for {
			vm, err := db.VMByName(ctx, name)
			if err == nil && vm.State == fleet.StateRunning {
				return vm.ID, func() (string, string, int) {
					err := cmd.Wait()
					code := 0
					if ee, ok := err.(*exec.ExitError); ok {
						code = ee.ExitCode()
					}
					return o.String(), e.String(), code
				}
			}
			if time.Now().After(deadline) {
				t.Fatalf("vm %s never recorded running: %v", name, err)
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
	record := func(id, phase, failure string) {
		t.Helper()
		// Apart, so each reaches the watch on its own.
		time.Sleep(300 * time.Millisecond)
		if _, err := db.RecordVMPhase(ctx, id, phase, time.Now(), failure); err != nil {
			t.Fatal(err)
		}
	}

	id, wait := start("quick")
	for _, p := range []string{fleet.PhaseAddressLeased, fleet.PhaseConfigFetched, fleet.PhaseKeyTaken, fleet.PhaseOnTailnet} {
		record(id, p, "")
	}
	out, errOut, code = wait()
	if code != 0 {
		t.Fatalf("create --wait: exit %d, stderr %q", code, errOut)
	}
	var order []string
	for _, line := range strings.Split(out, "\n") {
		for _, p := range []string{"defined", "running", "address leased", "config fetched", "key taken", "on the tailnet"} {
			if strings.HasPrefix(line, p+" ") && strings.Contains(line, "+") {
				order = append(order, p)
			}
		}
	}
	if strings.Join(order, ",") != "defined,running,address leased,config fetched,key taken,on the tailnet" {
		t.Fatalf("create --wait printed phases %v:\n%s", order, out)
	}
	if !strings.Contains(out, "Phases:") {
		t.Errorf("create --wait did not end with the VM and its phases:\n%s", out)
	}
	if got := c.ok("vm", "get", "quick"); !strings.Contains(got, "Phases:") || !strings.Contains(got, "on the tailnet") {
		t.Errorf("vm get = %q, want the phases", got)
	}
	if got := c.ok("-o", "json", "vm", "get", "quick"); !strings.Contains(got, `"VM_PHASE_ON_TAILNET"`) {
		t.Errorf("vm get -o json = %q, want the phases", got)
	}

	// The key was taken before the VM asked: the phase fails, and so does the wait.
	id, wait = start("robbed")
	record(id, fleet.PhaseAddressLeased, "")
	record(id, fleet.PhaseKeyTaken, "the vm asked for its auth key after it had already been taken")
	out, errOut, code = wait()
	if code != 1 || strings.Count(strings.TrimSpace(errOut), "\n") != 0 || !strings.Contains(errOut, `phase "key taken" failed`) ||
		!strings.Contains(errOut, "already been taken") {
		t.Fatalf("create --wait with the key taken: exit %d, stderr %q, stdout %q", code, errOut, out)
	}

	// Left whole, and delete and purge remove it.
	for _, name := range []string{"slow", "robbed"} {
		c.ok("vm", "delete", name)
	}
	c.ok("vm", "purge")
	if got := c.ok("vm", "all", "--deleted"); strings.Contains(got, "slow") || strings.Contains(got, "robbed") {
		t.Errorf("after delete and purge: %q", got)
	}
}

// waitCLI runs the threes binary against an appliance.
type waitCLI struct {
	t      *testing.T
	bin    string
	global []string
}

// run returns stdout, stderr and the exit code.
func (c waitCLI) run(args ...string) (string, string, int) {
	c.t.Helper()
	cmd := exec.Command(c.bin, append(append([]string{}, c.global...), args...)...)
	var o, e bytes.Buffer
	cmd.Stdout, cmd.Stderr = &o, &e
	err := cmd.Run()
	code := 0
	if ee, ok := err.(*exec.ExitError); ok {
		code = ee.ExitCode()
	} else if err != nil {
		c.t.Fatalf("run threes %v: %v", args, err)
	}
	return o.String(), e.String(), code
}

func (c waitCLI) ok(args ...string) string {
	c.t.Helper()
	out, errOut, code := c.run(args...)
	if code != 0 {
		c.t.Fatalf("threes %s: exit %d: %s", strings.Join(args, " "), code, errOut)
	}
	return out
}

// TestWaitNoTailscaleOnQEMU: a real guest whose image has no Tailscale (the test
// image under QEMU TCG) leases its address and reads its config, and never asks for
// its key: `vm create --wait` fails with one line naming the key taken phase, and
// the VM is left whole, so delete and purge remove all of it (domain, record, and
// the key, revoked on the control server).
func TestWaitNoTailscaleOnQEMU(t *testing.T) {
	img := hvtest.TestImageDir(t)
	q := hvtest.OpenQEMU(t, hv.Config{StopTimeout: 2 * time.Minute})
	const gw, cidr = "10.79.0.1", "10.79.0.0/24"
	if out, err := exec.Command("ip", "addr", "add", gw+"/24", "dev", q.Bridge).CombinedOutput(); err != nil {
		t.Fatalf("address the bridge: %v %s", err, out)
	}
	hs := headscaletest.Start(t)
	headscaletest.SetClientEnv(t)
	hs.SetPolicy(t, operatorPolicy)
	ctx, cancel := context.WithTimeout(context.Background(), 6*time.Minute)
	defer cancel()
	plane, err := control.NewHeadscale(control.HeadscaleConfig{
		URL: hs.URL, APIKey: control.NewSecret(hs.APIKey),
		Policy: policy.Options{OwnerTag: "tag:threes", Admins: []string{"threes@"}},
	})
	if err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(q.Dir, "threes.sock")
	a, err := appliance.Start(ctx, appliance.Options{
		StateDir: q.Dir, ControlURL: hs.URL, AuthKey: hs.PreauthKey(t, "tag:threes"), OwnerTag: "tag:threes",
		Socket: sock, CIDR: cidr, Bridge: q.Bridge, Hypervisor: q.H, Plane: plane,
		Logger: slog.New(slog.NewTextHandler(tWriter{t}, nil)), TSLogf: func(string, ...any) {},
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { a.Close() })
	conn, err := grpc.NewClient("unix:"+sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	api := threesv1.NewThreesClient(conn)
	uploadImage(t, ctx, api, "plain", img)
	c := waitCLI{t: t, bin: threesBinary(t), global: []string{"--socket", sock}}
	c.ok("network", "create", "lab")

	out, errOut, code := c.run("vm", "create", "--wait", "--timeout", "75s", "-i", "plain", "--network", "lab", "plain1")
	t.Logf("create --wait:\n%s%s", out, errOut)
	if code != 1 || strings.Count(strings.TrimSpace(errOut), "\n") != 0 || !strings.Contains(errOut, `waiting for phase "key taken"`) ||
		!strings.Contains(errOut, "does its image have Tailscale?") {
		t.Fatalf("create --wait of an image without Tailscale: exit %d, stderr %q", code, errOut)
	}
	for _, p := range []string{"defined", "running", "address leased", "config fetched"} {
		if !strings.Contains(out, "\n"+p+" ") {
			t.Errorf("create --wait did not print phase %s:\n%s", p, out)
		}
	}
	id := strings.TrimSpace(c.ok("vm", "get-id", "plain1"))
	if got := c.ok("vm", "get", id); !strings.Contains(got, "config fetched") || strings.Contains(got, "key taken") {
		t.Errorf("vm get = %q, want phases up to config fetched", got)
	}
	keys := networkKeys(t, hs, "tag:threes-lab")
	if len(keys) != 1 || keys[0].Used {
		t.Fatalf("the VM's key = %+v, want one, unused", keys)
	}

	// Nothing half-made: delete and purge leave no domain, no record, no usable key.
	c.ok("vm", "delete", id)
	c.ok("vm", "purge", id)
	if _, err := hvtest.Virsh(t, "domstate", id); err == nil {
		t.Error("domain still defined after purge")
	}
	if got := c.ok("vm", "all", "--deleted"); strings.Contains(got, id) {
		t.Errorf("vm all --deleted after purge = %q", got)
	}
	if keys := networkKeys(t, hs, "tag:threes-lab"); len(keys) != 1 || keys[0].Expiration.After(time.Now()) {
		t.Errorf("the VM's key after purge = %+v, want it expired", keys)
	}
}
