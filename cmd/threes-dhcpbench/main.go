// Command threes-dhcpbench runs threes' DHCP server alone on a named
// interface, with the IPAM preloaded from a file of MACs (one per line), so
// any DHCP load generator can be pointed at it. With -metadata it also
// serves the metadata server on that interface's network, from an in-memory
// source, with the neighbour check on or off, for HTTP load generators.
//
// It is a benchmark entry point, not part of the appliance: nothing is
// persisted.
package main

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"log"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/threes-dev/threes/netboot/dhcp"
	"github.com/threes-dev/threes/netboot/ipam"
	"github.com/threes-dev/threes/netboot/metadata"
	"github.com/threes-dev/threes/netboot/neigh"
)

func main() {
	var (
		iface     = flag.String("i", "", "interface to serve DHCP on (required)")
		macs      = flag.String("macs", "", "file of MACs, one per line, to preload into the IPAM (required)")
		cidr      = flag.String("cidr", ipam.DefaultPrefix.String(), "network to hand addresses out of; the gateway is its first address")
		lease     = flag.Duration("lease", time.Hour, "lease time")
		burst     = flag.Int("rate-burst", dhcp.DefaultRateLimit.Burst, "per-MAC packet burst; 0 turns the rate limit off")
		every     = flag.Duration("rate-every", dhcp.DefaultRateLimit.Every, "per-MAC time to earn one packet back")
		workers   = flag.Int("workers", 0, "socket reader goroutines; GOMAXPROCS when 0")
		allocsOut = flag.String("allocs-out", "", "write 'MAC IP' per allocation to this file")
		meta      = flag.String("metadata", "", "also serve metadata on this address (e.g. 10.10.0.1:80)")
		neighOn   = flag.Bool("neigh", true, "check the neighbour table on each metadata request")
		probe     = flag.String("neigh-probe", "unsure", "when the check sends ARP probes: unsure, never or always")
		statsOut  = flag.String("stats", "", "write the DHCP counters as JSON to this file on exit")
	)
	flag.Parse()
	if *iface == "" || *macs == "" {
		flag.Usage()
		os.Exit(2)
	}
	modes := map[string]neigh.Probe{"unsure": neigh.ProbeUnsure, "never": neigh.ProbeNever, "always": neigh.ProbeAlways}
	pm, ok := modes[*probe]
	if !ok {
		log.Fatalf("-neigh-probe %q: want unsure, never or always", *probe)
	}
	if err := run(*iface, *macs, *cidr, *lease, dhcp.RateLimit{Burst: *burst, Every: *every}, *workers, *allocsOut, *meta, *neighOn, pm, *statsOut); err != nil {
		log.Fatal(err)
	}
}

func run(iface, macFile, cidr string, lease time.Duration, rl dhcp.RateLimit, workers int, allocsOut, metaAddr string, neighOn bool, probe neigh.Probe, statsOut string) error {
	prefix, err := netip.ParsePrefix(cidr)
	if err != nil {
		return fmt.Errorf("parse -cidr %s: %w", cidr, err)
	}
	im, err := ipam.New(ipam.Config{Prefix: prefix}, nil)
	if err != nil {
		return err
	}
	n, err := preload(im, macFile)
	if err != nil {
		return err
	}
	if allocsOut != "" {
		if err := writeAllocs(im, allocsOut); err != nil {
			return err
		}
	}
	if rl.Burst == 0 {
		rl.Burst = -1 // zero means default in dhcp.RateLimit; here it means off
	}
	logger := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
	srv, err := dhcp.NewServer(dhcp.ServerConfig{
		Interface: iface,
		Reply:     dhcp.Config{ServerIP: im.Gateway(), Prefix: im.Prefix(), DNS: []netip.Addr{im.Gateway()}, LeaseTime: lease},
		IPAM:      im,
		RateLimit: rl,
		Workers:   workers,
		Log:       logger,
		// perfdhcp speaks as a relay agent for its many clients; the
		// appliance leaves relays off.
		Relays: true,
	})
	if err != nil {
		return err
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	errc := make(chan error, 2)
	go func() { errc <- srv.Serve(ctx) }()
	if metaAddr != "" {
		go func() { errc <- serveMetadata(ctx, im, iface, metaAddr, neighOn, probe, logger) }()
	}
	fmt.Fprintf(os.Stderr, "threes-dhcpbench: serving %d MACs in %s on %s (metadata %q, neighbour check %v)\n", n, im.Prefix(), iface, metaAddr, neighOn)
	select {
	case <-ctx.Done():
	case err = <-errc:
	}
	stop()
	srv.Close()
	stats := srv.Stats()
	b, _ := json.Marshal(stats)
	fmt.Fprintf(os.Stderr, "threes-dhcpbench: %s\n", b)
	if statsOut != "" {
		if werr := os.WriteFile(statsOut, append(b, '\n'), 0o644); werr != nil && err == nil {
			err = werr
		}
	}
	return err
}

func preload(im *ipam.IPAM, path string) (int, error) {
	f, err := os.Open(path)
	if err != nil {
		return 0, fmt.Errorf("open mac list: %w", err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	n := 0
	for line := 1; sc.Scan(); line++ {
		s := strings.TrimSpace(sc.Text())
		if s == "" || strings.HasPrefix(s, "#") {
			continue
		}
		mac, err := ipam.ParseMAC(s)
		if err != nil {
			return n, fmt.Errorf("%s:%d: %w", path, line, err)
		}
		if _, err := im.Reserve(mac, fmt.Sprintf("bench-%d", n)); err != nil {
			if errors.Is(err, ipam.ErrExists) {
				continue
			}
			return n, fmt.Errorf("%s:%d: %w", path, line, err)
		}
		im.Commit(mac)
		n++
	}
	return n, sc.Err()
}

func writeAllocs(im *ipam.IPAM, path string) error {
	f, err := os.Create(path)
	if err != nil {
		return fmt.Errorf("write allocations: %w", err)
	}
	w := bufio.NewWriter(f)
	for _, a := range im.All() {
		fmt.Fprintf(w, "%s %s\n", a.MAC, a.IP)
	}
	if err := w.Flush(); err != nil {
		f.Close()
		return fmt.Errorf("write allocations: %w", err)
	}
	return f.Close()
}

// benchSource serves every allocated VM the same small config.
type benchSource struct{ im *ipam.IPAM }

func (b benchSource) ByIP(_ context.Context, ip netip.Addr) (metadata.Instance, error) {
	a, ok := b.im.ByIP(ip)
	if !ok {
		return metadata.Instance{}, metadata.ErrNotFound
	}
	return metadata.Instance{ID: a.MAC.String(), Hostname: a.Hostname, Script: "#!/bin/sh\ntrue\n"}, nil
}

func (b benchSource) TakeAuthKey(context.Context, string) (string, error) {
	return "", metadata.ErrAuthKeyTaken
}

func serveMetadata(ctx context.Context, im *ipam.IPAM, iface, addr string, neighOn bool, probe neigh.Probe, logger *slog.Logger) error {
	cfg := metadata.Config{Source: benchSource{im}, IPAM: im, Log: logger}
	if neighOn {
		chk, err := neigh.New(neigh.Config{Interface: iface, Probe: probe})
		if err != nil {
			return err
		}
		defer chk.Close()
		cfg.Neighbours = chk
	}
	s, err := metadata.New(cfg)
	if err != nil {
		return err
	}
	ln, err := net.Listen("tcp4", addr)
	if err != nil {
		return fmt.Errorf("listen metadata on %s: %w", addr, err)
	}
	return s.Serve(ctx, ln)
}
