package main

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"log"
	"log/slog"
	"os"
	"regexp"
	"runtime/debug"
	"strings"
	"time"

	"golang.org/x/sys/unix"
	"tailscale.com/envknob"
	"tailscale.com/ipn/ipnstate"
	"tailscale.com/tsnet"
)

// routeStderr makes the serve log one format. Some libraries write to file descriptor
// 2 themselves (rqlite's snapshot store and Raft build their loggers on os.Stderr, out
// of reach of any option), so fd 2 becomes a pipe whose lines go into log, and log
// writes to the real stderr. A crash still prints its trace to the real stderr. The
// returned function puts fd 2 back and waits for the last lines.
func routeStderr(level slog.Leveler) (*slog.Logger, func(), error) {
	realFD, err := unix.Dup(2)
	if err != nil {
		return nil, nil, fmt.Errorf("route stderr: %w", err)
	}
	real := os.NewFile(uintptr(realFD), "stderr")
	r, w, err := os.Pipe()
	if err != nil {
		real.Close()
		return nil, nil, fmt.Errorf("route stderr: %w", err)
	}
	if err := unix.Dup3(int(w.Fd()), 2, 0); err != nil {
		real.Close()
		r.Close()
		w.Close()
		return nil, nil, fmt.Errorf("route stderr: %w", err)
	}
	w.Close() // fd 2 holds the write end now
	debug.SetCrashOutput(real, debug.CrashOptions{})
	logger := slog.New(slog.NewTextHandler(real, &slog.HandlerOptions{Level: level}))
	// The standard logger too, for any library that uses it.
	log.SetFlags(0)
	log.SetOutput(os.Stderr)

	done := make(chan struct{})
	go func() {
		defer close(done)
		sc := bufio.NewScanner(r)
		sc.Buffer(make([]byte, 64<<10), 1<<20)
		for sc.Scan() {
			logLine(logger, sc.Text())
		}
		io.Copy(io.Discard, r)
	}()
	restore := func() {
		unix.Dup3(realFD, 2, 0) // closes the pipe's last write end, so the reader ends
		select {
		case <-done:
		case <-time.After(time.Second):
		}
		debug.SetCrashOutput(nil, debug.CrashOptions{})
		r.Close()
	}
	return logger, restore, nil
}

// stdLogLine is a line from a Go log.Logger with a "[part] " prefix and the standard
// date and time, as rqlite writes them; hclog (Raft) adds its level in brackets.
var stdLogLine = regexp.MustCompile(`^\[([a-z-]+)\] (?:\d{4}/\d\d/\d\d \d\d:\d\d:\d\d(?:\.\d+)? )?(?:\S+ \[(ERROR|WARN|INFO|DEBUG|TRACE)\] +)?(.*)$`)

// logLine turns one line written to stderr into a record: rqlite's housekeeping at
// debug (embeddb sends the rest of rqlite's log there too), its warnings and errors
// at their level, and anything else as a warning, since nobody expected it.
func logLine(logger *slog.Logger, line string) {
	if strings.TrimSpace(line) == "" {
		return
	}
	m := stdLogLine.FindStringSubmatch(line)
	if m == nil {
		logger.Warn(line, "component", "stderr")
		return
	}
	level := slog.LevelDebug
	switch m[2] {
	case "ERROR":
		level = slog.LevelError
	case "WARN":
		level = slog.LevelWarn
	}
	logger.Log(context.Background(), level, m[3], "component", "rqlite", "part", m[1])
}

// tailscaleLogUpload decides whether the tailnet node may upload its logs to
// Tailscale's log service: as asked, or by default only when the control server is
// Tailscale's own. Off, tailscale's envknob makes the upload a no-op (and the node
// tells its control server it opted out).
func tailscaleLogUpload(controlURL string, set bool, asked bool) bool {
	if set {
		return asked
	}
	return controlURL == ""
}

// setTailscaleLogUpload applies the choice for this process, before the node starts.
func setTailscaleLogUpload(on bool) {
	if !on {
		envknob.SetNoLogsNoSupport()
	}
}

// loginGrace is how long the node may take to reach its control server before serve
// says it cannot.
const loginGrace = 15 * time.Second

// watchLogin says in the serve log when the control server has not answered (tsnet
// itself logs the URL to approve the node at, once it has one), and what to check. It
// returns once the node is on the tailnet or has a login URL, or ctx ends.
func watchLogin(ctx context.Context, ts *tsnet.Server, controlURL string, log *slog.Logger) {
	lc, err := ts.LocalClient()
	if err != nil {
		return
	}
	if controlURL == "" {
		controlURL = "Tailscale's (https://controlplane.tailscale.com)"
	}
	start := time.Now()
	var warned, refused bool
	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
		st, err := lc.StatusWithoutPeers(ctx)
		if err != nil {
			continue
		}
		switch {
		case st.BackendState == "Running" || st.AuthURL != "":
			// On the tailnet, or waiting for approval at the URL tsnet logs.
			if warned {
				log.Info("control server reached", "control", controlURL)
			}
			return
		case !refused && loginError(st) != "":
			// The control server answered, and said no: waiting will not help.
			refused, warned = true, true
			log.Error("the control server refused the appliance's login: "+loginError(st)+
				": check the auth key (--authkey or $TS_AUTHKEY: valid, unexpired, unused if single-use) and --tags (a key that carries tags already tags the node; headscale refuses --tags on top)",
				"control", controlURL)
		case !warned && time.Since(start) >= loginGrace:
			warned = true
			log.Warn(fmt.Sprintf("no answer from the control server in %v: check --control-url, and that this host can reach it (DNS, routes, firewall)", loginGrace),
				"control", controlURL, "state", st.BackendState, "health", healthLine(st))
		}
	}
}

// loginError is the control server's reason for refusing the node's last login,
// from tailscaled's health warnings, or "".
func loginError(st *ipnstate.Status) string {
	const marker = "The last login error was: "
	for _, h := range st.Health {
		if _, why, ok := strings.Cut(h, marker); ok {
			return strings.TrimSpace(why)
		}
	}
	return ""
}

func healthLine(st *ipnstate.Status) string {
	if len(st.Health) == 0 {
		return "no warnings"
	}
	return strings.Join(st.Health, "; ")
}
