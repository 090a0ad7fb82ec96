// Package control drives a tailnet's control plane for threes: it adds and removes
// networks in the tailnet policy, mints and revokes the auth keys VMs join with, and
// removes VMs' devices. Two backends implement Plane: Tailscale's hosted API
// (NewTailscale) and a self-hosted headscale's REST API (NewHeadscale).
//
// It owns the API calls, their retries and keeping credentials out of errors. It
// does not own the policy text (tsauth/policy edits that), nor which VMs use which
// network (the appliance knows that), nor where keys are stored.
package control

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"time"

	"github.com/threes-dev/threes/tsauth/policy"
)

// Plane is a tailnet control plane that holds threes' networks, keys and devices.
type Plane interface {
	// EnsureNetwork adds network name's tag and rules to the tailnet policy; when
	// they are already there it changes nothing.
	EnsureNetwork(ctx context.Context, name string) error
	// RemoveNetwork takes out exactly what EnsureNetwork added. It returns
	// ErrNetworkInUse while a device still carries the network's tag.
	RemoveNetwork(ctx context.Context, name string) error
	// MintAuthKey creates a pre-authorised, single-use key that joins one device
	// tagged with the network's tag.
	MintAuthKey(ctx context.Context, req KeyRequest) (AuthKey, error)
	// RevokeAuthKey makes key id unusable; an unknown id is not an error.
	RevokeAuthKey(ctx context.Context, id string) error
	// RemoveDevice deletes the device whose ID (Device.ID) is id if it carries a
	// threes network tag; a device without one is left alone, and no such device
	// at all is not an error. It goes by ID, never by the hostname a device
	// reports, which root in a guest can change.
	RemoveDevice(ctx context.Context, id string) error
	// Devices lists the devices that carry a threes network tag.
	Devices(ctx context.Context) ([]Device, error)
}

// KeyRequest asks for an auth key for one VM.
type KeyRequest struct {
	// Network is the network whose tag the device gets.
	Network string
	// VMID names the VM, for the key's description.
	VMID string
	// Expiry is how long the key stays usable (default DefaultKeyExpiry).
	Expiry time.Duration
}

// DefaultKeyExpiry is how long a minted key stays usable when KeyRequest.Expiry is
// zero: long enough for a VM to boot under emulation, short enough that a leaked key
// is soon worthless.
const DefaultKeyExpiry = 30 * time.Minute

// AuthKey is a minted auth key.
type AuthKey struct {
	// ID identifies the key to the control plane (for RevokeAuthKey).
	ID string
	// Key is what the VM joins with.
	Key Secret
	// Tag is the network tag the key applies.
	Tag string
	// Expires is when the key stops working.
	Expires time.Time
}

// Device is a node on the tailnet that carries a threes network tag.
type Device struct {
	// ID identifies the device to the control plane; it is also the node's
	// StableID in a tailnet peer's netmap entry (headscale's node ID in decimal,
	// Tailscale's nodeId).
	ID string
	// Hostname is the name the device reported (the VM's hostname).
	Hostname string
	// Tags are the device's ACL tags.
	Tags []string
	// Addresses are its tailnet IPs.
	Addresses []string
	// AuthKeyID is the ID of the auth key the device joined with, where the
	// control plane records it (headscale); empty on Tailscale, whose API does
	// not say. The guest cannot change it.
	AuthKeyID string
}

// ErrNetworkInUse means a device still carries the network's tag.
var ErrNetworkInUse = errors.New("network in use")

// ErrPolicyConflict means the policy kept changing under a read-modify-write until
// the attempts ran out.
var ErrPolicyConflict = errors.New("policy changed concurrently")

// ErrConfig means a backend was configured wrongly.
var ErrConfig = errors.New("invalid control plane configuration")

// policyBackend is what the network half of Plane needs from a backend: a
// read-modify-write of its policy, and its devices.
type policyBackend interface {
	editPolicy(ctx context.Context, edit func([]byte) ([]byte, error)) error
	devices(ctx context.Context) ([]Device, error)
}

// ensureNetwork implements Plane.EnsureNetwork for either backend.
func ensureNetwork(ctx context.Context, b policyBackend, backend string, opts policy.Options, red redactor, name string) error {
	err := b.editPolicy(ctx, func(p []byte) ([]byte, error) { return policy.AddNetwork(p, name, opts) })
	if err != nil {
		return red.err(fmt.Errorf("%s: ensure network %s: %w", backend, name, err))
	}
	return nil
}

// removeNetwork implements Plane.RemoveNetwork for either backend: it refuses while
// a device still carries the network's tag.
func removeNetwork(ctx context.Context, b policyBackend, backend string, opts policy.Options, red redactor, name string) error {
	tag, err := policy.NetworkTag(opts.OwnerTag, name)
	if err != nil {
		return err
	}
	devs, err := b.devices(ctx)
	if err != nil {
		return fmt.Errorf("%s: remove network %s: %w", backend, name, err)
	}
	for _, d := range devs {
		if slices.Contains(d.Tags, tag) {
			return fmt.Errorf("%s: remove network %s: device %s (%s) has %s: %w", backend, name, d.Hostname, d.ID, tag, ErrNetworkInUse)
		}
	}
	err = b.editPolicy(ctx, func(p []byte) ([]byte, error) { return policy.RemoveNetwork(p, name, opts) })
	if err != nil {
		return red.err(fmt.Errorf("%s: remove network %s: %w", backend, name, err))
	}
	return nil
}
