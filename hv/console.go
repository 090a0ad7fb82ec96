package hv

import (
	"context"
	"errors"
	"fmt"
	"io"
	"sync"
	"time"

	"github.com/digitalocean/go-libvirt"
)

const (
	// consoleKeep is how much of a QEMU domain's recent console output
	// is kept for sessions that attach later: enough for a boot log's
	// tail and the login prompt.
	consoleKeep = 64 << 10
	// consoleLag is how much output a session may leave unread before it
	// is cut off; more than consoleKeep, so the replay always fits.
	consoleLag = 256 << 10
	// recordAtOnce bounds the lookups that events start for recording,
	// so a sync of thousands of domains does not open thousands of calls.
	recordAtOnce = 8
)

// errConsoleBehind ends a console session that read too slowly: the
// recorder never waits for a reader, so the output it could not take is lost.
var errConsoleBehind = fmt.Errorf("console session fell more than %d KiB behind the guest's output and was cut off", consoleLag>>10)

// Console attaches to the domain's serial console; see Hypervisor.
//
// A QEMU domain's console is recorded from its start (Create, Start, or the
// first event or attach that finds it running) by one recorder, which keeps
// the recent output and hands it to each session, then the live output.
// The test driver has no recorder: each session is its own stream.
func (h *Libvirt) Console(ctx context.Context, id string) (io.ReadWriteCloser, error) {
	dom, st, err := h.domainAndState(ctx, id)
	if err == nil && st != libvirt.DomainRunning && st != libvirt.DomainBlocked && st != libvirt.DomainPaused {
		err = ErrNotRunning
	}
	if err != nil {
		return nil, fmt.Errorf("console of domain %s: %w", id, err)
	}
	if h.flavour.test {
		c, err := h.openConsole(ctx, dom)
		if err != nil {
			return nil, fmt.Errorf("console of domain %s: %w", id, err)
		}
		return c, nil
	}
	// A recorder that ends as we attach (the domain stopped) gives no
	// session; a second one would only find the domain stopped.
	for range 2 {
		r, err := h.recorderFor(dom)
		if err != nil {
			return nil, fmt.Errorf("console of domain %s: %w", id, err)
		}
		if v := r.attach(); v != nil {
			v.stop = context.AfterFunc(ctx, func() { v.Close() })
			return v, nil
		}
	}
	return nil, fmt.Errorf("console of domain %s: %w", id, ErrNotRunning)
}

// recorders holds the QEMU domains' console recorders, by domain ID, and
// the one libvirt connection their streams share.
type recorders struct {
	mu sync.Mutex
	m  map[string]*recorder

	connMu sync.Mutex
	conn   *libvirt.Libvirt

	// sem bounds the lookups record starts for events.
	sem chan struct{}
}

// record starts recording the console of domain id if it is running and
// not recorded yet. Errors are dropped: the next attach tries again.
func (h *Libvirt) record(ctx context.Context, id string) {
	if h.flavour.test {
		return
	}
	dom, st, err := h.domainAndState(ctx, id)
	if err != nil || st == libvirt.DomainShutoff {
		return
	}
	h.recorderFor(dom)
}

// recordLater records domain id's console in the background, for an event
// that says it runs.
func (h *Libvirt) recordLater(id string) {
	if h.flavour.test {
		return
	}
	h.rec.mu.Lock()
	if h.rec.sem == nil {
		h.rec.sem = make(chan struct{}, recordAtOnce)
	}
	sem := h.rec.sem
	h.rec.mu.Unlock()
	go func() {
		select {
		case sem <- struct{}{}:
		case <-h.done:
			return
		}
		defer func() { <-sem }()
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		h.record(ctx, id)
	}()
}

// recorderFor returns the recorder of dom's current boot (dom.ID is
// libvirt's ID of the running QEMU process), starting one if there is none.
// A recorder of an earlier boot is ended: its sessions see io.EOF, as they
// would have when that boot stopped.
func (h *Libvirt) recorderFor(dom libvirt.Domain) (*recorder, error) {
	if h.isClosed() {
		return nil, errClosed
	}
	h.rec.mu.Lock()
	if h.rec.m == nil {
		h.rec.m = map[string]*recorder{}
	}
	old := h.rec.m[dom.Name]
	if old != nil && old.dom.ID == dom.ID && !old.ended() {
		h.rec.mu.Unlock()
		return old, nil
	}
	r := newRecorder(h, dom)
	h.rec.m[dom.Name] = r
	h.rec.mu.Unlock()
	if old != nil {
		old.finish(io.EOF)
	}
	go r.run()
	return r, nil
}

// streamConn returns the connection console streams share, connecting if
// there is none or it broke. Sharing is safe because a recorder takes
// what the stream delivers at once and never waits for its sessions.
func (h *Libvirt) streamConn() (*libvirt.Libvirt, error) {
	h.rec.connMu.Lock()
	defer h.rec.connMu.Unlock()
	if h.isClosed() {
		return nil, errClosed
	}
	if h.rec.conn != nil && h.rec.conn.IsConnected() {
		return h.rec.conn, nil
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	conn := libvirt.NewWithDialer(dialer{ctx: ctx, socket: h.socket})
	if err := conn.ConnectToURI(libvirt.ConnectURI(h.uri)); err != nil {
		return nil, fmt.Errorf("connect to %s at %s: %w: %w", h.uri, h.socket, ErrUnavailable, err)
	}
	h.rec.conn = conn
	return conn, nil
}

// closeRecorders hangs up the streams' connection, which ends every
// recorder; called by Close after h.done is closed.
func (h *Libvirt) closeRecorders() {
	h.rec.connMu.Lock()
	conn := h.rec.conn
	h.rec.conn = nil
	h.rec.connMu.Unlock()
	if conn != nil {
		go conn.Disconnect()
	}
}

// recorder holds one boot's console stream while the domain runs, keeps
// its recent output and passes it on to the sessions attached.
//
// Until the first session attaches, the stream is output only: go-libvirt
// gives every stream that carries input a 4 MiB send buffer, which a
// thousand consoles nobody looks at should not hold. The first session
// reopens it, taking it over, as one that carries input too; what the guest
// writes in the moment between the two streams may be lost.
type recorder struct {
	h   *Libvirt
	dom libvirt.Domain
	fanout
	over     chan struct{} // closed when the recording ends
	overOnce sync.Once

	inMu sync.Mutex
	// pipes are the inputs of the streams open or opening, the newest
	// last; input goes to the newest.
	pipes []*io.PipeWriter
	// ready is closed when a pipe is added, and replaced.
	ready chan struct{}
	// input says streams opened from now on carry input.
	input bool
	// upgrade, while not nil, is closed when the stream that took the
	// console over for the first session ends.
	upgrade chan struct{}
}

func newRecorder(h *Libvirt, dom libvirt.Domain) *recorder {
	r := &recorder{h: h, dom: dom, over: make(chan struct{}), ready: make(chan struct{})}
	r.in = r.send
	return r
}

// finish ends the recording and every session, and forgets the recorder.
func (r *recorder) finish(err error) {
	r.fanout.finish(err)
	r.overOnce.Do(func() { close(r.over) })
	r.h.rec.mu.Lock()
	if r.h.rec.m[r.dom.Name] == r {
		delete(r.h.rec.m, r.dom.Name)
	}
	r.h.rec.mu.Unlock()
}

// attach adds a session, and makes the console carry input if it does not.
func (r *recorder) attach() *session {
	s := r.fanout.attach()
	if s == nil {
		return nil
	}
	r.inMu.Lock()
	defer r.inMu.Unlock()
	if !r.input {
		r.input = true
		done := make(chan struct{})
		r.upgrade = done
		go func() {
			defer close(done)
			// Again if libvirtd refused the console, but not once
			// a stream was open (its end is the domain's or
			// libvirtd's, which run handles).
			for range 5 {
				var lerr libvirt.Error
				if err := r.stream(true); !errors.As(err, &lerr) {
					return
				}
				select {
				case <-r.over:
					return
				case <-r.h.done:
					return
				case <-time.After(time.Second):
				}
			}
		}()
	}
	return s
}

// run keeps a stream open on the console until this boot of the domain
// ends. A stream also ends when libvirtd restarts or another client takes
// the console over; then run opens another, without taking it back by force,
// so a person at `virsh console` on the host is not thrown out (while they
// are there, this recorder waits; a session attaching takes it back).
func (r *recorder) run() {
	wait := 50 * time.Millisecond
	for {
		r.waitUpgrade()
		opened := time.Now()
		r.stream(false)
		r.waitUpgrade()
		if time.Since(opened) > 10*time.Second {
			wait = 50 * time.Millisecond
		}
		select {
		case <-r.h.done:
			r.finish(errClosed)
			return
		case <-r.over:
			return
		case <-time.After(wait):
		}
		wait = min(2*wait, eventRetry)
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		dom, st, err := r.h.domainAndState(ctx, r.dom.Name)
		cancel()
		switch {
		case errors.Is(err, ErrNotFound), err == nil && (st == libvirt.DomainShutoff || dom.ID != r.dom.ID):
			r.finish(io.EOF) // this boot is over
			return
		case errors.Is(err, errClosed):
			r.finish(errClosed)
			return
		}
		// Running still, or libvirtd away: try again.
	}
}

// waitUpgrade waits while the stream opened for the first session runs.
func (r *recorder) waitUpgrade() {
	r.inMu.Lock()
	up := r.upgrade
	r.inMu.Unlock()
	if up == nil {
		return
	}
	<-up
	r.inMu.Lock()
	if r.upgrade == up {
		r.upgrade = nil
	}
	r.inMu.Unlock()
}

// stream opens the console stream and records it until it ends. Without
// force it fails while another client holds the console.
func (r *recorder) stream(force bool) error {
	conn, err := r.h.streamConn()
	if err != nil {
		return err
	}
	var flags uint32
	if force {
		flags = uint32(libvirt.DomainConsoleForce)
	}
	r.inMu.Lock()
	input := r.input
	var inR *io.PipeReader
	var inW *io.PipeWriter
	if input {
		inR, inW = io.Pipe()
		r.pipes = append(r.pipes, inW)
		close(r.ready)
		r.ready = make(chan struct{})
	}
	r.inMu.Unlock()
	if !input {
		return conn.DomainOpenConsole(r.dom, nil, r, flags)
	}
	err = conn.DomainOpenConsoleBidirectional(r.dom, nil, inR, r, flags)
	r.inMu.Lock()
	for i, w := range r.pipes {
		if w == inW {
			r.pipes = append(r.pipes[:i], r.pipes[i+1:]...)
			break
		}
	}
	r.inMu.Unlock()
	// Ends go-libvirt's sender, which may be waiting for input.
	inW.Close()
	inR.Close()
	return err
}

// Write takes what the stream delivers; it never blocks on a session.
func (r *recorder) Write(p []byte) (int, error) {
	r.write(p)
	return len(p), nil
}

// send sends p to the guest, waiting while no stream that carries input is
// open (the first session's is opening, or libvirtd restarts) until one is,
// the recording ends or gone is closed.
func (r *recorder) send(p []byte, gone <-chan struct{}) (int, error) {
	sent := 0
	for {
		r.inMu.Lock()
		var in *io.PipeWriter
		if len(r.pipes) > 0 {
			in = r.pipes[len(r.pipes)-1]
		}
		ready := r.ready
		r.inMu.Unlock()
		if in != nil {
			n, err := in.Write(p[sent:])
			sent += n
			if err == nil || !errors.Is(err, io.ErrClosedPipe) {
				return sent, err
			}
			continue // that stream ended meanwhile: the next one
		}
		select {
		case <-ready:
		case <-r.over:
			return sent, io.ErrClosedPipe
		case <-gone:
			return sent, io.ErrClosedPipe
		}
	}
}

// fanout keeps the last consoleKeep bytes written to it and copies every
// write to the sessions attached, each with its own bounded backlog.
type fanout struct {
	mu       sync.Mutex
	ring     ring
	sessions map[*session]struct{}
	end      error // set once the recording ended
	// in sends a session's writes to the guest until its second
	// argument is closed; nil drops them.
	in func([]byte, <-chan struct{}) (int, error)
}

// write records p and hands it to every session. A session whose backlog
// would pass consoleLag is cut off rather than waited for.
func (f *fanout) write(p []byte) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.end != nil {
		return
	}
	f.ring.write(p)
	for s := range f.sessions {
		if !s.push(p) {
			delete(f.sessions, s)
		}
	}
}

// attach adds a session that first reads the recorded output; nil if the
// recording ended.
func (f *fanout) attach() *session {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.end != nil {
		return nil
	}
	s := &session{f: f, backlog: f.ring.bytes(), gone: make(chan struct{})}
	s.cond.L = &s.mu
	if f.sessions == nil {
		f.sessions = map[*session]struct{}{}
	}
	f.sessions[s] = struct{}{}
	return s
}

func (f *fanout) ended() bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.end != nil
}

// finish ends the recording: sessions read what they have, then err.
func (f *fanout) finish(err error) {
	f.mu.Lock()
	if f.end != nil {
		f.mu.Unlock()
		return
	}
	f.end = err
	sessions := f.sessions
	f.sessions = nil
	f.ring = ring{}
	f.mu.Unlock()
	for s := range sessions {
		s.fail(err)
	}
}

func (f *fanout) detach(s *session) {
	f.mu.Lock()
	defer f.mu.Unlock()
	delete(f.sessions, s)
}

// session is one reader and writer of a recorded console.
type session struct {
	f    *fanout
	stop func() bool

	mu      sync.Mutex
	cond    sync.Cond
	backlog []byte
	err     error // returned once backlog is read
	closed  bool
	gone    chan struct{} // closed by Close
}

// push appends p to the backlog; false if the session is closed, ended or
// cut off for lagging.
func (s *session) push(p []byte) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed || s.err != nil {
		return false
	}
	if len(s.backlog)+len(p) > consoleLag {
		s.err = errConsoleBehind
		s.cond.Broadcast()
		return false
	}
	s.backlog = append(s.backlog, p...)
	s.cond.Broadcast()
	return true
}

func (s *session) fail(err error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.err == nil {
		s.err = err
	}
	s.cond.Broadcast()
}

// Read returns the recorded output, then what the guest writes; io.EOF once
// the domain stopped.
func (s *session) Read(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for {
		switch {
		case s.closed:
			return 0, io.ErrClosedPipe
		case len(s.backlog) > 0:
			n := copy(p, s.backlog)
			s.backlog = s.backlog[n:]
			if len(s.backlog) == 0 {
				s.backlog = nil // let a big backlog's array go
			}
			return n, nil
		case s.err != nil:
			return 0, s.err
		}
		s.cond.Wait()
	}
}

// Write sends p to the guest's console.
func (s *session) Write(p []byte) (int, error) {
	s.mu.Lock()
	closed := s.closed
	s.mu.Unlock()
	if closed {
		return 0, io.ErrClosedPipe
	}
	if s.f.in == nil {
		return len(p), nil
	}
	return s.f.in(p, s.gone)
}

// Close ends the session; the recording goes on.
func (s *session) Close() error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return nil
	}
	s.closed = true
	s.backlog = nil
	close(s.gone)
	s.cond.Broadcast()
	s.mu.Unlock()
	if s.stop != nil {
		s.stop()
	}
	s.f.detach(s)
	return nil
}

// ring holds the last consoleKeep bytes written to it. Its array is made at
// the first write, so a silent console costs nothing.
type ring struct {
	buf  []byte
	next int  // where the next byte goes
	full bool // buf has wrapped: the oldest byte is at next
}

func (r *ring) write(p []byte) {
	if len(p) == 0 {
		return
	}
	if r.buf == nil {
		r.buf = make([]byte, consoleKeep)
	}
	if len(p) >= len(r.buf) {
		copy(r.buf, p[len(p)-len(r.buf):])
		r.next, r.full = 0, true
		return
	}
	n := copy(r.buf[r.next:], p)
	if n < len(p) {
		copy(r.buf, p[n:])
		r.full = true
	}
	if r.next+len(p) >= len(r.buf) {
		r.full = true
	}
	r.next = (r.next + len(p)) % len(r.buf)
}

// bytes returns a copy of what the ring holds, oldest first.
func (r *ring) bytes() []byte {
	if !r.full {
		return append([]byte(nil), r.buf[:r.next]...)
	}
	out := make([]byte, 0, len(r.buf))
	out = append(out, r.buf[r.next:]...)
	return append(out, r.buf[:r.next]...)
}

// openConsole opens dom's console stream on a connection of its own: a
// stream's data is handed over inside go-libvirt's read loop, so a reader
// that falls behind would otherwise hold up every other call. The KVM probe
// and the test driver's sessions use it.
func (h *Libvirt) openConsole(ctx context.Context, dom libvirt.Domain) (*console, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	conn := libvirt.NewWithDialer(dialer{ctx: ctx, socket: h.socket})
	if err := conn.ConnectToURI(libvirt.ConnectURI(h.uri)); err != nil {
		return nil, fmt.Errorf("connect to %s at %s: %w: %w", h.uri, h.socket, ErrUnavailable, err)
	}
	outR, outW := io.Pipe() // guest to caller
	inR, inW := io.Pipe()   // caller to guest
	c := &console{r: outR, w: inW, conn: conn}
	go func() {
		// Force takes the console over from another session, as
		// `virsh console --force` does: a stale session must not lock
		// the operator out.
		err := conn.DomainOpenConsoleBidirectional(dom, nil, inR, drain{outW}, uint32(libvirt.DomainConsoleForce))
		if err == nil || errors.Is(err, libvirt.ErrInterrupted) {
			err = io.EOF
		}
		outW.CloseWithError(err)
		inR.Close()
		conn.Disconnect()
	}()
	c.stop = context.AfterFunc(ctx, func() { c.Close() })
	return c, nil
}

// console is one console session.
type console struct {
	r    *io.PipeReader
	w    *io.PipeWriter
	conn *libvirt.Libvirt
	stop func() bool
	once sync.Once
}

// Read returns what the guest wrote; io.EOF once the session ended.
func (c *console) Read(p []byte) (int, error) { return c.r.Read(p) }

// Write sends p to the guest's console.
func (c *console) Write(p []byte) (int, error) { return c.w.Write(p) }

// Close ends the session.
func (c *console) Close() error {
	c.once.Do(func() {
		c.stop()
		// Ending the input finishes the stream; closing the output
		// makes drain discard what still arrives, so go-libvirt's
		// read loop never waits on a reader that is gone.
		c.w.Close()
		c.r.Close()
		// Hanging up ends the stream even if libvirtd does not answer.
		go c.conn.Disconnect()
	})
	return nil
}

// drain writes into a pipe until its reader is closed, then discards.
type drain struct{ w *io.PipeWriter }

func (d drain) Write(p []byte) (int, error) {
	n, err := d.w.Write(p)
	if errors.Is(err, io.ErrClosedPipe) {
		return len(p), nil
	}
	return n, err
}
