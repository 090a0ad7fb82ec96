package hv

import (
	"context"
	"errors"
	"fmt"
	"io"
	"sync"

	"github.com/digitalocean/go-libvirt"
)

// Console attaches to the domain's serial console; see Hypervisor.
func (h *Libvirt) Console(ctx context.Context, id string) (io.ReadWriteCloser, error) {
	dom, st, err := h.domainAndState(ctx, id)
	if err == nil && st != libvirt.DomainRunning && st != libvirt.DomainBlocked && st != libvirt.DomainPaused {
		err = ErrNotRunning
	}
	if err != nil {
		return nil, fmt.Errorf("console of domain %s: %w", id, err)
	}
	c, err := h.openConsole(ctx, dom)
	if err != nil {
		return nil, fmt.Errorf("console of domain %s: %w", id, err)
	}
	return c, nil
}

// openConsole opens dom's console stream on a connection of its own: a
// stream's data is handed over inside go-libvirt's read loop, so a reader
// that falls behind would otherwise hold up every other call.
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
