package appliance

import (
	"context"
	"errors"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/threes-dev/threes/embeddb"
	"github.com/threes-dev/threes/hv"
	"github.com/threes-dev/threes/hv/images"
	"github.com/threes-dev/threes/netboot/ipam"
	"github.com/threes-dev/threes/tsauth/control"
	"github.com/threes-dev/threes/tsauth/policy"
)

var (
	// ErrPermission means the caller's role does not allow the call.
	ErrPermission = errors.New("permission denied")
	// ErrUnidentified means the caller could not be identified at all.
	ErrUnidentified = errors.New("caller not identified")
	// ErrState means the object exists but is in the wrong state for the call,
	// such as starting a deleted VM or purging a live one.
	ErrState = errors.New("wrong state")
)

// toStatus maps a domain error to a gRPC status. It is the only place that does, so
// every method answers the same error with the same code; the message keeps the
// wrapped context that names the object or field at fault.
func toStatus(err error) error {
	if err == nil {
		return nil
	}
	if _, ok := status.FromError(err); ok {
		return err
	}
	var fe *FieldError
	code := codes.Internal
	switch {
	case errors.As(err, &fe):
		code = codes.InvalidArgument
	case errors.Is(err, embeddb.ErrNotFound), errors.Is(err, hv.ErrNotFound):
		code = codes.NotFound
	case errors.Is(err, embeddb.ErrExists), errors.Is(err, hv.ErrExists):
		code = codes.AlreadyExists
	case errors.Is(err, policy.ErrInvalidName), errors.Is(err, images.ErrBadImage), errors.Is(err, images.ErrInvalidName):
		code = codes.InvalidArgument
	case errors.Is(err, images.ErrNotFound):
		code = codes.NotFound
	case errors.Is(err, images.ErrExists):
		code = codes.AlreadyExists
	case errors.Is(err, ErrImageInUse):
		code = codes.FailedPrecondition
	case errors.Is(err, embeddb.ErrInUse), errors.Is(err, ErrState), errors.Is(err, control.ErrNetworkInUse),
		errors.Is(err, policy.ErrAllowAll), errors.Is(err, policy.ErrOwnerTagUndefined),
		errors.Is(err, policy.ErrTagTaken), errors.Is(err, policy.ErrInvalidPolicy):
		// The tailnet policy needs its owner's attention before threes can edit it.
		code = codes.FailedPrecondition
	case errors.Is(err, control.ErrPolicyConflict):
		code = codes.Aborted
	case errors.Is(err, ipam.ErrFull):
		code = codes.ResourceExhausted
	case errors.Is(err, ErrPermission):
		code = codes.PermissionDenied
	case errors.Is(err, ErrUnidentified):
		code = codes.Unauthenticated
	case errors.Is(err, context.Canceled):
		code = codes.Canceled
	case errors.Is(err, context.DeadlineExceeded):
		code = codes.DeadlineExceeded
	}
	return status.Error(code, err.Error())
}
