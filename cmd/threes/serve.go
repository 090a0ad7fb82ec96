package main

import (
	"fmt"
	"log/slog"
	"os"
	"strings"

	"github.com/spf13/cobra"

	"github.com/threes-dev/threes/appliance"
)

type cmdServe struct {
	opts     appliance.Options
	tags     string
	images   string
	logLevel string
}

func (c *cmdServe) command() *cobra.Command {
	cmd := &cobra.Command{
		Use:     "serve",
		Aliases: []string{"server"},
		Short:   "Run the threes appliance on this host",
		Long: `Run the threes appliance: it joins the tailnet as its own node and serves the API
there (never on an open port), keeps state in an embedded database under --state-dir,
and serves the host's root on a local socket.

Without an auth key the node logs a login URL and joins once someone approves it.`,
		Args: exactArgs(0, ""),
		RunE: c.run,
	}
	f := cmd.Flags()
	o := &c.opts
	f.StringVar(&o.StateDir, "state-dir", "/var/lib/threes", "where the tailnet node and the database keep their state")
	f.StringVar(&o.Hostname, "hostname", "threes", "the appliance's name on the tailnet")
	f.StringVar(&o.AuthKey, "authkey", os.Getenv("TS_AUTHKEY"), "tailnet auth key (default $TS_AUTHKEY)")
	f.StringVar(&o.ControlURL, "control-url", "", "control server URL, e.g. your headscale (default Tailscale's)")
	f.StringVar(&c.tags, "tags", "", "comma-separated ACL tags for the appliance's node, e.g. tag:threes")
	f.StringVarP(&o.Listen, "listen-addr", "l", ":9999", "address for the API on the tailnet (tailnet only)")
	f.StringVar(&o.Socket, "socket", "/run/threes/threes.sock", `local admin socket ("none" for none)`)
	f.StringVarP(&o.CIDR, "cidr", "c", "10.10.0.0/16", "CIDR for VMs' management addresses")
	f.StringVarP(&o.Bridge, "interface", "i", "threes0", "bridge VMs attach to, served by DHCP and metadata")
	f.StringVar(&o.LibvirtURI, "libvirt-uri", "qemu:///system", "libvirt connection URI")
	f.StringVar(&c.images, "images", strings.Join(appliance.DefaultImages, ","), "comma-separated base images VMs may use")
	f.StringVar(&c.logLevel, "log-level", "info", "debug, info, warn or error")
	return cmd
}

func (c *cmdServe) run(cmd *cobra.Command, _ []string) error {
	var level slog.Level
	if err := level.UnmarshalText([]byte(c.logLevel)); err != nil {
		return usagef("--log-level: %q is not debug, info, warn or error", c.logLevel)
	}
	c.opts.Logger = slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level}))
	c.opts.Tags = splitList(c.tags)
	c.opts.Images = splitList(c.images)
	if os.Getenv("TS_AUTHKEY") != "" {
		// The key is in our flags now; keep it out of anything we start.
		os.Unsetenv("TS_AUTHKEY")
	}
	a, err := appliance.Start(cmd.Context(), c.opts)
	if err != nil {
		return fmt.Errorf("serve: %w", err)
	}
	<-cmd.Context().Done()
	c.opts.Logger.Info("shutting down")
	return a.Close()
}

func splitList(s string) []string {
	var out []string
	for _, p := range strings.Split(s, ",") {
		if p = strings.TrimSpace(p); p != "" {
			out = append(out, p)
		}
	}
	return out
}
