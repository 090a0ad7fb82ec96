// Package images owns the base images VMs boot from: a directory of
// imported, checked, read-only files and a manifest per image.
//
// There are two kinds. A disk image is one disk (qcow2 or raw) that boots
// with its own bootloader. A kernel image is a kernel, an initrd and a
// kernel command line, optionally with a root disk; QEMU loads the kernel
// directly, which boots much faster. Every file is checked before it is
// accepted (qemu-img info and check for disks, the Linux boot header for
// kernels), copied into the store, and made read-only: VMs' disks are
// copy-on-write overlays on these files and must never change them.
//
// The store does not know which VMs use an image: the appliance's database
// does, and it refuses to delete an image in use before calling Delete. It
// does not create VMs' disks either; package hv does.
package images

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"syscall"
	"time"

	"github.com/threes-dev/threes/internal/qemuimg"
)

// Kind says how an image boots.
type Kind string

const (
	// KindDisk is a disk that boots with its own bootloader.
	KindDisk Kind = "disk"
	// KindKernel is a kernel and initrd that QEMU boots directly,
	// optionally with a root disk.
	KindKernel Kind = "kernel"
)

// Image is one imported image. Its paths are absolute and inside the store.
type Image struct {
	// Name is the image's unique name.
	Name string `json:"name"`
	// Kind says how the image boots.
	Kind Kind `json:"kind"`
	// Disk is the base disk file; empty for a kernel image without a
	// root disk.
	Disk string `json:"disk,omitempty"`
	// DiskFormat is Disk's format, "qcow2" or "raw".
	DiskFormat string `json:"disk_format,omitempty"`
	// DiskBytes is Disk's virtual size: the smallest disk a VM of this
	// image can have.
	DiskBytes int64 `json:"disk_bytes,omitempty"`
	// Kernel is the kernel file of a kernel image.
	Kernel string `json:"kernel,omitempty"`
	// Initrd is the initrd file of a kernel image; may be empty.
	Initrd string `json:"initrd,omitempty"`
	// Cmdline is the kernel command line of a kernel image.
	Cmdline string `json:"cmdline,omitempty"`
	// ImportedAt is when the image was imported.
	ImportedAt time.Time `json:"imported_at"`
}

// Source names the files to import as one image. Disk alone makes a disk
// image; Kernel (with Initrd, Cmdline and optionally Disk) makes a kernel
// image.
type Source struct {
	// Disk is a qcow2 or raw disk image file.
	Disk string
	// Kernel is a Linux kernel (bzImage) file.
	Kernel string
	// Initrd is an initrd file to go with Kernel.
	Initrd string
	// Cmdline is the kernel command line to go with Kernel.
	Cmdline string
}

var (
	// ErrNotFound means no image has the given name.
	ErrNotFound = errors.New("image not found")
	// ErrExists means an image with the given name already exists.
	ErrExists = errors.New("image already exists")
	// ErrInvalidName means a name cannot name an image.
	ErrInvalidName = errors.New("invalid image name")
	// ErrBadImage means a file to import is not an acceptable image:
	// missing, of another format, corrupt, or depending on other files.
	ErrBadImage = errors.New("bad image")
)

// Store keeps images in one directory, one subdirectory per image. It is
// safe for concurrent use, also by several processes: every change is a
// rename of a whole image directory.
type Store struct {
	dir string
}

const (
	manifestName = "image.json"
	// Hidden names cannot clash with image names, which start with a
	// letter or digit, and List skips them.
	tmpPrefix = ".import-"
	delPrefix = ".delete-"
	// UploadPrefix starts the directories an upload is received into before
	// Import checks it (appliance.ImportImage); Open removes what a crash left.
	UploadPrefix = ".upload-"
)

// Open returns the store in dir, creating dir if needed. Images it holds
// are readable by everyone (mode 0444 files in 0755 directories) because
// QEMU runs as its own user; dir's parents must let that user through.
func Open(dir string) (*Store, error) {
	if !filepath.IsAbs(dir) {
		return nil, fmt.Errorf("image store %q: not an absolute path", dir)
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, fmt.Errorf("image store %s: %w", dir, err)
	}
	s := &Store{dir: filepath.Clean(dir)}
	// Leftovers of imports and deletes that were interrupted.
	ents, err := os.ReadDir(s.dir)
	if err != nil {
		return nil, fmt.Errorf("image store %s: %w", dir, err)
	}
	for _, e := range ents {
		if strings.HasPrefix(e.Name(), tmpPrefix) || strings.HasPrefix(e.Name(), delPrefix) || strings.HasPrefix(e.Name(), UploadPrefix) {
			if err := os.RemoveAll(filepath.Join(s.dir, e.Name())); err != nil {
				return nil, fmt.Errorf("image store %s: remove leftover: %w", dir, err)
			}
		}
	}
	return s, nil
}

// Dir returns the store's directory.
func (s *Store) Dir() string { return s.dir }

var nameRE = regexp.MustCompile(`^[a-z0-9][a-z0-9._-]{0,62}$`)

// ValidateName reports whether name can name an image: 1 to 63 lower-case
// letters, digits, dots, dashes and underscores, starting with a letter or
// digit.
func ValidateName(name string) error {
	if !nameRE.MatchString(name) {
		return fmt.Errorf("%w %q: want 1-63 of a-z 0-9 . _ - starting with a letter or digit", ErrInvalidName, name)
	}
	return nil
}

// Import checks src's files, copies them into the store as image name and
// returns the image. It fails with ErrExists if name is taken and with
// ErrBadImage, naming the file, if a file is not acceptable; it leaves
// nothing behind when it fails.
func (s *Store) Import(ctx context.Context, name string, src Source) (Image, error) {
	img, err := s.importImage(ctx, name, src)
	if err != nil {
		return Image{}, fmt.Errorf("import image %s: %w", name, err)
	}
	return img, nil
}

func (s *Store) importImage(ctx context.Context, name string, src Source) (img Image, err error) {
	if err := ValidateName(name); err != nil {
		return img, err
	}
	img = Image{Name: name, Kind: KindDisk, ImportedAt: time.Now().UTC().Truncate(time.Second)}
	switch {
	case src.Kernel != "":
		img.Kind = KindKernel
		img.Cmdline = src.Cmdline
		if strings.ContainsAny(src.Cmdline, "\x00\n") {
			return img, fmt.Errorf("%w: kernel command line has a NUL or newline", ErrBadImage)
		}
	case src.Disk == "":
		return img, fmt.Errorf("%w: no disk and no kernel given", ErrBadImage)
	case src.Initrd != "" || src.Cmdline != "":
		return img, fmt.Errorf("%w: an initrd or command line needs a kernel", ErrBadImage)
	}
	if _, err := os.Lstat(filepath.Join(s.dir, name)); err == nil {
		return img, ErrExists
	}

	tmp, err := os.MkdirTemp(s.dir, tmpPrefix+name+"-")
	if err != nil {
		return img, err
	}
	defer func() {
		if err != nil {
			os.RemoveAll(tmp)
		}
	}()
	if err := os.Chmod(tmp, 0o755); err != nil {
		return img, err
	}
	final := filepath.Join(s.dir, name)

	if src.Disk != "" {
		// Probe the source for its format, then check the copy: what
		// the store keeps is exactly what was checked.
		format, err := probeFormat(ctx, src.Disk)
		if err != nil {
			return img, err
		}
		dst := filepath.Join(tmp, "disk."+format)
		if err := copyFile(ctx, src.Disk, dst); err != nil {
			return img, err
		}
		size, err := checkDisk(ctx, dst, src.Disk, format)
		if err != nil {
			return img, err
		}
		img.Disk, img.DiskFormat, img.DiskBytes = filepath.Join(final, "disk."+format), format, size
	}
	if src.Kernel != "" {
		if err := checkKernel(src.Kernel); err != nil {
			return img, err
		}
		if err := copyFile(ctx, src.Kernel, filepath.Join(tmp, "vmlinuz")); err != nil {
			return img, err
		}
		img.Kernel = filepath.Join(final, "vmlinuz")
		if src.Initrd != "" {
			if err := checkNonEmpty(src.Initrd); err != nil {
				return img, err
			}
			if err := copyFile(ctx, src.Initrd, filepath.Join(tmp, "initrd")); err != nil {
				return img, err
			}
			img.Initrd = filepath.Join(final, "initrd")
		}
	}
	man, err := json.MarshalIndent(img, "", "  ")
	if err != nil {
		return img, err
	}
	if err := os.WriteFile(filepath.Join(tmp, manifestName), append(man, '\n'), 0o444); err != nil {
		return img, err
	}
	if err := syncDir(tmp); err != nil {
		return img, err
	}
	// rename(2) onto an existing non-empty directory fails, so of two
	// concurrent imports of one name exactly one wins.
	if err := os.Rename(tmp, final); err != nil {
		if errors.Is(err, syscall.EEXIST) || errors.Is(err, syscall.ENOTEMPTY) {
			return img, ErrExists
		}
		return img, err
	}
	return img, syncDir(s.dir)
}

// Get returns the image named name.
func (s *Store) Get(name string) (Image, error) {
	if err := ValidateName(name); err != nil {
		return Image{}, fmt.Errorf("image %s: %w", name, err)
	}
	img, err := s.load(name)
	if err != nil {
		return Image{}, fmt.Errorf("image %s: %w", name, err)
	}
	return img, nil
}

func (s *Store) load(name string) (Image, error) {
	b, err := os.ReadFile(filepath.Join(s.dir, name, manifestName))
	if errors.Is(err, os.ErrNotExist) {
		return Image{}, ErrNotFound
	}
	if err != nil {
		return Image{}, err
	}
	var img Image
	if err := json.Unmarshal(b, &img); err != nil {
		return Image{}, fmt.Errorf("read manifest: %w", err)
	}
	// The store may have moved since the import: paths follow it.
	for _, p := range []*string{&img.Disk, &img.Kernel, &img.Initrd} {
		if *p != "" {
			*p = filepath.Join(s.dir, name, filepath.Base(*p))
		}
	}
	return img, nil
}

// List returns every image, sorted by name.
func (s *Store) List() ([]Image, error) {
	ents, err := os.ReadDir(s.dir)
	if err != nil {
		return nil, fmt.Errorf("list images in %s: %w", s.dir, err)
	}
	var out []Image
	for _, e := range ents {
		if !e.IsDir() || ValidateName(e.Name()) != nil {
			continue
		}
		img, err := s.load(e.Name())
		if errors.Is(err, ErrNotFound) {
			continue // deleted since ReadDir
		}
		if err != nil {
			return nil, fmt.Errorf("list images: image %s: %w", e.Name(), err)
		}
		out = append(out, img)
	}
	slices.SortFunc(out, func(a, b Image) int { return strings.Compare(a.Name, b.Name) })
	return out, nil
}

// Delete removes the image named name. VMs whose disks are overlays on it
// break: the caller must make sure none uses it.
func (s *Store) Delete(name string) error {
	if err := ValidateName(name); err != nil {
		return fmt.Errorf("delete image %s: %w", name, err)
	}
	dir := filepath.Join(s.dir, name)
	if _, err := os.Stat(filepath.Join(dir, manifestName)); errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("delete image %s: %w", name, ErrNotFound)
	}
	// Out of sight in one step, then removed at leisure.
	gone, err := os.MkdirTemp(s.dir, delPrefix+name+"-")
	if err != nil {
		return fmt.Errorf("delete image %s: %w", name, err)
	}
	if err := os.Rename(dir, filepath.Join(gone, name)); err != nil {
		os.Remove(gone)
		if errors.Is(err, os.ErrNotExist) {
			return fmt.Errorf("delete image %s: %w", name, ErrNotFound)
		}
		return fmt.Errorf("delete image %s: %w", name, err)
	}
	if err := os.RemoveAll(gone); err != nil {
		return fmt.Errorf("delete image %s: %w", name, err)
	}
	return nil
}

// qcow2Magic starts every qcow2 file.
var qcow2Magic = []byte{'Q', 'F', 'I', 0xfb}

// probeFormat returns file's format, which must be qcow2 or raw.
func probeFormat(ctx context.Context, file string) (string, error) {
	if err := checkNonEmpty(file); err != nil {
		return "", err
	}
	inf, err := qemuimg.ReadInfo(ctx, file, "")
	if err != nil {
		return "", fmt.Errorf("%w: disk %s: %w", ErrBadImage, file, err)
	}
	switch inf.Format {
	case "qcow2", "raw":
		return inf.Format, nil
	}
	return "", fmt.Errorf("%w: disk %s is %s, want qcow2 or raw", ErrBadImage, file, inf.Format)
}

// checkDisk checks the copy at file of the disk image src, which probed as
// format, and returns its virtual size.
func checkDisk(ctx context.Context, file, src, format string) (int64, error) {
	bad := func(format string, args ...any) error {
		return fmt.Errorf("%w: disk %s: "+format, append([]any{ErrBadImage, src}, args...)...)
	}
	inf, err := qemuimg.ReadInfo(ctx, file, format)
	if err != nil {
		return 0, bad("%w", err)
	}
	switch format {
	case "raw":
		head := make([]byte, len(qcow2Magic))
		f, err := os.Open(file)
		if err != nil {
			return 0, err
		}
		_, err = io.ReadFull(f, head)
		f.Close()
		// qemu-img falls back to raw for a qcow2 whose header it
		// cannot read.
		if err == nil && bytes.Equal(head, qcow2Magic) {
			return 0, bad("has a qcow2 signature but no valid qcow2 header (corrupt qcow2)")
		}
		st, err := os.Stat(file)
		if err != nil {
			return 0, err
		}
		if st.Size()%512 != 0 {
			return 0, bad("raw image of %d bytes is not a whole number of 512-byte sectors", st.Size())
		}
	case "qcow2":
		switch {
		case inf.BackingFilename != "":
			return 0, bad("has a backing file %q; import a standalone image (qemu-img convert)", inf.BackingFilename)
		case inf.FormatSpecific.Data.DataFile != "":
			return 0, bad("has an external data file %q", inf.FormatSpecific.Data.DataFile)
		case inf.Encrypted:
			return 0, bad("is encrypted")
		case inf.FormatSpecific.Data.Corrupt:
			return 0, bad("is marked corrupt")
		}
		// Exit status 3 means leaked clusters only: harmless.
		_, err := qemuimg.Run(ctx, "check", "-q", "-f", "qcow2", file)
		var ee *exec.ExitError
		if err != nil && !(errors.As(err, &ee) && ee.ExitCode() == 3) {
			return 0, bad("corrupt: %w", err)
		}
	}
	if inf.VirtualSize <= 0 {
		return 0, bad("virtual size %d", inf.VirtualSize)
	}
	return inf.VirtualSize, nil
}

// checkKernel checks that file is a Linux kernel QEMU can boot directly:
// it carries the x86 boot protocol's "HdrS" signature at offset 0x202.
func checkKernel(file string) error {
	if err := checkNonEmpty(file); err != nil {
		return err
	}
	f, err := os.Open(file)
	if err != nil {
		return fmt.Errorf("%w: kernel %s: %w", ErrBadImage, file, err)
	}
	defer f.Close()
	sig := make([]byte, 4)
	if _, err := f.ReadAt(sig, 0x202); err != nil || string(sig) != "HdrS" {
		return fmt.Errorf("%w: kernel %s is not a Linux bzImage (no boot header)", ErrBadImage, file)
	}
	return nil
}

// checkNonEmpty checks that file is a non-empty regular file.
func checkNonEmpty(file string) error {
	st, err := os.Stat(file)
	switch {
	case err != nil:
		return fmt.Errorf("%w: %w", ErrBadImage, err)
	case !st.Mode().IsRegular():
		return fmt.Errorf("%w: %s is not a regular file", ErrBadImage, file)
	case st.Size() == 0:
		return fmt.Errorf("%w: %s is empty", ErrBadImage, file)
	}
	return nil
}

// copyFile copies src to a new read-only file dst and syncs it; a source that
// cannot be read is a bad image.
func copyFile(ctx context.Context, src, dst string) error {
	if _, err := os.Stat(src); err != nil {
		return fmt.Errorf("%w: %w", ErrBadImage, err)
	}
	return qemuimg.CopyFile(ctx, src, dst, 0o444)
}

// syncDir makes a rename in dir durable.
func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}
