package hv

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"testing"
)

// readAll reads s until it returns an error, and returns what it read and
// the error.
func readAll(s *session) ([]byte, error) {
	var out bytes.Buffer
	buf := make([]byte, 1000) // smaller than a write: reads split them
	for {
		n, err := s.Read(buf)
		out.Write(buf[:n])
		if err != nil {
			return out.Bytes(), err
		}
	}
}

// numbered returns n bytes of lines that name their own offsets, so a lost,
// repeated or reordered chunk shows.
func numbered(n int) []byte {
	var b bytes.Buffer
	for i := 0; b.Len() < n; i++ {
		fmt.Fprintf(&b, "line %07d\r\n", i)
	}
	return b.Bytes()[:n]
}

// TestConsoleRing: what a recording keeps is exactly the last consoleKeep
// bytes written, in order, whatever the sizes of the writes.
func TestConsoleRing(t *testing.T) {
	data := numbered(3*consoleKeep + 123)
	for _, chunk := range []int{1, 7, 1000, consoleKeep - 1, consoleKeep, consoleKeep + 5, len(data)} {
		var r ring
		for off := 0; off < len(data); off += chunk {
			r.write(data[off:min(off+chunk, len(data))])
		}
		if got, want := r.bytes(), data[len(data)-consoleKeep:]; !bytes.Equal(got, want) {
			t.Errorf("writes of %d: ring holds %d bytes starting %q, want the last %d starting %q",
				chunk, len(got), got[:min(20, len(got))], len(want), want[:20])
		}
	}
	var r ring
	if got := r.bytes(); len(got) != 0 {
		t.Errorf("empty ring holds %q", got)
	}
	r.write([]byte("short"))
	if got := string(r.bytes()); got != "short" {
		t.Errorf("ring after one short write holds %q", got)
	}
	if r.buf != nil && len(r.buf) != consoleKeep {
		t.Errorf("ring array is %d bytes, want %d", len(r.buf), consoleKeep)
	}
}

// TestConsoleFanout: a session attached late reads the recorded output and
// then the live output, nothing lost or repeated; several sessions each
// read everything; control bytes pass as they are; a session that does not
// read is cut off without holding up the recording or the others; the end
// of the recording ends every session with its error after what it had.
func TestConsoleFanout(t *testing.T) {
	var f fanout
	// The boot, before anyone attaches: more than is kept.
	boot := numbered(consoleKeep + 5000)
	for off := 0; off < len(boot); off += 4096 {
		f.write(boot[off:min(off+4096, len(boot))])
	}
	late := f.attach()
	second := f.attach()
	idle := f.attach() // never reads
	want := append([]byte(nil), boot[len(boot)-consoleKeep:]...)
	got := map[*session][]byte{}
	// take reads what was written since the readers' last turn, which
	// must be waiting already: a read would wait for it otherwise.
	take := func() {
		t.Helper()
		for _, s := range []*session{late, second} {
			need := len(want) - len(got[s])
			s.mu.Lock()
			have := len(s.backlog)
			s.mu.Unlock()
			if have < need {
				t.Fatalf("a session has %d bytes to read, want %d", have, need)
			}
			buf := make([]byte, need)
			if _, err := io.ReadFull(s, buf); err != nil {
				t.Fatalf("read: %v", err)
			}
			got[s] = append(got[s], buf...)
		}
	}
	take()
	write := func(p []byte) {
		want = append(want, p...)
		f.write(p)
		take()
	}
	// Every byte value, escape sequences included.
	var raw []byte
	for i := range 256 {
		raw = append(raw, byte(i))
	}
	write(raw)
	write([]byte("\x1b[2J\x1b[Hlogin: "))

	// The idle session's backlog passes consoleLag: it is cut off, the
	// writes and the other sessions go on.
	live := numbered(consoleLag)
	for off := 0; off < len(live); off += 8192 {
		write(live[off:min(off+8192, len(live))])
	}
	f.mu.Lock()
	_, stillThere := f.sessions[idle]
	n := len(f.sessions)
	f.mu.Unlock()
	if stillThere || n != 2 {
		t.Errorf("after the idle session fell behind: %d sessions, idle one still there: %v", n, stillThere)
	}

	// The end of the recording: each session reads what it has, then io.EOF.
	want = append(want, "threes-test: power button\r\n"...)
	f.write([]byte("threes-test: power button\r\n"))
	f.finish(io.EOF)
	for _, s := range []*session{late, second} {
		rest, err := readAll(s)
		if err != io.EOF {
			t.Errorf("session ended with %v, want io.EOF", err)
		}
		if all := append(got[s], rest...); !bytes.Equal(all, want) {
			t.Errorf("session read %d bytes, want %d: the last %d of the boot, then everything after", len(all), len(want), consoleKeep)
		}
	}

	idleGot, err := readAll(idle)
	if !errors.Is(err, errConsoleBehind) {
		t.Errorf("idle session ended with %v, want %v", err, errConsoleBehind)
	}
	if len(idleGot) > consoleLag || !bytes.HasPrefix(want, idleGot) {
		t.Errorf("idle session read %d bytes, want a prefix of the output of at most %d", len(idleGot), consoleLag)
	}

	// Once ended, there is nothing to attach to, and writes are dropped.
	if s := f.attach(); s != nil {
		t.Errorf("attach after finish gave a session")
	}
	f.write([]byte("more"))
}

// TestConsoleSessionClose: a closed session's reads fail at once, even one
// waiting for output, and the recording forgets it.
func TestConsoleSessionClose(t *testing.T) {
	var f fanout
	f.write([]byte("hello\r\n"))
	s := f.attach()
	s.mu.Lock()
	replay := string(s.backlog)
	s.mu.Unlock()
	if replay != "hello\r\n" {
		t.Fatalf("session attached with %q to read, want the recorded output", replay)
	}
	buf := make([]byte, 100)
	if n, err := s.Read(buf); err != nil || string(buf[:n]) != "hello\r\n" {
		t.Fatalf("first read = %q, %v; want the recorded output", buf[:n], err)
	}
	done := make(chan error)
	go func() {
		_, err := s.Read(buf) // waits: nothing new
		done <- err
	}()
	s.Close()
	if err := <-done; !errors.Is(err, io.ErrClosedPipe) {
		t.Errorf("read after Close: %v, want io.ErrClosedPipe", err)
	}
	if _, err := s.Write([]byte("x")); !errors.Is(err, io.ErrClosedPipe) {
		t.Errorf("write after Close: %v, want io.ErrClosedPipe", err)
	}
	f.mu.Lock()
	n := len(f.sessions)
	f.mu.Unlock()
	if n != 0 {
		t.Errorf("%d sessions after Close, want 0", n)
	}
	f.write([]byte("after"))
	if err := s.Close(); err != nil {
		t.Errorf("second Close: %v", err)
	}
}
