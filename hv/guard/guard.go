// Package guard keeps VMs from spoofing one another on the bridge: for each
// VM's tap device it lets out only Ethernet frames from the VM's own MAC,
// IPv4 packets from its own address (and DHCP's 0.0.0.0), ARP that claims
// nothing else, and DHCP requests that speak for the VM itself (client
// hardware address its MAC, not relayed), at a bounded rate. Everything
// else a VM sends, IPv6, VLAN tags and DHCP server replies included, is
// dropped. Frames the bridge forwards from one VM to a VM of another
// network are dropped too, unless Config.CrossNetwork; frames to the host
// (the gateway's DHCP and metadata) are not.
//
// Bridge ports that are not VMs' taps (a veth an admin attached, say) are
// not guarded, so they may not speak for a VM: a frame from one with a
// guarded VM's MAC is dropped, and on a bridge that holds a guarded tap
// (Port.Bridge) the host takes in only frames with a guarded VM's MAC, so
// nothing on such a port reaches the gateway's DHCP, metadata or anything
// else the host serves there. The host's own traffic to its bridge address
// never crosses a port and is not touched. The kernel's bridge family
// cannot tell on which bridge a frame arrived without the nft_meta_bridge
// module, so that check lives in tables of the inet and arp families of the
// same name, which match the bridge device as the input interface.
//
// The rules live in one nftables table of the bridge family, written with
// nft(8) in atomic batches: one batch per change, whatever the number of
// rules. That is why threes does this itself rather than use libvirt's
// clean-traffic nwfilter, which runs a hundred-odd iptables and ebtables
// commands each time a VM starts. Rules match the tap by name, so they can
// be set before the VM starts, hold across its restarts, and a tap that
// has the table's prefix but no rules of its own gets nothing through.
//
// A Table remembers what it last wrote, so it can tell when someone else
// (a firewall reload, nft flush ruleset) changed or removed the table:
// Intact says so, and Set and Delete then refuse to patch it, since
// patching a table that lost the other VMs' rules would cut them off. The
// caller rebuilds it whole with Sync.
//
// It does not own the bridge or the taps: libvirt makes the taps, named by
// DevName, and the caller says which VM has which.
package guard

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/base32"
	"encoding/hex"
	"errors"
	"fmt"
	"maps"
	"net"
	"net/netip"
	"os/exec"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
)

// Port is one VM's NIC as the bridge sees it.
type Port struct {
	// Dev is the tap device's name; it must start with the Table's
	// prefix.
	Dev string
	// MAC is the only source MAC the VM may use, and the only client
	// hardware address its DHCP requests may carry.
	MAC net.HardwareAddr
	// IP is the only IPv4 source (and ARP sender) address the VM may
	// use. The zero Addr lets any IPv4 source through; MACs are still
	// enforced.
	IP netip.Addr
	// Network is the VM's network: the bridge forwards its frames only
	// to VMs of the same Network, unless the Table allows crossing. The
	// empty string is a network like any other.
	Network string
	// Bridge is the bridge the tap joins. On a bridge named by any Port,
	// the host takes in frames only from guarded VMs (by their MACs, which
	// no other port may use); empty leaves the tap's bridge open to its
	// other ports, as before.
	Bridge string
}

// ErrNotIntact means the table in the kernel is not the one this Table
// last wrote: missing, or changed by someone else. Rebuild it with Sync.
var ErrNotIntact = errors.New("guard table is not as last written")

// DHCPRate bounds the DHCP requests one port gets to the server: a burst
// enough for a client's exchange and retries, then this many a second.
const (
	DHCPRate  = 10
	DHCPBurst = 20
)

// Table is one nftables table of anti-spoofing rules. It is safe for
// concurrent use.
type Table struct {
	name   string
	prefix string
	cross  bool
	// run feeds a script to nft -f -; tests and namespaces swap it.
	run func(ctx context.Context, script string) (string, error)

	// mu serialises batches and guards what follows.
	mu sync.Mutex
	// want is the table as listed right after this Table's last write,
	// counters blanked; empty when unknown.
	want string
	// ports is what the kernel's table guards when it matches want.
	ports map[string]Port
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
	// CrossNetwork lets the bridge forward frames between VMs of
	// different networks; by default it does not.
	CrossNetwork bool
	// Run runs nft with the script on its standard input and returns
	// what nft printed; nil runs "nft -f -" in this process's network
	// namespace.
	Run func(ctx context.Context, script string) (string, error)
}

var nameRE = regexp.MustCompile(`^[a-zA-Z][a-zA-Z0-9_]{0,30}$`)

// devRE is what a tap name may look like: it ends up in the script.
var devRE = regexp.MustCompile(`^[a-zA-Z0-9]{1,15}$`)

// bridgeRE is what a bridge's name may look like; it ends up in the script.
var bridgeRE = regexp.MustCompile(`^[a-zA-Z0-9_.-]{1,15}$`)

// New returns the Table cfg describes; it changes nothing yet.
func New(cfg Config) (*Table, error) {
	if !nameRE.MatchString(cfg.Name) {
		return nil, fmt.Errorf("guard table name %q: want a letter then up to 30 letters, digits or underscores", cfg.Name)
	}
	if len(cfg.Prefix) == 0 || len(cfg.Prefix) > 4 || !devRE.MatchString(cfg.Prefix) {
		return nil, fmt.Errorf("guard device prefix %q: want 1-4 letters or digits", cfg.Prefix)
	}
	t := &Table{name: cfg.Name, prefix: cfg.Prefix, cross: cfg.CrossNetwork, run: cfg.Run}
	if t.run == nil {
		t.run = RunNFT
	}
	return t, nil
}

// RunNFT feeds script to "nft -f -" in this process's network namespace
// and returns what nft printed.
func RunNFT(ctx context.Context, script string) (string, error) {
	var stdout, stderr bytes.Buffer
	cmd := exec.CommandContext(ctx, "nft", "-f", "-")
	cmd.Stdin = strings.NewReader(script)
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		if errors.Is(err, exec.ErrNotFound) {
			return "", fmt.Errorf("nft not found: install the nftables package: %w", err)
		}
		msg := strings.TrimSpace(stderr.String())
		if msg == "" {
			msg = err.Error()
		}
		return "", fmt.Errorf("nft: %s", msg)
	}
	return stdout.String(), nil
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
	for _, f := range families {
		fmt.Fprintf(&b, "add table %s %s\ndelete table %s %s\n", f, t.name, f, t.name)
	}
	t.skeleton(&b)
	byDev := make(map[string]Port, len(ports))
	for _, p := range ports {
		if err := t.check(p); err != nil {
			return err
		}
		if _, dup := byDev[p.Dev]; dup {
			return fmt.Errorf("guard tap %s: given twice", p.Dev)
		}
		byDev[p.Dev] = p
		t.port(&b, p, Port{}, false)
	}
	t.elements(&b, nil, byDev)
	t.mu.Lock()
	defer t.mu.Unlock()
	if err := t.write(ctx, "sync", b.String()); err != nil {
		return err
	}
	t.ports = byDev
	return nil
}

// Set guards p, replacing whatever rules its tap had. It changes only p's
// rules, so it needs the table as t last wrote it: otherwise it changes
// nothing and returns an error wrapping ErrNotIntact.
func (t *Table) Set(ctx context.Context, p Port) error {
	if err := t.check(p); err != nil {
		return err
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	if err := t.intact(ctx); err != nil {
		return fmt.Errorf("guard table %s: set %s: %w", t.name, p.Dev, err)
	}
	old, had := t.ports[p.Dev]
	var b strings.Builder
	t.port(&b, p, old, had)
	after := maps.Clone(t.ports)
	if after == nil {
		after = map[string]Port{}
	}
	after[p.Dev] = p
	t.elements(&b, t.ports, after)
	if err := t.write(ctx, "set "+p.Dev, b.String()); err != nil {
		return err
	}
	t.ports = after
	return nil
}

// Delete drops the rules of the tap dev; a tap with the prefix then gets
// nothing through. Deleting a tap that has no rules is not an error. Like
// Set it needs the table as t last wrote it.
func (t *Table) Delete(ctx context.Context, dev string) error {
	if err := t.checkDev(dev); err != nil {
		return err
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	if err := t.intact(ctx); err != nil {
		return fmt.Errorf("guard table %s: delete %s: %w", t.name, dev, err)
	}
	p, had := t.ports[dev]
	if !had {
		return nil // the table is as written, and has no rules for dev
	}
	n := t.name
	var b strings.Builder
	fmt.Fprintf(&b, "delete element bridge %s ports { %q }\n", n, dev)
	fmt.Fprintf(&b, "delete chain bridge %s %s\n", n, chainOf(dev))
	if !t.cross {
		fmt.Fprintf(&b, "delete element bridge %s nets { %q }\n", n, dev)
		fmt.Fprintf(&b, "delete element bridge %s %s { %q }\n", n, netOf(p.Network), dev)
	}
	after := maps.Clone(t.ports)
	delete(after, dev)
	t.elements(&b, t.ports, after)
	if err := t.write(ctx, "delete "+dev, b.String()); err != nil {
		return err
	}
	t.ports = after
	return nil
}

// Intact returns nil when the table in the kernel is the one t last wrote,
// else an error wrapping ErrNotIntact that says what differs.
func (t *Table) Intact(ctx context.Context) error {
	t.mu.Lock()
	defer t.mu.Unlock()
	if err := t.intact(ctx); err != nil {
		return fmt.Errorf("guard table %s: %w", t.name, err)
	}
	return nil
}

func (t *Table) intact(ctx context.Context) error {
	if t.want == "" {
		return fmt.Errorf("%w: never written", ErrNotIntact)
	}
	got, err := t.list(ctx)
	if err != nil {
		// Mostly "no table": the table is gone.
		return fmt.Errorf("%w: %v", ErrNotIntact, err)
	}
	if got != t.want {
		return fmt.Errorf("%w: changed by someone else", ErrNotIntact)
	}
	return nil
}

// counterRE matches what a counter has counted, which changes by itself.
var counterRE = regexp.MustCompile(`counter packets [0-9]+ bytes [0-9]+`)

func (t *Table) list(ctx context.Context) (string, error) {
	// One run for the three tables: nft 1.0 fails a batch of several
	// list commands, and three runs would triple the cost of a check.
	out, err := t.run(ctx, "list ruleset\n")
	if err != nil {
		return "", err
	}
	var b strings.Builder
	for _, f := range families {
		head := fmt.Sprintf("table %s %s {\n", f, t.name)
		i := strings.Index(out, head)
		if i < 0 || (i > 0 && out[i-1] != '\n') {
			return "", fmt.Errorf("no table %s %s", f, t.name)
		}
		block := out[i:]
		if j := strings.Index(block, "\n}\n"); j >= 0 {
			block = block[:j+3]
		}
		b.WriteString(block)
	}
	return counterRE.ReplaceAllString(b.String(), "counter"), nil
}

// write applies script and records the table it left; t.mu is held. When
// either step fails, what the kernel holds is unknown until the next Sync,
// and the error says so (ErrNotIntact): another writer may have changed
// the table between the check and the write.
func (t *Table) write(ctx context.Context, what, script string) error {
	t.want = ""
	if _, err := t.run(ctx, script); err != nil {
		return fmt.Errorf("guard table %s: %s: %w (%w)", t.name, what, err, ErrNotIntact)
	}
	// nft lists a table as of before the batch when asked within it, so
	// this is a run of its own.
	got, err := t.list(ctx)
	if err != nil {
		return fmt.Errorf("guard table %s: %s: read back: %w", t.name, what, err)
	}
	t.want = got
	return nil
}

// skeleton writes the table, its maps from tap to chain and the base
// chains that dispatch through them, into a fresh table.
func (t *Table) skeleton(b *strings.Builder) {
	n := t.name
	fmt.Fprintf(b, "add table bridge %s\n", n)
	fmt.Fprintf(b, "add map bridge %s ports { type ifname : verdict ; }\n", n)
	// Before anything else on the bridge, including the host's own
	// input: the metadata server must see only honest sources too.
	fmt.Fprintf(b, "add chain bridge %s from_vm { type filter hook prerouting priority -300 ; policy accept ; }\n", n)
	fmt.Fprintf(b, "add rule bridge %s from_vm iifname vmap @ports\n", n)
	fmt.Fprintf(b, "add rule bridge %s from_vm iifname %q counter drop\n", n, t.prefix+"*")
	// Only frames from other ports get here: none may pose as a VM, to
	// the host or to the bridge's forwarding table.
	fmt.Fprintf(b, "add set bridge %s macs { type ether_addr ; }\n", n)
	fmt.Fprintf(b, "add rule bridge %s from_vm ether saddr @macs counter drop\n", n)
	// So on a bridge of VMs, a frame the host takes in with a guarded
	// VM's MAC came from that VM's tap, and any other frame from a port
	// that is not a VM. The host's own traffic to its addresses goes over
	// loopback and is not seen here.
	for _, f := range families[1:] {
		fmt.Fprintf(b, "add table %s %s\n", f, n)
		fmt.Fprintf(b, "add set %s %s bridges { type ifname ; }\n", f, n)
		fmt.Fprintf(b, "add set %s %s macs { type ether_addr ; }\n", f, n)
		fmt.Fprintf(b, "add chain %s %s to_host { type filter hook input priority -300 ; policy accept ; }\n", f, n)
		fmt.Fprintf(b, "add rule %s %s to_host iifname @bridges ether saddr != @macs counter drop\n", f, n)
	}
	if !t.cross {
		// Forwarding is what the bridge does between its ports; frames
		// for the host do not pass here, so the gateway stays reachable.
		fmt.Fprintf(b, "add map bridge %s nets { type ifname : verdict ; }\n", n)
		fmt.Fprintf(b, "add chain bridge %s between_vms { type filter hook forward priority -300 ; policy accept ; }\n", n)
		fmt.Fprintf(b, "add rule bridge %s between_vms iifname vmap @nets\n", n)
	}
}

// port writes the chain of p's tap, replacing any it had, and maps the tap
// to it; old is what the tap had before, if had.
func (t *Table) port(b *strings.Builder, p, old Port, had bool) {
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
	// DHCP requests speak for this port's VM only: the server trusts
	// the client hardware address in them (chaddr, 6 bytes at 36 past
	// the UDP header's start) and would answer a relay address (giaddr,
	// 4 bytes at 32), so those are held to the port here. A fragment
	// could carry them past what the rules see: DHCP is never
	// fragmented, so fragments to the server port are dropped, and later
	// fragments alone cannot be reassembled.
	rule("udp dport 67 ip frag-off & 0x3fff != 0 counter drop")
	rule("udp dport 67 @th,256,32 != 0 counter drop")
	rule("udp dport 67 @th,288,48 != 0x" + hex.EncodeToString(p.MAC) + " counter drop")
	rule(fmt.Sprintf("udp dport 67 limit rate over %d/second burst %d packets counter drop", DHCPRate, DHCPBurst))
	// A VM is never a DHCP server on the bridge.
	rule("udp sport 67 counter drop")
	if p.IP.IsValid() {
		// A DHCP client has no address until it is offered one.
		rule("ip saddr 0.0.0.0 ip daddr 255.255.255.255 udp sport 68 udp dport 67 accept")
		rule("ip saddr != " + p.IP.String() + " counter drop")
	}
	rule("ether type ip accept")
	rule("counter drop")
	fmt.Fprintf(b, "add element bridge %s ports { %q : goto %s }\n", n, p.Dev, c)
	if t.cross {
		return
	}
	if had && old.Network != p.Network {
		fmt.Fprintf(b, "delete element bridge %s nets { %q }\n", n, p.Dev)
		fmt.Fprintf(b, "delete element bridge %s %s { %q }\n", n, netOf(old.Network), p.Dev)
	}
	// The network's set of taps and its chain; rewriting the chain is
	// idempotent, and adding a set that exists keeps its elements.
	nc := netOf(p.Network)
	fmt.Fprintf(b, "add set bridge %s %s { type ifname ; }\n", n, nc)
	fmt.Fprintf(b, "add chain bridge %s %s\n", n, nc)
	fmt.Fprintf(b, "flush chain bridge %s %s\n", n, nc)
	fmt.Fprintf(b, "add rule bridge %s %s oifname %q oifname != @%s counter drop\n", n, nc, t.prefix+"*", nc)
	fmt.Fprintf(b, "add element bridge %s %s { %q }\n", n, nc, p.Dev)
	fmt.Fprintf(b, "add element bridge %s nets { %q : goto %s }\n", n, p.Dev, nc)
}

// families are those of the tables t writes, all named t.name: the bridge
// family's guards the ports; the inet and arp families' keep ports that
// are not VMs from the host (see the package comment).
var families = []string{"bridge", "inet", "arp"}

// elements writes the changes to the sets of guarded MACs and bridges from
// those of the ports before to those of after.
func (t *Table) elements(b *strings.Builder, before, after map[string]Port) {
	macsOf := func(ports map[string]Port) map[string]bool {
		m := map[string]bool{}
		for _, p := range ports {
			m[p.MAC.String()] = true
		}
		return m
	}
	bridgesOf := func(ports map[string]Port) map[string]bool {
		m := map[string]bool{}
		for _, p := range ports {
			if p.Bridge != "" {
				m[strconv.Quote(p.Bridge)] = true
			}
		}
		return m
	}
	diff := func(fams []string, set string, was, is map[string]bool) {
		for _, op := range []struct {
			verb     string
			from, to map[string]bool
		}{{"delete", is, was}, {"add", was, is}} {
			var els []string
			for e := range op.to {
				if !op.from[e] {
					els = append(els, e)
				}
			}
			if len(els) == 0 {
				continue
			}
			slices.Sort(els)
			for _, f := range fams {
				fmt.Fprintf(b, "%s element %s %s %s { %s }\n", op.verb, f, t.name, set, strings.Join(els, ", "))
			}
		}
	}
	diff(families, "macs", macsOf(before), macsOf(after))
	diff(families[1:], "bridges", bridgesOf(before), bridgesOf(after))
}

// check reports what is wrong with p, before anything is written.
func (t *Table) check(p Port) error {
	if err := t.checkDev(p.Dev); err != nil {
		return err
	}
	if len(p.MAC) != 6 {
		return fmt.Errorf("guard tap %s: MAC %q is not a 6-byte MAC address", p.Dev, p.MAC)
	}
	if p.IP.IsValid() && !p.IP.Is4() {
		return fmt.Errorf("guard tap %s: IP %s is not IPv4", p.Dev, p.IP)
	}
	if p.Bridge != "" && !bridgeRE.MatchString(p.Bridge) {
		return fmt.Errorf("guard tap %s: bridge %q: want up to 15 letters, digits, '.', '-' or '_'", p.Dev, p.Bridge)
	}
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

// netOf names the set of taps of a network and the chain that holds
// frames from them to other VMs: network names are free text.
func netOf(network string) string {
	sum := sha256.Sum256([]byte(network))
	return "net_" + hex.EncodeToString(sum[:6])
}
