package fleet

import (
	"context"
	"fmt"
	"io"

	"github.com/threes-dev/threes/embeddb"
)

// Console attaches to a live VM's serial console until ctx ends or the returned
// console is closed (see hv.Hypervisor.Console). It does not hold the VM's lock,
// which a stop needs: a stop ends the console instead.
func (f *Fleet) Console(ctx context.Context, id string) (io.ReadWriteCloser, embeddb.VM, error) {
	vm, err := f.local(ctx, id)
	if err != nil {
		return nil, vm, err
	}
	con, err := f.hv.Console(ctx, vm.ID)
	if err != nil {
		return nil, vm, fmt.Errorf("console of vm %s: %w", vm.Name, err)
	}
	return con, vm, nil
}
