package hv

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/digitalocean/go-libvirt"
	"golang.org/x/sys/unix"
	"libvirt.org/go/libvirtxml"
)

// accelResult is what detection found out about the host.
type accelResult struct {
	Accel
	// dac is the user QEMU runs as under libvirt's DAC security driver;
	// nil when there is none (QEMU runs as root, or the test driver).
	dac *owner
}

// probeBanner is what the probe kernel prints first on its console.
const probeBanner = "Linux version"

// Accel reports how domains run; see Hypervisor.
func (h *Libvirt) Accel(ctx context.Context) (Accel, error) {
	acc, err := h.detect(ctx)
	if err != nil {
		return Accel{}, err
	}
	return acc.Accel, nil
}

// detect finds the domain type and QEMU's user once per Libvirt: they do
// not change while libvirtd restarts.
func (h *Libvirt) detect(ctx context.Context) (*accelResult, error) {
	h.accelMu.Lock()
	defer h.accelMu.Unlock()
	if h.accel != nil {
		return h.accel, nil
	}
	if h.flavour.test {
		h.accel = &accelResult{Accel: Accel{DomainType: "test", Reason: "libvirt's test driver"}}
		return h.accel, nil
	}
	var capsXML string
	err := h.call(ctx, true, func(conn *libvirt.Libvirt) error {
		var err error
		capsXML, err = conn.ConnectGetCapabilities()
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("detect accelerator: capabilities: %w", err)
	}
	var caps libvirtxml.Caps
	if err := caps.Unmarshal(capsXML); err != nil {
		return nil, fmt.Errorf("detect accelerator: parse capabilities: %w", err)
	}

	res := &accelResult{Accel: Accel{DomainType: h.domainType, Reason: "configured"}}
	if h.domainType == "" {
		res.DomainType, res.Reason = h.chooseType(ctx, &caps)
		if res.DomainType == "kvm" {
			own, err := dacOwner(&caps, "kvm")
			if err != nil {
				return nil, fmt.Errorf("detect accelerator: %w", err)
			}
			host := hostKey(&caps)
			if v, ok := readVerdict(h.probeVerdict, host); ok {
				res.DomainType, res.Reason = v.DomainType, v.Reason+
					fmt.Sprintf(" (verdict of %s, kept in %s: delete it to probe again)", v.At.UTC().Format(time.RFC3339), h.probeVerdict)
			} else {
				err = h.probe(ctx, own)
				switch {
				case err == nil:
					res.Reason = "libvirt offers KVM and a probe guest booted with it"
				case errors.Is(err, ErrUnavailable) || ctx.Err() != nil:
					return nil, fmt.Errorf("detect accelerator: %w", err)
				default:
					res.DomainType = "qemu"
					res.Reason = "libvirt offers KVM but a probe guest did not boot with it, using TCG: " + err.Error()
				}
				writeVerdict(h.probeVerdict, verdict{Host: host, DomainType: res.DomainType, Reason: res.Reason, At: time.Now()})
			}
		}
	}
	if res.dac, err = dacOwner(&caps, res.DomainType); err != nil {
		return nil, fmt.Errorf("detect accelerator: %w", err)
	}
	h.accel = res
	return res, nil
}

// chooseType returns "kvm" when libvirt offers KVM and a probe kernel is
// configured (detect then probes), else "qemu", with the reason.
func (h *Libvirt) chooseType(ctx context.Context, caps *libvirtxml.Caps) (string, string) {
	offered := false
	for _, g := range caps.Guests {
		if g.Arch.Name != "x86_64" {
			continue
		}
		for _, d := range g.Arch.Domains {
			if d.Type == "kvm" {
				offered = true
			}
		}
	}
	if !offered {
		return "qemu", "libvirt offers no KVM for x86_64 (no /dev/kvm?), using TCG"
	}
	var dcaps string
	err := h.call(ctx, true, func(conn *libvirt.Libvirt) error {
		var err error
		dcaps, err = conn.ConnectGetDomainCapabilities(nil, libvirt.OptString{"x86_64"}, nil, libvirt.OptString{"kvm"}, 0)
		return err
	})
	if err != nil {
		return "qemu", "libvirt lists KVM but has no KVM domain capabilities, using TCG: " + err.Error()
	}
	var dc libvirtxml.DomainCaps
	if err := dc.Unmarshal(dcaps); err != nil || dc.Domain != "kvm" {
		return "qemu", "libvirt lists KVM but its domain capabilities are not KVM's, using TCG"
	}
	if h.probeKernel == "" {
		return "qemu", "libvirt offers KVM, but with no kernel image yet to boot a test guest there is no telling whether KVM works on this host, so VMs use TCG (slower); after an image with a kernel is imported, the next start checks KVM once"
	}
	return "kvm", ""
}

// dacOwner returns the user QEMU runs as for domainType under libvirt's
// DAC driver, or nil if it runs as root or there is no DAC driver.
func dacOwner(caps *libvirtxml.Caps, domainType string) (*owner, error) {
	for _, m := range caps.Host.SecModel {
		if m.Name != "dac" {
			continue
		}
		for _, l := range m.Labels {
			if l.Type != domainType {
				continue
			}
			// "+64055:+64055"
			u, g, ok := strings.Cut(l.Value, ":")
			uid, err1 := strconv.Atoi(strings.TrimPrefix(u, "+"))
			gid, err2 := strconv.Atoi(strings.TrimPrefix(g, "+"))
			if !ok || err1 != nil || err2 != nil {
				return nil, fmt.Errorf("libvirt's DAC base label %q is not +UID:+GID", l.Value)
			}
			if uid == 0 {
				return nil, nil
			}
			return &owner{uid: uid, gid: gid}, nil
		}
	}
	return nil, nil
}

// probe boots ProbeKernel in a throwaway KVM domain and waits for the
// kernel's banner on its console. It fails if the banner does not come
// within ProbeTimeout, if QEMU fails to start, or if the guest stops first.
func (h *Libvirt) probe(ctx context.Context, own *owner) error {
	if err := reachable(h.probeKernel, own); err != nil {
		return err
	}
	if _, err := os.Stat(h.probeKernel); err != nil {
		return fmt.Errorf("probe kernel: %w", err)
	}
	rnd := make([]byte, 4)
	rand.Read(rnd)
	name := "threes-kvm-probe-" + hex.EncodeToString(rnd)
	port := uint(0)
	d := &libvirtxml.Domain{
		Type:   "kvm",
		Name:   name,
		Memory: &libvirtxml.DomainMemory{Value: 128, Unit: "MiB"},
		VCPU:   &libvirtxml.DomainVCPU{Value: 1},
		OS: &libvirtxml.DomainOS{
			Type:    &libvirtxml.DomainOSType{Arch: "x86_64", Type: "hvm"},
			Kernel:  h.probeKernel,
			Cmdline: "console=ttyS0 panic=-1",
		},
		OnPoweroff: "destroy",
		OnReboot:   "destroy",
		OnCrash:    "destroy",
		Devices: &libvirtxml.DomainDeviceList{
			Serials: []libvirtxml.DomainSerial{{
				Source: &libvirtxml.DomainChardevSource{Pty: &libvirtxml.DomainChardevSourcePty{}},
				Target: &libvirtxml.DomainSerialTarget{Port: &port},
			}},
		},
	}
	if own != nil {
		d.SecLabel = []libvirtxml.DomainSecLabel{{Type: "static", Model: "dac", Relabel: "no",
			Label: fmt.Sprintf("+%d:+%d", own.uid, own.gid)}}
	}
	doc, err := d.Marshal()
	if err != nil {
		return err
	}

	ctx, cancel := context.WithTimeout(ctx, h.probeTimeout)
	defer cancel()
	// Paused until the console is attached, so no output is missed.
	var dom libvirt.Domain
	err = h.call(ctx, false, func(conn *libvirt.Libvirt) error {
		var err error
		dom, err = conn.DomainCreateXML(doc, libvirt.DomainStartPaused)
		return err
	})
	if err != nil {
		return fmt.Errorf("start probe guest: %w", err)
	}
	defer func() {
		dctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
		defer cancel()
		h.call(dctx, false, func(conn *libvirt.Libvirt) error { return conn.DomainDestroy(dom) })
	}()
	con, err := h.openConsole(ctx, dom)
	if err != nil {
		return fmt.Errorf("probe guest console: %w", err)
	}
	defer con.Close()
	err = h.call(ctx, false, func(conn *libvirt.Libvirt) error { return conn.DomainResume(dom) })
	if err != nil {
		return fmt.Errorf("resume probe guest: %w", err)
	}
	var seen bytes.Buffer
	buf := make([]byte, 4096)
	for {
		n, err := con.Read(buf)
		seen.Write(buf[:n])
		if bytes.Contains(seen.Bytes(), []byte(probeBanner)) {
			return nil
		}
		switch {
		case ctx.Err() != nil:
			return fmt.Errorf("no kernel banner on the probe guest's console within %v", h.probeTimeout)
		case errors.Is(err, io.EOF):
			return errors.New("the probe guest stopped before printing the kernel banner")
		case err != nil:
			return fmt.Errorf("read probe guest console: %w", err)
		}
	}
}

// verdict is the KVM probe's outcome on one host, kept across starts: the probe
// boots a guest (10 s when KVM does not work), and its answer changes only with the
// host.
type verdict struct {
	Host       string    `json:"host"`
	DomainType string    `json:"domain_type"`
	Reason     string    `json:"reason"`
	At         time.Time `json:"at"`
}

// hostKey names this host as the probe saw it: libvirt's host UUID and the running
// kernel's release (a new kernel or KVM module can change the answer).
func hostKey(caps *libvirtxml.Caps) string {
	var u unix.Utsname
	unix.Uname(&u)
	return caps.Host.UUID + " " + unix.ByteSliceToString(u.Release[:])
}

func readVerdict(file, host string) (verdict, bool) {
	var v verdict
	if file == "" {
		return v, false
	}
	b, err := os.ReadFile(file)
	if err != nil || json.Unmarshal(b, &v) != nil || v.Host != host || (v.DomainType != "kvm" && v.DomainType != "qemu") {
		return v, false
	}
	return v, true
}

// writeVerdict keeps v; a failure only means the next start probes again.
func writeVerdict(file string, v verdict) {
	if file == "" {
		return
	}
	b, _ := json.Marshal(v)
	tmp := file + ".tmp"
	if os.WriteFile(tmp, b, 0o644) == nil {
		os.Rename(tmp, file)
	}
}
