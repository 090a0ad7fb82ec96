package appliance_test

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/threes-dev/threes/appliance/fleet"
	"github.com/threes-dev/threes/appliance/threestest"
	"github.com/threes-dev/threes/hv"
	"github.com/threes-dev/threes/hv/hvtest"
	"github.com/threes-dev/threes/netboot/ipam"
	threesv1 "github.com/threes-dev/threes/proto/threes/v1"
	"github.com/threes-dev/threes/tsauth/control/headscaletest"
	"github.com/threes-dev/threes/tsauth/tailnettest"
)

// threesBinary builds threes with the threes_testhooks tag, the only build whose
// Create obeys THREES_TEST_CRASH_AT (see fleet's crashhook.go): a release binary
// has no way to be made to exit halfway.
func threesBinary(t *testing.T) string {
	t.Helper()
	bin := filepath.Join(t.TempDir(), "threes")
	if out, err := exec.Command("go", "build", "-tags", "threes_testhooks", "-o", bin, "github.com/threes-dev/threes/cmd/threes").CombinedOutput(); err != nil {
		t.Fatalf("build threes: %v\n%s", err, out)
	}
	return bin
}

// server is a `threes serve` process on a state dir.
type server struct {
	t      *testing.T
	cmd    *exec.Cmd
	exited chan struct{}
	err    error // from Wait, once exited is closed
	log    *lockedBuffer
	api    threesv1.ThreesClient
}

// crashRig starts `threes serve` on one state dir, again and again, with the test
// driver in the machine's libvirtd and a control server of the test's.
type crashRig struct {
	bin, dir, host, control string
	network                 string   // the network VMs are created on
	args                    []string // more flags for serve
	env                     []string // more environment for serve
	// witness sees the domains and disks of the appliance's owner, and holds a
	// connection to the test driver open so its domains outlive the process.
	witness *hv.Libvirt
}

func newCrashRig(t *testing.T, bin, control string) *crashRig {
	t.Helper()
	b := make([]byte, 4)
	rand.Read(b)
	r := &crashRig{bin: bin, dir: t.TempDir(), host: "crash-" + hex.EncodeToString(b), control: control, network: "lab"}
	threestest.SeedImages(t, r.dir, "base")
	// serve names its hypervisor's owner after its hostname and keeps disks in its
	// state dir; the witness looks at exactly those, and sweeps them at the end.
	r.witness = hvtest.OpenSwept(t, hv.Config{URI: hvtest.URI, Socket: hvtest.Socket,
		Owner: "threes/" + r.host, DiskDir: filepath.Join(r.dir, "disks")})
	return r
}

// start runs serve, with the crash hook at step unless it is empty, and waits until
// its socket answers.
func (r *crashRig) start(t *testing.T, step string) *server {
	t.Helper()
	sock := filepath.Join(r.dir, "threes.sock")
	args := append([]string{"serve", "--state-dir", r.dir, "--socket", sock, "--hostname", r.host,
		"--libvirt-uri", hvtest.URI, "--control-url", r.control, "--log-level", "debug"}, r.args...)
	s := &server{t: t, cmd: exec.Command(r.bin, args...), exited: make(chan struct{}), log: &lockedBuffer{}}
	s.cmd.Env = append(os.Environ(), "TS_NO_LOGS_NO_SUPPORT=true", "TS_DISABLE_PORTMAPPER=1", "THREES_TEST_CRASH_AT="+step)
	s.cmd.Env = append(s.cmd.Env, r.env...)
	s.cmd.Stdout, s.cmd.Stderr = s.log, s.log
	if err := s.cmd.Start(); err != nil {
		t.Fatalf("start threes serve: %v", err)
	}
	go func() {
		s.err = s.cmd.Wait()
		close(s.exited)
	}()
	t.Cleanup(func() {
		// Only the process started here, by its PID.
		s.cmd.Process.Kill()
		<-s.exited
		if t.Failed() {
			t.Logf("threes serve (crash at %q) log:\n%s", step, s.log)
		}
	})

	conn, err := grpc.NewClient("unix:"+sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	s.api = threesv1.NewThreesClient(conn)
	deadline := time.Now().Add(time.Minute)
	for {
		select {
		case <-s.exited:
			t.Fatalf("threes serve exited before serving: %v", s.err)
		default:
		}
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		_, err := s.api.WhoAmI(ctx, &threesv1.WhoAmIRequest{})
		cancel()
		if err == nil {
			return s
		}
		if time.Now().After(deadline) {
			t.Fatalf("threes serve not answering on %s: %v", sock, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// wait waits for the process to end by itself and returns its exit code.
func (s *server) wait() int {
	s.t.Helper()
	select {
	case <-s.exited:
	case <-time.After(time.Minute):
		s.t.Fatal("threes serve did not exit")
	}
	var ee *exec.ExitError
	if errors.As(s.err, &ee) {
		return ee.ExitCode()
	}
	if s.err != nil {
		s.t.Fatalf("threes serve: %v", s.err)
	}
	return 0
}

// stop ends the process as an operator would, and waits for it.
func (s *server) stop() {
	s.t.Helper()
	s.cmd.Process.Signal(syscall.SIGTERM)
	if code := s.wait(); code != 0 {
		s.t.Fatalf("threes serve exited %d after SIGTERM", code)
	}
}

// firstAddress is the address a new appliance gives its first VM: the one the crashed
// create had, when it got as far as reserving one.
func firstAddress(t *testing.T) string {
	pool, err := ipam.New(ipam.Config{Prefix: netip.MustParsePrefix("10.10.0.0/16")}, nil)
	if err != nil {
		t.Fatal(err)
	}
	a, err := pool.Reserve(net.HardwareAddr{0x52, 0x54, 0, 0, 0, 1}, "x")
	if err != nil {
		t.Fatal(err)
	}
	return a.IP.String()
}

// TestCreateCrash kills the appliance (a real `threes serve` process) at the end of
// each step of a create, starts it again on the same state dir, and checks that the
// VM exists whole or not at all: no record, domain, disk file or address left of a
// VM that is not there, and a VM that is there has all of them. With headscale it also
// checks that a half-created VM's tailnet key is revoked.
func TestCreateCrash(t *testing.T) {
	bin := threesBinary(t)
	if _, err := os.Stat(hvtest.Socket); err != nil {
		hvtest.Skip(t, "no libvirtd socket (%v)", err)
	}
	t.Run("tailnet", func(t *testing.T) {
		tn := tailnettest.Start(t)
		for _, step := range fleet.CreateSteps() {
			if step == "key-minted" {
				continue // no control plane here to mint keys: the headscale cases do
			}
			t.Run(step, func(t *testing.T) {
				crashCreate(t, newCrashRig(t, bin, tn.ControlURL), step)
			})
		}
	})
	t.Run("headscale", func(t *testing.T) {
		hs := headscaletest.Start(t)
		hs.SetPolicy(t, operatorPolicy)
		for i, step := range []string{"key-minted", "record-written", "domain-created"} {
			t.Run(step, func(t *testing.T) {
				r := newCrashRig(t, bin, hs.URL)
				r.args = []string{"--headscale"}
				r.env = []string{"HEADSCALE_API_KEY=" + hs.APIKey}
				// One headscale for all: each case its own network, so its own keys.
				r.network = fmt.Sprintf("lab%d", i)
				crashCreate(t, r, step)
				keys := networkKeys(t, hs, "tag:threes-"+r.network)
				for _, k := range keys {
					if k.Used {
						t.Errorf("key %s used: no VM ever joined", k.ID)
					}
				}
				if step == "key-minted" {
					// The process died before the record that holds the key: the
					// key was never handed out, and is single-use, so it is left
					// to expire on its own (control.Plane cannot list keys).
					if len(keys) != 2 {
						t.Errorf("keys = %+v, want the crashed create's and the one after", keys)
					}
					return
				}
				// The half-created VM's key was revoked before the create after it
				// minted its own.
				if len(keys) != 2 || !keys[0].Expiration.Before(keys[1].Expiration) || keys[0].Expiration.After(time.Now()) {
					t.Errorf("keys = %+v, want the crashed create's revoked", keys)
				}
			})
		}
	})
}

// crashCreate runs one create on r that the hook kills at step, restarts the
// appliance, and checks what is left.
func crashCreate(t *testing.T, r *crashRig, step string) {
	ctx := ctxT(t)
	s := r.start(t, step)
	must[*threesv1.Network](t)(s.api.CreateNetwork(ctx, &threesv1.NetworkRequest{Name: r.network}))
	req := &threesv1.CreateRequest{Name: "victim", Network: r.network, Image: "base", Type: threesv1.VMType_VM_TYPE_TEENY,
		Kvs: []*threesv1.KV{{Key: "role", Value: "web"}}}
	if vm, err := s.api.Create(ctx, req); err == nil {
		t.Fatalf("create returned %v although the process should have died at %s", vm, step)
	}
	if code := s.wait(); code != fleet.CrashExitCode {
		t.Fatalf("threes serve exited %d, want %d from the hook at %s", code, fleet.CrashExitCode, step)
	}
	if !strings.Contains(s.log.String(), "step="+step) {
		t.Fatalf("the hook did not report step %s", step)
	}

	s = r.start(t, "")
	// Reconcile cleans up behind the serving appliance: judge what it left.
	waitPass(t, s.log)
	vms := all(t, ctx, s.api, true)
	doms := must[[]hv.Domain](t)(r.witness.List(ctx))
	disks := must[[]string](t)(r.witness.Disks(ctx))
	files, err := os.ReadDir(filepath.Join(r.dir, "disks"))
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, f := range files {
		names = append(names, f.Name())
	}

	if step != "state-running" {
		// Not there at all.
		if len(vms) != 0 || len(doms) != 0 || len(disks) != 0 || len(names) != 0 {
			t.Fatalf("after a crash at %s: vms %v, domains %v, disks %v, disk dir %v; want none", step, vms, doms, disks, names)
		}
		// Its name and address are free: the same create gets both.
		again := must[*threesv1.VM](t)(s.api.Create(ctx, req))
		if want := firstAddress(t); again.GetManagementIp() != want {
			t.Errorf("create after the crash got %s, want %s, the crashed create's, free again", again.GetManagementIp(), want)
		}
		if doms := must[[]hv.Domain](t)(r.witness.List(ctx)); len(doms) != 1 || doms[0].ID != again.GetId() || doms[0].State != hv.StateRunning {
			t.Errorf("domains after the create = %v", doms)
		}
		s.stop()
		return
	}

	// There whole: record, domain, disk, key/values and address.
	if len(vms) != 1 || vms[0].GetName() != "victim" || vms[0].GetState() != threesv1.VMState_VM_STATE_RUNNING {
		t.Fatalf("after a crash at %s: vms %v; want victim, running", step, vms)
	}
	id := vms[0].GetId()
	if len(doms) != 1 || doms[0].ID != id || doms[0].State != hv.StateRunning {
		t.Errorf("domains = %v, want %s running", doms, id)
	}
	if !slices.Equal(disks, []string{id}) || !slices.Equal(names, []string{id + ".qcow2"}) {
		t.Errorf("disks = %v, disk dir %v; want %s's disk only", disks, names, id)
	}
	if kvs := must[*threesv1.KVs](t)(s.api.GetKVs(ctx, &threesv1.VMRef{Id: id})); kvMap(kvs)["role"] != "web" {
		t.Errorf("key/values = %v", kvs)
	}
	if vms[0].GetManagementIp() != firstAddress(t) {
		t.Errorf("address = %s, want %s", vms[0].GetManagementIp(), firstAddress(t))
	}
	other := must[*threesv1.VM](t)(s.api.Create(ctx, &threesv1.CreateRequest{Name: "after", Network: r.network, Image: "base", Type: threesv1.VMType_VM_TYPE_TEENY}))
	if other.GetManagementIp() == vms[0].GetManagementIp() {
		t.Errorf("address %s handed out twice", other.GetManagementIp())
	}
	s.stop()
}
