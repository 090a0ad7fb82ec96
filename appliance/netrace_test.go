package appliance_test

import (
	"fmt"
	"strings"
	"sync"
	"testing"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/threes-dev/threes/appliance"
	"github.com/threes-dev/threes/appliance/threestest"
	threesv1 "github.com/threes-dev/threes/proto/threes/v1"
	"github.com/threes-dev/threes/tsauth/control"
	"github.com/threes-dev/threes/tsauth/control/headscaletest"
	"github.com/threes-dev/threes/tsauth/policy"
)

// TestConcurrentNetworkCreate: two creates of one network at once, against a real
// headscale's policy: one wins, the other gets AlreadyExists, and the winner's tag
// and rules stay in the policy (the loser's undo must not take them out).
func TestConcurrentNetworkCreate(t *testing.T) {
	hs := headscaletest.Start(t)
	hs.SetPolicy(t, operatorPolicy)
	plane, err := control.NewHeadscale(control.HeadscaleConfig{
		URL: hs.URL, APIKey: control.NewSecret(hs.APIKey),
		Policy: policy.Options{OwnerTag: "tag:threes", Admins: []string{"threes@"}},
	})
	if err != nil {
		t.Fatal(err)
	}
	env := threestest.StartWith(t, func(o *appliance.Options) { o.Plane = plane; o.OwnerTag = "tag:threes" })
	ctx := ctxT(t)
	c := env.Local(t)

	// Several rounds: each is a race, and one lost race is enough to fail.
	for i := range 5 {
		name := fmt.Sprintf("race%d", i)
		var wg sync.WaitGroup
		errs := make([]error, 2)
		for j := range errs {
			wg.Add(1)
			go func() {
				defer wg.Done()
				_, errs[j] = c.CreateNetwork(ctx, &threesv1.NetworkRequest{Name: name})
			}()
		}
		wg.Wait()
		ok := 0
		for _, err := range errs {
			switch status.Code(err) {
			case codes.OK:
				ok++
			case codes.AlreadyExists:
			default:
				t.Fatalf("create %s: %v", name, err)
			}
		}
		if ok != 1 {
			t.Fatalf("create %s twice at once: %d succeeded (%v), want 1", name, ok, errs)
		}
		if pol := hs.Policy(t); !strings.Contains(pol, `"tag:threes-`+name+`"`) {
			t.Fatalf("round %d: the winner's network %s is recorded but its tag is gone from the policy:\n%s", i, name, pol)
		}
	}
}
