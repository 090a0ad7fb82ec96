package appliance

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"time"

	"google.golang.org/grpc"
	"tailscale.com/client/local"
	"tailscale.com/ipn"
	"tailscale.com/net/memnet"
	"tailscale.com/tsnet"

	"github.com/threes-dev/threes/appliance/fleet"
	"github.com/threes-dev/threes/appliance/sshd"
	"github.com/threes-dev/threes/embeddb"
	"github.com/threes-dev/threes/hv"
	"github.com/threes-dev/threes/hv/images"
	"github.com/threes-dev/threes/netboot/ipam"
	threesv1 "github.com/threes-dev/threes/proto/threes/v1"
	"github.com/threes-dev/threes/tsauth"
	"github.com/threes-dev/threes/tsauth/control"
)

// Options configure an appliance. Zero values mean the defaults below.
type Options struct {
	StateDir   string // durable state: tailnet node, database; default /var/lib/threes
	Hostname   string // tailnet hostname; default "threes"
	AuthKey    string // tailnet auth key; without one the node logs a login URL and waits
	ControlURL string // control server (headscale, or a test's); default Tailscale's
	Tags       []string
	Listen     string       // tailnet listen address for the API; default ":9999"
	Socket     string       // host-local admin socket; default /run/threes/threes.sock, "none" for none
	CIDR       string       // management range on the bridge; default 10.10.0.0/16
	Bridge     string       // bridge VMs attach to, served by DHCP and metadata; default threes0
	DNS        []netip.Addr // name servers DHCP hands to VMs
	// BridgeNetNS names the network namespace (as `ip netns` does) that holds the
	// bridge; empty means the appliance's own. DHCP and metadata sockets open there.
	BridgeNetNS string
	LibvirtURI  string // default qemu:///system
	// CrossNetwork lets VMs of different networks reach each other on the
	// bridge; by default they cannot, so traffic between networks goes over the
	// tailnet, where the policy rules are.
	CrossNetwork bool
	// DiskOvercommit is hv.Config.DiskOvercommit for the hypervisor Open makes:
	// how far the VMs' thin disks may promise more than the disk holds; zero
	// means no free-space check.
	DiskOvercommit float64
	// Capacity is the room this host offers VMs, which placement weighs; zero
	// fields default to the machine's CPUs and memory and to
	// DefaultCPUOvercommit and DefaultMemoryOvercommit.
	Capacity fleet.Capacity
	// MetadataSession makes every /v1 metadata request carry a session token
	// (PUT /v1/session first); off by default, since guests written for the
	// threes v0.1 protocol would lose their auth key.
	MetadataSession bool
	Images          []string

	// SSH runs the commands of SSH sessions on the tailnet; nil serves no SSH.
	SSH sshd.Runner
	// SSHListen is the tailnet address for SSH; default ":22", "none" for none.
	SSHListen string

	// Plane edits the tailnet: networks as policy, VMs' auth keys and devices. Nil
	// means threes records networks but leaves the tailnet's policy alone.
	Plane control.Plane
	// OwnerTag is the appliance's own tag, owner and prefix of network tags; default
	// the first of Tags, else DefaultOwnerTag.
	OwnerTag string

	// Join lists hosts (tailnet IPs or names, port RaftPort unless given) of the
	// cluster this appliance joins; BootstrapExpect, when set, forms a new
	// cluster of that many hosts with them (1: a cluster of this host alone that
	// others can join). Either puts the database on the tailnet (RaftPort),
	// reachable only by nodes that carry OwnerTag; both empty keep it off the
	// network. A member rejoins its cluster by itself at every start, flags or
	// not; a host that has a database of its own cannot join or form one.
	Join            []string
	BootstrapExpect int

	// Hypervisor replaces the one opened from LibvirtURI (tests pass one that cleans up).
	Hypervisor hv.Hypervisor
	// ReconcileInterval is how often libvirt and the disks are converged with the
	// database after the pass at start; default fleet.DefaultReconcileInterval,
	// negative for none.
	ReconcileInterval time.Duration
	// MetadataPort is the gateway's TCP port for the metadata server; default 80.
	// Guests find it in their cloud-init seed URL; clients written for threes
	// v0.1 expect 80.
	MetadataPort uint16
	// Store replaces the tailnet node's state file (tests keep it in memory).
	Store     ipn.StateStore
	Logger    *slog.Logger
	Now       func() time.Time
	TSLogf    func(format string, args ...any) // tailscale's own chatter; default discarded
	Ephemeral bool                             // the node leaves the tailnet when closed (tests)

	// hooks are the fleet's test hooks, set only through export_test.go.
	hooks fleet.Hooks
}

// DefaultCIDR is the management range when Options.CIDR is empty: the IPAM's.
func DefaultCIDR() string { return ipam.DefaultPrefix.String() }

// Defaults of Options, shared with the command line's flags.
const (
	DefaultStateDir            = "/var/lib/threes"
	DefaultHostname            = "threes"
	DefaultListen              = ":9999"
	DefaultSocket              = "/run/threes/threes.sock"
	DefaultSSHListen           = ":22"
	DefaultBridge              = "threes0"
	DefaultLibvirtURI          = "qemu:///system"
	DefaultMetadataPort uint16 = 80
	// A VM's vCPUs are mostly idle, so they may promise the host's CPUs four
	// times over; memory that is promised twice is swapped or killed.
	DefaultCPUOvercommit    = 4.0
	DefaultMemoryOvercommit = 1.0
)

func (o *Options) defaults() {
	set := func(p *string, v string) {
		if *p == "" {
			*p = v
		}
	}
	set(&o.StateDir, DefaultStateDir)
	set(&o.Hostname, DefaultHostname)
	set(&o.Listen, DefaultListen)
	set(&o.Socket, DefaultSocket)
	set(&o.SSHListen, DefaultSSHListen)
	set(&o.CIDR, DefaultCIDR())
	set(&o.Bridge, DefaultBridge)
	set(&o.LibvirtURI, DefaultLibvirtURI)
	if o.MetadataPort == 0 {
		o.MetadataPort = DefaultMetadataPort
	}
	if o.OwnerTag == "" {
		o.OwnerTag = fleet.DefaultOwnerTag
		if len(o.Tags) > 0 {
			o.OwnerTag = o.Tags[0]
		}
	}
	if o.Capacity.VCPUs == 0 {
		o.Capacity.VCPUs = runtime.NumCPU()
	}
	if o.Capacity.MemoryMiB == 0 {
		o.Capacity.MemoryMiB = machineMemoryMiB()
	}
	if o.Capacity.CPUOvercommit == 0 {
		o.Capacity.CPUOvercommit = DefaultCPUOvercommit
	}
	if o.Capacity.MemoryOvercommit == 0 {
		o.Capacity.MemoryOvercommit = DefaultMemoryOvercommit
	}
	if o.Logger == nil {
		o.Logger = slog.Default()
	}
	if o.Now == nil {
		o.Now = time.Now
	}
	if o.TSLogf == nil {
		o.TSLogf = func(string, ...any) {}
	}
}

// machineMemoryMiB is the machine's memory (MemTotal), or 0 when /proc does not
// say: the host then offers no memory and placement passes it over.
func machineMemoryMiB() int {
	b, err := os.ReadFile("/proc/meminfo")
	if err != nil {
		return 0
	}
	for line := range strings.Lines(string(b)) {
		if rest, ok := strings.CutPrefix(line, "MemTotal:"); ok {
			kib, err := strconv.Atoi(strings.TrimSuffix(strings.TrimSpace(rest), " kB"))
			if err != nil {
				return 0
			}
			return kib / 1024
		}
	}
	return 0
}

// Appliance is a running threes server.
type Appliance struct {
	log     *slog.Logger
	ts      *tsnet.Server
	db      *embeddb.DB
	hv      hv.Hypervisor
	hvClose func() error
	images  *images.Store
	fleet   *fleet.Fleet
	servers []*grpc.Server
	closers []func() error
	cancel  context.CancelFunc
	done    chan struct{}
}

// Start brings an appliance up, step by step, and returns once the API is being
// served. The tailnet may still be joining: calls arrive when it is up.
func Start(ctx context.Context, o Options) (_ *Appliance, err error) {
	o.defaults()
	a := &Appliance{log: o.Logger, done: make(chan struct{})}
	defer func() {
		if err != nil {
			a.Close()
		}
	}()

	// 1. The state dir: QEMU's user must get through it to the images and disks
	// (which are its own to guard), while the node key and the database stay root's.
	if err := os.MkdirAll(o.StateDir, 0o711); err != nil {
		return nil, fmt.Errorf("state dir: %w", err)
	}
	for _, private := range []string{"db", "tailnet"} {
		if err := os.MkdirAll(filepath.Join(o.StateDir, private), 0o700); err != nil {
			return nil, fmt.Errorf("state dir: %w", err)
		}
	}

	// 2. The embedded database. One node talks to nobody, so Raft gets an in-memory
	// listener and no port is opened; a cluster member's goes on the tailnet (clusterConfig).
	dbCfg := embeddb.Config{
		Dir:      filepath.Join(o.StateDir, "db"),
		NodeID:   o.Hostname,
		Listener: memnet.Listen("threes-raft:4002"),
		Logf:     func(f string, args ...any) { o.Logger.Debug(fmt.Sprintf(f, args...), "component", "rqlite") },
	}
	// A member stays one (on the tailnet) across restarts without flags.
	memberMark := filepath.Join(o.StateDir, "db-cluster-member")
	_, markErr := os.Stat(memberMark)
	member := markErr == nil
	if !member && (len(o.Join) > 0 || o.BootstrapExpect > 0) {
		if !embeddb.IsNew(dbCfg.Dir) {
			// Its Raft address is the in-memory one: peers could never reach it.
			return nil, fmt.Errorf("open database: %s holds the database of a host on its own; only a host with no database yet can join or form a cluster", dbCfg.Dir)
		}
		member = true
	}
	if member {
		dbCfg.Listener.Close()
		a.ts = newTailnetNode(o)
		if err := clusterConfig(ctx, o, a.ts, &dbCfg); err != nil {
			return nil, err
		}
	}
	a.db, err = embeddb.Open(ctx, dbCfg)
	if err != nil {
		return nil, fmt.Errorf("open database: %w", err)
	}
	if member {
		if err := os.WriteFile(memberMark, nil, 0o600); err != nil {
			return nil, fmt.Errorf("state dir: %w", err)
		}
	}

	// 3. The image store and the hypervisor. Base images live beside the disks
	// made from them; any kernel among them lets hv check that KVM really boots.
	if a.images, err = images.Open(filepath.Join(o.StateDir, "images")); err != nil {
		return nil, fmt.Errorf("image store: %w", err)
	}
	a.hv = o.Hypervisor
	if a.hv == nil {
		lv, err := hv.Open(ctx, hv.Config{URI: o.LibvirtURI, Owner: "threes/" + o.Hostname, Lazy: true,
			DiskDir: filepath.Join(o.StateDir, "disks"), ProbeKernel: probeKernel(a.images),
			ProbeVerdict: filepath.Join(o.StateDir, "kvm-verdict.json"),
			BridgeNetNS:  o.BridgeNetNS, CrossNetwork: o.CrossNetwork,
			DiskOvercommit: o.DiskOvercommit})
		if err != nil {
			return nil, fmt.Errorf("open hypervisor %s: %w", o.LibvirtURI, err)
		}
		a.hv, a.hvClose = lv, lv.Close
	}
	if accel, err := a.hv.Accel(ctx); err != nil {
		o.Logger.Warn("hypervisor not reachable yet: VM calls fail until it is (is libvirtd running?)", "uri", o.LibvirtURI, "err", err)
	} else {
		o.Logger.Info("hypervisor", "uri", o.LibvirtURI, "domain_type", accel.DomainType, "why", accel.Reason)
	}

	// 4. The IPAM, from the addresses the database holds.
	prefix, err := netip.ParsePrefix(o.CIDR)
	if err != nil {
		return nil, fmt.Errorf("cidr %q: %w", o.CIDR, err)
	}
	pool, err := loadIPAM(ctx, a.db, o.Hostname, prefix)
	if err != nil {
		return nil, err
	}

	// 5. The lifecycle. Libvirt's events keep VMs' states current, and reconcile
	// recovers from whatever the last run left behind, from now on and every
	// interval, while the steps below serve.
	if o.Plane == nil {
		o.Logger.Warn("no control plane configured: networks are recorded but not written to the tailnet policy, and VMs get no auth keys")
	}
	a.fleet = fleet.New(fleet.Config{DB: a.db, HV: a.hv, IPAM: pool, Images: a.images, Shared: member,
		Plane: o.Plane, OwnerTag: o.OwnerTag, Bridge: o.Bridge, Host: o.Hostname, Capacity: o.Capacity, NoCloud: noCloudURL(pool, o.MetadataPort),
		Now: o.Now, Log: o.Logger}, o.hooks)
	// In the background: everything below serves at once, whatever the VM count.
	a.closers = append(a.closers, a.fleet.Run(o.ReconcileInterval))

	// 6. The tailnet node (a cluster member started it at step 2). The API listens
	// on its tailnet addresses only.
	if a.ts == nil {
		a.ts = newTailnetNode(o)
	}
	tsLn, err := a.ts.Listen("tcp", o.Listen)
	if err != nil {
		return nil, fmt.Errorf("listen on tailnet %s: %w", o.Listen, err)
	}
	lc, err := a.ts.LocalClient()
	if err != nil {
		return nil, fmt.Errorf("tailnet local client: %w", err)
	}
	ident := tsauth.NewIdentifier(lc)
	runCtx, cancel := context.WithCancel(context.Background())
	a.cancel = cancel
	go func() {
		if err := ident.Watch(runCtx, lc); err != nil && runCtx.Err() == nil {
			o.Logger.Error("watch tailnet for identity changes", "err", err)
		}
	}()
	go a.fleet.WatchJoins(runCtx, lc)
	go func() {
		// The host's row gives its tailnet IP once it has one.
		st, err := a.ts.Up(runCtx)
		if err != nil {
			return
		}
		for _, ip := range st.TailscaleIPs {
			if ip.Is4() {
				a.fleet.SetAddr(ip)
				if err := a.fleet.Heartbeat(runCtx); err != nil && runCtx.Err() == nil {
					o.Logger.Warn("write this host's row with its tailnet IP; the next reconcile pass tries again", "err", err)
				}
				return
			}
		}
	}()

	// 7. DHCP and metadata for VMs, on the bridge only.
	if err := a.startNetboot(runCtx, o, pool); err != nil {
		return nil, err
	}

	// 8. The API, on the tailnet and on the host-local socket, behind one gate.
	svc := &service{fleet: a.fleet}
	g := &gate{identify: ident.Identify, log: o.Logger, ownerTag: o.OwnerTag}
	if member {
		// Calls that need another host's domain are carried there, and other
		// hosts' calls are taken here.
		_, port, err := net.SplitHostPort(o.Listen)
		if err != nil {
			return nil, fmt.Errorf("listen address %q: %w", o.Listen, err)
		}
		svc.hosts = &hosts{port: port, dial: tsauth.TailnetDialer(a.ts),
			resolve: func(_ context.Context, host string) (netip.Addr, error) { return raftHost(a.db, host) }}
		g.member = func(ip netip.Addr) bool { return isRaftHost(a.db, ip) }
		a.closers = append(a.closers, svc.hosts.Close)
	}
	a.serve(grpc.NewServer(grpc.ChainUnaryInterceptor(g.unary), grpc.ChainStreamInterceptor(g.stream)), svc, tsLn)
	if o.Socket != "none" {
		sockLn, err := listenSocket(o.Socket)
		if err != nil {
			return nil, err
		}
		a.serve(grpc.NewServer(grpc.Creds(peerCreds{}), grpc.ChainUnaryInterceptor(g.unary), grpc.ChainStreamInterceptor(g.stream)), svc, sockLn)
	}
	if o.SSH != nil && o.SSHListen != "none" {
		if err := a.startSSH(o, ident.Identify, g, svc); err != nil {
			return nil, err
		}
	}
	o.Logger.Info("serving", "tailnet", o.Hostname+o.Listen, "socket", o.Socket, "state", o.StateDir)
	return a, nil
}

func (a *Appliance) serve(s *grpc.Server, svc threesv1.ThreesServer, ln net.Listener) {
	threesv1.RegisterThreesServer(s, svc)
	a.servers = append(a.servers, s)
	go func() {
		if err := s.Serve(ln); err != nil && !errors.Is(err, grpc.ErrServerStopped) {
			a.log.Error("serve", "addr", ln.Addr(), "err", err)
		}
	}()
}

// listenSocket makes the admin socket: mode 0660 so root (and a group the admin
// chooses by chgrp) can reach it; peer credentials decide who is admin.
func listenSocket(path string) (net.Listener, error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return nil, fmt.Errorf("socket dir: %w", err)
	}
	// A socket left by a previous run that died blocks the bind.
	if fi, err := os.Lstat(path); err == nil && fi.Mode()&os.ModeSocket != 0 {
		os.Remove(path)
	}
	ln, err := net.Listen("unix", path)
	if err != nil {
		return nil, fmt.Errorf("listen on %s: %w", path, err)
	}
	if err := os.Chmod(path, 0o660); err != nil {
		ln.Close()
		return nil, fmt.Errorf("chmod %s: %w", path, err)
	}
	return ln, nil
}

// probeKernel returns a kernel from the image store, or "" (then hv uses TCG
// rather than trust a KVM it has not seen boot).
func probeKernel(store *images.Store) string {
	imgs, _ := store.List()
	for _, img := range imgs {
		if img.Kernel != "" {
			return img.Kernel
		}
	}
	return ""
}

// Reconcile runs one reconcile pass now; see fleet.Fleet.Reconcile.
func (a *Appliance) Reconcile(ctx context.Context) (fleet.ReconcileReport, error) {
	return a.fleet.Reconcile(ctx)
}

// Tailnet returns the appliance's tailnet node.
func (a *Appliance) Tailnet() *tsnet.Server { return a.ts }

// Close stops serving and releases everything Start opened, last first.
func (a *Appliance) Close() error {
	for _, s := range a.servers {
		s.Stop()
	}
	if a.cancel != nil {
		a.cancel()
	}
	var errs []error
	for _, c := range a.closers {
		errs = append(errs, c())
	}
	// The database first: a cluster member hands leadership over on the tailnet.
	if a.db != nil {
		errs = append(errs, a.db.Close())
	}
	if a.ts != nil {
		errs = append(errs, a.ts.Close())
	}
	if a.hvClose != nil {
		errs = append(errs, a.hvClose())
	}
	return errors.Join(errs...)
}

func newTailnetNode(o Options) *tsnet.Server {
	ts := &tsnet.Server{
		Dir:           filepath.Join(o.StateDir, "tailnet"),
		Hostname:      o.Hostname,
		AuthKey:       o.AuthKey,
		ControlURL:    o.ControlURL,
		AdvertiseTags: o.Tags,
		Ephemeral:     o.Ephemeral,
		Logf:          o.TSLogf,
		UserLogf:      func(f string, args ...any) { o.Logger.Info(fmt.Sprintf(f, args...), "component", "tailnet") },
	}
	if o.Store != nil {
		ts.Store = o.Store
	}
	return ts
}

// ServeAs serves the API on ln treating every caller as who, skipping WhoIs. It exists
// so benchmarks can compare the tailnet path with plain loopback TCP on the very same
// service; nothing in threes serves a network listener this way.
func (a *Appliance) ServeAs(ln net.Listener, who tsauth.Principal) {
	svc := &service{fleet: a.fleet}
	g := &gate{identify: func(context.Context, netip.AddrPort) (tsauth.Principal, error) { return who, nil }, log: a.log}
	a.serve(grpc.NewServer(grpc.ChainUnaryInterceptor(g.unary), grpc.ChainStreamInterceptor(g.stream)), svc, ln)
}

// raftHost is the tailnet IP of the cluster's host called name: its address in
// the database's Raft configuration, where the host's name is its node ID and
// only nodes with the appliance's tag get in (clusterConfig's Admit).
func raftHost(db *embeddb.DB, name string) (netip.Addr, error) {
	peers, err := db.Peers()
	if err != nil {
		return netip.Addr{}, err
	}
	for _, p := range peers {
		if p.ID != name {
			continue
		}
		ap, err := netip.ParseAddrPort(p.Addr)
		if err != nil {
			return netip.Addr{}, fmt.Errorf("raft address %q: %w", p.Addr, err)
		}
		return ap.Addr(), nil
	}
	return netip.Addr{}, errors.New("no host of that name in this cluster's database (threes host list)")
}

// isRaftHost says whether ip is a host of the cluster's database.
func isRaftHost(db *embeddb.DB, ip netip.Addr) bool {
	peers, err := db.Peers()
	if err != nil {
		return false
	}
	for _, p := range peers {
		if ap, err := netip.ParseAddrPort(p.Addr); err == nil && ap.Addr() == ip.Unmap() {
			return true
		}
	}
	return false
}

// RaftPort is the tailnet port a cluster member's database listens on (Raft
// and rqlite's cluster service, which have no authentication of their own:
// only nodes carrying the appliance's tag get through).
const RaftPort = 4002

// clusterConfig puts the database on the tailnet: it brings the node up (a
// member's Raft address is its tailnet IP), listens on RaftPort, dials peers
// over the tailnet only, admits only nodes that carry o.OwnerTag, and resolves
// o.Join to Raft addresses.
func clusterConfig(ctx context.Context, o Options, ts *tsnet.Server, cfg *embeddb.Config) error {
	st, err := ts.Up(ctx)
	if err != nil {
		return fmt.Errorf("join the tailnet before the database: %w", err)
	}
	var self netip.Addr
	for _, ip := range st.TailscaleIPs {
		if ip.Is4() && !self.IsValid() {
			self = ip
		}
	}
	if !self.IsValid() {
		return errors.New("database cluster: this node has no tailnet IPv4 address")
	}
	lc, err := ts.LocalClient()
	if err != nil {
		return fmt.Errorf("tailnet local client: %w", err)
	}
	for _, h := range o.Join {
		addr, err := raftAddr(ctx, lc, h, o.OwnerTag)
		if err != nil {
			return fmt.Errorf("join %q: %w", h, err)
		}
		cfg.Join = append(cfg.Join, addr)
	}
	ln, err := ts.Listen("tcp", fmt.Sprintf(":%d", RaftPort))
	if err != nil {
		return fmt.Errorf("listen on tailnet :%d: %w", RaftPort, err)
	}
	dial := tsauth.TailnetDialer(ts)
	ident := tsauth.NewIdentifier(lc)
	cfg.Listener = ln
	cfg.Advertise = netip.AddrPortFrom(self, RaftPort).String()
	cfg.BootstrapExpect = o.BootstrapExpect
	cfg.Dial = func(ctx context.Context, addr string) (net.Conn, error) { return dial(ctx, "tcp", addr) }
	cfg.Admit = func(ctx context.Context, conn net.Conn) error {
		from, err := netip.ParseAddrPort(conn.RemoteAddr().String())
		if err != nil {
			return err
		}
		who, err := ident.Identify(ctx, from)
		if err != nil {
			return err
		}
		if !slices.Contains(who.Tags, o.OwnerTag) {
			return fmt.Errorf("%s does not carry %s", who, o.OwnerTag)
		}
		return nil
	}
	return nil
}

// raftAddr turns a --join host (a tailnet IP or a node's name, with or without
// a port) into the IP:port Raft uses: rqlite resolves names with the system
// resolver, which knows nothing of the tailnet.
func raftAddr(ctx context.Context, lc *local.Client, h, ownerTag string) (string, error) {
	host, port := h, fmt.Sprint(RaftPort)
	if hp, p, err := net.SplitHostPort(h); err == nil {
		host, port = hp, p
	}
	if ip, err := netip.ParseAddr(host); err == nil {
		return net.JoinHostPort(ip.String(), port), nil
	}
	ip, err := tailnetHost(ctx, lc, host, ownerTag)
	if err != nil {
		return "", err
	}
	return net.JoinHostPort(ip.String(), port), nil
}

// tailnetHost finds the tailnet IPv4 address of the node called name (its host
// name, or its MagicDNS name or that name's first label). A node names itself,
// so a name alone could lead to a stranger's: only nodes that carry the
// appliance's tag count, and the name must be unique among them.
func tailnetHost(ctx context.Context, lc *local.Client, name, ownerTag string) (netip.Addr, error) {
	st, err := lc.Status(ctx)
	if err != nil {
		return netip.Addr{}, fmt.Errorf("tailnet status: %w", err)
	}
	var found []netip.Addr
	for _, p := range st.Peer {
		dns := strings.TrimSuffix(p.DNSName, ".")
		if !strings.EqualFold(p.HostName, name) && !strings.EqualFold(dns, name) &&
			!strings.HasPrefix(strings.ToLower(dns), strings.ToLower(name)+".") {
			continue
		}
		if p.Tags == nil || !slices.Contains(p.Tags.AsSlice(), ownerTag) {
			continue
		}
		for _, ip := range p.TailscaleIPs {
			if ip.Is4() {
				found = append(found, ip)
				break
			}
		}
	}
	switch len(found) {
	case 0:
		return netip.Addr{}, fmt.Errorf("no node of that name with the tag %s on the tailnet", ownerTag)
	case 1:
		return found[0], nil
	}
	return netip.Addr{}, fmt.Errorf("%d nodes with the tag %s go by that name (%v): give a tailnet IP", len(found), ownerTag, found)
}
