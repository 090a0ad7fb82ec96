package fleet

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"time"

	"tailscale.com/client/local"
	"tailscale.com/ipn"
	"tailscale.com/ipn/ipnstate"
	"tailscale.com/tailcfg"

	"github.com/threes-dev/threes/embeddb"
	"github.com/threes-dev/threes/netboot/ipam"
	"github.com/threes-dev/threes/tsauth/control"
	"github.com/threes-dev/threes/tsauth/policy"
)

// The phases of a new VM on its way onto the tailnet, as the database records them,
// in the order a VM reaches them. Each is kept the first time the appliance sees it.
const (
	PhaseDefined       = "defined"        // libvirt holds the domain
	PhaseRunning       = "running"        // the domain was started
	PhaseAddressLeased = "address_leased" // threes' DHCP acknowledged the VM's address
	PhaseConfigFetched = "config_fetched" // the VM read its metadata
	PhaseKeyTaken      = "key_taken"      // the VM took its one-time auth key
	PhaseOnTailnet     = "on_tailnet"     // the appliance's node sees it as a tagged peer
)

// Phases lists the phases in the order a VM reaches them.
func Phases() []string { return slices.Clone(phaseOrder) }

// phaseOrder lists the phases in the order a VM reaches them.
var phaseOrder = []string{PhaseDefined, PhaseRunning, PhaseAddressLeased, PhaseConfigFetched, PhaseKeyTaken, PhaseOnTailnet}

// phaseRecorder writes the phases that DHCP and the metadata server see. They are
// seen on those servers' hot paths: a mark costs a map lookup there, and the write
// (a Raft entry) happens on a goroutine of its own, once per VM and phase.
type phaseRecorder struct {
	db  *embeddb.DB
	log *slog.Logger
	q   chan phaseMark

	mu   sync.RWMutex
	done map[markKey]bool // marks already recorded or queued
}

// markKey names a mark: a VM's phase (failed or not), or a DHCP lease (MAC and IP)
// whose VM is not looked up yet.
type markKey struct {
	vmID, phase string
	failed      bool
	mac         ipam.MACKey
	ip          netip.Addr
}

type phaseMark struct {
	vmID, phase, failure string
	at                   time.Time
	// mac and ip name a DHCP lease whose VM is looked up off the hot path.
	mac net.HardwareAddr
	ip  netip.Addr
	key markKey
}

// phaseQueue bounds the marks waiting to be written. When it is full a mark is
// dropped, not waited for, and not remembered: the next sighting queues it again.
const phaseQueue = 1024

func newPhaseRecorder(db *embeddb.DB, log *slog.Logger) *phaseRecorder {
	return &phaseRecorder{db: db, log: log, q: make(chan phaseMark, phaseQueue), done: map[markKey]bool{}}
}

// run writes queued marks until ctx ends.
func (r *phaseRecorder) run(ctx context.Context) {
	for {
		select {
		case <-ctx.Done():
			return
		case m := <-r.q:
			r.write(ctx, m)
		}
	}
}

func (r *phaseRecorder) write(ctx context.Context, m phaseMark) {
	if m.ip.IsValid() {
		// By MAC, which is unique in the cluster (an IP is only unique per host).
		addr, err := r.db.AddressByMAC(ctx, m.mac.String())
		if err != nil || addr.VMID == "" || addr.IP != m.ip.Unmap() {
			// Not a VM's address (any more): nothing to record, and nothing to
			// remember either, in case the address is a VM's later.
			r.forgetKey(m.key)
			return
		}
		m.vmID = addr.VMID
	}
	if _, err := r.db.RecordVMPhase(ctx, m.vmID, m.phase, m.at, m.failure); err != nil {
		r.forgetKey(m.key)
		if ctx.Err() == nil && !errors.Is(err, embeddb.ErrNotFound) {
			r.log.Warn("record vm phase", "vm", m.vmID, "phase", m.phase, "err", err)
		}
	}
}

// mark queues that the VM reached phase now (or failed it, with failure), unless
// that is already recorded or queued. A mark already made costs a read-locked map
// lookup and no allocation: it sits on the metadata server's path.
func (r *phaseRecorder) mark(vmID, phase string, now func() time.Time, failure string) {
	if r == nil {
		return
	}
	key := markKey{vmID: vmID, phase: phase, failed: failure != ""}
	if r.seen(key) {
		return
	}
	r.enqueue(phaseMark{vmID: vmID, phase: phase, at: now(), failure: failure, key: key})
}

func (r *phaseRecorder) seen(key markKey) bool {
	r.mu.RLock()
	defer r.mu.RUnlock()
	return r.done[key]
}

// leased is DHCP's hook: it acknowledged ip for mac at time at.
func (r *phaseRecorder) leased(mac net.HardwareAddr, ip netip.Addr, at time.Time) {
	if r == nil {
		return
	}
	if len(mac) != 6 {
		return
	}
	key := markKey{mac: ipam.MACKey(mac), ip: ip}
	if r.seen(key) {
		return
	}
	r.enqueue(phaseMark{phase: PhaseAddressLeased, at: at, mac: slices.Clone(mac), ip: ip, key: key})
}

func (r *phaseRecorder) enqueue(m phaseMark) {
	r.mu.Lock()
	if r.done[m.key] {
		r.mu.Unlock()
		return
	}
	r.done[m.key] = true
	r.mu.Unlock()
	select {
	case r.q <- m:
	default:
		r.forgetKey(m.key)
	}
}

// recordNow writes a phase the caller sees on its own (slow) path, such as a create.
func (r *phaseRecorder) recordNow(ctx context.Context, vmID, phase string, at time.Time) {
	if r == nil {
		return
	}
	if _, err := r.db.RecordVMPhase(ctx, vmID, phase, at, ""); err != nil && ctx.Err() == nil {
		r.log.Warn("record vm phase", "vm", vmID, "phase", phase, "err", err)
		return
	}
	r.mu.Lock()
	r.done[markKey{vmID: vmID, phase: phase}] = true
	r.mu.Unlock()
}

func (r *phaseRecorder) forgetKey(key markKey) {
	r.mu.Lock()
	delete(r.done, key)
	r.mu.Unlock()
}

// forget drops what the recorder remembers about a purged VM.
func (r *phaseRecorder) forget(vmID string, mac string) {
	if r == nil {
		return
	}
	hw, _ := net.ParseMAC(mac)
	r.mu.Lock()
	defer r.mu.Unlock()
	for k := range r.done {
		if k.vmID == vmID || (len(hw) == 6 && k.mac == ipam.MACKey(hw)) {
			delete(r.done, k)
		}
	}
}

// TailnetStatus is the part of the appliance's tailnet node the join watcher reads
// (a tailscale local client).
type TailnetStatus interface {
	WatchIPNBus(ctx context.Context, mask ipn.NotifyWatchOpt) (*local.IPNBusWatcher, error)
	Status(ctx context.Context) (*ipnstate.Status, error)
}

// joinRecheck is how often the join watcher looks at the node's peers again without
// a netmap change: a device the control plane did not list yet is tried again.
const joinRecheck = 5 * time.Second

// WatchJoins records each VM that comes onto the tailnet: the appliance's own node
// sees a peer with a threes network tag, the control plane says which VM's key that
// node joined with, and the VM gets the node's ID and its on_tailnet phase. Without a
// control plane threes mints no keys and cannot tell which VM a node is. It runs
// until ctx ends.
func (f *Fleet) WatchJoins(ctx context.Context, lc TailnetStatus) {
	if f.plane == nil {
		return
	}
	settled := map[tailcfg.StableNodeID]bool{}
	tries := map[tailcfg.StableNodeID]int{}
	changed := make(chan struct{}, 1)
	go func() {
		for ctx.Err() == nil {
			w, err := lc.WatchIPNBus(ctx, ipn.NotifyInitialState|ipn.NotifyPeerChanges)
			if err == nil {
				for {
					n, err := w.Next()
					if err != nil {
						break
					}
					if n.NetMap != nil || len(n.PeersChanged) > 0 || n.State != nil || n.SelfChange != nil {
						select {
						case changed <- struct{}{}:
						default:
						}
					}
				}
				w.Close()
			}
			select {
			case <-ctx.Done():
			case <-time.After(time.Second):
			}
		}
	}()
	t := time.NewTicker(joinRecheck)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-changed:
		case <-t.C:
		}
		f.checkJoins(ctx, lc, settled, tries)
	}
}

// joinTries bounds how often the join watcher asks the control plane about a peer it
// does not list: after that the peer is left alone (logged once), so a peer that never
// shows up costs no API call every few seconds for ever.
const joinTries = 12

// checkJoins attributes the tagged peers not settled yet.
func (f *Fleet) checkJoins(ctx context.Context, lc TailnetStatus, settled map[tailcfg.StableNodeID]bool, tries map[tailcfg.StableNodeID]int) {
	st, err := lc.Status(ctx)
	if err != nil {
		return
	}
	at := f.now()
	var fresh []tailcfg.StableNodeID
	for _, p := range st.Peer {
		if settled[p.ID] || p.Tags == nil || !slices.ContainsFunc(p.Tags.AsSlice(), f.isNetworkTag) {
			continue
		}
		fresh = append(fresh, p.ID)
	}
	if len(fresh) == 0 {
		return
	}
	devs, err := f.plane.Devices(ctx)
	if err != nil {
		if ctx.Err() == nil {
			f.log.Warn("tailnet joins: list devices", "err", err)
		}
		return
	}
	for _, id := range fresh {
		i := slices.IndexFunc(devs, func(d control.Device) bool { return d.ID == string(id) })
		if i >= 0 && f.joined(ctx, devs[i], at) {
			settled[id] = true
			delete(tries, id)
			continue
		}
		// Not listed yet, or the database did not answer: the next check tries again.
		if tries[id]++; tries[id] >= joinTries {
			f.log.Warn("tailnet joins: a tagged peer the control plane does not list as a threes device; leaving it", "node", id)
			settled[id] = true
			delete(tries, id)
		}
	}
}

// joined records that device d is the VM whose key it joined with, and reports
// whether d is settled (a VM's, or no VM's).
func (f *Fleet) joined(ctx context.Context, d control.Device, at time.Time) bool {
	vm, err := f.deviceVM(ctx, d)
	if errors.Is(err, embeddb.ErrNotFound) {
		return true
	}
	if err != nil {
		if ctx.Err() == nil {
			f.log.Warn("tailnet joins: which vm", "device", d.ID, "err", err)
		}
		return false
	}
	if tag, _ := policy.NetworkTag(f.ownerTag, vm.Network); !slices.Contains(d.Tags, tag) {
		f.log.Warn("tailnet joins: vm's node lacks its network's tag", "vm", vm.ID, "name", vm.Name, "device", d.ID, "tags", d.Tags, "want", tag)
		return true
	}
	// Under the VM's lock, read again: a delete in between has removed the device.
	defer f.locks.lock(vm.ID)()
	if vm, err = f.db.GetVM(ctx, vm.ID); err != nil || !vm.Live() || vm.NodeID == d.ID {
		return err == nil || errors.Is(err, embeddb.ErrNotFound)
	}
	if err := f.db.SetVMNodeID(ctx, vm.ID, d.ID); err != nil {
		return errors.Is(err, embeddb.ErrNotFound)
	}
	f.phases.recordNow(ctx, vm.ID, PhaseOnTailnet, at)
	f.log.Info("vm on the tailnet", "vm", vm.ID, "name", vm.Name, "node", d.ID, "hostname", d.Hostname)
	return true
}

// deviceVM finds the VM a device belongs to. Where the control plane records the key
// a node joined with (headscale), that decides. Tailscale's API does not say, so
// there a device is a VM's only when exactly one live VM of the device's network
// has taken its key and is not on the tailnet yet (or, with several, the one whose
// name the device reports).
func (f *Fleet) deviceVM(ctx context.Context, d control.Device) (embeddb.VM, error) {
	if d.AuthKeyID != "" {
		return f.db.VMByAuthKeyID(ctx, d.AuthKeyID)
	}
	all, err := f.db.ListVMs(ctx)
	if err != nil {
		return embeddb.VM{}, err
	}
	var waiting []embeddb.VM
	for _, vm := range all {
		tag, _ := policy.NetworkTag(f.ownerTag, vm.Network)
		if vm.Live() && vm.NodeID == "" && slices.Contains(d.Tags, tag) && hasPhase(vm, PhaseKeyTaken) {
			waiting = append(waiting, vm)
		}
	}
	if len(waiting) > 1 {
		waiting = slices.DeleteFunc(waiting, func(vm embeddb.VM) bool { return vm.Name != d.Hostname })
	}
	if len(waiting) != 1 {
		return embeddb.VM{}, fmt.Errorf("device %s: %w", d.ID, embeddb.ErrNotFound)
	}
	return waiting[0], nil
}

func hasPhase(vm embeddb.VM, phase string) bool {
	return slices.ContainsFunc(vm.Phases, func(p embeddb.VMPhase) bool { return p.Phase == phase && p.Error == "" })
}

func (f *Fleet) isNetworkTag(tag string) bool { return strings.HasPrefix(tag, f.ownerTag+"-") }

// vmDevices returns the IDs of the tailnet devices that are the VM's: the node
// recorded when it joined, and any device that joined with its key. Only where
// the control plane cannot say which key a device used (Tailscale) and the join
// was never seen is a device of the VM's network with the VM's name taken as its.
func (f *Fleet) vmDevices(ctx context.Context, vm embeddb.VM, cfg embeddb.VMConfig) ([]string, error) {
	var ids []string
	if vm.NodeID != "" {
		ids = append(ids, vm.NodeID)
	}
	devs, err := f.plane.Devices(ctx)
	if err != nil {
		return nil, err
	}
	tag, _ := policy.NetworkTag(f.ownerTag, vm.Network)
	for _, d := range devs {
		byKey := cfg.AuthKeyID != "" && d.AuthKeyID == cfg.AuthKeyID
		byName := d.AuthKeyID == "" && vm.NodeID == "" && d.Hostname == vm.Name && slices.Contains(d.Tags, tag)
		if (byKey || byName) && !slices.Contains(ids, d.ID) {
			ids = append(ids, d.ID)
		}
	}
	return ids, nil
}
