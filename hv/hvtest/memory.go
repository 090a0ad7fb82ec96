package hvtest

import (
	"context"
	"errors"
	"fmt"
	"io"
	"slices"
	"sync"

	"github.com/threes-dev/threes/hv"
)

// Memory is an hv.Hypervisor whose domains and disks live in this process's
// memory: nothing boots, nothing needs root or libvirtd, and every call
// returns at once. It follows hv.Hypervisor's documented contract as
// *hv.Libvirt does (the same sentinel errors, naming the domain; the same
// state changes and events, with libvirt's reasons), which Contract checks
// against both, so code above hv can be tested in seconds as a normal user.
//
// A domain's "guest" does nothing but echo its console's input back,
// byte for byte, and say what GuestWrite gives it (see Console). Create validates the
// Spec as hv.Libvirt does (Spec.Validate) but looks at no image file and no
// bridge; a Spec with an image disk or DiskGiB gets a disk, which has no
// file.
//
// The methods after Accel are test hooks, standing for what happens to a
// real domain behind hv's back (libvirt losing it, the guest crashing) and
// for failures a real libvirtd gives only by accident.
//
// Memory is safe for concurrent use. Its zero value is not usable: call
// NewMemory.
type Memory struct {
	mu    sync.Mutex
	doms  map[string]*memDomain
	disks map[string]bool
	subs  map[*memSub]bool
	fail  map[Step][]error
}

var _ hv.Hypervisor = (*Memory)(nil)

// memDomain is one domain of a Memory.
type memDomain struct {
	spec  hv.Spec
	state hv.State
	// boots counts the domain's boots, as libvirt's domain id changes
	// with each.
	boots int
	// output is the current boot's console output, its last
	// ConsoleReplay bytes.
	output   []byte
	sessions map[*memConsole]bool
}

// NewMemory returns an empty Memory.
func NewMemory() *Memory {
	return &Memory{
		doms:  map[string]*memDomain{},
		disks: map[string]bool{},
		subs:  map[*memSub]bool{},
		fail:  map[Step][]error{},
	}
}

// Step is a step of a Memory call that FailNext can make fail.
type Step string

const (
	// StepDisk is Create making the VM's disk (only for a Spec that
	// asks for one).
	StepDisk Step = "disk"
	// StepDefine is Create defining the domain.
	StepDefine Step = "define"
	// StepBoot is booting the domain: Create's last step, Start and the
	// start half of Restart.
	StepBoot Step = "boot"
	// StepStop is powering a running domain off: Stop, the stop half of
	// Restart, and Remove of a running domain.
	StepStop Step = "stop"
	// StepUndefine is Remove undefining the domain.
	StepUndefine Step = "undefine"
)

// failAt returns the error queued for step, if any, and dequeues it.
// m.mu is held.
func (m *Memory) failAt(step Step) error {
	q := m.fail[step]
	if len(q) == 0 {
		return nil
	}
	m.fail[step] = q[1:]
	return q[0]
}

// Create makes the disk (if s asks for one), defines the domain and boots
// it; see hv.Hypervisor.
func (m *Memory) Create(ctx context.Context, s hv.Spec) error {
	if err := m.create(ctx, s); err != nil {
		return fmt.Errorf("create domain %s: %w", s.ID, err)
	}
	return nil
}

func (m *Memory) create(ctx context.Context, s hv.Spec) error {
	if err := s.Validate(); err != nil {
		return err
	}
	if err := ctx.Err(); err != nil {
		return err
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	// The steps in hv.Libvirt's order, each undone when a later one
	// fails, newest first.
	var undo []func()
	fail := func(err error) error {
		for i := len(undo) - 1; i >= 0; i-- {
			undo[i]()
		}
		return err
	}
	if s.Image.Disk != "" || s.DiskGiB > 0 {
		if m.disks[s.ID] {
			return fmt.Errorf("disk of %s: %w", s.ID, hv.ErrExists)
		}
		if err := m.failAt(StepDisk); err != nil {
			return fmt.Errorf("create disk: %w", err)
		}
		m.disks[s.ID] = true
		undo = append(undo, func() { delete(m.disks, s.ID) })
	} else if m.disks[s.ID] {
		return fmt.Errorf("disk of %s: %w", s.ID, hv.ErrExists)
	}
	if m.doms[s.ID] != nil {
		return fail(fmt.Errorf("define: %w", hv.ErrExists))
	}
	if err := m.failAt(StepDefine); err != nil {
		return fail(fmt.Errorf("define: %w", err))
	}
	d := &memDomain{spec: s, state: hv.StateStopped}
	m.doms[s.ID] = d
	// Defining sends no event (it changes no State), undefining does,
	// as with libvirt.
	undo = append(undo, func() {
		delete(m.doms, s.ID)
		m.emit(hv.Event{ID: s.ID, State: hv.StateMissing, Reason: "undefined"})
	})
	if err := m.failAt(StepBoot); err != nil {
		return fail(fmt.Errorf("start on bridge %s: %w", s.Bridge, err))
	}
	m.boot(d, "booted")
	return nil
}

// boot makes d run; m.mu is held.
func (m *Memory) boot(d *memDomain, reason string) {
	d.boots++
	d.output = nil // an earlier boot's output is not replayed
	d.state = hv.StateRunning
	m.emit(hv.Event{ID: d.spec.ID, State: hv.StateRunning, Reason: reason})
}

// halt makes d stop in state with reason and ends its console sessions;
// m.mu is held.
func (m *Memory) halt(d *memDomain, state hv.State, reason string) {
	d.state = state
	for c := range d.sessions {
		c.end(io.EOF)
	}
	d.sessions = nil
	m.emit(hv.Event{ID: d.spec.ID, State: state, Reason: reason})
}

// domain returns the domain id; m.mu is held.
func (m *Memory) domain(ctx context.Context, id string) (*memDomain, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	d := m.doms[id]
	if d == nil {
		return nil, hv.ErrNotFound
	}
	return d, nil
}

// Start boots a stopped or crashed domain and resumes a paused one; see
// hv.Hypervisor.
func (m *Memory) Start(ctx context.Context, id string) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if err := m.start(ctx, id); err != nil {
		return fmt.Errorf("start domain %s: %w", id, err)
	}
	return nil
}

func (m *Memory) start(ctx context.Context, id string) error {
	d, err := m.domain(ctx, id)
	if err != nil {
		return err
	}
	if d.state == hv.StateRunning {
		return nil
	}
	if err := m.failAt(StepBoot); err != nil {
		return err
	}
	if d.state == hv.StatePaused {
		// The same boot carries on.
		d.state = hv.StateRunning
		m.emit(hv.Event{ID: id, State: hv.StateRunning, Reason: "resumed"})
		return nil
	}
	m.boot(d, "booted")
	return nil
}

// Stop powers the domain off: a running guest "sees the power button" at
// once (Reason "shutdown"), a paused one is powered off (Reason
// "destroyed"); see hv.Hypervisor.
func (m *Memory) Stop(ctx context.Context, id string) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if err := m.stop(ctx, id); err != nil {
		return fmt.Errorf("stop domain %s: %w", id, err)
	}
	return nil
}

func (m *Memory) stop(ctx context.Context, id string) error {
	d, err := m.domain(ctx, id)
	if err != nil {
		return err
	}
	switch d.state {
	case hv.StateStopped, hv.StateCrashed:
		// A crashed domain is already off (hv defines domains with
		// on_crash=destroy) and stays "crashed", as with libvirt.
		return nil
	}
	if err := m.failAt(StepStop); err != nil {
		return fmt.Errorf("shut down: %w", err)
	}
	if d.state == hv.StatePaused {
		m.halt(d, hv.StateStopped, "destroyed")
		return nil
	}
	m.halt(d, hv.StateStopped, "shutdown")
	return nil
}

// Restart stops the domain as Stop does and starts it again; see
// hv.Hypervisor.
func (m *Memory) Restart(ctx context.Context, id string) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if err := m.stop(ctx, id); err != nil {
		return fmt.Errorf("restart domain %s: %w", id, err)
	}
	if err := m.start(ctx, id); err != nil {
		return fmt.Errorf("restart domain %s: %w", id, err)
	}
	return nil
}

// Remove powers the domain off if it runs, undefines it and deletes its
// disk; see hv.Hypervisor.
func (m *Memory) Remove(ctx context.Context, id string) error {
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("remove domain %s: %w", id, err)
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if d := m.doms[id]; d != nil {
		if d.state != hv.StateStopped && d.state != hv.StateCrashed {
			if err := m.failAt(StepStop); err != nil {
				return fmt.Errorf("remove domain %s: destroy: %w", id, err)
			}
			m.halt(d, hv.StateStopped, "destroyed")
		}
		if err := m.failAt(StepUndefine); err != nil {
			return fmt.Errorf("remove domain %s: %w", id, err)
		}
		delete(m.doms, id)
		m.emit(hv.Event{ID: id, State: hv.StateMissing, Reason: "undefined"})
		delete(m.disks, id)
		return nil
	}
	if !m.disks[id] {
		return fmt.Errorf("remove domain %s: %w", id, hv.ErrNotFound)
	}
	delete(m.disks, id)
	return nil
}

// State reports the domain's state; see hv.Hypervisor.
func (m *Memory) State(ctx context.Context, id string) (hv.State, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	d, err := m.domain(ctx, id)
	switch {
	case errors.Is(err, hv.ErrNotFound):
		return hv.StateMissing, fmt.Errorf("state of domain %s: %w", id, err)
	case err != nil:
		return hv.StateUnknown, fmt.Errorf("state of domain %s: %w", id, err)
	}
	return d.state, nil
}

// List reports every domain, sorted by ID; see hv.Hypervisor.
func (m *Memory) List(ctx context.Context) ([]hv.Domain, error) {
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("list domains: %w", err)
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.list(), nil
}

// list returns every domain sorted by ID; m.mu is held.
func (m *Memory) list() []hv.Domain {
	out := make([]hv.Domain, 0, len(m.doms))
	for id, d := range m.doms {
		out = append(out, hv.Domain{ID: id, State: d.state})
	}
	slices.SortFunc(out, func(a, b hv.Domain) int {
		switch {
		case a.ID < b.ID:
			return -1
		case a.ID > b.ID:
			return 1
		}
		return 0
	})
	return out
}

// Disks reports the IDs that have a disk, sorted; see hv.Hypervisor.
func (m *Memory) Disks(ctx context.Context) ([]string, error) {
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("list disks: %w", err)
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	ids := make([]string, 0, len(m.disks))
	for id := range m.disks {
		ids = append(ids, id)
	}
	slices.Sort(ids)
	return ids, nil
}

// Events delivers every change to the domains from the call on, after a
// "sync" event per domain (sorted by ID); see hv.Hypervisor. A reader that
// falls behind holds up no call: events queue for it without bound.
func (m *Memory) Events(ctx context.Context) (<-chan hv.Event, error) {
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("events: %w", err)
	}
	sub := &memSub{wake: make(chan struct{}, 1)}
	m.mu.Lock()
	for _, d := range m.list() {
		sub.queue = append(sub.queue, hv.Event{ID: d.ID, State: d.State, Reason: "sync"})
	}
	m.subs[sub] = true
	m.mu.Unlock()
	out := make(chan hv.Event)
	go func() {
		defer close(out)
		defer func() {
			m.mu.Lock()
			delete(m.subs, sub)
			m.mu.Unlock()
		}()
		for {
			ev, ok := sub.next()
			if !ok {
				select {
				case <-sub.wake:
					continue
				case <-ctx.Done():
					return
				}
			}
			select {
			case out <- ev:
			case <-ctx.Done():
				return
			}
		}
	}()
	return out, nil
}

// memSub is one Events subscription.
type memSub struct {
	mu    sync.Mutex
	queue []hv.Event
	wake  chan struct{} // has a token when queue may have grown
}

func (s *memSub) push(ev hv.Event) {
	s.mu.Lock()
	s.queue = append(s.queue, ev)
	s.mu.Unlock()
	select {
	case s.wake <- struct{}{}:
	default:
	}
}

func (s *memSub) next() (hv.Event, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if len(s.queue) == 0 {
		return hv.Event{}, false
	}
	ev := s.queue[0]
	s.queue = s.queue[1:]
	return ev, true
}

// emit sends ev to every subscription; m.mu is held, so every subscriber
// sees changes in the order they happened.
func (m *Memory) emit(ev hv.Event) {
	for sub := range m.subs {
		sub.push(ev)
	}
}

// Console attaches to the running (or paused) domain's console; see
// hv.Hypervisor. The guest echoes what any session writes, byte for byte,
// and adds what GuestWrite gives it. As with hv.Libvirt on QEMU, a session
// first reads the output of the domain's current boot (its last
// ConsoleReplay bytes), then what follows; sessions share the console; one
// that leaves more than ConsoleBehind bytes unread is cut off (its reads
// return an error after what it had). A session whose domain stops (Stop,
// Restart, Remove, Crash, Lose, PowerOff) reads io.EOF after what it had;
// one closed, or whose ctx ended, reads io.ErrClosedPipe.
func (m *Memory) Console(ctx context.Context, id string) (io.ReadWriteCloser, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	d, err := m.domain(ctx, id)
	if err == nil && d.state != hv.StateRunning && d.state != hv.StatePaused {
		err = hv.ErrNotRunning
	}
	if err != nil {
		return nil, fmt.Errorf("console of domain %s: %w", id, err)
	}
	c := &memConsole{changed: make(chan struct{}), buf: slices.Clone(d.output)}
	c.input = func(p []byte) {
		m.mu.Lock()
		defer m.mu.Unlock()
		if d.sessions[c] {
			m.say(d, p)
		}
	}
	if d.sessions == nil {
		d.sessions = map[*memConsole]bool{}
	}
	d.sessions[c] = true
	c.stop = context.AfterFunc(ctx, func() { c.Close() })
	c.leave = func() {
		m.mu.Lock()
		defer m.mu.Unlock()
		delete(d.sessions, c)
	}
	return c, nil
}

// ConsoleReplay is how much of a boot's console output a new session
// reads first; ConsoleBehind is how much a session may leave unread before
// it is cut off. Both are hv.Libvirt's for QEMU domains.
const (
	ConsoleReplay = 64 << 10
	ConsoleBehind = 256 << 10
)

// errCutOff ends a console session that fell too far behind.
var errCutOff = fmt.Errorf("console session cut off: more than %d bytes unread", ConsoleBehind)

// say is the guest writing p on d's console; m.mu is held.
func (m *Memory) say(d *memDomain, p []byte) {
	d.output = append(d.output, p...)
	if n := len(d.output) - ConsoleReplay; n > 0 {
		d.output = slices.Clone(d.output[n:])
	}
	for c := range d.sessions {
		if !c.say(p) {
			delete(d.sessions, c)
		}
	}
}

// memConsole is one console session of a Memory domain.
type memConsole struct {
	mu      sync.Mutex
	buf     []byte
	err     error         // set when the session ended
	changed chan struct{} // closed and replaced when buf or err change
	input   func([]byte)  // gives the guest what the session writes
	stop    func() bool   // ends the watch on the session's ctx
	leave   func()        // takes the session off its domain
}

// say adds what the guest wrote, and reports whether the session is still
// on: false when it ended, or when this made it fall too far behind.
func (c *memConsole) say(p []byte) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.err != nil {
		return false
	}
	if len(c.buf)+len(p) > ConsoleBehind {
		c.err = errCutOff
	} else {
		c.buf = append(c.buf, p...)
	}
	close(c.changed)
	c.changed = make(chan struct{})
	return c.err == nil
}

// end ends the session: reads return what is left, then err.
func (c *memConsole) end(err error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.err != nil {
		return
	}
	c.err = err
	if err == io.ErrClosedPipe {
		c.buf = nil // closed: nothing more to read
	}
	close(c.changed)
	c.changed = make(chan struct{})
}

// Read returns what the guest wrote, waiting for it.
func (c *memConsole) Read(p []byte) (int, error) {
	for {
		c.mu.Lock()
		if len(c.buf) > 0 {
			n := copy(p, c.buf)
			c.buf = c.buf[n:]
			c.mu.Unlock()
			return n, nil
		}
		err, changed := c.err, c.changed
		c.mu.Unlock()
		if err != nil {
			return 0, err
		}
		<-changed
	}
}

// Write is the guest's input, which it echoes to every session.
func (c *memConsole) Write(p []byte) (int, error) {
	c.mu.Lock()
	err := c.err
	c.mu.Unlock()
	if err != nil {
		return 0, io.ErrClosedPipe
	}
	c.input(p)
	return len(p), nil
}

// Close ends the session.
func (c *memConsole) Close() error {
	c.stop()
	c.end(io.ErrClosedPipe)
	c.leave()
	return nil
}

// Accel reports DomainType "memory".
func (m *Memory) Accel(ctx context.Context) (hv.Accel, error) {
	return hv.Accel{DomainType: "memory", Reason: "hvtest.Memory: domains live in the test's memory and run nothing"}, nil
}

// Test hooks: what happens to real domains behind hv's back.

// FailNext makes the next call that reaches step fail with an error
// wrapping err (a fresh error naming the step if err is nil), after the
// steps before it succeeded and before step changes anything; Create then
// undoes what it made, as hv.Libvirt does. Several FailNext calls for one
// step fail that many calls, in order.
func (m *Memory) FailNext(step Step, err error) {
	if err == nil {
		err = fmt.Errorf("hvtest.Memory: injected failure at step %s", step)
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	m.fail[step] = append(m.fail[step], err)
}

// Lose makes the domain vanish as when libvirt loses it (someone undefines
// it with virsh, or the test driver's libvirtd restarts): a running domain
// is destroyed (event Reason "destroyed") and the domain undefined (Reason
// "undefined"); its disk stays. It reports whether there was a domain.
func (m *Memory) Lose(id string) bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	d := m.doms[id]
	if d == nil {
		return false
	}
	if d.state != hv.StateStopped && d.state != hv.StateCrashed {
		m.halt(d, hv.StateStopped, "destroyed")
	}
	delete(m.doms, id)
	m.emit(hv.Event{ID: id, State: hv.StateMissing, Reason: "undefined"})
	return true
}

// Crash makes a running or paused domain's guest crash: it is off in state
// StateCrashed (Reason "crashed"), as hv's domains (on_crash=destroy) end up.
// It reports whether the domain was running or paused.
func (m *Memory) Crash(id string) bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	d := m.doms[id]
	if d == nil || (d.state != hv.StateRunning && d.state != hv.StatePaused) {
		return false
	}
	m.halt(d, hv.StateCrashed, "crashed")
	return true
}

// Pause pauses a running domain (Reason "suspended"), as `virsh suspend`
// would. It reports whether the domain was running.
func (m *Memory) Pause(id string) bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	d := m.doms[id]
	if d == nil || d.state != hv.StateRunning {
		return false
	}
	d.state = hv.StatePaused
	m.emit(hv.Event{ID: id, State: hv.StatePaused, Reason: "suspended"})
	return true
}

// PowerOff makes a running domain's guest power itself off (Reason
// "shutdown"), as `poweroff` in the guest would. It reports whether the
// domain was running.
func (m *Memory) PowerOff(id string) bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	d := m.doms[id]
	if d == nil || d.state != hv.StateRunning {
		return false
	}
	m.halt(d, hv.StateStopped, "shutdown")
	return true
}

// Resync sends every subscription the current state of every domain
// (Reason "sync") as hv.Libvirt does after it reconnects to libvirtd.
func (m *Memory) Resync() {
	m.mu.Lock()
	defer m.mu.Unlock()
	for _, d := range m.list() {
		m.emit(hv.Event{ID: d.ID, State: d.State, Reason: "sync"})
	}
}

// GuestWrite makes the running (or paused) domain's guest write s on its
// console. It reports whether the domain was running or paused.
func (m *Memory) GuestWrite(id, s string) bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	d := m.doms[id]
	if d == nil || (d.state != hv.StateRunning && d.state != hv.StatePaused) {
		return false
	}
	m.say(d, []byte(s))
	return true
}

// Boots reports how many times the domain has booted (0 if there is no such
// domain): a test can tell a restart, or a Start that was a no-op, by it.
func (m *Memory) Boots(id string) int {
	m.mu.Lock()
	defer m.mu.Unlock()
	if d := m.doms[id]; d != nil {
		return d.boots
	}
	return 0
}

// SpecOf returns the Spec the domain was created from, and whether it
// exists.
func (m *Memory) SpecOf(id string) (hv.Spec, bool) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if d := m.doms[id]; d != nil {
		return d.spec, true
	}
	return hv.Spec{}, false
}
