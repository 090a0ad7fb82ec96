package appliance

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"time"

	"golang.org/x/sys/unix"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/peer"

	threesv1 "github.com/threes-dev/threes/proto/threes/v1"
	"github.com/threes-dev/threes/tsauth"
)

// IdentifyFunc says who a tailnet peer is; tsauth.Identifier.Identify is the real one.
type IdentifyFunc func(ctx context.Context, remote netip.AddrPort) (tsauth.Principal, error)

// methodRoles is the least role each method needs. A method missing here is denied to
// everyone, so a new RPC is closed until someone decides who may call it.
var methodRoles = map[string]tsauth.Role{
	threesv1.Threes_WhoAmI_FullMethodName:        tsauth.RoleNone,
	threesv1.Threes_Get_FullMethodName:           tsauth.RoleViewer,
	threesv1.Threes_Watch_FullMethodName:         tsauth.RoleViewer,
	threesv1.Threes_All_FullMethodName:           tsauth.RoleViewer,
	threesv1.Threes_GetID_FullMethodName:         tsauth.RoleViewer,
	threesv1.Threes_ListNetworks_FullMethodName:  tsauth.RoleViewer,
	threesv1.Threes_GetKVs_FullMethodName:        tsauth.RoleViewer,
	threesv1.Threes_Create_FullMethodName:        tsauth.RoleOperator,
	threesv1.Threes_Start_FullMethodName:         tsauth.RoleOperator,
	threesv1.Threes_Stop_FullMethodName:          tsauth.RoleOperator,
	threesv1.Threes_Restart_FullMethodName:       tsauth.RoleOperator,
	threesv1.Threes_Delete_FullMethodName:        tsauth.RoleOperator,
	threesv1.Threes_UpsertKVs_FullMethodName:     tsauth.RoleOperator,
	threesv1.Threes_DeleteKVs_FullMethodName:     tsauth.RoleOperator,
	threesv1.Threes_Console_FullMethodName:       tsauth.RoleOperator,
	threesv1.Threes_ListImages_FullMethodName:    tsauth.RoleViewer,
	threesv1.Threes_ImportImage_FullMethodName:   tsauth.RoleAdmin,
	threesv1.Threes_DeleteImage_FullMethodName:   tsauth.RoleAdmin,
	threesv1.Threes_Purge_FullMethodName:         tsauth.RoleAdmin,
	threesv1.Threes_CreateNetwork_FullMethodName: tsauth.RoleAdmin,
	threesv1.Threes_DeleteNetwork_FullMethodName: tsauth.RoleAdmin,
	threesv1.Threes_ListHosts_FullMethodName:     tsauth.RoleViewer,
	threesv1.Threes_RemoveHost_FullMethodName:    tsauth.RoleAdmin,
}

// MethodRole returns the least role the API method (its full gRPC name) needs, and
// false for a method nobody may call.
func MethodRole(method string) (tsauth.Role, bool) {
	r, ok := methodRoles[method]
	return r, ok
}

type principalKey struct{}

// principalFrom returns the caller the interceptor identified.
func principalFrom(ctx context.Context) tsauth.Principal {
	p, _ := ctx.Value(principalKey{}).(tsauth.Principal)
	return p
}

// gate identifies and authorises every call, unary and streaming, and maps the
// handler's errors to gRPC codes on the way out.
type gate struct {
	identify IdentifyFunc
	log      *slog.Logger
	// ownerTag is the tag of the cluster's appliances, and member says whether
	// a tailnet address is a host of this cluster's database (nil when the
	// appliance is in no cluster): only such hosts' forwarded calls are taken
	// (forward.go).
	ownerTag string
	member   func(netip.Addr) bool
	// reauth is how often a stream's caller is authorised again while it lasts
	// (default streamReauth): a console or watch must not outlive a revoked grant.
	reauth time.Duration
}

// streamReauth is how often a stream is authorised again by default. The identity
// behind it is cached for tsauth.DefaultMaxAge, so a revoked grant ends a stream
// within about the sum of the two.
const streamReauth = 2 * time.Second

func (g *gate) authorise(ctx context.Context, method string) (context.Context, error) {
	p, err := g.principal(ctx)
	if err != nil {
		g.log.Warn("unidentified caller", "method", method, "err", err)
		return nil, err
	}
	who, role, fwd, err := forwarded(ctx, p, g.ownerTag, g.member)
	if err != nil {
		g.log.Warn("denied", "who", p.String(), "method", method, "err", err)
		return nil, err
	}
	if fwd {
		p.Role = role
		ctx = context.WithValue(ctx, forwardedKey{}, who)
	}
	need, known := methodRoles[method]
	if !known || p.Role < need {
		g.log.Warn("denied", "who", p.String(), "role", p.Role.String(), "method", method)
		if !known {
			return nil, fmt.Errorf("%s: %w: unknown method", method, ErrPermission)
		}
		return nil, fmt.Errorf("%s needs role %s, %s has %s: %w", shortMethod(method), need, p, p.Role, ErrPermission)
	}
	return context.WithValue(ctx, principalKey{}, p), nil
}

func (g *gate) principal(ctx context.Context) (tsauth.Principal, error) {
	pr, ok := peer.FromContext(ctx)
	if !ok {
		return tsauth.Principal{}, ErrUnidentified
	}
	var ap netip.AddrPort
	switch ai := pr.AuthInfo.(type) {
	case LocalAuthInfo:
		return ai.principal(), nil
	case SSHAuthInfo:
		// An SSH session's command: the tailnet peer who opened the session.
		ap = ai.Remote
	default:
		var err error
		if ap, err = netip.ParseAddrPort(pr.Addr.String()); err != nil {
			return tsauth.Principal{}, fmt.Errorf("peer address %q: %w", pr.Addr, ErrUnidentified)
		}
	}
	p, err := g.identify(ctx, ap)
	if err != nil {
		return tsauth.Principal{}, fmt.Errorf("whois %s: %v: %w", ap.Addr(), err, ErrUnidentified)
	}
	return p, nil
}

func (g *gate) unary(ctx context.Context, req any, info *grpc.UnaryServerInfo, h grpc.UnaryHandler) (any, error) {
	ctx, err := g.authorise(ctx, info.FullMethod)
	if err != nil {
		return nil, toStatus(err)
	}
	g.logForwarded(ctx, info.FullMethod)
	resp, err := h(ctx, req)
	return resp, toStatus(err)
}

// stream authorises a stream when it opens and again every g.reauth while it
// lasts; once the caller's role no longer allows the method, the stream's context
// ends and the call ends with the refusal.
func (g *gate) stream(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, h grpc.StreamHandler) error {
	ctx, err := g.authorise(ss.Context(), info.FullMethod)
	if err != nil {
		return toStatus(err)
	}
	g.logForwarded(ctx, info.FullMethod)
	ctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	every := g.reauth
	if every <= 0 {
		every = streamReauth
	}
	go func() {
		t := time.NewTicker(every)
		defer t.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-t.C:
			}
			if _, err := g.authorise(ss.Context(), info.FullMethod); err != nil {
				cancel(fmt.Errorf("%w (while the stream was open)", err))
				return
			}
		}
	}()
	err = h(srv, &identifiedStream{ServerStream: ss, ctx: ctx})
	if cause := context.Cause(ctx); cause != nil && ss.Context().Err() == nil {
		// Refused mid-way: that, not the handler's "context canceled", is why.
		return toStatus(cause)
	}
	return toStatus(err)
}

// identifiedStream carries the caller's principal, and refuses messages once the
// caller was refused mid-stream (a handler blocked elsewhere still sees ctx end).
type identifiedStream struct {
	grpc.ServerStream
	ctx context.Context
}

func (s *identifiedStream) Context() context.Context { return s.ctx }

func (s *identifiedStream) SendMsg(m any) error {
	if err := context.Cause(s.ctx); err != nil {
		return err
	}
	return s.ServerStream.SendMsg(m)
}

func (s *identifiedStream) RecvMsg(m any) error {
	if err := context.Cause(s.ctx); err != nil {
		return err
	}
	return s.ServerStream.RecvMsg(m)
}

// logForwarded records a call another host carried here, with its caller there.
func (g *gate) logForwarded(ctx context.Context, method string) {
	if who, ok := forwardedFor(ctx); ok {
		p := principalFrom(ctx)
		g.log.Info("forwarded call", "method", shortMethod(method), "for", who, "role", p.Role.String(), "via", p.Node)
	}
}

func shortMethod(full string) string {
	for i := len(full) - 1; i >= 0; i-- {
		if full[i] == '/' {
			return full[i+1:]
		}
	}
	return full
}

// LocalAuthInfo is the kernel's word on who is at the other end of the local socket.
type LocalAuthInfo struct {
	UID, GID uint32
	PID      int32
}

// AuthType implements credentials.AuthInfo.
func (LocalAuthInfo) AuthType() string { return "unix-peercred" }

// principal gives the host's root admin rights and nobody else anything: the socket
// is for the host's own administrator, who may have no tailnet at all.
func (li LocalAuthInfo) principal() tsauth.Principal {
	if li.UID == 0 {
		return tsauth.LocalRoot()
	}
	return tsauth.Principal{Login: fmt.Sprintf("uid %d", li.UID), Node: "local socket"}
}

// peerCreds is transport credentials for the unix socket: no encryption (the kernel
// carries the bytes), just SO_PEERCRED read once per connection.
type peerCreds struct{}

func (peerCreds) ServerHandshake(c net.Conn) (net.Conn, credentials.AuthInfo, error) {
	uc, ok := c.(*net.UnixConn)
	if !ok {
		return nil, nil, fmt.Errorf("local socket: %T is not a unix connection", c)
	}
	raw, err := uc.SyscallConn()
	if err != nil {
		return nil, nil, fmt.Errorf("local socket: %w", err)
	}
	var cred *unix.Ucred
	var credErr error
	if err := raw.Control(func(fd uintptr) {
		cred, credErr = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED)
	}); err != nil {
		return nil, nil, fmt.Errorf("local socket: %w", err)
	}
	if credErr != nil {
		return nil, nil, fmt.Errorf("local socket peer credentials: %w", credErr)
	}
	return c, LocalAuthInfo{UID: cred.Uid, GID: cred.Gid, PID: cred.Pid}, nil
}

func (peerCreds) ClientHandshake(context.Context, string, net.Conn) (net.Conn, credentials.AuthInfo, error) {
	return nil, nil, fmt.Errorf("peer credentials are server-side only")
}

func (peerCreds) Info() credentials.ProtocolInfo {
	return credentials.ProtocolInfo{SecurityProtocol: "unix-peercred"}
}

func (peerCreds) Clone() credentials.TransportCredentials { return peerCreds{} }

func (peerCreds) OverrideServerName(string) error { return nil }
