package tsauth

import (
	"net/netip"
	"strings"

	"tailscale.com/tailcfg"
)

// Principal is an authenticated caller of the threes API.
type Principal struct {
	// Login is the user's login name; it is empty when the node is tagged,
	// because a tagged node acts for its tags, not for whoever enrolled it.
	Login string
	// Node is the caller's node name (its MagicDNS name without the final dot).
	Node string
	// NodeID is the caller's stable node ID, for audit records.
	NodeID tailcfg.StableNodeID
	// Addr is the tailnet address the call came from.
	Addr netip.Addr
	// Tags are the node's ACL tags, sorted; empty for a user's node.
	// Callers must not modify the slice.
	Tags []string
	// Role is the highest role granted through Capability.
	Role Role
	// Local is true for the host's root user talking over the unix socket.
	Local bool
}

// LocalRoot returns the Principal of the host's root user talking over the
// local unix socket: whoever is root on the host controls the VMs anyway, so
// it is an admin.
func LocalRoot() Principal {
	return Principal{Role: RoleAdmin, Local: true}
}

// String names the principal for logs and errors: the login, the tags, or
// "root (local socket)".
func (p Principal) String() string {
	switch {
	case p.Local:
		return "root (local socket)"
	case p.Login != "":
		return p.Login
	case len(p.Tags) > 0:
		return strings.Join(p.Tags, ",")
	case p.Node != "":
		return "node " + p.Node
	default:
		return "nobody"
	}
}

// IsTagged reports whether the principal is a tagged node.
func (p Principal) IsTagged() bool { return len(p.Tags) > 0 }
