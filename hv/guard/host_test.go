package guard_test

import (
	"context"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/threes-dev/threes/hv/guard"
	"github.com/threes-dev/threes/internal/netnstest"
)

// serveTCP listens on addr in ns, as the metadata server does on the
// gateway, and accepts until the test ends.
func serveTCP(t *testing.T, ns *netnstest.NS, addr string) {
	t.Helper()
	var ln net.Listener
	must(t, ns.Do(func() (err error) {
		ln, err = net.Listen("tcp", addr)
		return err
	}))
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			c.Write([]byte("hello\n"))
			c.Close()
		}
	}()
}

// tcpReaches reports whether a TCP connection from ns to addr is answered.
func tcpReaches(ns *netnstest.NS, addr string) bool {
	var got string
	ns.Do(func() error {
		c, err := net.DialTimeout("tcp", addr, 2*time.Second)
		if err != nil {
			return err
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(2 * time.Second))
		b := make([]byte, 6)
		n, _ := c.Read(b)
		got = string(b[:n])
		return nil
	})
	return got == "hello\n"
}

// hostLearnt reports whether the host holds a neighbour entry with a MAC
// for ip: it took in an ARP packet from it.
func (r *rig) hostLearnt(t *testing.T, ip string) bool {
	t.Helper()
	return strings.Contains(r.host.Run(t, "ip", "neigh", "show", ip, "dev", "br0"), "lladdr")
}

// linkLocal returns the IPv6 link-local address of dev in ns, once it has
// passed duplicate address detection.
func linkLocal(t *testing.T, ns *netnstest.NS, dev string) string {
	t.Helper()
	var addr string
	netnstest.Eventually(t, 10*time.Second, "a link-local address on "+dev, func() bool {
		out := ns.Run(t, "ip", "-6", "-o", "addr", "show", "dev", dev, "scope", "link")
		f := strings.Fields(out)
		for i := range f {
			if f[i] == "inet6" && i+1 < len(f) && !strings.Contains(out, "tentative") {
				addr, _, _ = strings.Cut(f[i+1], "/")
				return true
			}
		}
		return false
	})
	return addr
}

// TestNotAVM has a bridge port that is not a VM's tap (a veth an admin
// attached) try the host: on a bridge of guarded VMs it reaches nothing the
// host serves (a TCP service on the gateway, as metadata is; ping; the
// host's ARP; IPv6), not even with a VM's MAC, which also cannot move the
// VM's forwarding entry to it. The VM's own port and the host's own access
// to its bridge address still work. Only bridges the ports name are closed,
// and Set and Delete keep that up to date.
func TestNotAVM(t *testing.T) {
	r := newRig(t)
	ctx := context.Background()
	serveTCP(t, r.host, "10.10.0.1:80")
	ll := linkLocal(t, r.host, "br0")
	reachesHost := func(ns *netnstest.NS) bool {
		r.host.Run(t, "ip", "neigh", "flush", "dev", "br0")
		ns.Run(t, "ip", "neigh", "flush", "dev", "eth0")
		return tcpReaches(ns, "10.10.0.1:80")
	}

	// Control: with no table, the port reaches the host every way.
	if !reachesHost(r.other) || !ping(r.other, "10.10.0.1") || !r.hostLearnt(t, "10.10.0.10") {
		t.Fatal("control: the port did not reach the host over IPv4 with no table")
	}
	// (Once the port's own link-local address is usable.)
	netnstest.Eventually(t, 10*time.Second, "control: the port reaching the host over IPv6 with no table", func() bool {
		return ping(r.other, "-6", "-I", "eth0", ll)
	})

	must(t, r.table.Sync(ctx, []guard.Port{r.port}))
	if reachesHost(r.other) {
		t.Error("a port that is not a VM's reached a TCP service on the gateway")
	}
	if ping(r.other, "10.10.0.1") {
		t.Error("a port that is not a VM's pinged the gateway")
	}
	if r.hostLearnt(t, "10.10.0.10") {
		t.Error("the host took in ARP from a port that is not a VM's")
	}
	if ping(r.other, "-6", "-I", "eth0", ll) {
		t.Error("a port that is not a VM's reached the host over IPv6")
	}
	if !reachesHost(r.vm) {
		t.Error("the VM's own port cannot reach the service on the gateway")
	}
	if !tcpReaches(r.host, "10.10.0.1:80") {
		t.Error("the host cannot reach its own bridge address")
	}

	t.Run("posing as the VM", func(t *testing.T) {
		r.other.Run(t, "ip", "link", "set", "eth0", "address", macVM.String())
		defer r.other.Run(t, "ip", "link", "set", "eth0", "address", macOther.String())
		// The VM speaks first, so the bridge has learnt its MAC on its tap.
		if !ping(r.vm, "10.10.0.1") {
			t.Fatal("the VM cannot ping the gateway")
		}
		if reachesHost(r.other) {
			t.Error("a port that is not a VM's, with the VM's MAC, reached the service on the gateway")
		}
		fdb := r.host.Run(t, "bridge", "fdb", "show", "br", "br0")
		for _, line := range strings.Split(fdb, "\n") {
			if strings.HasPrefix(line, macVM.String()+" ") && !strings.Contains(line, "dev "+r.port.Dev+" ") {
				t.Errorf("the bridge learnt the VM's MAC on another port: %s", line)
			}
		}
	})

	t.Run("set and delete", func(t *testing.T) {
		// A port that names no bridge leaves its bridge open.
		open := r.port
		open.Bridge = ""
		must(t, r.table.Set(ctx, open))
		if !reachesHost(r.other) {
			t.Error("with no port naming br0, the bridge is still closed")
		}
		must(t, r.table.Set(ctx, r.port))
		if reachesHost(r.other) {
			t.Error("after Set named br0 again, the port reached the gateway")
		}
		// Another bridge's port leaves this one closed.
		vm2 := guard.Port{Dev: guard.DevName("t3zz", "vm-2"), MAC: macVM2, Bridge: "br1"}
		must(t, r.table.Set(ctx, vm2))
		must(t, r.table.Delete(ctx, vm2.Dev))
		if reachesHost(r.other) {
			t.Error("after a port of another bridge came and went, the port reached the gateway")
		}
		must(t, r.table.Delete(ctx, r.port.Dev))
		if !reachesHost(r.other) {
			t.Error("with the bridge's last port deleted, the bridge is still closed")
		}
		must(t, r.table.Intact(ctx))
	})
}
