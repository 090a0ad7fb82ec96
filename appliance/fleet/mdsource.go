package fleet

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"sync"
	"time"

	"github.com/threes-dev/threes/embeddb"
	"github.com/threes-dev/threes/netboot/metadata"
)

// MetadataSource is the database as the metadata server sees it: this host's live VMs
// by address (each host has a bridge of its own, so the same address may be another
// VM's on another host), from a per-VM cache. A VM's entry is current while the database's VMGen for it
// stays what it was when the entry was read, so a request costs no database read
// (let alone a round trip to the Raft leader) until this appliance writes something
// about that VM. VMGen counts only this host's writes: when other hosts share the
// database (a cluster), an entry is also read again once it is maxAge old, so
// their writes show within maxAge.
type MetadataSource struct {
	db     *embeddb.DB
	host   string // whose addresses it looks up
	now    func() time.Time
	maxAge time.Duration // 0: entries stay while VMGen does (this host makes every write)
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

func newMDSource(db *embeddb.DB, host string, now func() time.Time) *MetadataSource {
	return &MetadataSource{db: db, host: host, now: now, byIP: map[netip.Addr]mdEntry{}, served: map[string]bool{}}
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
	in, gen, err := s.read(ctx, ip)
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

// read reads the VM at ip from the database, with the VMGen it had before.
func (s *MetadataSource) read(ctx context.Context, ip netip.Addr) (metadata.Instance, uint64, error) {
	addr, err := s.db.AddressByIP(ctx, s.host, ip)
	if err != nil {
		return metadata.Instance{}, 0, notFound(err)
	}
	// Taken before the VM's rows are read. If the address changed hands since it
	// was read, its old VM was purged: that read below fails, or it comes after
	// the purge changed the gen, and the entry is not kept.
	gen := s.db.VMGen(addr.VMID)
	vm, err := s.db.GetVM(ctx, addr.VMID)
	if err != nil {
		return metadata.Instance{}, 0, notFound(err)
	}
	if !vm.DeletedAt.IsZero() {
		return metadata.Instance{}, 0, fmt.Errorf("vm %s is deleted: %w", vm.ID, metadata.ErrNotFound)
	}
	cfg, err := s.db.GetVMConfig(ctx, vm.ID)
	if err != nil {
		return metadata.Instance{}, 0, notFound(err)
	}
	kvs, err := s.db.GetKVs(ctx, vm.ID)
	if err != nil {
		return metadata.Instance{}, 0, notFound(err)
	}
	in := metadata.Instance{ID: vm.ID, Hostname: cfg.Hostname, Script: cfg.Script, PublicKey: cfg.PublicKey}
	for _, kv := range kvs {
		in.KVs = append(in.KVs, metadata.KV{Key: kv.Key, Value: kv.Value, Secret: kv.Secret})
	}
	return in, gen, nil
}

// TakeAuthKey hands the key out through the database's conditional write, which
// makes it once only, on every node; a key known served is refused without a write.
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
