package tsauth

import (
	"errors"
	"net/netip"
	"testing"

	"tailscale.com/client/tailscale/apitype"
	"tailscale.com/tailcfg"
)

func TestParseRole(t *testing.T) {
	for _, r := range []Role{RoleNone, RoleViewer, RoleOperator, RoleAdmin} {
		got, err := ParseRole(r.String())
		if err != nil || got != r {
			t.Errorf("ParseRole(%q) = %v, %v; want %v", r.String(), got, err, r)
		}
	}
	for _, s := range []string{"", "Admin", "root", " admin", "owner"} {
		if r, err := ParseRole(s); !errors.Is(err, ErrUnknownRole) {
			t.Errorf("ParseRole(%q) = %v, %v; want ErrUnknownRole", s, r, err)
		}
	}
	if RoleNone >= RoleViewer || RoleViewer >= RoleOperator || RoleOperator >= RoleAdmin {
		t.Error("roles are not ordered none < viewer < operator < admin")
	}
	// Past either end of the table: a number, not a panic.
	for r, want := range map[Role]string{RoleAdmin + 1: "Role(4)", 17: "Role(17)", -1: "Role(-1)"} {
		if got := r.String(); got != want {
			t.Errorf("Role(%d).String() = %q; want %q", int(r), got, want)
		}
	}
}

func TestRoleFromCapMap(t *testing.T) {
	grant := func(vals ...string) tailcfg.PeerCapMap {
		raws := make([]tailcfg.RawMessage, len(vals))
		for i, v := range vals {
			raws[i] = tailcfg.RawMessage(v)
		}
		return tailcfg.PeerCapMap{Capability: raws}
	}
	for _, tc := range []struct {
		name    string
		m       tailcfg.PeerCapMap
		want    Role
		wantErr error
	}{
		{name: "nil map", m: nil, want: RoleNone},
		{name: "other capability only", m: tailcfg.PeerCapMap{"example.com/cap/x": {`{"role":"admin"}`}}, want: RoleNone},
		{name: "granted without values", m: grant(), want: RoleNone},
		{name: "viewer", m: grant(`{"role":"viewer"}`), want: RoleViewer},
		{name: "operator", m: grant(`{"role":"operator"}`), want: RoleOperator},
		{name: "admin", m: grant(`{"role":"admin"}`), want: RoleAdmin},
		{name: "explicit none", m: grant(`{"role":"none"}`), want: RoleNone},
		{name: "highest of many", m: grant(`{"role":"viewer"}`, `{"role":"admin"}`, `{"role":"operator"}`), want: RoleAdmin},
		{name: "highest regardless of order", m: grant(`{"role":"operator"}`, `{"role":"viewer"}`), want: RoleOperator},
		{name: "extra fields are ignored", m: grant(`{"role":"viewer","note":"ci"}`), want: RoleViewer},
		{name: "unknown role", m: grant(`{"role":"root"}`), wantErr: ErrUnknownRole},
		{name: "unknown role among good ones", m: grant(`{"role":"admin"}`, `{"role":"superuser"}`), wantErr: ErrUnknownRole},
		{name: "role in wrong case", m: grant(`{"role":"Admin"}`), wantErr: ErrUnknownRole},
		{name: "bare string", m: grant(`"admin"`), wantErr: ErrMalformedGrant},
		{name: "number role", m: grant(`{"role":3}`), wantErr: ErrMalformedGrant},
		{name: "missing role", m: grant(`{}`), wantErr: ErrMalformedGrant},
		{name: "null", m: grant(`null`), wantErr: ErrMalformedGrant},
		{name: "list", m: grant(`[{"role":"admin"}]`), wantErr: ErrMalformedGrant},
		{name: "broken json", m: grant(`{"role":`), wantErr: ErrMalformedGrant},
		{name: "malformed after a good one", m: grant(`{"role":"admin"}`, `42`), wantErr: ErrMalformedGrant},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := RoleFromCapMap(tc.m)
			if tc.wantErr != nil {
				if !errors.Is(err, tc.wantErr) {
					t.Fatalf("RoleFromCapMap = %v, %v; want error %v", got, err, tc.wantErr)
				}
				if got != RoleNone {
					t.Errorf("role %v returned with error", got)
				}
				return
			}
			if err != nil || got != tc.want {
				t.Fatalf("RoleFromCapMap = %v, %v; want %v", got, err, tc.want)
			}
		})
	}
}

func TestPrincipalString(t *testing.T) {
	for _, tc := range []struct {
		p    Principal
		want string
	}{
		{Principal{Login: "alice@example.com", Node: "laptop.tailnet.test"}, "alice@example.com"},
		{Principal{Tags: []string{"tag:ci"}, Node: "runner.tailnet.test"}, "tag:ci"},
		{Principal{Tags: []string{"tag:a", "tag:b"}}, "tag:a,tag:b"},
		{LocalRoot(), "root (local socket)"},
		{Principal{Node: "odd.tailnet.test"}, "node odd.tailnet.test"},
		{Principal{}, "nobody"},
	} {
		if got := tc.p.String(); got != tc.want {
			t.Errorf("%+v.String() = %q; want %q", tc.p, got, tc.want)
		}
	}
	if r := LocalRoot(); r.Role != RoleAdmin || !r.Local {
		t.Errorf("LocalRoot() = %+v", r)
	}
}

func TestPrincipalFromWhoIsTaggedIgnoresUser(t *testing.T) {
	// Control servers attach a user profile to tagged nodes (testcontrol: the
	// enrolling user; headscale: "tagged-devices"); it must not become the
	// login. This is also covered on a real tailnet in identify_test.go.
	for _, login := range []string{"bob@example.com", "tagged-devices"} {
		res := whoisResponse(login, []string{"tag:ci"})
		p, err := principalFromWhoIs(netip.MustParseAddr("100.64.0.9"), res)
		if err != nil {
			t.Fatal(err)
		}
		if p.Login != "" || len(p.Tags) != 1 || p.String() != "tag:ci" {
			t.Errorf("tagged node with profile %q: %+v", login, p)
		}
	}
	if _, err := principalFromWhoIs(netip.MustParseAddr("100.64.0.9"), whoisResponse("", nil)); err == nil {
		t.Error("untagged node without login was accepted")
	}
}

func whoisResponse(login string, tags []string) *apitype.WhoIsResponse {
	return &apitype.WhoIsResponse{
		Node:        &tailcfg.Node{Name: "n.tailnet.test.", StableID: "n1", Tags: tags},
		UserProfile: &tailcfg.UserProfile{LoginName: login},
	}
}
