// Package embeddb owns threes' state: it embeds an rqlite node (Raft-replicated
// SQLite) in the server process, owns the schema and its migrations, and
// provides every typed query the rest of threes uses.
//
// It does not decide policy (names, images, who may do what), allocate
// addresses (netboot's IPAM builds on the address queries here) or talk to
// the hypervisor or the tailnet; callers pass the network it replicates over
// and the times it records.
//
// Every statement is parameterised and goes through rqlite's SQL processor;
// writes that belong together travel as one transaction in one Raft entry.
// Reads are linearizable (see readLevel).
//
// Several nodes form one cluster (see Config.Join and BootstrapExpect, and
// cluster.go): Raft and rqlite's cluster service share the one listener the
// caller gives, every connection passes Config.Admit before a byte of it is
// read, and a node that is not the leader carries reads and writes to the
// leader, so every node answers alike. ErrNotLeader reaches a caller only
// when no leader can be reached; a node that reaches fewer than a majority of
// the voters says so within a few seconds instead (ErrNoQuorum). Members lists
// the Raft configuration and which members answer now; RemoveMember takes one
// out. The hosts table (hosts.go) holds what each host says of itself.
//
// The durable state is raft.db and the snapshots in Config.Dir; db.sqlite is
// rebuilt from them at every Open.
package embeddb

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log"
	"net"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/rqlite/rqlite/v8/cluster"
	"github.com/rqlite/rqlite/v8/store"
	"github.com/rqlite/rqlite/v8/tcp"
)

// ErrNotFound is returned when the object asked for does not exist.
var ErrNotFound = errors.New("not found")

// ErrExists is returned when a write would break a uniqueness rule (live VM
// name, MAC, IP, network name or tag, VM ID).
var ErrExists = errors.New("already exists")

// ErrInUse is returned when an object cannot be removed because something
// live still refers to it (a network used by a live VM).
var ErrInUse = errors.New("in use")

// ErrAlreadyServed is returned by TakeAuthKey when the VM's auth key was
// already handed out once.
var ErrAlreadyServed = errors.New("auth key already served")

// ErrInvalid is returned when an argument is malformed or missing.
var ErrInvalid = errors.New("invalid argument")

// ErrNotLeader is returned when a request needs the Raft leader and none
// could be reached within leaderWait (no quorum, or an election that does
// not end).
var ErrNotLeader = errors.New("not the raft leader")

// ErrOutcomeUnknown means a write went to the cluster's leader and its answer was
// lost: it may or may not have applied, so look before doing it again.
var ErrOutcomeUnknown = errors.New("write sent to the leader, outcome unknown (it may have applied: check before trying again)")

// FieldError says which field of which object a sentinel error is about, so
// that an API can point at the offending field. Its Err is one of the
// sentinels above; errors.Is sees through it.
type FieldError struct {
	Field string // e.g. "vm name", "mac", "ip", "network name"
	Value string // the value at fault; never a secret
	Err   error
}

// Error reports the field, its value and what is wrong with it.
func (e *FieldError) Error() string { return fmt.Sprintf("%s %q: %v", e.Field, e.Value, e.Err) }

// Unwrap returns the sentinel error.
func (e *FieldError) Unwrap() error { return e.Err }

// Field names used in FieldError.
const (
	FieldVMID        = "vm id"
	FieldVMName      = "vm name"
	FieldMAC         = "mac"
	FieldIP          = "ip"
	FieldNetworkName = "network name"
	FieldNetworkTag  = "network tag"
	FieldKVKey       = "kv key"
)

func fieldErr(field, value string, err error) error {
	return &FieldError{Field: field, Value: value, Err: err}
}

// Config says where the node keeps its state and how it reaches its peers.
// The caller supplies the network (the appliance gives the tailnet); embeddb
// opens no port of its own.
//
// A new node (empty Dir) with no Join bootstraps a cluster of itself alone;
// with Join and no BootstrapExpect it joins the cluster those peers belong
// to; with BootstrapExpect N it waits until N nodes (itself and Join) have
// met and they form a new cluster together. A node with state in Dir is
// already a member: it rejoins its peers from the Raft configuration it
// stored, whatever Join says. A node that formed a cluster alone cannot join
// another one (Raft cannot merge clusters): Open refuses.
type Config struct {
	// Dir is the Raft directory (durable state), created if missing.
	Dir string
	// NodeID is the stable ID of this node.
	NodeID string
	// Listener carries Raft and rqlite cluster traffic. Open takes
	// ownership: Close closes it, and so does Open when it fails.
	Listener net.Listener
	// Advertise is the host:port peers use to reach Listener (keep it
	// stable across restarts: it is this node's Raft address); empty means
	// Listener.Addr().
	Advertise string
	// Dial reaches peers' Listeners by their Raft address; unused on one
	// node.
	Dial func(ctx context.Context, addr string) (net.Conn, error)
	// Join lists peers' Raft addresses (host:port, IP literals: rqlite
	// resolves them with the system resolver). This node's own address may
	// be among them.
	Join []string
	// BootstrapExpect, when above 1, forms a new cluster of that many
	// nodes with those in Join instead of joining an existing one. 1 is a
	// cluster of this node alone that others are to join: unlike a node
	// given neither, it keeps the election timing of a cluster from the
	// start rather than the fast one of a node that stays alone (a leader
	// with a 100 ms lease would step down at the first slow round trip to
	// a peer).
	BootstrapExpect int
	// Admit decides whether an accepted connection may reach Raft and the
	// cluster service, which have no authentication of their own (the
	// cluster service executes SQL and hands out backups of the whole
	// database). It runs before anything is read from conn; an error
	// closes conn. nil admits everything: only for a Listener no one else
	// can reach.
	Admit func(ctx context.Context, conn net.Conn) error
	// Logf receives embeddb's and rqlite's store and mux logs; nil discards
	// them. rqlite's snapshot store logs to stderr regardless, and Raft's
	// own errors too (it is set to log only errors).
	Logf func(format string, args ...any)
}

// Raft and snapshot settings: rqlited's defaults, so the node behaves like a
// stock rqlite node (snapshots bound raft.db and the SQLite WAL).
const (
	snapshotThreshold        = 8192
	snapshotThresholdWALSize = 4 << 20
	snapshotInterval         = 10 * time.Second
	heartbeatTimeout         = time.Second
	electionTimeout          = time.Second
	applyTimeout             = 10 * time.Second
	autoOptimizeInterval     = 24 * time.Hour
	// A node alone in its cluster waits out a heartbeat timeout (and up to as
	// much again of jitter) before it elects itself at every start: a second or
	// two in which nothing can be read or written. With no peer to hear from,
	// nothing is gained by waiting long.
	aloneHeartbeatTimeout   = 150 * time.Millisecond
	aloneLeaderLeaseTimeout = 100 * time.Millisecond
	// raftLogLevel quiets hashicorp/raft, whose logger rqlite hard-wires to
	// os.Stderr (it cannot be routed to Logf): only errors get through.
	raftLogLevel = "ERROR"
)

// storeOpenMu serialises store.Open: rqlite's raftConfig writes to the
// package-global hclog.DefaultOptions, which races when two stores open at
// once in one process (restart and multi-node tests do).
var storeOpenMu sync.Mutex

// DB is an open embedded rqlite node with threes' schema.
type DB struct {
	str     *store.Store
	ln      net.Listener
	svc     *cluster.Service
	conns   *connSet
	dir     string
	muxDone chan struct{}
	be      backend
	logf    func(format string, args ...any)
	gens    vmGens

	clustered atomic.Bool // the clustered marker is written

	closeOnce sync.Once
	closeErr  error
}

// Open opens the store in cfg.Dir, makes a new node a member of a cluster
// (see Config), waits for a leader (bounded only by ctx) and applies pending
// schema migrations (through the leader).
func Open(ctx context.Context, cfg Config) (*DB, error) {
	db, err := open(ctx, cfg, nil)
	if err != nil {
		return nil, err
	}
	if _, err := db.migrate(ctx, migrationFS); err != nil {
		db.Close()
		return nil, fmt.Errorf("migrate %s: %w", cfg.Dir, err)
	}
	return db, nil
}

// open starts the node without migrating. A new node bootstraps a cluster of
// peers, or of itself alone when peers is empty.
func open(ctx context.Context, cfg Config, peers []*store.Server) (_ *DB, retErr error) {
	if cfg.Listener == nil {
		return nil, fmt.Errorf("open embeddb: no listener: %w", ErrInvalid)
	}
	var muxDone chan struct{}
	defer func() {
		if retErr != nil {
			cfg.Listener.Close()
			if muxDone != nil {
				<-muxDone
			}
		}
	}()
	if cfg.Dir == "" || cfg.NodeID == "" {
		return nil, fmt.Errorf("open embeddb: dir and node id are required: %w", ErrInvalid)
	}
	if err := os.MkdirAll(cfg.Dir, 0o700); err != nil {
		return nil, fmt.Errorf("open embeddb: %w", err)
	}
	logf := cfg.Logf
	if logf == nil {
		logf = func(string, ...any) {}
	}
	adv := cfg.Advertise
	if adv == "" {
		adv = cfg.Listener.Addr().String()
	}
	others, err := clusterOpts(cfg, adv)
	if err != nil {
		return nil, err
	}
	clustered := len(others) > 0 || len(peers) > 0 || cfg.BootstrapExpect > 0 || hasClusteredMarker(cfg.Dir)

	// One listener, demultiplexed by the first byte of each connection, as
	// rqlited does, behind the admission check.
	conns := &connSet{}
	ln := newAdmitListener(cfg.Listener, cfg.Admit, logf, conns)
	cfg.Listener = ln // closed on failure
	mux, err := tcp.NewMux(ln, advAddr(adv))
	if err != nil {
		return nil, fmt.Errorf("open embeddb: mux: %w", err)
	}
	mux.Logger = newLogger(cfg.Logf, "[mux] ")
	raftLn := mux.Listen(cluster.MuxRaftHeader)
	clusterLn := mux.Listen(cluster.MuxClusterHeader)
	muxDone = make(chan struct{})
	go func() {
		defer close(muxDone)
		mux.Serve()
	}()

	dbConf := store.NewDBConfig()
	dbConf.FKConstraints = true // ON DELETE CASCADE; same on every node since it is set here
	raftDialer := &headerDialer{header: cluster.MuxRaftHeader, dial: cfg.Dial, conns: conns}
	clusterDialer := &headerDialer{header: cluster.MuxClusterHeader, dial: cfg.Dial, conns: conns}
	str := store.New(&raftLayer{Listener: raftLn, dialer: raftDialer}, &store.Config{
		DBConf: dbConf,
		Dir:    cfg.Dir,
		ID:     cfg.NodeID,
		Logger: newLogger(cfg.Logf, "[store] "),
	})
	str.RaftLogLevel = raftLogLevel
	str.SnapshotThreshold = snapshotThreshold
	str.SnapshotThresholdWALSize = snapshotThresholdWALSize
	str.SnapshotInterval = snapshotInterval
	str.HeartbeatTimeout = heartbeatTimeout
	str.ElectionTimeout = electionTimeout
	str.BootstrapExpect = cfg.BootstrapExpect
	if !clustered {
		str.HeartbeatTimeout = aloneHeartbeatTimeout
		str.ElectionTimeout = aloneHeartbeatTimeout
		str.LeaderLeaseTimeout = aloneLeaderLeaseTimeout
	}
	str.ApplyTimeout = applyTimeout
	str.AutoOptimizeInterval = autoOptimizeInterval

	storeOpenMu.Lock()
	err = str.Open()
	storeOpenMu.Unlock()
	if err != nil {
		return nil, fmt.Errorf("open store %s: %w", cfg.Dir, err)
	}
	defer func() {
		if retErr != nil {
			str.Close(true)
		}
	}()
	svc := cluster.New(clusterLn, str, str, nil)
	svc.Open()
	defer func() {
		if retErr != nil {
			svc.Close()
			conns.closeAll()
		}
	}()
	client := cluster.NewClient(clusterDialer, forwardTimeout)
	client.SetLocal(adv, svc)

	// Join or bootstrap only when the Raft configuration is empty (as
	// rqlited does), so a node that crashed before either still does it.
	nodes, err := str.Nodes()
	if err != nil {
		return nil, fmt.Errorf("read raft configuration in %s: %w", cfg.Dir, err)
	}
	if len(peers) > 0 && len(nodes) == 0 {
		logf("embeddb: bootstrapping new cluster of %d node(s) in %s", len(peers), cfg.Dir)
		if err := str.Bootstrap(peers...); err != nil {
			return nil, fmt.Errorf("bootstrap %s: %w", cfg.Dir, err)
		}
	} else if err := formCluster(ctx, cfg, adv, others, str, client, logf); err != nil {
		return nil, err
	}
	for {
		if _, err := str.WaitForLeader(250 * time.Millisecond); err == nil {
			break
		}
		if err := ctx.Err(); err != nil {
			return nil, fmt.Errorf("wait for raft leader: %w", err)
		}
	}

	db := &DB{
		str:     str,
		ln:      ln,
		svc:     svc,
		conns:   conns,
		dir:     cfg.Dir,
		muxDone: muxDone,
		be:      clusterBackend{local: localBackend{str: str}, dialer: clusterDialer, self: adv},
		logf:    logf,
	}
	db.markClustered()
	return db, nil
}

// Close shuts the node down and closes the listener. A leader with peers
// hands leadership over first, so the others go on without waiting out an
// election. The durable state stays in Dir for the next Open.
func (db *DB) Close() error {
	db.closeOnce.Do(func() {
		db.markClustered()
		if db.clustered.Load() && db.str.IsLeader() {
			if err := db.str.Stepdown(true, ""); err != nil {
				db.logf("embeddb: step down before closing: %v", err)
			}
		}
		db.svc.Close()
		err := db.str.Close(true)
		db.conns.closeAll()
		if lerr := db.ln.Close(); lerr != nil && !errors.Is(lerr, net.ErrClosed) && err == nil {
			err = lerr
		}
		<-db.muxDone
		if err != nil {
			db.closeErr = fmt.Errorf("close embeddb: %w", err)
		}
	})
	return db.closeErr
}

// IsLeader reports whether this node is currently the Raft leader.
func (db *DB) IsLeader() bool { return db.str.IsLeader() }

// raftLayer is the store.Layer for Raft: accepts come from the mux, dials go
// through the caller's Dial and announce themselves with the Raft header byte.
type raftLayer struct {
	net.Listener
	dialer *headerDialer
}

func (l *raftLayer) Dial(addr string, timeout time.Duration) (net.Conn, error) {
	return l.dialer.Dial(addr, timeout)
}

// advAddr is the advertised address handed to the mux (and so to Raft as
// this node's address).
type advAddr string

func (a advAddr) Network() string { return "tcp" }
func (a advAddr) String() string  { return string(a) }

// newLogger adapts Logf to the *log.Logger rqlite takes; nil discards.
func newLogger(logf func(string, ...any), prefix string) *log.Logger {
	if logf == nil {
		return log.New(io.Discard, "", 0)
	}
	return log.New(logfWriter(logf), prefix, 0)
}

type logfWriter func(string, ...any)

func (w logfWriter) Write(p []byte) (int, error) {
	w("embeddb: %s", strings.TrimRight(string(p), "\n"))
	return len(p), nil
}
