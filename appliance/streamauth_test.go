package appliance_test

import (
	"context"
	"testing"
	"time"

	"google.golang.org/grpc/codes"

	"github.com/threes-dev/threes/appliance/threestest"
	threesv1 "github.com/threes-dev/threes/proto/threes/v1"
	"github.com/threes-dev/threes/tsauth"
	"github.com/threes-dev/threes/tsauth/tailnettest"
)

// TestStreamEndsWhenGrantRevoked: a stream is authorised while it lasts, not only
// when it opens. A viewer's Watch of a VM (a stream that stays open, like a console)
// ends with PermissionDenied once the viewer's grant is taken away; on main it
// went on until the viewer hung up.
func TestStreamEndsWhenGrantRevoked(t *testing.T) {
	env := threestest.Start(t)
	ctx := ctxT(t)
	local := env.Local(t)
	viewer := env.Client(t, threestest.ClientOptions{NodeOptions: tailnettest.NodeOptions{Hostname: "dash", User: "bob@example.com"}, Role: "viewer"})
	must[*threesv1.Network](t)(local.CreateNetwork(ctx, &threesv1.NetworkRequest{Name: "lab"}))
	vm := must[*threesv1.VM](t)(local.Create(ctx, &threesv1.CreateRequest{Name: "web1", Network: "lab", Image: "base", Type: threesv1.VMType_VM_TYPE_TEENY}))

	wctx, cancel := context.WithTimeout(ctx, 45*time.Second)
	defer cancel()
	w, err := viewer.Watch(wctx, &threesv1.VMRef{Id: vm.GetId()})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := w.Recv(); err != nil {
		t.Fatalf("first message of the watch: %v", err)
	}
	env.Tailnet.Revoke(env.Appliance.Tailnet(), viewer.Node, tsauth.Capability)
	for {
		if _, err = w.Recv(); err != nil {
			break
		}
	}
	wantCode(t, err, codes.PermissionDenied, "while the stream was open")
}
