package embeddb

import (
	"context"
	"fmt"
	"math"
	"net/netip"
	"strings"
	"time"
)

// FieldHostName is the FieldError field for a host's name.
const FieldHostName = "host name"

// Host is one host's row in the hosts table: what it last said about itself.
type Host struct {
	// Name is the host's --hostname, which is also its Raft node ID.
	Name string
	// TailnetIP is where the other hosts reach it; empty until it knows.
	TailnetIP string
	// VCPUs and MemoryMiB are the host's own; the overcommit ratios multiply
	// them (kept to three decimals).
	VCPUs, MemoryMiB                int
	CPUOvercommit, MemoryOvercommit float64
	// UpdatedAt is when the host last wrote the row (its heartbeat).
	UpdatedAt time.Time
}

// HostLoad is how many live VMs of one type run on one host.
type HostLoad struct {
	Host, Type string
	VMs        int
}

// milli stores an overcommit ratio in thousandths.
func milli(r float64) int64 { return int64(math.Round(r * 1000)) }

// UpsertHost writes a host's row, replacing what it said before.
func (db *DB) UpsertHost(ctx context.Context, h Host) error {
	if h.Name == "" {
		return fmt.Errorf("upsert host: %w", fieldErr(FieldHostName, "", ErrInvalid))
	}
	if h.TailnetIP != "" {
		ip, err := netip.ParseAddr(h.TailnetIP)
		if err != nil {
			return fmt.Errorf("upsert host %s: %w", h.Name, fieldErr("tailnet ip", h.TailnetIP, ErrInvalid))
		}
		h.TailnetIP = ip.Unmap().String()
	}
	if h.VCPUs < 0 || h.MemoryMiB < 0 || !(h.CPUOvercommit > 0) || !(h.MemoryOvercommit > 0) ||
		h.CPUOvercommit > 1000 || h.MemoryOvercommit > 1000 {
		return fmt.Errorf("upsert host %s: capacity %d vCPUs x %g, %d MiB x %g: counts must not be negative and ratios must be above 0 and at most 1000: %w",
			h.Name, h.VCPUs, h.CPUOvercommit, h.MemoryMiB, h.MemoryOvercommit, ErrInvalid)
	}
	if err := checkTime("updated_at", h.UpdatedAt, true); err != nil {
		return fmt.Errorf("upsert host %s: %w", h.Name, err)
	}
	_, err := db.exec(ctx, q(`INSERT INTO hosts (name, tailnet_ip, vcpus, memory_mib, cpu_overcommit_milli, memory_overcommit_milli, updated_at)
		VALUES (?, ?, ?, ?, ?, ?, ?)
		ON CONFLICT (name) DO UPDATE SET tailnet_ip = excluded.tailnet_ip, vcpus = excluded.vcpus,
			memory_mib = excluded.memory_mib, cpu_overcommit_milli = excluded.cpu_overcommit_milli,
			memory_overcommit_milli = excluded.memory_overcommit_milli, updated_at = excluded.updated_at`,
		h.Name, h.TailnetIP, h.VCPUs, h.MemoryMiB, milli(h.CPUOvercommit), milli(h.MemoryOvercommit), timeArg(h.UpdatedAt)))
	if err != nil {
		return fmt.Errorf("upsert host %s: %w", h.Name, err)
	}
	return nil
}

// ListHosts returns every host's row, by name.
func (db *DB) ListHosts(ctx context.Context) ([]Host, error) {
	res, err := db.query(ctx, q(`SELECT name, tailnet_ip, vcpus, memory_mib, cpu_overcommit_milli, memory_overcommit_milli, updated_at
		FROM hosts ORDER BY name`))
	if err != nil {
		return nil, fmt.Errorf("list hosts: %w", err)
	}
	rs := rows(res[0])
	hs := make([]Host, len(rs))
	for i, r := range rs {
		hs[i] = Host{Name: r.str(0), TailnetIP: r.str(1), VCPUs: int(r.int(2)), MemoryMiB: int(r.int(3)),
			CPUOvercommit: float64(r.int(4)) / 1000, MemoryOvercommit: float64(r.int(5)) / 1000, UpdatedAt: r.time(6)}
	}
	return hs, nil
}

// HostLoads counts the live VMs of each host by type, in one grouped read of an
// index (not a read of every VM): the caller turns types into sizes. VMs recorded
// with no host (from before hosts were recorded) come under Host "".
func (db *DB) HostLoads(ctx context.Context) ([]HostLoad, error) {
	res, err := db.query(ctx, q(`SELECT host, type, COUNT(*) FROM vms WHERE deleted_at IS NULL
		GROUP BY host, type ORDER BY host, type`))
	if err != nil {
		return nil, fmt.Errorf("host loads: %w", err)
	}
	rs := rows(res[0])
	ls := make([]HostLoad, len(rs))
	for i, r := range rs {
		ls[i] = HostLoad{Host: r.str(0), Type: r.str(1), VMs: int(r.int(2))}
	}
	return ls, nil
}

// namesShown is how many VM names a refusal lists before it says "and N more".
const namesShown = 5

// DeleteHost removes a host's row. A trigger refuses it (ErrInUse, naming how many
// live VMs the host runs and the first few) while a live VM records the host, in
// the same statement, so no VM can land on the host between a check and the delete.
func (db *DB) DeleteHost(ctx context.Context, name string) error {
	res, err := db.exec(ctx, q(`DELETE FROM hosts WHERE name = ?`, name))
	if sqlErrorIs(err, "embeddb: host in use") {
		return db.hostInUse(ctx, name)
	}
	if err != nil {
		return fmt.Errorf("delete host %s: %w", name, err)
	}
	if rowsAffected(res, 0) == 0 {
		return fieldErr(FieldHostName, name, ErrNotFound)
	}
	return nil
}

// hostInUse is DeleteHost's refusal, naming the host's live VMs.
func (db *DB) hostInUse(ctx context.Context, name string) error {
	res, err := db.query(ctx,
		q(`SELECT COUNT(*) FROM vms WHERE host = ? AND deleted_at IS NULL`, name),
		q(`SELECT name FROM vms WHERE host = ? AND deleted_at IS NULL ORDER BY name LIMIT ?`, name, namesShown))
	if err != nil {
		// The refusal stands; only its detail is missing.
		return &FieldError{Field: FieldHostName, Value: name, Err: fmt.Errorf("%w by live VMs (listing them: %v)", ErrInUse, err)}
	}
	n := 0
	if rs := rows(res[0]); len(rs) == 1 {
		n = int(rs[0].int(0))
	}
	var names []string
	for _, r := range rows(res[1]) {
		names = append(names, r.str(0))
	}
	return &FieldError{Field: FieldHostName, Value: name, Err: fmt.Errorf("%w by %s", ErrInUse, countVMs(n, names))}
}

// countVMs says "3 live VMs: a, b, c" (or "..., and 4 more").
func countVMs(n int, names []string) string {
	word := "VMs"
	if n == 1 {
		word = "VM"
	}
	s := fmt.Sprintf("%d live %s", n, word)
	if len(names) == 0 {
		return s
	}
	s += ": " + strings.Join(names, ", ")
	if more := n - len(names); more > 0 {
		s += fmt.Sprintf(" and %d more", more)
	}
	return s
}
