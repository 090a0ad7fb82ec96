package sshd

import (
	"bytes"
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"strings"
	"testing"
	"time"

	"golang.org/x/crypto/ssh"
	"golang.org/x/term"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/threes-dev/threes/tsauth"
)

// TestReaderLeftOnTerminal: a Runner that returns while a reader of its own is still
// blocked on the session's terminal (the CLI's console does that when the VM stops)
// does not keep the session open, and everything it wrote reaches the client first.
// With the terminal in Go's poller the close wakes the reader; with it in blocking
// mode (the Runner called Fd) only closing the master ends the session.
func TestReaderLeftOnTerminal(t *testing.T) {
	for _, mode := range []string{"poller", "blocking"} {
		t.Run(mode, func(t *testing.T) {
			run := func(ctx context.Context, s Session) int {
				f, ok := s.Stdin.(*os.File)
				if !ok {
					fmt.Fprintf(s.Stderr, "stdin is %T, not the tty\n", s.Stdin)
					return 1
				}
				isTerm := false
				if mode == "blocking" {
					isTerm = term.IsTerminal(int(f.Fd()))
				} else if rc, err := f.SyscallConn(); err == nil {
					rc.Control(func(fd uintptr) { isTerm = term.IsTerminal(int(fd)) })
				}
				if !isTerm {
					fmt.Fprintln(s.Stderr, "stdin is not a terminal")
					return 1
				}
				go io.Copy(io.Discard, f) // left behind, blocked on the tty
				time.Sleep(10 * time.Millisecond)
				for i := range 2000 {
					fmt.Fprintf(s.Stdout, "line %04d of the runner's output\n", i)
				}
				return 3
			}
			c := startTestServer(t, run)
			s, err := c.NewSession()
			if err != nil {
				t.Fatal(err)
			}
			defer s.Close()
			var out bytes.Buffer
			s.Stdout = &out
			if err := s.RequestPty("xterm", 24, 80, ssh.TerminalModes{}); err != nil {
				t.Fatal(err)
			}
			done := make(chan error, 1)
			go func() { done <- s.Run("anything") }()
			select {
			case err = <-done:
			case <-time.After(time.Minute):
				t.Fatal("session still open a minute after the runner returned")
			}
			var ee *ssh.ExitError
			if !errors.As(err, &ee) || ee.ExitStatus() != 3 {
				t.Fatalf("session ended with %v, want exit status 3; output %q", err, out.String())
			}
			if got := strings.Count(out.String(), "of the runner's output\r\n"); got != 2000 || !strings.Contains(out.String(), "line 1999 ") {
				t.Errorf("client got %d of the runner's 2000 lines", got)
			}
		})
	}
}

// startTestServer serves SSH on loopback with run, every caller an admin, and
// returns a client connected to it.
func startTestServer(t *testing.T, run Runner) *ssh.Client {
	t.Helper()
	_, priv, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	key, err := ssh.NewSignerFromKey(priv)
	if err != nil {
		t.Fatal(err)
	}
	srv := New(Config{
		HostKey: key,
		Identify: func(context.Context, netip.AddrPort) (tsauth.Principal, error) {
			return tsauth.Principal{Login: "alice@example.com", Node: "desk", Role: tsauth.RoleAdmin}, nil
		},
		// The runners here never call the API: a connection that is never dialled.
		Connect: func(netip.AddrPort) (*grpc.ClientConn, error) {
			return grpc.NewClient("passthrough:///unused", grpc.WithTransportCredentials(insecure.NewCredentials()))
		},
		Run: run,
		Log: slog.New(slog.DiscardHandler),
	})
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
	c, err := ssh.Dial("tcp", ln.Addr().String(), &ssh.ClientConfig{
		User:            "admin",
		HostKeyCallback: ssh.FixedHostKey(key.PublicKey()),
		Timeout:         30 * time.Second,
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}
