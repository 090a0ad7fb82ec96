package metadata

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/threes-dev/threes/netboot/ipam"
)

// failSource fails for the addresses in errs and defers to memSource else.
type failSource struct {
	*memSource
	byIP, take error
}

func (f failSource) ByIP(ctx context.Context, ip netip.Addr) (Instance, error) {
	if f.byIP != nil {
		return Instance{}, f.byIP
	}
	return f.memSource.ByIP(ctx, ip)
}

func (f failSource) TakeAuthKey(ctx context.Context, id string) (string, error) {
	if f.take != nil {
		return "", f.take
	}
	return f.memSource.TakeAuthKey(ctx, id)
}

var (
	macC = net.HardwareAddr{0x52, 0x54, 0x00, 0x00, 0x0c, 0x01}
	macP = net.HardwareAddr{0x52, 0x54, 0x00, 0x00, 0x0d, 0x01}
	ipC  = netip.MustParseAddr("10.10.0.7") // in the IPAM, not in the source
)

// handlerLab is a Server called directly, without sockets or the
// neighbour check (the lab in metadata_test.go covers those): the checks
// and routes as the code promises them, fast enough to run for every
// mutant.
type handlerLab struct {
	s    *Server
	src  *memSource
	logs *syncBuffer
	now  time.Time
	ipP  netip.Addr // pending in the IPAM
}

func newHandlerLab(t *testing.T, cfg Config) *handlerLab {
	t.Helper()
	im, err := ipam.New(ipam.Config{}, []ipam.Allocation{
		{MAC: macA, Hostname: "vm-a", IP: ipA},
		{MAC: macB, Hostname: "vm-b", IP: ipB},
		{MAC: macC, Hostname: "vm-c", IP: ipC},
	})
	if err != nil {
		t.Fatal(err)
	}
	p, err := im.Reserve(macP, "vm-p")
	if err != nil {
		t.Fatal(err)
	}
	h := &handlerLab{logs: &syncBuffer{}, now: time.Unix(1_000_000, 0), ipP: p.IP}
	h.src = &memSource{
		byIP: map[netip.Addr]Instance{
			ipA: {ID: "vm-a-id", Hostname: "vm-a", Script: "echo hello\n", PublicKey: "ssh-ed25519 AAAA a",
				KVs: []KV{{Key: "colour", Value: "blue"}, {Key: "dbpass", Value: secretVal, Secret: true}}},
			ipB:  {ID: "vm-b-id", Hostname: "vm-b"},
			p.IP: {ID: "vm-p-id", Hostname: "vm-p"},
		},
		keys:  map[string]string{"vm-a-id": authKey, "vm-b-id": authKey + "-b", "vm-p-id": authKey + "-p"},
		taken: map[string]bool{},
	}
	if cfg.Source == nil {
		cfg.Source = h.src
	} else if f, ok := cfg.Source.(failSource); ok {
		f.memSource = h.src
		cfg.Source = f
	}
	cfg.IPAM = im
	cfg.Log = slog.New(slog.NewTextHandler(h.logs, nil))
	cfg.Now = func() time.Time { return h.now }
	if h.s, err = New(cfg); err != nil {
		t.Fatal(err)
	}
	return h
}

func (h *handlerLab) do(method, path string, from netip.Addr, hdr ...string) resp {
	req := httptest.NewRequest(method, path, nil)
	req.RemoteAddr = netip.AddrPortFrom(from, 40000).String()
	// As http.Server sets it: the gateway, where the server listens.
	req = req.WithContext(context.WithValue(req.Context(), http.LocalAddrContextKey,
		net.TCPAddrFromAddrPort(netip.MustParseAddrPort("10.10.0.1:80"))))
	for i := 0; i+1 < len(hdr); i += 2 {
		req.Header.Set(hdr[i], hdr[i+1])
	}
	w := httptest.NewRecorder()
	h.s.ServeHTTP(w, req)
	b, _ := io.ReadAll(w.Result().Body)
	return resp{w.Code, string(b)}
}

func TestNewNeedsSourceAndIPAM(t *testing.T) {
	im, _ := ipam.New(ipam.Config{}, nil)
	for name, cfg := range map[string]Config{
		"no source": {IPAM: im},
		"no ipam":   {Source: &memSource{}},
		"neither":   {},
	} {
		if _, err := New(cfg); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
	if s, err := New(Config{Source: &memSource{}, IPAM: im}); err != nil || s.cfg.MaxConnsPerSource != DefaultMaxConnsPerSource || s.cfg.Log == nil || s.cfg.Now == nil {
		t.Errorf("defaults: %v %+v", err, s.cfg)
	}
	if s, _ := New(Config{Source: &memSource{}, IPAM: im, MaxConnsPerSource: 1}); s.cfg.MaxConnsPerSource != 1 {
		t.Errorf("MaxConnsPerSource 1 became %d", s.cfg.MaxConnsPerSource)
	}
}

func TestRoutes(t *testing.T) {
	h := newHandlerLab(t, Config{})
	flavor := []string{FlavorHeader, FlavorValue}
	for _, tc := range []struct {
		path string
		from netip.Addr
		hdr  []string
		want resp
	}{
		{"/", ipA, nil, resp{200, "v1/\ncloud-init/\n"}},
		{"/v1/hostname", ipA, nil, resp{200, "vm-a"}},
		{"/v1/hostname", ipB, nil, resp{200, "vm-b"}},
		{"/v1/hostname", netip.MustParseAddr("::ffff:10.10.0.6"), nil, resp{200, "vm-b"}},
		{"/v1/hostname", h.ipP, nil, resp{403, "forbidden\n"}}, // pending: not yet persisted
		{"/v1/hostname", netip.MustParseAddr("10.10.9.9"), nil, resp{403, "forbidden\n"}},
		{"/v1/hostname", ipC, nil, resp{404, "not found\n"}}, // allocated, no VM
		{"/v1/hostname", ipA, []string{"X-Forwarded-For", ""}, resp{403, "forbidden\n"}},
		{"/v1/hostname", ipA, []string{"Forwarded", ""}, resp{403, "forbidden\n"}},
		{"/v1/hostname", ipA, []string{"X-Forwarded-Host", "x"}, resp{200, "vm-a"}},
		{"/v1/kv/dbpass", ipA, []string{FlavorHeader, "threes "}, resp{403, "forbidden\n"}},
		{"/v1/kv/dbpass", ipA, flavor, resp{200, secretVal}},
		{"/v1/kv/colour", ipA, nil, resp{200, "blue"}},
		{"/v1/kv", ipA, nil, resp{200, `{"colour":"blue"}` + "\n"}},
		{"/v1/kv", ipA, flavor, resp{200, `{"colour":"blue","dbpass":"` + secretVal + `"}` + "\n"}},
		{"/v1/kv", ipB, nil, resp{200, "{}\n"}},
		{"/v1/config", ipB, nil, resp{200, `{"hostname":"vm-b","token":"","script":"","public_key":"","control_url":""}` + "\n"}},
		{"/v1/control_url", ipA, nil, resp{200, ""}}, // Tailscale's default control server
		{"/cloud-init/meta-data", ipA, nil, resp{200, "instance-id: \"vm-a-id\"\nlocal-hostname: \"vm-a\"\npublic-keys:\n  - \"ssh-ed25519 AAAA a\"\n"}},
		{"/cloud-init/meta-data", ipB, nil, resp{200, "instance-id: \"vm-b-id\"\nlocal-hostname: \"vm-b\"\n"}},
		{"/cloud-init/user-data", ipA, nil, resp{200, "#!/bin/sh\necho hello\n"}},
		{"/cloud-init/user-data", ipB, nil, resp{200, "#cloud-config\n{}\n"}},
	} {
		if got := h.do("GET", tc.path, tc.from, tc.hdr...); got != tc.want {
			t.Errorf("GET %s from %s %v = %+v, want %+v", tc.path, tc.from, tc.hdr, got, tc.want)
		}
	}
	// The key once, through the config: with the header only.
	if r := h.do("GET", "/v1/config", ipA, flavor...); r.code != 200 || !strings.Contains(r.body, `"token":"`+authKey+`"`) {
		t.Errorf("config with header: %+v", r)
	}
	if r := h.do("GET", "/v1/token", ipA, flavor...); r.code != http.StatusGone {
		t.Errorf("token after config took it: %+v", r)
	}
	for _, secret := range []string{authKey, secretVal} {
		if strings.Contains(h.logs.String(), secret) {
			t.Errorf("secret %q... logged", secret[:6])
		}
	}
	if !strings.Contains(h.logs.String(), "from=10.10.9.9 ") {
		t.Errorf("refusal does not name the source address alone: %s", h.logs.String())
	}
}

// TestControlURL: every guest may learn the control server to join, with
// or without the header, and only an allocated address may ask.
func TestControlURL(t *testing.T) {
	const url = "http://100.64.0.1:8080"
	h := newHandlerLab(t, Config{ControlURL: url})
	for _, tc := range []struct {
		path string
		from netip.Addr
		hdr  []string
		want resp
	}{
		{"/v1/control_url", ipA, nil, resp{200, url}},
		{"/v1/control_url", ipB, []string{FlavorHeader, FlavorValue}, resp{200, url}},
		{"/v1/control_url", netip.MustParseAddr("10.10.9.9"), nil, resp{403, "forbidden\n"}},
		{"/v1/config", ipB, nil, resp{200, `{"hostname":"vm-b","token":"","script":"","public_key":"","control_url":"` + url + `"}` + "\n"}},
	} {
		if got := h.do("GET", tc.path, tc.from, tc.hdr...); got != tc.want {
			t.Errorf("GET %s from %s %v = %+v, want %+v", tc.path, tc.from, tc.hdr, got, tc.want)
		}
	}
}

// TestNoCloudURL: the seed URL names the routes this server serves.
func TestNoCloudURL(t *testing.T) {
	for in, want := range map[string]string{
		"10.10.0.1:80":   "http://10.10.0.1/cloud-init/",
		"10.10.0.1:8080": "http://10.10.0.1:8080/cloud-init/",
	} {
		u := NoCloudURL(netip.MustParseAddrPort(in))
		if u.String() != want {
			t.Errorf("NoCloudURL(%s) = %s, want %s", in, u, want)
		}
		h := newHandlerLab(t, Config{})
		for _, f := range []string{"meta-data", "user-data", "vendor-data"} {
			if r := h.do("GET", u.JoinPath(f).Path, ipA); r.code != 200 {
				t.Errorf("GET %s: %+v", u.JoinPath(f).Path, r)
			}
		}
	}
}

func TestSourceErrors(t *testing.T) {
	boom := errors.New("database on fire")
	for _, tc := range []struct {
		name string
		src  failSource
		path string
		want int
	}{
		{"lookup fails", failSource{byIP: boom}, "/v1/hostname", 500},
		{"lookup not found", failSource{byIP: ErrNotFound}, "/v1/hostname", 404},
		{"key fails", failSource{take: boom}, "/v1/token", 500},
		{"key fails in config", failSource{take: boom}, "/v1/config", 500},
		{"key taken", failSource{take: ErrAuthKeyTaken}, "/v1/token", 410},
		{"key taken in config", failSource{take: ErrAuthKeyTaken}, "/v1/config", 200},
	} {
		h := newHandlerLab(t, Config{Source: tc.src})
		if r := h.do("GET", tc.path, ipA, FlavorHeader, FlavorValue); r.code != tc.want || strings.Contains(r.body, "fire") {
			t.Errorf("%s: %+v, want %d without the cause", tc.name, r, tc.want)
		}
	}
}

func TestSessionRoutes(t *testing.T) {
	h := newHandlerLab(t, Config{RequireSession: true})
	put := func(ttl string, from netip.Addr) resp {
		return h.do("PUT", "/v1/session", from, SessionTTLHeader, ttl)
	}
	for _, tc := range []struct {
		ttl  string
		code int
	}{
		{"", 400}, {"x", 400}, {"0", 400}, {"-1", 400},
		{"1", 200}, {"60", 200},
		{strconv.Itoa(int(MaxSessionTTL / time.Second)), 200},
		{strconv.Itoa(int(MaxSessionTTL/time.Second) + 1), 400},
	} {
		if r := put(tc.ttl, ipA); r.code != tc.code {
			t.Errorf("PUT ttl %q = %+v, want %d", tc.ttl, r, tc.code)
		}
	}
	if r := put("60", h.ipP); r.code != 403 {
		t.Errorf("PUT from a pending address: %+v", r)
	}
	tok := put("60", ipA).body
	for _, tc := range []struct {
		path string
		from netip.Addr
		tok  string
		want int
	}{
		{"/v1/hostname", ipA, "", 401},
		{"/v1/hostname", ipA, tok, 200},
		{"/v1/hostname", ipB, tok, 401}, // another address
		{"/v1/kv", ipA, tok, 200},
		{"/v1/token", ipA, "", 401},
		{"/cloud-init/meta-data", ipA, "", 200},
	} {
		hdr := []string{FlavorHeader, FlavorValue}
		if tc.tok != "" {
			hdr = append(hdr, SessionHeader, tc.tok)
		}
		if r := h.do("GET", tc.path, tc.from, hdr...); r.code != tc.want {
			t.Errorf("GET %s from %s with token %v = %+v, want %d", tc.path, tc.from, tc.tok != "", r, tc.want)
		}
	}
	// The token lives as long as asked, not a second more.
	h.now = h.now.Add(59 * time.Second)
	if r := h.do("GET", "/v1/hostname", ipA, SessionHeader, tok); r.code != 200 {
		t.Errorf("token before its end: %+v", r)
	}
	h.now = h.now.Add(time.Second)
	if r := h.do("GET", "/v1/hostname", ipA, SessionHeader, tok); r.code != 401 {
		t.Errorf("token at its end: %+v", r)
	}
}
