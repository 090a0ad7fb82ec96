package embeddb

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"sync/atomic"
	"testing"
	"time"

	"tailscale.com/net/memnet"
)

// t0 is the injected clock's start; tests advance it by hand.
var t0 = time.Date(2025, 6, 25, 19, 59, 1, 123456789, time.UTC)

var listenerSeq atomic.Int64

// testConfig returns a one-node Config on an in-memory listener in dir.
func testConfig(t testing.TB, dir string) Config {
	addr := fmt.Sprintf("embeddb-test-%d:4002", listenerSeq.Add(1))
	cfg := Config{
		Dir:      dir,
		NodeID:   "node1",
		Listener: memnet.Listen(addr),
	}
	if _, ok := t.(*testing.B); !ok {
		cfg.Logf = t.Logf // benchmarks print every log line: keep them quiet
	}
	return cfg
}

// openAt opens a DB on dir and closes it when the test ends.
func openAt(t testing.TB, dir string) *DB {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	db, err := Open(ctx, testConfig(t, dir))
	if err != nil {
		t.Fatalf("open %s: %v", dir, err)
	}
	t.Cleanup(func() {
		if err := db.Close(); err != nil {
			t.Errorf("close: %v", err)
		}
	})
	return db
}

func newDB(t testing.TB) *DB { return openAt(t, t.TempDir()) }

// fixture builds a VM with its config and address from a small number.
func fixture(n int, network string) (VM, VMConfig, Address) {
	ip := netip.AddrFrom4([4]byte{10, 10 + byte(n>>16), byte(n >> 8), byte(n)})
	mac := fmt.Sprintf("52:54:00:%02x:%02x:%02x", byte(n>>16), byte(n>>8), byte(n))
	id := fmt.Sprintf("vm-%06d", n)
	at := t0.Add(time.Duration(n) * time.Second)
	vm := VM{
		ID: id, Name: fmt.Sprintf("toy%d", n), Description: "a toy", Network: network,
		Image: "arch", Type: "small", State: "creating", Desired: "running", Host: "node1", CreatedAt: at,
	}
	cfg := VMConfig{Hostname: vm.Name, Script: "#!/bin/sh\necho hi\n", PublicKey: "ssh-ed25519 AAAA", AuthKey: "tskey-auth-" + id}
	addr := Address{IP: ip, MAC: mac, Hostname: vm.Name, LeasedAt: at}
	return vm, cfg, addr
}

func mustNetwork(t testing.TB, db *DB, name string) {
	t.Helper()
	if err := db.CreateNetwork(context.Background(), Network{Name: name, Tag: "tag:" + name, CreatedAt: t0}); err != nil {
		t.Fatalf("create network %s: %v", name, err)
	}
}

func mustCreateVM(t testing.TB, db *DB, n int, network string) VM {
	t.Helper()
	vm, cfg, addr := fixture(n, network)
	if err := db.CreateVM(context.Background(), vm, cfg, addr); err != nil {
		t.Fatalf("create vm %d: %v", n, err)
	}
	return vm
}

// wantErr checks err wraps sentinel and, if field is set, names that field.
func wantErr(t testing.TB, err, sentinel error, field string) {
	t.Helper()
	if !errors.Is(err, sentinel) {
		t.Fatalf("got error %v, want %v", err, sentinel)
	}
	if field == "" {
		return
	}
	var fe *FieldError
	if !errors.As(err, &fe) || fe.Field != field {
		t.Fatalf("error %v does not name field %q", err, field)
	}
}

// atomicCounter hands out 1, 2, 3... to concurrent callers.
type atomicCounter struct{ n atomic.Int64 }

func (c *atomicCounter) add() int { return int(c.n.Add(1)) }
