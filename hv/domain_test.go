package hv

import (
	"context"
	"encoding/xml"
	"errors"
	"net"
	"net/url"
	"strings"
	"testing"

	"github.com/digitalocean/go-libvirt"
	"libvirt.org/go/libvirtxml"

	"github.com/threes-dev/threes/hv/images"
)

func validSpec() Spec {
	return Spec{
		ID:        "vm-0123",
		Name:      "web <1> & \"co\"",
		VCPUs:     2,
		MemoryMiB: 512,
		MAC:       net.HardwareAddr{0x52, 0x54, 0x00, 0xab, 0xcd, 0x01},
		Bridge:    "threes0",
	}
}

const seed = "ds=nocloud-net;s=http://10.10.0.1/cloud-init/"

func TestDomainXML(t *testing.T) {
	for _, domainType := range []string{"test", "qemu", "kvm"} {
		t.Run(domainType, func(t *testing.T) {
			s := validSpec()
			s.NoCloud = &url.URL{Scheme: "http", Host: "10.10.0.1", Path: "/cloud-init/"}
			doc, err := domainXML(s, xmlOptions{domainType: domainType, owner: "owner-1"})
			if err != nil {
				t.Fatal(err)
			}
			var d libvirtxml.Domain
			if err := d.Unmarshal(doc); err != nil {
				t.Fatalf("parse generated XML: %v\n%s", err, doc)
			}
			if d.Type != domainType || d.Name != s.ID {
				t.Errorf("type %q name %q, want %q %q", d.Type, d.Name, domainType, s.ID)
			}
			if d.Title != s.Name {
				t.Errorf("title %q, want %q", d.Title, s.Name)
			}
			if d.VCPU == nil || d.VCPU.Value != 2 {
				t.Errorf("vcpu %+v, want 2", d.VCPU)
			}
			if d.Memory == nil || d.Memory.Value != 512 || d.Memory.Unit != "MiB" {
				t.Errorf("memory %+v, want 512 MiB", d.Memory)
			}
			if d.Features == nil || d.Features.ACPI == nil {
				t.Errorf("no <features><acpi/>")
			}
			if d.OS == nil || d.OS.Type == nil || d.OS.Type.Type != "hvm" {
				t.Errorf("os %+v, want hvm", d.OS)
			}
			if d.OS == nil || d.OS.SMBios == nil || d.OS.SMBios.Mode != "sysinfo" {
				t.Errorf("os smbios %+v, want mode sysinfo", d.OS)
			}
			if got := smbiosEntry(d, "sku"); got != s.ID {
				t.Errorf("SMBIOS system SKU %q, want the ID %q", got, s.ID)
			}
			if got := smbiosEntry(d, "serial"); got != seed {
				t.Errorf("SMBIOS system serial %q, want %q", got, seed)
			}

			devs := d.Devices
			if devs == nil || len(devs.Interfaces) != 1 {
				t.Fatalf("devices %+v, want one interface", devs)
			}
			nic := devs.Interfaces[0]
			if nic.MAC == nil || nic.MAC.Address != "52:54:00:ab:cd:01" {
				t.Errorf("MAC %+v, want 52:54:00:ab:cd:01", nic.MAC)
			}
			if nic.Source == nil || nic.Source.Bridge == nil || nic.Source.Bridge.Bridge != "threes0" {
				t.Errorf("NIC source %+v, want bridge threes0", nic.Source)
			}
			if nic.Model == nil || nic.Model.Type != "virtio" {
				t.Errorf("NIC model %+v, want virtio", nic.Model)
			}
			if len(devs.Serials) != 1 || devs.Serials[0].Source == nil || devs.Serials[0].Source.Pty == nil {
				t.Errorf("serials %+v, want one pty", devs.Serials)
			}
			if len(devs.Consoles) != 1 || devs.Consoles[0].Target == nil || devs.Consoles[0].Target.Type != "serial" {
				t.Errorf("consoles %+v, want one on the serial port", devs.Consoles)
			}

			if d.Metadata == nil {
				t.Fatal("no metadata")
			}
			var m vmMetadata
			if err := xml.Unmarshal([]byte(d.Metadata.XML), &m); err != nil {
				t.Fatalf("parse metadata %q: %v", d.Metadata.XML, err)
			}
			if m.XMLName.Space != metadataNS || m.Owner != "owner-1" || m.Name != s.Name {
				t.Errorf("metadata %+v, want namespace %s, owner owner-1, name %q", m, metadataNS, s.Name)
			}
		})
	}
}

// smbiosEntry returns the SMBIOS system entry name, "" when there is none.
func smbiosEntry(d libvirtxml.Domain, name string) string {
	for _, si := range d.SysInfo {
		if si.SMBIOS == nil || si.SMBIOS.System == nil {
			continue
		}
		for _, e := range si.SMBIOS.System.Entry {
			if e.Name == name {
				return e.Value
			}
		}
	}
	return ""
}

// TestDomainXMLNoCloud: the seed is in the SMBIOS serial and, for a kernel
// image, on the kernel command line between the image's and the caller's;
// without a seed URL neither carries one.
func TestDomainXMLNoCloud(t *testing.T) {
	kernel := images.Image{Name: "k", Kind: images.KindKernel, Kernel: "/img/vmlinuz", Cmdline: "console=ttyS0 "}
	u := &url.URL{Scheme: "http", Host: "10.10.0.1", Path: "/cloud-init/"}
	for _, tc := range []struct {
		name        string
		img         images.Image
		seed        *url.URL
		cmdline     string
		wantSerial  string
		wantCmdline string
	}{
		{"kernel with seed", kernel, u, "threes.dhcp=off", seed, "console=ttyS0 " + seed + " threes.dhcp=off"},
		{"kernel with seed only", images.Image{Name: "k", Kind: images.KindKernel, Kernel: "/k"}, u, "", seed, seed},
		{"kernel without seed", kernel, nil, "quiet", "", "console=ttyS0 quiet"},
		{"no image, seed", images.Image{}, u, "", seed, ""},
		{"https and port", kernel, &url.URL{Scheme: "https", Host: "10.10.0.1:8443", Path: "/ci/"}, "",
			"ds=nocloud-net;s=https://10.10.0.1:8443/ci/", "console=ttyS0 ds=nocloud-net;s=https://10.10.0.1:8443/ci/"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := validSpec()
			s.Image, s.NoCloud, s.Cmdline = tc.img, tc.seed, tc.cmdline
			doc, err := domainXML(s, xmlOptions{domainType: "qemu"})
			if err != nil {
				t.Fatal(err)
			}
			var d libvirtxml.Domain
			if err := d.Unmarshal(doc); err != nil {
				t.Fatal(err)
			}
			if got := smbiosEntry(d, "serial"); got != tc.wantSerial {
				t.Errorf("SMBIOS serial %q, want %q", got, tc.wantSerial)
			}
			if got := smbiosEntry(d, "sku"); got != s.ID {
				t.Errorf("SMBIOS SKU %q, want the ID %q", got, s.ID)
			}
			if d.OS.Cmdline != tc.wantCmdline {
				t.Errorf("kernel command line %q, want %q", d.OS.Cmdline, tc.wantCmdline)
			}
		})
	}
}

func TestDomainXMLTitleIsOneLine(t *testing.T) {
	s := validSpec()
	s.Name = "two\nlines  here"
	doc, err := domainXML(s, xmlOptions{domainType: "test"})
	if err != nil {
		t.Fatal(err)
	}
	var d libvirtxml.Domain
	if err := d.Unmarshal(doc); err != nil {
		t.Fatal(err)
	}
	if d.Title != "two lines here" {
		t.Errorf("title %q, want %q", d.Title, "two lines here")
	}
}

func TestSpecValidate(t *testing.T) {
	tests := []struct {
		name   string
		change func(*Spec)
		ok     bool
	}{
		{"valid", func(*Spec) {}, true},
		{"no name", func(s *Spec) { s.Name = "" }, true},
		{"empty ID", func(s *Spec) { s.ID = "" }, false},
		{"slash in ID", func(s *Spec) { s.ID = "a/b" }, false},
		{"space around ID", func(s *Spec) { s.ID = " a" }, false},
		{"zero vCPUs", func(s *Spec) { s.VCPUs = 0 }, false},
		{"negative memory", func(s *Spec) { s.MemoryMiB = -1 }, false},
		{"short MAC", func(s *Spec) { s.MAC = s.MAC[:5] }, false},
		{"long MAC", func(s *Spec) { s.MAC, _ = net.ParseMAC("00:00:00:00:fe:80:00:00:00:00:00:00:02:00:5e:10:00:00:00:01") }, false},
		{"no MAC", func(s *Spec) { s.MAC = nil }, false},
		{"multicast MAC", func(s *Spec) { s.MAC = net.HardwareAddr{0x01, 0x00, 0x5e, 0, 0, 1} }, false},
		{"broadcast MAC", func(s *Spec) { s.MAC = net.HardwareAddr{0xff, 0xff, 0xff, 0xff, 0xff, 0xff} }, false},
		{"zero MAC", func(s *Spec) { s.MAC = make(net.HardwareAddr, 6) }, false},
		{"no bridge", func(s *Spec) { s.Bridge = "" }, false},
		{"seed", func(s *Spec) { s.NoCloud = &url.URL{Scheme: "http", Host: "10.10.0.1", Path: "/cloud-init/"} }, true},
		{"seed without slash", func(s *Spec) { s.NoCloud = &url.URL{Scheme: "http", Host: "10.10.0.1", Path: "/cloud-init"} }, false},
		{"seed without host", func(s *Spec) { s.NoCloud = &url.URL{Scheme: "http", Path: "/cloud-init/"} }, false},
		{"seed not http", func(s *Spec) { s.NoCloud = &url.URL{Scheme: "file", Host: "x", Path: "/seed/"} }, false},
		{"seed with space", func(s *Spec) {
			s.NoCloud = &url.URL{Scheme: "http", Host: "10.10.0.1", RawPath: "/a b/", Path: "/a b/"}
		}, true},
		{"seed with semicolon", func(s *Spec) { s.NoCloud = &url.URL{Scheme: "http", Host: "10.10.0.1", Path: "/a/", RawQuery: "x;y=/"} }, false},
		{"seed with opaque space", func(s *Spec) { s.NoCloud = &url.URL{Scheme: "http", Host: "10.10.0.1", Opaque: "//10.10.0.1/a b/"} }, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := validSpec()
			tt.change(&s)
			_, err := domainXML(s, xmlOptions{domainType: "test"})
			if tt.ok && err != nil {
				t.Errorf("domainXML: %v", err)
			}
			if !tt.ok && !errors.Is(err, ErrInvalidSpec) {
				t.Errorf("domainXML error %v, want ErrInvalidSpec", err)
			}
		})
	}
}

func TestStateOf(t *testing.T) {
	tests := []struct {
		in   libvirt.DomainState
		want State
	}{
		{libvirt.DomainNostate, StateUnknown},
		{libvirt.DomainRunning, StateRunning},
		{libvirt.DomainBlocked, StateRunning},
		{libvirt.DomainPaused, StatePaused},
		{libvirt.DomainShutdown, StateStopping},
		{libvirt.DomainShutoff, StateStopped},
		{libvirt.DomainCrashed, StateCrashed},
		{libvirt.DomainPmsuspended, StatePaused},
		{libvirt.DomainState(99), StateUnknown},
	}
	for _, tt := range tests {
		if got := stateOf(tt.in, 0); got != tt.want {
			t.Errorf("stateOf(%d) = %q, want %q", tt.in, got, tt.want)
		}
	}
}

func TestOpenRejectsConfig(t *testing.T) {
	tests := []struct {
		name string
		cfg  Config
		want string
	}{
		{"unknown domain type", Config{URI: "test:///default", DomainType: "xen"}, "unknown libvirt domain type"},
		{"remote URI", Config{URI: "qemu+ssh://host/system"}, "names a transport or host"},
		{"host in URI", Config{URI: "qemu://host/system"}, "names a transport or host"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			// Socket points nowhere: Open must fail before dialing.
			tt.cfg.Socket = t.TempDir() + "/none"
			_, err := Open(context.Background(), tt.cfg)
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Errorf("Open error %v, want one containing %q", err, tt.want)
			}
		})
	}
}

func TestOpenNoLibvirtd(t *testing.T) {
	_, err := Open(context.Background(), Config{URI: "test:///default", Socket: t.TempDir() + "/none"})
	if !errors.Is(err, ErrUnavailable) {
		t.Errorf("Open error %v, want ErrUnavailable", err)
	}
}
