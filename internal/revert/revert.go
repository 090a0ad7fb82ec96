// Package revert undoes the steps of a half-done operation, last first, so a
// failure partway leaves nothing behind.
package revert

import (
	"context"
	"errors"
	"fmt"
)

// Reverter collects the undo of each step as it succeeds. The zero Reverter is
// ready to use.
type Reverter struct {
	steps []step
}

type step struct {
	name string
	undo func(context.Context) error
}

// Add records how to undo a step just done; name says what the undo does, for its
// error.
func (r *Reverter) Add(name string, undo func(context.Context) error) {
	r.steps = append(r.steps, step{name, undo})
}

// Run undoes every step, the last one first, and goes on past a step whose undo
// fails: the rest still run. The error names each undo that failed. Callers pass
// a context that outlives theirs (context.WithoutCancel): the caller's may be
// what ended the operation.
func (r *Reverter) Run(ctx context.Context) error {
	var errs []error
	for i := len(r.steps) - 1; i >= 0; i-- {
		if err := r.steps[i].undo(ctx); err != nil {
			errs = append(errs, fmt.Errorf("undo %s: %w", r.steps[i].name, err))
		}
	}
	r.steps = nil
	return errors.Join(errs...)
}
