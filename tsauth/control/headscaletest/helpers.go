package headscaletest

import (
	"context"
	"encoding/json"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	"tailscale.com/tsnet"
)

// API calls headscale's REST API with the server's API key, failing t unless it
// answers 200, and decodes the answer into out when out is not nil.
func (s *Server) API(t testing.TB, method, path string, body, out any) {
	t.Helper()
	var r io.Reader
	if body != nil {
		b, err := json.Marshal(body)
		if err != nil {
			t.Fatal(err)
		}
		r = strings.NewReader(string(b))
	}
	req, err := http.NewRequest(method, s.URL+"/api/v1"+path, r)
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Authorization", "Bearer "+s.APIKey)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", method, path, err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("%s %s: %d %s", method, path, resp.StatusCode, b)
	}
	if out != nil {
		if err := json.Unmarshal(b, out); err != nil {
			t.Fatalf("%s %s: decode: %v", method, path, err)
		}
	}
}

// SetPolicy replaces the tailnet policy.
func (s *Server) SetPolicy(t testing.TB, policy string) {
	t.Helper()
	s.API(t, http.MethodPut, "/policy", map[string]string{"policy": policy}, nil)
}

// Policy returns the tailnet policy as stored.
func (s *Server) Policy(t testing.TB) string {
	t.Helper()
	var p struct{ Policy string }
	s.API(t, http.MethodGet, "/policy", nil, &p)
	return p.Policy
}

// HasNode reports whether a node named name is registered.
func (s *Server) HasNode(t testing.TB, name string) bool {
	t.Helper()
	var nodes struct {
		Nodes []struct{ Name, GivenName string }
	}
	s.API(t, http.MethodGet, "/node", nil, &nodes)
	for _, n := range nodes.Nodes {
		if n.Name == name || n.GivenName == name {
			return true
		}
	}
	return false
}

// PreauthKey makes a reusable key for User (the first user, ID 1), tagged with
// tags when given: a tagged key makes a node owned by its tags.
func (s *Server) PreauthKey(t testing.TB, tags ...string) string {
	t.Helper()
	// Reusable: under load a client may time out on its register request
	// and send it again, which headscale refuses for a used one-off key
	// ("authkey already used"); what these tests check does not hang on
	// the key being single-use.
	args := []string{"preauthkeys", "create", "-u", "1", "-e", "1h", "--reusable"}
	if len(tags) > 0 {
		args = append(args, "--tags", strings.Join(tags, ","))
	}
	f := strings.Fields(s.CLI(t, args...))
	if len(f) == 0 {
		t.Fatal("headscale printed no key")
	}
	return f[len(f)-1]
}

// Node joins a tsnet node named name with key, and closes it when t ends.
// SetClientEnv must have been called.
func (s *Server) Node(t testing.TB, name, key string) *tsnet.Server {
	t.Helper()
	n := &tsnet.Server{Dir: t.TempDir(), Hostname: name, ControlURL: s.URL, AuthKey: key,
		Logf: func(string, ...any) {}, UserLogf: func(string, ...any) {}}
	t.Cleanup(func() { n.Close() })
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if _, err := n.Up(ctx); err != nil {
		t.Fatalf("%s joining headscale: %v", name, err)
	}
	return n
}
