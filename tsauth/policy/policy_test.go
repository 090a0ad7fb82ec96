package policy

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strings"
	"testing"

	"github.com/tailscale/hujson"
)

var opts = Options{OwnerTag: "tag:threes"}

// Policies shaped like ones people run: Tailscale's default file grown by hand,
// a mix of grants and acls in strict JSON style, a headscale file, one line.
var policies = map[string]string{
	"tailscale-default": `// Example/default ACLs for unrestricted connections.
{
	// Declare static groups of users. Use autogroups for all users or users with a specific role.
	"groups": {
		"group:ops": ["alice@example.com", "bob@example.com"],
	},

	// Define the tags which can be applied to devices and by which users.
	"tagOwners": {
		"tag:threes": ["autogroup:admin"],
		"tag:prod":   ["group:ops"], // production boxes
	},

	// Define access control lists for users, groups, autogroups, tags,
	// Tailscale IP addresses, and subnet ranges.
	"acls": [
		// Allow all connections.
		// Comment this section out if you want to define specific restrictions.
		{"action": "accept", "src": ["*"], "dst": ["*:*"]},
	],

	// Define users and devices that can use Tailscale SSH.
	"ssh": [
		// Allow all users to SSH into their own devices in check mode.
		// Comment this section out if you want to define specific restrictions.
		{
			"action": "check",
			"src":    ["autogroup:member"],
			"dst":    ["autogroup:self"],
			"users":  ["autogroup:nonroot", "root"],
		},
	],

	// Test access rules every time they're saved.
	// "tests": [
	//   {
	//       "src": "alice@example.com",
	//       "accept": ["tag:example"],
	//       "deny": ["100.101.102.103:443"],
	//   },
	// ],
}
`,
	"grants-and-acls-strict": `{
  "tagOwners": {
    "tag:ci": ["group:dev"],
    "tag:threes": ["group:dev"]
  },
  "groups": {"group:dev": ["carol@example.com"]},
  "grants": [
    {
      "src": ["group:dev"],
      "dst": ["tag:ci"],
      "ip": ["22", "443"]
    },
    /* the appliance's own role grant */
    {
      "src": ["group:dev"],
      "dst": ["tag:threes"],
      "app": {"threes.dev/cap/threes": [{"role": "admin"}]}
    } // keep me on this line
  ],
  "acls": [
    {"action": "accept", "src": ["tag:ci"], "dst": ["tag:ci:*"]}
  ],
  "ssh": [
    {"action": "accept", "src": ["group:dev"], "dst": ["tag:ci"], "users": ["root"]} /* after */ , // trailing
  ]
}`,
	"headscale-acls-only": `{
    "groups": {
        "group:admins": ["admin@"],
    },
    "tagOwners": {
        "tag:threes": ["group:admins"],
    },
    "acls": [
        { "action": "accept", "src": ["group:admins"], "dst": ["*:*"] },
    ],
}
`,
	"one-line":     `{"tagOwners":{"tag:threes":["autogroup:admin"]},"acls":[{"action":"accept","src":["*"],"dst":["*:*"]}]}`,
	"empty-grants": "{\r\n\t\"tagOwners\": {\"tag:threes\": []},\r\n\t\"grants\": [],\r\n\t\"ssh\": [\r\n\t],\r\n}\r\n",
	// Windows line endings, a same-line comment after a section's last entry,
	// and an empty section holding only a carriage return.
	"crlf-comments": "{\r\n  \"tagOwners\": {\"tag:threes\": [\"group:x\"]}, // owners\r\n  \"grants\": [\r\n    {\"src\": [\"a@\"], \"dst\": [\"b@\"], \"ip\": [\"80\"]}, // mine\r\n  ],\r\n  \"ssh\": [\r]\r\n}\r\n",
	// An empty multi-line section with plain line endings.
	// Empty sections: multi-line holding only an empty comment, and one line
	// holding a block comment.
	"empty-sections-lf": "{\n  \"tagOwners\": {\n    \"tag:threes\": [],\n  },\n  \"acls\": [],\n  \"grants\": [ /* none yet */ ],\n  \"ssh\": [\n    //\n  ],\n}\n",
	// A one-line section whose last entry has a line comment after it.
	"one-line-section-comment": "{\"tagOwners\": {\"tag:threes\": []}, \"grants\": [{\"src\": [\"a@\"], \"dst\": [\"b@\"], \"ip\": [\"80\"]} // mine\n]}",
	// acls before everything else.
	"acls-first": `{
  "acls": [{"action": "accept", "src": ["autogroup:member"], "dst": ["*:*"]}],
  "tagOwners": {"tag:threes": ["autogroup:admin"]}
}`,
}

func mustAdd(t *testing.T, p []byte, name string, o Options) []byte {
	t.Helper()
	out, err := AddNetwork(p, name, o)
	if err != nil {
		t.Fatalf("AddNetwork(%s): %v", name, err)
	}
	return out
}

func mustRemove(t *testing.T, p []byte, name string, o Options) []byte {
	t.Helper()
	out, err := RemoveNetwork(p, name, o)
	if err != nil {
		t.Fatalf("RemoveNetwork(%s): %v", name, err)
	}
	return out
}

// parsed is the policy as a control server reads it.
type parsed struct {
	TagOwners map[string][]string `json:"tagOwners"`
	Grants    []map[string]any    `json:"grants"`
	ACLs      []map[string]any    `json:"acls"`
	SSH       []map[string]any    `json:"ssh"`
}

func parsePolicy(t *testing.T, p []byte) parsed {
	t.Helper()
	std, err := hujson.Standardize(bytes.Clone(p))
	if err != nil {
		t.Fatalf("standardize:\n%s\n%v", p, err)
	}
	var out parsed
	if err := json.Unmarshal(std, &out); err != nil {
		t.Fatalf("unmarshal: %v", err)
	}
	return out
}

// ownerEntries returns the exact text of every entry (with name, for objects) in
// every section of p.
func ownerEntries(t *testing.T, p []byte) []string {
	t.Helper()
	v, err := hujson.Parse(p)
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, m := range v.Value.(*hujson.Object).Members {
		switch sec := m.Value.Value.(type) {
		case *hujson.Array:
			for _, e := range sec.Elements {
				out = append(out, string(p[e.StartOffset:e.EndOffset]))
			}
		case *hujson.Object:
			for _, e := range sec.Members {
				out = append(out, string(p[e.Name.StartOffset:e.Value.EndOffset]))
			}
		default:
			out = append(out, string(p[m.Name.StartOffset:m.Value.EndOffset]))
		}
	}
	return out
}

// isSubsequence reports whether every byte of a appears in b in order: the merge
// only inserted.
func isSubsequence(a, b []byte) bool {
	i := 0
	for j := 0; i < len(a) && j < len(b); j++ {
		if a[i] == b[j] {
			i++
		}
	}
	return i == len(a)
}

func TestAddKeepsOwnerBytes(t *testing.T) {
	for name, p := range policies {
		t.Run(name, func(t *testing.T) {
			orig := []byte(p)
			out := mustAdd(t, orig, "cool-network", opts)
			// Only insertions (the one byte that may be new in the owner's text is a comma).
			if !isSubsequence(orig, out) {
				t.Errorf("output is not the input plus insertions:\n%s", out)
			}
			// Each owner entry is still there, verbatim, in order.
			rest := string(out)
			for _, e := range ownerEntries(t, orig) {
				i := strings.Index(rest, e)
				if i < 0 {
					t.Fatalf("owner entry changed or lost: %s\noutput:\n%s", e, out)
				}
				rest = rest[i+len(e):]
			}
			// The control server sees the network.
			got := parsePolicy(t, out)
			if o := got.TagOwners["tag:threes-cool-network"]; !slices.Equal(o, []string{"tag:threes"}) {
				t.Errorf("tagOwners[tag:threes-cool-network] = %v", o)
			}
			before := parsePolicy(t, orig)
			if len(got.Grants) != len(before.Grants)+3 || len(got.SSH) != len(before.SSH)+1 || len(got.ACLs) != len(before.ACLs) {
				t.Errorf("grants %d->%d, ssh %d->%d, acls %d->%d", len(before.Grants), len(got.Grants), len(before.SSH), len(got.SSH), len(before.ACLs), len(got.ACLs))
			}
		})
	}
}

func TestRemoveRestoresExactly(t *testing.T) {
	for name, p := range policies {
		t.Run(name, func(t *testing.T) {
			orig := []byte(p)
			withA := mustAdd(t, orig, "a", opts)
			if again := mustAdd(t, withA, "a", opts); !bytes.Equal(again, withA) {
				t.Errorf("adding twice changed the policy:\n%s\nvs\n%s", withA, again)
			}
			if back := mustRemove(t, withA, "a", opts); !bytes.Equal(back, orig) {
				t.Errorf("remove(add(p)) != p:\n%q\nvs\n%q", back, orig)
			}
			// Interleaved networks, whose tags share a prefix.
			withAB := mustAdd(t, withA, "a-b", opts)
			onlyB := mustAdd(t, orig, "a-b", opts)
			if got := mustRemove(t, withAB, "a", opts); !bytes.Equal(got, onlyB) {
				t.Errorf("remove a from {a, a-b} != add a-b:\n%s\nvs\n%s", got, onlyB)
			}
			if got := mustRemove(t, mustRemove(t, withAB, "a-b", opts), "a", opts); !bytes.Equal(got, orig) {
				t.Errorf("remove a-b then a != p:\n%q", got)
			}
			if got := mustRemove(t, orig, "a", opts); !bytes.Equal(got, orig) {
				t.Errorf("removing an absent network changed the policy")
			}
		})
	}
}

func TestAddOwnerEditsAfterwards(t *testing.T) {
	// The owner appends a rule of their own after threes' entries; removing the
	// network leaves the owner's new rule in place.
	orig := []byte(policies["grants-and-acls-strict"])
	with := mustAdd(t, orig, "web", opts)
	v, err := hujson.Parse(with)
	if err != nil {
		t.Fatal(err)
	}
	patch := `[{"op": "add", "path": "/grants/-", "value": {"src": ["group:dev"], "dst": ["tag:ci"], "ip": ["80"]}}]`
	if err := v.Patch([]byte(patch)); err != nil {
		t.Fatal(err)
	}
	edited := v.Pack()
	// Adding the network again changes nothing, though its entries are no
	// longer at the end.
	if again := mustAdd(t, edited, "web", opts); !bytes.Equal(again, edited) {
		t.Errorf("re-adding an unchanged network after the owner's edit rewrote the policy:\n%s", again)
	}
	got := parsePolicy(t, mustRemove(t, edited, "web", opts))
	if want := parsePolicy(t, orig); len(got.Grants) != len(want.Grants)+1 || got.Grants[len(got.Grants)-1]["ip"].([]any)[0] != "80" {
		t.Errorf("owner's new grant lost: %v", got.Grants)
	}
	if _, ok := got.TagOwners["tag:threes-web"]; ok {
		t.Error("network tag survived removal")
	}

	// The owner comments their last grant, before the comma threes added
	// after it; the section had no trailing comma, and the comment stays.
	commented := strings.Replace(string(with), "}, // keep me on this line", "} /* mine */, // keep me on this line", 1)
	if commented == string(with) {
		t.Fatalf("owner's last grant not found:\n%s", with)
	}
	back := string(mustRemove(t, []byte(commented), "web", opts))
	if !strings.Contains(back, "/* mine */") || !strings.Contains(back, "// keep me on this line") {
		t.Errorf("owner's comments lost on removal:\n%s", back)
	}
	parsePolicy(t, []byte(back))
}

// TestAddRewritesChangedOptions re-adds a network with options that change
// the grants and the ssh rule, the ssh rule alone, or the grants alone: each
// time the result is what adding it afresh with the new options gives.
func TestAddRewritesChangedOptions(t *testing.T) {
	for _, tc := range []struct {
		name string
		opts Options
	}{
		{"admins", Options{OwnerTag: "tag:threes", Admins: []string{"group:admins"}}},
		{"ssh-users-only", Options{OwnerTag: "tag:threes", SSHUsers: []string{"debian"}}},
		{"public-only", Options{OwnerTag: "tag:threes", Public: []string{"group:admins"}}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			orig := []byte(policies["headscale-acls-only"])
			first := mustAdd(t, orig, "db", opts)
			second := mustAdd(t, first, "db", tc.opts)
			if bytes.Equal(second, first) {
				t.Fatalf("re-adding with other options left the policy as it was:\n%s", first)
			}
			if want := mustAdd(t, orig, "db", tc.opts); !bytes.Equal(second, want) {
				t.Errorf("re-adding with other options:\n%s\nwant\n%s", second, want)
			}
			if back := mustRemove(t, second, "db", tc.opts); !bytes.Equal(back, orig) {
				t.Errorf("remove after the rewrite != p:\n%s", back)
			}
		})
	}
}

func TestAddGolden(t *testing.T) {
	got := mustAdd(t, []byte(policies["headscale-acls-only"]), "cool-network", Options{OwnerTag: "tag:threes", Admins: []string{"group:admins"}})
	want := `{
    "groups": {
        "group:admins": ["admin@"],
    },
    "tagOwners": {
        "tag:threes": ["group:admins"],
        // threes:managed tag:threes-cool-network
        "tag:threes-cool-network": ["tag:threes"],
    },
    "acls": [
        { "action": "accept", "src": ["group:admins"], "dst": ["*:*"] },
    ],
    // threes:managed section
    "grants": [
        // threes:managed tag:threes-cool-network
        {"src": ["tag:threes-cool-network"], "dst": ["tag:threes-cool-network"], "ip": ["*"]},
        // threes:managed tag:threes-cool-network
        {"src": ["*"], "dst": ["tag:threes-cool-network"], "ip": ["443"]},
        // threes:managed tag:threes-cool-network
        {"src": ["group:admins"], "dst": ["tag:threes-cool-network"], "ip": ["tcp:22"]},
    ],
    // threes:managed section
    "ssh": [
        // threes:managed tag:threes-cool-network
        {"action": "accept", "src": ["group:admins"], "dst": ["tag:threes-cool-network"], "users": ["autogroup:nonroot", "root"]},
    ],
}
`
	if string(got) != want {
		t.Errorf("got:\n%s\nwant:\n%s", got, want)
	}
}

// TestAddLayout checks that threes' entries follow each section's layout: a
// file on one line stays on one line, an empty section written across lines
// gets one entry per line, and its closing bracket keeps the owner's indentation.
func TestAddLayout(t *testing.T) {
	add := func(p string) string { return string(mustAdd(t, []byte(p), "web", opts)) }
	if got := add(`{"tagOwners":{"tag:threes":[]},"acls":[]}`); strings.Contains(got, "\n") {
		t.Errorf("one-line file got line breaks:\n%s", got)
	}
	got := add("{\"tagOwners\":{\"tag:threes\":[]},\"grants\":[\n],\"ssh\":[]}")
	if n := strings.Count(got, "// threes:managed tag:threes-web\n"); n != 3 {
		t.Errorf("empty grants written across lines: %d of 3 entries on their own line:\n%s", n, got)
	}
	if !strings.Contains(got, `"ssh":[ /* threes:managed tag:threes-web */ {`) {
		t.Errorf("empty one-line ssh section not kept on one line:\n%s", got)
	}
	got = add("{\n  \"tagOwners\": {\"tag:threes\": []},\n  \"grants\": [],\n  \"ssh\": [\n      ],\n}\n")
	if !strings.HasSuffix(got, "\n      ],\n}\n") {
		t.Errorf("closing bracket of ssh moved:\n%s", got)
	}
}

func TestSameLineCommentStays(t *testing.T) {
	got := string(mustAdd(t, []byte(policies["grants-and-acls-strict"]), "web", opts))
	for _, line := range []string{
		`    }, // keep me on this line`,
		`    {"action": "accept", "src": ["group:dev"], "dst": ["tag:ci"], "users": ["root"]} /* after */ , // trailing`,
	} {
		if !strings.Contains(got, line+"\n") {
			t.Errorf("line %q not kept whole:\n%s", line, got)
		}
	}
}

// TestMarkerIsWholeTag checks that a network's marker is matched as a whole
// tag: entries whose comment names a longer tag that starts with the network's
// (another network, or the owner's own note) are not the network's.
func TestMarkerIsWholeTag(t *testing.T) {
	for _, suffix := range []string{"a", "z", "A", "Z", "0", "9", "-2", "_x", ".x", ":x"} {
		other := "tag:threes-web" + suffix
		p := []byte(`{
	"tagOwners": {
		"tag:threes": [],
		// threes:managed ` + other + `
		"` + other + `": ["tag:threes"],
	},
	"grants": [
		// threes:managed ` + other + `
		{"src": ["*"], "dst": ["` + other + `"], "ip": ["443"]},
	],
}
`)
		if has, err := HasNetwork(p, "web", opts); has || err != nil {
			t.Errorf("%s: HasNetwork(web) = %v, %v; want false", other, has, err)
		}
		if got := mustRemove(t, p, "web", opts); !bytes.Equal(got, p) {
			t.Errorf("%s: removing web changed the policy:\n%s", other, got)
		}
		with := mustAdd(t, p, "web", opts)
		if got := mustRemove(t, with, "web", opts); !bytes.Equal(got, p) {
			t.Errorf("%s: remove(add(web)) != p:\n%s", other, got)
		}
	}
}

func TestHasNetwork(t *testing.T) {
	orig := []byte(policies["tailscale-default"])
	for _, tc := range []struct {
		policy []byte
		want   bool
	}{
		{orig, false},
		{mustAdd(t, orig, "web", opts), true},
		{mustAdd(t, orig, "web-2", opts), false},
		// threes' entry first in tagOwners.
		{[]byte(`{"tagOwners": {/* threes:managed tag:threes-web */ "tag:threes-web": ["tag:threes"], "tag:threes": []}, "grants": []}`), true},
		{[]byte(`{"tagOwners": {"tag:threes-web": ["tag:threes"], "tag:threes": []}, "grants": []}`), false}, // not threes'
	} {
		got, err := HasNetwork(tc.policy, "web", opts)
		if err != nil || got != tc.want {
			t.Errorf("HasNetwork = %v, %v; want %v", got, err, tc.want)
		}
	}
}

func TestErrors(t *testing.T) {
	for _, tc := range []struct {
		name   string
		policy string
		net    string
		opts   Options
		want   error
	}{
		{"allow-all", `{"tagOwners": {"tag:threes": []}}`, "web", opts, ErrAllowAll},
		{"no-owner-tag", `{"tagOwners": {"tag:other": []}, "grants": []}`, "web", opts, ErrOwnerTagUndefined},
		{"no-tagowners", `{"grants": []}`, "web", opts, ErrOwnerTagUndefined},
		{"tag-taken", `{"tagOwners": {"tag:threes": [], "tag:threes-web": ["alice@"]}, "grants": []}`, "web", opts, ErrTagTaken},
		{"tag-taken-first", `{"tagOwners": {"tag:threes-web": ["alice@"], "tag:threes": []}, "grants": []}`, "web", opts, ErrTagTaken},
		{"bad-name", `{"tagOwners": {"tag:threes": []}, "grants": []}`, "Web!", opts, ErrInvalidName},
		{"name-leading-dash", `{"tagOwners": {"tag:threes": []}, "grants": []}`, "-web", opts, ErrInvalidName},
		{"bad-owner-tag", `{"tagOwners": {"tag:threes": []}, "grants": []}`, "web", Options{OwnerTag: "threes"}, ErrInvalidName},
		{"not-hujson", `{"grants": [}`, "web", opts, ErrInvalidPolicy},
		{"not-object", `[]`, "web", opts, ErrInvalidPolicy},
		{"grants-not-array", `{"tagOwners": {"tag:threes": []}, "grants": {}}`, "web", opts, ErrInvalidPolicy},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := AddNetwork([]byte(tc.policy), tc.net, tc.opts)
			if !errors.Is(err, tc.want) {
				t.Errorf("AddNetwork error = %v, want %v", err, tc.want)
			}
		})
	}
}

func TestNetworkTag(t *testing.T) {
	for _, tc := range []struct {
		owner, name string
		want        string // "" when refused
	}{
		{"tag:threes", "cool-network", "tag:threes-cool-network"},
		{"tag:threes", "a", "tag:threes-a"},
		{"tag:threes", "0", "tag:threes-0"},
		{"tag:Threes-2", "web", "tag:Threes-2-web"},
		{"tag:threes", strings.Repeat("a", 40), "tag:threes-" + strings.Repeat("a", 40)},
		{"tag:threes", strings.Repeat("a", 41), ""}, // over the length limit
		{"tag:threes", "", ""},
		{"tag:threes", "web-", ""},
		{"tag:threes", "-web", ""},
		{"tag:threes", "Web", ""},
		{"tag:threes", "web_1", ""},
		{"tag:threes", "web\n", ""},
		{"tag:", "web", ""},
		{"tag:1threes", "web", ""},
		{"threes", "web", ""},
		{"tag:threes web", "web", ""},
	} {
		got, err := NetworkTag(tc.owner, tc.name)
		if tc.want == "" {
			if !errors.Is(err, ErrInvalidName) {
				t.Errorf("NetworkTag(%q, %q) = %q, %v; want ErrInvalidName", tc.owner, tc.name, got, err)
			}
			continue
		}
		if err != nil || got != tc.want {
			t.Errorf("NetworkTag(%q, %q) = %q, %v; want %q", tc.owner, tc.name, got, err, tc.want)
		}
	}
}

// FuzzMerge checks, on any policy AddNetwork accepts, that the result parses,
// adding again changes nothing, and removing gives back the input byte for byte.
func FuzzMerge(f *testing.F) {
	for _, p := range policies {
		f.Add([]byte(p), "web")
	}
	f.Fuzz(func(t *testing.T, p []byte, name string) {
		if had, err := HasNetwork(p, name, opts); had || err != nil {
			return // add is a no-op there, so remove(add(p)) is rightly not p
		}
		out, err := AddNetwork(p, name, opts)
		if err != nil {
			return
		}
		if _, err := hujson.Standardize(bytes.Clone(out)); err != nil {
			t.Fatalf("output does not parse: %v\n%s", err, out)
		}
		if ok, err := HasNetwork(out, name, opts); !ok || err != nil {
			t.Fatalf("HasNetwork after add = %v, %v", ok, err)
		}
		if again, err := AddNetwork(out, name, opts); err != nil || !bytes.Equal(again, out) {
			t.Fatalf("second add: %v\n%s\nvs\n%s", err, again, out)
		}
		back, err := RemoveNetwork(out, name, opts)
		if err != nil || !bytes.Equal(back, p) {
			t.Fatalf("remove(add(p)) != p: %v\n%q\nvs\n%q", err, back, p)
		}
	})
}

// BenchmarkAddNetwork merges one more network into a policy that already holds
// 100 of them, and removes it again.
func BenchmarkAddNetwork(b *testing.B) {
	p := []byte(policies["tailscale-default"])
	for i := range 100 {
		var err error
		if p, err = AddNetwork(p, fmt.Sprintf("net-%d", i), opts); err != nil {
			b.Fatal(err)
		}
	}
	b.SetBytes(int64(len(p)))
	b.ResetTimer()
	for b.Loop() {
		with, err := AddNetwork(p, "one-more", opts)
		if err != nil {
			b.Fatal(err)
		}
		if _, err := RemoveNetwork(with, "one-more", opts); err != nil {
			b.Fatal(err)
		}
	}
}
