// Package hv owns the VMs' libvirt domains and their disks: it creates each
// VM's disk as a copy-on-write overlay on a base image, defines, starts,
// stops, restarts and removes domains through libvirtd, reports their state
// and lifecycle events, and attaches to their serial consoles.
//
// It talks to libvirtd over its unix socket with go-libvirt and builds
// domain XML with libvirtxml. The same code drives libvirt's built-in
// test:///default driver (domain type "test") and QEMU (qemu:///system,
// domain type "kvm" when KVM really boots guests here, else "qemu", TCG).
// Base images live in package images; hv never writes them. It does not own
// IP addresses or the bridge: callers create the bridge and pass its name,
// and the appliance keeps the record of which VMs should exist.
package hv

import (
	"context"
	"errors"
	"io"
	"net"
	"net/netip"
	"net/url"

	"github.com/threes-dev/threes/hv/images"
)

// State is what a domain is doing, as far as the appliance cares.
type State string

const (
	// StateRunning means the guest is running (or blocked in the host,
	// which libvirt reports separately and the appliance need not).
	StateRunning State = "running"
	// StateStopped means the domain is defined but not running: never
	// started, shut down, or destroyed.
	StateStopped State = "stopped"
	// StateStopping means the guest is shutting down but still running.
	StateStopping State = "stopping"
	// StatePaused means the guest's vCPUs are paused (by libvirt or a
	// user) or the guest suspended itself to memory; Start resumes it.
	StatePaused State = "paused"
	// StateCrashed means the guest crashed: libvirt either keeps the
	// domain active for inspection or (as hv defines domains) powered it
	// off; Start boots it again.
	StateCrashed State = "crashed"
	// StateMissing means no domain with that ID exists.
	StateMissing State = "missing"
	// StateUnknown means libvirt reported no state (libvirt's NOSTATE)
	// or one this package does not know.
	StateUnknown State = "unknown"
)

// Spec describes a VM's domain.
type Spec struct {
	// ID names the libvirt domain and is the VM's SMBIOS system SKU
	// (/sys/class/dmi/id/product_sku in a Linux guest).
	ID string
	// Name is the VM's human name, kept as the domain's title.
	Name string
	// VCPUs is the number of virtual CPUs, at least 1.
	VCPUs int
	// MemoryMiB is the guest's memory in MiB, at least 1.
	MemoryMiB int
	// MAC is the address of the VM's one NIC: 6 bytes, e.g. 52:54:00:12:34:56.
	MAC net.HardwareAddr
	// Bridge is the host bridge the NIC is attached to.
	Bridge string
	// IP is the VM's IPv4 address on the bridge. A QEMU domain's tap is
	// guarded (package guard): frames from any other MAC, IPv4 source or
	// ARP claim, and anything but IPv4 and ARP, never leave the VM.
	// The zero Addr holds only the MAC to.
	IP netip.Addr
	// Network is the VM's network: the bridge does not forward frames
	// between VMs of different networks (they talk over the tailnet,
	// where the rules are) unless Config.CrossNetwork. The gateway
	// (DHCP, metadata) stays reachable from all.
	Network string
	// Image is what the VM boots. The zero Image makes a domain with no
	// disk and no kernel, which only the test driver has use for.
	Image images.Image
	// DiskGiB is the virtual size of the VM's disk in GiB. With an image
	// that has a disk, the disk is a qcow2 overlay on it of this size (0
	// keeps the image's size; less than the image's is invalid); without
	// one, a blank qcow2 disk of this size (0: no disk).
	DiskGiB int
	// Cmdline is appended to a kernel image's command line.
	Cmdline string
	// NoCloud is the VM's cloud-init NoCloud seed URL (the metadata
	// server's /cloud-init/, with its trailing slash). The SMBIOS system
	// serial, and a kernel image's command line, carry it as
	// "ds=nocloud-net;s=URL" (see NoCloudSeed), where a stock cloud
	// image's cloud-init finds it. Nil gives the guest no seed.
	NoCloud *url.URL
}

// Domain is one domain this package manages and its state.
type Domain struct {
	// ID is the libvirt domain name (Spec.ID).
	ID string
	// State is the domain's state when List looked.
	State State
}

// Event is a change of one domain's state, from libvirt's lifecycle events.
type Event struct {
	// ID is the domain's ID.
	ID string
	// State is the domain's state after the change; StateMissing when
	// it was undefined.
	State State
	// Reason is libvirt's detail, e.g. "booted", "shutdown",
	// "destroyed", "crashed", "undefined", or "sync" for the current
	// state reported when a subscription (re)starts.
	Reason string
}

// Accel says how QEMU runs guests here and why.
type Accel struct {
	// DomainType is the libvirt domain type domains are created with:
	// "kvm", "qemu" (TCG, emulation) or "test".
	DomainType string
	// Reason says how DomainType was chosen, for the log.
	Reason string
}

// Hypervisor is what the appliance needs to run VMs' domains. Every method
// names the domain in its errors; errors.Is tells ErrNotFound, ErrExists,
// ErrInvalidSpec, ErrNotRunning and ErrUnavailable apart.
type Hypervisor interface {
	// Create makes the VM's disk, defines a domain from s and starts it;
	// it fails with ErrExists if a domain or disk with that ID exists,
	// and leaves nothing behind if it fails.
	Create(ctx context.Context, s Spec) error
	// Start starts a stopped domain, resumes a paused one and restarts
	// a crashed one; it does nothing if the domain is running.
	Start(ctx context.Context, id string) error
	// Stop asks the guest to power off (ACPI power button, pressed again
	// every 2s for a guest still booting), waits for it up to
	// Config.StopTimeout and then powers it off by force; a paused
	// or crashed guest, which cannot see the button, is powered off at
	// once. It does nothing if the domain is stopped.
	Stop(ctx context.Context, id string) error
	// Restart stops the domain as Stop does and starts it again.
	Restart(ctx context.Context, id string) error
	// Remove powers the domain off by force if it runs, undefines it and
	// deletes its disk; it fails with ErrNotFound if there was neither a
	// domain nor a disk with that ID.
	Remove(ctx context.Context, id string) error
	// State reports the domain's state; for an absent domain it returns
	// StateMissing and an error wrapping ErrNotFound.
	State(ctx context.Context, id string) (State, error)
	// List reports every domain this package created, with its state.
	List(ctx context.Context) ([]Domain, error)
	// Disks reports the IDs that have a disk, with or without a domain,
	// so a reconcile can find disks a crash left behind.
	Disks(ctx context.Context) ([]string, error)
	// Events delivers the state changes of this package's domains until
	// ctx ends, then closes the channel. It starts with every domain's
	// current state (Reason "sync") and does so again after each
	// reconnection to libvirtd, so applying events in order converges on
	// libvirt's states even across libvirtd restarts.
	Events(ctx context.Context) (<-chan Event, error)
	// Console attaches to the running domain's serial console: reads
	// first replay its recent output (up to 64 KiB, recorded from the
	// domain's start even with nobody attached, so a late session sees
	// the boot and the login prompt; output of an earlier boot is not
	// replayed), then return what the guest writes; writes are the
	// guest's input (what the guest gets before its shell reads the
	// console may be lost, and on QEMU what it writes in the moment the
	// first session of a boot attaches, when hv reopens the console to
	// carry input). Output, escape sequences included, is passed
	// on as the guest wrote it. Sessions share the console: each reads
	// all the output and all their input reaches the guest. A session
	// that leaves more than 256 KiB unread is cut off (its reads return
	// an error after what it had) rather than holding up the others. A
	// session ends at Close, when ctx ends, or when the domain stops
	// (reads then return io.EOF). It fails with ErrNotRunning for a
	// domain that is not running. (libvirt's test driver keeps no
	// recording: there a session reads from its attach on and takes the
	// console over from any other.)
	Console(ctx context.Context, id string) (io.ReadWriteCloser, error)
	// Accel reports how domains run: KVM or TCG, and why.
	Accel(ctx context.Context) (Accel, error)
}

var (
	// ErrNotFound means no domain has the given ID.
	ErrNotFound = errors.New("domain not found")
	// ErrExists means a domain with the given ID already exists.
	ErrExists = errors.New("domain already exists")
	// ErrInvalidSpec means a Spec cannot describe a domain, e.g. it has
	// no ID or a malformed MAC.
	ErrInvalidSpec = errors.New("invalid domain spec")
	// ErrUnavailable means libvirtd could not be reached or the
	// connection broke during the call; the next call reconnects.
	ErrUnavailable = errors.New("libvirt unavailable")
	// ErrNotRunning means the call needs a running domain.
	ErrNotRunning = errors.New("domain not running")
)
