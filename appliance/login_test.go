package appliance_test

import (
	"bytes"
	"context"
	"log/slog"
	"path/filepath"
	"regexp"
	"sync"
	"testing"
	"time"

	"github.com/threes-dev/threes/appliance"
	"github.com/threes-dev/threes/hv/hvtest"
	"github.com/threes-dev/threes/tsauth/tailnettest"
)

type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// TestJoinsAfterLogin: with no auth key the appliance still starts, serves its local
// socket, logs the login URL the control server gives, and joins once it is approved.
func TestJoinsAfterLogin(t *testing.T) {
	tn := tailnettest.Start(t)
	tn.Control.RequireAuth = true // set before any node registers
	dir := t.TempDir()
	var logs lockedBuffer
	a, err := appliance.Start(ctxT(t), appliance.Options{
		StateDir:   dir,
		ControlURL: tn.ControlURL,
		Socket:     filepath.Join(dir, "threes.sock"),
		Hypervisor: hvtest.Open(t),
		Logger:     slog.New(slog.NewTextHandler(&logs, nil)),
		Ephemeral:  true,
	})
	if err != nil {
		t.Fatalf("start without credentials: %v", err)
	}
	t.Cleanup(func() { a.Close() })

	urlRE := regexp.MustCompile(`https?://[^\s"\\]+`)
	var url string
	waitFor(t, "login URL in the log", func() bool {
		url = urlRE.FindString(logs.String())
		return url != "" && url != tn.ControlURL
	})
	if !tn.Control.CompleteAuth(url) {
		t.Fatalf("control server does not know login URL %q", url)
	}
	ctx, cancel := context.WithTimeout(ctxT(t), time.Minute)
	defer cancel()
	st, err := a.Tailnet().Up(ctx)
	if err != nil {
		t.Fatalf("joining after approval: %v\nlog:\n%s", err, logs.String())
	}
	if len(st.TailscaleIPs) == 0 {
		t.Fatalf("joined with no tailnet address")
	}
}
