// Package guard keeps VMs from spoofing one another on the bridge: for each
// VM's tap device it lets out only Ethernet frames from the VM's own MAC,
// IPv4 packets from its own address (and DHCP's 0.0.0.0), and ARP that
// claims nothing else. Everything else a VM sends, IPv6 and VLAN tags
// included, is dropped; what reaches a VM is not filtered.
//
// The rules live in one nftables table of the bridge family, written with
// nft(8) in atomic batches: one batch per change, whatever the number of
// rules. That is why threes does this itself rather than use libvirt's
// clean-traffic nwfilter, which runs a hundred-odd iptables and ebtables
// commands each time a VM starts. Rules match the tap by name, so they can
// be set before the VM starts, hold across its restarts, and a tap that
// has the table's prefix but no rules of its own gets nothing through.
//
// It does not own the bridge or the taps: libvirt makes the taps, named by
// DevName, and the caller says which VM has which.
package guard

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/base32"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os/exec"
	"regexp"
	"strings"
	"sync"
)

// Port is one VM's NIC as the bridge sees it.
type Port struct {
	// Dev is the tap device's name; it must start with the Table's
	// prefix.
	Dev string
	// MAC is the only source MAC the VM may use.
	MAC net.HardwareAddr
	// IP is the only IPv4 source (and ARP sender) address the VM may
	// use. The zero Addr lets any IPv4 source through; MACs are still
	// enforced.
	IP netip.Addr
}

// Table is one nftables table of anti-spoofing rules. It is safe for
// concurrent use.
type Table struct {
	name   string
	prefix string
	// run feeds a script to nft -f -; tests and namespaces swap it.
	run func(ctx context.Context, script string) error

	// mu serialises batches: each rewrites the shared dispatch chain.
	mu sync.Mutex
}

// Config says which table a Table writes and how.
type Config struct {
	// Name is the nftables table's name in the bridge family, e.g.
	// "threes"; letters, digits and underscores.
	Name string
	// Prefix starts the name of every tap this table guards; a tap with
	// the prefix and no Port is cut off. At most 4 characters so that
	// DevName has room for the VM's part.
	Prefix string
	// Run runs nft with the script on its standard input; nil runs
	// "nft -f -" in this process's network namespace.
	Run func(ctx context.Context, script string) error
}

var nameRE = regexp.MustCompile(`^[a-zA-Z][a-zA-Z0-9_]{0,30}$`)

// devRE is what a tap name may look like: it ends up in the script.
var devRE = regexp.MustCompile(`^[a-zA-Z0-9]{1,15}$`)

// New returns the Table cfg describes; it changes nothing yet.
func New(cfg Config) (*Table, error) {
	if !nameRE.MatchString(cfg.Name) {
		return nil, fmt.Errorf("guard table name %q: want a letter then up to 30 letters, digits or underscores", cfg.Name)
	}
	if len(cfg.Prefix) == 0 || len(cfg.Prefix) > 4 || !devRE.MatchString(cfg.Prefix) {
		return nil, fmt.Errorf("guard device prefix %q: want 1-4 letters or digits", cfg.Prefix)
	}
	t := &Table{name: cfg.Name, prefix: cfg.Prefix, run: cfg.Run}
	if t.run == nil {
		t.run = RunNFT
	}
	return t, nil
}

// RunNFT feeds script to "nft -f -" in this process's network namespace.
func RunNFT(ctx context.Context, script string) error {
	var stderr bytes.Buffer
	cmd := exec.CommandContext(ctx, "nft", "-f", "-")
	cmd.Stdin = strings.NewReader(script)
	cmd.Stderr = &stderr
	if err := cmd.Run(); err != nil {
		if errors.Is(err, exec.ErrNotFound) {
			return fmt.Errorf("nft not found: install the nftables package: %w", err)
		}
		msg := strings.TrimSpace(stderr.String())
		if msg == "" {
			msg = err.Error()
		}
		return fmt.Errorf("nft: %s", msg)
	}
	return nil
}

// DevName returns the tap name for the VM id under prefix: the prefix and
// a hash of the ID, 15 characters in all as Linux allows.
func DevName(prefix, id string) string {
	sum := sha256.Sum256([]byte(id))
	enc := base32.StdEncoding.WithPadding(base32.NoPadding).EncodeToString(sum[:])
	return prefix + strings.ToLower(enc[:15-len(prefix)])
}

// Prefix returns the prefix of the taps t guards.
func (t *Table) Prefix() string { return t.prefix }

// Sync replaces the whole table, in one step, by one that guards exactly
// ports; a tap that has the prefix but is not among them gets nothing
// through.
func (t *Table) Sync(ctx context.Context, ports []Port) error {
	var b strings.Builder
	// "add" first makes the delete work on a host without the table.
	fmt.Fprintf(&b, "add table bridge %s\ndelete table bridge %s\n", t.name, t.name)
	t.skeleton(&b)
	for _, p := range ports {
		if err := t.port(&b, p); err != nil {
			return err
		}
	}
	return t.apply(ctx, "sync", b.String())
}

// Set guards p, replacing whatever rules its tap had, and creates the table
// if it is missing (as after a reboot, or a firewall that flushed every
// table).
func (t *Table) Set(ctx context.Context, p Port) error {
	var b strings.Builder
	t.skeleton(&b)
	if err := t.port(&b, p); err != nil {
		return err
	}
	return t.apply(ctx, "set "+p.Dev, b.String())
}

// Delete drops the rules of the tap dev; a tap with the prefix then gets
// nothing through. Deleting a tap that has no rules is not an error.
func (t *Table) Delete(ctx context.Context, dev string) error {
	if err := t.checkDev(dev); err != nil {
		return err
	}
	var b strings.Builder
	t.skeleton(&b)
	// Adding first makes both deletes succeed when dev had no rules.
	c := chainOf(dev)
	fmt.Fprintf(&b, "add chain bridge %s %s\n", t.name, c)
	fmt.Fprintf(&b, "add element bridge %s ports { %q : goto %s }\n", t.name, dev, c)
	fmt.Fprintf(&b, "delete element bridge %s ports { %q }\n", t.name, dev)
	fmt.Fprintf(&b, "delete chain bridge %s %s\n", t.name, c)
	return t.apply(ctx, "delete "+dev, b.String())
}

func (t *Table) apply(ctx context.Context, what, script string) error {
	t.mu.Lock()
	defer t.mu.Unlock()
	if err := t.run(ctx, script); err != nil {
		return fmt.Errorf("guard table %s: %s: %w", t.name, what, err)
	}
	return nil
}

// skeleton writes, idempotently, the table, its map from tap to chain and
// the base chain that dispatches through it. The base chain is flushed and
// refilled so that running this again never duplicates its rules.
func (t *Table) skeleton(b *strings.Builder) {
	n := t.name
	fmt.Fprintf(b, "add table bridge %s\n", n)
	fmt.Fprintf(b, "add map bridge %s ports { type ifname : verdict ; }\n", n)
	// Before anything else on the bridge, including the host's own
	// input: the metadata server must see only honest sources too.
	fmt.Fprintf(b, "add chain bridge %s from_vm { type filter hook prerouting priority -300 ; policy accept ; }\n", n)
	fmt.Fprintf(b, "flush chain bridge %s from_vm\n", n)
	fmt.Fprintf(b, "add rule bridge %s from_vm iifname vmap @ports\n", n)
	fmt.Fprintf(b, "add rule bridge %s from_vm iifname %q counter drop\n", n, t.prefix+"*")
}

// port writes the chain of p's tap, replacing any it had, and maps the tap
// to it.
func (t *Table) port(b *strings.Builder, p Port) error {
	if err := t.checkDev(p.Dev); err != nil {
		return err
	}
	if len(p.MAC) != 6 {
		return fmt.Errorf("guard tap %s: MAC %q is not a 6-byte MAC address", p.Dev, p.MAC)
	}
	if p.IP.IsValid() && !p.IP.Is4() {
		return fmt.Errorf("guard tap %s: IP %s is not IPv4", p.Dev, p.IP)
	}
	n, c, mac := t.name, chainOf(p.Dev), p.MAC.String()
	fmt.Fprintf(b, "add chain bridge %s %s\n", n, c)
	fmt.Fprintf(b, "flush chain bridge %s %s\n", n, c)
	rule := func(r string) { fmt.Fprintf(b, "add rule bridge %s %s %s\n", n, c, r) }
	rule("ether saddr != " + mac + " counter drop")
	rule("ether type arp arp saddr ether != " + mac + " counter drop")
	if p.IP.IsValid() {
		// 0.0.0.0 is what an address probe (RFC 5227) claims.
		rule("ether type arp arp saddr ip != { " + p.IP.String() + ", 0.0.0.0 } counter drop")
	}
	rule("ether type arp accept")
	if p.IP.IsValid() {
		// A DHCP client has no address until it is offered one.
		rule("ip saddr 0.0.0.0 ip daddr 255.255.255.255 udp sport 68 udp dport 67 accept")
		rule("ip saddr != " + p.IP.String() + " counter drop")
	}
	rule("ether type ip accept")
	rule("counter drop")
	fmt.Fprintf(b, "add element bridge %s ports { %q : goto %s }\n", n, p.Dev, c)
	return nil
}

func (t *Table) checkDev(dev string) error {
	if !devRE.MatchString(dev) || !strings.HasPrefix(dev, t.prefix) {
		return fmt.Errorf("guard tap %q: want up to 15 letters or digits starting with %q", dev, t.prefix)
	}
	return nil
}

// chainOf names the chain that holds dev's rules.
func chainOf(dev string) string {
	return "vm_" + dev
}
