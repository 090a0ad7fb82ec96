package metadata

import (
	"context"
	"io"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/threes-dev/threes/internal/netnstest"
)

// TestServeLimits runs Serve on loopback in a namespace of its own: a
// header block past the limit is refused before any handler runs, and a
// source past its connection cap is not answered.
func TestServeLimits(t *testing.T) {
	netnstest.Require(t)
	ns := netnstest.NewNS(t, "serve")
	h := newHandlerLab(t, Config{MaxConnsPerSource: 2})
	var ln net.Listener
	if err := ns.Do(func() (err error) {
		ln, err = net.Listen("tcp4", "127.0.0.1:0")
		return err
	}); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	served := make(chan error, 1)
	go func() { served <- h.s.Serve(ctx, ln) }()
	t.Cleanup(func() { cancel(); <-served })
	url := "http://" + ln.Addr().String() + "/v1/hostname"
	c := client(ns)
	for _, tc := range []struct {
		header int
		code   int
	}{
		{8 << 10, 403}, // loopback is no VM's address
		{32 << 10, http.StatusRequestHeaderFieldsTooLarge},
	} {
		if r := do(t, c, "GET", url, "X-Pad", strings.Repeat("x", tc.header)); r.code != tc.code {
			t.Errorf("header of %d bytes: %d, want %d", tc.header, r.code, tc.code)
		}
	}
	dial := func() net.Conn {
		var conn net.Conn
		if err := ns.Do(func() (err error) {
			conn, err = net.Dial("tcp4", ln.Addr().String())
			return err
		}); err != nil {
			t.Fatal(err)
		}
		return conn
	}
	// The requests above close their connections, but the server counts a
	// connection until its side is done: wait for that, so the cap is reached
	// (and logged) only by the connections held below.
	src := ln.Addr().(*net.TCPAddr).AddrPort().Addr()
	netnstest.Eventually(t, 5*time.Second, "earlier connections released", func() bool {
		h.s.connsMu.Lock()
		defer h.s.connsMu.Unlock()
		return h.s.conns[src] == 0
	})
	logsBefore := strings.Count(h.logs.String(), "metadata connections capped")
	held := []net.Conn{dial(), dial()}
	netnstest.Eventually(t, 5*time.Second, "2 connections counted", func() bool {
		_, n := h.s.openConns(ipA)
		h.s.connsMu.Lock()
		defer h.s.connsMu.Unlock()
		return n == 1 && h.s.conns[ln.Addr().(*net.TCPAddr).AddrPort().Addr()] == 2
	})
	over := dial()
	over.Write([]byte("GET /v1/hostname HTTP/1.0\r\n\r\n"))
	if got, _ := io.ReadAll(over); len(got) != 0 {
		t.Errorf("connection past the cap answered: %q", got)
	}
	over.Close()
	if logs := h.logs.String(); strings.Count(logs, "metadata connections capped")-logsBefore != 1 || !strings.Contains(logs, "open=2") {
		t.Errorf("cap not logged once with the count: %s", logs)
	}
	for _, conn := range held {
		conn.Close()
	}
	netnstest.Eventually(t, 5*time.Second, "no connection state left", func() bool { _, n := h.s.openConns(ipA); return n == 0 })
	if r := do(t, c, "GET", url); r.code != 403 {
		t.Errorf("after the held connections closed: %+v", r)
	}
	// Done by its context: no error. Its listener gone: an error.
	cancel()
	if err := <-served; err != nil {
		t.Errorf("serve stopped by its context: %v", err)
	}
	served <- nil // for the cleanup
	if err := h.s.Serve(context.Background(), ln); err == nil || !strings.Contains(err.Error(), ln.Addr().String()) {
		t.Errorf("serve on a closed listener: %v", err)
	}
}
