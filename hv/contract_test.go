package hv_test

import (
	"testing"
	"time"

	"github.com/threes-dev/threes/hv"
	"github.com/threes-dev/threes/hv/hvtest"
)

// TestContractTestDriver runs hvtest's contract suite, which hvtest.Memory
// passes too, against Libvirt on libvirt's test driver.
func TestContractTestDriver(t *testing.T) {
	hvtest.Contract(t, hvtest.TestDriverTarget(t))
}

// TestContractQEMU runs the contract suite against Libvirt on QEMU, booting
// the test image.
func TestContractQEMU(t *testing.T) {
	q := hvtest.OpenQEMU(t, hv.Config{StopTimeout: 2 * time.Minute})
	hvtest.Contract(t, hvtest.QEMUTarget(t, q))
}
