package appliance

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"path/filepath"
	"sync"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	"tailscale.com/net/memnet"

	"github.com/threes-dev/threes/appliance/sshd"
	threesv1 "github.com/threes-dev/threes/proto/threes/v1"
)

// startSSH serves SSH on the tailnet. Each session's commands call the API through
// an in-process connection that the gate authorises as the tailnet peer who opened
// the session (by WhoIs on every call, as for a call over the tailnet), so a
// session can do exactly what its caller could do with the CLI.
func (a *Appliance) startSSH(o Options, identify IdentifyFunc, g *gate, svc threesv1.ThreesServer) error {
	key, err := sshd.HostKey(filepath.Join(o.StateDir, "ssh"))
	if err != nil {
		return err
	}
	ln, err := a.ts.Listen("tcp", o.SSHListen)
	if err != nil {
		return fmt.Errorf("listen for ssh on tailnet %s: %w", o.SSHListen, err)
	}
	sessions := &sessionListener{conns: make(chan net.Conn), done: make(chan struct{})}
	a.serve(grpc.NewServer(grpc.Creds(sessionCreds{}), grpc.ChainUnaryInterceptor(g.unary), grpc.ChainStreamInterceptor(g.stream)), svc, sessions)
	srv := sshd.New(sshd.Config{
		HostKey:  key,
		Identify: identify,
		Connect:  sessions.connect,
		Run:      o.SSH,
		Log:      o.Logger,
	})
	go func() {
		if err := srv.Serve(ln); err != nil {
			a.log.Error("serve ssh", "addr", ln.Addr(), "err", err)
		}
	}()
	a.closers = append(a.closers, srv.Close)
	return nil
}

// SSHAuthInfo marks a connection made for an SSH session: its calls are the tailnet
// peer's at Remote.
type SSHAuthInfo struct{ Remote netip.AddrPort }

// AuthType implements credentials.AuthInfo.
func (SSHAuthInfo) AuthType() string { return "threes-ssh-session" }

// sessionConn is the server end of a session's in-process connection.
type sessionConn struct {
	net.Conn
	remote netip.AddrPort
}

// sessionListener hands the session gRPC server the connections sessions make; it
// has no address anyone can reach.
type sessionListener struct {
	conns chan net.Conn
	done  chan struct{}
	once  sync.Once
}

func (l *sessionListener) Accept() (net.Conn, error) {
	select {
	case c := <-l.conns:
		return c, nil
	case <-l.done:
		return nil, net.ErrClosed
	}
}

func (l *sessionListener) Close() error {
	l.once.Do(func() { close(l.done) })
	return nil
}

func (l *sessionListener) Addr() net.Addr { return sessionAddr{} }

type sessionAddr struct{}

func (sessionAddr) Network() string { return "memory" }
func (sessionAddr) String() string  { return "ssh-sessions" }

// connect returns an API connection for the SSH session from remote.
func (l *sessionListener) connect(remote netip.AddrPort) (*grpc.ClientConn, error) {
	return grpc.NewClient("passthrough:///ssh-session",
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithContextDialer(func(ctx context.Context, _ string) (net.Conn, error) {
			client, server := memnet.NewConn("ssh-session", 1<<20)
			select {
			case l.conns <- &sessionConn{Conn: server, remote: remote}:
				return client, nil
			case <-l.done:
				return nil, net.ErrClosed
			case <-ctx.Done():
				return nil, ctx.Err()
			}
		}))
}

// sessionCreds tags each accepted session connection with the peer it serves.
type sessionCreds struct{}

func (sessionCreds) ServerHandshake(c net.Conn) (net.Conn, credentials.AuthInfo, error) {
	sc, ok := c.(*sessionConn)
	if !ok {
		return nil, nil, fmt.Errorf("ssh session: %T is not a session connection", c)
	}
	return c, SSHAuthInfo{Remote: sc.remote}, nil
}

func (sessionCreds) ClientHandshake(context.Context, string, net.Conn) (net.Conn, credentials.AuthInfo, error) {
	return nil, nil, fmt.Errorf("ssh session credentials are server-side only")
}

func (sessionCreds) Info() credentials.ProtocolInfo {
	return credentials.ProtocolInfo{SecurityProtocol: "threes-ssh-session"}
}

func (sessionCreds) Clone() credentials.TransportCredentials { return sessionCreds{} }

func (sessionCreds) OverrideServerName(string) error { return nil }
