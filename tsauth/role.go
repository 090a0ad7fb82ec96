// Package tsauth owns who a caller of the threes API is and what it may do:
// it turns a tailnet peer address into a Principal (user login or ACL tags,
// node, role) using WhoIs, caches that cheaply, reads roles from the threes
// app capability grant, and guards tsnet dials so they never leave the
// tailnet. It does not own the tailnet policy file or auth keys (see
// tsauth/policy and tsauth/control), nor the gRPC interceptors that use it
// (see appliance).
package tsauth

import (
	"encoding/json"
	"errors"
	"fmt"

	"tailscale.com/tailcfg"
)

// Capability is the Tailscale app capability whose grant gives a caller its
// threes role. A grant's value is a list of JSON objects: [{"role":"admin"}].
const Capability tailcfg.PeerCapability = "threes.dev/cap/threes"

// Role is what a caller may do; a higher role includes every lower one.
type Role int

// Roles, lowest first, so that comparisons like r >= RoleOperator work.
const (
	// RoleNone may do nothing: the caller has no grant.
	RoleNone Role = iota
	// RoleViewer may read state.
	RoleViewer
	// RoleOperator may also start, stop and create machines.
	RoleOperator
	// RoleAdmin may do everything, including deleting and changing policy.
	RoleAdmin
)

// ErrUnknownRole is returned when a role name is not one of none, viewer,
// operator or admin.
var ErrUnknownRole = errors.New("unknown role")

// ErrMalformedGrant is returned when a grant of Capability does not have the
// form [{"role":"<name>"}, ...].
var ErrMalformedGrant = errors.New("malformed threes grant")

var roleNames = [...]string{
	RoleNone:     "none",
	RoleViewer:   "viewer",
	RoleOperator: "operator",
	RoleAdmin:    "admin",
}

// String returns the role's name as written in grants.
func (r Role) String() string {
	if r < 0 || int(r) >= len(roleNames) {
		return fmt.Sprintf("Role(%d)", int(r))
	}
	return roleNames[r]
}

// ParseRole returns the Role named s (exactly as String writes it).
func ParseRole(s string) (Role, error) {
	for r, name := range roleNames {
		if s == name {
			return Role(r), nil
		}
	}
	return RoleNone, fmt.Errorf("parse role %q: %w", s, ErrUnknownRole)
}

// grantValue is one element of a grant's value list.
type grantValue struct {
	// Role is a pointer so that a missing field is told apart from "".
	Role *string `json:"role"`
}

// RoleFromCapMap returns the highest role granted through Capability in m.
// It returns RoleNone when m has no such grant, and an error when any value of
// the grant is malformed or names an unknown role, so that a broken policy
// fails closed instead of silently granting less or more.
func RoleFromCapMap(m tailcfg.PeerCapMap) (Role, error) {
	vals, ok := m[Capability]
	if !ok {
		return RoleNone, nil
	}
	best := RoleNone
	for _, raw := range vals {
		var v grantValue
		if err := json.Unmarshal([]byte(raw), &v); err != nil {
			return RoleNone, fmt.Errorf("grant %s value %s: %w: %v", Capability, raw, ErrMalformedGrant, err)
		}
		if v.Role == nil {
			return RoleNone, fmt.Errorf("grant %s value %s: %w: no role", Capability, raw, ErrMalformedGrant)
		}
		r, err := ParseRole(*v.Role)
		if err != nil {
			return RoleNone, fmt.Errorf("grant %s: %w", Capability, err)
		}
		best = max(best, r)
	}
	return best, nil
}
