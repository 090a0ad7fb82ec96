package appliance

import (
	"context"
	"fmt"
	"net"
	"net/netip"

	"github.com/threes-dev/threes/embeddb"
	"github.com/threes-dev/threes/netboot/ipam"
)

// loadIPAM makes host's IPAM from the addresses the database holds for it (its
// own and those recorded with no host): each host has a bridge of its own, so the
// same range repeats on every host. host is the name the fleet records on this
// host's VMs (Options.Hostname).
func loadIPAM(ctx context.Context, db *embeddb.DB, host string, prefix netip.Prefix) (*ipam.IPAM, error) {
	addrs, err := db.HostAddresses(ctx, host)
	if err != nil {
		return nil, fmt.Errorf("load addresses: %w", err)
	}
	existing := make([]ipam.Allocation, 0, len(addrs))
	for _, ad := range addrs {
		hw, err := net.ParseMAC(ad.MAC)
		if err != nil {
			return nil, fmt.Errorf("address %s: mac %q: %w", ad.IP, ad.MAC, err)
		}
		existing = append(existing, ipam.Allocation{MAC: hw, Hostname: ad.Hostname, IP: ad.IP})
	}
	pool, err := ipam.New(ipam.Config{Prefix: prefix}, existing)
	if err != nil {
		return nil, fmt.Errorf("ipam %s: %w", prefix, err)
	}
	return pool, nil
}
