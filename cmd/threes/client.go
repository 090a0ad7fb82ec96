package main

import (
	"context"
	"fmt"
	"net"
	"strconv"
	"time"

	"github.com/spf13/cobra"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
	"tailscale.com/client/local"

	"github.com/threes-dev/threes/appliance/fleet"
	threesv1 "github.com/threes-dev/threes/proto/threes/v1"
)

// connect opens a connection to the server and returns the API and a context bounded
// by --timeout; main closes the connection when the command is done. The transport
// is plain: on the tailnet WireGuard already encrypts and authenticates both ends, and
// the local socket never leaves the host.
func (g *global) connect(cmd *cobra.Command) (threesv1.ThreesClient, context.Context, error) {
	ctx, cancel := context.WithTimeout(cmd.Context(), g.timeout)
	g.cleanups = append(g.cleanups, cancel)
	if g.conn != nil {
		return threesv1.NewThreesClient(g.conn), ctx, nil
	}
	var conn *grpc.ClientConn
	var err error
	if g.socket != "" {
		conn, err = grpc.NewClient("unix:"+g.socket, grpc.WithTransportCredentials(insecure.NewCredentials()))
	} else {
		conn, err = grpc.NewClient("passthrough:///"+g.address,
			grpc.WithTransportCredentials(insecure.NewCredentials()),
			grpc.WithContextDialer(g.dialTailnet))
	}
	if err != nil {
		return nil, nil, fmt.Errorf("connect to %s: %w", g.target(), err)
	}
	g.cleanups = append(g.cleanups, func() { conn.Close() })
	return threesv1.NewThreesClient(conn), ctx, nil
}

// close releases what connect opened.
func (g *global) close() {
	for _, c := range g.cleanups {
		c()
	}
}

func (g *global) target() string {
	if g.socket != "" {
		return g.socket
	}
	return g.address
}

// dialTailnet reaches the server through the OS network when it routes to the tailnet
// (tailscaled with a TUN device and MagicDNS), and otherwise through tailscaled's
// LocalAPI, which dials from inside the tailnet (userspace networking, containers).
func (g *global) dialTailnet(ctx context.Context, addr string) (net.Conn, error) {
	host, portStr, err := net.SplitHostPort(addr)
	if err != nil {
		return nil, usagef("--address %q: %v", addr, err)
	}
	port, err := strconv.ParseUint(portStr, 10, 16)
	if err != nil {
		return nil, usagef("--address %q: bad port", addr)
	}
	osCtx, cancel := context.WithTimeout(ctx, 3*time.Second)
	c, osErr := (&net.Dialer{}).DialContext(osCtx, "tcp", addr)
	cancel()
	if osErr == nil {
		return c, nil
	}
	lc := &local.Client{Socket: g.tsSocket, UseSocketOnly: g.tsSocket != ""}
	c, lErr := lc.DialTCP(ctx, host, uint16(port))
	if lErr == nil {
		return c, nil
	}
	return nil, fmt.Errorf("reach %s: over the OS network: %v; through tailscaled: %v", addr, osErr, lErr)
}

// resolveVM accepts a VM ID or a live VM's name, so people can use the name they chose
// and scripts can use the stable ID.
func resolveVM(ctx context.Context, c threesv1.ThreesClient, ref string) (string, error) {
	isID := looksLikeID(ref)
	if isID {
		_, err := c.Get(ctx, &threesv1.VMRef{Id: ref})
		if err == nil {
			return ref, nil
		}
		if status.Code(err) != codes.NotFound {
			return "", err
		}
	}
	resp, err := c.GetID(ctx, &threesv1.GetIDRequest{Name: ref})
	switch {
	case err == nil:
		return resp.GetId(), nil
	case status.Code(err) == codes.NotFound && isID:
		// Both readings failed; the ID is the likelier one (a purged VM's).
		return "", fmt.Errorf("no VM with ID %s", ref)
	case status.Code(err) == codes.NotFound:
		return "", fmt.Errorf("no VM named %s", ref)
	case status.Code(err) == codes.InvalidArgument:
		return "", fmt.Errorf("%q is neither a VM ID nor a VM name", ref)
	}
	return "", err
}

func looksLikeID(s string) bool { return fleet.ValidateID(s) == nil }
