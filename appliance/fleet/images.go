package fleet

import (
	"context"
	"fmt"
	"os"
	"strings"

	"github.com/threes-dev/threes/hv/images"
)

// Images lists the base images VMs can be created from.
func (f *Fleet) Images() ([]images.Image, error) { return f.images.List() }

// ImportImage adds a base image. receive fills a fresh private directory inside
// the store with the image's files (an upload) and says which file is which; the
// store then checks each file before accepting it. The directory goes in any case.
func (f *Fleet) ImportImage(ctx context.Context, name string, receive func(dir string) (images.Source, error)) (images.Image, error) {
	if err := images.ValidateName(name); err != nil {
		return images.Image{}, fieldErr("name", "%v", err)
	}
	// Refuse a taken name before receiving gigabytes.
	if _, err := f.images.Get(name); err == nil {
		return images.Image{}, fmt.Errorf("image %q: %w", name, images.ErrExists)
	}
	dir, err := os.MkdirTemp(f.images.Dir(), images.UploadPrefix)
	if err != nil {
		return images.Image{}, fmt.Errorf("image upload: %w", err)
	}
	defer os.RemoveAll(dir)
	src, err := receive(dir)
	if err != nil {
		return images.Image{}, err
	}
	if src.Disk == "" && src.Kernel == "" {
		return images.Image{}, fieldErr("file", "an image needs a disk, or a kernel (with an initrd and optionally a disk)")
	}
	return f.images.Import(ctx, name, src)
}

// DeleteImage removes an image unless a VM still has a disk on it: overlays need
// their base until the VM is purged. It holds creates off while it looks, so a VM
// cannot be made on an image that is going.
func (f *Fleet) DeleteImage(ctx context.Context, name string) error {
	if err := images.ValidateName(name); err != nil {
		return fieldErr("name", "%v", err)
	}
	f.imageMu.Lock()
	defer f.imageMu.Unlock()
	vms, err := f.db.ListVMs(ctx)
	if err != nil {
		return err
	}
	var users []string
	for _, vm := range vms {
		if vm.Image == name {
			users = append(users, vm.Name)
		}
	}
	if len(users) > 0 {
		return fmt.Errorf("image %q is used by %s (purge them first): %w", name, strings.Join(users, ", "), ErrImageInUse)
	}
	if err := f.images.Delete(name); err != nil {
		return fmt.Errorf("image %q: %w", name, err)
	}
	return nil
}
