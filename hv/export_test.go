package hv

import (
	"context"
	"time"
)

// SetCopyDisks makes h create VMs' disks as full copies of their images,
// as the original did, for benchmarks to compare overlays against.
func SetCopyDisks(h *Libvirt, on bool) { h.copyDisks = on }

// CreateDisk makes the disk of s alone, as Create's first step does.
func CreateDisk(ctx context.Context, h *Libvirt, s Spec) error {
	_, _, err := h.createDisk(ctx, s, nil)
	return err
}

// RemoveDisk deletes the disk of the VM id.
func RemoveDisk(h *Libvirt, id string) error {
	_, err := h.removeDisk(id)
	return err
}

// SetGuardCheck makes the Libvirts opened from now on check their guard
// table every d, until restore.
func SetGuardCheck(d time.Duration) (restore func()) {
	old := guardCheckEvery
	guardCheckEvery = d
	return func() { guardCheckEvery = old }
}
