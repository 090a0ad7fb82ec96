package main

import (
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"strings"

	"github.com/spf13/cobra"

	"github.com/threes-dev/threes/appliance"
	"github.com/threes-dev/threes/appliance/fleet"
	"github.com/threes-dev/threes/tsauth/control"
	"github.com/threes-dev/threes/tsauth/policy"
)

type cmdServe struct {
	opts      appliance.Options
	tags      string
	logLevel  string
	logUpload bool

	// The control plane the appliance edits: Tailscale's API or headscale's.
	tailnet           string
	apiURL            string
	apiKey            string
	oauthClientID     string
	oauthClientSecret string
	headscaleAPIKey   string
	headscale         bool
	sshAdmins         string
	dns               string
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
	f.StringVar(&o.StateDir, "state-dir", appliance.DefaultStateDir, "where the tailnet node and the database keep their state")
	f.StringVar(&o.Hostname, "hostname", appliance.DefaultHostname, "the appliance's name on the tailnet")
	f.StringVar(&o.AuthKey, "authkey", os.Getenv("TS_AUTHKEY"), "tailnet auth key (default $TS_AUTHKEY)")
	f.StringVar(&o.ControlURL, "control-url", "", "control server URL, e.g. your headscale (default Tailscale's)")
	f.StringVar(&c.tags, "tags", "", "comma-separated ACL tags for the appliance's node, e.g. tag:threes")
	f.StringVarP(&o.Listen, "listen-addr", "l", appliance.DefaultListen, "address for the API on the tailnet (tailnet only)")
	f.StringVar(&o.Socket, "socket", appliance.DefaultSocket, `local admin socket ("none" for none)`)
	f.StringVar(&o.SSHListen, "ssh-listen", appliance.DefaultSSHListen, `address for SSH on the tailnet (tailnet only; "none" for none)`)
	f.StringVarP(&o.CIDR, "cidr", "c", appliance.DefaultCIDR(), "CIDR for VMs' management addresses")
	f.StringVarP(&o.Bridge, "interface", "i", appliance.DefaultBridge, "bridge VMs attach to, served by DHCP and metadata")
	f.StringVar(&o.LibvirtURI, "libvirt-uri", appliance.DefaultLibvirtURI, "libvirt connection URI")
	f.StringVar(&c.dns, "dns", "", "comma-separated name servers DHCP hands to VMs")
	f.BoolVar(&o.CrossNetwork, "cross-network", false, "let VMs of different networks reach each other on the bridge (default: only over the tailnet, where the policy applies)")
	f.Float64Var(&o.DiskOvercommit, "disk-overcommit", 1, "how many times its free space the VMs' thin disks may promise (1: every disk can fill up; 0: no check); 1 GiB stays free for the database")
	f.IntVar(&o.Capacity.VCPUs, "vcpus", 0, "CPUs this host offers VMs, before overcommit (0: the machine's)")
	f.IntVar(&o.Capacity.MemoryMiB, "memory-mib", 0, "memory in MiB this host offers VMs, before overcommit (0: the machine's)")
	f.Float64Var(&o.Capacity.CPUOvercommit, "cpu-overcommit", appliance.DefaultCPUOvercommit, "how many times over the VMs' vCPUs may promise --vcpus")
	f.Float64Var(&o.Capacity.MemoryOvercommit, "memory-overcommit", appliance.DefaultMemoryOvercommit, "how many times over the VMs' memory may promise --memory-mib")
	f.Uint16Var(&o.MetadataPort, "metadata-port", appliance.DefaultMetadataPort, "TCP port of the metadata server on the bridge's gateway address (guests find it in their cloud-init seed URL)")
	f.BoolVar(&o.MetadataSession, "metadata-session", false, "require a session token (PUT /v1/session) on every /v1 metadata request")
	f.StringSliceVar(&o.Join, "join", nil, "comma-separated hosts (tailnet IPs or names) of the cluster to join; the database then runs on the tailnet, port 4002, open to nodes with the appliance's tag only")
	f.IntVar(&o.BootstrapExpect, "bootstrap-expect", 0, "form a new cluster of this many hosts with those in --join (1: a cluster of this host alone that others can --join)")
	f.StringVar(&c.opts.BridgeNetNS, "bridge-netns", "", "network namespace (as ip netns names it) holding the bridge, if not the host's")
	f.StringVar(&c.logLevel, "log-level", "info", "debug, info, warn or error")
	f.BoolVar(&c.logUpload, "tailscale-log-upload", true, "let the tailnet node upload its logs to Tailscale's log service (default: only when --control-url is Tailscale's)")
	f.DurationVar(&c.opts.ReconcileInterval, "reconcile-interval", fleet.DefaultReconcileInterval, "how often to converge libvirt and the disks with the database")

	f.StringVarP(&c.tailnet, "tailnet", "n", "", `Tailscale tailnet whose policy, keys and devices threes manages ("-" for the credential's own)`)
	f.StringVarP(&c.apiKey, "token", "t", "", "Tailscale API access token (default $TS_API_KEY; an OAuth client is better: it does not expire)")
	f.StringVar(&c.oauthClientID, "oauth-client-id", os.Getenv("TS_OAUTH_CLIENT_ID"), "Tailscale OAuth client ID (default $TS_OAUTH_CLIENT_ID)")
	f.StringVar(&c.apiURL, "api-url", "", "Tailscale API URL (default Tailscale's)")
	f.StringVar(&c.sshAdmins, "ssh-admins", "", "comma-separated users or groups who may SSH into VMs (default autogroup:admin on Tailscale, autogroup:member on headscale)")
	f.BoolVar(&c.headscale, "headscale", false, "--control-url is a headscale server: manage it through its API with $HEADSCALE_API_KEY")
	return cmd
}

// plane builds the control-plane backend the flags ask for, or none. Secrets come
// from the environment so they stay out of the process list.
func (c *cmdServe) plane() (control.Plane, error) {
	pol := policy.Options{OwnerTag: c.opts.OwnerTag, Admins: splitList(c.sshAdmins)}
	if c.apiKey == "" {
		c.apiKey = os.Getenv("TS_API_KEY")
	}
	c.oauthClientSecret = os.Getenv("TS_OAUTH_CLIENT_SECRET")
	c.headscaleAPIKey = os.Getenv("HEADSCALE_API_KEY")
	switch {
	case c.headscale && c.tailnet != "":
		return nil, usagef("--headscale and --tailnet: pick one control plane")
	case c.headscale:
		if c.opts.ControlURL == "" || c.headscaleAPIKey == "" {
			return nil, usagef("--headscale needs --control-url and $HEADSCALE_API_KEY")
		}
		return control.NewHeadscale(control.HeadscaleConfig{URL: c.opts.ControlURL, APIKey: control.NewSecret(c.headscaleAPIKey), Policy: pol})
	case c.tailnet != "":
		if c.apiKey == "" && (c.oauthClientID == "" || c.oauthClientSecret == "") {
			return nil, usagef("--tailnet needs $TS_API_KEY (or -t), or --oauth-client-id with $TS_OAUTH_CLIENT_SECRET")
		}
		return control.NewTailscale(control.TailscaleConfig{
			BaseURL: c.apiURL, Tailnet: c.tailnet, APIKey: control.NewSecret(c.apiKey),
			OAuthClientID: c.oauthClientID, OAuthClientSecret: control.NewSecret(c.oauthClientSecret), Policy: pol,
		})
	}
	return nil, nil
}

func (c *cmdServe) run(cmd *cobra.Command, _ []string) error {
	var level slog.Level
	if err := level.UnmarshalText([]byte(c.logLevel)); err != nil {
		return usagef("--log-level: %q is not debug, info, warn or error", c.logLevel)
	}
	logger, restore, err := routeStderr(level)
	if err != nil {
		return err
	}
	defer restore()
	c.opts.Logger = logger
	upload := tailscaleLogUpload(c.opts.ControlURL, cmd.Flags().Changed("tailscale-log-upload"), c.logUpload)
	setTailscaleLogUpload(upload)
	logger.Info("tailnet node's log upload to Tailscale's log service (--tailscale-log-upload)", "on", upload)
	for flag, env := range map[string]string{"authkey": "TS_AUTHKEY", "token": "TS_API_KEY"} {
		if cmd.Flags().Changed(flag) {
			logger.Warn("a secret given as a flag shows in the process list to every user of this host: set $"+env+" instead", "flag", "--"+flag)
		}
	}
	for flag, v := range map[string]float64{"vcpus": float64(c.opts.Capacity.VCPUs), "memory-mib": float64(c.opts.Capacity.MemoryMiB),
		"cpu-overcommit": c.opts.Capacity.CPUOvercommit, "memory-overcommit": c.opts.Capacity.MemoryOvercommit} {
		if v < 0 {
			return usagef("--%s: %v is negative", flag, v)
		}
	}
	c.opts.Tags = splitList(c.tags)
	for _, d := range splitList(c.dns) {
		ip, err := netip.ParseAddr(d)
		if err != nil {
			return usagef("--dns: %q is not an IP address", d)
		}
		c.opts.DNS = append(c.opts.DNS, ip)
	}
	c.opts.OwnerTag = fleet.DefaultOwnerTag
	if len(c.opts.Tags) > 0 {
		c.opts.OwnerTag = c.opts.Tags[0]
	}
	plane, err := c.plane()
	if err != nil {
		return err
	}
	if plane != nil {
		c.opts.Plane = plane
	}
	// The credentials are in our hands now; keep them out of anything we start.
	for _, k := range []string{"TS_AUTHKEY", "TS_API_KEY", "TS_OAUTH_CLIENT_SECRET", "HEADSCALE_API_KEY"} {
		os.Unsetenv(k)
	}
	// SSH sessions run this very command tree, as their callers.
	c.opts.SSH = sshRun
	a, err := appliance.Start(cmd.Context(), c.opts)
	if err != nil {
		return fmt.Errorf("serve: %w", err)
	}
	go watchLogin(cmd.Context(), a.Tailnet(), c.opts.ControlURL, c.opts.Logger)
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
