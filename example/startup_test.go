// Package example holds what the README offers users to copy; the tests run
// it for real.
package example

import (
	"bytes"
	"compress/gzip"
	"context"
	"fmt"
	"io"
	"io/fs"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"

	"github.com/threes-dev/threes/hv/hvtest"
	"github.com/threes-dev/threes/internal/netnstest"
	"github.com/threes-dev/threes/netboot/ipam"
	"github.com/threes-dev/threes/netboot/metadata"
)

const pubKey = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIExampleExampleExampleExampleExampleExample user@laptop"

// source is the one VM the metadata server knows.
type source struct{ inst metadata.Instance }

func (s source) ByIP(context.Context, netip.Addr) (metadata.Instance, error) { return s.inst, nil }
func (s source) TakeAuthKey(context.Context, string) (string, error) {
	return "", metadata.ErrAuthKeyTaken
}

// TestStartup runs example/startup as root at a VM's first boot would: in a
// chroot of the test image's busybox userland (so it cannot touch the
// host's users), in a VM's network namespace whose default route is the
// gateway where threes' metadata server runs. It must create the user with
// the VM's SSH key in ~/.ssh/authorized_keys, modes sshd accepts, no
// password, a sudo rule; a second run changes nothing, and a VM without a
// key gets no user and a failure.
func TestStartup(t *testing.T) {
	netnstest.Require(t, "chroot")
	img := hvtest.TestImageDir(t)

	// busybox wget cannot PUT for a session token (a server that requires
	// sessions needs curl in the image), so the server here requires none.
	for _, tc := range []struct{ name string }{{"busybox"}} {
		t.Run(tc.name, func(t *testing.T) {
			root := t.TempDir()
			unpackInitrd(t, filepath.Join(img, "initrd.img"), root)
			for name, body := range map[string]string{
				"etc/passwd": "root:x:0:0:root:/root:/bin/sh\n",
				"etc/group":  "root:x:0:\n",
				"etc/shadow": "root:*:19000:0:99999:7:::\n",
			} {
				write(t, filepath.Join(root, name), body, 0o644)
			}
			for _, d := range []string{"home", "root", "tmp", "etc/sudoers.d"} {
				if err := os.MkdirAll(filepath.Join(root, d), 0o755); err != nil {
					t.Fatal(err)
				}
			}
			script, err := os.ReadFile("startup")
			if err != nil {
				t.Fatal(err)
			}
			write(t, filepath.Join(root, "startup"), string(script), 0o755)

			vm := serve(t, metadata.Instance{ID: "vm-1", Hostname: "toy0", PublicKey: pubKey})
			run := func() string {
				t.Helper()
				cmd := vm.Command("chroot", root, "/bin/sh", "/startup")
				cmd.Env = []string{"PATH=/bin:/sbin:/usr/bin:/usr/sbin"}
				out, err := cmd.CombinedOutput()
				if err != nil {
					t.Fatalf("example/startup: %v\n%s", err, out)
				}
				return string(out)
			}
			out := run()
			if !strings.Contains(out, "created user threes") {
				t.Errorf("output:\n%s", out)
			}
			checkUser(t, root)
			before := snapshot(t, root)
			run()
			if after := snapshot(t, root); after != before {
				t.Errorf("a second run changed things:\n%s\nthen\n%s", before, after)
			}
		})
	}

	t.Run("no key", func(t *testing.T) {
		root := t.TempDir()
		unpackInitrd(t, filepath.Join(img, "initrd.img"), root)
		write(t, filepath.Join(root, "etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n", 0o644)
		script, _ := os.ReadFile("startup")
		write(t, filepath.Join(root, "startup"), string(script), 0o755)
		vm := serve(t, metadata.Instance{ID: "vm-1", Hostname: "toy0"})
		cmd := vm.Command("chroot", root, "/bin/sh", "/startup")
		cmd.Env = []string{"PATH=/bin:/sbin:/usr/bin:/usr/sbin"}
		out, err := cmd.CombinedOutput()
		if err == nil || !strings.Contains(string(out), "no SSH key") {
			t.Errorf("without a key: %v\n%s", err, out)
		}
		if b, _ := os.ReadFile(filepath.Join(root, "etc/passwd")); strings.Contains(string(b), "threes:") {
			t.Errorf("user created without a key:\n%s", b)
		}
	})
}

// checkUser holds the chroot to what sshd needs for the key to work.
func checkUser(t *testing.T, root string) {
	t.Helper()
	var uid, gid int
	passwd, _ := os.ReadFile(filepath.Join(root, "etc/passwd"))
	for _, l := range strings.Split(string(passwd), "\n") {
		f := strings.Split(l, ":")
		if f[0] == "threes" && len(f) == 7 {
			uid, _ = strconv.Atoi(f[2])
			gid, _ = strconv.Atoi(f[3])
			if f[5] != "/home/threes" || uid == 0 {
				t.Errorf("passwd entry %q, want a user with home /home/threes", l)
			}
		}
	}
	if uid == 0 {
		t.Fatalf("no user threes in /etc/passwd:\n%s", passwd)
	}
	shadow, _ := os.ReadFile(filepath.Join(root, "etc/shadow"))
	for _, l := range strings.Split(string(shadow), "\n") {
		if f := strings.Split(l, ":"); f[0] == "threes" && (len(f) < 2 || f[1] == "") {
			t.Errorf("user threes has an empty password: %q", l)
		}
	}
	for _, c := range []struct {
		path string
		mode fs.FileMode
	}{
		{"home/threes", 0},
		{"home/threes/.ssh", fs.ModeDir | 0o700},
		{"home/threes/.ssh/authorized_keys", 0o600},
	} {
		st, err := os.Lstat(filepath.Join(root, c.path))
		if err != nil {
			t.Fatal(err)
		}
		sys := st.Sys().(*syscall.Stat_t)
		if int(sys.Uid) != uid || int(sys.Gid) != gid || (c.mode != 0 && st.Mode() != c.mode) {
			t.Errorf("%s: %v owned by %d:%d, want %v owned by threes (%d:%d)", c.path, st.Mode(), sys.Uid, sys.Gid, c.mode, uid, gid)
		}
		if c.mode == 0 && st.Mode().Perm()&0o022 != 0 {
			t.Errorf("%s: %v, writable by others (sshd refuses the key)", c.path, st.Mode())
		}
	}
	if b, _ := os.ReadFile(filepath.Join(root, "home/threes/.ssh/authorized_keys")); string(b) != pubKey+"\n" {
		t.Errorf("authorized_keys = %q, want the VM's key", b)
	}
	sudo := filepath.Join(root, "etc/sudoers.d/90-threes-threes")
	if b, err := os.ReadFile(sudo); err != nil || string(b) != "threes ALL=(ALL) NOPASSWD:ALL\n" {
		t.Errorf("sudoers drop-in: %q, %v", b, err)
	} else if st, _ := os.Stat(sudo); st.Mode().Perm() != 0o440 {
		t.Errorf("sudoers drop-in mode %v, want 0440", st.Mode())
	}
}

// snapshot describes the files a run writes, to show a second run is a no-op.
func snapshot(t *testing.T, root string) string {
	t.Helper()
	var b strings.Builder
	for _, p := range []string{"etc/passwd", "etc/group", "etc/shadow", "home/threes/.ssh/authorized_keys", "etc/sudoers.d/90-threes-threes"} {
		data, err := os.ReadFile(filepath.Join(root, p))
		st, _ := os.Stat(filepath.Join(root, p))
		fmt.Fprintf(&b, "%s %v %v %q\n", p, err, st.Mode(), data)
	}
	return b.String()
}

// serve runs threes' metadata server for inst on a bridge's gateway,
// 10.10.0.1:80, and returns a VM namespace plugged into the bridge whose
// default route is the gateway.
func serve(t *testing.T, inst metadata.Instance) *netnstest.NS {
	t.Helper()
	srv := netnstest.NewNS(t, "ex")
	srv.Bridge(t, "br0", "10.10.0.1/16")
	mac := net.HardwareAddr{0x52, 0x54, 0x00, 0x00, 0x0e, 0x01}
	ip := netip.MustParseAddr("10.10.0.5")
	im, err := ipam.New(ipam.Config{}, []ipam.Allocation{{MAC: mac, Hostname: inst.Hostname, IP: ip}})
	if err != nil {
		t.Fatal(err)
	}
	md, err := metadata.New(metadata.Config{Source: source{inst}, IPAM: im})
	if err != nil {
		t.Fatal(err)
	}
	var ln net.Listener
	if err := srv.Do(func() (err error) {
		ln, err = net.Listen("tcp4", "10.10.0.1:80")
		return err
	}); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); md.Serve(ctx, ln) }()
	t.Cleanup(func() { cancel(); <-done })
	vm := srv.Plug(t, "br0", "vm", mac, ip.String()+"/16")
	vm.Run(t, "ip", "route", "add", "default", "via", "10.10.0.1")
	return vm
}

func write(t *testing.T, path, body string, mode fs.FileMode) {
	t.Helper()
	if err := os.WriteFile(path, []byte(body), mode); err != nil {
		t.Fatal(err)
	}
}

// unpackInitrd unpacks the test image's gzipped newc cpio archive (the
// format scripts/mkimage writes) into dir: directories, files and symlinks.
func unpackInitrd(t *testing.T, path, dir string) {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	zr, err := gzip.NewReader(f)
	if err != nil {
		t.Fatal(err)
	}
	data, err := io.ReadAll(zr)
	if err != nil {
		t.Fatal(err)
	}
	pad := func(n int) int { return (n + 3) &^ 3 }
	for off := 0; ; {
		if off+110 > len(data) || !bytes.Equal(data[off:off+6], []byte("070701")) {
			t.Fatalf("%s: no newc header at %d", path, off)
		}
		field := func(i int) int {
			v, err := strconv.ParseUint(string(data[off+6+8*i:off+14+8*i]), 16, 32)
			if err != nil {
				t.Fatalf("%s: header at %d: %v", path, off, err)
			}
			return int(v)
		}
		mode, size, nameLen := field(1), field(6), field(11)
		name := string(data[off+110 : off+110+nameLen-1])
		body := pad(off + 110 + nameLen)
		content := data[body : body+size]
		off = pad(body + size)
		if name == "TRAILER!!!" {
			return
		}
		target := filepath.Join(dir, filepath.Clean("/"+name))
		switch mode & syscall.S_IFMT {
		case syscall.S_IFDIR:
			err = os.MkdirAll(target, fs.FileMode(mode&0o777))
		case syscall.S_IFLNK:
			err = os.Symlink(string(content), target)
		case syscall.S_IFREG:
			err = os.WriteFile(target, content, fs.FileMode(mode&0o777))
		}
		if err != nil {
			t.Fatalf("%s: %s: %v", path, name, err)
		}
	}
}
