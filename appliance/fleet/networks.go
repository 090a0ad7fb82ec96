package fleet

import (
	"context"
	"errors"
	"fmt"
	"sync"

	"github.com/threes-dev/threes/embeddb"
	"github.com/threes-dev/threes/internal/revert"
	"github.com/threes-dev/threes/tsauth/policy"
)

// DefaultOwnerTag is the appliance's own tailnet tag when it is started with none: it
// owns and prefixes every network tag.
const DefaultOwnerTag = "tag:threes"

// networkMu makes the check-edit-record steps of network creates and deletes in this
// process one at a time: of two creates of one name, the second then finds the
// first's record before it touches the policy.
var networkMu sync.Mutex

// CreateNetwork adds a network's tag and rules to the tailnet policy (when a control
// plane is configured) and records it. Adding the rules first means a recorded network
// always works; a failed record takes the rules out again.
func (f *Fleet) CreateNetwork(ctx context.Context, name string) (n embeddb.Network, err error) {
	if err := ValidateName("name", name); err != nil {
		return n, err
	}
	networkMu.Lock()
	defer networkMu.Unlock()
	tag, err := policy.NetworkTag(f.ownerTag, name)
	if err != nil {
		return n, fieldErr("name", "%v", err)
	}
	if _, err := f.db.GetNetwork(ctx, name); err == nil {
		return n, fmt.Errorf("network %q: %w", name, embeddb.ErrExists)
	} else if !errors.Is(err, embeddb.ErrNotFound) {
		return n, err
	}
	var undo revert.Reverter
	defer func() {
		if err != nil {
			f.undo(ctx, &undo)
		}
	}()
	if f.plane != nil {
		if err := f.plane.EnsureNetwork(ctx, name); err != nil {
			return n, fmt.Errorf("network %q: tailnet policy: %w", name, err)
		}
		undo.Add("remove network from policy", func(ctx context.Context) error {
			// Another host's create of the same name may have recorded it
			// meanwhile (the database is shared): the rules are then its.
			if _, err := f.db.GetNetwork(ctx, name); err == nil {
				return nil
			}
			return f.plane.RemoveNetwork(ctx, name)
		})
	}
	n = embeddb.Network{Name: name, Tag: tag, CreatedAt: f.now()}
	if err := f.db.CreateNetwork(ctx, n); err != nil {
		return n, fmt.Errorf("network %q: %w", name, err)
	}
	return n, nil
}

// DeleteNetwork removes a network that no live VM uses, from the database and from
// the tailnet policy.
func (f *Fleet) DeleteNetwork(ctx context.Context, name string) error {
	if err := ValidateName("name", name); err != nil {
		return err
	}
	networkMu.Lock()
	defer networkMu.Unlock()
	if _, err := f.db.GetNetwork(ctx, name); err != nil {
		return fmt.Errorf("network %q: %w", name, err)
	}
	vms, err := f.db.ListVMs(ctx)
	if err != nil {
		return err
	}
	for _, vm := range vms {
		if vm.Network == name && vm.DeletedAt.IsZero() {
			return fmt.Errorf("network %q: vm %s uses it: %w", name, vm.Name, embeddb.ErrInUse)
		}
	}
	if f.plane != nil {
		if err := f.plane.RemoveNetwork(ctx, name); err != nil {
			return fmt.Errorf("network %q: tailnet policy: %w", name, err)
		}
	}
	if err := f.db.DeleteNetwork(ctx, name); err != nil {
		// A VM joined the network meanwhile: put its rules back.
		if f.plane != nil {
			if perr := f.plane.EnsureNetwork(context.WithoutCancel(ctx), name); perr != nil {
				f.log.Error("restore network in policy", "network", name, "err", perr)
			}
		}
		return fmt.Errorf("network %q: %w", name, err)
	}
	return nil
}
