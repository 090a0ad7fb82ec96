package hv

import (
	"encoding/xml"
	"fmt"
	"net"
	"strings"

	"libvirt.org/go/libvirtxml"
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
}

// validate reports what is wrong with s, if anything.
func (s Spec) validate() error {
	switch {
	case s.ID == "":
		return fmt.Errorf("%w: empty ID", ErrInvalidSpec)
	case strings.ContainsAny(s.ID, "/\x00") || strings.TrimSpace(s.ID) != s.ID:
		// libvirt names become file names for persistent domains.
		return fmt.Errorf("%w: ID %q has a slash, NUL or surrounding space", ErrInvalidSpec, s.ID)
	case s.VCPUs < 1:
		return fmt.Errorf("%w: %d vCPUs", ErrInvalidSpec, s.VCPUs)
	case s.MemoryMiB < 1:
		return fmt.Errorf("%w: %d MiB of memory", ErrInvalidSpec, s.MemoryMiB)
	case s.Bridge == "":
		return fmt.Errorf("%w: empty bridge", ErrInvalidSpec)
	}
	mac, err := net.ParseMAC(s.MAC)
	if err != nil || len(mac) != 6 {
		return fmt.Errorf("%w: MAC %q is not a 6-byte MAC address", ErrInvalidSpec, s.MAC)
	}
	return nil
}

// domainXML returns the libvirt definition of s as a domain of the given
// libvirt domain type ("test", "qemu" or "kvm"), marked as owner's.
func domainXML(domainType string, s Spec, owner string) (string, error) {
	if err := s.validate(); err != nil {
		return "", err
	}
	meta, err := xml.Marshal(vmMetadata{Owner: owner, Name: s.Name})
	if err != nil {
		return "", fmt.Errorf("marshal metadata of domain %s: %w", s.ID, err)
	}
	mac, _ := net.ParseMAC(s.MAC) // validated above
	port := uint(0)
	d := &libvirtxml.Domain{
		Type:     domainType,
		Name:     s.ID,
		Title:    titleOf(s.Name),
		Metadata: &libvirtxml.DomainMetadata{XML: string(meta)},
		Memory:   &libvirtxml.DomainMemory{Value: uint(s.MemoryMiB), Unit: "MiB"},
		VCPU:     &libvirtxml.DomainVCPU{Value: uint(s.VCPUs)},
		// The guest reads its ID from the SMBIOS system serial
		// (/sys/class/dmi/id/product_serial) to ask for its metadata.
		SysInfo: []libvirtxml.DomainSysInfo{{
			SMBIOS: &libvirtxml.DomainSysInfoSMBIOS{
				System: &libvirtxml.DomainSysInfoSystem{
					Entry: []libvirtxml.DomainSysInfoEntry{
						{Name: "manufacturer", Value: "threes"},
						{Name: "product", Value: "threes VM"},
						{Name: "serial", Value: s.ID},
					},
				},
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
				MAC: &libvirtxml.DomainInterfaceMAC{Address: mac.String()},
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
	doc, err := d.Marshal()
	if err != nil {
		return "", fmt.Errorf("marshal domain %s: %w", s.ID, err)
	}
	return doc, nil
}

// titleOf makes name fit libvirt's title, which must be one line.
func titleOf(name string) string {
	return strings.Join(strings.Fields(name), " ")
}
