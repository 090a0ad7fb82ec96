package fleet

import (
	"errors"
	"fmt"
)

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

// ElsewhereError is ErrElsewhere naming the host whose domain the call needs, so
// the caller can carry the call there.
type ElsewhereError struct {
	// Host is the VM's host.
	Host string
	what string
}

func elsewhere(host, format string, args ...any) *ElsewhereError {
	return &ElsewhereError{Host: host, what: fmt.Sprintf(format, args...)}
}

func (e *ElsewhereError) Error() string { return e.what + ": " + ErrElsewhere.Error() }

// Is makes errors.Is(err, ErrElsewhere) hold.
func (e *ElsewhereError) Is(target error) bool { return target == ErrElsewhere }
