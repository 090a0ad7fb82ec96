// Package appliance is the threes server: it wires the tailnet node, the embedded
// database, the hypervisor and the local bridge services together, serves the gRPC API,
// authorises every call, and owns the VM lifecycle (create, start, stop, delete, purge)
// including undoing a create that fails halfway.
//
// It does not talk to libvirt, rqlite, the kernel or the control plane itself: those are
// hv, embeddb, netboot and tsauth, each behind a small interface or type.
package appliance
