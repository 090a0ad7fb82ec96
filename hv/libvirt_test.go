package hv_test

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/url"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/digitalocean/go-libvirt"
	"github.com/digitalocean/go-libvirt/socket/dialers"
	"libvirt.org/go/libvirtxml"

	"github.com/threes-dev/threes/hv"
	"github.com/threes-dev/threes/hv/hvtest"
	"github.com/threes-dev/threes/hv/images"
)

// witness opens a second, independent connection to test:///default on
// socket, to check what hv did from outside it.
func witness(t *testing.T, socket string) *libvirt.Libvirt {
	t.Helper()
	return witnessURI(t, socket, hvtest.URI)
}

func witnessURI(t *testing.T, socket, uri string) *libvirt.Libvirt {
	t.Helper()
	conn := libvirt.NewWithDialer(dialers.NewLocal(dialers.WithSocket(socket)))
	if err := conn.ConnectToURI(libvirt.ConnectURI(uri)); err != nil {
		t.Fatalf("witness connection: %v", err)
	}
	t.Cleanup(func() { conn.Disconnect() })
	return conn
}

// observed is a domain as the witness sees it.
type observed struct {
	found  bool
	state  libvirt.DomainState
	reason int32
	id     int32 // changes on every boot
}

func observe(t *testing.T, w *libvirt.Libvirt, name string) observed {
	t.Helper()
	dom, err := w.DomainLookupByName(name)
	if libvirt.IsNotFound(err) {
		return observed{}
	}
	if err != nil {
		t.Fatalf("witness lookup %s: %v", name, err)
	}
	st, reason, err := w.DomainGetState(dom, 0)
	if err != nil {
		t.Fatalf("witness state of %s: %v", name, err)
	}
	return observed{found: true, state: libvirt.DomainState(st), reason: reason, id: dom.ID}
}

func observedXML(t *testing.T, w *libvirt.Libvirt, name string, flags libvirt.DomainXMLFlags) libvirtxml.Domain {
	t.Helper()
	dom, err := w.DomainLookupByName(name)
	if err != nil {
		t.Fatalf("witness lookup %s: %v", name, err)
	}
	doc, err := w.DomainGetXMLDesc(dom, flags)
	if err != nil {
		t.Fatalf("witness XML of %s: %v", name, err)
	}
	var d libvirtxml.Domain
	if err := d.Unmarshal(doc); err != nil {
		t.Fatalf("parse XML of %s: %v", name, err)
	}
	return d
}

func must(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

func wantState(t *testing.T, h *hv.Libvirt, id string, want hv.State) {
	t.Helper()
	got, err := h.State(context.Background(), id)
	if err != nil || got != want {
		t.Fatalf("State(%s) = %q, %v; want %q", id, got, err, want)
	}
}

func TestLifecycle(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	h := hvtest.Open(t)
	w := witness(t, hvtest.Socket)
	s := hvtest.Spec(t)
	s.VCPUs, s.MemoryMiB = 2, 256
	s.NoCloud = &url.URL{Scheme: "http", Host: "10.10.0.1", Path: "/cloud-init/"}

	must(t, h.Create(ctx, s))
	o := observe(t, w, s.ID)
	if !o.found || o.state != libvirt.DomainRunning {
		t.Fatalf("after Create the witness sees %+v, want running", o)
	}
	wantState(t, h, s.ID, hv.StateRunning)

	d := observedXML(t, w, s.ID, 0)
	if d.VCPU == nil || d.VCPU.Value != 2 {
		t.Errorf("vcpu %+v, want 2", d.VCPU)
	}
	if d.Memory == nil || d.Memory.Value != 256*1024 || d.Memory.Unit != "KiB" {
		t.Errorf("memory %+v, want 262144 KiB", d.Memory)
	}
	if n := len(d.Devices.Interfaces); n != 1 {
		t.Fatalf("%d interfaces, want 1", n)
	}
	nic := d.Devices.Interfaces[0]
	if nic.MAC.Address != s.MAC.String() || nic.Source.Bridge == nil || nic.Source.Bridge.Bridge != s.Bridge {
		t.Errorf("NIC %s on %+v, want %s on bridge %s", nic.MAC.Address, nic.Source, s.MAC, s.Bridge)
	}
	if len(d.SysInfo) != 1 || d.SysInfo[0].SMBIOS == nil ||
		!slices.Contains(d.SysInfo[0].SMBIOS.System.Entry, libvirtxml.DomainSysInfoEntry{Name: "sku", Value: s.ID}) ||
		!slices.Contains(d.SysInfo[0].SMBIOS.System.Entry, libvirtxml.DomainSysInfoEntry{Name: "serial", Value: "ds=nocloud-net;s=http://10.10.0.1/cloud-init/"}) {
		t.Errorf("sysinfo %+v, want SMBIOS system SKU %s and serial the NoCloud seed", d.SysInfo, s.ID)
	}

	// Graceful: the test driver records why a domain went off.
	must(t, h.Stop(ctx, s.ID))
	o = observe(t, w, s.ID)
	if o.state != libvirt.DomainShutoff || o.reason != int32(libvirt.DomainShutoffShutdown) {
		t.Fatalf("after Stop the witness sees %+v, want shut off by shutdown", o)
	}
	wantState(t, h, s.ID, hv.StateStopped)
	must(t, h.Stop(ctx, s.ID)) // no-op
	wantState(t, h, s.ID, hv.StateStopped)

	must(t, h.Start(ctx, s.ID))
	booted := observe(t, w, s.ID)
	if booted.state != libvirt.DomainRunning {
		t.Fatalf("after Start the witness sees %+v, want running", booted)
	}
	must(t, h.Start(ctx, s.ID)) // no-op: no new boot
	if o := observe(t, w, s.ID); o.state != libvirt.DomainRunning || o.id != booted.id {
		t.Fatalf("after a second Start the witness sees %+v, want running as id %d", o, booted.id)
	}

	must(t, h.Restart(ctx, s.ID))
	if o := observe(t, w, s.ID); o.state != libvirt.DomainRunning || o.id == booted.id {
		t.Fatalf("after Restart the witness sees %+v, want running with an id other than %d", o, booted.id)
	}

	must(t, h.Remove(ctx, s.ID))
	if o := observe(t, w, s.ID); o.found {
		t.Fatalf("after Remove the witness sees %+v", o)
	}
	st, err := h.State(ctx, s.ID)
	if st != hv.StateMissing || !errors.Is(err, hv.ErrNotFound) {
		t.Fatalf("State after Remove = %q, %v; want missing, ErrNotFound", st, err)
	}
}

func TestRestartStopped(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	h := hvtest.Open(t)
	s := hvtest.Spec(t)
	must(t, h.Create(ctx, s))
	must(t, h.Stop(ctx, s.ID))
	must(t, h.Restart(ctx, s.ID))
	wantState(t, h, s.ID, hv.StateRunning)
}

func TestRemoveStopped(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	h := hvtest.Open(t)
	w := witness(t, hvtest.Socket)
	s := hvtest.Spec(t)
	must(t, h.Create(ctx, s))
	must(t, h.Stop(ctx, s.ID))
	must(t, h.Remove(ctx, s.ID))
	if o := observe(t, w, s.ID); o.found {
		t.Fatalf("after Remove the witness sees %+v", o)
	}
}

func TestStopForcesAfterTimeout(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	h := hvtest.OpenConfig(t, hv.Config{StopTimeout: 200 * time.Millisecond})
	w := witness(t, hvtest.Socket)
	s := hvtest.Spec(t)
	must(t, h.Create(ctx, s))

	// Make the guest ignore the power button: with on_poweroff=restart
	// the test driver keeps a shut-down domain running.
	must(t, h.Stop(ctx, s.ID))
	d := observedXML(t, w, s.ID, libvirt.DomainXMLInactive)
	d.OnPoweroff = "restart"
	doc, err := d.Marshal()
	must(t, err)
	if _, err := w.DomainDefineXML(doc); err != nil {
		t.Fatalf("witness redefine: %v", err)
	}
	must(t, h.Start(ctx, s.ID))

	must(t, h.Stop(ctx, s.ID))
	if o := observe(t, w, s.ID); o.state != libvirt.DomainShutoff || o.reason != int32(libvirt.DomainShutoffDestroyed) {
		t.Fatalf("after Stop the witness sees %+v, want shut off by destroy", o)
	}
}

func TestPaused(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	h := hvtest.Open(t)
	w := witness(t, hvtest.Socket)
	s := hvtest.Spec(t)
	must(t, h.Create(ctx, s))
	suspend := func() observed {
		t.Helper()
		dom, err := w.DomainLookupByName(s.ID)
		must(t, err)
		must(t, w.DomainSuspend(dom))
		wantState(t, h, s.ID, hv.StatePaused)
		return observe(t, w, s.ID)
	}

	// Start resumes the same boot.
	paused := suspend()
	must(t, h.Start(ctx, s.ID))
	if o := observe(t, w, s.ID); o.state != libvirt.DomainRunning || o.id != paused.id {
		t.Fatalf("after Start the witness sees %+v, want running as id %d", o, paused.id)
	}

	// Stop does not wait for a paused guest to see the power button.
	suspend()
	must(t, h.Stop(ctx, s.ID))
	if o := observe(t, w, s.ID); o.state != libvirt.DomainShutoff || o.reason != int32(libvirt.DomainShutoffDestroyed) {
		t.Fatalf("after Stop the witness sees %+v, want shut off by destroy", o)
	}
}

func TestNotFound(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	h := hvtest.Open(t)
	id := hvtest.Spec(t).ID
	ops := map[string]func() error{
		"Start":   func() error { return h.Start(ctx, id) },
		"Stop":    func() error { return h.Stop(ctx, id) },
		"Restart": func() error { return h.Restart(ctx, id) },
		"Remove":  func() error { return h.Remove(ctx, id) },
		"State": func() error {
			st, err := h.State(ctx, id)
			if st != hv.StateMissing {
				return fmt.Errorf("state %q, want missing (error %w)", st, err)
			}
			return err
		},
	}
	for name, op := range ops {
		err := op()
		if !errors.Is(err, hv.ErrNotFound) || !strings.Contains(err.Error(), id) {
			t.Errorf("%s: error %v, want ErrNotFound naming %s", name, err, id)
		}
	}
}

func TestCreateExisting(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	h := hvtest.Open(t)
	w := witness(t, hvtest.Socket)
	s := hvtest.Spec(t)
	must(t, h.Create(ctx, s))
	before := observe(t, w, s.ID)

	again := s
	again.MAC = net.HardwareAddr{0x52, 0x54, 0, 0, 0, 0x99}
	err := h.Create(ctx, again)
	if !errors.Is(err, hv.ErrExists) || !strings.Contains(err.Error(), s.ID) {
		t.Fatalf("second Create: %v, want ErrExists naming %s", err, s.ID)
	}
	if o := observe(t, w, s.ID); o != before {
		t.Errorf("the witness sees %+v after the failed Create, want %+v", o, before)
	}
	if mac := observedXML(t, w, s.ID, 0).Devices.Interfaces[0].MAC.Address; mac != s.MAC.String() {
		t.Errorf("MAC %s after the failed Create, want %s", mac, s.MAC)
	}
}

func TestCreateConcurrently(t *testing.T) {
	t.Parallel()
	h := hvtest.Open(t)
	s := hvtest.Spec(t)
	const n = 8
	created := createConcurrently(t, h, s, n)
	if created != 1 {
		t.Errorf("%d of %d concurrent Creates of one ID succeeded, want 1", created, n)
	}
	wantState(t, h, s.ID, hv.StateRunning)
}

func TestCreateInvalid(t *testing.T) {
	t.Parallel()
	h := hvtest.Open(t)
	w := witness(t, hvtest.Socket)
	s := hvtest.Spec(t)
	s.MAC = s.MAC[:4]
	err := h.Create(context.Background(), s)
	if !errors.Is(err, hv.ErrInvalidSpec) || !strings.Contains(err.Error(), s.ID) {
		t.Fatalf("Create: %v, want ErrInvalidSpec naming %s", err, s.ID)
	}
	if o := observe(t, w, s.ID); o.found {
		t.Fatalf("the witness sees %+v after an invalid Create", o)
	}
}

func TestList(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	h1, h2 := hvtest.Open(t), hvtest.Open(t)
	a, b, c := hvtest.Spec(t), hvtest.Spec(t), hvtest.Spec(t)
	must(t, h1.Create(ctx, a))
	must(t, h1.Create(ctx, b))
	must(t, h1.Stop(ctx, b.ID))
	must(t, h2.Create(ctx, c))

	sorted := func(ds []hv.Domain) []hv.Domain {
		slices.SortFunc(ds, func(x, y hv.Domain) int { return strings.Compare(x.ID, y.ID) })
		return ds
	}
	got, err := h1.List(ctx)
	must(t, err)
	want := sorted([]hv.Domain{{ID: a.ID, State: hv.StateRunning}, {ID: b.ID, State: hv.StateStopped}})
	if got = sorted(got); !slices.Equal(got, want) {
		t.Errorf("List of the first owner = %+v, want %+v", got, want)
	}
	got, err = h2.List(ctx)
	must(t, err)
	if want := []hv.Domain{{ID: c.ID, State: hv.StateRunning}}; !slices.Equal(got, want) {
		t.Errorf("List of the second owner = %+v, want %+v", got, want)
	}

	must(t, h1.Remove(ctx, a.ID))
	got, err = h1.List(ctx)
	must(t, err)
	if want := []hv.Domain{{ID: b.ID, State: hv.StateStopped}}; !slices.Equal(got, want) {
		t.Errorf("List after Remove = %+v, want %+v", got, want)
	}

	// Each Libvirt remembers whose the listed domains are: a domain
	// defined again under a listed name, by the other owner, is judged
	// afresh, and a remembered domain's state still comes from libvirtd.
	must(t, h2.Remove(ctx, c.ID))
	c2 := hvtest.Spec(t)
	c2.ID, c2.Name = c.ID, c.Name
	must(t, h1.Create(ctx, c2))
	must(t, h1.Start(ctx, b.ID))
	got, err = h1.List(ctx)
	must(t, err)
	want = sorted([]hv.Domain{{ID: b.ID, State: hv.StateRunning}, {ID: c.ID, State: hv.StateRunning}})
	if got = sorted(got); !slices.Equal(got, want) {
		t.Errorf("List after a domain changed owner = %+v, want %+v", got, want)
	}
	got, err = h2.List(ctx)
	must(t, err)
	if len(got) != 0 {
		t.Errorf("List of the owner whose domain went = %+v, want none", got)
	}
}

func TestClosed(t *testing.T) {
	t.Parallel()
	h := hvtest.Open(t)
	must(t, h.Close())
	if _, err := h.List(context.Background()); err == nil {
		t.Fatal("List after Close succeeded")
	}
	must(t, h.Close())
}

// privateLibvirtd is a libvirtd of the test's own, so the test may stop and
// start it: an unprivileged (session mode) daemon running as nobody with
// its sockets and state in dir. It shares nothing with the machine's
// libvirtd, and test:///default works the same in it.
type privateLibvirtd struct {
	t      *testing.T
	dir    string
	socket string
	uid    uint32
	gid    uint32
	cmd    *exec.Cmd
	exited chan struct{}
}

func newPrivateLibvirtd(t *testing.T) *privateLibvirtd {
	t.Helper()
	if os.Geteuid() != 0 {
		hvtest.Skip(t, "not root: cannot run a libvirtd as another user")
	}
	if _, err := exec.LookPath("libvirtd"); err != nil {
		hvtest.Skip(t, "no libvirtd: %v", err)
	}
	nobody, err := user.Lookup("nobody")
	if err != nil {
		hvtest.Skip(t, "no user nobody: %v", err)
	}
	uid, _ := strconv.Atoi(nobody.Uid)
	gid, _ := strconv.Atoi(nobody.Gid)
	// Short and outside t.TempDir (mode 0700, root's): the daemon runs
	// as nobody, and a unix socket path must fit in 108 bytes.
	dir, err := os.MkdirTemp("", "hvlv")
	must(t, err)
	t.Cleanup(func() { os.RemoveAll(dir) })
	must(t, os.Chmod(dir, 0o755))
	must(t, os.Chown(dir, uid, gid))
	p := &privateLibvirtd{t: t, dir: dir, socket: filepath.Join(dir, "run/libvirt/libvirt-sock")}
	t.Cleanup(p.stop)
	p.uid, p.gid = uint32(uid), uint32(gid)
	return p
}

func (p *privateLibvirtd) start() {
	p.t.Helper()
	log, err := os.OpenFile(filepath.Join(p.dir, "libvirtd.log"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	must(p.t, err)
	defer log.Close()
	cmd := exec.Command("libvirtd")
	cmd.Env = []string{
		"PATH=/usr/sbin:/usr/bin:/sbin:/bin",
		"HOME=" + p.dir,
		"XDG_RUNTIME_DIR=" + filepath.Join(p.dir, "run"),
		"XDG_CONFIG_HOME=" + filepath.Join(p.dir, "config"),
		"XDG_CACHE_HOME=" + filepath.Join(p.dir, "cache"),
		"LIBVIRT_LOG_OUTPUTS=3:stderr",
	}
	cmd.Stdout, cmd.Stderr = log, log
	cmd.SysProcAttr = &syscall.SysProcAttr{
		Credential: &syscall.Credential{Uid: p.uid, Gid: p.gid, Groups: []uint32{}},
		Pdeathsig:  syscall.SIGKILL, // never outlive the test binary
	}
	must(p.t, cmd.Start())
	p.cmd = cmd
	p.exited = make(chan struct{})
	go func() { cmd.Wait(); close(p.exited) }()

	// Poll until it answers on its socket.
	deadline := time.Now().Add(30 * time.Second)
	for {
		conn, err := net.Dial("unix", p.socket)
		if err == nil {
			conn.Close()
			return
		}
		select {
		case <-p.exited:
			p.t.Fatalf("private libvirtd exited: %v\n%s", cmd.ProcessState, p.log())
		case <-time.After(20 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			p.t.Fatalf("private libvirtd did not listen on %s within 30s: %v\n%s", p.socket, err, p.log())
		}
	}
}

// stop ends the daemon this test started, by its PID.
func (p *privateLibvirtd) stop() {
	if p.cmd == nil {
		return
	}
	p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.exited:
	case <-time.After(15 * time.Second):
		p.t.Errorf("private libvirtd (pid %d) ignored SIGTERM for 15s; killing it", p.cmd.Process.Pid)
		p.cmd.Process.Kill()
		<-p.exited
	}
	p.cmd = nil
}

func (p *privateLibvirtd) log() string {
	b, _ := os.ReadFile(filepath.Join(p.dir, "libvirtd.log"))
	return string(b)
}

func TestReconnect(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	lvd := newPrivateLibvirtd(t)
	lvd.start()
	h, err := hv.Open(ctx, hv.Config{URI: hvtest.URI, Socket: lvd.socket, Owner: "reconnect"})
	must(t, err)
	defer h.Close()
	s := hvtest.Spec(t)
	must(t, h.Create(ctx, s))
	wantState(t, h, s.ID, hv.StateRunning)

	// While libvirtd is away, calls fail as unavailable, naming the domain.
	lvd.stop()
	if _, err := h.State(ctx, s.ID); !errors.Is(err, hv.ErrUnavailable) || !strings.Contains(err.Error(), s.ID) {
		t.Fatalf("State with libvirtd stopped: %v, want ErrUnavailable naming %s", err, s.ID)
	}
	if err := h.Start(ctx, s.ID); !errors.Is(err, hv.ErrUnavailable) {
		t.Fatalf("Start with libvirtd stopped: %v, want ErrUnavailable", err)
	}

	// Back again: the test driver lost its domains with the daemon, so
	// the old one is missing, which only a live connection can say.
	lvd.start()
	if st, err := h.State(ctx, s.ID); st != hv.StateMissing || !errors.Is(err, hv.ErrNotFound) {
		t.Fatalf("State after libvirtd came back = %q, %v; want missing, ErrNotFound", st, err)
	}
	must(t, h.Create(ctx, s))
	w := witness(t, lvd.socket)
	if o := observe(t, w, s.ID); o.state != libvirt.DomainRunning {
		t.Fatalf("after Create on the new libvirtd the witness sees %+v, want running", o)
	}

	// A restart between two calls, with no failed call to notice it.
	w.Disconnect()
	lvd.stop()
	lvd.start()
	if got, err := h.List(ctx); err != nil || len(got) != 0 {
		t.Fatalf("List after another restart = %+v, %v; want none", got, err)
	}
	must(t, h.Create(ctx, s))
	wantState(t, h, s.ID, hv.StateRunning)
}

func BenchmarkCreateRemove(b *testing.B) {
	ctx := context.Background()
	h := hvtest.Open(b)
	s := hvtest.Spec(b)
	base := s.ID
	for i := 0; b.Loop(); i++ {
		s.ID = fmt.Sprintf("%s-%d", base, i)
		if err := h.Create(ctx, s); err != nil {
			b.Fatal(err)
		}
		if err := h.Remove(ctx, s.ID); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkState(b *testing.B) {
	ctx := context.Background()
	h := hvtest.Open(b)
	s := hvtest.Spec(b)
	if err := h.Create(ctx, s); err != nil {
		b.Fatal(err)
	}
	for b.Loop() {
		if _, err := h.State(ctx, s.ID); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkList50(b *testing.B) {
	ctx := context.Background()
	h := hvtest.Open(b)
	for range 50 {
		if err := h.Create(ctx, hvtest.Spec(b)); err != nil {
			b.Fatal(err)
		}
	}
	for b.Loop() {
		if ds, err := h.List(ctx); err != nil || len(ds) != 50 {
			b.Fatalf("List = %d domains, %v; want 50", len(ds), err)
		}
	}
}

// expectEvents reads events until it has seen each of want in order (other
// events in between are fine), failing the test after a minute.
func expectEvents(t *testing.T, events <-chan hv.Event, want ...hv.Event) {
	t.Helper()
	deadline := time.NewTimer(time.Minute)
	defer deadline.Stop()
	var seen []hv.Event
	for len(want) > 0 {
		select {
		case ev, ok := <-events:
			if !ok {
				t.Fatalf("events closed; saw %+v, still want %+v", seen, want)
			}
			seen = append(seen, ev)
			if ev == want[0] {
				want = want[1:]
			}
		case <-deadline.C:
			t.Fatalf("saw %+v, still want %+v", seen, want)
		}
	}
}

func TestEvents(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	h := hvtest.Open(t)
	other := hvtest.Open(t)
	a, b, c := hvtest.Spec(t), hvtest.Spec(t), hvtest.Spec(t)
	must(t, h.Create(ctx, a))

	evctx, cancel := context.WithCancel(ctx)
	events, err := h.Events(evctx)
	must(t, err)
	// First the current state, then changes; another owner's domain (c)
	// never shows.
	expectEvents(t, events, hv.Event{ID: a.ID, State: hv.StateRunning, Reason: "sync"})
	must(t, other.Create(ctx, c))
	must(t, h.Create(ctx, b))
	must(t, h.Stop(ctx, a.ID))
	must(t, h.Remove(ctx, b.ID))
	expectEvents(t, events,
		hv.Event{ID: b.ID, State: hv.StateRunning, Reason: "booted"},
		hv.Event{ID: a.ID, State: hv.StateStopped, Reason: "shutdown"},
		hv.Event{ID: b.ID, State: hv.StateStopped, Reason: "destroyed"},
		hv.Event{ID: b.ID, State: hv.StateMissing, Reason: "undefined"},
	)
	cancel()
	for ev := range events {
		if ev.ID == c.ID {
			t.Errorf("event about another owner's domain: %+v", ev)
		}
	}
}

// TestEventsReconnect checks that events survive libvirtd restarts: the
// subscription comes back by itself, reports what changed while it was
// away, and carries on.
func TestEventsReconnect(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	lvd := newPrivateLibvirtd(t)
	lvd.start()
	h, err := hv.Open(ctx, hv.Config{URI: hvtest.URI, Socket: lvd.socket, Owner: "events"})
	must(t, err)
	defer h.Close()
	evctx, cancel := context.WithCancel(ctx)
	defer cancel()
	events, err := h.Events(evctx)
	must(t, err)

	a := hvtest.Spec(t)
	must(t, h.Create(ctx, a))
	expectEvents(t, events, hv.Event{ID: a.ID, State: hv.StateRunning, Reason: "booted"})

	// The test driver forgets its domains with the daemon: once the
	// subscription is back, a is reported missing, without any call on h.
	lvd.stop()
	lvd.start()
	expectEvents(t, events, hv.Event{ID: a.ID, State: hv.StateMissing, Reason: "sync"})
	b := hvtest.Spec(t)
	must(t, h.Create(ctx, b))
	expectEvents(t, events, hv.Event{ID: b.ID, State: hv.StateRunning, Reason: "booted"})

	// Closing h ends the stream.
	must(t, h.Close())
	deadline := time.After(time.Minute)
	for {
		select {
		case _, ok := <-events:
			if !ok {
				return
			}
		case <-deadline:
			t.Fatal("events still open a minute after Close")
		}
	}
}

// diskImage imports a small qcow2 disk image into a store of its own.
func diskImage(t *testing.T) images.Image {
	t.Helper()
	if _, err := exec.LookPath("qemu-img"); err != nil {
		hvtest.Skip(t, "no qemu-img (Debian package qemu-utils): %v", err)
	}
	dir := t.TempDir()
	src := filepath.Join(dir, "src.qcow2")
	if out, err := exec.Command("qemu-img", "create", "-q", "-f", "qcow2", src, "16M").CombinedOutput(); err != nil {
		t.Fatalf("qemu-img create: %v\n%s", err, out)
	}
	store, err := images.Open(filepath.Join(dir, "images"))
	must(t, err)
	img, err := store.Import(context.Background(), "small", images.Source{Disk: src})
	must(t, err)
	return img
}

// TestDisks checks the VM disk's life on the test driver: Create makes an
// overlay on the image, concurrent Creates of one ID make one disk, Remove
// deletes it, and a disk left without a domain is listed and removable.
func TestDisks(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	dir := filepath.Join(t.TempDir(), "disks")
	h := hvtest.OpenConfig(t, hv.Config{DiskDir: dir})
	img := diskImage(t)
	s := hvtest.Spec(t)
	s.Image, s.DiskGiB = img, 1

	const n = 4
	created := createConcurrently(t, h, s, n)
	if created != 1 {
		t.Fatalf("%d of %d concurrent Creates succeeded, want 1", created, n)
	}
	disk := filepath.Join(dir, s.ID+".qcow2")
	out, err := exec.Command("qemu-img", "info", "-U", disk).CombinedOutput()
	if err != nil || !strings.Contains(string(out), "backing file: "+img.Disk) || !strings.Contains(string(out), "virtual size: 1 GiB") {
		t.Errorf("qemu-img info %s: %v\n%s\nwant a 1 GiB overlay on %s", disk, err, out, img.Disk)
	}
	if ids, err := h.Disks(ctx); err != nil || !slices.Equal(ids, []string{s.ID}) {
		t.Errorf("Disks = %v, %v; want [%s]", ids, err, s.ID)
	}
	// Stop keeps the disk (the appliance's delete); Remove deletes it.
	must(t, h.Stop(ctx, s.ID))
	if _, err := os.Stat(disk); err != nil {
		t.Errorf("disk after Stop: %v", err)
	}
	must(t, h.Remove(ctx, s.ID))
	if _, err := os.Stat(disk); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("disk after Remove: %v, want gone", err)
	}

	// A disk without a domain, as a crash between the two leaves.
	must(t, os.WriteFile(disk, nil, 0o600))
	if ids, err := h.Disks(ctx); err != nil || !slices.Equal(ids, []string{s.ID}) {
		t.Errorf("Disks = %v, %v; want [%s]", ids, err, s.ID)
	}
	must(t, h.Remove(ctx, s.ID))
	if err := h.Remove(ctx, s.ID); !errors.Is(err, hv.ErrNotFound) {
		t.Errorf("Remove of nothing: %v, want ErrNotFound", err)
	}
	ents, err := os.ReadDir(dir)
	if err != nil || len(ents) != 0 {
		t.Errorf("disk directory holds %v, %v; want nothing", ents, err)
	}
}

// createConcurrently runs n Creates of s at once and returns how many succeeded;
// the others must fail with ErrExists.
func createConcurrently(t *testing.T, h *hv.Libvirt, s hv.Spec, n int) int {
	t.Helper()
	errs := make([]error, n)
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() { errs[i] = h.Create(context.Background(), s) })
	}
	wg.Wait()
	created := 0
	for _, err := range errs {
		switch {
		case err == nil:
			created++
		case !errors.Is(err, hv.ErrExists):
			t.Errorf("Create: %v, want nil or ErrExists", err)
		}
	}
	return created
}
