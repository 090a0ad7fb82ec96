package main

import (
	"bytes"
	"log/slog"
	"strings"
	"testing"

	"tailscale.com/ipn/ipnstate"
)

func TestTailscaleLogUpload(t *testing.T) {
	for _, tc := range []struct {
		controlURL string
		set, asked bool
		want       bool
	}{
		{"", false, true, true},                        // Tailscale's control server: its log service
		{"https://hs.example.com", false, true, false}, // headscale: never Tailscale's log service unasked
		{"https://hs.example.com", true, true, true},   // asked for
		{"", true, false, false},                       // refused
	} {
		if got := tailscaleLogUpload(tc.controlURL, tc.set, tc.asked); got != tc.want {
			t.Errorf("tailscaleLogUpload(%q, set=%v, %v) = %v, want %v", tc.controlURL, tc.set, tc.asked, got, tc.want)
		}
	}
}

// TestLogLine: lines libraries write to stderr become records of the serve log.
func TestLogLine(t *testing.T) {
	for _, tc := range []struct{ line, want string }{
		{"[snapshot-store] 2026/11/28 21:00:00 store initialized using /x", `level=DEBUG msg="store initialized using /x" component=rqlite part=snapshot-store`},
		{"[raft] 2026/11/28 21:00:00.123456 2026-11-28T21:00:00.123Z [ERROR] raft: failed to contact: x", `level=ERROR msg="raft: failed to contact: x" component=rqlite part=raft`},
		{"something else", `level=WARN msg="something else" component=stderr`},
	} {
		var b bytes.Buffer
		logLine(slog.New(slog.NewTextHandler(&b, &slog.HandlerOptions{Level: slog.LevelDebug})), tc.line)
		if !strings.Contains(b.String(), tc.want) {
			t.Errorf("logLine(%q) = %q, want %q", tc.line, b.String(), tc.want)
		}
	}
}

// TestLoginError: the reason a control server gave for refusing the login is found in
// tailscaled's health warnings (the text as tailscale v1.102.5 words it, seen with
// headscale refusing --tags on a tagged key), so serve can say it at once.
func TestLoginError(t *testing.T) {
	st := &ipnstate.Status{Health: []string{
		"Some other warning",
		"You are logged out. The last login error was: handling register with auth key: creating new node: requested tags [tag:threes] are invalid or not permitted",
	}}
	if got, want := loginError(st), "handling register with auth key: creating new node: requested tags [tag:threes] are invalid or not permitted"; got != want {
		t.Errorf("loginError = %q, want %q", got, want)
	}
	if got := loginError(&ipnstate.Status{Health: []string{"You are logged out."}}); got != "" {
		t.Errorf("loginError with no login error = %q", got)
	}
}
