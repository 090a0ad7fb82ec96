package appliance

import (
	"context"
	"fmt"
	"net"
	"net/netip"

	"github.com/threes-dev/threes/embeddb"
	"github.com/threes-dev/threes/netboot/ipam"
)

// loadIPAM makes the IPAM from the addresses the database holds.
func loadIPAM(ctx context.Context, db *embeddb.DB, prefix netip.Prefix) (*ipam.IPAM, error) {
	addrs, err := db.ListAddresses(ctx)
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
