package fleet

import (
	"context"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/threes-dev/threes/hv"
)

// TestKeyedMutexManyCallers: many callers of one key take turns, also after
// the key's entry was let go and made again, and are forgotten once all are done
// (TestKeyedMutex has two callers).
func TestKeyedMutexManyCallers(t *testing.T) {
	var k keyedMutex
	var inside, overlaps atomic.Int32
	var wg sync.WaitGroup
	for range 8 {
		wg.Go(func() {
			for range 300 {
				unlock := k.lock("vm")
				if !inside.CompareAndSwap(0, 1) {
					overlaps.Add(1)
				}
				// Another key while holding this one: never waits on it.
				k.lock("other")()
				inside.Store(0)
				unlock()
			}
		})
	}
	wg.Wait()
	if n := overlaps.Load(); n != 0 {
		t.Errorf("%d times two callers held one key at once", n)
	}
	if len(k.m) != 0 {
		t.Errorf("keys left after every holder let go: %v", k.m)
	}
}

// TestEventView: the listing most reconcile passes use is what libvirt's events
// last said: a domain's latest state, and no domain once it is gone.
func TestEventView(t *testing.T) {
	f := &Fleet{}
	f.rec.saw(hv.Event{ID: "a", State: hv.StateRunning})
	f.rec.saw(hv.Event{ID: "b", State: hv.StateRunning})
	f.rec.saw(hv.Event{ID: "a", State: hv.StateStopped})
	f.rec.saw(hv.Event{ID: "b", State: hv.StateMissing})
	f.rec.saw(hv.Event{ID: "c", State: hv.StateMissing})
	doms, err := f.domains(context.Background(), false)
	if err != nil {
		t.Fatal(err)
	}
	slices.SortFunc(doms, func(x, y hv.Domain) int { return strings.Compare(x.ID, y.ID) })
	if want := []hv.Domain{{ID: "a", State: hv.StateStopped}}; !slices.Equal(doms, want) {
		t.Errorf("event view = %v, want %v", doms, want)
	}
}
