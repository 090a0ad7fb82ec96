package dhcp

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"runtime"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/insomniacslk/dhcp/dhcpv4"
	"github.com/insomniacslk/dhcp/dhcpv4/server4"
	"golang.org/x/sys/unix"

	"github.com/threes-dev/threes/netboot/ipam"
)

// Allocations is the part of the IPAM the server reads.
type Allocations interface {
	// ByMAC returns mac's allocation, or false when it has none.
	ByMAC(mac net.HardwareAddr) (ipam.Allocation, bool)
}

// LeaseState is where a client stands with this server.
type LeaseState int

// The lease states.
const (
	// StateOffered means an OFFER went out and no REQUEST came yet.
	StateOffered LeaseState = iota + 1
	// StateBound means the client holds the lease until Expires.
	StateBound
	// StateReleased means the client gave the address back.
	StateReleased
	// StateDeclined means the client found the address in use on the wire.
	StateDeclined
)

// String names the state.
func (s LeaseState) String() string {
	switch s {
	case StateOffered:
		return "offered"
	case StateBound:
		return "bound"
	case StateReleased:
		return "released"
	case StateDeclined:
		return "declined"
	}
	return "none"
}

// Lease is one client's state as the server saw it last.
type Lease struct {
	MAC     net.HardwareAddr
	IP      netip.Addr
	State   LeaseState
	Expires time.Time
}

// RateLimit bounds how many packets one MAC gets answered: a token bucket
// per MAC, never per source address, since a relay speaks for many clients.
type RateLimit struct {
	// Burst is how many packets a MAC may send at once; 0 disables limiting.
	Burst int
	// Every is the time to earn one more packet back; 0 earns none back,
	// so a MAC gets Burst packets in all.
	Every time.Duration
}

// DefaultRateLimit lets a client through a full exchange and a few retries,
// then one packet every 100 ms.
var DefaultRateLimit = RateLimit{Burst: 16, Every: 100 * time.Millisecond}

// ServerConfig configures a Server.
type ServerConfig struct {
	// Interface is the bridge to serve on; the socket is bound to it.
	Interface string
	// Conn replaces the socket Server opens itself, for tests and fuzzing.
	Conn net.PacketConn
	// Reply is what goes into replies.
	Reply Config
	// IPAM answers which MACs are known and their addresses.
	IPAM Allocations
	// RateLimit is per MAC; DefaultRateLimit when zero.
	RateLimit RateLimit
	// DeclineHold is how long a declined address is not offered; 1 min when zero.
	DeclineHold time.Duration
	// Relays makes the server answer packets a DHCP relay agent forwarded
	// (giaddr set), sending the reply to that agent. Off, such packets
	// are dropped: on a bridge of VMs there is no relay, and any VM could
	// claim to be one and have replies sent to any address.
	Relays bool
	// Workers is how many goroutines read the socket; GOMAXPROCS when zero.
	Workers int
	// Log receives one line per unusual event; slog.Default when nil.
	Log *slog.Logger
	// Now is the clock; time.Now when nil.
	Now func() time.Time
	// OnAck, when set, is told of each ACK the server decided to send: the
	// client's MAC, its address and the time. It runs on the packet's path, so it
	// must return at once (queue the work); mac is only valid during the call.
	OnAck func(mac net.HardwareAddr, ip netip.Addr, at time.Time)
}

// Server is the socket shell around Decide.
type Server struct {
	cfg  ServerConfig
	conn net.PacketConn

	mu     sync.Mutex
	leases map[ipam.MACKey]*Lease
	bucket map[ipam.MACKey]*bucket

	stats [numReasons]atomic.Uint64

	// pruneEvery is how often Serve drops the state of MACs the IPAM no
	// longer knows, and rate buckets that are full again.
	pruneEvery time.Duration
}

const defaultPruneEvery = time.Minute

type bucket struct {
	tokens float64
	last   time.Time
}

// NewServer opens the DHCP socket on cfg.Interface, port 67, unless cfg.Conn
// is given.
func NewServer(cfg ServerConfig) (*Server, error) {
	if cfg.IPAM == nil {
		return nil, errors.New("new dhcp server: no ipam")
	}
	if !cfg.Reply.ServerIP.Is4() || !cfg.Reply.Prefix.IsValid() {
		return nil, fmt.Errorf("new dhcp server: server ip %s or prefix %s invalid", cfg.Reply.ServerIP, cfg.Reply.Prefix)
	}
	if cfg.RateLimit == (RateLimit{}) {
		cfg.RateLimit = DefaultRateLimit
	}
	if cfg.DeclineHold <= 0 {
		cfg.DeclineHold = time.Minute
	}
	if cfg.Workers <= 0 {
		cfg.Workers = runtime.GOMAXPROCS(0)
	}
	if cfg.Log == nil {
		cfg.Log = slog.Default()
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	s := &Server{
		cfg:    cfg,
		conn:   cfg.Conn,
		leases: map[ipam.MACKey]*Lease{},
		bucket: map[ipam.MACKey]*bucket{},

		pruneEvery: defaultPruneEvery,
	}
	if s.conn == nil {
		c, err := server4.NewIPv4UDPConn(cfg.Interface, &net.UDPAddr{Port: serverPort})
		if err != nil {
			return nil, fmt.Errorf("open dhcp socket on %s: %w", cfg.Interface, err)
		}
		// Bursts (a host full of VMs booting at once) must queue, not
		// drop, while the workers are busy: ask for 4 MiB past rmem_max
		// (root may), else for what the sysctl allows.
		if raw, err := c.SyscallConn(); err == nil {
			raw.Control(func(fd uintptr) {
				if unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_RCVBUFFORCE, 4<<20) != nil {
					c.SetReadBuffer(4 << 20)
				}
			})
		}
		if err := filterBySource(c); err != nil {
			c.Close()
			return nil, fmt.Errorf("open dhcp socket on %s: %w", cfg.Interface, err)
		}
		// What arrived between bind and the filter was never checked: drop it
		// unread (a client whose request went asks again).
		drain(c)
		s.conn = c
	}
	return s, nil
}

// filterBySource has the kernel drop, before the socket queues it, a
// request whose Ethernet source is not its client hardware address
// (chaddr): a client on the bridge sends its own requests, so such a frame
// speaks for another client, as a DECLINE or RELEASE for a neighbour from a
// port the bridge guard does not cover would. Relayed requests (giaddr
// set) come from the relay's MAC and pass; ServerConfig.Relays decides
// them. A request too short to hold chaddr is dropped too: it cannot be
// parsed. The server cannot check this itself: a UDP socket does not say
// which Ethernet source a packet came from.
func filterBySource(c syscall.Conn) error {
	// On a UDP socket the filter sees the UDP header at offset 0 and the
	// link-layer header at SKF_LL_OFF (-0x200000).
	const (
		giaddr   = 8 + 24
		chaddr   = 8 + 28
		etherSrc = 0xffe00000 + 6
	)
	ld := func(size uint16, k uint32) unix.SockFilter {
		return unix.SockFilter{Code: unix.BPF_LD | size | unix.BPF_ABS, K: k}
	}
	tax := unix.SockFilter{Code: unix.BPF_MISC | unix.BPF_TAX}
	prog := []unix.SockFilter{
		ld(unix.BPF_W, giaddr),
		{Code: unix.BPF_JMP | unix.BPF_JEQ | unix.BPF_K, K: 0, Jf: 8}, // relayed: accept
		ld(unix.BPF_W, chaddr),
		tax,
		ld(unix.BPF_W, etherSrc),
		{Code: unix.BPF_JMP | unix.BPF_JEQ | unix.BPF_X, Jf: 5}, // drop
		ld(unix.BPF_H, chaddr+4),
		tax,
		ld(unix.BPF_H, etherSrc+4),
		{Code: unix.BPF_JMP | unix.BPF_JEQ | unix.BPF_X, Jf: 1}, // drop
		{Code: unix.BPF_RET | unix.BPF_K, K: 0xffffffff},
		{Code: unix.BPF_RET | unix.BPF_K, K: 0},
	}
	raw, err := c.SyscallConn()
	if err != nil {
		return fmt.Errorf("filter requests by source: %w", err)
	}
	var serr error
	if err := raw.Control(func(fd uintptr) {
		serr = unix.SetsockoptSockFprog(int(fd), unix.SOL_SOCKET, unix.SO_ATTACH_FILTER,
			&unix.SockFprog{Len: uint16(len(prog)), Filter: &prog[0]})
	}); err != nil {
		return fmt.Errorf("filter requests by source: %w", err)
	}
	if serr != nil {
		return fmt.Errorf("filter requests by source: %w", serr)
	}
	return nil
}

// Serve answers requests until ctx is done or the socket fails.
func (s *Server) Serve(ctx context.Context) error {
	stop := context.AfterFunc(ctx, func() { s.conn.Close() })
	defer stop()
	errc := make(chan error, s.cfg.Workers)
	for range s.cfg.Workers {
		go func() { errc <- s.loop() }()
	}
	pruned := make(chan struct{})
	defer func() { <-pruned }()
	pctx, stopPrune := context.WithCancel(ctx)
	defer stopPrune()
	go func() {
		defer close(pruned)
		t := time.NewTicker(s.pruneEvery)
		defer t.Stop()
		for {
			select {
			case <-pctx.Done():
				return
			case <-t.C:
				s.prune(s.cfg.Now())
			}
		}
	}()
	var first error
	for range s.cfg.Workers {
		if err := <-errc; first == nil {
			first = err
			s.conn.Close()
		}
	}
	if ctx.Err() != nil {
		return nil
	}
	return first
}

// Close closes the socket, ending Serve.
func (s *Server) Close() error { return s.conn.Close() }

func (s *Server) loop() error {
	buf := make([]byte, 1500)
	for {
		n, _, err := s.conn.ReadFrom(buf)
		if err != nil {
			return fmt.Errorf("read dhcp socket: %w", err)
		}
		out, dest, _ := s.Handle(buf[:n])
		if out == nil {
			continue
		}
		if _, err := s.conn.WriteTo(out, net.UDPAddrFromAddrPort(dest)); err != nil {
			s.cfg.Log.Warn("dhcp send failed", "dest", dest, "err", err)
		}
	}
}

// Handle runs one received packet through rate limit, Decide and the lease
// table, returning the bytes to send (nil for none) and where.
func (s *Server) Handle(pkt []byte) ([]byte, netip.AddrPort, Reason) {
	now := s.cfg.Now()
	req, err := dhcpv4.FromBytes(pkt)
	if err != nil {
		s.stats[ReasonUnparsable].Add(1)
		return nil, netip.AddrPort{}, ReasonUnparsable
	}
	if !s.cfg.Relays && addrOf(req.GatewayIPAddr).IsValid() {
		s.stats[ReasonRelayed].Add(1)
		return nil, netip.AddrPort{}, ReasonRelayed
	}
	// Only known MACs get a bucket, so a flood of invented MACs cannot grow
	// the table; they are dropped by Decide as unknown and counted.
	if len(req.ClientHWAddr) == 6 {
		if a, ok := s.cfg.IPAM.ByMAC(req.ClientHWAddr); ok && !a.Pending && !s.allow(ipam.MACKey(req.ClientHWAddr), now) {
			s.stats[ReasonRateLimited].Add(1)
			return nil, netip.AddrPort{}, ReasonRateLimited
		}
	}
	d := Decide(req, bindings{s, now}, &s.cfg.Reply)
	s.stats[d.Reason].Add(1)
	s.apply(d, now)
	if d.Action == ActionBind && d.Reply != nil && s.cfg.OnAck != nil {
		s.cfg.OnAck(d.MAC, d.IP, now)
	}
	if d.Reply == nil {
		return nil, netip.AddrPort{}, d.Reason
	}
	return d.Reply.ToBytes(), d.Dest, d.Reason
}

func (s *Server) allow(k ipam.MACKey, now time.Time) bool {
	rl := s.cfg.RateLimit
	if rl.Burst <= 0 {
		return true
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	b := s.bucket[k]
	if b == nil {
		b = &bucket{tokens: float64(rl.Burst), last: now}
		s.bucket[k] = b
	}
	if rl.Every > 0 {
		b.tokens += float64(now.Sub(b.last)) / float64(rl.Every)
		if b.tokens > float64(rl.Burst) {
			b.tokens = float64(rl.Burst)
		}
	}
	b.last = now
	if b.tokens < 1 {
		return false
	}
	b.tokens--
	return true
}

func (s *Server) apply(d Decision, now time.Time) {
	var st LeaseState
	var exp time.Time
	switch d.Action {
	case ActionNone:
		return
	case ActionOffer:
		st, exp = StateOffered, now.Add(time.Minute)
	case ActionBind:
		lt := s.cfg.Reply.LeaseTime
		if lt <= 0 {
			lt = time.Hour
		}
		st, exp = StateBound, now.Add(lt)
	case ActionRelease:
		st, exp = StateReleased, now
	case ActionDecline:
		st, exp = StateDeclined, now.Add(s.cfg.DeclineHold)
		s.cfg.Log.Warn("dhcp client declined its address: another host uses it", "mac", d.MAC.String(), "ip", d.IP)
	}
	k := ipam.MACKey(d.MAC)
	s.mu.Lock()
	defer s.mu.Unlock()
	l := s.leases[k]
	if l == nil {
		l = &Lease{MAC: append(net.HardwareAddr(nil), d.MAC...)}
		s.leases[k] = l
	}
	l.IP, l.State, l.Expires = d.IP, st, exp
}

// bindings joins the IPAM with the lease table for Decide.
type bindings struct {
	s   *Server
	now time.Time
}

func (b bindings) Binding(mac net.HardwareAddr) (Binding, bool) {
	a, ok := b.s.cfg.IPAM.ByMAC(mac)
	if !ok || a.Pending {
		return Binding{}, false
	}
	bind := Binding{IP: a.IP, Hostname: a.Hostname}
	b.s.mu.Lock()
	if l := b.s.leases[ipam.MACKey(mac)]; l != nil && l.State == StateDeclined && b.now.Before(l.Expires) && l.IP == a.IP {
		bind.Declined = true
	}
	b.s.mu.Unlock()
	return bind, true
}

// Lease returns mac's lease as the server last saw it.
func (s *Server) Lease(mac net.HardwareAddr) (Lease, bool) {
	if len(mac) != 6 {
		return Lease{}, false
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	l := s.leases[ipam.MACKey(mac)]
	if l == nil {
		return Lease{}, false
	}
	return *l, true
}

// prune drops the lease and rate bucket of every MAC the IPAM no longer
// holds (a purged VM), and buckets that have refilled, which are the same
// as none: the tables hold only what is live.
func (s *Server) prune(now time.Time) {
	s.mu.Lock()
	keys := make([]ipam.MACKey, 0, len(s.leases)+len(s.bucket))
	for k := range s.leases {
		keys = append(keys, k)
	}
	for k := range s.bucket {
		if _, ok := s.leases[k]; !ok {
			keys = append(keys, k)
		}
	}
	s.mu.Unlock()
	// The IPAM is asked without s.mu held: Handle takes them the other
	// way round.
	var gone []ipam.MACKey
	for _, k := range keys {
		if a, ok := s.cfg.IPAM.ByMAC(k[:]); !ok || a.Pending {
			gone = append(gone, k)
		}
	}
	rl := s.cfg.RateLimit
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, k := range gone {
		delete(s.leases, k)
		delete(s.bucket, k)
	}
	for k, b := range s.bucket {
		if rl.Every > 0 && b.tokens+float64(now.Sub(b.last))/float64(rl.Every) >= float64(rl.Burst) {
			delete(s.bucket, k)
		}
	}
}

// Forget drops mac's lease and rate limit state, as when its VM is purged.
func (s *Server) Forget(mac net.HardwareAddr) {
	if len(mac) != 6 {
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	delete(s.leases, ipam.MACKey(mac))
	delete(s.bucket, ipam.MACKey(mac))
}

// Stats returns how many packets ended for each reason, by metric name.
func (s *Server) Stats() map[string]uint64 {
	m := make(map[string]uint64, numReasons)
	for r := Reason(0); r < numReasons; r++ {
		if v := s.stats[r].Load(); v > 0 {
			m[r.String()] = v
		}
	}
	return m
}

// Count returns how many packets ended for reason r.
func (s *Server) Count(r Reason) uint64 {
	if r < 0 || r >= numReasons {
		return 0
	}
	return s.stats[r].Load()
}

// drain discards every datagram already queued on c, without waiting.
func drain(c *net.UDPConn) {
	buf := make([]byte, 1500)
	c.SetReadDeadline(time.Now())
	for {
		if _, _, err := c.ReadFrom(buf); err != nil {
			break
		}
	}
	c.SetReadDeadline(time.Time{})
}
