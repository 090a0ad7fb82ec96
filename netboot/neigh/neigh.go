// Package neigh tells which MAC address stands behind an IPv4 address on the
// bridge, from the kernel's neighbour table over netlink and, when the entry
// is not freshly confirmed, from an ARP probe of its own.
//
// It answers "who is this on the wire"; it does not know who should be
// (the IPAM does) nor decide what to serve (the metadata server does).
package neigh

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"sync"
	"syscall"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netlink/nl"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// ErrNoEntry means no confirmed MAC is known for the address.
var ErrNoEntry = errors.New("no confirmed neighbour entry")

// ErrMismatch means the address is answered by another MAC than expected.
var ErrMismatch = errors.New("neighbour mac mismatch")

// ErrWrongPort means the MAC is not behind the bridge port it belongs to.
var ErrWrongPort = errors.New("mac behind the wrong bridge port")

// PortError says where the bridge forwards frames for a MAC, when that is
// not the port the MAC belongs to.
type PortError struct {
	IP  netip.Addr
	MAC net.HardwareAddr
	// Want is the port the MAC belongs to; "" when any VM port would do.
	Want string
	// Got is the port the bridge's forwarding entry names; "" when the
	// bridge has no entry for the MAC on any port.
	Got string
}

// Error describes where the MAC was found.
func (e *PortError) Error() string {
	got := "on no port"
	if e.Got != "" {
		got = "behind port " + e.Got
	}
	if e.Want == "" {
		return fmt.Sprintf("%s at %s: bridge has the mac %s", e.IP, e.MAC, got)
	}
	return fmt.Sprintf("%s at %s: bridge has the mac %s, want port %s", e.IP, e.MAC, got, e.Want)
}

// Unwrap makes errors.Is(err, ErrWrongPort) hold.
func (e *PortError) Unwrap() error { return ErrWrongPort }

// MismatchError says which MAC was seen where another was expected.
type MismatchError struct {
	IP        netip.Addr
	Want, Got net.HardwareAddr
	// Probed is true when the MAC came from an ARP reply, not the table.
	Probed bool
}

// Error describes the mismatch.
func (e *MismatchError) Error() string {
	src := "neighbour table"
	if e.Probed {
		src = "arp reply"
	}
	return fmt.Sprintf("%s is at %s by %s, want %s", e.IP, e.Got, src, e.Want)
}

// Unwrap makes errors.Is(err, ErrMismatch) hold.
func (e *MismatchError) Unwrap() error { return ErrMismatch }

// Probe says when Verify sends an ARP probe of its own.
type Probe int

// The probe modes.
const (
	// ProbeUnsure probes when the table's entry is not confirmed (stale,
	// delay, probe, incomplete, failed or missing). The default.
	ProbeUnsure Probe = iota
	// ProbeNever trusts only confirmed entries and refuses the rest.
	ProbeNever
	// ProbeAlways probes on every check, even over a confirmed entry.
	ProbeAlways
)

// Config configures a Checker.
type Config struct {
	// Interface is the bridge the VMs are on.
	Interface string
	// Probe says when to send ARP probes.
	Probe Probe
	// ProbeTimeout bounds one ARP probe; 200 ms when zero.
	ProbeTimeout time.Duration
	// PortOf names the bridge port (the VM's tap) that the VM holding ip
	// and mac is plugged into; "" when it does not know. With a name,
	// Verify also requires the bridge's forwarding entry for mac to be on
	// that port, which a VM forging another's MAC and IP (both at layer
	// 2) cannot fake. Without one, the entry must be on some port.
	PortOf func(ip netip.Addr, mac net.HardwareAddr) string
}

// Checker looks addresses up. It is safe for concurrent use.
type Checker struct {
	cfg     Config
	ifindex int
	links   *netlink.Handle // bound to the bridge's namespace

	socks chan *nl.NetlinkSocket // pooled, one request in flight each

	// The table as the kernel's neighbour events describe it. events is
	// read only with tableMu held, so once a drain under the lock finds
	// the socket empty, every event queued before is in table.
	events  *os.File
	evRaw   syscall.RawConn
	tableMu sync.Mutex
	table   map[netip.Addr]Entry
	evBuf   []byte

	arp     *os.File
	arpRaw  syscall.RawConn
	mu      sync.Mutex
	waiters map[netip.Addr][]chan net.HardwareAddr
	done    chan struct{}
}

// confirmed are the states whose MAC the kernel has verified recently.
const confirmed = netlink.NUD_REACHABLE | netlink.NUD_PERMANENT | netlink.NUD_NOARP

// New opens the netlink and packet sockets in the calling thread's network
// namespace (which must hold cfg.Interface).
func New(cfg Config) (*Checker, error) {
	if cfg.ProbeTimeout <= 0 {
		cfg.ProbeTimeout = 200 * time.Millisecond
	}
	links, err := netlink.NewHandle(unix.NETLINK_ROUTE)
	if err != nil {
		return nil, fmt.Errorf("open netlink handle: %w", err)
	}
	link, err := links.LinkByName(cfg.Interface)
	if err != nil {
		links.Close()
		return nil, fmt.Errorf("find interface %s: %w", cfg.Interface, err)
	}
	c := &Checker{
		cfg:     cfg,
		ifindex: link.Attrs().Index,
		links:   links,
		socks:   make(chan *nl.NetlinkSocket, 8),
		waiters: map[netip.Addr][]chan net.HardwareAddr{},
		done:    make(chan struct{}),
	}
	for range cap(c.socks) {
		s, err := nl.GetNetlinkSocketAt(netns.None(), netns.None(), unix.NETLINK_ROUTE)
		if err != nil {
			c.Close()
			return nil, fmt.Errorf("open netlink socket: %w", err)
		}
		c.socks <- s
	}
	if err := c.subscribe(); err != nil {
		c.Close()
		return nil, err
	}
	if cfg.Probe != ProbeNever {
		if err := c.openARP(); err != nil {
			c.Close()
			return nil, err
		}
	}
	return c, nil
}

// subscribe joins the kernel's neighbour event group, then loads the table:
// events queued meanwhile are applied after the dump, in order, so the
// table ends up as the kernel's.
func (c *Checker) subscribe() error {
	fd, err := unix.Socket(unix.AF_NETLINK, unix.SOCK_RAW|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, unix.NETLINK_ROUTE)
	if err != nil {
		return fmt.Errorf("open neighbour event socket: %w", err)
	}
	if err := unix.Bind(fd, &unix.SockaddrNetlink{Family: unix.AF_NETLINK, Groups: unix.RTMGRP_NEIGH}); err != nil {
		unix.Close(fd)
		return fmt.Errorf("join neighbour events: %w", err)
	}
	// Room for a busy bridge's events between two drains; past it the
	// kernel says ENOBUFS and the table is reloaded.
	if unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_RCVBUFFORCE, 4<<20) != nil {
		unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_RCVBUF, 4<<20)
	}
	c.events = os.NewFile(uintptr(fd), "neigh-events")
	if c.evRaw, err = c.events.SyscallConn(); err != nil {
		return fmt.Errorf("neighbour event socket: %w", err)
	}
	c.evBuf = make([]byte, 64<<10)
	c.tableMu.Lock()
	err = c.reload()
	c.tableMu.Unlock()
	if err != nil {
		return err
	}
	go c.watch()
	return nil
}

// reload replaces the table with a dump. tableMu must be held.
func (c *Checker) reload() error {
	ns, err := c.links.NeighList(c.ifindex, netlink.FAMILY_V4)
	if err != nil {
		return fmt.Errorf("list neighbours of %s: %w", c.cfg.Interface, err)
	}
	c.table = make(map[netip.Addr]Entry, len(ns))
	for _, n := range ns {
		if ip, ok := netip.AddrFromSlice(n.IP.To4()); ok {
			c.table[ip] = entryOf(n)
		}
	}
	return nil
}

// watch applies events as they come, so the table is fresh even when no
// request drains it.
func (c *Checker) watch() {
	for {
		err := c.evRaw.Read(func(fd uintptr) bool {
			c.tableMu.Lock()
			defer c.tableMu.Unlock()
			c.drain(int(fd))
			return false // wait for the next event
		})
		if err != nil {
			return // closed
		}
	}
}

// drain applies every queued event. tableMu must be held.
func (c *Checker) drain(fd int) {
	for {
		n, _, err := unix.Recvfrom(fd, c.evBuf, unix.MSG_DONTWAIT)
		if err == unix.ENOBUFS {
			// Events were lost: start over from a dump.
			if err := c.reload(); err != nil {
				c.table = nil
				return
			}
			continue
		}
		if err != nil || n == 0 {
			return
		}
		msgs, err := syscall.ParseNetlinkMessage(c.evBuf[:n])
		if err != nil {
			continue
		}
		for _, m := range msgs {
			if m.Header.Type != unix.RTM_NEWNEIGH && m.Header.Type != unix.RTM_DELNEIGH {
				continue
			}
			nb, err := netlink.NeighDeserialize(m.Data)
			if err != nil || nb.LinkIndex != c.ifindex || nb.Family != netlink.FAMILY_V4 {
				continue
			}
			ip, ok := netip.AddrFromSlice(nb.IP.To4())
			if !ok || c.table == nil {
				continue
			}
			if m.Header.Type == unix.RTM_DELNEIGH {
				delete(c.table, ip)
			} else {
				c.table[ip] = entryOf(*nb)
			}
		}
	}
}

// Lookup returns ip's entry as of now: it applies the events the kernel has
// queued so far first. Any change that let a connection through (the
// kernel resolves the peer before it answers a SYN) is queued before the
// request that connection carries can be read, so Lookup sees it.
func (c *Checker) Lookup(ip netip.Addr) (Entry, bool, error) {
	c.tableMu.Lock()
	defer c.tableMu.Unlock()
	var derr error
	if err := c.evRaw.Control(func(fd uintptr) { c.drain(int(fd)) }); err != nil {
		derr = err
	}
	if c.table == nil {
		if err := c.reload(); err != nil {
			return Entry{}, false, err
		}
	}
	if derr != nil {
		return Entry{}, false, fmt.Errorf("read neighbour events: %w", derr)
	}
	e, ok := c.table[ip]
	return e, ok, nil
}

// Close releases the sockets.
func (c *Checker) Close() error {
	select {
	case <-c.done:
		return nil
	default:
	}
	close(c.done)
drain:
	for {
		select {
		case s := <-c.socks:
			s.Close()
		default:
			break drain
		}
	}
	if c.arp != nil {
		c.arp.Close()
	}
	if c.events != nil {
		c.events.Close()
	}
	c.links.Close()
	return nil
}

// Entry is one row of the neighbour table.
type Entry struct {
	MAC   net.HardwareAddr
	State int // netlink.NUD_*
}

// Confirmed reports whether the kernel verified the MAC recently.
func (e Entry) Confirmed() bool { return e.State&confirmed != 0 }

// entryOf copies n's MAC: netlink hands it out as a slice of the receive
// buffer, which the next message overwrites.
func entryOf(n netlink.Neigh) Entry {
	return Entry{MAC: append(net.HardwareAddr(nil), n.HardwareAddr...), State: n.State}
}

// Query asks the kernel for ip's entry on the bridge (RTM_GETNEIGH for that
// one entry, not a dump), bypassing the event-fed table Lookup reads. It
// costs two syscalls and a kernel lookup per call, which is why Verify
// does not use it.
func (c *Checker) Query(ip netip.Addr) (Entry, bool, error) {
	if !ip.Is4() {
		return Entry{}, false, nil
	}
	a4 := ip.As4()
	n, err := c.getNeigh(&netlink.Ndmsg{Family: unix.AF_INET, Index: uint32(c.ifindex)}, nl.NewRtAttr(netlink.NDA_DST, a4[:]))
	if err != nil {
		return Entry{}, false, fmt.Errorf("read neighbour %s: %w", ip, err)
	}
	if n == nil || n.LinkIndex != c.ifindex {
		return Entry{}, false, nil
	}
	return entryOf(*n), true, nil
}

// getNeigh sends one RTM_GETNEIGH for a single entry and returns it, or
// nil when the kernel has none.
func (c *Checker) getNeigh(msg *netlink.Ndmsg, attrs ...*nl.RtAttr) (*netlink.Neigh, error) {
	var s *nl.NetlinkSocket
	select {
	case s = <-c.socks:
	case <-c.done:
		return nil, errors.New("neighbour checker closed")
	}
	defer func() { c.socks <- s }()
	req := nl.NewNetlinkRequest(unix.RTM_GETNEIGH, 0)
	req.AddData(msg)
	for _, a := range attrs {
		req.AddData(a)
	}
	if err := s.Send(req); err != nil {
		return nil, err
	}
	for {
		msgs, _, err := s.Receive()
		if err != nil {
			return nil, err
		}
		for _, m := range msgs {
			if m.Header.Seq != req.Seq {
				continue // a late answer to an earlier, failed request
			}
			switch m.Header.Type {
			case unix.NLMSG_ERROR:
				var e [4]byte // the kernel's errno, negated
				copy(e[:], m.Data)
				errno := -int32(binary.NativeEndian.Uint32(e[:]))
				if errno == int32(unix.ENOENT) {
					return nil, nil
				}
				return nil, syscall.Errno(errno)
			case unix.RTM_NEWNEIGH:
				return netlink.NeighDeserialize(m.Data)
			}
		}
	}
}

// Verify returns nil when ip is at want on the bridge: the table's entry
// must name want, and when it is not confirmed (or always, with
// ProbeAlways) an ARP probe must be answered by want first. A stale entry
// naming another MAC is a mismatch, not a reason to probe: whoever made the
// kernel learn it was speaking as ip.
//
// The entry comes from Lookup. Its MAC is always current (the kernel
// announces every MAC change), its state is the last one announced: the
// kernel moves reachable to delay and delay to probe without an event, and
// both keep a MAC the kernel confirmed itself and still sends to.
func (c *Checker) Verify(ctx context.Context, ip netip.Addr, want net.HardwareAddr) error {
	e, ok, err := c.Lookup(ip)
	if err != nil {
		return err
	}
	if ok && len(e.MAC) == 6 && e.MAC.String() != want.String() {
		return &MismatchError{IP: ip, Want: want, Got: e.MAC}
	}
	if ok && len(e.MAC) == 6 && e.Confirmed() && c.cfg.Probe != ProbeAlways {
		return c.checkPort(ip, want)
	}
	if c.cfg.Probe == ProbeNever {
		return fmt.Errorf("%s: state %s: %w", ip, stateName(e.State), ErrNoEntry)
	}
	got, err := c.ProbeARP(ctx, ip)
	if err != nil {
		return err
	}
	if got.String() != want.String() {
		return &MismatchError{IP: ip, Want: want, Got: got, Probed: true}
	}
	return c.checkPort(ip, want)
}

// checkPort requires the bridge's forwarding entry for mac to be on the
// port PortOf names (or, without a name, on a port at all). The neighbour
// table and ARP only say what the sender claims; the forwarding entry says
// where frames from mac actually came in. It is learnt from the frame that
// carried the request (or the probe's reply), so it is there for a VM
// speaking as itself.
func (c *Checker) checkPort(ip netip.Addr, mac net.HardwareAddr) error {
	var want string
	if c.cfg.PortOf != nil {
		want = c.cfg.PortOf(ip, mac)
	}
	idx, err := c.fdbPort(mac)
	if err != nil {
		return fmt.Errorf("check port of %s at %s: %w", ip, mac, err)
	}
	if idx == 0 {
		// No entry, or the address of the bridge or a port itself:
		// no VM sent as mac.
		return &PortError{IP: ip, MAC: mac, Want: want}
	}
	if want == "" {
		return nil
	}
	link, err := c.links.LinkByIndex(idx)
	if err != nil {
		return &PortError{IP: ip, MAC: mac, Want: want, Got: fmt.Sprintf("#%d", idx)}
	}
	if got := link.Attrs().Name; got != want {
		return &PortError{IP: ip, MAC: mac, Want: want, Got: got}
	}
	return nil
}

// fdbPort returns the index of the bridge port whose forwarding entry
// holds mac, or 0 without one or for a local entry (the MAC of the bridge
// or of a port device itself): one RTM_GETNEIGH for that entry, not a dump
// of the table.
func (c *Checker) fdbPort(mac net.HardwareAddr) (int, error) {
	n, err := c.getNeigh(&netlink.Ndmsg{Family: unix.AF_BRIDGE},
		nl.NewRtAttr(netlink.NDA_LLADDR, []byte(mac)),
		nl.NewRtAttr(netlink.NDA_MASTER, nl.Uint32Attr(uint32(c.ifindex))))
	if err != nil {
		return 0, fmt.Errorf("read forwarding entry: %w", err)
	}
	if n == nil || n.State&netlink.NUD_PERMANENT != 0 || n.LinkIndex == c.ifindex {
		return 0, nil
	}
	return n.LinkIndex, nil
}

func (c *Checker) openARP() error {
	fd, err := unix.Socket(unix.AF_PACKET, unix.SOCK_DGRAM|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, int(htons(unix.ETH_P_ARP)))
	if err != nil {
		return fmt.Errorf("open arp socket: %w", err)
	}
	if err := unix.Bind(fd, &unix.SockaddrLinklayer{Protocol: htons(unix.ETH_P_ARP), Ifindex: c.ifindex}); err != nil {
		unix.Close(fd)
		return fmt.Errorf("bind arp socket to %s: %w", c.cfg.Interface, err)
	}
	c.arp = os.NewFile(uintptr(fd), "arp")
	c.arpRaw, err = c.arp.SyscallConn()
	if err != nil {
		c.arp.Close()
		return fmt.Errorf("arp socket: %w", err)
	}
	go c.readARP()
	return nil
}

func htons(v uint16) uint16 { return v<<8 | v>>8 }

// readARP hands each ARP reply's sender MAC to whoever probes its address.
func (c *Checker) readARP() {
	buf := make([]byte, 128)
	for {
		var n int
		var from unix.Sockaddr
		var rerr error
		if err := c.arpRaw.Read(func(fd uintptr) bool {
			n, from, rerr = unix.Recvfrom(int(fd), buf, 0)
			return rerr != unix.EAGAIN
		}); err != nil {
			return // closed
		}
		if rerr != nil {
			continue
		}
		p := buf[:n]
		// htype 1, ptype IPv4, hlen 6, plen 4, op reply.
		if n < 28 || p[0] != 0 || p[1] != 1 || p[2] != 8 || p[3] != 0 || p[4] != 6 || p[5] != 4 || p[6] != 0 || p[7] != 2 {
			continue
		}
		sha := append(net.HardwareAddr(nil), p[8:14]...)
		// The sender MAC inside ARP is whatever the sender wrote; a reply
		// whose frame came from another MAC speaks for someone else.
		if ll, ok := from.(*unix.SockaddrLinklayer); !ok || ll.Halen != 6 || net.HardwareAddr(ll.Addr[:6]).String() != sha.String() {
			continue
		}
		spa := netip.AddrFrom4([4]byte(p[14:18]))
		c.mu.Lock()
		ws := c.waiters[spa]
		delete(c.waiters, spa)
		c.mu.Unlock()
		for _, w := range ws {
			w <- sha
		}
	}
}

// ProbeARP asks the bridge who has ip and returns the first MAC answering.
func (c *Checker) ProbeARP(ctx context.Context, ip netip.Addr) (net.HardwareAddr, error) {
	if c.arp == nil {
		return nil, fmt.Errorf("probe %s: arp probing off: %w", ip, ErrNoEntry)
	}
	// Read the bridge's MAC and address now, not at New: a bridge takes a
	// port's MAC when ports come and go, and a probe from a stale one is
	// answered to nobody.
	link, err := c.links.LinkByIndex(c.ifindex)
	if err != nil {
		return nil, fmt.Errorf("probe %s: read %s: %w", ip, c.cfg.Interface, err)
	}
	ifmac := link.Attrs().HardwareAddr
	addrs, err := c.links.AddrList(link, netlink.FAMILY_V4)
	if err != nil {
		return nil, fmt.Errorf("probe %s: addresses of %s: %w", ip, c.cfg.Interface, err)
	}
	var srcIP netip.Addr
	for _, a := range addrs {
		if s, ok := netip.AddrFromSlice(a.IP.To4()); ok && a.IPNet != nil {
			ones, _ := a.IPNet.Mask.Size()
			if p, err := s.Prefix(ones); err == nil && p.Contains(ip) {
				srcIP = s
				break
			}
		}
	}
	if !ip.Is4() || !srcIP.IsValid() || len(ifmac) != 6 {
		return nil, fmt.Errorf("probe %s: no address on %s in its network: %w", ip, c.cfg.Interface, ErrNoEntry)
	}
	ch := make(chan net.HardwareAddr, 1)
	c.mu.Lock()
	c.waiters[ip] = append(c.waiters[ip], ch)
	c.mu.Unlock()
	defer func() {
		c.mu.Lock()
		ws := c.waiters[ip]
		for i, w := range ws {
			if w == ch {
				ws = append(ws[:i], ws[i+1:]...)
				break
			}
		}
		if len(ws) == 0 {
			delete(c.waiters, ip)
		} else {
			c.waiters[ip] = ws
		}
		c.mu.Unlock()
	}()

	pkt := make([]byte, 28)
	copy(pkt, []byte{0, 1, 8, 0, 6, 4, 0, 1})
	copy(pkt[8:14], ifmac)
	src, dst := srcIP.As4(), ip.As4()
	copy(pkt[14:18], src[:])
	copy(pkt[24:28], dst[:])
	to := &unix.SockaddrLinklayer{Protocol: htons(unix.ETH_P_ARP), Ifindex: c.ifindex, Halen: 6, Addr: [8]byte{0xff, 0xff, 0xff, 0xff, 0xff, 0xff}}
	var serr error
	if err := c.arpRaw.Write(func(fd uintptr) bool {
		serr = unix.Sendto(int(fd), pkt, 0, to)
		return serr != unix.EAGAIN
	}); err != nil {
		return nil, fmt.Errorf("send arp probe for %s: %w", ip, err)
	}
	if serr != nil {
		return nil, fmt.Errorf("send arp probe for %s: %w", ip, serr)
	}
	t := time.NewTimer(c.cfg.ProbeTimeout)
	defer t.Stop()
	select {
	case mac := <-ch:
		return mac, nil
	case <-t.C:
		return nil, fmt.Errorf("arp probe for %s: no answer in %s: %w", ip, c.cfg.ProbeTimeout, ErrNoEntry)
	case <-ctx.Done():
		return nil, fmt.Errorf("arp probe for %s: %w", ip, ctx.Err())
	}
}

// stateName names a NUD_* state as ip-neighbour(8) does.
func stateName(s int) string {
	names := []struct {
		bit  int
		name string
	}{
		{netlink.NUD_INCOMPLETE, "incomplete"}, {netlink.NUD_REACHABLE, "reachable"},
		{netlink.NUD_STALE, "stale"}, {netlink.NUD_DELAY, "delay"}, {netlink.NUD_PROBE, "probe"},
		{netlink.NUD_FAILED, "failed"}, {netlink.NUD_NOARP, "noarp"}, {netlink.NUD_PERMANENT, "permanent"},
	}
	for _, n := range names {
		if s&n.bit != 0 {
			return n.name
		}
	}
	return "none"
}
