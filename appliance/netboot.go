package appliance

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"net/url"
	"time"

	"github.com/vishvananda/netns"
	"tailscale.com/ipn"

	"github.com/threes-dev/threes/appliance/fleet"
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
	src := a.fleet.MetadataSource()
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
			OnAck:     a.fleet.Leased,
		}); err != nil {
			return fmt.Errorf("dhcp on %s: %w", o.Bridge, err)
		}
		a.closers = append(a.closers, d.Close)
		if checker, err = neigh.New(neigh.Config{Interface: o.Bridge, PortOf: a.portOf(src)}); err != nil {
			return fmt.Errorf("neighbour check on %s: %w", o.Bridge, err)
		}
		a.closers = append(a.closers, checker.Close)
		if ln, err = net.Listen("tcp", netip.AddrPortFrom(gw, o.MetadataPort).String()); err != nil {
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

// noCloudURL is the NoCloud seed URL hv puts in each VM's SMBIOS serial (and
// a kernel image's command line): the metadata server on pool's gateway.
func noCloudURL(pool *ipam.IPAM, port uint16) *url.URL {
	return metadata.NoCloudURL(netip.AddrPortFrom(pool.Gateway(), port))
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
func (a *Appliance) portOf(src *fleet.MetadataSource) func(netip.Addr, net.HardwareAddr) string {
	pn, ok := a.hv.(portNamer)
	if !ok {
		return nil
	}
	return func(ip netip.Addr, _ net.HardwareAddr) string {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		// Lookup, not ByIP: the request is not served yet, and may be refused.
		in, err := src.Lookup(ctx, ip)
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
