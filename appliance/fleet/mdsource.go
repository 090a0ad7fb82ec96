package fleet

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"sync"
	"time"

	"github.com/threes-dev/threes/embeddb"
	"github.com/threes-dev/threes/netboot/ipam"
	"github.com/threes-dev/threes/netboot/metadata"
)

// MetadataSource is the database as the metadata server sees it: this host's live VMs
// by address (each host has a bridge of its own, so the same address may be another
// VM's on another host), from a per-VM cache. A VM's entry is current while the
// database's VMGen for it stays what it was when the entry was read, so a request
// costs no database read (let alone a round trip to the Raft leader) until this
// appliance writes something about that VM. VMGen counts only this host's writes:
// when other hosts share the database (a cluster), an entry is also read again once
// it is maxAge old, so their writes show within maxAge.
//
// On a cluster member the source reads this node's own copy of the database
// (embeddb.Local, at most maxStale behind the leader), not the leader: the metadata
// server is on every VM's boot path and must not wait on a round trip to the leader,
// nor fail while a new one is elected. Only a miss asks the leader, since this
// node's copy may not hold a VM created moments ago, and so does an address whose
// MAC is not the one this host's IPAM holds for it: the copy is behind this host's
// own writes (an address purged and handed to a new VM), and must not give the new
// VM the old one's data. The auth key is always taken by a write on the leader,
// which is what makes it once only.
type MetadataSource struct {
	db   *embeddb.DB
	host string // whose addresses it looks up
	// ipam is this host's, which a read from this node's copy must agree with
	// (nil: no check).
	ipam   *ipam.IPAM
	now    func() time.Time
	maxAge time.Duration // 0: entries stay while VMGen does (this host makes every write)
	// maxStale bounds how far this node's copy may lag when maxAge is set and
	// reads go there.
	maxStale time.Duration
	// phases hears which VMs read their config and took their key (nil: nobody).
	phases *phaseRecorder

	mu     sync.RWMutex
	byIP   map[netip.Addr]mdEntry
	served map[string]bool // VM IDs whose auth key was handed out: that never reverts
}

type mdEntry struct {
	inst metadata.Instance
	gen  uint64    // db.VMGen(inst.ID) before the entry was read
	at   time.Time // when it was read
}

func newMDSource(db *embeddb.DB, host string, pool *ipam.IPAM, now func() time.Time) *MetadataSource {
	return &MetadataSource{db: db, host: host, ipam: pool, now: now, maxStale: LocalMaxStale,
		byIP: map[netip.Addr]mdEntry{}, served: map[string]bool{}}
}

// LocalMaxStale bounds how stale a cluster member's metadata view may read: this
// node's copy is refused (embeddb.ErrStale) once the node has heard from no leader
// for that long. It outlasts a failover (about 2.4 s after a crash,
// embeddb.BenchmarkFailover), so the metadata server rides one out.
const LocalMaxStale = 5 * time.Second

// mdReader is what the source reads: the database (linearizable, on the leader) or
// this node's copy of it (embeddb.Local).
type mdReader interface {
	AddressByIP(ctx context.Context, host string, ip netip.Addr) (embeddb.Address, error)
	GetVM(ctx context.Context, id string) (embeddb.VM, error)
	GetVMConfig(ctx context.Context, vmID string) (embeddb.VMConfig, error)
	GetKVs(ctx context.Context, vmID string) ([]embeddb.KV, error)
}

// ByIP is the metadata server's lookup, made once the request passed its checks:
// the VM is reading its config.
func (s *MetadataSource) ByIP(ctx context.Context, ip netip.Addr) (metadata.Instance, error) {
	in, err := s.Lookup(ctx, ip)
	if err == nil {
		s.phases.mark(in.ID, PhaseConfigFetched, s.now, "")
	}
	return in, err
}

// Lookup returns the live VM at ip, from the cache while it is current.
func (s *MetadataSource) Lookup(ctx context.Context, ip netip.Addr) (metadata.Instance, error) {
	s.mu.RLock()
	e, ok := s.byIP[ip]
	s.mu.RUnlock()
	if ok && s.db.VMGen(e.inst.ID) == e.gen && (s.maxAge == 0 || s.now().Sub(e.at) < s.maxAge) {
		return e.inst, nil
	}
	at := s.now()
	var in metadata.Instance
	var gen uint64
	var err error
	if s.maxAge > 0 {
		in, gen, err = s.read(ctx, s.db.Local(s.maxStale), ip, true)
	}
	if s.maxAge == 0 || errors.Is(err, metadata.ErrNotFound) || errors.Is(err, errBehind) {
		in, gen, err = s.read(ctx, s.db, ip, false)
	}
	if err != nil {
		return in, err
	}
	// Kept only if nothing was written about the VM while it was read: a write
	// that raced the read changed VMGen, and the next request reads again.
	if s.db.VMGen(in.ID) == gen {
		s.mu.Lock()
		s.byIP[ip] = mdEntry{inst: in, gen: gen, at: at}
		s.mu.Unlock()
	}
	return in, nil
}

// errBehind is a read of this node's copy that disagrees with this host's IPAM.
var errBehind = errors.New("this node's copy of the database is behind this host's IPAM")

// read reads the VM at ip through db, with the VMGen it had before. With local,
// the address must be the one this host's IPAM holds.
func (s *MetadataSource) read(ctx context.Context, db mdReader, ip netip.Addr, local bool) (metadata.Instance, uint64, error) {
	addr, err := db.AddressByIP(ctx, s.host, ip)
	if err != nil {
		return metadata.Instance{}, 0, notFound(err)
	}
	if local && s.ipam != nil {
		if a, ok := s.ipam.ByIP(ip); !ok || a.MAC.String() != addr.MAC {
			return metadata.Instance{}, 0, errBehind
		}
	}
	// Taken before the VM's rows are read. If the address changed hands since it
	// was read, its old VM was purged: that read below fails, or it comes after
	// the purge changed the gen, and the entry is not kept.
	gen := s.db.VMGen(addr.VMID)
	vm, err := db.GetVM(ctx, addr.VMID)
	if err != nil {
		return metadata.Instance{}, 0, notFound(err)
	}
	if !vm.DeletedAt.IsZero() {
		return metadata.Instance{}, 0, fmt.Errorf("vm %s is deleted: %w", vm.ID, metadata.ErrNotFound)
	}
	cfg, err := db.GetVMConfig(ctx, vm.ID)
	if err != nil {
		return metadata.Instance{}, 0, notFound(err)
	}
	kvs, err := db.GetKVs(ctx, vm.ID)
	if err != nil {
		return metadata.Instance{}, 0, notFound(err)
	}
	in := metadata.Instance{ID: vm.ID, Hostname: cfg.Hostname, Script: cfg.Script, PublicKey: cfg.PublicKey}
	for _, kv := range kvs {
		in.KVs = append(in.KVs, metadata.KV{Key: kv.Key, Value: kv.Value, Secret: kv.Secret})
	}
	return in, gen, nil
}

// TakeAuthKey hands the key out through the database's conditional write on the
// leader, which makes it once only, on every node (never from this node's copy); a
// key known served is refused without a write.
func (s *MetadataSource) TakeAuthKey(ctx context.Context, vmID string) (string, error) {
	s.mu.RLock()
	served := s.served[vmID]
	s.mu.RUnlock()
	if served {
		s.phases.mark(vmID, PhaseKeyTaken, s.now, keyTakenAlready)
		return "", metadata.ErrAuthKeyTaken
	}
	key, err := s.db.TakeAuthKey(ctx, vmID, s.now())
	if err == nil || errors.Is(err, embeddb.ErrAlreadyServed) {
		s.mu.Lock()
		s.served[vmID] = true
		s.mu.Unlock()
	}
	switch {
	case err == nil && key != "":
		s.phases.mark(vmID, PhaseKeyTaken, s.now, "")
	case errors.Is(err, embeddb.ErrAlreadyServed):
		// Kept only if this VM never took it: a VM that joined and asks again
		// (a reboot) keeps its key_taken.
		s.phases.mark(vmID, PhaseKeyTaken, s.now, keyTakenAlready)
	}
	switch {
	case errors.Is(err, embeddb.ErrAlreadyServed):
		return "", metadata.ErrAuthKeyTaken
	case err != nil:
		return "", notFound(err)
	case key == "":
		return "", fmt.Errorf("vm %s has no auth key (no control plane configured): %w", vmID, metadata.ErrNotFound)
	}
	return key, nil
}

// keyTakenAlready is the key_taken phase's error when a VM asks for its key after it
// was handed out, to it before or to whoever asked first.
const keyTakenAlready = "the vm asked for its auth key after it had already been taken"

func notFound(err error) error {
	if errors.Is(err, embeddb.ErrNotFound) {
		return fmt.Errorf("%w: %w", metadata.ErrNotFound, err)
	}
	return err
}
