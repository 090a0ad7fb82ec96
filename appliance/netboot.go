package appliance

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"net/url"
	"sync"
	"time"

	"github.com/vishvananda/netns"
	"tailscale.com/ipn"

	"github.com/threes-dev/threes/embeddb"
	"github.com/threes-dev/threes/internal/nsdo"
	"github.com/threes-dev/threes/netboot/dhcp"
	"github.com/threes-dev/threes/netboot/ipam"
	"github.com/threes-dev/threes/netboot/metadata"
	"github.com/threes-dev/threes/netboot/neigh"
)

// startNetboot serves DHCP and the metadata endpoint on the bridge, which must exist
// and hold the gateway address. Without it the appliance still runs (the API works,
// VMs are defined) but VMs get no address, so it says so loudly.
func (a *Appliance) startNetboot(ctx context.Context, o Options, pool *ipam.IPAM) error {
	gw := pool.Gateway()
	log := o.Logger.With("bridge", o.Bridge)
	var d *dhcp.Server
	var checker *neigh.Checker
	var ln net.Listener
	var missing error
	src := newMDSource(a.db, o.Now)
	src.phases = a.life.phases
	// The sockets are opened where the bridge is; they stay there afterwards.
	open := func() (err error) {
		if missing = bridgeHas(o.Bridge, gw); missing != nil {
			return nil
		}
		if d, err = dhcp.NewServer(dhcp.ServerConfig{
			Interface: o.Bridge,
			Reply:     dhcp.Config{ServerIP: gw, Prefix: pool.Prefix(), DNS: o.DNS},
			IPAM:      pool,
			Log:       log.With("component", "dhcp"),
			Now:       o.Now,
			OnAck:     a.life.phases.leased,
		}); err != nil {
			return fmt.Errorf("dhcp on %s: %w", o.Bridge, err)
		}
		a.closers = append(a.closers, d.Close)
		if checker, err = neigh.New(neigh.Config{Interface: o.Bridge, PortOf: a.portOf(src)}); err != nil {
			return fmt.Errorf("neighbour check on %s: %w", o.Bridge, err)
		}
		a.closers = append(a.closers, checker.Close)
		if ln, err = net.Listen("tcp", netip.AddrPortFrom(gw, metadataPort).String()); err != nil {
			return fmt.Errorf("metadata server on %s: %w", gw, err)
		}
		a.closers = append(a.closers, ln.Close)
		return nil
	}
	var err error
	if o.BridgeNetNS == "" {
		err = open()
	} else {
		ns, nerr := netns.GetFromName(o.BridgeNetNS)
		if nerr != nil {
			return fmt.Errorf("bridge namespace %s: %w", o.BridgeNetNS, nerr)
		}
		err = nsdo.Do(ns, open)
		ns.Close()
	}
	if err != nil {
		return err
	}
	if missing != nil {
		log.Warn("no DHCP or metadata for VMs: create the bridge with the gateway address (see README)", "gateway", gw, "err", missing)
		return nil
	}
	md, err := metadata.New(metadata.Config{
		Source:     src,
		IPAM:       pool,
		ControlURL: guestControlURL(o.ControlURL),
		Neighbours: checker,
		Log:        log.With("component", "metadata"),
		Now:        o.Now,

		RequireSession: o.MetadataSession,
	})
	if err != nil {
		return fmt.Errorf("metadata server: %w", err)
	}
	go logExit(log, "dhcp", func() error { return d.Serve(ctx) })
	go logExit(log, "metadata", func() error { return md.Serve(ctx, ln) })
	log.Info("serving DHCP and metadata", "gateway", gw, "range", pool.Prefix())
	return nil
}

// metadataPort is where the metadata server listens on the gateway.
const metadataPort = 80

// noCloudURL is the NoCloud seed URL hv puts in each VM's SMBIOS serial (and
// a kernel image's command line): the metadata server on pool's gateway.
func noCloudURL(pool *ipam.IPAM) *url.URL {
	return metadata.NoCloudURL(netip.AddrPortFrom(pool.Gateway(), metadataPort))
}

// guestControlURL is the control server guests are told to join: empty for
// Tailscale's own (under any of its names), so a guest's tailscale uses its
// default rather than a spelling of it.
func guestControlURL(u string) string {
	if ipn.IsLoginServerSynonym(u) {
		return ""
	}
	return u
}

// portNamer is a hypervisor that plugs each VM into a bridge port of its own
// name (QEMU's taps; libvirt's test driver has none).
type portNamer interface{ Port(id string) string }

// portOf tells the neighbour check which bridge port the VM at ip is plugged
// into, so that a VM forging another's MAC and IP is refused: the bridge learns
// a MAC on the port its frames really came from. Nil without named ports.
func (a *Appliance) portOf(src *mdSource) func(netip.Addr, net.HardwareAddr) string {
	pn, ok := a.hv.(portNamer)
	if !ok {
		return nil
	}
	return func(ip netip.Addr, _ net.HardwareAddr) string {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		// lookup, not ByIP: the request is not served yet, and may be refused.
		in, err := src.lookup(ctx, ip)
		if err != nil {
			// No VM there: the request is refused by the source anyway.
			return ""
		}
		return pn.Port(in.ID)
	}
}

func logExit(log *slog.Logger, what string, serve func() error) {
	if err := serve(); err != nil && !errors.Is(err, context.Canceled) && !errors.Is(err, net.ErrClosed) {
		log.Error(what+" stopped", "err", err)
	}
}

// bridgeHas checks that the named interface exists and holds addr.
func bridgeHas(name string, addr netip.Addr) error {
	iface, err := net.InterfaceByName(name)
	if err != nil {
		return err
	}
	addrs, err := iface.Addrs()
	if err != nil {
		return err
	}
	for _, a := range addrs {
		if p, err := netip.ParsePrefix(a.String()); err == nil && p.Addr() == addr {
			return nil
		}
	}
	return fmt.Errorf("%s does not hold %s", name, addr)
}

// mdSource is the database as the metadata server sees it: live VMs by address,
// from a per-VM cache. A VM's entry is current while the database's VMGen for it
// stays what it was when the entry was read, so a request costs no database read
// (let alone a round trip to the Raft leader) until this appliance writes something
// about that VM; every write about a VM goes through this appliance's database.
type mdSource struct {
	db  *embeddb.DB
	now func() time.Time
	// phases hears which VMs read their config and took their key (nil: nobody).
	phases *phaseRecorder

	mu     sync.RWMutex
	byIP   map[netip.Addr]mdEntry
	served map[string]bool // VM IDs whose auth key was handed out: that never reverts
}

type mdEntry struct {
	inst metadata.Instance
	gen  uint64 // db.VMGen(inst.ID) before the entry was read
}

func newMDSource(db *embeddb.DB, now func() time.Time) *mdSource {
	return &mdSource{db: db, now: now, byIP: map[netip.Addr]mdEntry{}, served: map[string]bool{}}
}

// ByIP is the metadata server's lookup, made once the request passed its checks:
// the VM is reading its config.
func (s *mdSource) ByIP(ctx context.Context, ip netip.Addr) (metadata.Instance, error) {
	in, err := s.lookup(ctx, ip)
	if err == nil {
		s.phases.mark(in.ID, PhaseConfigFetched, s.now, "")
	}
	return in, err
}

// lookup returns the live VM at ip, from the cache while it is current.
func (s *mdSource) lookup(ctx context.Context, ip netip.Addr) (metadata.Instance, error) {
	s.mu.RLock()
	e, ok := s.byIP[ip]
	s.mu.RUnlock()
	if ok && s.db.VMGen(e.inst.ID) == e.gen {
		return e.inst, nil
	}
	in, gen, err := s.read(ctx, ip)
	if err != nil {
		return in, err
	}
	// Kept only if nothing was written about the VM while it was read: a write
	// that raced the read changed VMGen, and the next request reads again.
	if s.db.VMGen(in.ID) == gen {
		s.mu.Lock()
		s.byIP[ip] = mdEntry{inst: in, gen: gen}
		s.mu.Unlock()
	}
	return in, nil
}

// read reads the VM at ip from the database, with the VMGen it had before.
func (s *mdSource) read(ctx context.Context, ip netip.Addr) (metadata.Instance, uint64, error) {
	addr, err := s.db.AddressByIP(ctx, ip)
	if err != nil {
		return metadata.Instance{}, 0, notFound(err)
	}
	// Taken before the VM's rows are read. If the address changed hands since it
	// was read, its old VM was purged: that read below fails, or it comes after
	// the purge changed the gen, and the entry is not kept.
	gen := s.db.VMGen(addr.VMID)
	vm, err := s.db.GetVM(ctx, addr.VMID)
	if err != nil {
		return metadata.Instance{}, 0, notFound(err)
	}
	if !vm.DeletedAt.IsZero() {
		return metadata.Instance{}, 0, fmt.Errorf("vm %s is deleted: %w", vm.ID, metadata.ErrNotFound)
	}
	cfg, err := s.db.GetVMConfig(ctx, vm.ID)
	if err != nil {
		return metadata.Instance{}, 0, notFound(err)
	}
	kvs, err := s.db.GetKVs(ctx, vm.ID)
	if err != nil {
		return metadata.Instance{}, 0, notFound(err)
	}
	in := metadata.Instance{ID: vm.ID, Hostname: cfg.Hostname, Script: cfg.Script, PublicKey: cfg.PublicKey}
	for _, kv := range kvs {
		in.KVs = append(in.KVs, metadata.KV{Key: kv.Key, Value: kv.Value, Secret: kv.Secret})
	}
	return in, gen, nil
}

// TakeAuthKey hands the key out through the database's conditional write, which
// makes it once only, on every node; a key known served is refused without a write.
func (s *mdSource) TakeAuthKey(ctx context.Context, vmID string) (string, error) {
	s.mu.RLock()
	served := s.served[vmID]
	s.mu.RUnlock()
	if served {
		s.phases.mark(vmID, PhaseKeyTaken, s.now, keyTakenAlready)
		return "", metadata.ErrAuthKeyTaken
	}
	key, err := s.db.TakeAuthKey(ctx, vmID, s.now())
	if err == nil || errors.Is(err, embeddb.ErrAlreadyServed) {
		s.mu.Lock()
		s.served[vmID] = true
		s.mu.Unlock()
	}
	switch {
	case err == nil && key != "":
		s.phases.mark(vmID, PhaseKeyTaken, s.now, "")
	case errors.Is(err, embeddb.ErrAlreadyServed):
		// Kept only if this VM never took it: a VM that joined and asks again
		// (a reboot) keeps its key_taken.
		s.phases.mark(vmID, PhaseKeyTaken, s.now, keyTakenAlready)
	}
	switch {
	case errors.Is(err, embeddb.ErrAlreadyServed):
		return "", metadata.ErrAuthKeyTaken
	case err != nil:
		return "", notFound(err)
	case key == "":
		return "", fmt.Errorf("vm %s has no auth key (no control plane configured): %w", vmID, metadata.ErrNotFound)
	}
	return key, nil
}

// keyTakenAlready is the key_taken phase's error when a VM asks for its key after it
// was handed out, to it before or to whoever asked first.
const keyTakenAlready = "the vm asked for its auth key after it had already been taken"

func notFound(err error) error {
	if errors.Is(err, embeddb.ErrNotFound) {
		return fmt.Errorf("%w: %w", metadata.ErrNotFound, err)
	}
	return err
}
