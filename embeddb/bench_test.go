package embeddb

import (
	"context"
	"testing"
)

// BenchmarkCreateVM measures CreateVM (three inserts in one Raft entry, one
// fsync) one after another on one node.
func BenchmarkCreateVM(b *testing.B) {
	ctx := context.Background()
	db := newDB(b)
	mustNetwork(b, db, "cool")
	b.ResetTimer()
	for i := range b.N {
		vm, cfg, addr := fixture(i+1, "cool")
		if err := db.CreateVM(ctx, vm, cfg, addr); err != nil {
			b.Fatal(err)
		}
	}
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "records/s")
}

// BenchmarkCreateVMParallel is CreateVM from concurrent callers, which rqlite
// does not batch: each is its own Raft entry.
func BenchmarkCreateVMParallel(b *testing.B) {
	ctx := context.Background()
	db := newDB(b)
	mustNetwork(b, db, "cool")
	var next atomicCounter
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			vm, cfg, addr := fixture(next.add(), "cool")
			if err := db.CreateVM(ctx, vm, cfg, addr); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "records/s")
}

// BenchmarkGetVM measures a linearizable read of one VM out of 1,000.
func BenchmarkGetVM(b *testing.B) {
	ctx := context.Background()
	db := newDB(b)
	mustNetwork(b, db, "cool")
	const n = 1000
	for i := 1; i <= n; i++ {
		mustCreateVM(b, db, i, "cool")
	}
	ids := make([]string, n)
	for i := range ids {
		vm, _, _ := fixture(i+1, "cool")
		ids[i] = vm.ID
	}
	b.ResetTimer()
	for i := range b.N {
		if _, err := db.GetVM(ctx, ids[i%n]); err != nil {
			b.Fatal(err)
		}
	}
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "reads/s")
}
