package fleet

import "errors"

var (
	// ErrState means the object exists but is in the wrong state for the call,
	// such as starting a deleted VM or purging a live one.
	ErrState = errors.New("wrong state")
	// ErrImageInUse means a VM (live, or deleted but not purged) still has a disk
	// on the image, so the image cannot go.
	ErrImageInUse = errors.New("image in use")
	// ErrElsewhere means the VM runs on another host of the cluster, and the call
	// needs its domain.
	ErrElsewhere = errors.New("vm runs on another host")
)
