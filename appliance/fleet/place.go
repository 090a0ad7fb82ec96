package fleet

import (
	"context"
	"errors"
	"fmt"
	"math"
	"slices"
	"strings"
	"time"
)

// Capacity is what a host offers its VMs: its own CPUs and memory, and how many
// times over the VMs' sizes may promise them. A Capacity with neither VCPUs nor
// MemoryMiB sets no limit (a Fleet built without one, as tests do); an overcommit
// of 0 counts as 1.
type Capacity struct {
	VCPUs     int
	MemoryMiB int
	// CPUOvercommit and MemoryOvercommit multiply VCPUs and MemoryMiB.
	CPUOvercommit    float64
	MemoryOvercommit float64
}

var (
	// ErrNoRoom means no host (or not the one asked for) has the vCPUs and memory
	// left that the VM's size needs.
	ErrNoRoom = errors.New("no room for the vm")
	// ErrHostSilent means the host asked for has not written its row for several
	// reconcile intervals: it may be down.
	ErrHostSilent = errors.New("host not heard from lately")
)

// staleBeats is how many reconcile intervals a host's row may age before
// placement passes the host over: one missed pass is a slow pass, three in a row
// a host that is down or cut off.
const staleBeats = 3

// room is a host's capacity and what its live VMs take of it.
type room struct {
	name      string
	unlimited bool
	vcpus     int // after overcommit
	memMiB    int // after overcommit
	usedCPU   int
	usedMem   int
	vms       int
	heard     time.Time // the row's updated_at
	stale     bool
}

func (r room) freeCPU() int { return r.vcpus - r.usedCPU }
func (r room) freeMem() int { return r.memMiB - r.usedMem }

func (r room) fits(s Size) bool {
	return r.unlimited || (r.freeCPU() >= s.VCPUs && r.freeMem() >= s.MemoryMiB)
}

// after is the host's room once s is placed on it: the smaller of its free vCPU
// and free memory shares. Shares rather than absolute amounts, so a small host and
// a big one compare by how full they are; the smaller of the two, because the
// resource that runs out first is what ends the host's room.
func (r room) after(s Size) float64 {
	if r.unlimited {
		return 1
	}
	share := func(free, total int) float64 {
		if total <= 0 {
			return 0
		}
		return float64(free) / float64(total)
	}
	return min(share(r.freeCPU()-s.VCPUs, r.vcpus), share(r.freeMem()-s.MemoryMiB, r.memMiB))
}

func (r room) String() string {
	if r.unlimited {
		return r.name + " sets no limit"
	}
	return fmt.Sprintf("%s has %d of %d vCPUs and %d of %d MiB free", r.name, r.freeCPU(), r.vcpus, r.freeMem(), r.memMiB)
}

// effective is a capacity after overcommit.
func effective(n int, ratio float64) int {
	if ratio <= 0 {
		ratio = 1
	}
	return int(math.Floor(float64(n) * ratio))
}

// rooms reads every host's row and load. This host is always among them, with
// the capacity it was given and as heard from now (it is answering), even before
// its first heartbeat is written.
func (f *Fleet) rooms(ctx context.Context) ([]room, error) {
	hosts, err := f.db.ListHosts(ctx)
	if err != nil {
		return nil, err
	}
	loads, err := f.db.HostLoads(ctx)
	if err != nil {
		return nil, err
	}
	now := f.now()
	staleAfter := staleBeats * f.rec.beat.period()
	rs := make([]room, 0, len(hosts)+1)
	for _, h := range hosts {
		if h.Name == f.host {
			continue
		}
		rs = append(rs, room{name: h.Name, unlimited: h.VCPUs == 0 && h.MemoryMiB == 0,
			vcpus: effective(h.VCPUs, h.CPUOvercommit), memMiB: effective(h.MemoryMiB, h.MemoryOvercommit),
			heard: h.UpdatedAt, stale: now.Sub(h.UpdatedAt) > staleAfter})
	}
	c := f.capacity
	rs = append(rs, room{name: f.host, unlimited: c.VCPUs == 0 && c.MemoryMiB == 0,
		vcpus: effective(c.VCPUs, c.CPUOvercommit), memMiB: effective(c.MemoryMiB, c.MemoryOvercommit), heard: now})
	slices.SortFunc(rs, func(a, b room) int { return strings.Compare(a.name, b.name) })
	for _, l := range loads {
		i := slices.IndexFunc(rs, func(r room) bool { return r.name == l.Host })
		if i < 0 {
			continue // a host with no row: nothing to place on it
		}
		rs[i].vms += l.VMs
		// A type this binary does not know (a newer host's) takes nothing here.
		if s, err := SizeOf(l.Type); err == nil {
			rs[i].usedCPU += l.VMs * s.VCPUs
			rs[i].usedMem += l.VMs * s.MemoryMiB
		}
	}
	return rs, nil
}

// Place picks the host a new VM of type typ is created on. With want set, that host,
// if it exists, has been heard from lately and has room; else the host with the most
// room left once the VM is on it (see room.after), ties going to the first by name,
// among the hosts heard from within a few reconcile intervals (one that has not
// written its row for longer may be down, and is passed over). Room is capacity
// times overcommit less the sizes of the host's live VMs.
func (f *Fleet) Place(ctx context.Context, typ, want string) (string, error) {
	size, err := SizeOf(typ)
	if err != nil {
		return "", err
	}
	rs, err := f.rooms(ctx)
	if err != nil {
		return "", fmt.Errorf("place vm: %w", err)
	}
	now := f.now()
	if want != "" {
		i := slices.IndexFunc(rs, func(r room) bool { return r.name == want })
		if i < 0 {
			names := make([]string, len(rs))
			for i, r := range rs {
				names[i] = r.name
			}
			return "", fieldErr("host", "unknown host %q: the hosts are %s", want, strings.Join(names, ", "))
		}
		r := rs[i]
		switch {
		case r.stale:
			return "", fmt.Errorf("host %s was last heard from %s ago (it may be down: threes host list): %w",
				r.name, now.Sub(r.heard).Round(time.Second), ErrHostSilent)
		case !r.fits(size):
			return "", fmt.Errorf("host %s has %d vCPUs and %d MiB free (of %d and %d), and a %s needs %d vCPUs and %d MiB: %w",
				r.name, r.freeCPU(), r.freeMem(), r.vcpus, r.memMiB, size.Type, size.VCPUs, size.MemoryMiB, ErrNoRoom)
		}
		return r.name, nil
	}
	best, bestRoom := -1, 0.0
	var why []string
	for i, r := range rs {
		switch {
		case r.stale:
			why = append(why, fmt.Sprintf("%s was last heard from %s ago (it may be down)", r.name, now.Sub(r.heard).Round(time.Second)))
		case !r.fits(size):
			why = append(why, r.String())
		case best < 0 || r.after(size) > bestRoom: // rs is by name: ties keep the first
			best, bestRoom = i, r.after(size)
		}
	}
	if best < 0 {
		return "", fmt.Errorf("no host has room for a %s: %s: %w", size, strings.Join(why, "; "), ErrNoRoom)
	}
	return rs[best].name, nil
}
