package metadata

import (
	"context"
	"errors"
	"log/slog"
	"net/http/httptest"
	"net/netip"
	"strings"
	"testing"

	"github.com/threes-dev/threes/netboot/ipam"
)

// slowSource answers only when its caller's context ends (a database under load),
// or with a real failure.
type slowSource struct{ fail error }

func (s slowSource) ByIP(ctx context.Context, _ netip.Addr) (Instance, error) {
	if s.fail != nil {
		return Instance{}, s.fail
	}
	<-ctx.Done()
	return Instance{}, ctx.Err()
}

func (slowSource) TakeAuthKey(context.Context, string) (string, error) { return "", ErrAuthKeyTaken }

// TestClientHangUpIsNotAnError: a VM that hangs up while its lookup waits is logged at
// debug, not as an ERROR; a lookup that really fails still is.
func TestClientHangUpIsNotAnError(t *testing.T) {
	im, err := ipam.New(ipam.Config{}, []ipam.Allocation{{MAC: macA, Hostname: "vm-a", IP: ipA}})
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name    string
		src     slowSource
		hangUp  bool
		want    string
		notWant string
	}{
		{"hang-up", slowSource{}, true, "level=DEBUG msg=\"metadata client went away\"", "level=ERROR"},
		{"failure", slowSource{fail: errors.New("database closed")}, false, "level=ERROR msg=\"metadata source failed\"", ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var logs syncBuffer
			s, err := New(Config{Source: tc.src, IPAM: im,
				Log: slog.New(slog.NewTextHandler(&logs, &slog.HandlerOptions{Level: slog.LevelDebug}))})
			if err != nil {
				t.Fatal(err)
			}
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			req := httptest.NewRequestWithContext(ctx, "GET", "/v1/hostname", nil)
			req.RemoteAddr = ipA.String() + ":40000"
			if tc.hangUp {
				cancel()
			}
			s.ServeHTTP(httptest.NewRecorder(), req)
			got := logs.String()
			if !strings.Contains(got, tc.want) || (tc.notWant != "" && strings.Contains(got, tc.notWant)) {
				t.Errorf("log = %q, want %q and no %q", got, tc.want, tc.notWant)
			}
		})
	}
}
