package appliance_test

import (
	"context"
	"crypto/sha256"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/threes-dev/threes/appliance"
	"github.com/threes-dev/threes/hv"
	"github.com/threes-dev/threes/hv/hvtest"
	threesv1 "github.com/threes-dev/threes/proto/threes/v1"
	"github.com/threes-dev/threes/tsauth/tailnettest"
)

// TestBootOnQEMU: the appliance on real QEMU boots a VM from an image uploaded
// through the API; the VM gets its address from the appliance's DHCP and its
// hostname from the metadata server, its console comes back through the API, and
// each lifecycle step is checked with virsh and qemu-img as independent witnesses.
func TestBootOnQEMU(t *testing.T) {
	imgDir := hvtest.TestImageDir(t)
	q := hvtest.OpenQEMU(t, hv.Config{StopTimeout: 2 * time.Minute})
	// The gateway address on the bridge, in a range of this test's own.
	if out, err := exec.Command("ip", "addr", "add", "10.77.0.1/24", "dev", q.Bridge).CombinedOutput(); err != nil {
		t.Fatalf("address the bridge: %v %s", err, out)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 8*time.Minute)
	defer cancel()
	a, err := appliance.Start(ctx, appliance.Options{
		StateDir:   q.Dir,
		ControlURL: tailnettest.Start(t).ControlURL,
		Socket:     filepath.Join(q.Dir, "threes.sock"),
		CIDR:       "10.77.0.0/24",
		Bridge:     q.Bridge,
		Hypervisor: q.H,
		Logger:     slog.New(slog.NewTextHandler(tWriter{t}, nil)),
		Ephemeral:  true,
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { a.Close() })
	conn, err := grpc.NewClient("unix:"+filepath.Join(q.Dir, "threes.sock"), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	c := threesv1.NewThreesClient(conn)

	// Upload the test image: a kernel, an initrd and a root disk.
	img := uploadImage(t, ctx, c, "bootimg", imgDir)
	if img.GetKind() != "kernel" || !img.GetHasInitrd() {
		t.Fatalf("imported image = %v", img)
	}
	baseDisk := filepath.Join(q.Dir, "images", "bootimg")
	baseSum := dirSum(t, baseDisk)

	must[*threesv1.Network](t)(c.CreateNetwork(ctx, &threesv1.NetworkRequest{Name: "lab"}))
	vm := must[*threesv1.VM](t)(c.Create(ctx, &threesv1.CreateRequest{Name: "boot1", Network: "lab", Image: "bootimg", Type: threesv1.VMType_VM_TYPE_TEENY}))
	con := hvtest.WatchConsole(t, apiConsole(t, ctx, c, vm.GetId()))
	con.WaitFor(t, "threes-test: ip "+vm.GetManagementIp(), 3*time.Minute)
	con.WaitFor(t, "threes-test: hostname boot1", time.Minute)
	// The VM's ID in the SMBIOS SKU, and the NoCloud seed (the metadata
	// server on the gateway) in the serial, as the guest reads them.
	con.WaitFor(t, "threes-test: id "+vm.GetId()+"\r\n", time.Second)
	con.WaitFor(t, "threes-test: serial ds=nocloud-net;s=http://10.77.0.1/cloud-init/\r\n", time.Second)
	con.WaitFor(t, "threes-test: ready", time.Minute)

	// virsh and qemu-img as witnesses: state, size per type, an overlay on the base.
	if st, _ := hvtest.Virsh(t, "domstate", vm.GetId()); st != "running" {
		t.Errorf("virsh domstate = %q", st)
	}
	info, _ := hvtest.Virsh(t, "dominfo", vm.GetId())
	if !regexp.MustCompile(`CPU\(s\):\s+1\n`).MatchString(info) || !regexp.MustCompile(`Max memory:\s+524288 KiB`).MatchString(info) {
		t.Errorf("dominfo for a teeny VM:\n%s", info)
	}
	disk := filepath.Join(q.Dir, "disks", vm.GetId()+".qcow2")
	out, err := exec.Command("qemu-img", "info", "--output=json", "-U", disk).CombinedOutput()
	if err != nil || !strings.Contains(string(out), `"backing-filename": "`+baseDisk) || !strings.Contains(string(out), `"virtual-size": 5368709120`) {
		t.Errorf("disk %s is not a 5 GiB overlay on the base image: %v\n%s", disk, err, out)
	}

	// Stop is graceful: the guest sees the power button and powers off.
	if s := must[*threesv1.VM](t)(c.Stop(ctx, &threesv1.VMRef{Id: vm.GetId()})).GetState(); s != threesv1.VMState_VM_STATE_STOPPED {
		t.Errorf("state after stop = %v", s)
	}
	con.WaitFor(t, "threes-test: power button", time.Second)
	if st, _ := hvtest.Virsh(t, "domstate", vm.GetId()); st != "shut off" {
		t.Errorf("virsh domstate after stop = %q", st)
	}

	// Start and restart boot it again.
	must[*threesv1.VM](t)(c.Start(ctx, &threesv1.VMRef{Id: vm.GetId()}))
	con = hvtest.WatchConsole(t, apiConsole(t, ctx, c, vm.GetId()))
	con.WaitFor(t, "threes-test: ready", 3*time.Minute)
	if st, _ := hvtest.Virsh(t, "domstate", vm.GetId()); st != "running" {
		t.Errorf("virsh domstate after start = %q", st)
	}

	// Delete keeps the disk until purge; purge removes domain and disk.
	must[*threesv1.VM](t)(c.Delete(ctx, &threesv1.VMRef{Id: vm.GetId()}))
	if _, err := os.Stat(disk); err != nil {
		t.Errorf("disk gone before purge: %v", err)
	}
	must[*threesv1.PurgeResponse](t)(c.Purge(ctx, &threesv1.PurgeRequest{}))
	if _, err := hvtest.Virsh(t, "domstate", vm.GetId()); err == nil {
		t.Error("domain still defined after purge")
	}
	if _, err := os.Stat(disk); !os.IsNotExist(err) {
		t.Errorf("disk after purge: %v", err)
	}
	if dirSum(t, baseDisk) != baseSum {
		t.Error("the base image changed")
	}
	must[any](t)(c.DeleteImage(ctx, &threesv1.ImageRef{Name: "bootimg"}))
}

// uploadImage imports the test image through the API, as `threes image import` does.
func uploadImage(t testing.TB, ctx context.Context, c threesv1.ThreesClient, name, dir string) *threesv1.Image {
	t.Helper()
	cmdline, err := os.ReadFile(filepath.Join(dir, "cmdline"))
	if err != nil {
		t.Fatal(err)
	}
	up, err := c.ImportImage(ctx)
	if err != nil {
		t.Fatal(err)
	}
	send := func(m *threesv1.ImageUpload) {
		if err := up.Send(m); err != nil {
			t.Fatal(err)
		}
	}
	send(&threesv1.ImageUpload{Msg: &threesv1.ImageUpload_Header{Header: &threesv1.ImageHeader{Name: name, Cmdline: strings.TrimSpace(string(cmdline))}}})
	for file, which := range map[string]threesv1.ImageFile{
		"vmlinuz": threesv1.ImageFile_IMAGE_FILE_KERNEL, "initrd.img": threesv1.ImageFile_IMAGE_FILE_INITRD, "disk.qcow2": threesv1.ImageFile_IMAGE_FILE_DISK,
	} {
		b, err := os.ReadFile(filepath.Join(dir, file))
		if err != nil {
			t.Fatal(err)
		}
		for len(b) > 0 {
			n := min(len(b), 1<<20)
			send(&threesv1.ImageUpload{Msg: &threesv1.ImageUpload_Part{Part: &threesv1.ImagePart{File: which, Data: b[:n]}}})
			b = b[n:]
		}
	}
	img, err := up.CloseAndRecv()
	if err != nil {
		t.Fatalf("import image: %v", err)
	}
	return img
}

// apiConsole opens the VM's console through the API as a ReadWriteCloser.
func apiConsole(t testing.TB, ctx context.Context, c threesv1.ThreesClient, id string) io.ReadWriteCloser {
	t.Helper()
	ctx, cancel := context.WithCancel(ctx)
	s, err := c.Console(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Send(&threesv1.ConsoleInput{VmId: id}); err != nil {
		t.Fatal(err)
	}
	return &streamRWC{s: s, cancel: cancel}
}

type streamRWC struct {
	s      grpc.BidiStreamingClient[threesv1.ConsoleInput, threesv1.ConsoleOutput]
	cancel context.CancelFunc
	rest   []byte
}

func (r *streamRWC) Read(p []byte) (int, error) {
	for len(r.rest) == 0 {
		m, err := r.s.Recv()
		if err != nil {
			return 0, err
		}
		r.rest = m.GetData()
	}
	n := copy(p, r.rest)
	r.rest = r.rest[n:]
	return n, nil
}

func (r *streamRWC) Write(p []byte) (int, error) {
	return len(p), r.s.Send(&threesv1.ConsoleInput{Data: p})
}

func (r *streamRWC) Close() error { r.cancel(); return nil }

// dirSum hashes every file under dir, to show a base image is never written.
func dirSum(t *testing.T, dir string) string {
	h := sha256.New()
	err := filepath.Walk(dir, func(p string, fi os.FileInfo, err error) error {
		if err != nil || fi.IsDir() {
			return err
		}
		b, err := os.ReadFile(p)
		fmt.Fprintf(h, "%s %d\n", p, len(b))
		h.Write(b)
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	return fmt.Sprintf("%x", h.Sum(nil))
}
