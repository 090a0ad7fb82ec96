package hv_test

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/vishvananda/netlink"

	"github.com/threes-dev/threes/hv"
	"github.com/threes-dev/threes/hv/hvtest"
	"github.com/threes-dev/threes/hv/images"
)

// bootTimeout bounds a TCG boot to the test image's shell, which takes a
// few seconds alone and much longer on a machine busy with other builds.
const bootTimeout = 3 * time.Minute

// fileState is what must not change about a base image's file.
type fileState struct {
	sum       string
	uid, gid  uint32
	mode      os.FileMode
	writeable bool
}

func stateOfFile(t *testing.T, path string) fileState {
	t.Helper()
	b, err := os.ReadFile(path)
	must(t, err)
	st, err := os.Stat(path)
	must(t, err)
	sys := st.Sys().(*syscall.Stat_t)
	sum := sha256.Sum256(b)
	return fileState{sum: hex.EncodeToString(sum[:]), uid: sys.Uid, gid: sys.Gid, mode: st.Mode()}
}

// baseFiles returns the files of img that VMs share.
func baseFiles(img images.Image) []string {
	return []string{img.Disk, img.Kernel, img.Initrd}
}

func snapshotBase(t *testing.T, img images.Image) map[string]fileState {
	t.Helper()
	m := map[string]fileState{}
	for _, f := range baseFiles(img) {
		m[f] = stateOfFile(t, f)
	}
	return m
}

// checkBase fails the test if a base file's content, owner or mode changed.
func checkBase(t *testing.T, img images.Image, before map[string]fileState) {
	t.Helper()
	for _, f := range baseFiles(img) {
		if now := stateOfFile(t, f); now != before[f] {
			t.Errorf("base file %s changed: %+v, was %+v", f, now, before[f])
		}
	}
}

// virshState is `virsh domstate --reason`, e.g. "running (booted)".
func virshState(t *testing.T, id string) string {
	t.Helper()
	out, err := hvtest.Virsh(t, "domstate", "--reason", id)
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// virshInfo returns `virsh dominfo` as a map.
func virshInfo(t *testing.T, id string) map[string]string {
	t.Helper()
	out, err := hvtest.Virsh(t, "dominfo", id)
	if err != nil {
		t.Fatal(err)
	}
	m := map[string]string{}
	for line := range strings.Lines(out) {
		k, v, ok := strings.Cut(line, ":")
		if ok {
			m[strings.TrimSpace(k)] = strings.TrimSpace(v)
		}
	}
	return m
}

// qemuImgInfo is `qemu-img info` of a file in use (-U).
func qemuImgInfo(t *testing.T, path string) map[string]any {
	t.Helper()
	out, err := exec.Command("qemu-img", "info", "-U", "--output=json", path).CombinedOutput()
	if err != nil {
		t.Fatalf("qemu-img info %s: %v\n%s", path, err, out)
	}
	var m map[string]any
	must(t, json.Unmarshal(out, &m))
	return m
}

// nextEvent waits for the next event about id, skipping others.
func nextEvent(t *testing.T, events <-chan hv.Event, id string, want hv.State, reason string) {
	t.Helper()
	deadline := time.NewTimer(time.Minute)
	defer deadline.Stop()
	var seen []hv.Event
	for {
		select {
		case ev, ok := <-events:
			if !ok {
				t.Fatalf("events channel closed waiting for %s %s; saw %+v", want, reason, seen)
			}
			if ev.ID != id {
				continue
			}
			seen = append(seen, ev)
			if ev.State == want && (reason == "" || ev.Reason == reason) {
				return
			}
		case <-deadline.C:
			t.Fatalf("no event %s (%s) for %s within a minute; saw %+v", want, reason, id, seen)
		}
	}
}

// TestQEMU boots one VM from the test image under QEMU and takes it through
// its life, each step checked with virsh as a witness: create (vCPUs,
// memory, disk an overlay on the untouched base, its tap guarded by its
// own nftables rules, its ID in SMBIOS as the guest sees it), console both
// ways, the guard dropping a spoofed IP and MAC, graceful
// stop through ACPI, start, restart and remove, with events for each.
func TestQEMU(t *testing.T) {
	q := hvtest.OpenQEMU(t, hv.Config{StopTimeout: 2 * time.Minute})
	h := q.H
	top := t // consoles live across subtests
	ctx := context.Background()

	// Detection tried KVM for real: a host whose KVM is PVM-only
	// (kvm_pvm) offers KVM but cannot boot a normal guest with it.
	acc, err := h.Accel(ctx)
	must(t, err)
	t.Logf("accelerator: %s (%s)", acc.DomainType, acc.Reason)
	if acc.Reason == "" || (acc.DomainType != "kvm" && acc.DomainType != "qemu") {
		t.Errorf("Accel = %+v, want kvm or qemu with a reason", acc)
	}
	_, noKVM := os.Stat("/dev/kvm")
	if noKVM != nil && acc.DomainType == "kvm" {
		t.Errorf("Accel = %+v without /dev/kvm", acc)
	}
	// Some hosts of this kind load kvm_pvm but give the VM no /dev/kvm at all:
	// then there is nothing to probe, and TCG is chosen without a probe.
	if _, err := os.Stat("/sys/module/kvm_pvm"); err == nil && noKVM == nil {
		if acc.DomainType != "qemu" || !strings.Contains(acc.Reason, "probe guest did not boot") {
			t.Errorf("Accel = %+v on a PVM-only host, want qemu after a failed probe", acc)
		}
	}

	evctx, cancel := context.WithCancel(ctx)
	defer cancel()
	events, err := h.Events(evctx)
	must(t, err)

	s := q.Spec(t)
	s.VCPUs, s.MemoryMiB, s.DiskGiB, s.IP = 2, 320, 1, netip.MustParseAddr("10.10.7.9")
	s.NoCloud = &url.URL{Scheme: "http", Host: "10.10.0.1", Path: "/cloud-init/"}
	before := snapshotBase(t, q.Image)
	overlay := filepath.Join(q.Dir, "disks", s.ID+".qcow2")

	must(t, h.Create(ctx, s))
	con, err := h.Console(ctx, s.ID)
	must(t, err)
	c := hvtest.WatchConsole(t, con)

	t.Run("create", func(t *testing.T) {
		if got := virshState(t, s.ID); got != "running (booted)" {
			t.Errorf("virsh domstate = %q, want running (booted)", got)
		}
		info := virshInfo(t, s.ID)
		if info["CPU(s)"] != "2" || info["Max memory"] != "327680 KiB" {
			t.Errorf("virsh dominfo: CPU(s) %q, Max memory %q; want 2 and 327680 KiB", info["CPU(s)"], info["Max memory"])
		}
		xml, err := hvtest.Virsh(t, "dumpxml", s.ID)
		must(t, err)
		if !strings.Contains(xml, "<domain type='"+acc.DomainType+"'") {
			t.Errorf("domain type is not %s:\n%s", acc.DomainType, xml)
		}
		// The NIC's tap has a name of ours, and its rules hold the
		// VM to its MAC and IP (what they do is shown below).
		m := regexp.MustCompile(`<target dev='(t3[a-z0-9]{13})'/>`).FindStringSubmatch(xml)
		if m == nil || strings.Contains(xml, "<filterref") {
			t.Fatalf("NIC has no tap of ours, or has a libvirt filter:\n%s", xml)
		}
		rules, err := exec.Command("nft", "list", "ruleset", "bridge").CombinedOutput()
		if err != nil || !strings.Contains(string(rules), `"`+m[1]+`" : goto vm_`+m[1]) ||
			!strings.Contains(string(rules), "ip saddr != 10.10.7.9 counter") ||
			!strings.Contains(string(rules), "ether saddr != "+s.MAC.String()+" counter") {
			t.Errorf("nft list ruleset bridge: %v, no rules for tap %s with MAC %s and IP 10.10.7.9:\n%s", err, m[1], s.MAC, rules)
		}
		blk, err := hvtest.Virsh(t, "domblklist", s.ID)
		must(t, err)
		if !strings.Contains(blk, overlay) {
			t.Errorf("virsh domblklist = %q, want the overlay %s", blk, overlay)
		}
		inf := qemuImgInfo(t, overlay)
		if inf["format"] != "qcow2" || inf["backing-filename"] != q.Image.Disk ||
			inf["backing-filename-format"] != "qcow2" || inf["virtual-size"] != float64(1<<30) {
			t.Errorf("qemu-img info of the disk: %v; want a 1 GiB qcow2 overlay on %s", inf, q.Image.Disk)
		}
		if st, err := os.Stat(overlay); err != nil || st.Size() > 4<<20 {
			t.Errorf("disk %s: %v bytes, %v; want a small overlay, not a copy", overlay, st.Size(), err)
		}
		// Running, the base files are still root's and read-only:
		// libvirt relabelled nothing.
		checkBase(t, q.Image, before)
		nextEvent(t, events, s.ID, hv.StateRunning, "booted")
	})

	t.Run("console", func(t *testing.T) {
		// The boot as the guest saw it: its kernel, our command line
		// with the NoCloud seed, its ID from the SMBIOS SKU (which any
		// user may read), the seed in the SMBIOS serial, and the shell.
		c.WaitFor(t, "Linux version", bootTimeout)
		c.WaitFor(t, "ds=nocloud-net;s=http://10.10.0.1/cloud-init/ threes.dhcp=off", bootTimeout)
		c.WaitFor(t, "threes-test: id "+s.ID+"\r\n", bootTimeout)
		c.WaitFor(t, "threes-test: serial ds=nocloud-net;s=http://10.10.0.1/cloud-init/\r\n", bootTimeout)
		c.WaitFor(t, "threes-test: ready", bootTimeout)
		// The SKU is readable by every user (the serial is root's).
		c.Write(t, "stat -c threes-mode-%a-%n /sys/class/dmi/id/product_sku /sys/class/dmi/id/product_serial\n")
		c.WaitFor(t, "threes-mode-444-/sys/class/dmi/id/product_sku", bootTimeout)
		c.WaitFor(t, "threes-mode-400-/sys/class/dmi/id/product_serial", bootTimeout)
		// Input reaches the guest's shell: it computes the answer.
		c.Write(t, "echo threes-$((6*7))\n")
		c.WaitFor(t, "threes-42", bootTimeout)
	})

	t.Run("console shared", func(t *testing.T) {
		// A second session shares the console: both read what it
		// types (TestQEMUConsoleReplay shows more).
		cctx, cancel := context.WithCancel(ctx)
		con, err := h.Console(cctx, s.ID)
		must(t, err)
		second := hvtest.WatchConsole(t, con)
		second.Write(t, "echo threes-$((5*5))\n")
		second.WaitFor(t, "threes-25", bootTimeout)
		c.WaitFor(t, "threes-25", bootTimeout)
		// Its context ending ends it alone.
		cancel()
		t.Logf("second session ended: %v", second.Ended(t, time.Minute))
	})

	t.Run("anti-spoofing", func(t *testing.T) {
		// The tap's rules let the VM talk from its own MAC and IP
		// only. The test talks to it from the bridge, so only where
		// nothing can leave this network namespace (scripts/testenv).
		isolated(t)
		must(t, netlink.AddrAdd(mustLink(t, q.Bridge), &netlink.Addr{IPNet: &net.IPNet{
			IP: net.IPv4(10, 10, 0, 1), Mask: net.CIDRMask(16, 32)}}))
		ping := func(n int, setup string) string {
			t.Helper()
			// The guest works out the marker's number and the rc, so
			// the shell's echo of the command line cannot match.
			c.Write(t, fmt.Sprintf("%s; ping -c 1 -W 3 10.10.0.1 >/dev/null; r=$?; echo threes-ping$((%d))-rc$r\n", setup, n))
			return c.WaitForMatch(t, regexp.MustCompile(fmt.Sprintf(`threes-ping%d-rc(\d+)`, n)), bootTimeout)[1]
		}
		if rc := ping(1, "ifconfig eth0 10.10.7.9 netmask 255.255.0.0 up"); rc != "0" {
			t.Fatalf("ping from the VM's own IP and MAC: exit status %s, want 0", rc)
		}
		if rc := ping(2, "ifconfig eth0 10.10.7.10"); rc == "0" {
			t.Errorf("ping from a spoofed IP got through")
		}
		if rc := ping(3, "ifconfig eth0 down; ifconfig eth0 hw ether 52:54:00:de:ad:01; ifconfig eth0 10.10.7.9 up"); rc == "0" {
			t.Errorf("ping from a spoofed MAC got through")
		}
	})

	t.Run("stop", func(t *testing.T) {
		must(t, h.Stop(ctx, s.ID))
		// Graceful: the guest saw the power button and powered off.
		if got := virshState(t, s.ID); got != "shut off (shutdown)" {
			t.Errorf("virsh domstate = %q, want shut off (shutdown)", got)
		}
		c.WaitFor(t, "threes-test: power button", time.Minute)
		if err := c.Ended(t, time.Minute); !errors.Is(err, io.EOF) {
			t.Errorf("console ended with %v, want EOF", err)
		}
		nextEvent(t, events, s.ID, hv.StateStopped, "shutdown")
		if _, err := os.Stat(overlay); err != nil {
			t.Errorf("disk after Stop: %v, want kept", err)
		}
		if _, err := h.Console(ctx, s.ID); !errors.Is(err, hv.ErrNotRunning) {
			t.Errorf("Console of a stopped domain: %v, want ErrNotRunning", err)
		}
	})

	var bootID string
	t.Run("start", func(t *testing.T) {
		must(t, h.Start(ctx, s.ID))
		con, err := h.Console(ctx, s.ID)
		must(t, err)
		c = hvtest.WatchConsole(top, con)
		if got := virshState(t, s.ID); got != "running (booted)" {
			t.Errorf("virsh domstate = %q, want running (booted)", got)
		}
		nextEvent(t, events, s.ID, hv.StateRunning, "booted")
		bootID, err = hvtest.Virsh(t, "domid", s.ID)
		must(t, err)
		c.WaitFor(t, "threes-test: ready", bootTimeout)
	})

	t.Run("restart", func(t *testing.T) {
		must(t, h.Restart(ctx, s.ID))
		c.WaitFor(t, "threes-test: power button", time.Minute)
		nextEvent(t, events, s.ID, hv.StateStopped, "shutdown")
		nextEvent(t, events, s.ID, hv.StateRunning, "booted")
		id, err := hvtest.Virsh(t, "domid", s.ID)
		must(t, err)
		if got := virshState(t, s.ID); got != "running (booted)" || id == bootID {
			t.Errorf("virsh: %q as domain id %s; want running (booted) with an id other than %s", got, id, bootID)
		}
		con, err := h.Console(ctx, s.ID)
		must(t, err)
		c = hvtest.WatchConsole(top, con)
		// Input before the shell runs is lost: wait for it.
		c.WaitFor(t, "threes-test: ready", bootTimeout)
		c.Write(t, "echo threes-$((7*8))\n")
		c.WaitFor(t, "threes-56", bootTimeout)
	})

	t.Run("remove", func(t *testing.T) {
		must(t, h.Remove(ctx, s.ID))
		if out, err := hvtest.Virsh(t, "domstate", s.ID); err == nil {
			t.Errorf("virsh domstate after Remove = %q, want no domain", out)
		}
		if _, err := os.Stat(overlay); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("disk after Remove: %v, want gone", err)
		}
		nextEvent(t, events, s.ID, hv.StateMissing, "undefined")
		checkBase(t, q.Image, before)
		if err := h.Remove(ctx, s.ID); !errors.Is(err, hv.ErrNotFound) {
			t.Errorf("second Remove: %v, want ErrNotFound", err)
		}
	})
}

// isolated skips the test (fails it under CI=true) unless nothing can leave
// this network namespace: it has no default route.
func isolated(t *testing.T) {
	t.Helper()
	routes, err := netlink.RouteList(nil, netlink.FAMILY_ALL)
	must(t, err)
	for _, r := range routes {
		if r.Dst == nil || r.Dst.IP.IsUnspecified() {
			hvtest.Skip(t, "this network namespace has a default route (%v): run under scripts/testenv", r)
		}
	}
}

func mustLink(t *testing.T, name string) netlink.Link {
	t.Helper()
	l, err := netlink.LinkByName(name)
	must(t, err)
	return l
}

// TestQEMUBadInput checks that a Create that cannot work fails clearly and
// leaves no domain and no disk: a missing bridge (discovered only when
// QEMU starts), a missing image file, and a base image corrupted after its
// import.
func TestQEMUBadInput(t *testing.T) {
	q := hvtest.OpenQEMU(t, hv.Config{DomainType: "qemu"})
	ctx := context.Background()
	noDomainNoDisk := func(t *testing.T, id string) {
		t.Helper()
		if out, err := hvtest.Virsh(t, "domstate", id); err == nil {
			t.Errorf("virsh domstate after a failed Create = %q, want no domain", out)
		}
		if ids, err := q.H.Disks(ctx); err != nil || len(ids) != 0 {
			t.Errorf("Disks after a failed Create = %v, %v; want none", ids, err)
		}
		ents, err := os.ReadDir(filepath.Join(q.Dir, "disks"))
		if err != nil || len(ents) != 0 {
			t.Errorf("disk directory after a failed Create holds %v, %v; want nothing", ents, err)
		}
	}

	t.Run("missing bridge", func(t *testing.T) {
		s := q.Spec(t)
		s.Bridge = "thr-nobr0"
		err := q.H.Create(ctx, s)
		if err == nil || !strings.Contains(err.Error(), s.ID) || !strings.Contains(err.Error(), "thr-nobr0") {
			t.Fatalf("Create: %v, want an error naming %s and the bridge", err, s.ID)
		}
		noDomainNoDisk(t, s.ID)
	})

	t.Run("missing image file", func(t *testing.T) {
		s := q.Spec(t)
		s.Image.Disk = filepath.Join(q.Dir, "nonexistent.qcow2")
		err := q.H.Create(ctx, s)
		if err == nil || !strings.Contains(err.Error(), s.Image.Disk) {
			t.Fatalf("Create: %v, want an error naming %s", err, s.Image.Disk)
		}
		noDomainNoDisk(t, s.ID)
	})

	t.Run("corrupt image", func(t *testing.T) {
		bad := filepath.Join(q.Dir, "corrupt.qcow2")
		must(t, os.WriteFile(bad, append([]byte("QFI\xfb\x00\x00\x00\x03"), make([]byte, 1024)...), 0o444))
		s := q.Spec(t)
		s.Image.Disk = bad
		err := q.H.Create(ctx, s)
		if err == nil || !strings.Contains(err.Error(), "corrupt.qcow2") {
			t.Fatalf("Create: %v, want an error naming corrupt.qcow2", err)
		}
		noDomainNoDisk(t, s.ID)
	})

	t.Run("unreachable image", func(t *testing.T) {
		// QEMU runs as its own user: a base image in a directory only
		// root can enter is refused before anything is made.
		hidden := filepath.Join(q.Dir, "private")
		must(t, os.Mkdir(hidden, 0o700))
		b, err := os.ReadFile(q.Image.Disk)
		must(t, err)
		must(t, os.WriteFile(filepath.Join(hidden, "disk.qcow2"), b, 0o444))
		s := q.Spec(t)
		s.Image.Disk = filepath.Join(hidden, "disk.qcow2")
		err = q.H.Create(ctx, s)
		if err == nil || !strings.Contains(err.Error(), hidden) {
			t.Fatalf("Create: %v, want an error naming %s", err, hidden)
		}
		noDomainNoDisk(t, s.ID)
	})

	t.Run("disk smaller than image", func(t *testing.T) {
		s := q.Spec(t)
		s.Image.DiskBytes = 3 << 30
		s.DiskGiB = 2
		if err := q.H.Create(ctx, s); !errors.Is(err, hv.ErrInvalidSpec) {
			t.Fatalf("Create: %v, want ErrInvalidSpec", err)
		}
		noDomainNoDisk(t, s.ID)
	})

	t.Run("disk taken", func(t *testing.T) {
		// A disk left by a Create a crash cut short: Create refuses,
		// Remove clears it.
		s := q.Spec(t)
		left := filepath.Join(q.Dir, "disks", s.ID+".qcow2")
		must(t, os.WriteFile(left, nil, 0o600))
		if err := q.H.Create(ctx, s); !errors.Is(err, hv.ErrExists) {
			t.Fatalf("Create over a leftover disk: %v, want ErrExists", err)
		}
		if ids, err := q.H.Disks(ctx); err != nil || len(ids) != 1 || ids[0] != s.ID {
			t.Errorf("Disks = %v, %v; want [%s]", ids, err, s.ID)
		}
		must(t, q.H.Remove(ctx, s.ID))
		noDomainNoDisk(t, s.ID)
	})
}

// tapOf returns the tap device name in the domain's definition.
func tapOf(t *testing.T, id string) string {
	t.Helper()
	xml, err := hvtest.Virsh(t, "dumpxml", "--inactive", id)
	must(t, err)
	m := regexp.MustCompile(`<target dev='(t3[a-z0-9]{13})'/>`).FindStringSubmatch(xml)
	if m == nil {
		t.Fatalf("domain %s has no tap of ours:\n%s", id, xml)
	}
	return m[1]
}

// guarded reports whether the bridge rules hold a chain for tap.
func guarded(t *testing.T, tap string) bool {
	t.Helper()
	out, err := exec.Command("nft", "list", "ruleset", "bridge").CombinedOutput()
	if err != nil {
		t.Fatalf("nft list ruleset bridge: %v\n%s", err, out)
	}
	return strings.Contains(string(out), `"`+tap+`" : goto vm_`+tap)
}

// dropTableOf deletes the nftables table guarding tap, as a firewall
// reload or a reboot would; other tests' tables are left alone.
func dropTableOf(t *testing.T, tap string) {
	t.Helper()
	out, err := exec.Command("nft", "list", "tables", "bridge").CombinedOutput()
	must(t, err)
	for _, f := range strings.Fields(string(out)) {
		if !strings.HasPrefix(f, "threes_") {
			continue
		}
		tbl, err := exec.Command("nft", "list", "table", "bridge", f).CombinedOutput()
		must(t, err)
		if strings.Contains(string(tbl), tap) {
			if out, err := exec.Command("nft", "delete", "table", "bridge", f).CombinedOutput(); err != nil {
				t.Fatalf("nft delete table bridge %s: %v\n%s", f, err, out)
			}
			return
		}
	}
	t.Fatalf("no table guards tap %s", tap)
}

// TestAntiSpoofFollowsDomains checks that a domain's tap rules come with
// Create, go with Remove, come back at Start and Open after the table was
// lost, and that Open drops the rules of a domain undefined behind hv's
// back.
func TestAntiSpoofFollowsDomains(t *testing.T) {
	// A guest still booting may miss the power button: a short Stop.
	q := hvtest.OpenQEMU(t, hv.Config{DomainType: "qemu", StopTimeout: time.Second})
	ctx := context.Background()
	s1, s2 := q.Spec(t), q.Spec(t)
	s1.IP, s2.IP = netip.MustParseAddr("10.10.7.21"), netip.MustParseAddr("10.10.7.22")
	must(t, q.H.Create(ctx, s1))
	must(t, q.H.Create(ctx, s2))
	tap1, tap2 := tapOf(t, s1.ID), tapOf(t, s2.ID)
	if tap1 == tap2 || !guarded(t, tap1) || !guarded(t, tap2) {
		t.Fatalf("after Create: taps %s and %s, guarded %v and %v", tap1, tap2, guarded(t, tap1), guarded(t, tap2))
	}

	must(t, q.H.Remove(ctx, s2.ID))
	if guarded(t, tap2) {
		t.Errorf("tap %s still has rules after Remove", tap2)
	}

	must(t, q.H.Stop(ctx, s1.ID))
	dropTableOf(t, tap1)
	must(t, q.H.Start(ctx, s1.ID))
	if !guarded(t, tap1) {
		t.Errorf("tap %s has no rules after Start on a host that lost them", tap1)
	}

	dropTableOf(t, tap1)
	h2, err := hv.Open(ctx, q.Config)
	must(t, err)
	defer h2.Close()
	if !guarded(t, tap1) {
		t.Errorf("tap %s has no rules after Open on a host that lost them", tap1)
	}

	// Undefined behind hv's back: the next Open prunes its rules.
	_, err = hvtest.Virsh(t, "destroy", s1.ID)
	must(t, err)
	_, err = hvtest.Virsh(t, "undefine", s1.ID)
	must(t, err)
	h3, err := hv.Open(ctx, q.Config)
	must(t, err)
	defer h3.Close()
	if guarded(t, tap1) {
		t.Errorf("tap %s of an undefined domain still has rules after Open", tap1)
	}
}

// TestStopWhileBooting stops a VM right after Create, before its kernel
// has an ACPI handler: the first press of the power button is lost, so
// Stop must press again, and the guest then powers itself off well
// before the deadline instead of being forced off.
func TestStopWhileBooting(t *testing.T) {
	q := hvtest.OpenQEMU(t, hv.Config{DomainType: "qemu", StopTimeout: 3 * time.Minute})
	ctx := context.Background()
	s := q.Spec(t)
	must(t, q.H.Create(ctx, s))
	must(t, q.H.Stop(ctx, s.ID))
	if got := virshState(t, s.ID); got != "shut off (shutdown)" {
		t.Errorf("virsh domstate = %q, want shut off (shutdown): the guest should power itself off", got)
	}
}

// netSet returns the name of the guard's set that holds tap, the taps of
// one network, or "" when none does.
func netSet(t *testing.T, tap string) string {
	t.Helper()
	out, err := exec.Command("nft", "list", "ruleset", "bridge").CombinedOutput()
	if err != nil {
		t.Fatalf("nft list ruleset bridge: %v\n%s", err, out)
	}
	m := regexp.MustCompile(`(?s)set (net_[0-9a-f]+) \{[^}]*"` + tap + `"`).FindSubmatch(out)
	if m == nil {
		return ""
	}
	return string(m[1])
}

// TestGuardHeals loses the guard table under two running VMs of two
// networks, as a firewall reload (nft flush ruleset) would. Starting one
// VM then rebuilds it for both, not for the started one alone (whose
// prefix rule would cut the other off), and when it is lost again hv's
// periodic check rebuilds it with no call at all. Each VM's network
// comes back with it, read from the domain.
func TestGuardHeals(t *testing.T) {
	defer hv.SetGuardCheck(time.Hour)()
	q := hvtest.OpenQEMU(t, hv.Config{DomainType: "qemu", StopTimeout: time.Second})
	ctx := context.Background()
	s1, s2 := q.Spec(t), q.Spec(t)
	s1.IP, s2.IP = netip.MustParseAddr("10.10.7.31"), netip.MustParseAddr("10.10.7.32")
	s1.Network, s2.Network = "red", "blue"
	must(t, q.H.Create(ctx, s1))
	must(t, q.H.Create(ctx, s2))
	tap1, tap2 := tapOf(t, s1.ID), tapOf(t, s2.ID)
	red, blue := netSet(t, tap1), netSet(t, tap2)
	if red == "" || blue == "" || red == blue {
		t.Fatalf("after Create the networks' sets are %q and %q", red, blue)
	}

	must(t, q.H.Stop(ctx, s2.ID))
	dropTableOf(t, tap1)
	must(t, q.H.Start(ctx, s2.ID))
	if !guarded(t, tap2) {
		t.Errorf("the started VM's tap %s has no rules", tap2)
	}
	if !guarded(t, tap1) {
		t.Errorf("the running VM's tap %s has no rules after its neighbour started: the prefix rule cuts it off", tap1)
	}
	if netSet(t, tap1) != red || netSet(t, tap2) != blue {
		t.Errorf("after Start the networks' sets are %q and %q, want %q and %q", netSet(t, tap1), netSet(t, tap2), red, blue)
	}

	restore := hv.SetGuardCheck(100 * time.Millisecond)
	h2, err := hv.Open(ctx, q.Config)
	restore()
	must(t, err)
	defer h2.Close()
	dropTableOf(t, tap1)
	deadline := time.Now().Add(30 * time.Second)
	for !(guarded(t, tap1) && guarded(t, tap2)) {
		if time.Now().After(deadline) {
			t.Fatal("the periodic check did not rebuild the lost table within 30s")
		}
		time.Sleep(100 * time.Millisecond)
	}
	if netSet(t, tap1) != red || netSet(t, tap2) != blue {
		t.Errorf("after the check the networks' sets are %q and %q, want %q and %q", netSet(t, tap1), netSet(t, tap2), red, blue)
	}
}
