package fleet

import (
	"fmt"
	"slices"
	"strings"
)

// Size is what a VM type gets from the host.
type Size struct {
	Type      string // teeny, small, middy, biggun, fatlad
	VCPUs     int
	MemoryMiB int
	DiskGiB   int
}

// Sizes is the one table of VM types, smallest first.
var Sizes = []Size{
	{Type: "teeny", VCPUs: 1, MemoryMiB: 512, DiskGiB: 5},
	{Type: "small", VCPUs: 1, MemoryMiB: 1024, DiskGiB: 10},
	{Type: "middy", VCPUs: 2, MemoryMiB: 2048, DiskGiB: 20},
	{Type: "biggun", VCPUs: 4, MemoryMiB: 4096, DiskGiB: 40},
	{Type: "fatlad", VCPUs: 8, MemoryMiB: 8192, DiskGiB: 80},
}

// SizeOf returns the Size of a VM type by name.
func SizeOf(typ string) (Size, error) {
	i := slices.IndexFunc(Sizes, func(s Size) bool { return s.Type == typ })
	if i < 0 {
		return Size{}, fieldErr("type", "unknown type %q: want one of %s", typ, SizeNames())
	}
	return Sizes[i], nil
}

// SizeNames lists the VM types, for messages.
func SizeNames() string {
	names := make([]string, len(Sizes))
	for i, s := range Sizes {
		names[i] = s.Type
	}
	return strings.Join(names, ", ")
}

func (s Size) String() string {
	return fmt.Sprintf("%s (%d vCPU, %d MiB)", s.Type, s.VCPUs, s.MemoryMiB)
}
