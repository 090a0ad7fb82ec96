package hv

import (
	"context"
	"encoding/xml"
	"errors"
	"fmt"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/digitalocean/go-libvirt"

	"github.com/threes-dev/threes/hv/guard"
	"github.com/threes-dev/threes/internal/revert"
)

// Config says which libvirtd and driver to use and how.
type Config struct {
	// URI is the libvirt driver URI: "test:///default" (libvirt's
	// built-in test driver, inside libvirtd) or "qemu:///system".
	// Empty means "qemu:///system".
	URI string
	// Socket is libvirtd's unix socket; empty means
	// /run/libvirt/libvirt-sock.
	Socket string
	// DomainType is the libvirt domain type: "test", "qemu" (TCG) or
	// "kvm". Empty means "test" for a test:// URI and, for QEMU, "kvm" if
	// libvirt offers KVM and a probe guest boots with it (see
	// ProbeKernel), else "qemu"; Accel reports which and why.
	DomainType string
	// ProbeKernel is a Linux kernel (bzImage) to verify KVM with: a
	// throwaway KVM guest boots it and must print the kernel's banner on
	// its serial console within ProbeTimeout. KVM can be offered yet
	// unable to boot a normal guest (a PVM-only host does exactly that),
	// so without a probe kernel QEMU domains use TCG.
	ProbeKernel string
	// ProbeTimeout bounds the KVM probe; zero means 10s.
	ProbeTimeout time.Duration
	// ProbeVerdict is a file that keeps the probe's verdict for this host
	// (libvirt's host UUID and the running kernel's release), so later
	// starts reuse it instead of probing again; empty means probe at every
	// start. Delete the file to probe again.
	ProbeVerdict string
	// DiskDir is where VMs' disks are created, one qcow2 file per VM
	// named after its ID. QEMU's user must be able to reach it (and the
	// image store). Needed for Specs with an image or DiskGiB.
	DiskDir string
	// Owner is written into every domain this Libvirt creates, and List
	// reports only domains with the same Owner, so that appliances (or
	// tests) sharing one libvirtd never see each other's VMs.
	Owner string
	// Lazy makes Open succeed while libvirtd is unreachable: calls connect
	// when first used, so a host can start threes before libvirtd.
	Lazy bool
	// StopTimeout is how long Stop waits for the guest to power off
	// after the ACPI power button before forcing it off; zero means 30s.
	StopTimeout time.Duration
	// BridgeNetNS names the network namespace (as ip netns does) that
	// holds the bridge, and so libvirtd and the VMs' taps, when it is not
	// this process's; the anti-spoofing rules (package guard) go there.
	BridgeNetNS string
	// CrossNetwork lets the bridge forward frames between VMs of
	// different networks (Spec.Network); by default it does not.
	CrossNetwork bool
	// DiskOvercommit turns on Create's free-space check (see
	// checkSpace): the room the VMs' disks may still grow into, divided
	// by DiskOvercommit, must fit in DiskDir's free space beyond
	// DiskReserve. 1 promises only what the disk holds; zero means no check.
	DiskOvercommit float64
	// DiskReserve is kept free in DiskDir's filesystem for whatever
	// shares it (the database, by default); zero means 1 GiB.
	DiskReserve int64
}

const (
	defaultURI         = "qemu:///system"
	defaultSocket      = "/run/libvirt/libvirt-sock"
	defaultStopTimeout = 30 * time.Second
	defaultProbeTime   = 10 * time.Second
	// pollInterval is how often Stop checks whether the guest is off.
	pollInterval = 50 * time.Millisecond
	// pressInterval is how often Stop presses the power button again: a
	// guest that is still booting has no ACPI handler yet and loses the
	// press.
	pressInterval = 2 * time.Second
)

// flavour holds what differs between libvirt drivers.
type flavour struct {
	// test is libvirt's test driver, qemu otherwise.
	test bool
	// shutdownFlags selects the ACPI power button where the driver
	// has one; the test driver accepts no flags.
	shutdownFlags libvirt.DomainShutdownFlagValues
	// undefineFlags also drops what a domain may own beside its
	// definition; the test driver rejects NVRAM and checkpoints.
	undefineFlags libvirt.DomainUndefineFlagsValues
}

// flavourOf returns the flavour of a libvirt domain type.
func flavourOf(domainType string) (flavour, error) {
	switch domainType {
	case "test":
		return flavour{
			test:          true,
			shutdownFlags: libvirt.DomainShutdownDefault,
			undefineFlags: libvirt.DomainUndefineManagedSave | libvirt.DomainUndefineSnapshotsMetadata,
		}, nil
	case "qemu", "kvm", "":
		return flavour{
			shutdownFlags: libvirt.DomainShutdownAcpiPowerBtn,
			undefineFlags: libvirt.DomainUndefineManagedSave | libvirt.DomainUndefineSnapshotsMetadata |
				libvirt.DomainUndefineNvram | libvirt.DomainUndefineCheckpointsMetadata,
		}, nil
	}
	return flavour{}, fmt.Errorf("unknown libvirt domain type %q (want test, qemu or kvm)", domainType)
}

// Libvirt manages domains through one connection to libvirtd, which it
// re-establishes on the next call after libvirtd goes away. It implements
// Hypervisor and is safe for concurrent use.
//
// go-libvirt's calls take no context: a context bounds connecting and
// Stop's wait, and is checked between calls, but cannot interrupt a call
// that libvirtd is already executing.
type Libvirt struct {
	uri          string
	socket       string
	owner        string
	stopTimeout  time.Duration
	flavour      flavour
	domainType   string // configured; empty means detect
	probeKernel  string
	probeVerdict string
	probeTimeout time.Duration
	diskDir      string
	copyDisks    bool // full copies instead of overlays, for a benchmark
	// guard holds each QEMU domain's anti-spoofing rules; nil for the
	// test driver, whose domains have no taps.
	guard *guard.Table
	// guardMu serialises rebuilding the guard table from the domains
	// with patching it.
	guardMu sync.Mutex
	// guardEvery is how often checkGuard looks at the guard table, in
	// nanoseconds.
	guardEvery atomic.Int64
	// done is closed by Close, ending checkGuard.
	done chan struct{}

	mu     sync.Mutex
	conn   *libvirt.Libvirt // nil until connected, and after a broken call
	closed bool

	accelMu sync.Mutex
	accel   *accelResult // nil until detected

	// diskMu makes a free-space check and the disk it allows one step,
	// so two Creates cannot both take the last room.
	diskMu     sync.Mutex
	overcommit float64
	reserve    int64

	// rec records QEMU domains' consoles (console.go).
	rec recorders

	// owners remembers which listed domains carry this Libvirt's
	// metadata, so a List asks libvirtd about a domain's metadata once,
	// not on every listing (at 10,000 domains that was 10,000 calls
	// per list). The key is the definition's UUID and name: this
	// package writes a domain's owner only when it defines it. Domains
	// missing from a listing are forgotten.
	ownersMu sync.Mutex
	owners   map[ownerKey]bool
}

type ownerKey struct {
	uuid libvirt.UUID
	name string
}

var _ Hypervisor = (*Libvirt)(nil)

// Open connects to libvirtd and opens cfg.URI.
func Open(ctx context.Context, cfg Config) (*Libvirt, error) {
	h := &Libvirt{
		uri:          cfg.URI,
		socket:       cfg.Socket,
		owner:        cfg.Owner,
		stopTimeout:  cfg.StopTimeout,
		domainType:   cfg.DomainType,
		probeKernel:  cfg.ProbeKernel,
		probeVerdict: cfg.ProbeVerdict,
		probeTimeout: cfg.ProbeTimeout,
		diskDir:      cfg.DiskDir,
		overcommit:   cfg.DiskOvercommit,
		reserve:      cfg.DiskReserve,
		done:         make(chan struct{}),
	}
	h.guardEvery.Store(int64(guardCheckEvery))
	if h.probeTimeout <= 0 {
		h.probeTimeout = defaultProbeTime
	}
	if h.uri == "" {
		h.uri = defaultURI
	}
	if h.socket == "" {
		h.socket = defaultSocket
	}
	if h.stopTimeout <= 0 {
		h.stopTimeout = defaultStopTimeout
	}
	u, err := url.Parse(h.uri)
	if err != nil {
		return nil, fmt.Errorf("parse libvirt URI %q: %w", h.uri, err)
	}
	if u.Host != "" || strings.Contains(u.Scheme, "+") {
		// The URI is handed to libvirtd behind Socket; a transport or
		// remote host in it would be silently ignored.
		return nil, fmt.Errorf("libvirt URI %q names a transport or host: give a local URI and Config.Socket", h.uri)
	}
	if h.domainType == "" && u.Scheme == "test" {
		h.domainType = "test"
	}
	if h.flavour, err = flavourOf(h.domainType); err != nil {
		return nil, err
	}
	if (u.Scheme == "test") != h.flavour.test {
		return nil, fmt.Errorf("libvirt domain type %q does not go with URI %q", h.domainType, h.uri)
	}
	if h.diskDir != "" {
		if err := prepareDiskDir(h.diskDir); err != nil {
			return nil, err
		}
		h.diskDir = filepath.Clean(h.diskDir)
	}
	if !h.flavour.test {
		if h.guard, err = newGuard(h.owner, cfg.BridgeNetNS, cfg.CrossNetwork); err != nil {
			return nil, err
		}
	}
	if _, err := h.client(ctx); err != nil {
		if cfg.Lazy && errors.Is(err, ErrUnavailable) {
			// checkGuard builds the table once libvirtd is there.
			h.startCheckGuard()
			return h, nil
		}
		return nil, err
	}
	// Detected now rather than at the first Create, which should not
	// wait for a probe.
	if _, err := h.Accel(ctx); err != nil && !(cfg.Lazy && errors.Is(err, ErrUnavailable)) {
		h.Close()
		return nil, err
	}
	// After a reboot the kernel has no rules at all; after a crash it
	// may hold some for domains that are gone.
	if err := h.syncGuard(ctx); err != nil && !(cfg.Lazy && errors.Is(err, ErrUnavailable)) {
		h.Close()
		return nil, err
	}
	h.startCheckGuard()
	return h, nil
}

func (h *Libvirt) startCheckGuard() {
	if h.guard != nil {
		go h.checkGuard()
	}
}

// Close disconnects from libvirtd; later calls fail.
func (h *Libvirt) Close() error {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.closed {
		return nil
	}
	h.closed = true
	close(h.done)
	h.closeRecorders()
	if h.conn == nil {
		return nil
	}
	conn := h.conn
	h.conn = nil
	if err := conn.Disconnect(); err != nil {
		return fmt.Errorf("disconnect from libvirt at %s: %w", h.socket, err)
	}
	return nil
}

// errClosed is returned by calls after Close.
var errClosed = errors.New("hv: use of closed Libvirt")

// dialer connects to libvirtd's socket within a context.
type dialer struct {
	ctx    context.Context
	socket string
}

func (d dialer) Dial() (net.Conn, error) {
	var nd net.Dialer
	return nd.DialContext(d.ctx, "unix", d.socket)
}

// client returns the live connection, connecting first if there is none or
// libvirtd closed it.
func (h *Libvirt) client(ctx context.Context) (*libvirt.Libvirt, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.closed {
		return nil, errClosed
	}
	if h.conn != nil && h.conn.IsConnected() {
		return h.conn, nil
	}
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	conn := libvirt.NewWithDialer(dialer{ctx: ctx, socket: h.socket})
	if err := conn.ConnectToURI(libvirt.ConnectURI(h.uri)); err != nil {
		h.conn = nil
		return nil, fmt.Errorf("connect to %s at %s: %w: %w", h.uri, h.socket, ErrUnavailable, err)
	}
	h.conn = conn
	return conn, nil
}

// forget drops conn after a call on it failed for want of libvirtd, so the
// next call reconnects even if go-libvirt has not noticed the loss yet.
func (h *Libvirt) forget(conn *libvirt.Libvirt) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.conn == conn {
		h.conn = nil
		// Closes the socket if it is somehow still open; waits at
		// most a few seconds, so not under the lock's caller.
		go conn.Disconnect()
	}
}

// call runs fn on a live connection and translates its error. Reads may
// pass retry to run fn once more on a fresh connection if the first one
// turned out to be dead, which happens when libvirtd restarted since the
// last call.
func (h *Libvirt) call(ctx context.Context, retry bool, fn func(*libvirt.Libvirt) error) error {
	for attempt := 0; ; attempt++ {
		conn, err := h.client(ctx)
		if err != nil {
			return err
		}
		err = h.translate(conn, fn(conn))
		if retry && attempt == 0 && errors.Is(err, ErrUnavailable) {
			continue
		}
		return err
	}
}

// translate maps libvirt's errors onto this package's sentinels, and
// marks conn dead when the error came from the transport rather than from
// libvirtd.
func (h *Libvirt) translate(conn *libvirt.Libvirt, err error) error {
	if err == nil {
		return nil
	}
	var lerr libvirt.Error
	switch {
	case errors.As(err, &lerr):
		switch libvirt.ErrorNumber(lerr.Code) {
		case libvirt.ErrNoDomain:
			return ErrNotFound
		case libvirt.ErrDomExist:
			return ErrExists
		case libvirt.ErrOperationFailed:
			// Defining a second domain with a taken name ends here.
			if strings.Contains(lerr.Message, "already exists") {
				return ErrExists
			}
		case libvirt.ErrOperationInvalid:
			if strings.Contains(lerr.Message, "not running") {
				return fmt.Errorf("%w: %w", ErrNotRunning, err)
			}
		}
		return err
	case errors.Is(err, libvirt.ErrUnsupported), errors.Is(err, context.Canceled),
		errors.Is(err, context.DeadlineExceeded), errors.Is(err, errClosed):
		return err
	}
	// Anything else is the socket failing: ErrInterrupted, EOF, EINVAL
	// from a closed socket, a write error.
	h.forget(conn)
	return fmt.Errorf("%w: %w", ErrUnavailable, err)
}

// hasCode reports whether err is libvirt's error with that code.
func hasCode(err error, code libvirt.ErrorNumber) bool {
	var lerr libvirt.Error
	return errors.As(err, &lerr) && libvirt.ErrorNumber(lerr.Code) == code
}

// lookup finds the domain named id.
func lookup(conn *libvirt.Libvirt, id string) (libvirt.Domain, error) {
	return conn.DomainLookupByName(id)
}

// domainState reads dom's libvirt state.
func domainState(conn *libvirt.Libvirt, dom libvirt.Domain) (libvirt.DomainState, error) {
	st, _, err := conn.DomainGetState(dom, 0)
	return libvirt.DomainState(st), err
}

// stateOf maps a libvirt state and its reason onto State.
func stateOf(s libvirt.DomainState, reason int32) State {
	switch s {
	case libvirt.DomainRunning, libvirt.DomainBlocked:
		return StateRunning
	case libvirt.DomainShutoff:
		// Domains are defined with on_crash=destroy: a crashed guest
		// ends up shut off, for this reason.
		if libvirt.DomainShutoffReason(reason) == libvirt.DomainShutoffCrashed {
			return StateCrashed
		}
		return StateStopped
	case libvirt.DomainShutdown:
		return StateStopping
	case libvirt.DomainPaused, libvirt.DomainPmsuspended:
		return StatePaused
	case libvirt.DomainCrashed:
		return StateCrashed
	}
	return StateUnknown
}

// Create makes the disk, defines a domain from s and starts it; see
// Hypervisor.
func (h *Libvirt) Create(ctx context.Context, s Spec) error {
	if err := h.create(ctx, s); err != nil {
		return fmt.Errorf("create domain %s: %w", s.ID, err)
	}
	h.record(ctx, s.ID) // from just after the start: a very fast guest's first bytes may be missed
	return nil
}

func (h *Libvirt) create(ctx context.Context, s Spec) (err error) {
	if err := s.validate(); err != nil {
		return err
	}
	acc, err := h.detect(ctx)
	if err != nil {
		return err
	}
	opts := xmlOptions{domainType: acc.DomainType, owner: h.owner}
	var own *owner
	if !h.flavour.test && acc.dac != nil {
		own = acc.dac
		opts.dacLabel = fmt.Sprintf("+%d:+%d", own.uid, own.gid)
	}
	for _, f := range []string{s.Image.Disk, s.Image.Kernel, s.Image.Initrd} {
		if f == "" {
			continue
		}
		if _, err := os.Stat(f); err != nil {
			return fmt.Errorf("image %s: %w", s.Image.Name, err)
		}
		if err := reachable(f, own); err != nil {
			return fmt.Errorf("image %s: %w", s.Image.Name, err)
		}
	}

	// Undo what this call made if a later step fails, with a fresh
	// context: the caller's may be what ended the step.
	var undo revert.Reverter
	defer func() {
		if err == nil {
			return
		}
		uctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 30*time.Second)
		defer cancel()
		if uerr := undo.Run(uctx); uerr != nil {
			err = errors.Join(err, uerr)
		}
	}()

	if needsDisk(s) {
		if err := reachable(h.diskPath(s.ID), own); err != nil {
			return err
		}
		if opts.disk, opts.diskFormat, err = h.createDisk(ctx, s, own); err != nil {
			return err
		}
		undo.Add("remove disk", func(context.Context) error {
			_, err := h.removeDisk(s.ID)
			return err
		})
	} else if err := h.noDisk(s.ID); err != nil {
		return err
	}
	var port guard.Port
	if h.guard != nil {
		port = portOf(s, h.guard.Prefix())
		opts.tap = port.Dev
	}
	doc, err := domainXML(s, opts)
	if err != nil {
		return err
	}
	// Without a UUID in the XML, defining a taken name fails rather than
	// redefining the existing domain, so no lookup is needed first and
	// concurrent Creates of one ID cannot both succeed.
	var dom libvirt.Domain
	err = h.call(ctx, false, func(conn *libvirt.Libvirt) error {
		var err error
		dom, err = conn.DomainDefineXMLFlags(doc, libvirt.DomainDefineValidate)
		return err
	})
	if err != nil {
		return fmt.Errorf("define: %w", err)
	}
	undo.Add("undefine domain", func(ctx context.Context) error {
		err := h.call(ctx, true, func(conn *libvirt.Libvirt) error {
			return conn.DomainUndefineFlags(dom, h.flavour.undefineFlags)
		})
		if err != nil && !errors.Is(err, ErrNotFound) {
			return fmt.Errorf("undefine: %w", err)
		}
		return nil
	})
	if h.guard != nil {
		// Before the tap exists, so the VM's first frame is checked.
		if err := h.setGuard(ctx, port); err != nil {
			return err
		}
		undo.Add("unguard port", func(ctx context.Context) error {
			return h.unguard(ctx, port.Dev)
		})
	}
	err = h.call(ctx, false, func(conn *libvirt.Libvirt) error {
		return conn.DomainCreate(dom)
	})
	if err != nil {
		// The usual cause is the bridge: libvirt's message names it.
		return fmt.Errorf("start on bridge %s: %w", s.Bridge, err)
	}
	return nil
}

// domainAndState looks a domain up by ID and reads its state, in one retried call.
func (h *Libvirt) domainAndState(ctx context.Context, id string) (dom libvirt.Domain, st libvirt.DomainState, err error) {
	err = h.call(ctx, true, func(conn *libvirt.Libvirt) error {
		var err error
		if dom, err = lookup(conn, id); err != nil {
			return err
		}
		st, err = domainState(conn, dom)
		return err
	})
	return dom, st, err
}

// Start starts, resumes or restarts the domain; see Hypervisor.
func (h *Libvirt) Start(ctx context.Context, id string) error {
	if err := h.start(ctx, id); err != nil {
		return fmt.Errorf("start domain %s: %w", id, err)
	}
	h.record(ctx, id)
	return nil
}

func (h *Libvirt) start(ctx context.Context, id string) error {
	dom, st, err := h.domainAndState(ctx, id)
	if err != nil {
		return err
	}
	switch st {
	case libvirt.DomainRunning, libvirt.DomainBlocked:
		return nil
	case libvirt.DomainShutdown:
		return errors.New("domain is shutting down")
	}
	if err := h.guardDomain(ctx, dom); err != nil {
		return err
	}
	err = h.call(ctx, false, func(conn *libvirt.Libvirt) error {
		switch st {
		case libvirt.DomainPaused:
			return conn.DomainResume(dom)
		case libvirt.DomainPmsuspended:
			return conn.DomainPmWakeup(dom, 0)
		case libvirt.DomainCrashed:
			// A crashed domain kept for inspection is still
			// active: end it, then boot it afresh.
			if err := conn.DomainDestroy(dom); err != nil {
				return err
			}
		}
		return conn.DomainCreate(dom)
	})
	if err == nil || errors.Is(err, ErrNotFound) || errors.Is(err, ErrUnavailable) {
		return err
	}
	// Someone else may have started it meanwhile: that is success too.
	if now, serr := h.State(ctx, id); serr == nil && now == StateRunning {
		return nil
	}
	return err
}

// Stop shuts the domain down, gracefully first; see Hypervisor.
func (h *Libvirt) Stop(ctx context.Context, id string) error {
	if err := h.stop(ctx, id); err != nil {
		return fmt.Errorf("stop domain %s: %w", id, err)
	}
	return nil
}

func (h *Libvirt) stop(ctx context.Context, id string) error {
	dom, st, err := h.domainAndState(ctx, id)
	if err != nil {
		return err
	}
	switch st {
	case libvirt.DomainShutoff:
		return nil
	case libvirt.DomainPaused, libvirt.DomainPmsuspended, libvirt.DomainCrashed:
		// The guest cannot see a power button press.
		return h.destroy(ctx, dom)
	}
	err = h.call(ctx, false, func(conn *libvirt.Libvirt) error {
		return conn.DomainShutdownFlags(dom, h.flavour.shutdownFlags)
	})
	if err != nil {
		if off, serr := h.isOff(ctx, dom); serr == nil && off {
			return nil // it stopped by itself meanwhile
		}
		return fmt.Errorf("shut down: %w", err)
	}
	deadline := time.NewTimer(h.stopTimeout)
	defer deadline.Stop()
	tick := time.NewTicker(pollInterval)
	defer tick.Stop()
	press := time.NewTicker(pressInterval)
	defer press.Stop()
	for {
		off, err := h.isOff(ctx, dom)
		if err != nil || off {
			return err
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("wait for shutdown: %w", ctx.Err())
		case <-deadline.C:
			return h.destroy(ctx, dom)
		case <-press.C:
			// An error here is the guest going off meanwhile, which
			// the next poll sees.
			h.call(ctx, false, func(conn *libvirt.Libvirt) error {
				return conn.DomainShutdownFlags(dom, h.flavour.shutdownFlags)
			})
		case <-tick.C:
		}
	}
}

// isOff reports whether dom is shut off.
func (h *Libvirt) isOff(ctx context.Context, dom libvirt.Domain) (bool, error) {
	var st libvirt.DomainState
	err := h.call(ctx, true, func(conn *libvirt.Libvirt) error {
		var err error
		st, err = domainState(conn, dom)
		return err
	})
	return st == libvirt.DomainShutoff, err
}

// destroy powers dom off at once; a domain already off is fine.
func (h *Libvirt) destroy(ctx context.Context, dom libvirt.Domain) error {
	err := h.call(ctx, false, func(conn *libvirt.Libvirt) error {
		return conn.DomainDestroy(dom)
	})
	if err != nil {
		if off, serr := h.isOff(ctx, dom); serr == nil && off {
			return nil
		}
		return fmt.Errorf("destroy: %w", err)
	}
	return nil
}

// Restart stops and starts the domain; see Hypervisor.
func (h *Libvirt) Restart(ctx context.Context, id string) error {
	if err := h.stop(ctx, id); err != nil {
		return fmt.Errorf("restart domain %s: %w", id, err)
	}
	if err := h.start(ctx, id); err != nil {
		return fmt.Errorf("restart domain %s: %w", id, err)
	}
	h.record(ctx, id)
	return nil
}

// Remove destroys and undefines the domain and deletes its disk; see
// Hypervisor.
func (h *Libvirt) Remove(ctx context.Context, id string) error {
	err := h.remove(ctx, id)
	if err != nil && !errors.Is(err, ErrNotFound) {
		return fmt.Errorf("remove domain %s: %w", id, err)
	}
	// The disk goes after the domain, which may still be using it; a
	// disk without a domain (a Create cut short by a crash) goes too.
	disk, derr := h.removeDisk(id)
	switch {
	case derr != nil:
		return fmt.Errorf("remove domain %s: %w", id, derr)
	case err != nil && !disk:
		return fmt.Errorf("remove domain %s: %w", id, err)
	}
	return nil
}

func (h *Libvirt) remove(ctx context.Context, id string) error {
	dom, st, err := h.domainAndState(ctx, id)
	if err != nil {
		return err
	}
	if st != libvirt.DomainShutoff {
		if err := h.destroy(ctx, dom); err != nil {
			return err
		}
	}
	if err := h.call(ctx, false, func(conn *libvirt.Libvirt) error {
		return conn.DomainUndefineFlags(dom, h.flavour.undefineFlags)
	}); err != nil {
		return err
	}
	if h.guard != nil {
		return h.unguard(ctx, guard.DevName(h.guard.Prefix(), id))
	}
	return nil
}

// State reports the domain's state; see Hypervisor.
func (h *Libvirt) State(ctx context.Context, id string) (State, error) {
	var st, reason int32
	err := h.call(ctx, true, func(conn *libvirt.Libvirt) error {
		dom, err := lookup(conn, id)
		if err != nil {
			return err
		}
		st, reason, err = conn.DomainGetState(dom, 0)
		return err
	})
	switch {
	case errors.Is(err, ErrNotFound):
		return StateMissing, fmt.Errorf("state of domain %s: %w", id, err)
	case err != nil:
		return StateUnknown, fmt.Errorf("state of domain %s: %w", id, err)
	}
	return stateOf(libvirt.DomainState(st), reason), nil
}

// List reports the domains with this Libvirt's Owner; see Hypervisor.
func (h *Libvirt) List(ctx context.Context) ([]Domain, error) {
	var out []Domain
	err := h.call(ctx, true, func(conn *libvirt.Libvirt) error {
		out = out[:0]
		// One call for every domain's state; an empty list means all.
		recs, err := conn.ConnectGetAllDomainStats(nil, uint32(libvirt.DomainStatsState), 0)
		if err != nil {
			return err
		}
		h.ownersMu.Lock()
		known := h.owners
		h.ownersMu.Unlock()
		seen := make(map[ownerKey]bool, len(recs))
		for _, rec := range recs {
			if err := ctx.Err(); err != nil {
				return err
			}
			k := ownerKey{rec.Dom.UUID, rec.Dom.Name}
			mine, ok := known[k]
			if !ok {
				mine, err = h.owns(conn, rec.Dom)
				if hasCode(err, libvirt.ErrNoDomain) {
					continue // undefined since the listing
				}
				if err != nil {
					return err
				}
			}
			seen[k] = mine
			if mine {
				out = append(out, Domain{ID: rec.Dom.Name, State: statsState(rec.Params)})
			}
		}
		h.ownersMu.Lock()
		h.owners = seen
		h.ownersMu.Unlock()
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("list domains: %w", err)
	}
	return out, nil
}

// owns reports whether dom carries this Libvirt's metadata element.
func (h *Libvirt) owns(conn *libvirt.Libvirt, dom libvirt.Domain) (bool, error) {
	doc, err := conn.DomainGetMetadata(dom, int32(libvirt.DomainMetadataElement),
		libvirt.OptString{metadataNS}, libvirt.DomainAffectCurrent)
	if hasCode(err, libvirt.ErrNoDomainMetadata) {
		return false, nil
	}
	if err != nil {
		return false, err
	}
	// libvirt returns the element without its namespace.
	var m struct {
		Owner string `xml:"owner,attr"`
	}
	if err := xml.Unmarshal([]byte(doc), &m); err != nil {
		return false, nil // not written by this package
	}
	return m.Owner == h.owner, nil
}

// statsState finds the state in a domain's "state" statistics.
func statsState(params []libvirt.TypedParam) State {
	st, reason := int32(-1), int32(0)
	for _, p := range params {
		v, ok := p.Value.I.(int32)
		switch {
		case !ok:
		case p.Field == "state.state":
			st = v
		case p.Field == "state.reason":
			reason = v
		}
	}
	if st < 0 {
		return StateUnknown
	}
	return stateOf(libvirt.DomainState(st), reason)
}
