package appliance

import (
	"context"
	"errors"
	"fmt"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/threes-dev/threes/appliance/fleet"
	"github.com/threes-dev/threes/embeddb"
	"github.com/threes-dev/threes/hv"
	"github.com/threes-dev/threes/hv/guard"
	"github.com/threes-dev/threes/hv/images"
	"github.com/threes-dev/threes/netboot/ipam"
	"github.com/threes-dev/threes/tsauth"
	"github.com/threes-dev/threes/tsauth/control"
	"github.com/threes-dev/threes/tsauth/policy"
)

var (
	// ErrPermission means the caller's role does not allow the call.
	ErrPermission = errors.New("permission denied")
	// ErrUnidentified means the caller could not be identified at all.
	ErrUnidentified = errors.New("caller not identified")
)

// codes lists every sentinel error that can reach the API and the gRPC code a caller
// gets for it. TestErrorCodes fails when a package below appliance gains a sentinel
// that is not here. When an error wraps two sentinels, the first row that matches
// wins, so more specific rows come first.
var errorCodes = []struct {
	err  error
	code codes.Code
}{
	// The caller.
	{ErrPermission, codes.PermissionDenied},
	{ErrUnidentified, codes.Unauthenticated},
	{tsauth.ErrUnknownPeer, codes.Unauthenticated},
	// A grant the caller holds that threes cannot read gives no rights.
	{tsauth.ErrUnknownRole, codes.PermissionDenied},
	{tsauth.ErrMalformedGrant, codes.PermissionDenied},

	// What the caller asked for does not exist, or already does.
	{embeddb.ErrNotFound, codes.NotFound},
	{hv.ErrNotFound, codes.NotFound},
	{images.ErrNotFound, codes.NotFound},
	{ipam.ErrNotFound, codes.NotFound},
	{embeddb.ErrExists, codes.AlreadyExists},
	{hv.ErrExists, codes.AlreadyExists},
	{images.ErrExists, codes.AlreadyExists},
	{ipam.ErrExists, codes.AlreadyExists},
	{ipam.ErrConflict, codes.AlreadyExists},

	// The request itself is wrong.
	{embeddb.ErrInvalid, codes.InvalidArgument},
	{hv.ErrInvalidSpec, codes.InvalidArgument},
	{images.ErrInvalidName, codes.InvalidArgument},
	{images.ErrBadImage, codes.InvalidArgument},
	{ipam.ErrInvalidMAC, codes.InvalidArgument},
	{policy.ErrInvalidName, codes.InvalidArgument},

	// Right request, wrong moment: something must change first.
	{fleet.ErrState, codes.FailedPrecondition},
	{fleet.ErrImageInUse, codes.FailedPrecondition},
	{fleet.ErrElsewhere, codes.FailedPrecondition},
	{hv.ErrNotRunning, codes.FailedPrecondition},
	{embeddb.ErrInUse, codes.FailedPrecondition},
	{embeddb.ErrAlreadyServed, codes.FailedPrecondition},
	{control.ErrNetworkInUse, codes.FailedPrecondition},
	{control.ErrConfig, codes.FailedPrecondition},
	{tsauth.ErrNotTailnet, codes.FailedPrecondition},
	// The tailnet policy needs its owner's attention before threes can edit it.
	{policy.ErrAllowAll, codes.FailedPrecondition},
	{policy.ErrOwnerTagUndefined, codes.FailedPrecondition},
	{policy.ErrTagTaken, codes.FailedPrecondition},
	{policy.ErrInvalidPolicy, codes.FailedPrecondition},
	{control.ErrPolicyConflict, codes.Aborted},
	{ipam.ErrFull, codes.ResourceExhausted},
	{hv.ErrNoSpace, codes.ResourceExhausted},
	{fleet.ErrNoRoom, codes.ResourceExhausted},

	// Not Unavailable, which callers read as safe to repeat: the write may have
	// applied. Before the rows below, so an error that also says why (no quorum)
	// keeps this meaning.
	{embeddb.ErrOutcomeUnknown, codes.Aborted},
	// Try again later: libvirtd is down, another host leads the database, or too
	// few hosts answer to elect a leader.
	{hv.ErrUnavailable, codes.Unavailable},
	{embeddb.ErrNotLeader, codes.Unavailable},
	{embeddb.ErrNoQuorum, codes.Unavailable},
	{embeddb.ErrStale, codes.Unavailable},
	// The host asked for has not written its row lately: it may be down.
	{fleet.ErrHostSilent, codes.Unavailable},
	// A firewall reload flushed the anti-spoofing table; hv rebuilds it on the next try.
	{guard.ErrNotIntact, codes.Unavailable},

	{context.Canceled, codes.Canceled},
	{context.DeadlineExceeded, codes.DeadlineExceeded},
}

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
	return answered(status.New(codeOf(err), err.Error()))
}

// AnsweredDomain is the domain of the ErrorInfo detail on every status the
// appliance makes: a client tells by it that the server answered (no database
// quorum, a host that is down) rather than that it could not reach the server,
// which its gRPC library also calls Unavailable.
const AnsweredDomain = "threes"

func answered(st *status.Status) error {
	if d, err := st.WithDetails(&errdetails.ErrorInfo{Domain: AnsweredDomain, Reason: st.Code().String()}); err == nil {
		st = d
	}
	return st.Err()
}

// Answered reports whether err is a status the appliance made (see AnsweredDomain).
func Answered(err error) bool {
	st, ok := status.FromError(err)
	if !ok {
		return false
	}
	for _, d := range st.Details() {
		if info, ok := d.(*errdetails.ErrorInfo); ok && info.GetDomain() == AnsweredDomain {
			return true
		}
	}
	return false
}

// fromHost is the error of a call carried to host: the host's own answer as it
// is, and a failure to reach it as this appliance's answer, naming the host.
func fromHost(host string, err error) error {
	if err == nil || Answered(err) {
		return err
	}
	st, _ := status.FromError(err)
	return answered(status.New(st.Code(), fmt.Sprintf("host %s: %s", host, st.Message())))
}

// codeOf is the gRPC code for err: InvalidArgument for a bad field of a request, the
// table's code for a sentinel, else Internal.
func codeOf(err error) codes.Code {
	var fe *fleet.FieldError
	if errors.As(err, &fe) {
		return codes.InvalidArgument
	}
	for _, row := range errorCodes {
		if errors.Is(err, row.err) {
			return row.code
		}
	}
	return codes.Internal
}
