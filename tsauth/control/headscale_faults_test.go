package control_test

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/threes-dev/threes/tsauth/control"
	"github.com/threes-dev/threes/tsauth/control/headscaletest"
	"github.com/threes-dev/threes/tsauth/policy"
)

// faultProxy sits in front of a real headscale: it answers the next requests
// with queued failure statuses, and in echo mode copies the request's
// Authorization header into every error headscale returns (a hostile or buggy
// server, to prove credentials never reach an error).
type faultProxy struct {
	mu       sync.Mutex
	statuses []int
	echo     bool
}

func (p *faultProxy) start(t *testing.T, target string) string {
	u, err := url.Parse(target)
	if err != nil {
		t.Fatal(err)
	}
	rp := httputil.NewSingleHostReverseProxy(u)
	rp.ModifyResponse = func(resp *http.Response) error {
		p.mu.Lock()
		echo := p.echo
		p.mu.Unlock()
		if !echo || resp.StatusCode < 400 {
			return nil
		}
		resp.Body.Close()
		b, _ := json.Marshal(map[string]any{"code": 16, "message": "unauthenticated: " + resp.Request.Header.Get("Authorization")})
		resp.Body = io.NopCloser(bytes.NewReader(b))
		resp.ContentLength = int64(len(b))
		resp.Header.Set("Content-Length", fmt.Sprint(len(b)))
		return nil
	}
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		p.mu.Lock()
		var status int
		if len(p.statuses) > 0 {
			status, p.statuses = p.statuses[0], p.statuses[1:]
		}
		p.mu.Unlock()
		if status != 0 {
			if status == http.StatusServiceUnavailable {
				w.Header().Set("Retry-After", "2")
			}
			w.WriteHeader(status)
			fmt.Fprintf(w, `{"code": 14, "message": "injected %d"}`, status)
			return
		}
		rp.ServeHTTP(w, r)
	}))
	t.Cleanup(srv.Close)
	return srv.URL
}

func (p *faultProxy) fail(statuses ...int) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.statuses = append(p.statuses, statuses...)
}

func TestHeadscaleRetriesAndRedaction(t *testing.T) {
	hs := headscaletest.Start(t)
	ctx := context.Background()
	proxy := &faultProxy{}
	url := proxy.start(t, hs.URL)
	sl := &sleeps{}
	newPlane := func(key string) *control.Headscale {
		p, err := control.NewHeadscale(control.HeadscaleConfig{
			URL: url, APIKey: control.NewSecret(key),
			Policy: policy.Options{OwnerTag: "tag:threes"},
			Retry:  control.Retry{Sleep: sl.sleep},
		})
		if err != nil {
			t.Fatal(err)
		}
		return p
	}
	plane := newPlane(hs.APIKey)

	// A fresh headscale has no policy, which allows everything: threes will not
	// turn that into deny-all by adding its rules.
	if err := plane.EnsureNetwork(ctx, "web"); !errors.Is(err, policy.ErrAllowAll) {
		t.Fatalf("EnsureNetwork without a policy = %v, want ErrAllowAll", err)
	}
	hs.SetPolicy(t, hsBasePolicy)

	// 503 (Retry-After 2), 429, 502: retried with the server's wait, then backoff.
	proxy.fail(503, 429, 502)
	if err := plane.EnsureNetwork(ctx, "web"); err != nil {
		t.Fatal(err)
	}
	if got, want := sl.got(), []time.Duration{2 * time.Second, time.Second, 2 * time.Second}; !slices.Equal(got, want) {
		t.Errorf("waits = %v, want %v", got, want)
	}
	if !strings.Contains(hs.Policy(t), `"tag:threes-web": ["tag:threes"]`) {
		t.Error("network missing after retried EnsureNetwork")
	}

	// headscale's 500 is its catch-all for errors it did not classify: not retried.
	sl.d = nil
	proxy.fail(500)
	if _, err := plane.MintAuthKey(ctx, control.KeyRequest{Network: "web", VMID: "vm-1"}); err == nil || !strings.Contains(err.Error(), "http 500") {
		t.Errorf("MintAuthKey after a 500 = %v", err)
	}
	if got := sl.got(); len(got) != 0 {
		t.Errorf("500 retried: waits %v", got)
	}

	// Bounded: 503s forever give up after five tries.
	sl.d = nil
	proxy.fail(503, 503, 503, 503, 503, 503)
	if _, err := plane.Devices(ctx); err == nil {
		t.Error("Devices succeeded through five 503s")
	}
	if got := sl.got(); len(got) != 4 {
		t.Errorf("waits = %v, want 4", got)
	}
	proxy.mu.Lock()
	proxy.statuses = nil // the sixth 503 was never asked for
	proxy.mu.Unlock()

	// A server that echoes the credential: no error carries it, for a wrong key
	// and for the right one.
	proxy.mu.Lock()
	proxy.echo = true
	proxy.mu.Unlock()
	for _, key := range []string{"hskey-api-WRONGwrongWRONG-0123456789abcdef", hs.APIKey} {
		p := newPlane(key)
		if key == hs.APIKey {
			proxy.fail(slices.Repeat([]int{401}, 40)...)
		}
		var errs []error
		errs = append(errs, p.EnsureNetwork(ctx, "db"), p.RemoveNetwork(ctx, "db"), p.RevokeAuthKey(ctx, "1"), p.RemoveDevice(ctx, "1"))
		_, err := p.MintAuthKey(ctx, control.KeyRequest{Network: "web", VMID: "vm-1"})
		errs = append(errs, err)
		_, err = p.Devices(ctx)
		errs = append(errs, err)
		for i, err := range errs {
			if err == nil {
				t.Errorf("call %d succeeded", i)
				continue
			}
			if strings.Contains(err.Error(), key) || strings.Contains(err.Error(), key[len(key)-10:]) {
				t.Errorf("call %d error holds the API key: %v", i, err)
			}
		}
		proxy.mu.Lock()
		proxy.statuses = nil
		proxy.mu.Unlock()
	}
}
