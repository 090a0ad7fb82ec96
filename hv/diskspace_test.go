package hv_test

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/threes-dev/threes/hv"
	"github.com/threes-dev/threes/hv/hvtest"
)

// Tmpfs mounts a tmpfs of size bytes on a new directory and unmounts it when
// the test ends: a small filesystem that really runs out. Run the test under
// `unshare -m` so a crash cannot leave the mount on the host.
func Tmpfs(t testing.TB, size string) string {
	t.Helper()
	if os.Geteuid() != 0 {
		hvtest.Skip(t, "mounting a tmpfs needs root")
	}
	dir := t.TempDir()
	if err := syscall.Mount("tmpfs", dir, "tmpfs", 0, "size="+size); err != nil {
		hvtest.Skip(t, "mount tmpfs: %v", err)
	}
	t.Cleanup(func() { syscall.Unmount(dir, syscall.MNT_DETACH) })
	return dir
}

// TestCreateRefusesFullDisk: on a 64 MiB filesystem, with no overcommit, a VM
// with a 1 GiB disk is refused with ErrNoSpace naming the numbers, leaving no
// domain and no file; with enough overcommit the same create goes through and
// the next VM's check counts what the first may still grow by.
func TestCreateRefusesFullDisk(t *testing.T) {
	ctx := context.Background()
	dir := filepath.Join(Tmpfs(t, "64m"), "disks")
	strict := hvtest.OpenConfig(t, hv.Config{DiskDir: dir, DiskOvercommit: 1, DiskReserve: 8 << 20})

	s := hvtest.Spec(t)
	s.DiskGiB = 1
	err := strict.Create(ctx, s)
	if !errors.Is(err, hv.ErrNoSpace) {
		t.Fatalf("Create on a 64 MiB disk dir = %v, want ErrNoSpace", err)
	}
	for _, want := range []string{"needs 1.0 GiB", dir, "8.0 MiB reserve", "--disk-overcommit"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q does not say %q", err, want)
		}
	}
	t.Logf("refused: %v", err)
	if doms, _ := strict.List(ctx); len(doms) != 0 {
		t.Errorf("refused create left domains %v", doms)
	}
	if ents, _ := os.ReadDir(dir); len(ents) != 0 {
		t.Errorf("refused create left files %v", ents)
	}

	// 1 GiB / 32 is 32 MiB: fits in 64 MiB less the 8 MiB reserve, once.
	loose := hvtest.OpenConfig(t, hv.Config{DiskDir: dir, DiskOvercommit: 32, DiskReserve: 8 << 20})
	if err := loose.Create(ctx, s); err != nil {
		t.Fatalf("Create with overcommit 32: %v", err)
	}
	s2 := hvtest.Spec(t)
	s2.DiskGiB = 1
	err = loose.Create(ctx, s2)
	if !errors.Is(err, hv.ErrNoSpace) || !strings.Contains(err.Error(), "the disks already there (1) may still grow by 1023") {
		t.Fatalf("second Create = %v, want ErrNoSpace counting the first disk's growth", err)
	}
}
