package appliance

import (
	"errors"
	"fmt"
	"go/ast"
	"go/parser"
	"go/token"
	"io/fs"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/threes-dev/threes/appliance/fleet"
	"github.com/threes-dev/threes/embeddb"
	"github.com/threes-dev/threes/hv"
)

const module = "github.com/threes-dev/threes"

// notForAPI are packages whose sentinels never reach a gRPC caller: the metadata
// server answers VMs over HTTP with its own status codes.
var notForAPI = map[string]bool{
	module + "/netboot/metadata": true,
	module + "/netboot/neigh":    true,
}

// TestErrorCodes walks every exported Err... variable declared in the module's
// packages and checks that the table maps it, and that each row gives its code
// through toStatus with the message intact.
func TestErrorCodes(t *testing.T) {
	declared := sentinelsInModule(t, "..")
	mapped := sentinelsInTable(t, "errors.go")
	for name := range declared {
		if !mapped[name] {
			t.Errorf("%s is not in errorCodes: a caller would get Internal", name)
		}
	}
	for name := range mapped {
		if !declared[name] && !strings.HasPrefix(name, "context.") {
			t.Errorf("errorCodes maps %s, which the walk did not find", name)
		}
	}
	if len(mapped) != len(errorCodes) {
		t.Errorf("errorCodes has %d rows but %d distinct errors", len(errorCodes), len(mapped))
	}

	for _, row := range errorCodes {
		if row.code == codes.Internal || row.code == codes.Unknown || row.code == codes.OK {
			t.Errorf("%v maps to %v", row.err, row.code)
		}
		err := toStatus(fmt.Errorf("vm toy0: %w", row.err))
		st, _ := status.FromError(err)
		if st.Code() != row.code || st.Message() != "vm toy0: "+row.err.Error() {
			t.Errorf("toStatus(%v) = %v %q, want %v with the message kept", row.err, st.Code(), st.Message(), row.code)
		}
	}

	// The codes a user expects for the errors issue 12 names.
	for _, tc := range []struct {
		err  error
		want codes.Code
	}{
		{fmt.Errorf("console of vm toy0: console of domain x: %w", hv.ErrNotRunning), codes.FailedPrecondition},
		{fmt.Errorf("connect to qemu:///system: %w: dial unix: no such file", hv.ErrUnavailable), codes.Unavailable},
		{fmt.Errorf("%w: 0 vCPUs", hv.ErrInvalidSpec), codes.InvalidArgument},
		{fmt.Errorf("upsert kvs: %w", embeddb.ErrInvalid), codes.InvalidArgument},
		{fmt.Errorf("create vm: %w", embeddb.ErrNotLeader), codes.Unavailable},
		{fmt.Errorf("create network x: %w: this host reaches 1 of 3 hosts (needs 2)", embeddb.ErrNoQuorum), codes.Unavailable},
		{fmt.Errorf("%w: this node lost the leadership before the write committed (%w: ...)", embeddb.ErrOutcomeUnknown, embeddb.ErrNoQuorum), codes.Aborted},
		{fmt.Errorf("host b has 0 vCPUs and 0 MiB free: %w", fleet.ErrNoRoom), codes.ResourceExhausted},
		{fmt.Errorf("vm x: %w", embeddb.ErrNotFound), codes.NotFound},
		{fmt.Errorf("vm name toy0: %w", embeddb.ErrExists), codes.AlreadyExists},
		{&fleet.FieldError{Field: "name", Msg: "too long"}, codes.InvalidArgument},
		{fmt.Errorf("no sentinel at all"), codes.Internal},
	} {
		if got := status.Code(toStatus(tc.err)); got != tc.want {
			t.Errorf("toStatus(%q) = %v, want %v", tc.err, got, tc.want)
		}
	}
}

// sentinelsInModule returns "importpath.ErrName" for every exported package-level
// variable named Err... outside tests, commands and generated code.
func sentinelsInModule(t *testing.T, root string) map[string]bool {
	t.Helper()
	found := map[string]bool{}
	fset := token.NewFileSet()
	err := filepath.WalkDir(root, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(root, path)
		if d.IsDir() {
			switch {
			case rel == ".":
				return nil
			case strings.HasPrefix(d.Name(), "."), d.Name() == "testdata",
				rel == "cmd", rel == "proto", rel == "tools", rel == "bench", rel == "bin":
				return filepath.SkipDir
			}
			return nil
		}
		if !strings.HasSuffix(path, ".go") || strings.HasSuffix(path, "_test.go") {
			return nil
		}
		pkg := module + "/" + filepath.ToSlash(filepath.Dir(rel))
		if notForAPI[pkg] {
			return nil
		}
		f, err := parser.ParseFile(fset, path, nil, parser.SkipObjectResolution)
		if err != nil {
			return err
		}
		for _, decl := range f.Decls {
			gd, ok := decl.(*ast.GenDecl)
			if !ok || gd.Tok != token.VAR {
				continue
			}
			for _, spec := range gd.Specs {
				for _, n := range spec.(*ast.ValueSpec).Names {
					if strings.HasPrefix(n.Name, "Err") && n.IsExported() {
						found[pkg+"."+n.Name] = true
					}
				}
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if len(found) < 20 {
		t.Fatalf("found only %d sentinels under %s: is the walk looking in the right place?", len(found), root)
	}
	return found
}

// sentinelsInTable returns "importpath.ErrName" for each row of errorCodes, read
// from the source so that the names can be compared with the walk's.
func sentinelsInTable(t *testing.T, file string) map[string]bool {
	t.Helper()
	f, err := parser.ParseFile(token.NewFileSet(), file, nil, parser.SkipObjectResolution)
	if err != nil {
		t.Fatal(err)
	}
	imports := map[string]string{}
	for _, imp := range f.Imports {
		p, _ := strconv.Unquote(imp.Path.Value)
		name := filepath.Base(p)
		if imp.Name != nil {
			name = imp.Name.Name
		}
		imports[name] = p
	}
	mapped := map[string]bool{}
	ast.Inspect(f, func(n ast.Node) bool {
		vs, ok := n.(*ast.ValueSpec)
		if !ok || len(vs.Names) != 1 || vs.Names[0].Name != "errorCodes" {
			return true
		}
		for _, elt := range vs.Values[0].(*ast.CompositeLit).Elts {
			switch e := elt.(*ast.CompositeLit).Elts[0].(type) {
			case *ast.Ident:
				mapped[module+"/appliance."+e.Name] = true
			case *ast.SelectorExpr:
				mapped[imports[e.X.(*ast.Ident).Name]+"."+e.Sel.Name] = true
			default:
				t.Fatalf("errorCodes row %T: want an identifier", e)
			}
		}
		return false
	})
	return mapped
}

// TestAnswered: every status the appliance makes says it answered; one its gRPC
// client made (a host it could not reach) does not, until fromHost marks it as
// this appliance's answer naming the host; a host's own answer passes as it is.
func TestAnswered(t *testing.T) {
	for _, err := range []error{embeddb.ErrNoQuorum, fleet.ErrNoRoom, errors.New("anything")} {
		if st := toStatus(err); !Answered(st) {
			t.Errorf("toStatus(%v) = %v: not marked as answered", err, st)
		}
	}
	unreached := status.Error(codes.Unavailable, "connection error: desc = \"transport: dial: no route\"")
	if Answered(unreached) {
		t.Errorf("a client-made status counts as answered")
	}
	got := fromHost("threes-b", unreached)
	if !Answered(got) || status.Code(got) != codes.Unavailable || !strings.Contains(got.Error(), "host threes-b: connection error") {
		t.Errorf("fromHost = %v, want Unavailable naming threes-b, marked as answered", got)
	}
	own := toStatus(fmt.Errorf("vm x: %w", fleet.ErrState))
	if got := fromHost("threes-b", own); got != own {
		t.Errorf("fromHost changed the host's own answer %v to %v", own, got)
	}
	if fromHost("threes-b", nil) != nil {
		t.Errorf("fromHost(nil) is not nil")
	}
}
