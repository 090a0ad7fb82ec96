package hv

import (
	"bytes"
	"encoding/xml"
	"fmt"
	"net"
	"net/netip"
	"net/url"
	"strings"

	"libvirt.org/go/libvirtxml"

	"github.com/threes-dev/threes/hv/images"
)

// metadataNS is the XML namespace of the metadata element that marks a
// domain as one threes created; List reports only such domains, so a host's
// other VMs (and the test driver's predefined "test") are never touched.
const metadataNS = "https://github.com/threes-dev/threes/xmlns/vm/1"

// vmMetadata is the element stored under metadataNS in each domain.
type vmMetadata struct {
	XMLName xml.Name `xml:"https://github.com/threes-dev/threes/xmlns/vm/1 vm"`
	Owner   string   `xml:"owner,attr"`
	Name    string   `xml:"name,attr"`
	// IP is the VM's address, kept so that its anti-spoofing rules can
	// be rebuilt from the domain alone.
	IP string `xml:"ip,attr,omitempty"`
	// Network is the VM's network, for the same reason.
	Network string `xml:"network,attr,omitempty"`
}

// validate reports what is wrong with s, if anything.
func (s Spec) validate() error {
	switch {
	case s.ID == "":
		return fmt.Errorf("%w: empty ID", ErrInvalidSpec)
	case strings.ContainsAny(s.ID, "/\x00") || strings.TrimSpace(s.ID) != s.ID || strings.HasPrefix(s.ID, "."):
		// libvirt names and disks become file names.
		return fmt.Errorf("%w: ID %q has a slash, NUL, leading dot or surrounding space", ErrInvalidSpec, s.ID)
	case s.VCPUs < 1:
		return fmt.Errorf("%w: %d vCPUs", ErrInvalidSpec, s.VCPUs)
	case s.MemoryMiB < 1:
		return fmt.Errorf("%w: %d MiB of memory", ErrInvalidSpec, s.MemoryMiB)
	case s.Bridge == "":
		return fmt.Errorf("%w: empty bridge", ErrInvalidSpec)
	case s.DiskGiB < 0:
		return fmt.Errorf("%w: disk of %d GiB", ErrInvalidSpec, s.DiskGiB)
	case strings.ContainsAny(s.Cmdline, "\x00\n"):
		return fmt.Errorf("%w: kernel command line has a NUL or newline", ErrInvalidSpec)
	}
	if len(s.MAC) != 6 || s.MAC[0]&1 != 0 || bytes.Equal(s.MAC, make(net.HardwareAddr, 6)) {
		// A group or zero address would make the NIC answer for others.
		return fmt.Errorf("%w: MAC %q is not a 6-byte unicast MAC address", ErrInvalidSpec, s.MAC)
	}
	if s.IP.IsValid() && !s.IP.Is4() {
		return fmt.Errorf("%w: IP %s is not an IPv4 address", ErrInvalidSpec, s.IP)
	}
	img := s.Image
	switch img.Kind {
	case "":
		if img != (images.Image{}) {
			return fmt.Errorf("%w: image %q has no kind", ErrInvalidSpec, img.Name)
		}
	case images.KindDisk:
		if img.Disk == "" {
			return fmt.Errorf("%w: disk image %q has no disk", ErrInvalidSpec, img.Name)
		}
	case images.KindKernel:
		if img.Kernel == "" {
			return fmt.Errorf("%w: kernel image %q has no kernel", ErrInvalidSpec, img.Name)
		}
	default:
		return fmt.Errorf("%w: image %q of unknown kind %q", ErrInvalidSpec, img.Name, img.Kind)
	}
	if s.NoCloud != nil {
		u := s.NoCloud.String()
		switch {
		case s.NoCloud.Scheme != "http" && s.NoCloud.Scheme != "https", s.NoCloud.Host == "":
			return fmt.Errorf("%w: NoCloud seed URL %q is not an http(s) URL with a host", ErrInvalidSpec, u)
		case !strings.HasSuffix(u, "/"):
			// cloud-init appends "meta-data" to the URL as it is.
			return fmt.Errorf("%w: NoCloud seed URL %q does not end in a slash", ErrInvalidSpec, u)
		case strings.ContainsFunc(u, func(r rune) bool { return r <= ' ' || r == ';' || r > '~' }):
			// A space would split the kernel command line, and ";" the seed.
			return fmt.Errorf("%w: NoCloud seed URL %q has a space, control character or semicolon", ErrInvalidSpec, u)
		}
	}
	if s.Cmdline != "" && img.Kind != images.KindKernel {
		return fmt.Errorf("%w: a kernel command line needs a kernel image", ErrInvalidSpec)
	}
	if img.Disk != "" {
		if img.DiskFormat != "qcow2" && img.DiskFormat != "raw" {
			return fmt.Errorf("%w: image %q disk format %q, want qcow2 or raw", ErrInvalidSpec, img.Name, img.DiskFormat)
		}
		if s.DiskGiB > 0 && int64(s.DiskGiB)<<30 < img.DiskBytes {
			return fmt.Errorf("%w: disk of %d GiB is smaller than image %q (%d bytes)", ErrInvalidSpec, s.DiskGiB, img.Name, img.DiskBytes)
		}
	}
	return nil
}

// xmlOptions is what a domain's XML needs beside its Spec.
type xmlOptions struct {
	// domainType is libvirt's domain type: "test", "qemu" or "kvm".
	domainType string
	// owner marks the domain as this hv's.
	owner string
	// disk is the VM's own disk file and diskFormat its format; none if
	// disk is empty.
	disk, diskFormat string
	// dacLabel is "+UID:+GID" for QEMU to run as; with it, libvirt
	// relabels no file at all (hv gives the VM's disk that owner), so the
	// shared base images, kernels and initrds stay root's and read-only.
	dacLabel string
	// tap names the NIC's tap device, which package guard's rules
	// match; empty lets libvirt pick (the test driver has no taps).
	tap string
}

// domainXML returns the libvirt definition of s.
func domainXML(s Spec, o xmlOptions) (string, error) {
	if err := s.validate(); err != nil {
		return "", err
	}
	meta, err := xml.Marshal(vmMetadata{Owner: o.owner, Name: s.Name, IP: ipText(s.IP), Network: s.Network})
	if err != nil {
		return "", fmt.Errorf("marshal metadata of domain %s: %w", s.ID, err)
	}
	port := uint(0)
	d := &libvirtxml.Domain{
		Type:     o.domainType,
		Name:     s.ID,
		Title:    titleOf(s.Name),
		Metadata: &libvirtxml.DomainMetadata{XML: string(meta)},
		Memory:   &libvirtxml.DomainMemory{Value: uint(s.MemoryMiB), Unit: "MiB"},
		VCPU:     &libvirtxml.DomainVCPU{Value: uint(s.VCPUs)},
		SysInfo: []libvirtxml.DomainSysInfo{{
			SMBIOS: &libvirtxml.DomainSysInfoSMBIOS{
				System: &libvirtxml.DomainSysInfoSystem{Entry: smbiosSystem(s)},
			},
		}},
		OS: &libvirtxml.DomainOS{
			Type:   &libvirtxml.DomainOSType{Arch: "x86_64", Type: "hvm"},
			SMBios: &libvirtxml.DomainSMBios{Mode: "sysinfo"},
		},
		// Without ACPI the guest can neither power itself off nor
		// react to Stop's power-button press.
		Features:   &libvirtxml.DomainFeatureList{ACPI: &libvirtxml.DomainFeature{}},
		OnPoweroff: "destroy",
		OnReboot:   "restart",
		OnCrash:    "destroy",
		Devices: &libvirtxml.DomainDeviceList{
			Interfaces: []libvirtxml.DomainInterface{{
				MAC: &libvirtxml.DomainInterfaceMAC{Address: s.MAC.String()},
				Source: &libvirtxml.DomainInterfaceSource{
					Bridge: &libvirtxml.DomainInterfaceSourceBridge{Bridge: s.Bridge},
				},
				Model: &libvirtxml.DomainInterfaceModel{Type: "virtio"},
			}},
			Serials: []libvirtxml.DomainSerial{{
				Source: &libvirtxml.DomainChardevSource{Pty: &libvirtxml.DomainChardevSourcePty{}},
				Target: &libvirtxml.DomainSerialTarget{Port: &port},
			}},
			Consoles: []libvirtxml.DomainConsole{{
				Source: &libvirtxml.DomainChardevSource{Pty: &libvirtxml.DomainChardevSourcePty{}},
				Target: &libvirtxml.DomainConsoleTarget{Type: "serial", Port: &port},
			}},
		},
	}
	if o.tap != "" {
		d.Devices.Interfaces[0].Target = &libvirtxml.DomainInterfaceTarget{Dev: o.tap}
	}
	if o.dacLabel != "" {
		d.SecLabel = []libvirtxml.DomainSecLabel{{Type: "static", Model: "dac", Relabel: "no", Label: o.dacLabel}}
	}
	if img := s.Image; img.Kind == images.KindKernel {
		d.OS.Kernel = img.Kernel
		d.OS.Initrd = img.Initrd
		// The image's line, the seed, then the caller's. No quoting:
		// libvirt passes the line to QEMU as one argument, and the
		// seed has no space (validate).
		var parts []string
		for _, p := range []string{img.Cmdline, NoCloudSeed(s.NoCloud), s.Cmdline} {
			if p = strings.TrimSpace(p); p != "" {
				parts = append(parts, p)
			}
		}
		d.OS.Cmdline = strings.Join(parts, " ")
	}
	if o.disk != "" {
		disk := libvirtxml.DomainDisk{
			Device: "disk",
			Driver: &libvirtxml.DomainDiskDriver{Name: "qemu", Type: o.diskFormat},
			Source: &libvirtxml.DomainDiskSource{File: &libvirtxml.DomainDiskSourceFile{File: o.disk}},
			Target: &libvirtxml.DomainDiskTarget{Dev: "vda", Bus: "virtio"},
		}
		if s.Image.Disk != "" && o.diskFormat == "qcow2" && o.disk != s.Image.Disk {
			// The backing chain, spelt out so libvirt does not probe
			// the base's format.
			base := &libvirtxml.DomainDiskSourceFile{File: s.Image.Disk}
			if o.dacLabel == "" {
				// Without the domain-wide label (which forbids
				// per-file ones) the base still must not be
				// relabelled.
				base.SecLabel = []libvirtxml.DomainDeviceSecLabel{{Model: "dac", Relabel: "no"}}
			}
			disk.BackingStore = &libvirtxml.DomainDiskBackingStore{
				Format:       &libvirtxml.DomainDiskFormat{Type: s.Image.DiskFormat},
				Source:       &libvirtxml.DomainDiskSource{File: base},
				BackingStore: &libvirtxml.DomainDiskBackingStore{},
			}
		}
		d.Devices.Disks = []libvirtxml.DomainDisk{disk}
	}
	doc, err := d.Marshal()
	if err != nil {
		return "", fmt.Errorf("marshal domain %s: %w", s.ID, err)
	}
	return doc, nil
}

// smbiosSystem is the SMBIOS system information (type 1) of s's domain.
//
// The serial carries the NoCloud seed because that is where cloud-init's
// ds-identify looks for one (with the kernel command line). The VM's ID goes
// in the SKU: Linux lets any user read /sys/class/dmi/id/product_sku, while
// product_serial and product_uuid are root's only, and no cloud-init
// datasource reads the SKU (the chassis asset tag, for one, identifies some
// clouds). The UUID is libvirt's own domain UUID and stays so.
func smbiosSystem(s Spec) []libvirtxml.DomainSysInfoEntry {
	e := []libvirtxml.DomainSysInfoEntry{
		{Name: "manufacturer", Value: "threes"},
		{Name: "product", Value: "threes VM"},
		{Name: "sku", Value: s.ID},
	}
	if s.NoCloud != nil {
		e = append(e, libvirtxml.DomainSysInfoEntry{Name: "serial", Value: NoCloudSeed(s.NoCloud)})
	}
	return e
}

// NoCloudSeed is the NoCloud datasource seed for u, as SMBIOS serial and
// kernel command line carry it; "" for nil. cloud-init 22.4 (Debian 12)
// applies nothing from "ds=nocloud;s=http://..." (it takes that seed as a
// local one), so it is "nocloud-net", which later versions still accept.
func NoCloudSeed(u *url.URL) string {
	if u == nil {
		return ""
	}
	return "ds=nocloud-net;s=" + u.String()
}

// titleOf makes name fit libvirt's title, which must be one line.
func titleOf(name string) string {
	return strings.Join(strings.Fields(name), " ")
}

// ipText is ip for the domain's metadata: empty for the zero Addr.
func ipText(ip netip.Addr) string {
	if !ip.IsValid() {
		return ""
	}
	return ip.String()
}
