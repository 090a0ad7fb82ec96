package hv

import (
	"context"
	"errors"
	"time"

	"github.com/digitalocean/go-libvirt"
)

// eventRetry bounds how long Events waits between attempts to subscribe
// while libvirtd is away.
const eventRetry = 2 * time.Second

// Events delivers this Libvirt's domains' state changes; see Hypervisor.
func (h *Libvirt) Events(ctx context.Context) (<-chan Event, error) {
	h.mu.Lock()
	closed := h.closed
	h.mu.Unlock()
	if closed {
		return nil, errClosed
	}
	out := make(chan Event, 64)
	go h.pumpEvents(ctx, out)
	return out, nil
}

// pumpEvents subscribes to libvirt's lifecycle events, forwards this
// Libvirt's to out, and subscribes again whenever the connection is lost,
// until ctx ends or h is closed.
func (h *Libvirt) pumpEvents(ctx context.Context, out chan<- Event) {
	defer close(out)
	send := func(ev Event) bool {
		if ev.State == StateRunning {
			// A domain found running at a (re)subscription, or
			// started by someone else: record its console from now.
			h.recordLater(ev.ID)
		}
		select {
		case out <- ev:
			return true
		case <-ctx.Done():
			return false
		}
	}
	// The IDs of this Libvirt's domains as last seen: true for ours,
	// false for others'. It outlives subscriptions, so a domain that
	// vanished while the connection was down is reported missing.
	mine := map[string]bool{}
	wait := 50 * time.Millisecond
	for ctx.Err() == nil {
		ok := h.subscribeOnce(ctx, mine, send)
		if errors.Is(ctx.Err(), context.Canceled) || h.isClosed() {
			return
		}
		if ok {
			wait = 50 * time.Millisecond // it worked until the connection went
			continue
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(wait):
		}
		wait = min(2*wait, eventRetry)
	}
}

func (h *Libvirt) isClosed() bool {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.closed
}

// subscribeOnce subscribes on a connection of its own, sends every domain's
// state (and StateMissing for domains in mine that are gone), then forwards
// events until the subscription ends. It reports whether the subscription
// was made.
func (h *Libvirt) subscribeOnce(ctx context.Context, mine map[string]bool, send func(Event) bool) bool {
	// A connection of the subscription's own: libvirtd refuses a second
	// lifecycle subscription on one connection ("event callback already
	// tracked"), and Events may be called again before the first ends.
	conn := libvirt.NewWithDialer(dialer{ctx: ctx, socket: h.socket})
	if err := conn.ConnectToURI(libvirt.ConnectURI(h.uri)); err != nil {
		return false
	}
	defer func() { go conn.Disconnect() }() // may wait seconds for a gone libvirtd
	sctx, cancel := context.WithCancel(ctx)
	defer cancel()
	// Close ends the subscription, as it ends calls on h's connection.
	go func() {
		select {
		case <-h.done:
			cancel()
		case <-sctx.Done():
		}
	}()
	events, err := conn.LifecycleEvents(sctx)
	if err != nil {
		return false
	}
	// Subscribed first, listed second: a change between the two shows
	// up as an event after the listing, never lost.
	doms, err := h.List(ctx)
	if err != nil {
		return false // start over after a pause
	}
	listed := make(map[string]bool, len(doms))
	for _, d := range doms {
		listed[d.ID] = true
	}
	for id, ours := range mine {
		if !listed[id] {
			delete(mine, id)
			if ours && !send(Event{ID: id, State: StateMissing, Reason: "sync"}) {
				return true
			}
		}
	}
	for _, d := range doms {
		mine[d.ID] = true
		if !send(Event{ID: d.ID, State: d.State, Reason: "sync"}) {
			return true
		}
	}
	for msg := range events {
		name := msg.Dom.Name
		typ := libvirt.DomainEventType(msg.Event)
		if _, known := mine[name]; !known && typ != libvirt.DomainEventUndefined {
			// A domain defined since the listing: ours only if it
			// carries our metadata.
			// An error leaves it not ours; one from a broken
			// connection ends the subscription next.
			owned, _ := h.owns(conn, msg.Dom)
			mine[name] = owned
		}
		if !mine[name] {
			continue
		}
		ev, ok := eventOf(typ, msg.Detail)
		if !ok {
			continue
		}
		if typ == libvirt.DomainEventUndefined {
			delete(mine, name)
		}
		ev.ID = name
		if !send(ev) {
			return true
		}
	}
	return true
}

// eventOf maps a libvirt lifecycle event onto an Event without its ID;
// false for events that change no State (a definition).
func eventOf(typ libvirt.DomainEventType, detail int32) (Event, bool) {
	switch typ {
	case libvirt.DomainEventUndefined:
		return Event{State: StateMissing, Reason: "undefined"}, true
	case libvirt.DomainEventStarted:
		reasons := map[libvirt.DomainEventStartedDetailType]string{
			libvirt.DomainEventStartedBooted:       "booted",
			libvirt.DomainEventStartedMigrated:     "migrated",
			libvirt.DomainEventStartedRestored:     "restored",
			libvirt.DomainEventStartedFromSnapshot: "from snapshot",
			libvirt.DomainEventStartedWakeup:       "wakeup",
		}
		return Event{State: StateRunning, Reason: reasons[libvirt.DomainEventStartedDetailType(detail)]}, true
	case libvirt.DomainEventSuspended:
		return Event{State: StatePaused, Reason: "suspended"}, true
	case libvirt.DomainEventResumed:
		return Event{State: StateRunning, Reason: "resumed"}, true
	case libvirt.DomainEventStopped:
		switch libvirt.DomainEventStoppedDetailType(detail) {
		case libvirt.DomainEventStoppedShutdown:
			return Event{State: StateStopped, Reason: "shutdown"}, true
		case libvirt.DomainEventStoppedDestroyed:
			return Event{State: StateStopped, Reason: "destroyed"}, true
		case libvirt.DomainEventStoppedCrashed:
			return Event{State: StateCrashed, Reason: "crashed"}, true
		case libvirt.DomainEventStoppedFailed:
			return Event{State: StateStopped, Reason: "failed"}, true
		}
		return Event{State: StateStopped, Reason: "stopped"}, true
	case libvirt.DomainEventShutdown:
		// The guest finished shutting down; Stopped follows.
		return Event{State: StateStopping, Reason: "shutdown"}, true
	case libvirt.DomainEventPmsuspended:
		return Event{State: StatePaused, Reason: "pm suspended"}, true
	case libvirt.DomainEventCrashed:
		return Event{State: StateCrashed, Reason: "crashed"}, true
	}
	return Event{}, false
}
