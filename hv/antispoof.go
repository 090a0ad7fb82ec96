package hv

import (
	"context"
	"crypto/sha256"
	"encoding/base32"
	"encoding/hex"
	"encoding/xml"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strings"
	"time"

	"github.com/digitalocean/go-libvirt"
	"github.com/vishvananda/netns"
	"libvirt.org/go/libvirtxml"

	"github.com/threes-dev/threes/hv/guard"
	"github.com/threes-dev/threes/internal/nsdo"
)

// newGuard returns the anti-spoofing table of the domains of owner. Each
// owner has a table and tap prefix of its own, so that appliances (or
// tests) sharing a host never rewrite or cut off each other's VMs.
func newGuard(owner, netnsName string, cross bool) (*guard.Table, error) {
	sum := sha256.Sum256([]byte(owner))
	tag := strings.ToLower(base32.StdEncoding.EncodeToString(sum[:]))[:2]
	cfg := guard.Config{Name: "threes_" + hex.EncodeToString(sum[:4]), Prefix: "t3" + tag, CrossNetwork: cross}
	if netnsName != "" {
		cfg.Run = func(ctx context.Context, script string) (out string, err error) {
			ns, err := netns.GetFromName(netnsName)
			if err != nil {
				return "", fmt.Errorf("bridge namespace %s: %w", netnsName, err)
			}
			defer ns.Close()
			// nft forks from the thread that nsdo switched into ns,
			// so it inherits that namespace.
			err = nsdo.Do(ns, func() (err error) {
				out, err = guard.RunNFT(ctx, script)
				return err
			})
			return out, err
		}
	}
	return guard.New(cfg)
}

// Port names the bridge port (the tap) of the VM id, where the bridge must
// have learnt the VM's MAC for the neighbour check to believe it; "" where
// domains have no taps (the test driver).
func (h *Libvirt) Port(id string) string {
	if h.guard == nil {
		return ""
	}
	return guard.DevName(h.guard.Prefix(), id)
}

// portOf returns the guarded port of the VM s (validated) under prefix.
func portOf(s Spec, prefix string) guard.Port {
	return guard.Port{Dev: guard.DevName(prefix, s.ID), MAC: s.MAC, IP: s.IP, Network: s.Network, Bridge: s.Bridge}
}

// portFromXML reads a domain's guarded port back from its definition; ok
// is false for a domain of another owner, or whose NIC has no tap name of
// ours.
func portFromXML(doc, owner, prefix string) (p guard.Port, ok bool, err error) {
	var d libvirtxml.Domain
	if err := d.Unmarshal(doc); err != nil {
		return p, false, fmt.Errorf("parse domain XML: %w", err)
	}
	// The metadata element may sit among others a user added.
	var meta struct {
		VM []vmMetadata `xml:"https://github.com/threes-dev/threes/xmlns/vm/1 vm"`
	}
	if d.Metadata != nil {
		xml.Unmarshal([]byte("<m>"+d.Metadata.XML+"</m>"), &meta)
	}
	if len(meta.VM) == 0 || meta.VM[0].Owner != owner || d.Devices == nil || len(d.Devices.Interfaces) == 0 {
		return p, false, nil
	}
	nic := d.Devices.Interfaces[0]
	if nic.Target == nil || !strings.HasPrefix(nic.Target.Dev, prefix) || nic.MAC == nil {
		return p, false, nil
	}
	if p.MAC, err = net.ParseMAC(nic.MAC.Address); err != nil {
		return p, false, fmt.Errorf("domain %s: MAC %q: %w", d.Name, nic.MAC.Address, err)
	}
	p.Dev = nic.Target.Dev
	p.Network = meta.VM[0].Network
	if nic.Source != nil && nic.Source.Bridge != nil {
		p.Bridge = nic.Source.Bridge.Bridge
	}
	if ip := meta.VM[0].IP; ip != "" {
		if p.IP, err = netip.ParseAddr(ip); err != nil {
			return p, false, fmt.Errorf("domain %s: IP %q: %w", d.Name, ip, err)
		}
	}
	return p, true, nil
}

// guardDomain sets the rules of dom's tap again before it starts, in case
// they went (a reboot, a firewall reload that flushed every table).
func (h *Libvirt) guardDomain(ctx context.Context, dom libvirt.Domain) error {
	if h.guard == nil {
		return nil
	}
	var doc string
	err := h.call(ctx, true, func(conn *libvirt.Libvirt) error {
		var err error
		doc, err = conn.DomainGetXMLDesc(dom, libvirt.DomainXMLInactive)
		return err
	})
	if err != nil {
		return err
	}
	p, ok, err := portFromXML(doc, h.owner, h.guard.Prefix())
	if err != nil || !ok {
		return err
	}
	return h.setGuard(ctx, p)
}

// setGuard sets p's rules. When the table is not as hv left it (flushed
// by a firewall reload, say), patching in p alone would leave the other
// running VMs without rules, and the prefix rule would then cut them off:
// the table is rebuilt from every domain instead, p's included since its
// domain is defined.
func (h *Libvirt) setGuard(ctx context.Context, p guard.Port) error {
	h.guardMu.Lock()
	defer h.guardMu.Unlock()
	err := h.guard.Set(ctx, p)
	if errors.Is(err, guard.ErrNotIntact) {
		return h.syncGuardLocked(ctx)
	}
	return err
}

// unguard drops the rules of dev, whose domain is undefined; on a table
// that is not as hv left it, it rebuilds the table from every domain.
func (h *Libvirt) unguard(ctx context.Context, dev string) error {
	h.guardMu.Lock()
	defer h.guardMu.Unlock()
	err := h.guard.Delete(ctx, dev)
	if errors.Is(err, guard.ErrNotIntact) {
		return h.syncGuardLocked(ctx)
	}
	return err
}

// guardCheckEvery is how often hv checks that the guard table is as it
// left it: a firewall reload between two checks leaves VMs unguarded
// until the next. Tests change it.
var guardCheckEvery = 10 * time.Second

// checkGuard rebuilds the table from every domain whenever it is not as
// hv left it, until Close.
func (h *Libvirt) checkGuard() {
	for {
		t := time.NewTimer(time.Duration(h.guardEvery.Load()))
		select {
		case <-h.done:
			t.Stop()
			return
		case <-t.C:
		}
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		if err := h.guard.Intact(ctx); err != nil {
			// Unreachable libvirtd or nft: tried again next time.
			h.syncGuard(ctx)
		}
		cancel()
	}
}

// syncGuard rebuilds the whole table from this owner's domains.
func (h *Libvirt) syncGuard(ctx context.Context) error {
	if h.guard == nil {
		return nil
	}
	h.guardMu.Lock()
	defer h.guardMu.Unlock()
	return h.syncGuardLocked(ctx)
}

// syncGuardLocked is syncGuard with guardMu held: a Set between listing
// the domains and writing the table would be lost.
func (h *Libvirt) syncGuardLocked(ctx context.Context) error {
	var ports []guard.Port
	err := h.call(ctx, true, func(conn *libvirt.Libvirt) error {
		ports = ports[:0]
		doms, _, err := conn.ConnectListAllDomains(1, 0)
		if err != nil {
			return err
		}
		for _, dom := range doms {
			// One call per domain: the definition names its owner.
			doc, err := conn.DomainGetXMLDesc(dom, libvirt.DomainXMLInactive)
			if hasCode(err, libvirt.ErrNoDomain) {
				continue
			}
			if err != nil {
				return err
			}
			p, ok, err := portFromXML(doc, h.owner, h.guard.Prefix())
			if err != nil {
				return err
			}
			if ok {
				ports = append(ports, p)
			}
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("anti-spoofing rules: list domains: %w", err)
	}
	return h.guard.Sync(ctx, ports)
}
