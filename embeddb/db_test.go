package embeddb

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"sync"
	"testing"
	"testing/fstest"
	"time"

	"github.com/rqlite/rqlite/v8/store"
	"tailscale.com/net/memnet"
)

// TestRestart checks that data survives Close+Open on the same Dir: the
// durable state is raft.db and the snapshots, db.sqlite is rebuilt at Open.
// Part of the data is in a snapshot, the rest only in the Raft log.
func TestRestart(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	dir := t.TempDir()
	db := openAt(t, dir)
	mustNetwork(t, db, "cool")
	vm1 := mustCreateVM(t, db, 1, "cool")
	if err := db.str.Snapshot(0); err != nil {
		t.Fatalf("snapshot: %v", err)
	}
	vm2 := mustCreateVM(t, db, 2, "cool")
	if err := db.UpsertKVs(ctx, vm2.ID, []KV{{Key: "k", Value: "v"}}); err != nil {
		t.Fatal(err)
	}
	before, err := db.ListVMs(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := db.Close(); err != nil {
		t.Fatal(err)
	}
	if err := db.Close(); err != nil {
		t.Fatalf("second close: %v", err)
	}
	if _, err := db.GetVM(ctx, vm1.ID); err == nil {
		t.Fatal("GetVM on a closed db succeeded")
	}

	// db.sqlite is scratch: remove it to prove nothing depends on it.
	if err := os.Remove(filepath.Join(dir, "db.sqlite")); err != nil {
		t.Fatal(err)
	}
	db = openAt(t, dir)
	after, err := db.ListVMs(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(before, after) {
		t.Fatalf("vms changed across restart:\nbefore %+v\nafter  %+v", before, after)
	}
	if kvs, err := db.GetKVs(ctx, vm2.ID); err != nil || len(kvs) != 1 || kvs[0].Value != "v" {
		t.Fatalf("kvs after restart = %v, %v", kvs, err)
	}
	// Writes work after the restart and respect the old data.
	wantErr(t, db.CreateNetwork(ctx, Network{Name: "cool", CreatedAt: t0}), ErrExists, FieldNetworkName)
	mustCreateVM(t, db, 3, "cool")
}

func TestMigrationsAppliedOnce(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	dir := t.TempDir()
	db := openAt(t, dir)
	versions := func(db *DB) []int64 {
		t.Helper()
		res, err := db.query(ctx, q(`SELECT version FROM schema_migrations ORDER BY version`))
		if err != nil {
			t.Fatal(err)
		}
		var vs []int64
		for _, r := range rows(res[0]) {
			vs = append(vs, r.int(0))
		}
		return vs
	}
	files, _ := fs.Glob(migrationFS, "migrations/*.sql")
	var want []int64
	for i := range files {
		want = append(want, int64(i+1))
	}
	if got := versions(db); len(want) == 0 || !reflect.DeepEqual(got, want) {
		t.Fatalf("versions after first open = %v, want %v", got, want)
	}
	applied, err := db.migrate(ctx, migrationFS)
	if err != nil || len(applied) != 0 {
		t.Fatalf("second migrate applied %v, %v", applied, err)
	}

	// A later migration set: the real ones plus two more, the second depending on
	// the first, so running them out of order fails, and running either twice fails
	// on CREATE TABLE.
	n := int64(len(files))
	next := fstest.MapFS{
		fmt.Sprintf("migrations/%04d_fill.sql", n+2):  {Data: []byte(`INSERT INTO extra (v) VALUES ('from the last');`)},
		fmt.Sprintf("migrations/%04d_extra.sql", n+1): {Data: []byte("CREATE TABLE extra (v TEXT NOT NULL);\nCREATE INDEX extra_v ON extra (v);")},
		"migrations/README.md":                        {Data: []byte("not a migration")},
		"migrations/sub/0009_no.sql":                  {Data: []byte("not picked up")},
	}
	for _, f := range files {
		b, err := fs.ReadFile(migrationFS, f)
		if err != nil {
			t.Fatal(err)
		}
		next[f] = &fstest.MapFile{Data: b}
	}
	applied, err = db.migrate(ctx, next)
	if err != nil || !reflect.DeepEqual(applied, []int64{n + 1, n + 2}) {
		t.Fatalf("migrate with two more applied %v, %v", applied, err)
	}
	if err := db.Close(); err != nil {
		t.Fatal(err)
	}

	// Re-open: Open's own migrations and the extended set apply nothing.
	ctx2, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	db, err = open(ctx2, testConfig(t, dir), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	applied, err = db.migrate(ctx, next)
	if err != nil || len(applied) != 0 {
		t.Fatalf("migrate after reopen applied %v, %v", applied, err)
	}
	if got := versions(db); !reflect.DeepEqual(got, append(want, n+1, n+2)) {
		t.Fatalf("versions after reopen = %v", got)
	}
	res, err := db.query(ctx, q(`SELECT count(*) FROM extra`))
	if err != nil || rows(res[0])[0].int(0) != 1 {
		t.Fatalf("the fill migration ran %v times (%v)", rows(res[0]), err)
	}
	// A binary that knows only the real migrations refuses the newer database.
	if _, err := db.migrate(ctx, migrationFS); err == nil || !strings.Contains(err.Error(), "newer") {
		t.Fatalf("migrate with older migrations = %v, want refusal", err)
	}
}

func TestLoadMigrationsRejectsBadSets(t *testing.T) {
	t.Parallel()
	for name, fsys := range map[string]fstest.MapFS{
		"no underscore":     {"migrations/0001.sql": {}},
		"not a number":      {"migrations/abcd_x.sql": {}},
		"version zero":      {"migrations/0000_x.sql": {}},
		"duplicate version": {"migrations/0001_a.sql": {}, "migrations/01_b.sql": {}},
	} {
		if _, err := loadMigrations(fsys); err == nil {
			t.Errorf("%s: loadMigrations accepted it", name)
		}
	}
	ms, err := loadMigrations(migrationFS)
	if err != nil || len(ms) == 0 || ms[0].version != 1 {
		t.Fatalf("embedded migrations: %v, %v", ms, err)
	}
}

// TestBadSQLIsAnError checks that statement failures, which rqlite reports
// only inside results, come back as errors, and that a failing statement
// rolls back the ones before it in the same request.
func TestBadSQLIsAnError(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	db := newDB(t)
	_, err := db.exec(ctx, q(`INSERT INTO no_such_table VALUES (1)`))
	var se *sqlError
	if !errors.As(err, &se) || !strings.Contains(se.msg, "no such table") {
		t.Fatalf("exec of bad sql = %v", err)
	}
	_, err = db.exec(ctx,
		q(`INSERT INTO networks (name, created_at) VALUES (?, ?)`, "rolled-back", int64(1)),
		q(`INSERT INTO networks (name, created_at) VALUES (?, ?)`, "broken", nil))
	if !errors.As(err, &se) || se.stmt != 1 || !strings.Contains(se.msg, "NOT NULL") {
		t.Fatalf("exec with failing second statement = %v", err)
	}
	if _, err := db.GetNetwork(ctx, "rolled-back"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("first statement survived its failed transaction: %v", err)
	}
	if _, err := db.query(ctx, q(`SELECT nope FROM networks`)); !errors.As(err, &se) {
		t.Fatalf("query of bad sql = %v", err)
	}
	if _, err := db.request(ctx, q(`SELECT 1`), q(`DELETE FROM nope`)); !errors.As(err, &se) {
		t.Fatalf("request with bad sql = %v", err)
	}
	if _, err := db.exec(ctx, q(`SELECT ?`, 1.5)); err == nil {
		t.Fatal("unsupported parameter type accepted")
	}
}

func TestSecretsRedacted(t *testing.T) {
	t.Parallel()
	cfg := VMConfig{VMID: "vm-1", Hostname: "toy", AuthKey: "tskey-auth-SECRET"}
	kv := KV{Key: "password", Value: "SECRET", Secret: true}
	var buf bytes.Buffer
	slog.New(slog.NewTextHandler(&buf, nil)).Info("x", "cfg", cfg, "kv", kv)
	for _, s := range []string{
		fmt.Sprint(cfg), fmt.Sprintf("%+v", cfg), fmt.Sprintf("%#v", cfg), fmt.Sprintf("%v", []VMConfig{cfg}),
		fmt.Sprint(kv), fmt.Sprintf("%+v", kv), fmt.Sprintf("%#v", kv), fmt.Sprintf("%v", []KV{kv}),
		buf.String(),
	} {
		if strings.Contains(s, "SECRET") || !strings.Contains(s, "REDACTED") {
			t.Errorf("secret not redacted: %s", s)
		}
	}
	if s := fmt.Sprint(KV{Key: "k", Value: "visible"}); !strings.Contains(s, "visible") {
		t.Errorf("non-secret value hidden: %s", s)
	}
}

func TestOpenBadConfig(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	if _, err := Open(ctx, Config{Dir: t.TempDir(), NodeID: "n"}); !errors.Is(err, ErrInvalid) {
		t.Fatalf("Open without listener = %v", err)
	}
	ln := memnet.Listen("embeddb-bad:1")
	if _, err := Open(ctx, Config{Dir: t.TempDir(), Listener: ln}); !errors.Is(err, ErrInvalid) {
		t.Fatalf("Open without node id = %v", err)
	}
	if _, err := ln.Accept(); !errors.Is(err, net.ErrClosed) {
		t.Fatalf("failed Open left the listener open: %v", err)
	}
	// A cancelled context stops the wait for a leader that never comes
	// (the node is configured as one of two, and the other never starts).
	cctx, cancel := context.WithCancel(ctx)
	cancel()
	cfg := testConfig(t, t.TempDir())
	_, err := open(cctx, cfg, []*store.Server{
		store.NewServer("node1", cfg.Listener.Addr().String(), true),
		store.NewServer("node2", "embeddb-absent:1", true),
	})
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("open without quorum = %v, want context.Canceled", err)
	}
}

// TestFollowerForwards runs a two-node cluster over an in-memory network,
// dialling through Config.Dial, and checks that the follower carries reads
// and writes to the leader, so both nodes answer alike.
func TestFollowerForwards(t *testing.T) {
	t.Parallel()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	var nw memnet.Network
	var peers []*store.Server
	var cfgs []Config
	for i := 1; i <= 2; i++ {
		ln, err := nw.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", 4000+i)) // in memory: no socket
		if err != nil {
			t.Fatal(err)
		}
		id := fmt.Sprintf("node%d", i)
		cfgs = append(cfgs, Config{
			Dir: t.TempDir(), NodeID: id, Listener: ln, Logf: t.Logf,
			Dial: func(ctx context.Context, addr string) (net.Conn, error) { return nw.Dial(ctx, "tcp", addr) },
		})
		peers = append(peers, store.NewServer(id, ln.Addr().String(), true))
	}
	dbs := make([]*DB, 2)
	errs := make([]error, 2)
	var wg sync.WaitGroup
	for i := range cfgs {
		wg.Go(func() { dbs[i], errs[i] = open(ctx, cfgs[i], peers) })
	}
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			t.Fatalf("open node %d: %v", i+1, err)
		}
		t.Cleanup(func() { dbs[i].Close() })
	}
	leader, follower := dbs[0], dbs[1]
	if !leader.IsLeader() {
		leader, follower = follower, leader
	}
	if !leader.IsLeader() || follower.IsLeader() {
		t.Fatal("want exactly one leader")
	}
	if _, err := leader.migrate(ctx, migrationFS); err != nil {
		t.Fatal(err)
	}
	mustNetwork(t, leader, "cool")
	if _, err := leader.GetNetwork(ctx, "cool"); err != nil {
		t.Fatal(err)
	}
	if _, err := follower.GetNetwork(ctx, "cool"); err != nil {
		t.Fatalf("follower read: %v", err)
	}
	if err := follower.CreateNetwork(ctx, Network{Name: "other", CreatedAt: t0}); err != nil {
		t.Fatalf("follower write: %v", err)
	}
	if _, err := leader.GetNetwork(ctx, "other"); err != nil {
		t.Fatalf("leader does not see the follower's write: %v", err)
	}
	// SQL errors come back through the forwarding as they do locally.
	err := follower.CreateNetwork(ctx, Network{Name: "other", CreatedAt: t0})
	wantErr(t, err, ErrExists, FieldNetworkName)
}

// TestTwoDBsInOneProcess opens two independent nodes at once: rqlite's
// global expvars and logger options must not get in the way.
func TestTwoDBsInOneProcess(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	var wg sync.WaitGroup
	dbs := make([]*DB, 2)
	for i := range dbs {
		cfg := testConfig(t, t.TempDir())
		wg.Go(func() {
			db, err := Open(ctx, cfg)
			if err != nil {
				t.Error(err)
				return
			}
			dbs[i] = db
		})
	}
	wg.Wait()
	for _, db := range dbs {
		if db == nil {
			t.FailNow()
		}
		t.Cleanup(func() { db.Close() })
	}
	mustNetwork(t, dbs[0], "only-in-0")
	if _, err := dbs[1].GetNetwork(ctx, "only-in-0"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("second db sees the first one's data: %v", err)
	}
}
