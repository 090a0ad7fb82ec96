package hv

import (
	"context"
	"encoding/xml"
	"errors"
	"fmt"
	"net"
	"net/url"
	"strings"
	"sync"
	"time"

	"github.com/digitalocean/go-libvirt"
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
	// "kvm". Empty means "test" for a test:// URI and "qemu" otherwise.
	DomainType string
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
}

const (
	defaultURI         = "qemu:///system"
	defaultSocket      = "/run/libvirt/libvirt-sock"
	defaultStopTimeout = 30 * time.Second
	// pollInterval is how often Stop checks whether the guest is off.
	pollInterval = 50 * time.Millisecond
)

// flavour holds what differs between libvirt drivers.
type flavour struct {
	domainType string
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
			domainType:    domainType,
			shutdownFlags: libvirt.DomainShutdownDefault,
			undefineFlags: libvirt.DomainUndefineManagedSave | libvirt.DomainUndefineSnapshotsMetadata,
		}, nil
	case "qemu", "kvm":
		return flavour{
			domainType:    domainType,
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
	uri         string
	socket      string
	owner       string
	stopTimeout time.Duration
	flavour     flavour

	mu     sync.Mutex
	conn   *libvirt.Libvirt // nil until connected, and after a broken call
	closed bool
}

var _ Hypervisor = (*Libvirt)(nil)

// Open connects to libvirtd and opens cfg.URI.
func Open(ctx context.Context, cfg Config) (*Libvirt, error) {
	h := &Libvirt{
		uri:         cfg.URI,
		socket:      cfg.Socket,
		owner:       cfg.Owner,
		stopTimeout: cfg.StopTimeout,
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
	domainType := cfg.DomainType
	if domainType == "" {
		domainType = "qemu"
		if u.Scheme == "test" {
			domainType = "test"
		}
	}
	if h.flavour, err = flavourOf(domainType); err != nil {
		return nil, err
	}
	if _, err := h.client(ctx); err != nil && !(cfg.Lazy && errors.Is(err, ErrUnavailable)) {
		return nil, err
	}
	return h, nil
}

// Close disconnects from libvirtd; later calls fail.
func (h *Libvirt) Close() error {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.closed {
		return nil
	}
	h.closed = true
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

// domainState reads dom's libvirt state and the reason for it.
func domainState(conn *libvirt.Libvirt, dom libvirt.Domain) (libvirt.DomainState, error) {
	st, _, err := conn.DomainGetState(dom, 0)
	return libvirt.DomainState(st), err
}

// stateOf maps a libvirt state onto State.
func stateOf(s libvirt.DomainState) State {
	switch s {
	case libvirt.DomainRunning, libvirt.DomainBlocked:
		return StateRunning
	case libvirt.DomainShutoff:
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

// Create defines a domain from s and starts it; see Hypervisor.
func (h *Libvirt) Create(ctx context.Context, s Spec) error {
	doc, err := domainXML(h.flavour.domainType, s, h.owner)
	if err != nil {
		return fmt.Errorf("create domain %s: %w", s.ID, err)
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
		return fmt.Errorf("define domain %s: %w", s.ID, err)
	}
	err = h.call(ctx, false, func(conn *libvirt.Libvirt) error {
		return conn.DomainCreate(dom)
	})
	if err != nil {
		err = fmt.Errorf("start domain %s: %w", s.ID, err)
		// Undo the definition so a failed Create can be retried. A
		// fresh context: the caller's may be what ended the start.
		uctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
		defer cancel()
		uerr := h.call(uctx, true, func(conn *libvirt.Libvirt) error {
			return conn.DomainUndefineFlags(dom, h.flavour.undefineFlags)
		})
		if uerr != nil && !errors.Is(uerr, ErrNotFound) {
			err = errors.Join(err, fmt.Errorf("undefine domain %s: %w", s.ID, uerr))
		}
		return err
	}
	return nil
}

// Start starts, resumes or restarts the domain; see Hypervisor.
func (h *Libvirt) Start(ctx context.Context, id string) error {
	if err := h.start(ctx, id); err != nil {
		return fmt.Errorf("start domain %s: %w", id, err)
	}
	return nil
}

func (h *Libvirt) start(ctx context.Context, id string) error {
	var dom libvirt.Domain
	var st libvirt.DomainState
	err := h.call(ctx, true, func(conn *libvirt.Libvirt) error {
		var err error
		if dom, err = lookup(conn, id); err != nil {
			return err
		}
		st, err = domainState(conn, dom)
		return err
	})
	if err != nil {
		return err
	}
	switch st {
	case libvirt.DomainRunning, libvirt.DomainBlocked:
		return nil
	case libvirt.DomainShutdown:
		return errors.New("domain is shutting down")
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
	var dom libvirt.Domain
	var st libvirt.DomainState
	err := h.call(ctx, true, func(conn *libvirt.Libvirt) error {
		var err error
		if dom, err = lookup(conn, id); err != nil {
			return err
		}
		st, err = domainState(conn, dom)
		return err
	})
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
	return nil
}

// Remove destroys and undefines the domain; see Hypervisor.
func (h *Libvirt) Remove(ctx context.Context, id string) error {
	if err := h.remove(ctx, id); err != nil {
		return fmt.Errorf("remove domain %s: %w", id, err)
	}
	return nil
}

func (h *Libvirt) remove(ctx context.Context, id string) error {
	var dom libvirt.Domain
	var st libvirt.DomainState
	err := h.call(ctx, true, func(conn *libvirt.Libvirt) error {
		var err error
		if dom, err = lookup(conn, id); err != nil {
			return err
		}
		st, err = domainState(conn, dom)
		return err
	})
	if err != nil {
		return err
	}
	if st != libvirt.DomainShutoff {
		if err := h.destroy(ctx, dom); err != nil {
			return err
		}
	}
	return h.call(ctx, false, func(conn *libvirt.Libvirt) error {
		return conn.DomainUndefineFlags(dom, h.flavour.undefineFlags)
	})
}

// State reports the domain's state; see Hypervisor.
func (h *Libvirt) State(ctx context.Context, id string) (State, error) {
	var st libvirt.DomainState
	err := h.call(ctx, true, func(conn *libvirt.Libvirt) error {
		dom, err := lookup(conn, id)
		if err != nil {
			return err
		}
		st, err = domainState(conn, dom)
		return err
	})
	switch {
	case errors.Is(err, ErrNotFound):
		return StateMissing, fmt.Errorf("state of domain %s: %w", id, err)
	case err != nil:
		return StateUnknown, fmt.Errorf("state of domain %s: %w", id, err)
	}
	return stateOf(st), nil
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
		for _, rec := range recs {
			if err := ctx.Err(); err != nil {
				return err
			}
			mine, err := h.owns(conn, rec.Dom)
			if hasCode(err, libvirt.ErrNoDomain) {
				continue // undefined since the listing
			}
			if err != nil {
				return err
			}
			if mine {
				out = append(out, Domain{ID: rec.Dom.Name, State: statsState(rec.Params)})
			}
		}
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
	for _, p := range params {
		if p.Field != "state.state" {
			continue
		}
		if v, ok := p.Value.I.(int32); ok {
			return stateOf(libvirt.DomainState(v))
		}
	}
	return StateUnknown
}
