// Package sshd is the appliance's SSH server on the tailnet: each session runs one
// command of the threes command tree with the caller's own tailnet identity, or
// attaches a VM console through a pty.
//
// It owns the SSH protocol (host key, sessions, pty and window changes), the
// authorisation of each session before anything runs, the splitting of the command
// line into words, and the session log. It does not know the command tree: a Runner
// given by the program runs the words over a gRPC connection the appliance made for
// that session, which carries the caller's identity to the API's gate, so every call
// is authorised as the caller, never as the appliance. No shell runs, ever.
//
// The SSH layer asks the client for no credentials: the tailnet has already
// authenticated the peer, and WhoIs says who it is. That is why every session is
// authorised here, by the same identity and grant as an API call, deny by default.
package sshd

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"sync"
	"time"

	"github.com/creack/pty"
	"golang.org/x/crypto/ssh"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc"

	"github.com/threes-dev/threes/tsauth"
)

// Session is what a Runner gets: the command's words, where its input and output go
// (the pty when the client asked for one), and an API connection authorised as the
// caller.
//
// With a pty, Stdin, Stdout and Stderr are the tty end, an *os.File in Go's poller.
// A Runner that checks or sets its terminal modes should do so through SyscallConn,
// not Fd: Fd puts the file in blocking mode, and a read still pending when the Runner
// returns then holds the session open until drain's bound (2 s) runs out.
type Session struct {
	Args   []string
	Stdin  io.Reader
	Stdout io.Writer
	Stderr io.Writer
	Conn   grpc.ClientConnInterface
	// Principal is who the caller was when the session began; the API checks again
	// on every call.
	Principal tsauth.Principal
}

// Runner runs one command and returns its exit status. It must not touch the
// appliance's host beyond the API connection it is given.
type Runner func(ctx context.Context, s Session) int

// Config is everything a Server needs.
type Config struct {
	HostKey ssh.Signer
	// Identify says who a tailnet peer is, as the API's gate asks it.
	Identify func(ctx context.Context, remote netip.AddrPort) (tsauth.Principal, error)
	// Connect returns an API connection whose every call the gate authorises as the
	// tailnet peer at remote.
	Connect func(remote netip.AddrPort) (*grpc.ClientConn, error)
	Run     Runner
	Log     *slog.Logger
}

// Server serves SSH sessions on a tailnet listener.
type Server struct {
	cfg   Config
	ssh   *ssh.ServerConfig
	mu    sync.Mutex
	ln    net.Listener
	conns map[net.Conn]struct{}
	done  bool
}

// handshakeTimeout bounds a client that connects and says nothing.
const handshakeTimeout = 30 * time.Second

// New returns a server; Serve starts it.
func New(cfg Config) *Server {
	sc := &ssh.ServerConfig{
		// The tailnet authenticated the peer; identity and role come from WhoIs
		// per session, so the SSH layer asks for nothing.
		NoClientAuth:  true,
		ServerVersion: "SSH-2.0-threes",
	}
	sc.AddHostKey(cfg.HostKey)
	if cfg.Log == nil {
		cfg.Log = slog.Default()
	}
	return &Server{cfg: cfg, ssh: sc, conns: map[net.Conn]struct{}{}}
}

// Serve accepts connections on ln (a tailnet listener) until Close.
func (s *Server) Serve(ln net.Listener) error {
	s.mu.Lock()
	if s.done {
		s.mu.Unlock()
		ln.Close()
		return net.ErrClosed
	}
	s.ln = ln
	s.mu.Unlock()
	for {
		c, err := ln.Accept()
		if err != nil {
			s.mu.Lock()
			done := s.done
			s.mu.Unlock()
			if done {
				return nil
			}
			return err
		}
		if !s.track(c, true) {
			c.Close()
			return nil
		}
		go s.serveConn(c)
	}
}

// Close stops accepting and ends every connection (and so every session).
func (s *Server) Close() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.done = true
	var err error
	if s.ln != nil {
		err = s.ln.Close()
	}
	for c := range s.conns {
		c.Close()
	}
	return err
}

func (s *Server) track(c net.Conn, add bool) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if add {
		if s.done {
			return false
		}
		s.conns[c] = struct{}{}
	} else {
		delete(s.conns, c)
	}
	return true
}

func (s *Server) serveConn(c net.Conn) {
	defer s.track(c, false)
	defer c.Close()
	remote, err := netip.ParseAddrPort(c.RemoteAddr().String())
	if err != nil {
		s.cfg.Log.Warn("ssh: peer address", "addr", c.RemoteAddr(), "err", err)
		return
	}
	c.SetDeadline(time.Now().Add(handshakeTimeout))
	sc, chans, reqs, err := ssh.NewServerConn(c, s.ssh)
	if err != nil {
		s.cfg.Log.Debug("ssh handshake", "from", remote, "err", err)
		return
	}
	c.SetDeadline(time.Time{})
	defer sc.Close()
	go ssh.DiscardRequests(reqs) // port forwarding and the like: refused
	for nc := range chans {
		if nc.ChannelType() != "session" {
			nc.Reject(ssh.Prohibited, "threes runs commands only: no port forwarding")
			continue
		}
		ch, creqs, err := nc.Accept()
		if err != nil {
			continue
		}
		go s.serveSession(remote, ch, creqs)
	}
}

type ptyRequest struct {
	Term          string
	Cols, Rows    uint32
	Width, Height uint32
	Modes         string
}

type windowChange struct {
	Cols, Rows    uint32
	Width, Height uint32
}

// serveSession answers a session's requests: a pty and its size first, then one
// exec (or shell, meaning no command), and window changes while it runs.
func (s *Server) serveSession(remote netip.AddrPort, ch ssh.Channel, reqs <-chan *ssh.Request) {
	defer ch.Close()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel() // the client closed the channel: whatever runs stops
	var term *terminal
	defer func() {
		if term != nil {
			term.close()
		}
	}()
	started := false
	for req := range reqs {
		switch req.Type {
		case "pty-req":
			var p ptyRequest
			if started || term != nil || ssh.Unmarshal(req.Payload, &p) != nil {
				req.Reply(false, nil)
				continue
			}
			t, err := openTerminal(p.Cols, p.Rows)
			if err != nil {
				s.cfg.Log.Warn("ssh: open pty", "err", err)
				req.Reply(false, nil)
				continue
			}
			term = t
			req.Reply(true, nil)
		case "window-change":
			var w windowChange
			if term != nil && ssh.Unmarshal(req.Payload, &w) == nil {
				term.resize(w.Cols, w.Rows)
			}
			req.Reply(false, nil) // wants no reply; Reply is a no-op then
		case "exec", "shell":
			var cmd struct{ Command string }
			if started || req.Type == "exec" && ssh.Unmarshal(req.Payload, &cmd) != nil {
				req.Reply(false, nil)
				continue
			}
			started = true
			req.Reply(true, nil)
			go func() {
				code := s.run(ctx, remote, ch, term, cmd.Command)
				ch.SendRequest("exit-status", false, ssh.Marshal(struct{ Status uint32 }{uint32(code)}))
				ch.Close()
			}()
		default:
			// env, subsystem (sftp), x11-req, auth-agent-req, signal: none of them.
			req.Reply(false, nil)
		}
	}
}

// run authorises the session, splits its command and hands it to the Runner. It
// returns the exit status.
func (s *Server) run(ctx context.Context, remote netip.AddrPort, ch ssh.Channel, term *terminal, line string) (code int) {
	say := func(msg string) {
		if term != nil {
			fmt.Fprintf(ch, "threes: %s\r\n", msg)
		} else {
			fmt.Fprintf(ch.Stderr(), "threes: %s\n", msg)
		}
	}
	p, err := s.cfg.Identify(ctx, remote)
	if err != nil {
		s.cfg.Log.Warn("ssh session refused", "from", remote.Addr(), "why", err)
		say(fmt.Sprintf("refused: the tailnet does not say who %s is: %v", remote.Addr(), err))
		return 1
	}
	if p.Role < tsauth.RoleViewer {
		s.cfg.Log.Warn("ssh session refused", "who", p.String(), "node", p.Node, "why", "no role")
		say(fmt.Sprintf("refused: %s (node %s) has no role on this appliance: an admin grants one with the %s capability", p, p.Node, tsauth.Capability))
		return 1
	}
	args, err := Split(line)
	if err != nil {
		s.cfg.Log.Info("ssh session", "who", p.String(), "node", p.Node, "command", "(unparsed)", "exit", 2, "why", err)
		say(err.Error())
		return 2
	}
	conn, err := s.cfg.Connect(remote)
	if err != nil {
		s.cfg.Log.Error("ssh: connect to the API", "err", err)
		say("internal error: cannot reach the API")
		return 1
	}
	defer conn.Close()
	sess := Session{Args: args, Stdin: ch, Stdout: ch, Stderr: ch.Stderr(), Conn: conn, Principal: p}
	if term != nil {
		sess.Stdin, sess.Stdout, sess.Stderr = term.tty, term.tty, term.tty
		term.pump(ch)
	}
	start := time.Now()
	defer func() {
		if term != nil {
			term.drain()
		}
		s.cfg.Log.Info("ssh session", "who", p.String(), "node", p.Node, "command", logWords(args),
			"pty", term != nil, "exit", code, "took", time.Since(start).Round(time.Millisecond))
	}()
	return s.cfg.Run(ctx, sess)
}

// terminal is a pty for one session: the Runner reads and writes its tty end as a
// program on a terminal would (so line discipline, echo and raw mode work as they do
// for the CLI at a real terminal), and the SSH channel is joined to the other end.
// No process is ever started on it.
type terminal struct {
	ptmx, tty *os.File
	out       chan struct{}
}

func openTerminal(cols, rows uint32) (*terminal, error) {
	ptmx, tty, err := pty.Open()
	if err != nil {
		return nil, err
	}
	// Nobody else on the host reads or writes this session's terminal.
	if err := tty.Chmod(0o600); err != nil {
		ptmx.Close()
		tty.Close()
		return nil, err
	}
	// pty.Open's ioctls go through os.File.Fd, which leaves the master in
	// blocking mode, where Close does not end a Read: the copy from it would
	// then outlive the session whenever the tty stays open (a Runner's reader
	// left blocked on it). A File on a non-blocking dup is in Go's poller.
	if ptmx, err = pollable(ptmx); err != nil {
		tty.Close()
		return nil, err
	}
	t := &terminal{ptmx: ptmx, tty: tty}
	t.resize(cols, rows)
	return t, nil
}

func pollable(f *os.File) (*os.File, error) {
	defer f.Close()
	fd, err := unix.FcntlInt(f.Fd(), unix.F_DUPFD_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("pty: %w", err)
	}
	if err := unix.SetNonblock(fd, true); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("pty: %w", err)
	}
	return os.NewFile(uintptr(fd), f.Name()), nil
}

// resize sets the window size through SyscallConn: pty.Setsize would use Fd and put
// the master back in blocking mode.
func (t *terminal) resize(cols, rows uint32) {
	if cols == 0 || rows == 0 || cols >= 1<<16 || rows >= 1<<16 {
		return
	}
	if rc, err := t.ptmx.SyscallConn(); err == nil {
		rc.Control(func(fd uintptr) {
			unix.IoctlSetWinsize(int(fd), unix.TIOCSWINSZ, &unix.Winsize{Col: uint16(cols), Row: uint16(rows)})
		})
	}
}

// pump joins the channel to the pty: keystrokes in, output out.
func (t *terminal) pump(ch ssh.Channel) {
	t.out = make(chan struct{})
	go io.Copy(t.ptmx, ch)
	go func() {
		io.Copy(ch, t.ptmx)
		close(t.out)
	}()
}

// drain closes the tty end and waits for what the Runner wrote to reach the channel.
// Linux reads the rest and then EIO from the master once the tty end is closed. A
// reader the Runner left on the tty is woken by the close as long as the tty is in
// Go's poller (see Session); one in blocking mode keeps the tty open, and the bound
// ends the session anyway: closing the master ends the copy.
func (t *terminal) drain() {
	t.tty.Close()
	select {
	case <-t.out:
	case <-time.After(2 * time.Second):
	}
	t.ptmx.Close()
	<-t.out
}

func (t *terminal) close() {
	t.tty.Close()
	t.ptmx.Close()
}
