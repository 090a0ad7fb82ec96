package embeddb

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"
)

// memberView is Members as "node2@127.0.0.1:4002 voter leader reachable" lines.
func memberView(t *testing.T, db *DB) []string {
	t.Helper()
	ms, err := db.Members(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, m := range ms {
		s := m.ID + "@" + m.Addr
		if m.Voter {
			s += " voter"
		}
		if m.Leader {
			s += " leader"
		}
		if m.Reachable {
			s += " reachable"
		}
		out = append(out, s)
	}
	return out
}

// others are the indexes of open nodes other than i.
func (c *testCluster) others(i int) []int {
	var out []int
	for j, db := range c.dbs {
		if j != i && db != nil {
			out = append(out, j)
		}
	}
	return out
}

func (c *testCluster) closeNode(i int) {
	c.t.Helper()
	if err := c.dbs[i].Close(); err != nil {
		c.t.Fatal(err)
	}
	c.mu.Lock()
	c.dbs[i] = nil
	c.mu.Unlock()
}

// TestMembersAndRemove: every node lists the three members, the one leader and
// that all answer; a closed member shows as not answering; removing it through a
// follower (carried to the leader) takes it out of every node's configuration,
// and the two left go on taking writes. An unknown ID is not found.
func TestMembersAndRemove(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	c := newTestCluster(t, 3)
	dbs := c.openExpect()
	l := c.leader()
	for i, db := range dbs {
		var want []string
		for j := range dbs {
			s := fmt.Sprintf("node%d@%s voter", j+1, c.addr(j))
			if j == l {
				s += " leader"
			}
			want = append(want, s+" reachable")
		}
		if got := memberView(t, db); !slices.Equal(got, want) {
			t.Fatalf("node %d's Members = %v, want %v", i+1, got, want)
		}
	}

	gone := c.others(l)[0]
	follower := c.others(l)[1]
	c.closeNode(gone)
	view := memberView(t, dbs[l])
	if !strings.HasSuffix(view[gone], " voter") || !strings.HasSuffix(view[follower], "reachable") {
		t.Fatalf("after closing node %d the leader sees %v: want it alone not answering", gone+1, view)
	}

	goneID := fmt.Sprintf("node%d", gone+1)
	if err := dbs[follower].RemoveMember(ctx, goneID); err != nil {
		t.Fatalf("remove %s through follower node %d: %v", goneID, follower+1, err)
	}
	for _, i := range []int{l, follower} {
		for _, s := range memberView(t, dbs[i]) {
			if strings.HasPrefix(s, goneID+"@") {
				t.Fatalf("node %d still lists %s after its removal: %v", i+1, goneID, memberView(t, dbs[i]))
			}
		}
		if got := len(memberView(t, dbs[i])); got != 2 {
			t.Fatalf("node %d lists %d members after the removal", i+1, got)
		}
	}
	wantErr(t, dbs[l].RemoveMember(ctx, "nosuch"), ErrNotFound, FieldHostName)
	checkSameAnswers(t, []*DB{dbs[l], dbs[follower]}, "after-remove")
}

// TestQuorumLoss: with two of three nodes closed, a write and a leader read on the
// one left fail with ErrNoQuorum saying how many hosts it reaches, well before
// leaderWait (the error without the quorum check was ErrNotLeader, after it), and
// Members still answers. Once a node is back the quorum is too.
func TestQuorumLoss(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	c := newTestCluster(t, 3)
	dbs := c.openExpect()
	mustNetwork(t, dbs[0], "before")
	l := c.leader()
	survivor := c.others(l)[0]
	for _, i := range c.others(survivor) {
		c.closeNode(i)
	}
	db := dbs[survivor]
	// A leader left alone steps down once its lease runs out; wait for that, so
	// the write below goes the follower's way (see TestQuorumLossOnLeader).
	deadline := time.Now().Add(30 * time.Second)
	for db.IsLeader() {
		if time.Now().After(deadline) {
			t.Fatal("the survivor still leads after 30 s alone")
		}
		time.Sleep(20 * time.Millisecond)
	}

	checkNoQuorum := func(what string, err error) {
		t.Helper()
		if !errors.Is(err, ErrNoQuorum) {
			t.Fatalf("%s without a quorum = %v, want ErrNoQuorum", what, err)
		}
		if !strings.Contains(err.Error(), "no database leader: this host reaches 1 of 3 hosts (needs 2; no answer from ") {
			t.Fatalf("%s without a quorum: %q does not say how many hosts it reaches", what, err)
		}
	}
	checkNoQuorum("a write", db.CreateNetwork(ctx, Network{Name: "during", CreatedAt: t0}))
	_, err := db.GetNetwork(ctx, "before")
	checkNoQuorum("a read", err)
	checkNoQuorum("a member removal", db.RemoveMember(ctx, fmt.Sprintf("node%d", l+1)))

	view := memberView(t, db)
	if len(view) != 3 || strings.Contains(strings.Join(view, ","), "leader") {
		t.Fatalf("Members without a quorum = %v, want three and no leader", view)
	}
	for i, s := range view {
		if strings.HasSuffix(s, "reachable") != (i == survivor) {
			t.Fatalf("Members without a quorum = %v, want only node %d reachable", view, survivor+1)
		}
	}

	back := c.mustOpen(l, nil)
	mustNetwork(t, db, "after")
	if _, err := back.GetNetwork(ctx, "after"); err != nil {
		t.Fatal(err)
	}
	if _, err := db.GetNetwork(ctx, "during"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("the write refused with ErrNoQuorum applied after all: %v", err)
	}
}

// TestQuorumLossOnLeader: a write on a leader whose two followers just went is
// either refused before it reached the Raft log (ErrNoQuorum, and then it must
// never apply) or reported as of unknown outcome (it was in the log when the
// leader stepped down, and a later leader may commit it): never a plain failure.
func TestQuorumLossOnLeader(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	c := newTestCluster(t, 3)
	dbs := c.openExpect()
	l := c.leader()
	closed := c.others(l)
	for _, i := range closed {
		c.closeNode(i)
	}
	err := dbs[l].CreateNetwork(ctx, Network{Name: "racing", CreatedAt: t0})
	t.Logf("write on the leader left alone: %v", err)
	switch {
	case errors.Is(err, ErrOutcomeUnknown), errors.Is(err, ErrNoQuorum):
	case err == nil:
		t.Fatal("a write without a quorum was acknowledged")
	default:
		t.Fatalf("write on the leader left alone = %v, want ErrOutcomeUnknown or ErrNoQuorum", err)
	}
	for _, i := range closed {
		c.mustOpen(i, nil)
	}
	mustNetwork(t, dbs[l], "after")
	if _, gerr := dbs[l].GetNetwork(ctx, "racing"); errors.Is(err, ErrNoQuorum) && !errors.Is(gerr, ErrNotFound) {
		t.Fatalf("a write refused with ErrNoQuorum applied after all: %v", gerr)
	}
}

// TestReadAfterRemove: the first reads after a member's removal, with no write
// between, answer: rqlite's linearizable read waits for the state machine to
// reach the commit index, which a change of members does not pass through, so
// they timed out ("timeout waiting for fsm") until the next write.
func TestReadAfterRemove(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	c := newTestCluster(t, 3)
	dbs := c.openExpect()
	mustNetwork(t, dbs[0], "before")
	l := c.leader()
	left := c.others(l)
	for _, db := range dbs {
		if _, err := db.GetNetwork(ctx, "before"); err != nil {
			t.Fatal(err)
		}
	}
	c.closeNode(left[0])
	if err := dbs[left[1]].RemoveMember(ctx, fmt.Sprintf("node%d", left[0]+1)); err != nil {
		t.Fatal(err)
	}
	for _, i := range []int{l, left[1]} {
		if _, err := dbs[i].GetNetwork(ctx, "before"); err != nil {
			t.Fatalf("read through node %d just after the removal: %v", i+1, err)
		}
	}
}
