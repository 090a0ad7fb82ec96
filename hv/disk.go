package hv

import (
	"context"
	"crypto/rand"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"syscall"

	"github.com/threes-dev/threes/internal/qemuimg"
)

// diskSuffix ends every VM disk's file name; Disks reports the rest.
const diskSuffix = ".qcow2"

// owner is a uid and gid that QEMU runs as; nil means files stay root's.
type owner struct{ uid, gid int }

// diskPath returns where the disk of the VM id lives.
func (h *Libvirt) diskPath(id string) string {
	return filepath.Join(h.diskDir, id+diskSuffix)
}

// needsDisk reports whether s asks for a disk.
func needsDisk(s Spec) bool {
	return s.Image.Disk != "" || s.DiskGiB > 0
}

// createDisk makes the disk of the VM s (an overlay on its image's disk, or
// a blank one) owned by own, and returns its path and format. It fails with
// ErrExists if the VM already has a disk, and leaves nothing behind if it
// fails.
func (h *Libvirt) createDisk(ctx context.Context, s Spec, own *owner) (path, format string, err error) {
	if h.diskDir == "" {
		return "", "", fmt.Errorf("%w: the VM needs a disk but hv has no Config.DiskDir", ErrInvalidSpec)
	}
	final := h.diskPath(s.ID)
	h.diskMu.Lock()
	defer h.diskMu.Unlock()
	if err := h.checkSpace(s); err != nil {
		return "", "", err
	}
	// Built under a temporary name and linked into place: link(2) never
	// replaces a file, so of two Creates of one ID one gets ErrExists,
	// and a crash leaves at most a temporary file Open removes.
	rnd := make([]byte, 6)
	rand.Read(rnd)
	tmp := filepath.Join(h.diskDir, ".tmp-"+s.ID+"-"+hex.EncodeToString(rnd))
	defer os.Remove(tmp)

	img := s.Image
	format = "qcow2"
	size := ""
	if s.DiskGiB > 0 {
		size = fmt.Sprintf("%dG", s.DiskGiB)
	}
	switch {
	case img.Disk != "" && h.copyDisks:
		// What threes v0.1 did, kept for the benchmark to compare
		// against: a full copy of the base image.
		format = img.DiskFormat
		if err := qemuimg.CopyFile(ctx, img.Disk, tmp, 0o600); err != nil {
			return "", "", err
		}
		if size != "" {
			if _, err := qemuimg.Run(ctx, "resize", "-q", "-f", format, tmp, size); err != nil {
				return "", "", err
			}
		}
	case img.Disk != "":
		args := []string{"create", "-q", "-f", "qcow2", "-b", img.Disk, "-F", img.DiskFormat, tmp}
		if size != "" {
			args = append(args, size)
		}
		if _, err := qemuimg.Run(ctx, args...); err != nil {
			return "", "", fmt.Errorf("create overlay on %s (image %s): %w", img.Disk, img.Name, err)
		}
	default:
		if _, err := qemuimg.Run(ctx, "create", "-q", "-f", "qcow2", tmp, size); err != nil {
			return "", "", fmt.Errorf("create blank disk: %w", err)
		}
	}
	if own != nil {
		if err := os.Chown(tmp, own.uid, own.gid); err != nil {
			return "", "", fmt.Errorf("give disk to QEMU's user: %w", err)
		}
	}
	if err := os.Chmod(tmp, 0o600); err != nil {
		return "", "", err
	}
	if err := os.Link(tmp, final); err != nil {
		if errors.Is(err, os.ErrExist) {
			return "", "", fmt.Errorf("disk %s: %w", final, ErrExists)
		}
		return "", "", err
	}
	return final, format, nil
}

// ErrNoSpace means the disk directory cannot hold what a new VM's disk
// promises on top of what the others already do.
var ErrNoSpace = errors.New("not enough disk space")

// defaultReserve is what checkSpace keeps free when Config.DiskReserve is 0:
// room for the database (which shares the filesystem by default) to write.
const defaultReserve = 1 << 30

// checkSpace refuses the disk of s when the disk directory's filesystem
// cannot keep the promises made so far: disks are thin, so each may still
// grow to its virtual size. What they may still grow by, plus the new
// disk's size, divided by the overcommit ratio, must fit in the free space
// beyond the reserve. It is a no-op unless Config.DiskOvercommit is set.
func (h *Libvirt) checkSpace(s Spec) error {
	if h.overcommit <= 0 {
		return nil
	}
	reserve := h.reserve
	if reserve <= 0 {
		reserve = defaultReserve
	}
	need := int64(s.DiskGiB) << 30
	if need < s.Image.DiskBytes {
		need = s.Image.DiskBytes
	}
	var st syscall.Statfs_t
	if err := syscall.Statfs(h.diskDir, &st); err != nil {
		return fmt.Errorf("free space of %s: %w", h.diskDir, err)
	}
	free := int64(st.Bavail) * st.Bsize
	growth, n, err := diskGrowth(h.diskDir)
	if err != nil {
		return err
	}
	if float64(growth+need)/h.overcommit <= float64(free-reserve) {
		return nil
	}
	return fmt.Errorf("%w: vm %s needs %s for its disk, but %s has %s free beyond its %s reserve, "+
		"and the disks already there (%d) may still grow by %s (overcommit %g: serve --disk-overcommit)",
		ErrNoSpace, s.Name, gib(need), h.diskDir, gib(max(free-reserve, 0)), gib(reserve), n, gib(growth), h.overcommit)
}

// diskGrowth sums how much the files in dir may still grow: a qcow2 file up
// to the virtual size in its header, any other file not at all.
func diskGrowth(dir string) (growth int64, n int, err error) {
	ents, err := os.ReadDir(dir)
	if err != nil {
		return 0, 0, fmt.Errorf("list disks in %s: %w", dir, err)
	}
	for _, e := range ents {
		if !e.Type().IsRegular() {
			continue
		}
		p := filepath.Join(dir, e.Name())
		var st syscall.Stat_t
		if err := syscall.Stat(p, &st); err != nil {
			continue // removed meanwhile
		}
		n++
		if v := qcow2Size(p); v > st.Blocks*512 {
			growth += v - st.Blocks*512
		}
	}
	return growth, n, nil
}

// qcow2Size reads the virtual size from a qcow2 header (big-endian at
// byte 24, after the magic QFI\xfb); 0 if p is not qcow2. Reading 32 bytes
// per disk keeps the check cheap with thousands of VMs, where qemu-img info
// would start a process for each.
func qcow2Size(p string) int64 {
	f, err := os.Open(p)
	if err != nil {
		return 0
	}
	defer f.Close()
	var hdr [32]byte
	if _, err := io.ReadFull(f, hdr[:]); err != nil || string(hdr[:4]) != "QFI\xfb" {
		return 0
	}
	return int64(binary.BigEndian.Uint64(hdr[24:]))
}

// gib formats a byte count for an error a person reads.
func gib(n int64) string {
	if n < 1<<30 {
		return fmt.Sprintf("%.1f MiB", float64(n)/(1<<20))
	}
	return fmt.Sprintf("%.1f GiB", float64(n)/(1<<30))
}

// removeDisk deletes the disk of the VM id and reports whether there was one.
func (h *Libvirt) removeDisk(id string) (bool, error) {
	if h.diskDir == "" {
		return false, nil
	}
	err := os.Remove(h.diskPath(id))
	switch {
	case errors.Is(err, os.ErrNotExist):
		return false, nil
	case err != nil:
		return false, fmt.Errorf("remove disk: %w", err)
	}
	return true, nil
}

// noDisk fails with ErrExists if the VM id has a disk: a Spec without one
// must not make a domain beside a disk left by another (Remove would take
// the disk with it).
func (h *Libvirt) noDisk(id string) error {
	if h.diskDir == "" {
		return nil
	}
	p := h.diskPath(id)
	if _, err := os.Lstat(p); err == nil {
		return fmt.Errorf("disk %s: %w", p, ErrExists)
	}
	return nil
}

// Disks reports the IDs that have a disk; see Hypervisor.
func (h *Libvirt) Disks(ctx context.Context) ([]string, error) {
	if h.diskDir == "" {
		return nil, nil
	}
	ents, err := os.ReadDir(h.diskDir)
	if err != nil {
		return nil, fmt.Errorf("list disks in %s: %w", h.diskDir, err)
	}
	var ids []string
	for _, e := range ents {
		name := e.Name()
		if e.Type().IsRegular() && !strings.HasPrefix(name, ".") && strings.HasSuffix(name, diskSuffix) {
			ids = append(ids, strings.TrimSuffix(name, diskSuffix))
		}
	}
	return ids, nil
}

// prepareDiskDir creates dir if needed and removes temporary files that a
// crash during Create left.
func prepareDiskDir(dir string) error {
	if !filepath.IsAbs(dir) {
		return fmt.Errorf("disk directory %q: not an absolute path", dir)
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return fmt.Errorf("disk directory %s: %w", dir, err)
	}
	ents, err := os.ReadDir(dir)
	if err != nil {
		return fmt.Errorf("disk directory %s: %w", dir, err)
	}
	for _, e := range ents {
		if strings.HasPrefix(e.Name(), ".tmp-") {
			os.Remove(filepath.Join(dir, e.Name()))
		}
	}
	return nil
}

// reachable checks that QEMU running as own can get to file: every
// directory above it must let others through, or belong to own. libvirt's
// own error for this ("Permission denied" from QEMU) does not say which
// directory is in the way.
func reachable(file string, own *owner) error {
	if own == nil || own.uid == 0 {
		return nil
	}
	for dir := filepath.Dir(file); ; dir = filepath.Dir(dir) {
		st, err := os.Stat(dir)
		if err != nil {
			return err
		}
		mode := st.Mode().Perm()
		sys, _ := st.Sys().(*syscall.Stat_t)
		ok := mode&0o001 != 0 ||
			(sys != nil && int(sys.Uid) == own.uid && mode&0o100 != 0) ||
			(sys != nil && int(sys.Gid) == own.gid && mode&0o010 != 0)
		if !ok {
			return fmt.Errorf("QEMU runs as uid %d and cannot reach %s: directory %s has mode %04o (give others x, e.g. chmod o+x)",
				own.uid, file, dir, mode)
		}
		if dir == "/" || dir == "." {
			return nil
		}
	}
}
