package main_test

import (
	"strings"
	"testing"
)

// TestUsageMistakes runs the built binary with no server at all: mistakes on the
// command line exit 2 before anything is dialled, and an unreachable server says how
// to reach one.
func TestUsageMistakes(t *testing.T) {
	// Loopback port 1 answers nothing; the tailscaled socket does not exist, so
	// nothing leaves this host.
	c := cli{t: t, bin: threesBin(t), global: []string{"--address", "127.0.0.1:1", "--tailscaled-socket", "/nonexistent/tailscaled.sock"}}

	c.fail(2, `required flag(s) "network" not set`, "vm", "create", "-i", "base", "toy1")
	c.fail(2, `required flag(s) "image" not set`, "vm", "create", "--network", "n", "toy1")
	c.fail(2, `unknown command "nosuch"`, "vm", "nosuch")
	c.fail(2, "--timeout", "--timeout", "0s", "whoami")
	c.fail(2, "invalid argument \"60\" for \"--timeout\"", "--timeout", "60", "whoami")
	c.fail(2, "no such file", "image", "import", "x", "/nonexistent.qcow2")

	// No --socket: the hint names it, for the appliance's own host.
	c.fail(1, "use --socket /run/threes/threes.sock", "--timeout", "10s", "whoami")
	// The old flag still works, with a note that it is deprecated.
	_, errOut, code := c.run("--timeout-ms", "10000", "whoami")
	if code != 1 || !strings.Contains(errOut, "use --timeout") || !strings.Contains(errOut, "cannot reach the threes server at 127.0.0.1:1") {
		t.Errorf("--timeout-ms: exit %d, stderr %q", code, errOut)
	}
	// With --socket the hint is about the socket's server instead.
	sock := cli{t: t, bin: c.bin, global: []string{"--socket", t.TempDir() + "/none.sock"}}
	sock.fail(1, "is `threes serve` running", "--timeout", "10s", "whoami")
}
