package embeddb

import "sync"

// vmGens numbers this DB's writes per VM, so a cache of what a VM's rows say can
// tell whether it is still current without reading them again.
type vmGens struct {
	mu   sync.RWMutex
	last uint64
	m    map[string]uint64
}

// VMGen returns a number that changes after every write this DB makes about
// the VM with this ID: its record, config, key/values or address, whether the
// write succeeded or not (a failed write may still have committed). A value
// read while VMGen stayed the same, read before and after, is current as far
// as this node's own writes go. Writes made by other nodes of a cluster do not
// change it.
func (db *DB) VMGen(id string) uint64 {
	db.gens.mu.RLock()
	defer db.gens.mu.RUnlock()
	return db.gens.m[id]
}

// touch records a write about the VM with this ID. Numbers come from one
// counter and are never reused, even after the VM is purged, so an entry
// cached before a purge never matches again.
func (db *DB) touch(ids ...string) {
	db.gens.mu.Lock()
	defer db.gens.mu.Unlock()
	if db.gens.m == nil {
		db.gens.m = map[string]uint64{}
	}
	for _, id := range ids {
		db.gens.last++
		db.gens.m[id] = db.gens.last
	}
}
