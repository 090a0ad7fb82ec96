package appliance_test

import (
	"bufio"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/threes-dev/threes/appliance/threestest"
	"github.com/threes-dev/threes/internal/netnstest"
	threesv1 "github.com/threes-dev/threes/proto/threes/v1"
)

// TestMetadataPort: with Options.MetadataPort the metadata server answers a VM on
// that port of the gateway, and nothing listens on port 80.
func TestMetadataPort(t *testing.T) {
	netnstest.Require(t)
	env := threestest.Start(t)
	ns := netnstest.NewNS(t, "mdport")
	ns.Bridge(t, "br-mp", "10.78.0.1/24")
	env.Options.BridgeNetNS, env.Options.Bridge, env.Options.CIDR = ns.Name, "br-mp", "10.78.0.0/24"
	env.Options.MetadataPort = 8169
	restartWith(t, env, -1)
	ctx := ctxT(t)
	c := env.Local(t)
	must[*threesv1.Network](t)(c.CreateNetwork(ctx, &threesv1.NetworkRequest{Name: "lab"}))
	vm := must[*threesv1.VM](t)(c.Create(ctx, &threesv1.CreateRequest{Name: "ported", Network: "lab", Image: "base", Type: threesv1.VMType_VM_TYPE_TEENY}))

	hw, err := net.ParseMAC(vm.GetMac())
	if err != nil {
		t.Fatal(err)
	}
	guest := ns.Plug(t, "br-mp", "mpvm", hw, vm.GetManagementIp()+"/24")
	get := func(port string) (string, error) {
		var conn net.Conn
		if err := guest.Do(func() (err error) {
			conn, err = net.DialTimeout("tcp", "10.78.0.1:"+port, 10*time.Second)
			return err
		}); err != nil {
			return "", err
		}
		defer conn.Close()
		req, _ := http.NewRequest("GET", "http://10.78.0.1:"+port+"/v1/hostname", nil)
		if err := req.Write(conn); err != nil {
			return "", err
		}
		conn.SetReadDeadline(time.Now().Add(10 * time.Second))
		resp, err := http.ReadResponse(bufio.NewReader(conn), req)
		if err != nil {
			return "", err
		}
		var body strings.Builder
		bufio.NewReader(resp.Body).WriteTo(&body)
		return resp.Status + " " + strings.TrimSpace(body.String()), nil
	}
	if got, err := get("8169"); err != nil || got != "200 OK ported" {
		t.Fatalf("metadata on port 8169 = %q, %v; want 200 OK ported", got, err)
	}
	if got, err := get("80"); err == nil {
		t.Fatalf("port 80 answered %q with the metadata server moved to 8169", got)
	}
}
