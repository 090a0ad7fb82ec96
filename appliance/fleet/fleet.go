package fleet

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"net/url"
	"slices"
	"sync"
	"time"

	"github.com/threes-dev/threes/embeddb"
	"github.com/threes-dev/threes/hv"
	"github.com/threes-dev/threes/hv/images"
	"github.com/threes-dev/threes/internal/revert"
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

// States lists the states a VM record can hold.
func States() []string {
	return []string{StateCreating, StateRunning, StateStopped, StateCrashed, StateMissing}
}

// CreateSpec is a validated request for a new VM.
type CreateSpec struct {
	Name, Description, Network, Image, Type string
	PublicKey, Script                       string
	KVs                                     []embeddb.KV
	// Host names the host to run the VM on; empty lets placement pick.
	Host string
}

// Config is what a Fleet works with. DB, HV, IPAM and Images are required.
type Config struct {
	DB     *embeddb.DB
	HV     hv.Hypervisor
	IPAM   *ipam.IPAM
	Images *images.Store
	// Plane edits the tailnet (policy, auth keys, devices); nil when threes only
	// records networks and VMs join the tailnet by other means.
	Plane control.Plane
	// OwnerTag is the appliance's own tag, owner and prefix of network tags;
	// default DefaultOwnerTag.
	OwnerTag string
	// Bridge is the bridge VMs' NICs attach to.
	Bridge string
	// Host names this host among those sharing the database; the VMs it
	// creates carry it, and it runs, reconciles and changes only those (and
	// VMs recorded with no host, from before hosts were recorded).
	Host string
	// NoCloud is the cloud-init seed URL every VM is given (the metadata
	// server's /cloud-init/); nil gives none.
	NoCloud *url.URL
	// Shared says other hosts write to the database too (a cluster): what this
	// host caches about a VM is then read again at least every SharedMaxAge, as
	// their writes do not show in its write counters.
	Shared bool
	// Capacity is this host's room for VMs, which placement weighs.
	Capacity Capacity
	Now      func() time.Time // default time.Now
	Log      *slog.Logger     // default slog.Default()
}

// SharedMaxAge bounds how stale the metadata server's view of a VM, and a Watch,
// may be when other hosts share the database.
const SharedMaxAge = time.Second

// Fleet owns VM state changes: each one touches the database, the hypervisor and
// the IPAM in an order that leaves nothing behind when a step fails, under the
// VM's lock.
type Fleet struct {
	db       *embeddb.DB
	hv       hv.Hypervisor
	ipam     *ipam.IPAM
	plane    control.Plane
	ownerTag string
	images   *images.Store
	bridge   string
	host     string
	capacity Capacity
	noCloud  *url.URL
	now      func() time.Time
	log      *slog.Logger
	locks    keyedMutex
	rec      reconciler
	hooks    Hooks
	// imageMu keeps an image from going while a create uses it: creates
	// share it, DeleteImage takes it alone.
	imageMu sync.RWMutex
	// phases records the phases a new VM reaches.
	phases *phaseRecorder
	md     *MetadataSource
	shared bool // Config.Shared
}

// Hooks let a test steer what is otherwise random or timed. Production code leaves
// them zero; tests set them through New's caller (see appliance's export_test.go).
type Hooks struct {
	// NewID and NewMAC make a new VM's ID and MAC; default NewID and NewMAC
	// (tests force collisions).
	NewID  func(time.Time) string
	NewMAC func() net.HardwareAddr
	// BeforePass runs at the start of each reconcile pass (tests hold a pass
	// back with it).
	BeforePass func(context.Context)
}

// New returns a Fleet over cfg. Its background work (events, reconcile, phase
// marks) starts with Run.
func New(cfg Config, hooks Hooks) *Fleet {
	if cfg.OwnerTag == "" {
		cfg.OwnerTag = DefaultOwnerTag
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	if cfg.Log == nil {
		cfg.Log = slog.Default()
	}
	if hooks.NewID == nil {
		hooks.NewID = NewID
	}
	if hooks.NewMAC == nil {
		hooks.NewMAC = NewMAC
	}
	f := &Fleet{db: cfg.DB, hv: cfg.HV, ipam: cfg.IPAM, plane: cfg.Plane, ownerTag: cfg.OwnerTag,
		images: cfg.Images, bridge: cfg.Bridge, host: cfg.Host, capacity: cfg.Capacity, noCloud: cfg.NoCloud, now: cfg.Now, log: cfg.Log,
		hooks: hooks, phases: newPhaseRecorder(cfg.DB, cfg.Log)}
	f.md = newMDSource(cfg.DB, cfg.Host, cfg.IPAM, cfg.Now)
	if cfg.Shared {
		f.md.maxAge = SharedMaxAge
		f.shared = true
	}
	f.md.phases = f.phases
	return f
}

// MetadataSource is the fleet as the metadata server reads it.
func (f *Fleet) MetadataSource() *MetadataSource { return f.md }

// Leased records that DHCP acknowledged a VM's address (dhcp.ServerConfig.OnAck).
func (f *Fleet) Leased(mac net.HardwareAddr, ip netip.Addr, at time.Time) {
	f.phases.leased(mac, ip, at)
}

// List returns the VMs, deleted ones too when includeDeleted.
func (f *Fleet) List(ctx context.Context, includeDeleted bool) ([]embeddb.VM, error) {
	vms, err := f.db.ListVMs(ctx)
	if err != nil || includeDeleted {
		return vms, err
	}
	return slices.DeleteFunc(vms, func(vm embeddb.VM) bool { return !vm.Live() }), nil
}

// ByName returns the live VM of that name.
func (f *Fleet) ByName(ctx context.Context, name string) (embeddb.VM, error) {
	if err := ValidateName("name", name); err != nil {
		return embeddb.VM{}, err
	}
	vm, err := f.db.VMByName(ctx, name)
	if err != nil {
		return vm, fmt.Errorf("vm %q: %w", name, err)
	}
	return vm, nil
}

// Networks lists the networks.
func (f *Fleet) Networks(ctx context.Context) ([]embeddb.Network, error) {
	return f.db.ListNetworks(ctx)
}

// gen is a counter that changes whenever this host writes about the VM: a watcher
// reads the VM again only when it moved. It costs no database read.
func (f *Fleet) gen(id string) uint64 { return f.db.VMGen(id) }

// validate checks a create request field by field, naming the first bad one.
func (f *Fleet) validate(s CreateSpec) (Size, error) {
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
func (f *Fleet) Create(ctx context.Context, s CreateSpec) (vm embeddb.VM, err error) {
	size, err := f.validate(s)
	if err != nil {
		return vm, err
	}
	host, err := f.Place(ctx, s.Type, s.Host)
	if err != nil {
		return vm, err
	}
	if host != f.host {
		// The image, the disk and the domain are that host's.
		return vm, elsewhere(host, "vm %s is to run on host %s, and this is %s", s.Name, host, f.host)
	}
	f.imageMu.RLock()
	defer f.imageMu.RUnlock()
	img, err := f.image(s.Image)
	if err != nil {
		return vm, err
	}
	if _, err := f.db.GetNetwork(ctx, s.Network); err != nil {
		return vm, fmt.Errorf("network %q: %w", s.Network, err)
	}
	if _, err := f.db.VMByName(ctx, s.Name); err == nil {
		return vm, fmt.Errorf("vm name %q: %w", s.Name, embeddb.ErrExists)
	} else if !errors.Is(err, embeddb.ErrNotFound) {
		return vm, err
	}

	for attempt := 1; ; attempt++ {
		vm, err = f.create(ctx, s, size, img)
		var c *collision
		if !errors.As(err, &c) || attempt == maxCreateAttempts {
			return vm, err
		}
		f.log.Info("create: generated "+c.what+" already taken; trying new ones", "name", s.Name, "attempt", attempt, "err", c.err)
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
func (f *Fleet) create(ctx context.Context, s CreateSpec, size Size, img images.Image) (vm embeddb.VM, err error) {
	now := f.now()
	id := f.hooks.NewID(now)
	// Held until the undo below has run: reconcile takes it before it judges a
	// record, domain or disk with this ID.
	defer f.locks.lock(id)()
	var undo revert.Reverter
	defer func() {
		if err != nil {
			f.undo(ctx, &undo)
		}
	}()

	hw := f.hooks.NewMAC()
	mac := hw.String()
	alloc, err := f.ipam.Reserve(hw, s.Name)
	if err != nil {
		return vm, collided(fmt.Errorf("reserve address for %s: %w", s.Name, err))
	}
	undo.Add("release address", func(context.Context) error { return f.ipam.Release(hw) })
	f.crashPoint(stepAddressReserved)

	// The VM's key to join the tailnet, minted before the record so the record holds
	// it. If the process dies before the record is written, the key was never handed
	// out, is single-use, and expires on its own.
	var key control.AuthKey
	if f.plane != nil {
		key, err = f.plane.MintAuthKey(ctx, control.KeyRequest{Network: s.Network, VMID: id})
		if err != nil {
			return vm, fmt.Errorf("create vm %s: auth key: %w", s.Name, err)
		}
		undo.Add("revoke auth key", func(ctx context.Context) error { return f.plane.RevokeAuthKey(ctx, key.ID) })
		f.crashPoint(stepKeyMinted)
	}

	vm = embeddb.VM{
		ID: id, Name: s.Name, Description: s.Description, Network: s.Network,
		Image: s.Image, Type: s.Type, Host: f.host, State: StateCreating,
		Desired: StateRunning, CreatedAt: now, UpdatedAt: now,
	}
	cfg := embeddb.VMConfig{VMID: vm.ID, Hostname: s.Name, Script: s.Script, PublicKey: s.PublicKey,
		AuthKey: key.Key.Reveal(), AuthKeyID: key.ID}
	addr := embeddb.Address{IP: alloc.IP, MAC: mac, Hostname: s.Name, VMID: vm.ID, LeasedAt: now}
	// The address record is the one place the VM's MAC and IP are kept.
	if err := f.db.CreateVM(ctx, vm, cfg, addr); err != nil {
		return vm, collided(err)
	}
	vm.MAC, vm.IP = mac, alloc.IP.String()
	// The record goes last on the way out: if the process dies before this undo runs,
	// the creating state tells the next start what to clean up.
	undo.Add("remove record", func(ctx context.Context) error { return f.db.PurgeVM(ctx, vm.ID) })
	f.crashPoint(stepRecordWritten)
	// Persisted: DHCP may answer the VM from now on (a fast guest asks before the
	// domain call returns).
	if err := f.ipam.Commit(hw); err != nil {
		return vm, err
	}
	if len(s.KVs) > 0 {
		if err := f.db.UpsertKVs(ctx, vm.ID, s.KVs); err != nil {
			return vm, err
		}
		f.crashPoint(stepKVsWritten)
	}

	spec := hv.Spec{ID: vm.ID, Name: vm.Name, VCPUs: size.VCPUs, MemoryMiB: size.MemoryMiB, MAC: hw, Bridge: f.bridge,
		IP: alloc.IP, Network: vm.Network, Image: img, DiskGiB: max(size.DiskGiB, int((img.DiskBytes+1<<30-1)>>30)),
		NoCloud: f.noCloud}
	if err := f.hv.Create(ctx, spec); err != nil {
		return vm, fmt.Errorf("create vm %s: %w", vm.Name, err)
	}
	undo.Add("remove domain", func(ctx context.Context) error { return f.hv.Remove(ctx, vm.ID) })
	f.crashPoint(stepDomainCreated)
	// hv.Create defines and starts in one call: the domain is defined now.
	f.phases.recordNow(ctx, vm.ID, PhaseDefined, f.now())

	if err := f.setState(ctx, &vm, StateRunning); err != nil {
		return vm, err
	}
	f.crashPoint(stepStateRunning)
	f.phases.recordNow(ctx, vm.ID, PhaseRunning, vm.UpdatedAt)
	// Read back for the phases just recorded; a failed read is no reason to undo.
	if got, rerr := f.db.GetVM(ctx, vm.ID); rerr == nil {
		vm = got
	}
	return vm, nil
}

// image looks a VM's base image up in the store, as a field error when it is unknown.
func (f *Fleet) image(name string) (images.Image, error) {
	if err := images.ValidateName(name); err != nil {
		return images.Image{}, fieldErr("image", "%v", err)
	}
	img, err := f.images.Get(name)
	if errors.Is(err, images.ErrNotFound) {
		names := []string{}
		if all, lerr := f.images.List(); lerr == nil {
			for _, i := range all {
				names = append(names, i.Name)
			}
		}
		return img, fieldErr("image", "unknown image %q: have %v (threes image import)", name, names)
	}
	return img, err
}

// Get returns a VM by ID, live or deleted.
func (f *Fleet) Get(ctx context.Context, id string) (embeddb.VM, error) {
	if err := ValidateID(id); err != nil {
		return embeddb.VM{}, err
	}
	vm, err := f.db.GetVM(ctx, id)
	if err != nil {
		return vm, fmt.Errorf("vm %s: %w", id, err)
	}
	return vm, nil
}

// mine reports whether vm's domain is this host's to run.
func (f *Fleet) mine(vm embeddb.VM) bool { return vm.Host == "" || vm.Host == f.host }

// local returns a live VM of this host, for calls that need its domain.
func (f *Fleet) local(ctx context.Context, id string) (embeddb.VM, error) {
	vm, err := f.live(ctx, id)
	if err == nil && !f.mine(vm) {
		err = elsewhere(vm.Host, "vm %s runs on host %s, and this is %s", vm.Name, vm.Host, f.host)
	}
	return vm, err
}

// live returns a VM that is not deleted, for calls that change it.
func (f *Fleet) live(ctx context.Context, id string) (embeddb.VM, error) {
	vm, err := f.Get(ctx, id)
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
func (f *Fleet) Start(ctx context.Context, id string) (embeddb.VM, error) {
	return f.transition(ctx, id, StateRunning, func(ctx context.Context, id string) error {
		if st, err := f.hv.State(ctx, id); err == nil && st == hv.StateRunning {
			return fmt.Errorf("already running (threes vm restart reboots it): %w", ErrState)
		}
		return f.hv.Start(ctx, id)
	})
}

// Stop shuts a VM's domain down, gracefully first.
func (f *Fleet) Stop(ctx context.Context, id string) (embeddb.VM, error) {
	return f.transition(ctx, id, StateStopped, f.hv.Stop)
}

// Restart stops and starts a VM's domain.
func (f *Fleet) Restart(ctx context.Context, id string) (embeddb.VM, error) {
	return f.transition(ctx, id, StateRunning, f.hv.Restart)
}

func (f *Fleet) transition(ctx context.Context, id, to string, do func(context.Context, string) error) (embeddb.VM, error) {
	defer f.locks.lock(id)()
	vm, err := f.local(ctx, id)
	if err != nil {
		return vm, err
	}
	if vm.State == StateCreating {
		return vm, fmt.Errorf("vm %s is still being created: %w", vm.Name, ErrState)
	}
	// The owner's intent first, so a crash during the call still honours it.
	if err := f.setDesired(ctx, &vm, to); err != nil {
		return vm, err
	}
	if err := do(ctx, id); err != nil {
		return vm, fmt.Errorf("vm %s: %w", vm.Name, err)
	}
	return vm, f.setState(ctx, &vm, to)
}

// Delete stops a VM and marks it deleted. Its domain, disk and address stay until Purge,
// so a mistaken delete can still be looked into.
func (f *Fleet) Delete(ctx context.Context, id string) (embeddb.VM, error) {
	defer f.locks.lock(id)()
	vm, err := f.local(ctx, id)
	if err != nil {
		return vm, err
	}
	// Off the tailnet first: if the control plane cannot be reached, nothing has
	// changed yet and the delete can simply be tried again.
	if err := f.leaveTailnet(ctx, vm); err != nil {
		return vm, fmt.Errorf("delete vm %s: %w", vm.Name, err)
	}
	if err := f.setDesired(ctx, &vm, StateStopped); err != nil {
		return vm, err
	}
	if err := f.hv.Stop(ctx, id); err != nil && !errors.Is(err, hv.ErrNotFound) {
		return vm, fmt.Errorf("delete vm %s: %w", vm.Name, err)
	}
	now := f.now()
	if err := f.db.SetVMState(ctx, id, StateStopped, now); err != nil {
		return vm, err
	}
	if err := f.db.MarkVMDeleted(ctx, id, now); err != nil {
		return vm, fmt.Errorf("delete vm %s: %w", vm.Name, err)
	}
	return f.db.GetVM(ctx, id)
}

// Purge removes deleted VMs for good: domain, record, key/values and address. With no
// IDs it purges every deleted VM. Naming a live VM is an error and purges nothing.
func (f *Fleet) Purge(ctx context.Context, ids []string) ([]string, error) {
	var targets []embeddb.VM
	if len(ids) == 0 {
		all, err := f.db.ListVMs(ctx)
		if err != nil {
			return nil, err
		}
		// Another host's deleted VMs are its to purge: their domains are there.
		for _, vm := range all {
			if !vm.DeletedAt.IsZero() && f.mine(vm) {
				targets = append(targets, vm)
			}
		}
	}
	for _, id := range ids {
		vm, err := f.Get(ctx, id)
		if err != nil {
			return nil, err
		}
		if vm.DeletedAt.IsZero() {
			return nil, fmt.Errorf("vm %s (%s) is not deleted; delete it first: %w", vm.Name, id, ErrState)
		}
		if !f.mine(vm) {
			return nil, elsewhere(vm.Host, "vm %s (%s) ran on host %s, and this is %s", vm.Name, id, vm.Host, f.host)
		}
		targets = append(targets, vm)
	}
	var purged []string
	for _, vm := range targets {
		if err := f.purge(ctx, vm); err != nil {
			return purged, err
		}
		purged = append(purged, vm.ID)
	}
	return purged, nil
}

// leaveTailnet removes a VM's device from the tailnet and revokes its auth key, in
// case it was never used. The device is found by what the guest cannot change: the
// node ID recorded when it joined, and the key it joined with (see vmDevices).
func (f *Fleet) leaveTailnet(ctx context.Context, vm embeddb.VM) error {
	if f.plane == nil {
		return nil
	}
	cfg, err := f.db.GetVMConfig(ctx, vm.ID)
	if err != nil {
		return err
	}
	ids, err := f.vmDevices(ctx, vm, cfg)
	if err != nil {
		return fmt.Errorf("find device on tailnet: %w", err)
	}
	for _, id := range ids {
		if err := f.plane.RemoveDevice(ctx, id); err != nil {
			return fmt.Errorf("remove device %s from tailnet: %w", id, err)
		}
	}
	if cfg.AuthKeyID != "" {
		if err := f.plane.RevokeAuthKey(ctx, cfg.AuthKeyID); err != nil {
			return fmt.Errorf("revoke auth key: %w", err)
		}
	}
	return nil
}

func (f *Fleet) purge(ctx context.Context, vm embeddb.VM) error {
	defer f.locks.lock(vm.ID)()
	return f.purgeLocked(ctx, vm)
}

// purgeLocked removes a VM whole: off the tailnet, domain, disk, record and address.
// The caller holds the VM's lock.
func (f *Fleet) purgeLocked(ctx context.Context, vm embeddb.VM) error {
	// Delete took the VM off the tailnet; a half-created VM never got that far, and
	// its key may still be usable.
	if vm.DeletedAt.IsZero() {
		if err := f.leaveTailnet(ctx, vm); err != nil {
			return fmt.Errorf("purge vm %s: %w", vm.Name, err)
		}
	}
	if err := f.hv.Remove(ctx, vm.ID); err != nil && !errors.Is(err, hv.ErrNotFound) {
		return fmt.Errorf("purge vm %s: %w", vm.Name, err)
	}
	if err := f.db.PurgeVM(ctx, vm.ID); err != nil {
		return fmt.Errorf("purge vm %s: %w", vm.Name, err)
	}
	f.phases.forget(vm.ID, vm.MAC)
	if hw, err := net.ParseMAC(vm.MAC); err == nil {
		if err := f.ipam.Release(hw); err != nil && !errors.Is(err, ipam.ErrNotFound) {
			f.log.Warn("release address", "vm", vm.ID, "err", err)
		}
	}
	return nil
}

func (f *Fleet) setState(ctx context.Context, vm *embeddb.VM, state string) error {
	now := f.now()
	if err := f.db.SetVMState(ctx, vm.ID, state, now); err != nil {
		return fmt.Errorf("vm %s: record state %s: %w", vm.Name, state, err)
	}
	vm.State, vm.UpdatedAt = state, now
	return nil
}

func (f *Fleet) setDesired(ctx context.Context, vm *embeddb.VM, desired string) error {
	now := f.now()
	if err := f.db.SetVMDesired(ctx, vm.ID, desired, now); err != nil {
		return fmt.Errorf("vm %s: record desired state %s: %w", vm.Name, desired, err)
	}
	vm.Desired, vm.UpdatedAt = desired, now
	return nil
}

// undo reverts a failed change's steps with a context of their own: the caller's
// may be what ended the change. What cannot be undone is logged; reconcile finds
// what it left.
func (f *Fleet) undo(ctx context.Context, r *revert.Reverter) {
	uctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), undoTimeout)
	defer cancel()
	if err := r.Run(uctx); err != nil {
		f.log.Error("undo a failed change", "err", err)
	}
}

// undoTimeout bounds the undo of one failed change.
const undoTimeout = 30 * time.Second

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
