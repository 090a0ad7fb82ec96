package hv_test

import (
	"context"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/threes-dev/threes/hv"
	"github.com/threes-dev/threes/hv/hvtest"
	"github.com/threes-dev/threes/hv/images"
)

// benchImage imports the 1 GiB benchmark disk (with the test image's
// kernel) into q's store.
func benchImage(b *testing.B, q *hvtest.QEMU) images.Image {
	b.Helper()
	dir := hvtest.TestImageDir(b)
	if _, err := os.Stat(filepath.Join(dir, "bench-1g.qcow2")); err != nil {
		hvtest.Skip(b, "no 1 GiB benchmark disk (%v): rebuild the test image with scripts/mkimage", err)
	}
	cmdline, err := os.ReadFile(filepath.Join(dir, "cmdline"))
	if err != nil {
		b.Fatal(err)
	}
	img, err := q.Images.Import(context.Background(), "bench-1g", images.Source{
		Kernel:  filepath.Join(dir, "vmlinuz"),
		Initrd:  filepath.Join(dir, "initrd.img"),
		Disk:    filepath.Join(dir, "bench-1g.qcow2"),
		Cmdline: strings.TrimSpace(string(cmdline)),
	})
	if err != nil {
		b.Fatal(err)
	}
	return img
}

// reportSideBySide reports the mean of each measurement in ms and the
// copy/overlay ratio.
func reportSideBySide(b *testing.B, n int, overlay, full, small time.Duration) {
	ms := func(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 / float64(n) }
	b.ReportMetric(ms(overlay), "overlay-ms/op")
	b.ReportMetric(ms(full), "copy-ms/op")
	b.ReportMetric(ms(small), "overlay64MiB-ms/op")
	b.ReportMetric(float64(full)/float64(overlay), "copy/overlay")
}

// BenchmarkCreate1GiB measures Create, from the call to the domain running,
// with a base image holding 1 GiB of data: the VM's disk as a qcow2 overlay
// (what hv does) against a full copy of the image (what the original did),
// side by side in each iteration, plus an overlay on the 64 MiB test disk to
// show that an overlay's cost does not grow with the image. The Spec has an
// IP, as the appliance's do, so the tap's anti-spoofing rules are set up in
// full.
// Removing the VMs is not timed.
func BenchmarkCreate1GiB(b *testing.B) {
	ctx := context.Background()
	q := hvtest.OpenQEMU(b, hv.Config{})
	big := benchImage(b, q)
	create := func(img images.Image, copyDisk bool) time.Duration {
		hv.SetCopyDisks(q.H, copyDisk)
		s := q.Spec(b)
		s.Image, s.IP = img, netip.MustParseAddr("10.10.0.9")
		start := time.Now()
		if err := q.H.Create(ctx, s); err != nil {
			b.Fatal(err)
		}
		d := time.Since(start)
		if err := q.H.Remove(ctx, s.ID); err != nil {
			b.Fatal(err)
		}
		return d
	}
	var overlay, full, small time.Duration
	n := 0
	for b.Loop() {
		overlay += create(big, false)
		full += create(big, true)
		small += create(q.Image, false)
		n++
	}
	reportSideBySide(b, n, overlay, full, small)
}

// BenchmarkDisk1GiB measures Create's disk step alone, as
// BenchmarkCreate1GiB does the whole: an overlay on the 1 GiB image against
// a full copy of it, and an overlay on the 64 MiB one.
func BenchmarkDisk1GiB(b *testing.B) {
	ctx := context.Background()
	q := hvtest.OpenQEMU(b, hv.Config{DomainType: "qemu"})
	big := benchImage(b, q)
	disk := func(img images.Image, copyDisk bool) time.Duration {
		hv.SetCopyDisks(q.H, copyDisk)
		s := q.Spec(b)
		s.Image = img
		start := time.Now()
		if err := hv.CreateDisk(ctx, q.H, s); err != nil {
			b.Fatal(err)
		}
		d := time.Since(start)
		if err := hv.RemoveDisk(q.H, s.ID); err != nil {
			b.Fatal(err)
		}
		return d
	}
	var overlay, full, small time.Duration
	n := 0
	for b.Loop() {
		overlay += disk(big, false)
		full += disk(big, true)
		small += disk(q.Image, false)
		n++
	}
	reportSideBySide(b, n, overlay, full, small)
}
