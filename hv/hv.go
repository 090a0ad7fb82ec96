// Package hv owns the VMs' libvirt domains: it defines, starts, stops,
// restarts and removes them through libvirtd and reports their state.
//
// It talks to libvirtd over its unix socket with go-libvirt and builds
// domain XML with libvirtxml. The same code drives libvirt's built-in
// test:///default driver (domain type "test") and QEMU (qemu:///system,
// domain type "qemu" for TCG or "kvm"). It does not own disks, images, IP
// addresses or the bridge: callers create the bridge and pass its name, and
// the appliance keeps the record of which VMs should exist.
package hv

import (
	"context"
	"errors"
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
	// StateCrashed means the guest crashed and libvirt kept the domain
	// active for inspection; Start restarts it.
	StateCrashed State = "crashed"
	// StateMissing means no domain with that ID exists.
	StateMissing State = "missing"
	// StateUnknown means libvirt reported no state (libvirt's NOSTATE)
	// or one this package does not know.
	StateUnknown State = "unknown"
)

// Spec describes a VM's domain.
type Spec struct {
	// ID names the libvirt domain and is the VM's SMBIOS system serial.
	ID string
	// Name is the VM's human name, kept as the domain's title.
	Name string
	// VCPUs is the number of virtual CPUs, at least 1.
	VCPUs int
	// MemoryMiB is the guest's memory in MiB, at least 1.
	MemoryMiB int
	// MAC is the address of the VM's one NIC, e.g. "52:54:00:12:34:56".
	MAC string
	// Bridge is the host bridge the NIC is attached to.
	Bridge string
}

// Domain is one domain this package manages and its state.
type Domain struct {
	// ID is the libvirt domain name (Spec.ID).
	ID string
	// State is the domain's state when List looked.
	State State
}

// Hypervisor is what the appliance needs to run VMs' domains. Every method
// names the domain in its errors; errors.Is tells ErrNotFound, ErrExists,
// ErrInvalidSpec and ErrUnavailable apart.
type Hypervisor interface {
	// Create defines a domain from s and starts it; it fails with
	// ErrExists if a domain with that ID exists, and leaves nothing
	// behind if it fails.
	Create(ctx context.Context, s Spec) error
	// Start starts a stopped domain, resumes a paused one and restarts
	// a crashed one; it does nothing if the domain is running.
	Start(ctx context.Context, id string) error
	// Stop asks the guest to power off (ACPI power button), waits for it
	// up to Config.StopTimeout and then powers it off by force; a paused
	// or crashed guest, which cannot see the button, is powered off at
	// once. It does nothing if the domain is stopped.
	Stop(ctx context.Context, id string) error
	// Restart stops the domain as Stop does and starts it again.
	Restart(ctx context.Context, id string) error
	// Remove powers the domain off by force if it runs and undefines it;
	// it fails with ErrNotFound if there is no such domain.
	Remove(ctx context.Context, id string) error
	// State reports the domain's state; for an absent domain it returns
	// StateMissing and an error wrapping ErrNotFound.
	State(ctx context.Context, id string) (State, error)
	// List reports every domain this package created, with its state.
	List(ctx context.Context) ([]Domain, error)
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
)
