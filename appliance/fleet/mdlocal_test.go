package fleet

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"tailscale.com/net/memnet"

	"github.com/threes-dev/threes/embeddb"
	"github.com/threes-dev/threes/netboot/ipam"
)

// cutter wraps a node's listener and dialler so that a test can cut the node off
// the network at once, as a crash would: every connection in or out is closed, and
// no new one is made.
type cutter struct {
	net.Listener
	dial func(ctx context.Context, addr string) (net.Conn, error)

	mu    sync.Mutex
	cut   bool
	conns []net.Conn
}

func (c *cutter) track(conn net.Conn) (net.Conn, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.cut {
		conn.Close()
		return nil, net.ErrClosed
	}
	c.conns = append(c.conns, conn)
	return conn, nil
}

func (c *cutter) Accept() (net.Conn, error) {
	for {
		conn, err := c.Listener.Accept()
		if err != nil {
			return nil, err
		}
		if conn, err := c.track(conn); err == nil {
			return conn, nil
		}
	}
}

func (c *cutter) Dial(ctx context.Context, addr string) (net.Conn, error) {
	conn, err := c.dial(ctx, addr)
	if err != nil {
		return nil, err
	}
	return c.track(conn)
}

func (c *cutter) Cut() {
	c.mu.Lock()
	c.cut = true
	conns := c.conns
	c.conns = nil
	c.mu.Unlock()
	c.Listener.Close()
	for _, conn := range conns {
		conn.Close()
	}
}

// TestMetadataViewReadsLocally: on a cluster member the metadata view reads this
// node's own copy of the database. With the leader cut off, a VM the view never read
// (a cache miss) is still served from what was replicated here, while the auth key,
// which only a write on the leader hands out, is not handed out at all; and once
// this node has heard from no leader for longer than the view allows, a read is
// refused rather than answered from a copy that may be stale.
func TestMetadataViewReadsLocally(t *testing.T) {
	ctx := context.Background()
	var nw memnet.Network
	open := func(i int, edit func(*embeddb.Config)) (*embeddb.DB, *cutter) {
		addr := fmt.Sprintf("127.0.0.1:%d", 4201+i)
		ln, err := nw.Listen("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		c := &cutter{Listener: ln, dial: func(ctx context.Context, a string) (net.Conn, error) { return nw.Dial(ctx, "tcp", a) }}
		cfg := embeddb.Config{Dir: filepath.Join(t.TempDir(), "db"), NodeID: fmt.Sprintf("host%d", i), Listener: c,
			Advertise: addr, Dial: c.Dial, Admit: func(context.Context, net.Conn) error { return nil }}
		edit(&cfg)
		db, err := embeddb.Open(ctx, cfg)
		if err != nil {
			t.Fatalf("open host%d: %v", i, err)
		}
		t.Cleanup(func() { db.Close() })
		return db, c
	}
	leader, leaderNet := open(0, func(c *embeddb.Config) { c.BootstrapExpect = 1 })
	here, _ := open(1, func(c *embeddb.Config) { c.Join = []string{"127.0.0.1:4201"} })
	if here.IsLeader() || !leader.IsLeader() {
		t.Fatal("the joiner leads: the test needs it a follower")
	}

	now := time.Now()
	if err := leader.CreateNetwork(ctx, embeddb.Network{Name: "lab", CreatedAt: now}); err != nil {
		t.Fatal(err)
	}
	vm := embeddb.VM{ID: NewID(now), Name: "local", Network: "lab", State: StateRunning, Desired: StateRunning, Host: "host1", CreatedAt: now}
	ip := netip.MustParseAddr("10.10.0.2")
	if err := leader.CreateVM(ctx, vm, embeddb.VMConfig{Hostname: "local", AuthKey: "tskey-local"},
		embeddb.Address{IP: ip, MAC: "52:54:00:00:01:02", Hostname: "local"}); err != nil {
		t.Fatal(err)
	}
	// Replicated here before the leader goes.
	deadline := time.Now().Add(30 * time.Second)
	for {
		_, err := here.Local(time.Minute).GetVMConfig(ctx, vm.ID)
		if err == nil {
			break
		}
		if !errors.Is(err, embeddb.ErrNotFound) || time.Now().After(deadline) {
			t.Fatalf("the vm never reached the follower's copy: %v", err)
		}
		time.Sleep(20 * time.Millisecond)
	}

	var mu sync.Mutex
	clock := now
	now2 := func() time.Time { mu.Lock(); defer mu.Unlock(); return clock }
	pool := func(mac string) *ipam.IPAM {
		hw, _ := net.ParseMAC(mac)
		p, err := ipam.New(ipam.Config{Prefix: netip.MustParsePrefix("10.10.0.0/24")}, []ipam.Allocation{{MAC: hw, Hostname: "local", IP: ip}})
		if err != nil {
			t.Fatal(err)
		}
		return p
	}
	src := newMDSource(here, "host1", pool("52:54:00:00:01:02"), now2)
	src.maxAge = SharedMaxAge
	// This host's IPAM has handed the address to another VM since (the vm was
	// purged): this node's copy is behind, and its answer must not be served.
	behind := newMDSource(here, "host1", pool("52:54:00:00:01:99"), now2)
	behind.maxAge = SharedMaxAge
	leaderNet.Cut()

	// Bounded, so that a read that went to the leader fails rather than hangs.
	rctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	in, err := src.ByIP(rctx, ip)
	if err != nil || in.ID != vm.ID || in.Hostname != "local" {
		t.Fatalf("metadata view of a vm never read, with the leader cut off = %+v, %v; want it from this node's copy", in, err)
	}
	bctx, bcancel := context.WithTimeout(ctx, 2*time.Second)
	defer bcancel()
	if in, err := behind.ByIP(bctx, ip); err == nil || in.ID != "" {
		t.Errorf("metadata view whose IPAM holds the address for another MAC = %+v, %v; want no answer from the stale copy", in, err)
	}
	kctx, kcancel := context.WithTimeout(ctx, 2*time.Second)
	defer kcancel()
	if key, err := src.TakeAuthKey(kctx, vm.ID); err == nil || key != "" {
		t.Errorf("auth key handed out without the leader (err %v): taking it must be a write on the leader", err)
	}

	// Past the bound: the entry is old enough to be read again, and this node has
	// heard from no leader for longer than the view allows.
	src.maxStale = 100 * time.Millisecond
	time.Sleep(200 * time.Millisecond)
	mu.Lock()
	clock = clock.Add(2 * SharedMaxAge)
	mu.Unlock()
	if in, err := src.ByIP(rctx, ip); !errors.Is(err, embeddb.ErrStale) || in.ID != "" {
		t.Errorf("metadata view past the bound = %+v, %v; want embeddb.ErrStale and nothing", in, err)
	}
}
