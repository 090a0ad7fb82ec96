package appliance_test

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/threes-dev/threes/appliance/threestest"
	threesv1 "github.com/threes-dev/threes/proto/threes/v1"
	"github.com/threes-dev/threes/tsauth"
	"github.com/threes-dev/threes/tsauth/tailnettest"
)

// benchEnv is one appliance reachable two ways: over the tailnet by a granted node
// (WhoIs-based identity included) and over plain loopback TCP with a fixed identity.
type benchEnv struct {
	tailnet, loopback threesv1.ThreesClient
	vm                *threesv1.VM
}

func startBench(b *testing.B, vms int) benchEnv {
	env := threestest.Start(b)
	ctx := context.Background()
	admin := env.Client(b, threestest.ClientOptions{NodeOptions: tailnettest.NodeOptions{Hostname: "bench", User: "bench@example.com"}, Role: "admin"})

	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	env.Appliance.ServeAs(ln, tsauth.Principal{Login: "bench@example.com", Role: tsauth.RoleAdmin})
	conn, err := grpc.NewClient(ln.Addr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { conn.Close() })

	if _, err := admin.CreateNetwork(ctx, &threesv1.NetworkRequest{Name: "bench"}); err != nil {
		b.Fatal(err)
	}
	be := benchEnv{tailnet: admin, loopback: threesv1.NewThreesClient(conn)}
	for i := range vms {
		vm, err := admin.Create(ctx, &threesv1.CreateRequest{Name: fmt.Sprintf("bench-%d", i), Network: "bench", Image: "base", Type: threesv1.VMType_VM_TYPE_TEENY})
		if err != nil {
			b.Fatal(err)
		}
		be.vm = vm
	}
	// Warm both paths (connections, identity cache) before measuring.
	for _, c := range []threesv1.ThreesClient{be.tailnet, be.loopback} {
		if _, err := c.Get(ctx, &threesv1.VMRef{Id: be.vm.GetId()}); err != nil {
			b.Fatal(err)
		}
	}
	return be
}

// BenchmarkGet times a unary Get over the tailnet (identity check included) and over
// loopback TCP, interleaved so that machine load hits both alike, and reports the ratio.
func BenchmarkGet(b *testing.B) {
	be := startBench(b, 1)
	ctx := context.Background()
	ref := &threesv1.VMRef{Id: be.vm.GetId()}
	var ts, lo time.Duration
	b.ResetTimer()
	for range b.N {
		t0 := time.Now()
		if _, err := be.tailnet.Get(ctx, ref); err != nil {
			b.Fatal(err)
		}
		t1 := time.Now()
		if _, err := be.loopback.Get(ctx, ref); err != nil {
			b.Fatal(err)
		}
		ts, lo = ts+t1.Sub(t0), lo+time.Since(t1)
	}
	b.ReportMetric(float64(ts.Nanoseconds())/float64(b.N), "tailnet-ns/get")
	b.ReportMetric(float64(lo.Nanoseconds())/float64(b.N), "loopback-ns/get")
	b.ReportMetric(float64(ts)/float64(lo), "tailnet/loopback")
}

// BenchmarkAll streams every VM (200 of them) over both paths, and reports messages
// per second on each.
func BenchmarkAll(b *testing.B) {
	const vms = 200
	be := startBench(b, vms)
	ctx := context.Background()
	stream := func(c threesv1.ThreesClient) {
		s, err := c.All(ctx, &threesv1.AllRequest{})
		if err != nil {
			b.Fatal(err)
		}
		n := 0
		for {
			_, err := s.Recv()
			if errors.Is(err, io.EOF) {
				break
			}
			if err != nil {
				b.Fatal(err)
			}
			n++
		}
		if n != vms {
			b.Fatalf("streamed %d VMs, want %d", n, vms)
		}
	}
	var ts, lo time.Duration
	b.ResetTimer()
	for range b.N {
		t0 := time.Now()
		stream(be.tailnet)
		t1 := time.Now()
		stream(be.loopback)
		ts, lo = ts+t1.Sub(t0), lo+time.Since(t1)
	}
	msgs := float64(vms * b.N)
	b.ReportMetric(msgs/ts.Seconds(), "tailnet-msgs/s")
	b.ReportMetric(msgs/lo.Seconds(), "loopback-msgs/s")
	b.ReportMetric(float64(ts)/float64(lo), "tailnet/loopback")
}

// BenchmarkCreate creates VMs over the tailnet: validation, address, database record
// and a domain on libvirt's test driver through libvirtd.
func BenchmarkCreate(b *testing.B) {
	be := startBench(b, 1)
	ctx := context.Background()
	b.ResetTimer()
	for i := range b.N {
		_, err := be.tailnet.Create(ctx, &threesv1.CreateRequest{Name: fmt.Sprintf("new-%d", i), Network: "bench", Image: "base", Type: threesv1.VMType_VM_TYPE_TEENY})
		if err != nil {
			b.Fatal(err)
		}
	}
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "creates/s")
}
