package hv

import (
	"os"
	"path/filepath"
	"testing"
	"time"
)

// TestVerdictKept: the KVM probe's verdict is reused on the same host only.
func TestVerdictKept(t *testing.T) {
	file := filepath.Join(t.TempDir(), "kvm-verdict.json")
	if _, ok := readVerdict(file, "host-a"); ok {
		t.Fatal("a verdict before any was written")
	}
	want := verdict{Host: "host-a", DomainType: "qemu", Reason: "probe guest did not boot", At: time.Now()}
	writeVerdict(file, want)
	got, ok := readVerdict(file, "host-a")
	if !ok || got.DomainType != "qemu" || got.Reason != want.Reason {
		t.Errorf("readVerdict = %+v, %v; want %+v", got, ok, want)
	}
	if _, ok := readVerdict(file, "host-b"); ok {
		t.Error("another host's verdict was reused")
	}
	if _, ok := readVerdict("", "host-a"); ok {
		t.Error("a verdict with no file")
	}
	os.WriteFile(file, []byte(`{"host": "host-a", "domain_type": "xen"}`), 0o644)
	if _, ok := readVerdict(file, "host-a"); ok {
		t.Error("a verdict naming no domain type threes uses")
	}
}
