package revert

import (
	"context"
	"errors"
	"slices"
	"strings"
	"testing"
)

// TestRunUndoesLastFirst: every undo runs, the last step's first, past a failing
// one, and the error names the failing undo.
func TestRunUndoesLastFirst(t *testing.T) {
	var r Reverter
	var ran []string
	boom := errors.New("boom")
	for _, name := range []string{"a", "b", "c"} {
		r.Add("undo "+name, func(context.Context) error {
			ran = append(ran, name)
			if name == "b" {
				return boom
			}
			return nil
		})
	}
	err := r.Run(context.Background())
	if want := []string{"c", "b", "a"}; !slices.Equal(ran, want) {
		t.Errorf("undos ran %v, want %v", ran, want)
	}
	if !errors.Is(err, boom) || !strings.Contains(err.Error(), "undo b") || strings.Contains(err.Error(), "undo a") {
		t.Errorf("Run = %v, want only b's failure, named", err)
	}
	// Run empties it: a second Run undoes nothing again.
	ran = nil
	if err := r.Run(context.Background()); err != nil || len(ran) != 0 {
		t.Errorf("second Run = %v after running %v, want nothing", err, ran)
	}
}

// TestRunPassesContext: each undo gets Run's context, not the one the steps ran in.
func TestRunPassesContext(t *testing.T) {
	type key struct{}
	var r Reverter
	var got any
	r.Add("look", func(ctx context.Context) error { got = ctx.Value(key{}); return nil })
	r.Run(context.WithValue(context.Background(), key{}, "undo's"))
	if got != "undo's" {
		t.Errorf("undo saw context value %v", got)
	}
}
