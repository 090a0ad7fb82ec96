package appliance

import (
	"context"
	"errors"
	"log/slog"
	"net"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"time"

	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/threes-dev/threes/embeddb"
	threesv1 "github.com/threes-dev/threes/proto/threes/v1"
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

// phaseOrder lists the phases in the order a VM reaches them.
var phaseOrder = []string{PhaseDefined, PhaseRunning, PhaseAddressLeased, PhaseConfigFetched, PhaseKeyTaken, PhaseOnTailnet}

func phaseEnum(name string) threesv1.VMPhase {
	return threesv1.VMPhase(threesv1.VMPhase_value["VM_PHASE_"+strings.ToUpper(name)])
}

// phasesProto gives the VM's phases in phase order; ones this build does not know
// (recorded by a newer one) are left out.
func phasesProto(ps []embeddb.VMPhase) []*threesv1.Phase {
	var out []*threesv1.Phase
	for _, p := range ps {
		if e := phaseEnum(p.Phase); e != threesv1.VMPhase_VM_PHASE_UNSPECIFIED {
			out = append(out, &threesv1.Phase{Phase: e, At: timestamppb.New(p.At), Error: p.Error})
		}
	}
	slices.SortStableFunc(out, func(a, b *threesv1.Phase) int { return int(a.Phase) - int(b.Phase) })
	return out
}

// phaseRecorder writes the phases that DHCP and the metadata server see. They are
// seen on those servers' hot paths: a mark costs a map lookup there, and the write
// (a Raft entry) happens on a goroutine of its own, once per VM and phase.
type phaseRecorder struct {
	db  *embeddb.DB
	log *slog.Logger
	q   chan phaseMark

	mu   sync.Mutex
	done map[string]bool // "vmID phase" (or "lease MAC IP") already recorded or queued
}

type phaseMark struct {
	vmID, phase, failure string
	at                   time.Time
	// mac and ip name a DHCP lease whose VM is looked up off the hot path.
	mac net.HardwareAddr
	ip  netip.Addr
	key string
}

// phaseQueue bounds the marks waiting to be written. When it is full a mark is
// dropped, not waited for, and not remembered: the next sighting queues it again.
const phaseQueue = 1024

func newPhaseRecorder(db *embeddb.DB, log *slog.Logger) *phaseRecorder {
	return &phaseRecorder{db: db, log: log, q: make(chan phaseMark, phaseQueue), done: map[string]bool{}}
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
		addr, err := r.db.AddressByIP(ctx, m.ip)
		if err != nil || addr.VMID == "" || !strings.EqualFold(addr.MAC, m.mac.String()) {
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

// mark queues that the VM reached phase at time at (or failed it, with failure),
// unless that is already recorded or queued.
func (r *phaseRecorder) mark(vmID, phase string, at time.Time, failure string) {
	key := vmID + " " + phase
	if failure != "" {
		key += " failed"
	}
	r.enqueue(phaseMark{vmID: vmID, phase: phase, at: at, failure: failure, key: key})
}

// leased is DHCP's hook: it acknowledged ip for mac at time at.
func (r *phaseRecorder) leased(mac net.HardwareAddr, ip netip.Addr, at time.Time) {
	r.enqueue(phaseMark{phase: PhaseAddressLeased, at: at, mac: slices.Clone(mac), ip: ip,
		key: "lease " + mac.String() + " " + ip.String()})
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
	if _, err := r.db.RecordVMPhase(ctx, vmID, phase, at, ""); err != nil && ctx.Err() == nil {
		r.log.Warn("record vm phase", "vm", vmID, "phase", phase, "err", err)
		return
	}
	r.mu.Lock()
	r.done[vmID+" "+phase] = true
	r.mu.Unlock()
}

func (r *phaseRecorder) forgetKey(key string) {
	r.mu.Lock()
	delete(r.done, key)
	r.mu.Unlock()
}

// forget drops what the recorder remembers about a purged VM.
func (r *phaseRecorder) forget(vmID string, mac string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	for k := range r.done {
		if strings.HasPrefix(k, vmID+" ") || (mac != "" && strings.HasPrefix(k, "lease "+mac+" ")) {
			delete(r.done, k)
		}
	}
}
