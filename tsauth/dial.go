package tsauth

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"slices"

	"tailscale.com/client/local"
	"tailscale.com/net/tsaddr"
	"tailscale.com/tsnet"
)

// ErrNotTailnet is returned by a TailnetDialer for an address that is not a
// tailnet IP of a node in the tailnet map.
var ErrNotTailnet = errors.New("not a tailnet address of a known node")

// DialFunc dials like net.Dialer.DialContext.
type DialFunc = func(ctx context.Context, network, addr string) (net.Conn, error)

// TailnetDialer returns a dial function that only ever dials over s's
// tailnet. tsnet.Server.Dial falls back to the host network for any address
// that is not a tailnet route; the returned function refuses such addresses
// (with ErrNotTailnet) before calling s.Dial. It takes IP literals only, so
// no name is ever resolved on the host. Dialing the node's own address is
// allowed.
func TailnetDialer(s *tsnet.Server) DialFunc {
	g := dialGuard{check: tsnetCheck(s), dial: s.Dial}
	return g.dialContext
}

// dialGuard separates the checks from the dial so tests can prove that a
// refused address is never dialed.
type dialGuard struct {
	// check returns nil when the tailnet would carry a dial to ipp.
	check func(ctx context.Context, network string, ipp netip.AddrPort) error
	dial  DialFunc
}

func (g dialGuard) dialContext(ctx context.Context, network, addr string) (net.Conn, error) {
	switch network {
	case "tcp", "tcp4", "tcp6", "udp", "udp4", "udp6":
	default:
		return nil, fmt.Errorf("dial %s %s: network not supported over the tailnet", network, addr)
	}
	ipp, err := netip.ParseAddrPort(addr)
	if err != nil {
		return nil, fmt.Errorf("dial %s %s: want a tailnet ip:port: %w", network, addr, ErrNotTailnet)
	}
	ipp = netip.AddrPortFrom(ipp.Addr().Unmap(), ipp.Port())
	// The static range check comes first: it needs no context and no
	// daemon, so loopback, bridge and internet addresses are refused even
	// before the node is up.
	if !tsaddr.IsTailscaleIP(ipp.Addr()) {
		return nil, fmt.Errorf("dial %s %s: %w", network, addr, ErrNotTailnet)
	}
	if err := g.check(ctx, network, ipp); err != nil {
		return nil, fmt.Errorf("dial %s %s: %w", network, addr, err)
	}
	return g.dial(ctx, network, ipp.String())
}

// tsnetCheck accepts ipp only if it is an address of a node in s's netmap
// and s's dialer would route it through the tailnet.
func tsnetCheck(s *tsnet.Server) func(context.Context, string, netip.AddrPort) error {
	return func(ctx context.Context, network string, ipp netip.AddrPort) error {
		lc, err := s.LocalClient()
		if err != nil {
			return fmt.Errorf("local client: %w", err)
		}
		res, err := lc.WhoIs(ctx, ipp.Addr().String())
		if errors.Is(err, local.ErrPeerNotFound) || (err == nil && res.Node == nil) {
			return ErrNotTailnet
		}
		if err != nil {
			return fmt.Errorf("whois: %w", err)
		}
		isNodeAddr := slices.ContainsFunc(res.Node.Addresses, func(p netip.Prefix) bool {
			return p.IsSingleIP() && p.Addr() == ipp.Addr()
		})
		if !isNodeAddr {
			// A subnet route or similar: not a tailnet node.
			return ErrNotTailnet
		}
		d := s.Sys().Dialer.Get()
		_, viaTailnet, err := d.UserDialPlan(ctx, network, ipp.String())
		if err != nil {
			return fmt.Errorf("dial plan: %w", err)
		}
		if !viaTailnet {
			return ErrNotTailnet
		}
		return nil
	}
}
