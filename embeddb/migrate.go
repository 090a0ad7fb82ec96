package embeddb

import (
	"context"
	"embed"
	"fmt"
	"io/fs"
	"path"
	"sort"
	"strconv"
	"strings"
)

// migrationFS holds the schema migrations, NNNN_name.sql, applied in order.
//
//go:embed migrations/*.sql
var migrationFS embed.FS

type migration struct {
	version int64
	name    string
	sql     string
}

// loadMigrations reads migrations/NNNN_name.sql from fsys, ordered by
// version, rejecting malformed names and duplicate versions.
func loadMigrations(fsys fs.FS) ([]migration, error) {
	files, err := fs.Glob(fsys, "migrations/*.sql")
	if err != nil {
		return nil, err
	}
	var ms []migration
	for _, f := range files {
		base := strings.TrimSuffix(path.Base(f), ".sql")
		num, name, ok := strings.Cut(base, "_")
		v, err := strconv.ParseInt(num, 10, 64)
		if !ok || err != nil || v < 1 || name == "" {
			return nil, fmt.Errorf("migration %s: name is not NNNN_name.sql", f)
		}
		b, err := fs.ReadFile(fsys, f)
		if err != nil {
			return nil, err
		}
		ms = append(ms, migration{version: v, name: base, sql: string(b)})
	}
	sort.Slice(ms, func(i, j int) bool { return ms[i].version < ms[j].version })
	for i := 1; i < len(ms); i++ {
		if ms[i].version == ms[i-1].version {
			return nil, fmt.Errorf("migrations %s and %s share version %d", ms[i-1].name, ms[i].name, ms[i].version)
		}
	}
	return ms, nil
}

// migrate applies the migrations in fsys that schema_migrations does not
// record yet, in order, and returns the versions it applied. Each migration
// runs in one transaction together with the row recording it, and that row
// is inserted first, so a migration another node applied meanwhile aborts on
// the primary key instead of running twice.
func (db *DB) migrate(ctx context.Context, fsys fs.FS) ([]int64, error) {
	ms, err := loadMigrations(fsys)
	if err != nil {
		return nil, err
	}
	if _, err := db.exec(ctx, q(`CREATE TABLE IF NOT EXISTS schema_migrations (
		version INTEGER PRIMARY KEY NOT NULL,
		name    TEXT NOT NULL
	) STRICT`)); err != nil {
		return nil, fmt.Errorf("create schema_migrations: %w", err)
	}
	res, err := db.query(ctx, q(`SELECT version FROM schema_migrations ORDER BY version`))
	if err != nil {
		return nil, fmt.Errorf("read schema_migrations: %w", err)
	}
	done := map[int64]bool{}
	for _, r := range rows(res[0]) {
		done[r.int(0)] = true
	}
	known := map[int64]bool{}
	for _, m := range ms {
		known[m.version] = true
	}
	for v := range done {
		if !known[v] {
			return nil, fmt.Errorf("database has schema version %d that this binary does not know: it was written by a newer threes", v)
		}
	}

	var applied []int64
	for _, m := range ms {
		if done[m.version] {
			continue
		}
		_, err := db.exec(ctx,
			q(`INSERT INTO schema_migrations (version, name) VALUES (?, ?)`, m.version, m.name),
			q(m.sql))
		if cols, ok := uniqueViolation(err); ok && cols == "schema_migrations.version" {
			continue
		}
		if err != nil {
			return applied, fmt.Errorf("apply migration %s: %w", m.name, err)
		}
		db.logf("embeddb: applied migration %s", m.name)
		applied = append(applied, m.version)
	}
	return applied, nil
}
