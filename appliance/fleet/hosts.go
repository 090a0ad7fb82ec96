package fleet

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/threes-dev/threes/embeddb"
)

// Host roles in the database's Raft, as Hosts reports them.
const (
	RoleLeader   = "leader"
	RoleFollower = "follower"
	RoleNonvoter = "nonvoter"
	// RoleAlone is the one host of a database that is not clustered: there is
	// no one to lead.
	RoleAlone = "alone"
	// RoleNone is a host that has a row but is not in the Raft configuration:
	// removed from the cluster while it still ran (and wrote its row again), or
	// a row left from before.
	RoleNone = ""
)

// HostInfo is one host as Hosts reports it.
type HostInfo struct {
	Name      string
	TailnetIP string
	Role      string // RoleLeader, RoleFollower, ...
	// Reachable says whether this host reached the host's database just now.
	Reachable bool
	// LastContact is when the host last wrote its row (zero if it never did).
	LastContact time.Time
	// VCPUs and MemoryMiB are its capacity after overcommit; both 0 when it set
	// no limit.
	VCPUs, MemoryMiB int
	// VCPUsAllocated and MemoryMiBAllocated are what its live VMs' sizes take.
	VCPUsAllocated, MemoryMiBAllocated int
	VMs                                int
}

// heartbeat is what this host writes about itself at every reconcile pass.
type heartbeat struct {
	mu       sync.Mutex
	addr     netip.Addr
	interval time.Duration // Run's; 0 until Run starts
	failing  bool          // the last write failed (logged once per streak)
}

// period is the interval between heartbeats: Run's reconcile interval, or the
// default before Run starts or when it makes no periodic passes.
func (h *heartbeat) period() time.Duration {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.interval <= 0 {
		return DefaultReconcileInterval
	}
	return h.interval
}

// SetAddr sets the tailnet IP this host's row gives (where other hosts reach it);
// it is written with the next heartbeat, at Run's start or its next pass.
func (f *Fleet) SetAddr(ip netip.Addr) {
	f.rec.beat.mu.Lock()
	defer f.rec.beat.mu.Unlock()
	f.rec.beat.addr = ip.Unmap()
}

// Heartbeat writes this host's row now: its name, tailnet IP, capacity and the
// time. Run calls it at start and at every reconcile pass.
func (f *Fleet) Heartbeat(ctx context.Context) error {
	b := &f.rec.beat
	b.mu.Lock()
	addr := b.addr
	b.mu.Unlock()
	h := embeddb.Host{Name: f.host, VCPUs: f.capacity.VCPUs, MemoryMiB: f.capacity.MemoryMiB,
		CPUOvercommit: f.capacity.CPUOvercommit, MemoryOvercommit: f.capacity.MemoryOvercommit, UpdatedAt: f.now()}
	if addr.IsValid() {
		h.TailnetIP = addr.String()
	}
	if h.CPUOvercommit <= 0 {
		h.CPUOvercommit = 1
	}
	if h.MemoryOvercommit <= 0 {
		h.MemoryOvercommit = 1
	}
	return f.db.UpsertHost(ctx, h)
}

// beat is Run's heartbeat: a failure is logged once until a write succeeds again
// (with no quorum, every pass would fail alike).
func (f *Fleet) beat(ctx context.Context) {
	err := f.Heartbeat(ctx)
	b := &f.rec.beat
	b.mu.Lock()
	was := b.failing
	b.failing = err != nil
	b.mu.Unlock()
	switch {
	case err == nil && was:
		f.log.Info("heartbeat: this host's row is written again")
	case err != nil && !was && ctx.Err() == nil:
		f.log.Warn("heartbeat: cannot write this host's row; placement on other hosts passes it over once it is stale; trying again each pass", "err", err)
	}
}

// Hosts lists every host: those with a row in the hosts table and those in the
// database's Raft configuration, by name, with their role, whether they answer,
// their capacity and what their live VMs take of it.
func (f *Fleet) Hosts(ctx context.Context) ([]HostInfo, error) {
	rows, err := f.db.ListHosts(ctx)
	if err != nil {
		return nil, err
	}
	loads, err := f.db.HostLoads(ctx)
	if err != nil {
		return nil, err
	}
	members, err := f.db.Members(ctx)
	if err != nil {
		return nil, err
	}
	byName := map[string]*HostInfo{}
	get := func(name string) *HostInfo {
		h := byName[name]
		if h == nil {
			h = &HostInfo{Name: name}
			byName[name] = h
		}
		return h
	}
	for _, r := range rows {
		h := get(r.Name)
		h.TailnetIP, h.LastContact = r.TailnetIP, r.UpdatedAt
		h.VCPUs, h.MemoryMiB = effective(r.VCPUs, r.CPUOvercommit), effective(r.MemoryMiB, r.MemoryOvercommit)
	}
	alone := len(members) == 1
	for _, m := range members {
		h := get(m.ID)
		h.Reachable = m.Reachable
		switch {
		case alone:
			h.Role = RoleAlone
		case m.Leader:
			h.Role = RoleLeader
		case !m.Voter:
			h.Role = RoleNonvoter
		default:
			h.Role = RoleFollower
		}
		if h.TailnetIP == "" {
			// A member's Raft address is its tailnet IP (see appliance's clusterConfig).
			if host, _, err := net.SplitHostPort(m.Addr); err == nil {
				if ip, err := netip.ParseAddr(host); err == nil {
					h.TailnetIP = ip.String()
				}
			}
		}
	}
	for _, l := range loads {
		if l.Host == "" {
			continue // VMs from before hosts were recorded belong to no host's count
		}
		h := get(l.Host)
		h.VMs += l.VMs
		if s, err := SizeOf(l.Type); err == nil {
			h.VCPUsAllocated += l.VMs * s.VCPUs
			h.MemoryMiBAllocated += l.VMs * s.MemoryMiB
		}
	}
	out := make([]HostInfo, 0, len(byName))
	for _, h := range byName {
		out = append(out, *h)
	}
	slices.SortFunc(out, func(a, b HostInfo) int { return strings.Compare(a.Name, b.Name) })
	return out, nil
}

// RemoveHost takes a host out of the cluster: its row goes (refused while a live VM
// records the host, naming them), then its place in the database's Raft. The host
// that answers cannot remove itself: another host must (it would lose the
// database in the middle of the call). Stop the removed host's threes: a host
// that is out of the Raft configuration has no database.
func (f *Fleet) RemoveHost(ctx context.Context, name string) error {
	if name == "" {
		return fieldErr("host", "is required")
	}
	if name == f.host {
		return fmt.Errorf("host %s is the host answering this call and cannot remove itself: ask another host of the cluster: %w", name, ErrState)
	}
	// Its VMs' domains and disks are on it, deleted ones too (purge carries
	// the call there): none may be left, whether or not the host has a row.
	vms, err := f.db.ListVMs(ctx)
	if err != nil {
		return err
	}
	var left []string
	for _, vm := range vms {
		if vm.Host == name {
			left = append(left, vm.Name)
		}
	}
	if len(left) > 0 {
		slices.Sort(left)
		shown := left[:min(len(left), 5)]
		return fmt.Errorf("host %s still has vms, live or deleted (%d: %s): delete and purge them first: %w",
			name, len(left), strings.Join(shown, ", "), embeddb.ErrInUse)
	}
	rowErr := f.db.DeleteHost(ctx, name)
	if rowErr != nil && !errors.Is(rowErr, embeddb.ErrNotFound) {
		if errors.Is(rowErr, embeddb.ErrInUse) {
			return fmt.Errorf("%w: delete them first", rowErr)
		}
		return rowErr
	}
	err = f.db.RemoveMember(ctx, name)
	switch {
	case err == nil:
		f.log.Info("removed host from the cluster", "host", name)
		return nil
	case errors.Is(err, embeddb.ErrNotFound) && rowErr == nil:
		// A row with no Raft member (a single host's database, or a member
		// removed before): the row was all there was.
		f.log.Info("removed host's row (it was not a Raft member)", "host", name)
		return nil
	case errors.Is(err, embeddb.ErrNotFound):
		return fmt.Errorf("no host %s in the cluster (threes host list): %w", name, err)
	}
	return fmt.Errorf("remove host %s (its row is gone; it writes it again at its next pass if it still runs): %w", name, err)
}
