package appliance

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"slices"
	"strings"
	"sync"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/threes-dev/threes/appliance/fleet"
	threesv1 "github.com/threes-dev/threes/proto/threes/v1"
	"github.com/threes-dev/threes/tsauth"
)

// A call that needs a VM's domain is carried to the VM's host. The host that
// received it has authorised the caller; it sends the call on over the tailnet
// with who the caller is and what role it has, and the owning host accepts such a
// call only from a node that carries the appliance's tag (gate.forwarded).
const (
	mdForwardedFor  = "threes-forwarded-for"
	mdForwardedRole = "threes-forwarded-role"
)

// hosts reaches the other hosts of the cluster: one gRPC connection each, kept
// while the appliance runs.
type hosts struct {
	// resolve finds a host's tailnet address: its address in the database's
	// Raft configuration, which only nodes with the appliance's tag join.
	resolve func(ctx context.Context, host string) (netip.Addr, error)
	// dial reaches tailnet addresses only (tsauth.TailnetDialer).
	dial func(ctx context.Context, network, addr string) (net.Conn, error)
	port string // the API's port, the same on every host

	mu    sync.Mutex
	conns map[netip.Addr]*grpc.ClientConn
}

// client returns a client of host's API.
func (h *hosts) client(ctx context.Context, host string) (threesv1.ThreesClient, error) {
	ip, err := h.resolve(ctx, host)
	if err != nil {
		return nil, answered(status.New(codes.Unavailable, fmt.Sprintf("host %s: %v", host, err)))
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	if c, ok := h.conns[ip]; ok {
		return threesv1.NewThreesClient(c), nil
	}
	target := net.JoinHostPort(ip.String(), h.port)
	// WireGuard already encrypts and authenticates the tailnet, as it does for
	// every other caller of the API.
	c, err := grpc.NewClient("passthrough:///"+target,
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithContextDialer(func(ctx context.Context, addr string) (net.Conn, error) {
			return h.dial(ctx, "tcp", addr)
		}))
	if err != nil {
		return nil, fmt.Errorf("host %s: %w", host, err)
	}
	if h.conns == nil {
		h.conns = map[netip.Addr]*grpc.ClientConn{}
	}
	h.conns[ip] = c
	return threesv1.NewThreesClient(c), nil
}

func (h *hosts) Close() error {
	h.mu.Lock()
	defer h.mu.Unlock()
	var errs []error
	for ip, c := range h.conns {
		errs = append(errs, c.Close())
		delete(h.conns, ip)
	}
	return errors.Join(errs...)
}

// forwardedKey marks a context whose call another host forwarded.
type forwardedKey struct{}

// forwardedFor returns who a forwarded call was made by, and false for a call
// made here.
func forwardedFor(ctx context.Context) (string, bool) {
	s, ok := ctx.Value(forwardedKey{}).(string)
	return s, ok
}

// ownerOf returns the host a fleet error says the call belongs to, when the call
// is to be carried there: never a call that was forwarded already, which would
// only go round.
func (s *service) ownerOf(ctx context.Context, err error) (string, bool) {
	var e *fleet.ElsewhereError
	if s.hosts == nil || !errors.As(err, &e) {
		return "", false
	}
	if _, fwd := forwardedFor(ctx); fwd {
		return "", false
	}
	return e.Host, true
}

// outgoing is ctx for a call carried to another host on behalf of this call's
// caller.
func outgoing(ctx context.Context) context.Context {
	p := principalFrom(ctx)
	return metadata.NewOutgoingContext(ctx, metadata.Pairs(
		mdForwardedFor, p.String(), mdForwardedRole, p.Role.String()))
}

// onHost makes a unary call on host for this call's caller.
func onHost[T any](ctx context.Context, s *service, host string, call func(context.Context, threesv1.ThreesClient) (T, error)) (T, error) {
	var zero T
	c, err := s.hosts.client(ctx, host)
	if err != nil {
		return zero, err
	}
	resp, err := call(outgoing(ctx), c)
	return resp, fromHost(host, err)
}

// forwardConsole joins the caller's console stream to host's, first message
// included.
func (s *service) forwardConsole(ctx context.Context, host string, first *threesv1.ConsoleInput,
	stream grpc.BidiStreamingServer[threesv1.ConsoleInput, threesv1.ConsoleOutput]) error {
	c, err := s.hosts.client(ctx, host)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	remote, err := c.Console(outgoing(ctx))
	if err != nil {
		return fromHost(host, err)
	}
	if err := remote.Send(first); err != nil {
		return fromHost(host, remoteErr(remote, err))
	}
	go func() {
		defer cancel()
		for {
			in, err := stream.Recv()
			if err != nil {
				remote.CloseSend()
				return
			}
			if err := remote.Send(in); err != nil {
				return
			}
		}
	}()
	for {
		out, err := remote.Recv()
		if errors.Is(err, io.EOF) {
			return nil
		}
		if err != nil {
			if ctx.Err() != nil && stream.Context().Err() == nil {
				return nil // the caller closed its side
			}
			return fromHost(host, err)
		}
		if err := stream.Send(out); err != nil {
			return err
		}
	}
}

// remoteErr is the status a stream ended with, which Send only hints at (io.EOF).
func remoteErr(remote grpc.BidiStreamingClient[threesv1.ConsoleInput, threesv1.ConsoleOutput], err error) error {
	if errors.Is(err, io.EOF) {
		if _, rerr := remote.Recv(); rerr != nil && !errors.Is(rerr, io.EOF) {
			return rerr
		}
	}
	return err
}

// forwarded reads a forwarded call's caller from its metadata: only a node that
// carries the appliance's tag may forward, and the call then acts with the role
// the forwarding host gave its caller. ok is false for a call that is not
// forwarded.
func forwarded(ctx context.Context, p tsauth.Principal, ownerTag string, member func(netip.Addr) bool) (who string, role tsauth.Role, ok bool, err error) {
	md, _ := metadata.FromIncomingContext(ctx)
	fors, roles := md.Get(mdForwardedFor), md.Get(mdForwardedRole)
	if len(fors) == 0 && len(roles) == 0 {
		return "", 0, false, nil
	}
	if p.Local || !p.IsTagged() || !slices.Contains(p.Tags, ownerTag) {
		return "", 0, true, fmt.Errorf("%s forwarded a call but does not carry %s: %w", p, ownerTag, ErrPermission)
	}
	// The tag alone could be another deployment's, or a host since removed:
	// only a host of this cluster's database may speak for its callers.
	if member == nil {
		return "", 0, true, fmt.Errorf("%s forwarded a call, and this host is in no cluster: %w", p, ErrPermission)
	}
	if !member(p.Addr) {
		return "", 0, true, fmt.Errorf("%s forwarded a call but is no member of this cluster's database: %w", p, ErrPermission)
	}
	if len(fors) != 1 || len(roles) != 1 {
		return "", 0, true, fmt.Errorf("forwarded call from %s: want one %s and one %s: %w", p, mdForwardedFor, mdForwardedRole, ErrPermission)
	}
	role, err = tsauth.ParseRole(roles[0])
	if err != nil {
		return "", 0, true, fmt.Errorf("forwarded call from %s: %v: %w", p, err, ErrPermission)
	}
	// Names come from the tailnet; keep a log line one line.
	who = strings.Map(func(r rune) rune {
		if r < ' ' || r == 0x7f {
			return '?'
		}
		return r
	}, fors[0])
	return who, role, true, nil
}
