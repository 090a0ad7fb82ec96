package appliance_test

import (
	"encoding/binary"
	"errors"
	"io"
	"net"
	"net/netip"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/protobuf/proto"
	"tailscale.com/net/memnet"

	"github.com/threes-dev/threes/appliance"
	"github.com/threes-dev/threes/appliance/fleet"
	"github.com/threes-dev/threes/appliance/threestest"
	"github.com/threes-dev/threes/embeddb"
	"github.com/threes-dev/threes/hv/hvtest"
	threesv1 "github.com/threes-dev/threes/proto/threes/v1"
	"github.com/threes-dev/threes/tsauth"
	"github.com/threes-dev/threes/tsauth/tailnettest"

	cproto "github.com/rqlite/rqlite/v8/cluster/proto"
	rproto "github.com/rqlite/rqlite/v8/command/proto"
)

// TestClusterTwoAppliances starts one appliance as a cluster of one on the
// tailnet and a second that joins it by name: a network created through
// either is listed by the other. A tailnet node without the appliance tag
// that reaches the database port and asks for a backup gets nothing. The
// joiner, restarted on its state, is a member again without being told.
func TestClusterTwoAppliances(t *testing.T) {
	env := threestest.StartWith(t, func(o *appliance.Options) {
		o.Hostname = "threes-a"
		o.Tags = []string{fleet.DefaultOwnerTag}
		o.BootstrapExpect = 1
	})
	ctx := ctxT(t)

	dirB := t.TempDir()
	optsB := env.Options
	optsB.Hostname = "threes-b"
	optsB.StateDir = dirB
	optsB.Socket = filepath.Join(dirB, "threes.sock")
	optsB.Hypervisor = hvtest.Open(t)
	optsB.BootstrapExpect = 0
	optsB.Join = []string{"threes-a"}
	optsB.Ephemeral = false // keeps its tailnet IP across the restart below
	b, err := appliance.Start(ctx, optsB)
	if err != nil {
		t.Fatalf("start the joining appliance: %v", err)
	}
	t.Cleanup(func() { b.Close() })

	local := func(sock string) threesv1.ThreesClient {
		conn, err := grpc.NewClient("unix:"+sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { conn.Close() })
		return threesv1.NewThreesClient(conn)
	}
	apiA, apiB := env.Local(t), local(optsB.Socket)
	listed := func(api threesv1.ThreesClient) []string {
		res, err := api.ListNetworks(ctx, &threesv1.ListNetworksRequest{})
		if err != nil {
			t.Fatalf("list networks: %v", err)
		}
		var names []string
		for _, n := range res.GetNetworks() {
			names = append(names, n.GetName())
		}
		return names
	}
	if _, err := apiA.CreateNetwork(ctx, &threesv1.NetworkRequest{Name: "made-on-a"}); err != nil {
		t.Fatalf("create network on a: %v", err)
	}
	if got := listed(apiB); !slices.Contains(got, "made-on-a") {
		t.Fatalf("b lists %v, want made-on-a", got)
	}
	if _, err := apiB.CreateNetwork(ctx, &threesv1.NetworkRequest{Name: "made-on-b"}); err != nil {
		t.Fatalf("create network on b: %v", err)
	}
	if got := listed(apiA); !slices.Contains(got, "made-on-b") {
		t.Fatalf("a lists %v, want made-on-b", got)
	}

	// A stranger on the tailnet asks a's cluster service for a backup.
	stranger := env.Tailnet.Node(t, tailnettest.NodeOptions{Hostname: "stranger", User: "eve@example.com"})
	conn, err := tsauth.TailnetDialer(stranger)(ctx, "tcp", netip.AddrPortFrom(env.IP, appliance.RaftPort).String())
	if err != nil {
		t.Fatalf("dial a's database port: %v", err)
	}
	defer conn.Close()
	p, err := proto.Marshal(&cproto.Command{
		Type:    cproto.Command_COMMAND_TYPE_BACKUP,
		Request: &cproto.Command_BackupRequest{BackupRequest: &rproto.BackupRequest{Format: rproto.BackupRequest_BACKUP_REQUEST_FORMAT_BINARY}},
	})
	if err != nil {
		t.Fatal(err)
	}
	conn.SetDeadline(time.Now().Add(30 * time.Second))
	conn.Write(append(append([]byte{2}, binary.LittleEndian.AppendUint64(nil, uint64(len(p)))...), p...))
	// Closed with the request unread, the connection may end in a reset
	// rather than EOF; either way nothing comes back. A timeout would mean the
	// gate left it open.
	got, err := io.ReadAll(conn)
	var ne net.Error
	if len(got) != 0 || errors.As(err, &ne) && ne.Timeout() {
		t.Fatalf("stranger's backup request got %d bytes (%v); want the connection closed with nothing", len(got), err)
	}
	t.Logf("stranger's backup request: connection closed with nothing (%v)", err)

	if err := b.Close(); err != nil {
		t.Logf("close b: %v", err)
	}
	optsB.Join = nil // a member needs no join
	b2, err := appliance.Start(ctx, optsB)
	if err != nil {
		t.Fatalf("restart b: %v", err)
	}
	t.Cleanup(func() { b2.Close() })
	apiB = local(optsB.Socket)
	if _, err := apiB.CreateNetwork(ctx, &threesv1.NetworkRequest{Name: "made-on-b-again"}); err != nil {
		t.Fatalf("create network on restarted b: %v", err)
	}
	if got := listed(apiA); !slices.Contains(got, "made-on-b-again") {
		t.Fatalf("a lists %v, want made-on-b-again", got)
	}

	// A host that already has a database of its own cannot join: its Raft
	// address is in memory, where no peer could reach it.
	optsC := optsB
	optsC.Hostname = "threes-c"
	optsC.StateDir = t.TempDir()
	optsC.Socket = filepath.Join(optsC.StateDir, "threes.sock")
	optsC.Join = []string{"threes-a"}
	db, err := embeddb.Open(ctx, embeddb.Config{Dir: filepath.Join(optsC.StateDir, "db"), NodeID: "threes-c", Listener: memnet.Listen("threes-raft:4002")})
	if err != nil {
		t.Fatal(err)
	}
	db.Close()
	if c, err := appliance.Start(ctx, optsC); err == nil || !strings.Contains(err.Error(), "only a host with no database yet can join") {
		if c != nil {
			c.Close()
		}
		t.Fatalf("a host with its own database joining = %v, want a refusal", err)
	}
}
