package main

import (
	"strings"
	"testing"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/threes-dev/threes/appliance"
)

// TestErrorLineUnavailable: a server that could not be reached gets the hint on
// reaching it; a server that answered Unavailable (no database quorum) gets its
// own words, without the hint.
func TestErrorLineUnavailable(t *testing.T) {
	g := &global{socket: "/run/threes/threes.sock"}
	unreached := status.Error(codes.Unavailable, "connection error: desc = \"dial unix: no such file\"")
	if line := g.errorLine(unreached); !strings.Contains(line, "cannot reach the threes server at /run/threes/threes.sock") {
		t.Errorf("unreached server: %q", line)
	}
	st, err := status.New(codes.Unavailable, "no database leader: this host reaches 1 of 3 hosts (needs 2)").
		WithDetails(&errdetails.ErrorInfo{Domain: appliance.AnsweredDomain, Reason: "Unavailable"})
	if err != nil {
		t.Fatal(err)
	}
	line := g.errorLine(st.Err())
	if strings.Contains(line, "cannot reach") || !strings.HasPrefix(line, "no database leader: this host reaches 1 of 3 hosts (needs 2)") {
		t.Errorf("server without quorum: %q", line)
	}
}
