package embeddb

import (
	"context"
	"fmt"
	"time"
)

// Network is a logical network of VMs; Tag is its tailnet tag.
type Network struct {
	Name      string
	Tag       string
	CreatedAt time.Time
}

// CreateNetwork records a network. Its name, and its tag when not empty, are
// unique (ErrExists).
func (db *DB) CreateNetwork(ctx context.Context, n Network) error {
	if n.Name == "" {
		return fmt.Errorf("create network: %w", fieldErr(FieldNetworkName, "", ErrInvalid))
	}
	if err := checkTime("created_at", n.CreatedAt, true); err != nil {
		return fmt.Errorf("create network %s: %w", n.Name, err)
	}
	_, err := db.exec(ctx, q(`INSERT INTO networks (name, tag, created_at) VALUES (?, ?, ?)`,
		n.Name, n.Tag, timeArg(n.CreatedAt)))
	if cols, ok := uniqueViolation(err); ok {
		switch cols {
		case "networks.name":
			return fieldErr(FieldNetworkName, n.Name, ErrExists)
		case "networks.tag":
			return fieldErr(FieldNetworkTag, n.Tag, ErrExists)
		}
	}
	if err != nil {
		return fmt.Errorf("create network %s: %w", n.Name, err)
	}
	return nil
}

// GetNetwork returns the network with this name.
func (db *DB) GetNetwork(ctx context.Context, name string) (Network, error) {
	res, err := db.query(ctx, q(`SELECT name, tag, created_at FROM networks WHERE name = ?`, name))
	if err != nil {
		return Network{}, fmt.Errorf("get network %s: %w", name, err)
	}
	rs := rows(res[0])
	if len(rs) == 0 {
		return Network{}, fieldErr(FieldNetworkName, name, ErrNotFound)
	}
	return Network{Name: rs[0].str(0), Tag: rs[0].str(1), CreatedAt: rs[0].time(2)}, nil
}

// ListNetworks returns all networks by name.
func (db *DB) ListNetworks(ctx context.Context) ([]Network, error) {
	res, err := db.query(ctx, q(`SELECT name, tag, created_at FROM networks ORDER BY name`))
	if err != nil {
		return nil, fmt.Errorf("list networks: %w", err)
	}
	rs := rows(res[0])
	ns := make([]Network, len(rs))
	for i, r := range rs {
		ns[i] = Network{Name: r.str(0), Tag: r.str(1), CreatedAt: r.time(2)}
	}
	return ns, nil
}

// DeleteNetwork removes a network. A trigger refuses the delete (ErrInUse)
// while a live VM uses the network, in the same statement, so no VM can be
// created into it between a check and the delete.
func (db *DB) DeleteNetwork(ctx context.Context, name string) error {
	res, err := db.exec(ctx, q(`DELETE FROM networks WHERE name = ?`, name))
	if sqlErrorIs(err, "embeddb: network in use") {
		return fieldErr(FieldNetworkName, name, ErrInUse)
	}
	if err != nil {
		return fmt.Errorf("delete network %s: %w", name, err)
	}
	if rowsAffected(res, 0) == 0 {
		return fieldErr(FieldNetworkName, name, ErrNotFound)
	}
	return nil
}
