// Package policy edits a tailnet policy file (HuJSON) to add and remove threes
// networks.
//
// A network is a tag owned by the appliance's own tag plus a few rules: members
// reach members on every port, admins reach members over Tailscale SSH, and the
// tailnet reaches port 443 on members. The edit is a merge into the owner's file:
// everything threes did not write keeps its bytes, comments and formatting, and
// every entry threes writes carries a marker comment naming the network's tag, so
// removal takes out exactly those entries and nothing else.
//
// The package owns the text of the policy file only. It does not talk to a control
// server (see tsauth/control) and does not decide whether a network may be removed.
package policy

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"regexp"
	"slices"
	"strings"

	"github.com/tailscale/hujson"
)

// ErrInvalidName means a network name or tag cannot be used in a policy file.
var ErrInvalidName = errors.New("invalid network name")

// ErrInvalidPolicy means the policy file could not be parsed or has a section of the wrong shape.
var ErrInvalidPolicy = errors.New("invalid policy")

// ErrAllowAll means the policy has neither acls nor grants, which control servers read
// as "allow everything"; adding a network's rules would silently deny everything else.
var ErrAllowAll = errors.New("policy has no acls or grants (allow all)")

// ErrOwnerTagUndefined means the appliance's own tag is missing from tagOwners; a
// network tag owned by an undefined tag is rejected by the control server.
var ErrOwnerTagUndefined = errors.New("owner tag not defined in tagOwners")

// ErrTagTaken means tagOwners already defines the network's tag without threes'
// marker: someone else wrote it, so threes will neither claim nor overwrite it.
var ErrTagTaken = errors.New("network tag already defined by the policy owner")

// Options say how a network's rules are written.
type Options struct {
	// OwnerTag is the appliance's own tag (e.g. "tag:threes"); it owns every network
	// tag and prefixes it: network "web" becomes "tag:threes-web".
	OwnerTag string
	// Admins may SSH into members (default ["autogroup:admin"], which only Tailscale
	// knows; headscale needs users or groups here).
	Admins []string
	// SSHUsers are the login names admins may use (default ["autogroup:nonroot", "root"]).
	SSHUsers []string
	// Public may reach port 443 on members (default ["*"]: the whole tailnet).
	Public []string
}

func (o Options) withDefaults() Options {
	if len(o.Admins) == 0 {
		o.Admins = []string{"autogroup:admin"}
	}
	if len(o.SSHUsers) == 0 {
		o.SSHUsers = []string{"autogroup:nonroot", "root"}
	}
	if len(o.Public) == 0 {
		o.Public = []string{"*"}
	}
	return o
}

var (
	nameRE = regexp.MustCompile(`^[a-z0-9]([a-z0-9-]{0,38}[a-z0-9])?$`)
	tagRE  = regexp.MustCompile(`^tag:[A-Za-z][A-Za-z0-9-]*$`)
)

// NetworkTag returns the tag that marks members of network name, e.g.
// NetworkTag("tag:threes", "web") is "tag:threes-web".
func NetworkTag(ownerTag, name string) (string, error) {
	if !tagRE.MatchString(ownerTag) {
		return "", fmt.Errorf("owner tag %q: %w", ownerTag, ErrInvalidName)
	}
	if !nameRE.MatchString(name) {
		return "", fmt.Errorf("network %q (want 1-40 of a-z, 0-9, '-'): %w", name, ErrInvalidName)
	}
	return ownerTag + "-" + name, nil
}

// Section names, as written by threes. Lookups are case-insensitive because
// Tailscale accepts "ACLs" as well as "acls".
const (
	secTagOwners = "tagOwners"
	secGrants    = "grants"
	secACLs      = "acls"
	secSSH       = "ssh"
)

// sectionMarker marks a top-level section that threes created because the owner's
// file had none; it goes away with the last entry in it.
const sectionMarker = "threes:managed section"

func networkMarker(tag string) string { return "threes:managed " + tag }

// rules is what one network adds, as HuJSON text of each value.
type rules struct {
	tag      string
	owner    string   // tagOwners value
	grants   []string // grants entries
	sshRules []string // ssh entries
}

func makeRules(tag string, o Options) rules {
	t := []string{tag}
	return rules{
		tag:   tag,
		owner: jsonText([]string{o.OwnerTag}),
		grants: []string{
			// Members talk to members on everything.
			`{"src": ` + jsonText(t) + `, "dst": ` + jsonText(t) + `, "ip": ["*"]}`,
			// The tailnet reaches the members' HTTPS port.
			`{"src": ` + jsonText(o.Public) + `, "dst": ` + jsonText(t) + `, "ip": ["443"]}`,
			// The ssh rule below decides who logs in as whom; this lets the packets through.
			`{"src": ` + jsonText(o.Admins) + `, "dst": ` + jsonText(t) + `, "ip": ["tcp:22"]}`,
		},
		sshRules: []string{
			`{"action": "accept", "src": ` + jsonText(o.Admins) + `, "dst": ` + jsonText(t) + `, "users": ` + jsonText(o.SSHUsers) + `}`,
		},
	}
}

func jsonString(s string) string {
	b, err := json.Marshal(s)
	if err != nil {
		panic(err) // a string always marshals
	}
	return string(b)
}

func jsonText(v []string) string {
	b, err := json.Marshal(v)
	if err != nil {
		panic(err) // []string always marshals
	}
	return strings.ReplaceAll(string(b), `","`, `", "`)
}

// AddNetwork returns policy with network name's tag and rules merged in. Adding a
// network that is already there with the same rules returns policy unchanged; one
// whose threes-written entries differ (other options) has them rewritten.
func AddNetwork(policy []byte, name string, opts Options) ([]byte, error) {
	opts = opts.withDefaults()
	tag, err := NetworkTag(opts.OwnerTag, name)
	if err != nil {
		return nil, err
	}
	root, obj, err := parse(policy)
	if err != nil {
		return nil, err
	}
	if findMember(obj, secGrants) < 0 && findMember(obj, secACLs) < 0 {
		// Say how to fix it: an explicit rule keeps today's reach, and then threes'
		// rules can be added beside it.
		return nil, fmt.Errorf("add network %s: %w: add rules to the tailnet policy first "+
			`(to keep everything reachable as now: "grants": [{"src": ["*"], "dst": ["*"], "ip": ["*"]}]), then try again`,
			name, ErrAllowAll)
	}
	tagOwners, err := section[*hujson.Object](obj, secTagOwners)
	if err != nil {
		return nil, err
	}
	if tagOwners == nil || findMemberExact(tagOwners, opts.OwnerTag) < 0 {
		return nil, fmt.Errorf("add network %s: %s: %w", name, opts.OwnerTag, ErrOwnerTagUndefined)
	}
	if i := findMemberExact(tagOwners, tag); i >= 0 && !hasMarker(tagOwners.Members[i].Name.BeforeExtra, networkMarker(tag)) {
		return nil, fmt.Errorf("add network %s: %s: %w", name, tag, ErrTagTaken)
	}
	want := makeRules(tag, opts)
	inSync, err := isInSync(obj, tagOwners, want)
	if err != nil {
		return nil, err
	}
	if inSync {
		return policy, nil
	}
	if err := remove(obj, tag); err != nil {
		return nil, err
	}
	if err := add(obj, want); err != nil {
		return nil, err
	}
	return root.Pack(), nil
}

// RemoveNetwork returns policy without the entries AddNetwork wrote for network
// name; the owner's entries are untouched. Removing an absent network returns
// policy unchanged.
func RemoveNetwork(policy []byte, name string, opts Options) ([]byte, error) {
	tag, err := NetworkTag(opts.OwnerTag, name)
	if err != nil {
		return nil, err
	}
	root, obj, err := parse(policy)
	if err != nil {
		return nil, err
	}
	before := root.Pack()
	if err := remove(obj, tag); err != nil {
		return nil, err
	}
	after := root.Pack()
	if bytes.Equal(before, after) {
		return policy, nil
	}
	return after, nil
}

// HasNetwork reports whether policy holds threes' tagOwners entry for network name.
func HasNetwork(policy []byte, name string, opts Options) (bool, error) {
	tag, err := NetworkTag(opts.OwnerTag, name)
	if err != nil {
		return false, err
	}
	_, obj, err := parse(policy)
	if err != nil {
		return false, err
	}
	tagOwners, err := section[*hujson.Object](obj, secTagOwners)
	if err != nil || tagOwners == nil {
		return false, err
	}
	i := findMemberExact(tagOwners, tag)
	return i >= 0 && hasMarker(tagOwners.Members[i].Name.BeforeExtra, networkMarker(tag)), nil
}

func parse(policy []byte) (*hujson.Value, *hujson.Object, error) {
	root, err := hujson.Parse(policy)
	if err != nil {
		return nil, nil, fmt.Errorf("parse policy: %w: %w", ErrInvalidPolicy, err)
	}
	obj, ok := root.Value.(*hujson.Object)
	if !ok {
		return nil, nil, fmt.Errorf("parse policy: top level is not an object: %w", ErrInvalidPolicy)
	}
	return &root, obj, nil
}

// findMember returns the index of the member named name (case-insensitive), or -1.
func findMember(obj *hujson.Object, name string) int {
	for i, m := range obj.Members {
		if lit, ok := m.Name.Value.(hujson.Literal); ok && strings.EqualFold(lit.String(), name) {
			return i
		}
	}
	return -1
}

// findMemberExact returns the index of the member named name, or -1.
func findMemberExact(obj *hujson.Object, name string) int {
	for i, m := range obj.Members {
		if lit, ok := m.Name.Value.(hujson.Literal); ok && lit.String() == name {
			return i
		}
	}
	return -1
}

// section returns the top-level member name as a T, nil when absent.
func section[T *hujson.Object | *hujson.Array](obj *hujson.Object, name string) (T, error) {
	i := findMember(obj, name)
	if i < 0 {
		return nil, nil
	}
	v, ok := obj.Members[i].Value.Value.(T)
	if !ok {
		return nil, fmt.Errorf("section %s has the wrong type: %w", name, ErrInvalidPolicy)
	}
	return v, nil
}

// isInSync reports whether every entry threes wants for want.tag is present exactly
// once, marked, and with the wanted value.
func isInSync(obj *hujson.Object, tagOwners *hujson.Object, want rules) (bool, error) {
	marker := networkMarker(want.tag)
	var owners []string
	for _, m := range tagOwners.Members {
		if hasMarker(m.Name.BeforeExtra, marker) {
			owners = append(owners, minify(m.Name)+":"+minify(m.Value))
		}
	}
	if !slices.Equal(owners, []string{minifyText(jsonString(want.tag)) + ":" + minifyText(want.owner)}) {
		return false, nil
	}
	for _, s := range []struct {
		name string
		want []string
	}{{secGrants, want.grants}, {secSSH, want.sshRules}} {
		arr, err := section[*hujson.Array](obj, s.name)
		if err != nil || arr == nil {
			return false, err
		}
		var got []string
		for _, e := range arr.Elements {
			if hasMarker(e.BeforeExtra, marker) {
				got = append(got, minify(e))
			}
		}
		var wantMin []string
		for _, w := range s.want {
			wantMin = append(wantMin, minifyText(w))
		}
		if !slices.Equal(got, wantMin) {
			return false, nil
		}
	}
	return true, nil
}

func minify(v hujson.Value) string {
	v = v.Clone()
	v.Minimize()
	return string(v.Pack())
}

func minifyText(s string) string {
	v, err := hujson.Parse([]byte(s))
	if err != nil {
		panic(fmt.Sprintf("threes-generated HuJSON does not parse: %v", err))
	}
	return minify(v)
}

// add appends want's entries, creating the grants and ssh sections if missing.
func add(obj *hujson.Object, want rules) error {
	marker := networkMarker(want.tag)
	rootSeq := objectSeq{obj}
	rootLayout := layoutOf(rootSeq, "", true)

	tagOwners, _ := section[*hujson.Object](obj, secTagOwners)
	tagSeq := objectSeq{tagOwners}
	appendManaged(tagSeq, layoutOf(tagSeq, rootLayout.indent, rootLayout.multiline), marker,
		[]any{member(jsonString(want.tag), want.owner)})

	for _, s := range []struct {
		name    string
		entries []string
	}{{secGrants, want.grants}, {secSSH, want.sshRules}} {
		arr, err := section[*hujson.Array](obj, s.name)
		if err != nil {
			return err
		}
		if arr == nil {
			arr = &hujson.Array{}
			appendManaged(rootSeq, rootLayout, sectionMarker, []any{hujson.ObjectMember{
				Name:  hujson.Value{Value: hujson.String(s.name)},
				Value: hujson.Value{BeforeExtra: hujson.Extra(" "), Value: arr},
			}})
		}
		seq := arraySeq{arr}
		items := make([]any, len(s.entries))
		for i, e := range s.entries {
			items[i] = mustParse(e)
		}
		appendManaged(seq, layoutOf(seq, rootLayout.indent, rootLayout.multiline), marker, items)
	}
	return nil
}

// remove takes out every entry marked for tag, then any section threes created
// that is now empty.
func remove(obj *hujson.Object, tag string) error {
	marker := networkMarker(tag)
	for _, name := range []string{secTagOwners, secGrants, secSSH} {
		i := findMember(obj, name)
		if i < 0 {
			continue
		}
		switch v := obj.Members[i].Value.Value.(type) {
		case *hujson.Object:
			removeManaged(objectSeq{v}, marker, nil)
		case *hujson.Array:
			removeManaged(arraySeq{v}, marker, nil)
		default:
			return fmt.Errorf("section %s has the wrong type: %w", name, ErrInvalidPolicy)
		}
	}
	removeManaged(objectSeq{obj}, sectionMarker, func(j int) bool {
		arr, ok := obj.Members[j].Value.Value.(*hujson.Array)
		return ok && len(arr.Elements) == 0
	})
	return nil
}

func member(name, value string) hujson.ObjectMember {
	v := mustParse(value)
	v.BeforeExtra = hujson.Extra(" ")
	return hujson.ObjectMember{Name: mustParse(name), Value: v}
}

func mustParse(s string) hujson.Value {
	v, err := hujson.Parse([]byte(s))
	if err != nil {
		panic(fmt.Sprintf("threes-generated HuJSON %q does not parse: %v", s, err))
	}
	return v
}
