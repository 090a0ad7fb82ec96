package embeddb

import (
	"context"
	"fmt"
	"net/netip"
	"sort"
	"time"
)

// Address is a management address lease. Each host has a bridge of its own and
// the same range may repeat on every host, so an IP is unique within its Host;
// a MAC is unique across the cluster. Host is the VM's host, set by CreateVM; ""
// (an address from before hosts were recorded) belongs to every host, as a VM
// with no host does. VMID is empty for an address no VM holds.
type Address struct {
	Host     string
	IP       netip.Addr
	MAC      string
	Hostname string
	VMID     string
	LeasedAt time.Time // zero if never leased
}

const addressColumns = `host, ip, mac, hostname, COALESCE(vm_id, ''), leased_at FROM addresses`

func scanAddress(r row) (Address, error) {
	ip, err := netip.ParseAddr(r.str(1))
	if err != nil {
		return Address{}, fmt.Errorf("stored ip %q: %w", r.str(1), err)
	}
	return Address{Host: r.str(0), IP: ip, MAC: r.str(2), Hostname: r.str(3), VMID: r.str(4), LeasedAt: r.time(5)}, nil
}

// ListAddresses returns every host's addresses, ordered by IP, then host.
func (db *DB) ListAddresses(ctx context.Context) ([]Address, error) {
	return db.listAddresses(ctx, "list addresses", q(`SELECT `+addressColumns))
}

// HostAddresses returns the addresses host's IPAM holds: its own and those
// recorded with no host, ordered by IP, then host.
func (db *DB) HostAddresses(ctx context.Context, host string) ([]Address, error) {
	return db.listAddresses(ctx, "list addresses of host "+host,
		q(`SELECT `+addressColumns+` WHERE host IN (?, '')`, host))
}

func (db *DB) listAddresses(ctx context.Context, what string, s stmt) ([]Address, error) {
	res, err := db.query(ctx, s)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", what, err)
	}
	var as []Address
	for _, r := range rows(res[0]) {
		a, err := scanAddress(r)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", what, err)
		}
		as = append(as, a)
	}
	// Sort numerically; the stored text sorts 10.0.0.10 before 10.0.0.2.
	sort.Slice(as, func(i, j int) bool {
		if as[i].IP != as[j].IP {
			return as[i].IP.Less(as[j].IP)
		}
		return as[i].Host < as[j].Host
	})
	return as, nil
}

// AddressByIP returns the address with this IP on host's bridge: host's own,
// else one recorded with no host.
func (db *DB) AddressByIP(ctx context.Context, host string, ip netip.Addr) (Address, error) {
	if !ip.IsValid() {
		return Address{}, fmt.Errorf("get address: %w", fieldErr(FieldIP, "", ErrInvalid))
	}
	s := ip.Unmap().String()
	return db.oneAddress(ctx, FieldIP, s,
		q(`SELECT `+addressColumns+` WHERE ip = ? AND host IN (?, '') ORDER BY host = '' LIMIT 1`, s, host))
}

// AddressByMAC returns the address with this MAC, in any common notation, on
// whichever host holds it.
func (db *DB) AddressByMAC(ctx context.Context, mac string) (Address, error) {
	m, err := canonicalMAC(mac)
	if err != nil {
		return Address{}, fmt.Errorf("get address: %w", err)
	}
	return db.oneAddress(ctx, FieldMAC, m, q(`SELECT `+addressColumns+` WHERE mac = ?`, m))
}

func (db *DB) oneAddress(ctx context.Context, field, value string, s stmt) (Address, error) {
	res, err := db.query(ctx, s)
	if err != nil {
		return Address{}, fmt.Errorf("get address by %s %s: %w", field, value, err)
	}
	rs := rows(res[0])
	if len(rs) == 0 {
		return Address{}, fieldErr(field, value, ErrNotFound)
	}
	a, err := scanAddress(rs[0])
	if err != nil {
		return Address{}, fmt.Errorf("get address by %s %s: %w", field, value, err)
	}
	return a, nil
}
