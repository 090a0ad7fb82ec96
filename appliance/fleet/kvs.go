package fleet

import (
	"context"
	"fmt"

	"github.com/threes-dev/threes/embeddb"
)

// KVs returns a VM's key/values, secret values included: the caller decides who
// may see those.
func (f *Fleet) KVs(ctx context.Context, id string) ([]embeddb.KV, error) {
	if _, err := f.Get(ctx, id); err != nil {
		return nil, err
	}
	return f.kvs(ctx, id)
}

// UpsertKVs sets key/values of a live VM and returns all of its key/values.
func (f *Fleet) UpsertKVs(ctx context.Context, id string, kvs []embeddb.KV) ([]embeddb.KV, error) {
	if len(kvs) == 0 {
		return nil, fieldErr("kvs", "give at least one key/value")
	}
	if err := validateKVs(kvs); err != nil {
		return nil, err
	}
	defer f.locks.lock(id)()
	if _, err := f.live(ctx, id); err != nil {
		return nil, err
	}
	if err := f.db.UpsertKVs(ctx, id, kvs); err != nil {
		return nil, err
	}
	return f.kvs(ctx, id)
}

// DeleteKVs removes keys of a live VM and returns the key/values left.
func (f *Fleet) DeleteKVs(ctx context.Context, id string, keys []string) ([]embeddb.KV, error) {
	if len(keys) == 0 {
		return nil, fieldErr("keys", "give at least one key")
	}
	for _, k := range keys {
		if err := ValidateKey(k); err != nil {
			return nil, err
		}
	}
	defer f.locks.lock(id)()
	if _, err := f.live(ctx, id); err != nil {
		return nil, err
	}
	if err := f.db.DeleteKVs(ctx, id, keys); err != nil {
		return nil, err
	}
	return f.kvs(ctx, id)
}

func (f *Fleet) kvs(ctx context.Context, id string) ([]embeddb.KV, error) {
	kvs, err := f.db.GetKVs(ctx, id)
	if err != nil {
		return nil, fmt.Errorf("key/values of vm %s: %w", id, err)
	}
	return kvs, nil
}
