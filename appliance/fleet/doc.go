// Package fleet is threes' domain core: the VMs of this host and what they need.
// Every change to a VM (create, start, stop, restart, delete, purge, its
// key/values, its console), to a network and to the base images goes through a
// Fleet, under the VM's lock, in an order that leaves nothing behind when a step
// fails. In the background it follows libvirt's events, reconciles the database
// with libvirt and the disks, and records the phases a new VM reaches on its way
// onto the tailnet.
//
// It imports neither the gRPC API nor tsnet: package appliance serves it. It
// works with the database (embeddb), the hypervisor (hv.Hypervisor, which
// hvtest.Memory stands in for in the fast tests), the IPAM (netboot/ipam) and the
// tailnet's control plane (tsauth/control). Validation of names, IDs, keys and
// sizes lives here too, so the CLI checks what the server checks.
package fleet
