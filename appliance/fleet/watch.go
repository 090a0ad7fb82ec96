package fleet

import (
	"context"
	"errors"
	"reflect"
	"time"

	"github.com/threes-dev/threes/embeddb"
)

// watchEvery is how often Watch looks at the VM's write counter, an in-memory read.
const watchEvery = 100 * time.Millisecond

// Watch calls send with the VM, and again each time it changes, until ctx ends
// (it returns ctx's error: a caller whose deadline passed must not read "the VM
// is gone", a clean end, before its own timer says why) or the VM is purged (it
// returns nil). It reads the VM again when this host wrote about it (gen) and,
// with a shared database, at least every SharedMaxAge, since other hosts' writes
// do not move gen; send sees only a VM that changed.
func (f *Fleet) Watch(ctx context.Context, id string, send func(embeddb.VM) error) error {
	// The counter before the read: a write during the read is sent again.
	gen := f.gen(id)
	last, err := f.Get(ctx, id)
	if err != nil {
		return err
	}
	if err := send(last); err != nil {
		return err
	}
	t := time.NewTicker(watchEvery)
	defer t.Stop()
	read := time.Now()
	for {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-t.C:
		}
		g := f.gen(id)
		if g == gen && !(f.shared && time.Since(read) >= SharedMaxAge) {
			continue
		}
		read = time.Now()
		vm, err := f.Get(ctx, id)
		if errors.Is(err, embeddb.ErrNotFound) {
			return nil
		}
		if err != nil {
			return err
		}
		gen = g
		if reflect.DeepEqual(vm, last) {
			continue
		}
		if err := send(vm); err != nil {
			return err
		}
		last = vm
	}
}
