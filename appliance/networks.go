package appliance

import (
	"context"
	"fmt"

	"github.com/threes-dev/threes/embeddb"
)

// NetworkTag is the tailnet ACL tag that members of a network carry. The prefix keeps
// threes' tags apart from the tailnet owner's own.
func NetworkTag(name string) string { return "tag:threes-" + name }

// CreateNetwork records a logical network.
func (l *Lifecycle) CreateNetwork(ctx context.Context, name string) (embeddb.Network, error) {
	if err := ValidateName("name", name); err != nil {
		return embeddb.Network{}, err
	}
	n := embeddb.Network{Name: name, Tag: NetworkTag(name), CreatedAt: l.now()}
	if err := l.db.CreateNetwork(ctx, n); err != nil {
		return n, fmt.Errorf("network %q: %w", name, err)
	}
	return n, nil
}

// DeleteNetwork removes a network that no live VM uses.
func (l *Lifecycle) DeleteNetwork(ctx context.Context, name string) error {
	if err := ValidateName("name", name); err != nil {
		return err
	}
	if err := l.db.DeleteNetwork(ctx, name); err != nil {
		return fmt.Errorf("network %q: %w", name, err)
	}
	return nil
}
