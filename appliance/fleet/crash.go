package fleet

import "os"

// Create's steps, in order, at whose end the crash hook can stop the process.
const (
	stepAddressReserved = "address-reserved"
	stepKeyMinted       = "key-minted" // only with a control plane
	stepRecordWritten   = "record-written"
	stepKVsWritten      = "kvs-written" // only with key/values
	stepDomainCreated   = "domain-created"
	stepStateRunning    = "state-running"
)

// CreateSteps returns the names of Create's steps, in order, that the crash hook
// accepts.
func CreateSteps() []string {
	return []string{stepAddressReserved, stepKeyMinted, stepRecordWritten, stepKVsWritten, stepDomainCreated, stepStateRunning}
}

// CrashExitCode is the exit status of a process that the crash hook stopped.
const CrashExitCode = 86

// crashAt names the step after which Create ends the process. Only a binary built
// with the threes_testhooks tag sets it (crashhook.go, from THREES_TEST_CRASH_AT);
// in every other build it stays empty and crashPoint does nothing.
var crashAt string

// crashPoint is the crash test's hook: it ends the process, as a crash or a power
// cut would, at the end of Create's step when crashAt names it.
func (f *Fleet) crashPoint(step string) {
	if crashAt != "" && crashAt == step {
		f.log.Error("test hook: exiting in the middle of a create", "step", step)
		os.Exit(CrashExitCode)
	}
}
