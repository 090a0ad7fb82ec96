package images_test

import (
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/threes-dev/threes/hv/images"
)

// needQemuImg skips the test without qemu-img, or fails it when CI=true.
func needQemuImg(t *testing.T) {
	t.Helper()
	for _, bin := range []string{"qemu-img", "qemu-io"} {
		if _, err := exec.LookPath(bin); err != nil {
			if os.Getenv("CI") == "true" {
				t.Fatalf("CI=true but %s is missing (Debian package qemu-utils): %v", bin, err)
			}
			t.Skipf("%s is missing (Debian package qemu-utils): %v", bin, err)
		}
	}
}

func run(t *testing.T, name string, args ...string) {
	t.Helper()
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
}

// files makes the inputs the tests import, good and bad, in a directory.
func files(t *testing.T) string {
	t.Helper()
	needQemuImg(t)
	d := t.TempDir()
	p := func(n string) string { return filepath.Join(d, n) }
	run(t, "qemu-img", "create", "-q", "-f", "qcow2", p("good.qcow2"), "64M")
	run(t, "qemu-io", "-f", "qcow2", "-c", "write -P 0x61 0 1M", p("good.qcow2"))
	must(t, os.WriteFile(p("good.raw"), make([]byte, 1<<20), 0o600))
	run(t, "qemu-img", "create", "-q", "-f", "vmdk", p("disk.vmdk"), "16M")
	run(t, "qemu-img", "create", "-q", "-f", "qcow2", "-b", p("good.raw"), "-F", "raw", p("backed.qcow2"))
	// A qcow2 cut short: the header is fine, the tables point past the end.
	b, err := os.ReadFile(p("good.qcow2"))
	must(t, err)
	must(t, os.WriteFile(p("truncated.qcow2"), b[:len(b)/2], 0o600))
	// A qcow2 signature on garbage: qemu-img probes it as raw.
	must(t, os.WriteFile(p("badheader.qcow2"), append([]byte("QFI\xfb"), make([]byte, 4092)...), 0o600))
	must(t, os.WriteFile(p("notes.txt"), []byte("not a disk\n"), 0o600))
	must(t, os.WriteFile(p("empty"), nil, 0o600))
	kernel := make([]byte, 4096)
	copy(kernel[0x202:], "HdrS")
	must(t, os.WriteFile(p("vmlinuz"), kernel, 0o600))
	must(t, os.WriteFile(p("initrd"), []byte("initrd"), 0o600))
	return d
}

func must(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

func openStore(t *testing.T) *images.Store {
	t.Helper()
	s, err := images.Open(filepath.Join(t.TempDir(), "images"))
	must(t, err)
	return s
}

func TestImportDisk(t *testing.T) {
	t.Parallel()
	in := files(t)
	s := openStore(t)
	ctx := context.Background()
	for _, tt := range []struct{ file, format string }{{"good.qcow2", "qcow2"}, {"good.raw", "raw"}} {
		name := strings.ReplaceAll(tt.file, ".", "-")
		img, err := s.Import(ctx, name, images.Source{Disk: filepath.Join(in, tt.file)})
		must(t, err)
		if img.Kind != images.KindDisk || img.DiskFormat != tt.format || img.Kernel != "" {
			t.Errorf("%s: imported %+v, want a %s disk image", tt.file, img, tt.format)
		}
		if want := map[string]int64{"qcow2": 64 << 20, "raw": 1 << 20}[tt.format]; img.DiskBytes != want {
			t.Errorf("%s: virtual size %d, want %d", tt.file, img.DiskBytes, want)
		}
		if filepath.Dir(filepath.Dir(img.Disk)) != s.Dir() {
			t.Errorf("%s: disk %s is not inside the store %s", tt.file, img.Disk, s.Dir())
		}
		st, err := os.Stat(img.Disk)
		must(t, err)
		if st.Mode().Perm() != 0o444 {
			t.Errorf("%s: stored disk mode %v, want read-only 0444", tt.file, st.Mode())
		}
		a, _ := os.ReadFile(filepath.Join(in, tt.file))
		b, _ := os.ReadFile(img.Disk)
		if string(a) != string(b) {
			t.Errorf("%s: stored copy differs from the source", tt.file)
		}
		got, err := s.Get(name)
		must(t, err)
		if got != img {
			t.Errorf("Get(%s) = %+v, want %+v", name, got, img)
		}
	}
	list, err := s.List()
	must(t, err)
	if len(list) != 2 || list[0].Name != "good-qcow2" || list[1].Name != "good-raw" {
		t.Errorf("List = %+v, want good-qcow2 and good-raw", list)
	}
}

func TestImportKernel(t *testing.T) {
	t.Parallel()
	in := files(t)
	s := openStore(t)
	src := images.Source{
		Kernel:  filepath.Join(in, "vmlinuz"),
		Initrd:  filepath.Join(in, "initrd"),
		Cmdline: "console=ttyS0",
		Disk:    filepath.Join(in, "good.qcow2"),
	}
	img, err := s.Import(context.Background(), "tiny", src)
	must(t, err)
	if img.Kind != images.KindKernel || img.Cmdline != "console=ttyS0" || img.DiskFormat != "qcow2" {
		t.Errorf("imported %+v, want a kernel image with a qcow2 root disk", img)
	}
	for _, f := range []string{img.Kernel, img.Initrd, img.Disk} {
		if st, err := os.Stat(f); err != nil || st.Mode().Perm() != 0o444 {
			t.Errorf("stored file %s: %v, %v; want mode 0444", f, st.Mode(), err)
		}
	}

	src.Disk = ""
	img, err = s.Import(context.Background(), "tiny-nodisk", src)
	must(t, err)
	if img.Disk != "" || img.Kernel == "" {
		t.Errorf("imported %+v, want a kernel image without disk", img)
	}
}

func TestImportRejects(t *testing.T) {
	t.Parallel()
	in := files(t)
	s := openStore(t)
	p := func(n string) string { return filepath.Join(in, n) }
	tests := []struct {
		name string
		src  images.Source
		want string // in the error, besides the file's name
	}{
		{"missing", images.Source{Disk: p("nonexistent.qcow2")}, "no such file"},
		{"empty", images.Source{Disk: p("empty")}, "empty"},
		{"vmdk", images.Source{Disk: p("disk.vmdk")}, "is vmdk, want qcow2 or raw"},
		{"backing file", images.Source{Disk: p("backed.qcow2")}, "backing file"},
		{"truncated qcow2", images.Source{Disk: p("truncated.qcow2")}, "corrupt"},
		{"qcow2 signature on garbage", images.Source{Disk: p("badheader.qcow2")}, "corrupt qcow2"},
		{"text file", images.Source{Disk: p("notes.txt")}, "512-byte sectors"},
		{"not a kernel", images.Source{Kernel: p("good.raw")}, "not a Linux bzImage"},
		{"missing initrd", images.Source{Kernel: p("vmlinuz"), Initrd: p("nonexistent")}, "no such file"},
		{"initrd without kernel", images.Source{Disk: p("good.qcow2"), Initrd: p("initrd")}, "needs a kernel"},
		{"nothing", images.Source{}, "no disk and no kernel"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := s.Import(context.Background(), "x", tt.src)
			file := tt.src.Disk + tt.src.Kernel
			if tt.src.Initrd != "" && tt.src.Disk == "" {
				file = tt.src.Initrd
			}
			if !errors.Is(err, images.ErrBadImage) || !strings.Contains(err.Error(), tt.want) ||
				(file != "" && tt.name != "initrd without kernel" && !strings.Contains(err.Error(), file)) {
				t.Errorf("Import: %v; want ErrBadImage containing %q and the file's name %s", err, tt.want, file)
			}
		})
	}
	// Nothing was left behind by any of them.
	ents, err := os.ReadDir(s.Dir())
	must(t, err)
	if len(ents) != 0 {
		t.Errorf("store holds %v after failed imports, want nothing", ents)
	}
}

func TestNames(t *testing.T) {
	t.Parallel()
	in := files(t)
	s := openStore(t)
	ctx := context.Background()
	src := images.Source{Disk: filepath.Join(in, "good.raw")}
	for _, bad := range []string{"", ".hidden", "a/b", "..", "UPPER", "x y", strings.Repeat("a", 64), "-dash"} {
		if _, err := s.Import(ctx, bad, src); !errors.Is(err, images.ErrInvalidName) {
			t.Errorf("Import(%q): %v, want ErrInvalidName", bad, err)
		}
		if _, err := s.Get(bad); !errors.Is(err, images.ErrInvalidName) {
			t.Errorf("Get(%q): %v, want ErrInvalidName", bad, err)
		}
	}
	if _, err := s.Import(ctx, "debian-12.1_x", src); err != nil {
		t.Errorf("Import(debian-12.1_x): %v", err)
	}
}

func TestExistsAndDelete(t *testing.T) {
	t.Parallel()
	in := files(t)
	s := openStore(t)
	ctx := context.Background()
	src := images.Source{Disk: filepath.Join(in, "good.qcow2")}

	// Of concurrent imports of one name, exactly one wins.
	const n = 4
	errs := make([]error, n)
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() { _, errs[i] = s.Import(ctx, "base", src) })
	}
	wg.Wait()
	won := 0
	for _, err := range errs {
		switch {
		case err == nil:
			won++
		case !errors.Is(err, images.ErrExists):
			t.Errorf("concurrent Import: %v, want nil or ErrExists", err)
		}
	}
	if won != 1 {
		t.Errorf("%d of %d concurrent imports succeeded, want 1", won, n)
	}

	img, err := s.Get("base")
	must(t, err)
	must(t, s.Delete("base"))
	if _, err := os.Stat(img.Disk); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("disk %s after Delete: %v, want gone", img.Disk, err)
	}
	if _, err := s.Get("base"); !errors.Is(err, images.ErrNotFound) {
		t.Errorf("Get after Delete: %v, want ErrNotFound", err)
	}
	if err := s.Delete("base"); !errors.Is(err, images.ErrNotFound) {
		t.Errorf("second Delete: %v, want ErrNotFound", err)
	}
	ents, err := os.ReadDir(s.Dir())
	must(t, err)
	if len(ents) != 0 {
		t.Errorf("store holds %v after Delete, want nothing", ents)
	}
	// The name is free again.
	if _, err := s.Import(ctx, "base", src); err != nil {
		t.Errorf("Import after Delete: %v", err)
	}
}

func TestOpenRemovesLeftovers(t *testing.T) {
	t.Parallel()
	dir := filepath.Join(t.TempDir(), "images")
	must(t, os.MkdirAll(filepath.Join(dir, ".import-x-123"), 0o755))
	must(t, os.WriteFile(filepath.Join(dir, ".import-x-123", "disk.raw"), []byte("x"), 0o444))
	must(t, os.MkdirAll(filepath.Join(dir, ".delete-y-456", "y"), 0o755))
	// An upload the server was receiving when it crashed.
	must(t, os.MkdirAll(filepath.Join(dir, images.UploadPrefix+"789"), 0o755))
	must(t, os.WriteFile(filepath.Join(dir, images.UploadPrefix+"789", "disk"), []byte("half an image"), 0o600))
	s, err := images.Open(dir)
	must(t, err)
	ents, err := os.ReadDir(s.Dir())
	must(t, err)
	if len(ents) != 0 {
		t.Errorf("store holds %v after Open, want the leftovers gone", ents)
	}
	if _, err := images.Open("relative/dir"); err == nil {
		t.Error("Open of a relative directory succeeded")
	}
}
