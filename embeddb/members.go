package embeddb

import (
	"context"
	"fmt"
	"slices"
	"sync"
	"time"

	cproto "github.com/rqlite/rqlite/v8/cluster/proto"
	"github.com/rqlite/rqlite/v8/command/proto"
	"github.com/rqlite/rqlite/v8/store"
)

// Member is one server of the Raft configuration, as this node sees it.
type Member struct {
	// ID is the node's ID (the appliance's hostname); Addr its Raft address.
	ID, Addr string
	// Voter is false for a nonvoter (it replicates but does not count to quorum).
	Voter bool
	// Leader is whether this node takes it for the leader now.
	Leader bool
	// Reachable is whether its cluster service answered this node just now (this
	// node itself always does).
	Reachable bool
}

// probeTimeout bounds the question to one peer whether it answers: a peer that
// takes longer counts as unreachable.
const probeTimeout = 2 * time.Second

// Members returns the Raft configuration as this node holds it, by ID, asking each
// other member's cluster service for its metadata (one small round trip, and
// nothing that needs the leader) to say whether it answers. It reads nothing
// through the leader, so it answers without a quorum too.
func (db *DB) Members(ctx context.Context) ([]Member, error) {
	nodes, err := db.str.Nodes()
	if err != nil {
		return nil, fmt.Errorf("raft members: %w", db.localErr(err))
	}
	_, leader := db.str.LeaderWithID()
	reach := db.reach(ctx, nodes)
	ms := make([]Member, len(nodes))
	for i, n := range nodes {
		ms[i] = Member{ID: n.ID, Addr: n.Addr, Voter: n.Suffrage == "Voter", Leader: n.ID == leader, Reachable: reach[i]}
	}
	return ms, nil
}

// localErr maps a store error of a call made on this node alone.
func (db *DB) localErr(err error) error { return localBackend{str: db.str}.mapErr(err) }

// reach asks every node but this one, at once, whether it answers.
func (db *DB) reach(ctx context.Context, nodes []*store.Server) []bool {
	cb, _ := db.be.(clusterBackend)
	return cb.reach(ctx, db.str.ID(), nodes)
}

// reach reports, for each node, whether its cluster service answered a request
// for its metadata within probeTimeout (or ctx). self answers by definition.
func (b clusterBackend) reach(ctx context.Context, self string, nodes []*store.Server) []bool {
	timeout := probeTimeout
	if d, ok := ctx.Deadline(); ok {
		timeout = min(timeout, max(time.Until(d), 0))
	}
	out := make([]bool, len(nodes))
	var wg sync.WaitGroup
	for i, n := range nodes {
		if n.ID == self {
			out[i] = true
			continue
		}
		if b.dialer == nil || timeout <= 0 {
			continue
		}
		wg.Go(func() {
			var meta cproto.NodeMeta
			_, err := b.call(n.Addr, timeout, &cproto.Command{Type: cproto.Command_COMMAND_TYPE_GET_NODE_META}, &meta)
			out[i] = err == nil
		})
	}
	wg.Wait()
	return out
}

// removeWait bounds how long RemoveMember waits for this node's own copy of the
// configuration to drop the member, so a listing right after does not show it.
const removeWait = 5 * time.Second

// RemoveMember takes the node with this ID out of the Raft configuration: on the
// leader itself, else through the leader's cluster service, as writes go. An ID
// that is not a member is a host name ErrNotFound. It needs the leader: without a
// quorum it fails with ErrNoQuorum, as writes do. Removing a member that still runs
// does not stop it; stop it, or it keeps trying to rejoin an election it has no
// vote in.
func (db *DB) RemoveMember(ctx context.Context, id string) error {
	nodes, err := db.str.Nodes()
	if err != nil {
		return fmt.Errorf("remove raft member %s: %w", id, db.localErr(err))
	}
	if !slices.ContainsFunc(nodes, func(n *store.Server) bool { return n.ID == id }) {
		return fieldErr(FieldHostName, id, ErrNotFound)
	}
	req := &proto.RemoveNodeRequest{Id: id}
	cb, ok := db.be.(clusterBackend)
	if !ok {
		if err := db.str.Remove(req); err != nil {
			return fmt.Errorf("remove raft member %s: %w", id, db.localErr(err))
		}
	} else if _, err := forward(ctx, cb, true,
		// Removing a member twice leaves the configuration as once: safe to repeat.
		func() (struct{}, error) { return struct{}{}, db.str.Remove(req) },
		func(addr string, t time.Duration) (struct{}, string, bool, error) {
			var resp cproto.CommandRemoveNodeResponse
			sent, err := cb.call(addr, t, &cproto.Command{
				Type:    cproto.Command_COMMAND_TYPE_REMOVE_NODE,
				Request: &cproto.Command_RemoveNodeRequest{RemoveNodeRequest: req},
			}, &resp)
			return struct{}{}, resp.Error, sent, err
		}); err != nil {
		return fmt.Errorf("remove raft member %s: %w", id, err)
	}
	if id != db.str.ID() {
		// The leader committed the change; this node applies it in a moment.
		db.str.WaitForRemoval(id, removeWait)
	}
	if cb, ok := db.be.(clusterBackend); ok {
		// Spares the next read the wait a change of members costs it (see
		// clusterBackend.query); a failure here costs only that wait.
		cb.barrier(ctx)
	}
	return nil
}

// Peer is a server of the Raft configuration: its ID (the appliance's hostname)
// and Raft address.
type Peer struct{ ID, Addr string }

// Peers returns the Raft configuration as this node holds it, asking nobody: it
// costs nothing, so callers may check it on every request.
func (db *DB) Peers() ([]Peer, error) {
	nodes, err := db.str.Nodes()
	if err != nil {
		return nil, fmt.Errorf("raft members: %w", db.localErr(err))
	}
	ps := make([]Peer, len(nodes))
	for i, n := range nodes {
		ps[i] = Peer{ID: n.ID, Addr: n.Addr}
	}
	return ps, nil
}
