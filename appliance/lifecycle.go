package appliance

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"sync"
	"time"

	"github.com/threes-dev/threes/embeddb"
	"github.com/threes-dev/threes/hv"
	"github.com/threes-dev/threes/hv/images"
	"github.com/threes-dev/threes/netboot/ipam"
	"github.com/threes-dev/threes/tsauth/control"
)

// VM states as the database records them. A deleted VM keeps its last state and is
// told apart by its DeletedAt.
const (
	StateCreating = "creating"
	StateRunning  = "running"
	StateStopped  = "stopped"
	StateCrashed  = "crashed"
	// StateMissing is a live VM whose domain libvirt no longer has (drift:
	// reconcile reports it and does not make one up).
	StateMissing = "missing"
)

// CreateSpec is a validated request for a new VM.
type CreateSpec struct {
	Name, Description, Network, Image, Type string
	PublicKey, Script                       string
	KVs                                     []embeddb.KV
}

// Lifecycle owns VM state changes: each one touches the database, the hypervisor and
// the IPAM in an order that leaves nothing behind when a step fails.
type Lifecycle struct {
	db   *embeddb.DB
	hv   hv.Hypervisor
	ipam *ipam.IPAM
	// plane edits the tailnet (policy, auth keys, devices); nil when threes only
	// records networks and VMs join the tailnet by other means.
	plane    control.Plane
	ownerTag string
	images   *images.Store
	bridge   string
	now      func() time.Time
	log      *slog.Logger
	locks    keyedMutex
	rec      reconciler
	// crashAt is the crash test's hook (Options.TestCrashAt); empty outside tests.
	crashAt string
	// newID and newMAC make a new VM's ID and MAC (NewID and NewMAC; tests force
	// collisions).
	newID  func(time.Time) string
	newMAC func() string
	// beforePass runs at the start of each reconcile pass (tests hold a pass
	// back with it); nil outside tests.
	beforePass func(context.Context)
	// phases records the phases a new VM reaches (set up by watch).
	phases *phaseRecorder
}

// validate checks a create request field by field, naming the first bad one.
func (l *Lifecycle) validate(s CreateSpec) (Size, error) {
	if err := ValidateName("name", s.Name); err != nil {
		return Size{}, err
	}
	if err := ValidateDescription(s.Description); err != nil {
		return Size{}, err
	}
	if err := ValidateName("network", s.Network); err != nil {
		return Size{}, err
	}
	size, err := SizeOf(s.Type)
	if err != nil {
		return Size{}, err
	}
	if err := ValidatePublicKey(s.PublicKey); err != nil {
		return Size{}, err
	}
	if len(s.Script) > maxValueLen {
		return Size{}, fieldErr("script", "must be at most %d bytes, has %d", maxValueLen, len(s.Script))
	}
	if err := validateKVs(s.KVs); err != nil {
		return Size{}, err
	}
	return size, nil
}

func validateKVs(kvs []embeddb.KV) error {
	seen := map[string]bool{}
	for _, kv := range kvs {
		if err := ValidateKey(kv.Key); err != nil {
			return err
		}
		if seen[kv.Key] {
			return fieldErr("key", "%q given twice", kv.Key)
		}
		seen[kv.Key] = true
		if len(kv.Value) > maxValueLen {
			return fieldErr("value", "of %q must be at most %d bytes, has %d", kv.Key, maxValueLen, len(kv.Value))
		}
	}
	return nil
}

// Create records the VM's intent, reserves its address, defines and starts its domain,
// and undoes every step already done if a later one fails. An ID, MAC or address that
// turns out to be taken (in this appliance's IPAM, or in the database, which every
// host of a cluster shares) is not an error: the create starts again with new ones.
func (l *Lifecycle) Create(ctx context.Context, s CreateSpec) (vm embeddb.VM, err error) {
	size, err := l.validate(s)
	if err != nil {
		return vm, err
	}
	img, err := l.image(s.Image)
	if err != nil {
		return vm, err
	}
	if _, err := l.db.GetNetwork(ctx, s.Network); err != nil {
		return vm, fmt.Errorf("network %q: %w", s.Network, err)
	}
	if _, err := l.db.VMByName(ctx, s.Name); err == nil {
		return vm, fmt.Errorf("vm name %q: %w", s.Name, embeddb.ErrExists)
	} else if !errors.Is(err, embeddb.ErrNotFound) {
		return vm, err
	}

	for attempt := 1; ; attempt++ {
		vm, err = l.create(ctx, s, size, img)
		var c *collision
		if !errors.As(err, &c) || attempt == maxCreateAttempts {
			return vm, err
		}
		l.log.Info("create: generated "+c.what+" already taken; trying new ones", "name", s.Name, "attempt", attempt, "err", c.err)
	}
}

// maxCreateAttempts bounds Create's retries after a collision. With 24 random bits
// of MAC and 64 of ID, even a /16 full of VMs collides on fewer than 1 in 250 draws.
const maxCreateAttempts = 8

// collision is a generated ID, MAC or address that something already holds.
type collision struct {
	what string // "id", "mac" or "address"
	err  error
}

func (c *collision) Error() string { return c.what + " already taken: " + c.err.Error() }
func (c *collision) Unwrap() error { return c.err }

// collided returns err as a collision if it says a generated value is taken.
func collided(err error) error {
	var fe *embeddb.FieldError
	switch {
	case errors.Is(err, ipam.ErrExists):
		return &collision{"mac", err}
	case errors.As(err, &fe) && errors.Is(err, embeddb.ErrExists):
		switch fe.Field {
		case embeddb.FieldVMID:
			return &collision{"id", err}
		case embeddb.FieldMAC:
			return &collision{"mac", err}
		case embeddb.FieldIP:
			return &collision{"address", err}
		}
	}
	return err
}

// create is one attempt at Create with a new ID and MAC.
func (l *Lifecycle) create(ctx context.Context, s CreateSpec, size Size, img images.Image) (vm embeddb.VM, err error) {
	now := l.now()
	id := l.newID(now)
	// Held until the undo below has run: reconcile takes it before it judges a
	// record, domain or disk with this ID.
	defer l.locks.lock(id)()
	var undo reverter
	defer func() {
		if err != nil {
			undo.run(l.log)
		}
	}()

	mac := l.newMAC()
	hw, _ := net.ParseMAC(mac)
	alloc, err := l.ipam.Reserve(hw, s.Name)
	if err != nil {
		return vm, collided(fmt.Errorf("reserve address for %s: %w", s.Name, err))
	}
	undo.add("release address", func() error { return l.ipam.Release(hw) })
	l.crashPoint(stepAddressReserved)

	// The VM's key to join the tailnet, minted before the record so the record holds
	// it. If the process dies before the record is written, the key was never handed
	// out, is single-use, and expires on its own.
	var key control.AuthKey
	if l.plane != nil {
		key, err = l.plane.MintAuthKey(ctx, control.KeyRequest{Network: s.Network, VMID: id})
		if err != nil {
			return vm, fmt.Errorf("create vm %s: auth key: %w", s.Name, err)
		}
		undo.add("revoke auth key", func() error { return l.plane.RevokeAuthKey(context.WithoutCancel(ctx), key.ID) })
		l.crashPoint(stepKeyMinted)
	}

	vm = embeddb.VM{
		ID: id, Name: s.Name, Description: s.Description, Network: s.Network,
		Image: s.Image, Type: s.Type, MAC: mac, IP: alloc.IP.String(), State: StateCreating,
		Desired: StateRunning, CreatedAt: now, UpdatedAt: now,
	}
	cfg := embeddb.VMConfig{VMID: vm.ID, Hostname: s.Name, Script: s.Script, PublicKey: s.PublicKey,
		AuthKey: key.Key.Reveal(), AuthKeyID: key.ID}
	addr := embeddb.Address{IP: alloc.IP, MAC: mac, Hostname: s.Name, VMID: vm.ID, LeasedAt: now}
	if err := l.db.CreateVM(ctx, vm, cfg, addr); err != nil {
		return vm, collided(err)
	}
	// The record goes last on the way out: if the process dies before this undo runs,
	// the creating state tells the next start what to clean up.
	undo.add("remove record", func() error { return l.db.PurgeVM(context.WithoutCancel(ctx), vm.ID) })
	l.crashPoint(stepRecordWritten)
	// Persisted: DHCP may answer the VM from now on (a fast guest asks before the
	// domain call returns).
	if err := l.ipam.Commit(hw); err != nil {
		return vm, err
	}
	if len(s.KVs) > 0 {
		if err := l.db.UpsertKVs(ctx, vm.ID, s.KVs); err != nil {
			return vm, err
		}
		l.crashPoint(stepKVsWritten)
	}

	spec := hv.Spec{ID: vm.ID, Name: vm.Name, VCPUs: size.VCPUs, MemoryMiB: size.MemoryMiB, MAC: mac, Bridge: l.bridge,
		IP: vm.IP, Network: vm.Network, Image: img, DiskGiB: max(size.DiskGiB, int((img.DiskBytes+1<<30-1)>>30)),
		NoCloud: noCloudURL(l.ipam)}
	if err := l.hv.Create(ctx, spec); err != nil {
		return vm, fmt.Errorf("create vm %s: %w", vm.Name, err)
	}
	undo.add("remove domain", func() error { return l.hv.Remove(context.WithoutCancel(ctx), vm.ID) })
	l.crashPoint(stepDomainCreated)
	// hv.Create defines and starts in one call: the domain is defined now.
	l.phases.recordNow(ctx, vm.ID, PhaseDefined, l.now())

	if err := l.setState(ctx, &vm, StateRunning); err != nil {
		return vm, err
	}
	l.crashPoint(stepStateRunning)
	l.phases.recordNow(ctx, vm.ID, PhaseRunning, vm.UpdatedAt)
	// Read back for the phases just recorded; a failed read is no reason to undo.
	if got, rerr := l.db.GetVM(ctx, vm.ID); rerr == nil {
		vm = got
	}
	return vm, nil
}

// image looks a VM's base image up in the store, as a field error when it is unknown.
func (l *Lifecycle) image(name string) (images.Image, error) {
	if err := images.ValidateName(name); err != nil {
		return images.Image{}, fieldErr("image", "%v", err)
	}
	img, err := l.images.Get(name)
	if errors.Is(err, images.ErrNotFound) {
		names := []string{}
		if all, lerr := l.images.List(); lerr == nil {
			for _, i := range all {
				names = append(names, i.Name)
			}
		}
		return img, fieldErr("image", "unknown image %q: have %v (threes image import)", name, names)
	}
	return img, err
}

// Get returns a VM by ID, live or deleted.
func (l *Lifecycle) Get(ctx context.Context, id string) (embeddb.VM, error) {
	if err := ValidateID(id); err != nil {
		return embeddb.VM{}, err
	}
	vm, err := l.db.GetVM(ctx, id)
	if err != nil {
		return vm, fmt.Errorf("vm %s: %w", id, err)
	}
	return vm, nil
}

// live returns a VM that is not deleted, for calls that change it.
func (l *Lifecycle) live(ctx context.Context, id string) (embeddb.VM, error) {
	vm, err := l.Get(ctx, id)
	if err != nil {
		return vm, err
	}
	if !vm.DeletedAt.IsZero() {
		return vm, fmt.Errorf("vm %s (%s) is deleted: %w", vm.Name, id, ErrState)
	}
	return vm, nil
}

// Start boots a VM's domain. Starting one that runs is refused, so a user who
// expected it stopped learns otherwise (restart is the call that reboots it).
func (l *Lifecycle) Start(ctx context.Context, id string) (embeddb.VM, error) {
	return l.transition(ctx, id, StateRunning, func(ctx context.Context, id string) error {
		if st, err := l.hv.State(ctx, id); err == nil && st == hv.StateRunning {
			return fmt.Errorf("already running (threes vm restart reboots it): %w", ErrState)
		}
		return l.hv.Start(ctx, id)
	})
}

// Stop shuts a VM's domain down, gracefully first.
func (l *Lifecycle) Stop(ctx context.Context, id string) (embeddb.VM, error) {
	return l.transition(ctx, id, StateStopped, l.hv.Stop)
}

// Restart stops and starts a VM's domain.
func (l *Lifecycle) Restart(ctx context.Context, id string) (embeddb.VM, error) {
	return l.transition(ctx, id, StateRunning, l.hv.Restart)
}

func (l *Lifecycle) transition(ctx context.Context, id, to string, do func(context.Context, string) error) (embeddb.VM, error) {
	defer l.locks.lock(id)()
	vm, err := l.live(ctx, id)
	if err != nil {
		return vm, err
	}
	if vm.State == StateCreating {
		return vm, fmt.Errorf("vm %s is still being created: %w", vm.Name, ErrState)
	}
	// The owner's intent first, so a crash during the call still honours it.
	if err := l.setDesired(ctx, &vm, to); err != nil {
		return vm, err
	}
	if err := do(ctx, id); err != nil {
		return vm, fmt.Errorf("vm %s: %w", vm.Name, err)
	}
	return vm, l.setState(ctx, &vm, to)
}

// Delete stops a VM and marks it deleted. Its domain, disk and address stay until Purge,
// so a mistaken delete can still be looked into.
func (l *Lifecycle) Delete(ctx context.Context, id string) (embeddb.VM, error) {
	defer l.locks.lock(id)()
	vm, err := l.live(ctx, id)
	if err != nil {
		return vm, err
	}
	// Off the tailnet first: if the control plane cannot be reached, nothing has
	// changed yet and the delete can simply be tried again.
	if err := l.leaveTailnet(ctx, vm); err != nil {
		return vm, fmt.Errorf("delete vm %s: %w", vm.Name, err)
	}
	if err := l.setDesired(ctx, &vm, StateStopped); err != nil {
		return vm, err
	}
	if err := l.hv.Stop(ctx, id); err != nil && !errors.Is(err, hv.ErrNotFound) {
		return vm, fmt.Errorf("delete vm %s: %w", vm.Name, err)
	}
	now := l.now()
	if err := l.db.SetVMState(ctx, id, StateStopped, now); err != nil {
		return vm, err
	}
	if err := l.db.MarkVMDeleted(ctx, id, now); err != nil {
		return vm, fmt.Errorf("delete vm %s: %w", vm.Name, err)
	}
	return l.db.GetVM(ctx, id)
}

// Purge removes deleted VMs for good: domain, record, key/values and address. With no
// IDs it purges every deleted VM. Naming a live VM is an error and purges nothing.
func (l *Lifecycle) Purge(ctx context.Context, ids []string) ([]string, error) {
	var targets []embeddb.VM
	if len(ids) == 0 {
		all, err := l.db.ListVMs(ctx)
		if err != nil {
			return nil, err
		}
		for _, vm := range all {
			if !vm.DeletedAt.IsZero() {
				targets = append(targets, vm)
			}
		}
	}
	for _, id := range ids {
		vm, err := l.Get(ctx, id)
		if err != nil {
			return nil, err
		}
		if vm.DeletedAt.IsZero() {
			return nil, fmt.Errorf("vm %s (%s) is not deleted; delete it first: %w", vm.Name, id, ErrState)
		}
		targets = append(targets, vm)
	}
	var purged []string
	for _, vm := range targets {
		if err := l.purge(ctx, vm); err != nil {
			return purged, err
		}
		purged = append(purged, vm.ID)
	}
	return purged, nil
}

// leaveTailnet removes a VM's device from the tailnet and revokes its auth key, in
// case it was never used. The device is found by what the guest cannot change: the
// node ID recorded when it joined, and the key it joined with (see vmDevices).
func (l *Lifecycle) leaveTailnet(ctx context.Context, vm embeddb.VM) error {
	if l.plane == nil {
		return nil
	}
	cfg, err := l.db.GetVMConfig(ctx, vm.ID)
	if err != nil {
		return err
	}
	ids, err := l.vmDevices(ctx, vm, cfg)
	if err != nil {
		return fmt.Errorf("find device on tailnet: %w", err)
	}
	for _, id := range ids {
		if err := l.plane.RemoveDevice(ctx, id); err != nil {
			return fmt.Errorf("remove device %s from tailnet: %w", id, err)
		}
	}
	if cfg.AuthKeyID != "" {
		if err := l.plane.RevokeAuthKey(ctx, cfg.AuthKeyID); err != nil {
			return fmt.Errorf("revoke auth key: %w", err)
		}
	}
	return nil
}

func (l *Lifecycle) purge(ctx context.Context, vm embeddb.VM) error {
	defer l.locks.lock(vm.ID)()
	return l.purgeLocked(ctx, vm)
}

// purgeLocked removes a VM whole: off the tailnet, domain, disk, record and address.
// The caller holds the VM's lock.
func (l *Lifecycle) purgeLocked(ctx context.Context, vm embeddb.VM) error {
	// Delete took the VM off the tailnet; a half-created VM never got that far, and
	// its key may still be usable.
	if vm.DeletedAt.IsZero() {
		if err := l.leaveTailnet(ctx, vm); err != nil {
			return fmt.Errorf("purge vm %s: %w", vm.Name, err)
		}
	}
	if err := l.hv.Remove(ctx, vm.ID); err != nil && !errors.Is(err, hv.ErrNotFound) {
		return fmt.Errorf("purge vm %s: %w", vm.Name, err)
	}
	if err := l.db.PurgeVM(ctx, vm.ID); err != nil {
		return fmt.Errorf("purge vm %s: %w", vm.Name, err)
	}
	l.phases.forget(vm.ID, vm.MAC)
	if hw, err := net.ParseMAC(vm.MAC); err == nil {
		if err := l.ipam.Release(hw); err != nil && !errors.Is(err, ipam.ErrNotFound) {
			l.log.Warn("release address", "vm", vm.ID, "err", err)
		}
	}
	return nil
}

func (l *Lifecycle) setState(ctx context.Context, vm *embeddb.VM, state string) error {
	now := l.now()
	if err := l.db.SetVMState(ctx, vm.ID, state, now); err != nil {
		return fmt.Errorf("vm %s: record state %s: %w", vm.Name, state, err)
	}
	vm.State, vm.UpdatedAt = state, now
	return nil
}

func (l *Lifecycle) setDesired(ctx context.Context, vm *embeddb.VM, desired string) error {
	now := l.now()
	if err := l.db.SetVMDesired(ctx, vm.ID, desired, now); err != nil {
		return fmt.Errorf("vm %s: record desired state %s: %w", vm.Name, desired, err)
	}
	vm.Desired, vm.UpdatedAt = desired, now
	return nil
}

// reverter undoes the steps of a half-done operation, last first.
type reverter struct {
	steps []revertStep
}

type revertStep struct {
	name string
	fn   func() error
}

func (r *reverter) add(name string, fn func() error) {
	r.steps = append(r.steps, revertStep{name, fn})
}

func (r *reverter) run(log *slog.Logger) {
	for i := len(r.steps) - 1; i >= 0; i-- {
		if err := r.steps[i].fn(); err != nil {
			log.Error("undo", "step", r.steps[i].name, "err", err)
		}
	}
}

// keyedMutex serialises changes to one VM on this host without blocking others.
type keyedMutex struct {
	mu sync.Mutex
	m  map[string]*keyedEntry
}

type keyedEntry struct {
	mu   sync.Mutex
	refs int
}

func (k *keyedMutex) lock(key string) (unlock func()) {
	k.mu.Lock()
	if k.m == nil {
		k.m = map[string]*keyedEntry{}
	}
	e := k.m[key]
	if e == nil {
		e = &keyedEntry{}
		k.m[key] = e
	}
	e.refs++
	k.mu.Unlock()
	e.mu.Lock()
	return func() {
		e.mu.Unlock()
		k.mu.Lock()
		if e.refs--; e.refs == 0 {
			delete(k.m, key)
		}
		k.mu.Unlock()
	}
}
