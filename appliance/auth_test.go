package appliance_test

import (
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/threes-dev/threes/appliance/threestest"
	threesv1 "github.com/threes-dev/threes/proto/threes/v1"
	"github.com/threes-dev/threes/tsauth/tailnettest"
)

// TestAuthorisation checks each role against the calls it may and may not make, all
// at once on one tailnet: roles come from per-caller grants, tagged nodes by their tags.
func TestAuthorisation(t *testing.T) {
	env := threestest.Start(t)
	ctx := ctxT(t)
	node := func(host, user string, tags ...string) tailnettest.NodeOptions {
		return tailnettest.NodeOptions{Hostname: host, User: user, Tags: tags}
	}
	admin := env.Client(t, threestest.ClientOptions{NodeOptions: node("admin-laptop", "alice@example.com"), Role: "admin"})
	operator := env.Client(t, threestest.ClientOptions{NodeOptions: node("ci-runner", "", "tag:ci"), Role: "operator"})
	viewer := env.Client(t, threestest.ClientOptions{NodeOptions: node("dash", "bob@example.com"), Role: "viewer"})
	stranger := env.Client(t, threestest.ClientOptions{NodeOptions: node("guest", "eve@example.com")})

	// Who each caller is.
	for _, tc := range []struct {
		c         *threestest.Client
		principal string
		role      string
	}{
		{admin, "alice@example.com", "admin"},
		{operator, "tag:ci", "operator"},
		{viewer, "bob@example.com", "viewer"},
		{stranger, "eve@example.com", "none"},
	} {
		me := must[*threesv1.WhoAmIResponse](t)(tc.c.WhoAmI(ctx, &threesv1.WhoAmIRequest{}))
		if me.GetPrincipal() != tc.principal || me.GetRole() != tc.role {
			t.Errorf("whoami = %v, want %s with role %s", me, tc.principal, tc.role)
		}
	}
	me := must[*threesv1.WhoAmIResponse](t)(operator.WhoAmI(ctx, &threesv1.WhoAmIRequest{}))
	if me.GetLogin() != "" || len(me.GetTags()) != 1 || me.GetTags()[0] != "tag:ci" {
		t.Errorf("tagged node identified as %v, want tags only", me)
	}

	// The stranger may do nothing but ask who it is.
	_, err := stranger.ListNetworks(ctx, &threesv1.ListNetworksRequest{})
	wantCode(t, err, codes.PermissionDenied, "eve@example.com")
	_, err = stranger.Create(ctx, &threesv1.CreateRequest{Name: "nope", Network: "net", Image: "base", Type: threesv1.VMType_VM_TYPE_TEENY})
	wantCode(t, err, codes.PermissionDenied, "operator")
	s, err := stranger.All(ctx, &threesv1.AllRequest{})
	if err == nil {
		_, err = s.Recv()
	}
	wantCode(t, err, codes.PermissionDenied, "")

	// Networks are the admin's; VMs the operator's.
	_, err = operator.CreateNetwork(ctx, &threesv1.NetworkRequest{Name: "lab"})
	wantCode(t, err, codes.PermissionDenied, "admin")
	must[*threesv1.Network](t)(admin.CreateNetwork(ctx, &threesv1.NetworkRequest{Name: "lab"}))
	vm := must[*threesv1.VM](t)(operator.Create(ctx, &threesv1.CreateRequest{
		Name: "web1", Network: "lab", Image: "base", Type: threesv1.VMType_VM_TYPE_TEENY,
		Kvs: []*threesv1.KV{{Key: "api-token", Value: "s3cret", Secret: true}, {Key: "colour", Value: "blue"}},
	}))
	ref := &threesv1.VMRef{Id: vm.GetId()}
	_, err = viewer.Stop(ctx, ref)
	wantCode(t, err, codes.PermissionDenied, "viewer")
	_, err = operator.Purge(ctx, &threesv1.PurgeRequest{})
	wantCode(t, err, codes.PermissionDenied, "admin")

	// Viewers see that a secret exists, not its value; operators see it.
	for _, tc := range []struct {
		c        *threestest.Client
		value    string
		redacted bool
	}{{viewer, "", true}, {operator, "s3cret", false}, {admin, "s3cret", false}} {
		kvs := must[*threesv1.KVs](t)(tc.c.GetKVs(ctx, ref))
		for _, kv := range kvs.GetKvs() {
			if kv.GetKey() == "api-token" && (kv.GetValue() != tc.value || kv.GetRedacted() != tc.redacted || !kv.GetSecret()) {
				t.Errorf("secret as seen by %v = %v", tc.c.Node.Hostname, kv)
			}
			if kv.GetKey() == "colour" && kv.GetValue() != "blue" {
				t.Errorf("plain kv as seen by %v = %v", tc.c.Node.Hostname, kv)
			}
		}
	}
	if got := must[*threesv1.VM](t)(viewer.Get(ctx, ref)); got.GetName() != "web1" {
		t.Errorf("viewer get = %v", got)
	}

	// A changed grant takes effect within seconds, without restarting anything.
	env.Grant(viewer.Node, "operator")
	waitFor(t, "viewer promoted to operator", func() bool {
		me, err := viewer.WhoAmI(ctx, &threesv1.WhoAmIRequest{})
		return err == nil && me.GetRole() == "operator"
	})
	must[*threesv1.VM](t)(viewer.Stop(ctx, ref))

	// Re-tagging a node changes who it is.
	env.Tailnet.SetTags(operator.Node, "tag:ci", "tag:deploy")
	waitFor(t, "operator re-tagged", func() bool {
		me, err := operator.WhoAmI(ctx, &threesv1.WhoAmIRequest{})
		return err == nil && len(me.GetTags()) == 2
	})
}

// TestLocalSocket: the host's root is admin on the local socket with no tailnet grant.
func TestLocalSocket(t *testing.T) {
	env := threestest.Start(t)
	ctx := ctxT(t)
	local := env.Local(t)
	me := must[*threesv1.WhoAmIResponse](t)(local.WhoAmI(ctx, &threesv1.WhoAmIRequest{}))
	if !me.GetLocal() || me.GetRole() != "admin" {
		t.Fatalf("local whoami = %v", me)
	}
	must[*threesv1.Network](t)(local.CreateNetwork(ctx, &threesv1.NetworkRequest{Name: "from-host"}))
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// TestValidation: each rule answers bad input with InvalidArgument naming the field,
// and a rejected create leaves nothing behind.
func TestValidation(t *testing.T) {
	env := threestest.Start(t)
	ctx := ctxT(t)
	c := env.Local(t)
	must[*threesv1.Network](t)(c.CreateNetwork(ctx, &threesv1.NetworkRequest{Name: "lab"}))
	good := func() *threesv1.CreateRequest {
		return &threesv1.CreateRequest{Name: "vm1", Network: "lab", Image: "base", Type: threesv1.VMType_VM_TYPE_TEENY}
	}
	long := make([]byte, 257)
	for i := range long {
		long[i] = 'x'
	}
	for _, tc := range []struct {
		name  string
		edit  func(r *threesv1.CreateRequest)
		code  codes.Code
		field string
	}{
		{"short name", func(r *threesv1.CreateRequest) { r.Name = "ab" }, codes.InvalidArgument, "name"},
		{"upper name", func(r *threesv1.CreateRequest) { r.Name = "Web" }, codes.InvalidArgument, "name"},
		{"underscore name", func(r *threesv1.CreateRequest) { r.Name = "web_1" }, codes.InvalidArgument, "name"},
		{"hyphen end", func(r *threesv1.CreateRequest) { r.Name = "web-" }, codes.InvalidArgument, "name"},
		{"long description", func(r *threesv1.CreateRequest) { r.Description = string(long) }, codes.InvalidArgument, "description"},
		{"control char description", func(r *threesv1.CreateRequest) { r.Description = "a\x07b" }, codes.InvalidArgument, "description"},
		{"unknown image", func(r *threesv1.CreateRequest) { r.Image = "windows" }, codes.InvalidArgument, "image"},
		{"no type", func(r *threesv1.CreateRequest) { r.Type = 0 }, codes.InvalidArgument, "type"},
		{"bad type", func(r *threesv1.CreateRequest) { r.Type = 42 }, codes.InvalidArgument, "type"},
		{"bad network name", func(r *threesv1.CreateRequest) { r.Network = "x" }, codes.InvalidArgument, "network"},
		{"missing network", func(r *threesv1.CreateRequest) { r.Network = "elsewhere" }, codes.NotFound, "elsewhere"},
		{"bad key", func(r *threesv1.CreateRequest) { r.PublicKey = "hello" }, codes.InvalidArgument, "public_key"},
		{"bad kv key", func(r *threesv1.CreateRequest) { r.Kvs = []*threesv1.KV{{Key: "a b", Value: "x"}} }, codes.InvalidArgument, "key"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := good()
			tc.edit(r)
			_, err := c.Create(ctx, r)
			wantCode(t, err, tc.code, tc.field)
		})
	}
	if vms := all(t, ctx, c, true); len(vms) != 0 {
		t.Errorf("rejected creates left %v", vms)
	}
	for _, tc := range []struct {
		name string
		err  error
		code codes.Code
		want string
	}{
		{"bad id", second(c.Get(ctx, &threesv1.VMRef{Id: "toy0"})), codes.InvalidArgument, "id"},
		{"unknown id", second(c.Get(ctx, &threesv1.VMRef{Id: "d1e4dplqs5f51296gtdg"})), codes.NotFound, "d1e4dplqs5f51296gtdg"},
		{"bad network", second(c.CreateNetwork(ctx, &threesv1.NetworkRequest{Name: "Bad Net"})), codes.InvalidArgument, "name"},
		{"delete missing network", second(c.DeleteNetwork(ctx, &threesv1.NetworkRequest{Name: "nowhere"})), codes.NotFound, "nowhere"},
		{"purge bad id", second(c.Purge(ctx, &threesv1.PurgeRequest{Ids: []string{"x"}})), codes.InvalidArgument, "id"},
		{"empty kvs", second(c.UpsertKVs(ctx, &threesv1.KVs{VmId: "d1e4dplqs5f51296gtdg"})), codes.InvalidArgument, "kvs"},
	} {
		if status.Code(tc.err) != tc.code || !strings.Contains(status.Convert(tc.err).Message(), tc.want) {
			t.Errorf("%s: got %v, want %v mentioning %q", tc.name, tc.err, tc.code, tc.want)
		}
	}
}

func second[T any](_ T, err error) error { return err }

// TestRestartKeepsState: VMs, networks and key/values survive an appliance restart on
// the same state dir, and a VM that was running runs again.
func TestRestartKeepsState(t *testing.T) {
	env := threestest.Start(t)
	ctx := ctxT(t)
	c := env.Local(t)
	must[*threesv1.Network](t)(c.CreateNetwork(ctx, &threesv1.NetworkRequest{Name: "lab"}))
	vm := must[*threesv1.VM](t)(c.Create(ctx, &threesv1.CreateRequest{Name: "keeper", Network: "lab", Image: "base", Type: threesv1.VMType_VM_TYPE_MIDDY,
		Kvs: []*threesv1.KV{{Key: "k", Value: "v"}}}))
	// The host lost the domain's running state (as a reboot does): a destroy, not a
	// shutdown, which would be the guest's own wish to stay off.
	behindBack(t, "destroy", vm.GetId())

	env.Restart(t)
	c = env.Local(t)
	got := must[*threesv1.VM](t)(c.Get(ctx, &threesv1.VMRef{Id: vm.GetId()}))
	if got.GetName() != "keeper" || got.GetManagementIp() != vm.GetManagementIp() || got.GetMac() != vm.GetMac() {
		t.Errorf("after restart = %v, want %v", got, vm)
	}
	if kvs := must[*threesv1.KVs](t)(c.GetKVs(ctx, &threesv1.VMRef{Id: vm.GetId()})); kvMap(kvs)["k"] != "v" {
		t.Errorf("kvs after restart = %v", kvs)
	}
	// Reconcile starts it again, behind the serving appliance.
	waitFor(t, "domain running again after restart", func() bool { return domainState(t, env, vm.GetId()) == "running" })
	// Its address stays taken: a new VM gets another.
	other := must[*threesv1.VM](t)(c.Create(ctx, &threesv1.CreateRequest{Name: "newbie", Network: "lab", Image: "base", Type: threesv1.VMType_VM_TYPE_TEENY}))
	if other.GetManagementIp() == vm.GetManagementIp() {
		t.Errorf("address %s handed out twice", other.GetManagementIp())
	}
}
