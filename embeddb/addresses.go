package embeddb

import (
	"context"
	"fmt"
	"net/netip"
	"sort"
	"time"
)

// Address is a management address lease: IP and MAC are each unique. VMID is
// empty for an address no VM holds.
type Address struct {
	IP       netip.Addr
	MAC      string
	Hostname string
	VMID     string
	LeasedAt time.Time // zero if never leased
}

const addressColumns = `ip, mac, hostname, COALESCE(vm_id, ''), leased_at FROM addresses`

func scanAddress(r row) (Address, error) {
	ip, err := netip.ParseAddr(r.str(0))
	if err != nil {
		return Address{}, fmt.Errorf("stored ip %q: %w", r.str(0), err)
	}
	return Address{IP: ip, MAC: r.str(1), Hostname: r.str(2), VMID: r.str(3), LeasedAt: r.time(4)}, nil
}

// ListAddresses returns every address, ordered by IP.
func (db *DB) ListAddresses(ctx context.Context) ([]Address, error) {
	res, err := db.query(ctx, q(`SELECT `+addressColumns))
	if err != nil {
		return nil, fmt.Errorf("list addresses: %w", err)
	}
	var as []Address
	for _, r := range rows(res[0]) {
		a, err := scanAddress(r)
		if err != nil {
			return nil, fmt.Errorf("list addresses: %w", err)
		}
		as = append(as, a)
	}
	// Sort numerically; the stored text sorts 10.0.0.10 before 10.0.0.2.
	sort.Slice(as, func(i, j int) bool { return as[i].IP.Less(as[j].IP) })
	return as, nil
}

// AddressByIP returns the address with this IP.
func (db *DB) AddressByIP(ctx context.Context, ip netip.Addr) (Address, error) {
	if !ip.IsValid() {
		return Address{}, fmt.Errorf("get address: %w", fieldErr(FieldIP, "", ErrInvalid))
	}
	s := ip.Unmap().String()
	return db.oneAddress(ctx, FieldIP, s, q(`SELECT `+addressColumns+` WHERE ip = ?`, s))
}

// AddressByMAC returns the address with this MAC, in any common notation.
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
