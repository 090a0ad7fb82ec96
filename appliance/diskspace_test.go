package appliance_test

import (
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/threes-dev/threes/appliance"
	"github.com/threes-dev/threes/appliance/threestest"
	"github.com/threes-dev/threes/hv"
	"github.com/threes-dev/threes/hv/hvtest"
	threesv1 "github.com/threes-dev/threes/proto/threes/v1"
)

// TestCreateRefusedWhenDiskFull: with the disk directory on a 64 MiB tmpfs and no
// overcommit, creating a teeny VM (5 GiB disk) fails with ResourceExhausted naming
// the sizes, and leaves no record, no domain and no disk behind; the network and the
// appliance keep working. Run under `unshare -m` so the mount stays private.
func TestCreateRefusedWhenDiskFull(t *testing.T) {
	if os.Geteuid() != 0 {
		hvtest.Skip(t, "mounting a tmpfs needs root")
	}
	mnt := t.TempDir()
	if err := syscall.Mount("tmpfs", mnt, "tmpfs", 0, "size=64m"); err != nil {
		hvtest.Skip(t, "mount tmpfs: %v", err)
	}
	t.Cleanup(func() { syscall.Unmount(mnt, syscall.MNT_DETACH) })
	dir := filepath.Join(mnt, "disks")
	h := hvtest.OpenConfig(t, hv.Config{DiskDir: dir, DiskOvercommit: 1, DiskReserve: 8 << 20})
	env := threestest.StartWith(t, func(o *appliance.Options) { o.Hypervisor = h })
	ctx := ctxT(t)
	c := env.Local(t)
	must[*threesv1.Network](t)(c.CreateNetwork(ctx, &threesv1.NetworkRequest{Name: "lab"}))

	_, err := c.Create(ctx, &threesv1.CreateRequest{Name: "big", Network: "lab", Image: "base", Type: threesv1.VMType_VM_TYPE_TEENY})
	st, _ := status.FromError(err)
	if st.Code() != codes.ResourceExhausted {
		t.Fatalf("Create on a full disk = %v, want ResourceExhausted", err)
	}
	for _, want := range []string{"big needs 5.0 GiB", dir, "free beyond its 8.0 MiB reserve"} {
		if !strings.Contains(st.Message(), want) {
			t.Errorf("error %q does not say %q", st.Message(), want)
		}
	}
	t.Logf("refused: %s", st.Message())

	if vms, err := env.Appliance.DB().ListVMs(ctx); err != nil || len(vms) != 0 {
		t.Errorf("records after the refused create: %v %v", vms, err)
	}
	if doms, err := h.List(ctx); err != nil || len(doms) != 0 {
		t.Errorf("domains after the refused create: %v %v", doms, err)
	}
	if ents, _ := os.ReadDir(dir); len(ents) != 0 {
		t.Errorf("files in the disk directory after the refused create: %v", ents)
	}
}
