package embeddb

import (
	"context"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// createClients is how many callers create VM records at once in
// BenchmarkClusterCreateVM: several, as an appliance serving several API
// callers and its own reconcile loop would, so the figure is throughput
// under load and the latencies include waiting behind the others.
const createClients = 4

// BenchmarkClusterCreateVM measures VM record creates (CreateVM: three
// inserts in one Raft entry) from createClients concurrent callers on one
// node ("1node", the peer) and on a cluster of three nodes on an in-memory
// network, called on the leader ("3nodes-leader") and on a follower, which
// carries each create to the leader on a connection of its own
// ("3nodes-follower"). All nodes share this machine's disk, as they would
// not on three hosts. Metrics: creates/s, and the p50 and p99 latency of
// one create in milliseconds.
func BenchmarkClusterCreateVM(b *testing.B) {
	one := newTestCluster(b, 1)
	single := one.mustOpen(0, nil)
	mustNetwork(b, single, "bench")
	three := newTestCluster(b, 3)
	dbs := three.openExpect()
	mustNetwork(b, dbs[0], "bench")
	var next atomicCounter // VM numbers, unique across the runs
	b.Run("1node", func(b *testing.B) { benchCreates(b, single, &next) })
	b.Run("3nodes-leader", func(b *testing.B) { benchCreates(b, dbs[three.leader()], &next) })
	b.Run("3nodes-follower", func(b *testing.B) { benchCreates(b, dbs[(three.leader()+1)%3], &next) })
}

// benchCreates makes b.N VM records through db from createClients callers
// and reports creates/s and the p50 and p99 latency.
func benchCreates(b *testing.B, db *DB, next *atomicCounter) {
	ctx := context.Background()
	lat := make([][]time.Duration, createClients)
	var left atomic.Int64
	left.Store(int64(b.N))
	var wg sync.WaitGroup
	b.ResetTimer()
	for c := range createClients {
		wg.Go(func() {
			for left.Add(-1) >= 0 {
				vm, cfg, addr := fixture(next.add(), "bench")
				start := time.Now()
				if err := db.CreateVM(ctx, vm, cfg, addr); err != nil {
					b.Errorf("create %s: %v", vm.ID, err)
					return
				}
				lat[c] = append(lat[c], time.Since(start))
			}
		})
	}
	wg.Wait()
	b.StopTimer()
	all := slices.Concat(lat...)
	if len(all) == 0 {
		return
	}
	slices.Sort(all)
	b.ReportMetric(float64(len(all))/b.Elapsed().Seconds(), "creates/s")
	b.ReportMetric(percentile(all, 50).Seconds()*1000, "p50-ms")
	b.ReportMetric(percentile(all, 99).Seconds()*1000, "p99-ms")
}

// percentile returns the p'th percentile of sorted durations (nearest rank).
func percentile(sorted []time.Duration, p int) time.Duration {
	i := (len(sorted)*p+99)/100 - 1
	return sorted[max(i, 0)]
}
