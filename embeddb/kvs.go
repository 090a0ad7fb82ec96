package embeddb

import (
	"context"
	"fmt"
	"log/slog"
	"strings"
)

// KV is a key/value pair attached to a VM. A secret value is redacted by
// String and LogValue.
type KV struct {
	Key    string
	Value  string
	Secret bool
}

// String prints the pair, redacting a secret value.
func (kv KV) String() string {
	v := fmt.Sprintf("%q", kv.Value)
	if kv.Secret {
		v = redact(kv.Value)
	}
	return fmt.Sprintf("{Key:%q Value:%s Secret:%t}", kv.Key, v, kv.Secret)
}

// GoString is String, so %#v does not leak a secret either.
func (kv KV) GoString() string { return kv.String() }

// LogValue logs the pair, redacting a secret value.
func (kv KV) LogValue() slog.Value {
	v := kv.Value
	if kv.Secret {
		v = redact(kv.Value)
	}
	return slog.GroupValue(slog.String("key", kv.Key), slog.String("value", v), slog.Bool("secret", kv.Secret))
}

// GetKVs returns the VM's KVs ordered by key; ErrNotFound if the VM does not
// exist.
func (db *DB) GetKVs(ctx context.Context, vmID string) ([]KV, error) {
	res, err := db.query(ctx,
		q(`SELECT 1 FROM vms WHERE id = ?`, vmID),
		q(`SELECT name, value, secret FROM kvs WHERE vm_id = ? ORDER BY name`, vmID))
	if err != nil {
		return nil, fmt.Errorf("get vm %s kvs: %w", vmID, err)
	}
	if len(rows(res[0])) == 0 {
		return nil, fieldErr(FieldVMID, vmID, ErrNotFound)
	}
	rs := rows(res[1])
	kvs := make([]KV, len(rs))
	for i, r := range rs {
		kvs[i] = KV{Key: r.str(0), Value: r.str(1), Secret: r.int(2) != 0}
	}
	return kvs, nil
}

// UpsertKVs inserts or replaces the VM's KVs, all or none; a key given twice
// keeps its last value. ErrNotFound if the VM does not exist.
func (db *DB) UpsertKVs(ctx context.Context, vmID string, kvs []KV) error {
	defer db.touch(vmID)
	if vmID == "" {
		return fmt.Errorf("upsert kvs: %w", fieldErr(FieldVMID, "", ErrInvalid))
	}
	if len(kvs) == 0 {
		// Nothing to write, but still say whether the VM exists.
		_, err := db.GetKVs(ctx, vmID)
		return err
	}
	stmts := make([]stmt, len(kvs))
	for i, kv := range kvs {
		if strings.TrimSpace(kv.Key) == "" {
			return fmt.Errorf("upsert vm %s kvs: %w", vmID, fieldErr(FieldKVKey, kv.Key, ErrInvalid))
		}
		stmts[i] = q(`INSERT INTO kvs (vm_id, name, value, secret) VALUES (?, ?, ?, ?)
			ON CONFLICT (vm_id, name) DO UPDATE SET value = excluded.value, secret = excluded.secret`,
			vmID, kv.Key, kv.Value, kv.Secret)
	}
	_, err := db.exec(ctx, stmts...)
	if sqlErrorIs(err, "FOREIGN KEY constraint failed") {
		return fieldErr(FieldVMID, vmID, ErrNotFound)
	}
	if err != nil {
		return fmt.Errorf("upsert vm %s kvs: %w", vmID, err)
	}
	return nil
}

// DeleteKVs removes the VM's KVs with these keys, all in one transaction;
// keys it does not have are ignored. ErrNotFound if the VM does not exist.
func (db *DB) DeleteKVs(ctx context.Context, vmID string, keys []string) error {
	defer db.touch(vmID)
	stmts := []stmt{q(`SELECT 1 FROM vms WHERE id = ?`, vmID)}
	for _, k := range keys {
		stmts = append(stmts, q(`DELETE FROM kvs WHERE vm_id = ? AND name = ?`, vmID, k))
	}
	res, err := db.request(ctx, stmts...)
	if err != nil {
		return fmt.Errorf("delete vm %s kvs: %w", vmID, err)
	}
	if len(rows(res[0].GetQ())) == 0 {
		return fieldErr(FieldVMID, vmID, ErrNotFound)
	}
	return nil
}
