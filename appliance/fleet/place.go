package fleet

// Capacity is what a host offers its VMs: its own CPUs and memory, and how many
// times over the VMs' sizes may promise them.
type Capacity struct {
	VCPUs     int
	MemoryMiB int
	// CPUOvercommit and MemoryOvercommit multiply VCPUs and MemoryMiB.
	CPUOvercommit    float64
	MemoryOvercommit float64
}
