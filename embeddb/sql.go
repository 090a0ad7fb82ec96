package embeddb

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"strings"
	"time"

	"github.com/rqlite/rqlite/v8/command/proto"
	rsql "github.com/rqlite/rqlite/v8/command/sql"
	"github.com/rqlite/rqlite/v8/store"
)

// readLevel is the consistency of every read but a Local view's. LINEARIZABLE
// is served by the leader after it confirms it still leads and its state
// machine has applied everything committed so far: a read sees every write
// acknowledged before it, on one node now and in a cluster later (including
// just after a leader change, when a WEAK read on the new leader could miss
// entries it has committed but not yet applied). On one node the leadership
// check needs no network, so it costs little. Followers carry it to the
// leader, like writes.
const readLevel = proto.QueryRequest_QUERY_REQUEST_LEVEL_LINEARIZABLE

// ErrStale is returned by a Local view's read when this node's copy may be
// older than the view allows: it is not the leader and has not heard from one
// within the bound (the leader is down, an election is under way, or this node
// is cut off), or it is that far behind in applying what the leader committed.
var ErrStale = errors.New("this node's copy of the database may be stale (no word from the raft leader within the bound)")

// Local is a view of the database whose reads this node answers from its own
// copy, with no round trip to the leader (rqlite's read level NONE), for paths
// that must not wait on the leader (the metadata server). A read may miss the
// latest writes. rqlite refuses it (ErrStale) when this node, not being the
// leader, last heard from a leader (or granted a vote) more than maxStale ago,
// or when, behind what it knows committed, it applied its last entry more than
// maxStale after the leader appended it (strict freshness; the leader's clock
// against this node's). The leader always answers: one cut off from the others
// keeps leading, and answering, until its lease runs out (half a second) and it
// steps down. The view has no writes: those go through the DB, to the leader.
type Local struct {
	db       *DB
	maxStale time.Duration
}

// Local returns the view of db whose reads may be up to maxStale stale; with
// maxStale 0 or less, its reads are the DB's own (linearizable).
func (db *DB) Local(maxStale time.Duration) Local { return Local{db: db, maxStale: maxStale} }

// localKey marks a context whose reads a Local view makes. Only the view sets
// it, so every other read stays linearizable.
type localKey struct{}

func (l Local) ctx(ctx context.Context) context.Context {
	if l.maxStale <= 0 {
		return ctx
	}
	return context.WithValue(ctx, localKey{}, l.maxStale)
}

// GetVM is DB.GetVM from this node's copy.
func (l Local) GetVM(ctx context.Context, id string) (VM, error) { return l.db.GetVM(l.ctx(ctx), id) }

// GetVMConfig is DB.GetVMConfig from this node's copy.
func (l Local) GetVMConfig(ctx context.Context, vmID string) (VMConfig, error) {
	return l.db.GetVMConfig(l.ctx(ctx), vmID)
}

// GetKVs is DB.GetKVs from this node's copy.
func (l Local) GetKVs(ctx context.Context, vmID string) ([]KV, error) {
	return l.db.GetKVs(l.ctx(ctx), vmID)
}

// AddressByIP is DB.AddressByIP from this node's copy.
func (l Local) AddressByIP(ctx context.Context, host string, ip netip.Addr) (Address, error) {
	return l.db.AddressByIP(l.ctx(ctx), host, ip)
}

// backend carries requests to the Raft leader. localBackend serves them on
// this node only; clusterBackend (cluster.go) forwards them to a remote
// leader.
type backend interface {
	execute(ctx context.Context, req *proto.ExecuteRequest) ([]*proto.ExecuteQueryResponse, error)
	query(ctx context.Context, req *proto.QueryRequest) ([]*proto.QueryRows, error)
	request(ctx context.Context, req *proto.ExecuteQueryRequest) ([]*proto.ExecuteQueryResponse, error)
}

type localBackend struct{ str *store.Store }

// A request cannot be cancelled once handed to Raft (it may still commit), so
// ctx is only checked before; rqlite bounds each write by its apply timeout.
func (b localBackend) execute(ctx context.Context, req *proto.ExecuteRequest) ([]*proto.ExecuteQueryResponse, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	res, _, err := b.str.Execute(req)
	return res, b.mapErr(err)
}

func (b localBackend) query(ctx context.Context, req *proto.QueryRequest) ([]*proto.QueryRows, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	res, _, err := b.str.Query(req)
	return res, b.mapErr(err)
}

func (b localBackend) request(ctx context.Context, req *proto.ExecuteQueryRequest) ([]*proto.ExecuteQueryResponse, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	res, _, err := b.str.Request(req)
	return res, b.mapErr(err)
}

func (b localBackend) mapErr(err error) error {
	switch {
	case err == nil:
		return nil
	case errors.Is(err, store.ErrNotLeader):
		return ErrNotLeader
	case errors.Is(err, store.ErrStaleRead):
		return ErrStale
	case errors.Is(err, store.ErrNotOpen):
		return errors.New("database is closed")
	}
	return err
}

// stmt is one parameterised SQL statement.
type stmt struct {
	sql       string
	args      []any
	returning bool // has a RETURNING clause: rows come back from a write
}

func q(sql string, args ...any) stmt { return stmt{sql: sql, args: args} }

// toProto converts statements and runs them through rqlite's SQL processor,
// which rewrites non-deterministic functions into literals so every replica
// applies the same values.
func toProto(stmts []stmt, rewriteRandom bool) ([]*proto.Statement, error) {
	ps := make([]*proto.Statement, len(stmts))
	for i, s := range stmts {
		ps[i] = &proto.Statement{Sql: s.sql, ForceQuery: s.returning}
		for _, a := range s.args {
			p := &proto.Parameter{}
			switch v := a.(type) {
			case nil:
			case string:
				p.Value = &proto.Parameter_S{S: v}
			case int64:
				p.Value = &proto.Parameter_I{I: v}
			case int:
				p.Value = &proto.Parameter_I{I: int64(v)}
			case bool:
				var n int64
				if v {
					n = 1
				}
				p.Value = &proto.Parameter_I{I: n}
			default:
				return nil, fmt.Errorf("unsupported parameter type %T", a)
			}
			ps[i].Parameters = append(ps[i].Parameters, p)
		}
	}
	if err := rsql.Process(ps, rewriteRandom, true); err != nil {
		return nil, fmt.Errorf("process sql: %w", err)
	}
	return ps, nil
}

// sqlError is a statement that SQLite refused. rqlite reports these in the
// results, not as an error from Execute.
type sqlError struct {
	stmt int
	msg  string
}

func (e *sqlError) Error() string { return fmt.Sprintf("statement %d: %s", e.stmt, e.msg) }

// uniqueViolation returns the columns named by a UNIQUE violation, e.g.
// "vms.name" or "kvs.vm_id, kvs.name".
func uniqueViolation(err error) (cols string, ok bool) {
	var se *sqlError
	if !errors.As(err, &se) {
		return "", false
	}
	return strings.CutPrefix(se.msg, "UNIQUE constraint failed: ")
}

// sqlErrorIs reports whether SQLite refused a statement with a message
// containing substr (a trigger's RAISE message, or a constraint kind).
func sqlErrorIs(err error, substr string) bool {
	var se *sqlError
	return errors.As(err, &se) && strings.Contains(se.msg, substr)
}

// exec runs stmts as one transaction in one Raft entry: all or nothing.
func (db *DB) exec(ctx context.Context, stmts ...stmt) ([]*proto.ExecuteQueryResponse, error) {
	ps, err := toProto(stmts, true)
	if err != nil {
		return nil, err
	}
	res, err := db.be.execute(ctx, &proto.ExecuteRequest{
		Request: &proto.Request{Transaction: true, Statements: ps},
	})
	if err != nil {
		return nil, err
	}
	return res, checkResults(res, len(stmts))
}

// request runs a mix of reads and writes as one transaction in one Raft
// entry, so the reads see exactly the state the writes changed.
func (db *DB) request(ctx context.Context, stmts ...stmt) ([]*proto.ExecuteQueryResponse, error) {
	ps, err := toProto(stmts, true)
	if err != nil {
		return nil, err
	}
	res, err := db.be.request(ctx, &proto.ExecuteQueryRequest{
		Request: &proto.Request{Transaction: true, Statements: ps},
		Level:   readLevel,
	})
	if err != nil {
		return nil, err
	}
	return res, checkResults(res, len(stmts))
}

func checkResults(res []*proto.ExecuteQueryResponse, n int) error {
	for i, r := range res {
		msg := r.GetError()
		if msg == "" {
			msg = r.GetE().GetError()
		}
		if msg == "" {
			msg = r.GetQ().GetError()
		}
		if msg != "" {
			return &sqlError{stmt: i, msg: msg}
		}
	}
	if len(res) != n {
		return fmt.Errorf("got %d results for %d statements", len(res), n)
	}
	return nil
}

// query runs read-only stmts at readLevel (or at level NONE for a Local
// view: see Local), in one read transaction when there are several so they
// see one state.
func (db *DB) query(ctx context.Context, stmts ...stmt) ([]*proto.QueryRows, error) {
	ps, err := toProto(stmts, false)
	if err != nil {
		return nil, err
	}
	req := &proto.QueryRequest{
		Request: &proto.Request{Transaction: len(ps) > 1, Statements: ps},
		Level:   readLevel,
	}
	if maxStale, ok := ctx.Value(localKey{}).(time.Duration); ok {
		// On a follower rqlite serves NONE without the leader (it never
		// returns ErrNotLeader, so forward does not carry it either).
		req.Level = proto.QueryRequest_QUERY_REQUEST_LEVEL_NONE
		req.Freshness = maxStale.Nanoseconds()
		req.FreshnessStrict = true
	}
	res, err := db.be.query(ctx, req)
	if err != nil {
		return nil, err
	}
	for i, r := range res {
		if r.GetError() != "" {
			return nil, &sqlError{stmt: i, msg: r.GetError()}
		}
	}
	if len(res) != len(stmts) {
		return nil, fmt.Errorf("got %d results for %d queries", len(res), len(stmts))
	}
	return res, nil
}

// rowsAffected is the number of rows the i'th statement changed.
func rowsAffected(res []*proto.ExecuteQueryResponse, i int) int64 {
	return res[i].GetE().GetRowsAffected()
}

// row is one result row; NULL columns are nil.
type row []*proto.Parameter

func rows(qr *proto.QueryRows) []row {
	out := make([]row, len(qr.GetValues()))
	for i, v := range qr.GetValues() {
		out[i] = row(v.GetParameters())
	}
	return out
}

func (r row) col(i int) *proto.Parameter {
	if i < len(r) {
		return r[i]
	}
	return nil
}

func (r row) str(i int) string {
	p := r.col(i)
	if y, ok := p.GetValue().(*proto.Parameter_Y); ok {
		return string(y.Y)
	}
	return p.GetS()
}

func (r row) int(i int) int64 { return r.col(i).GetI() }

// time decodes a column written by timeArg; NULL is the zero time.
func (r row) time(i int) time.Time {
	p := r.col(i)
	if p.GetValue() == nil {
		return time.Time{}
	}
	return time.Unix(0, p.GetI()).UTC()
}

// Times are stored as Unix nanoseconds (INTEGER): exact, deterministic and
// ordered, for times from 1970 to 2262; they come back in UTC. The zero time
// is NULL.
var (
	minTime = time.Unix(0, 0).UTC()
	maxTime = time.Unix(0, 1<<63-1).UTC()
)

func timeArg(t time.Time) any {
	if t.IsZero() {
		return nil
	}
	return t.UnixNano()
}

// checkTime rejects times that do not fit the encoding; zero is allowed
// unless required.
func checkTime(what string, t time.Time, required bool) error {
	if t.IsZero() {
		if required {
			return fmt.Errorf("%s is required: %w", what, ErrInvalid)
		}
		return nil
	}
	if t.Before(minTime) || t.After(maxTime) {
		return fmt.Errorf("%s %s out of range: %w", what, t.Format(time.RFC3339), ErrInvalid)
	}
	return nil
}
