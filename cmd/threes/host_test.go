package main_test

import (
	"encoding/json"
	"strings"
	"testing"
	"time"

	"github.com/threes-dev/threes/appliance/threestest"
)

// TestHostCLI: `host list` shows the one host of a threes that is not clustered
// (alone, answering, its capacity and VMs) as a table and as a JSON array, and
// `host remove` refuses the host answering the call, in one line.
func TestHostCLI(t *testing.T) {
	env := threestest.Start(t)
	c := cli{t: t, bin: threesBin(t), global: []string{"--socket", env.Options.Socket}}

	// The host's first heartbeat runs in the background of serve's start.
	var hosts []map[string]any
	deadline := time.Now().Add(time.Minute)
	for {
		if err := json.Unmarshal([]byte(c.ok("-o", "json", "host", "list")), &hosts); err != nil {
			t.Fatalf("host list -o json: %v", err)
		}
		if len(hosts) == 1 && hosts[0]["last_contact"] != nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("host list -o json = %v, want one host with its row written", hosts)
		}
		time.Sleep(50 * time.Millisecond)
	}
	if h := hosts[0]; h["name"] != "threes" || h["role"] != "alone" || h["reachable"] != true || h["vms"] != 0.0 {
		t.Errorf("host list -o json = %v", hosts)
	}

	out := c.ok("host", "list")
	lines := strings.Split(strings.TrimSpace(out), "\n")
	if len(lines) != 2 || !strings.HasPrefix(lines[0], "NAME") || !strings.Contains(lines[0], "LAST CONTACT") {
		t.Fatalf("host list =\n%s", out)
	}
	f := strings.Fields(lines[1])
	if len(f) != 8 || f[0] != "threes" || f[2] != "alone" || f[3] != "yes" || !strings.HasPrefix(f[5], "0/") || f[7] != "0" {
		t.Errorf("host list row = %q, want threes, its address, alone, yes, its time, 0/… vCPUs, 0/… MiB, 0 VMs", lines[1])
	}

	c.fail(1, "ask another host", "host", "remove", "threes")
	c.fail(1, "not found", "host", "remove", "nosuch")
	c.fail(2, "missing NAME", "host", "remove")
}
