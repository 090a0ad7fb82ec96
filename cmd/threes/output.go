package main

import (
	"bufio"
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"strings"
	"text/tabwriter"
	"time"

	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/threes-dev/threes/appliance"
	threesv1 "github.com/threes-dev/threes/proto/threes/v1"
)

var jsonOpts = protojson.MarshalOptions{UseProtoNames: true, EmitUnpopulated: true}

// printJSON writes one message with the API's field names, so scripts read the same
// shape the API defines.
func printJSON(w io.Writer, m proto.Message) error {
	b, err := jsonOpts.Marshal(m)
	if err != nil {
		return err
	}
	return writeJSON(w, json.RawMessage(b))
}

// printJSONList writes messages as a JSON array, empty or not, so a list command's
// output has one shape however many items there are.
func printJSONList[M proto.Message](w io.Writer, msgs []M) error {
	l := newJSONList(w)
	for _, m := range msgs {
		if err := l.add(m); err != nil {
			return err
		}
	}
	return l.close()
}

// jsonList writes a JSON array one message at a time, as it arrives, laid out as
// writeJSON lays out a whole list: a long list is neither held nor re-parsed.
type jsonList struct {
	w   *bufio.Writer
	buf bytes.Buffer
	n   int
}

func newJSONList(w io.Writer) *jsonList { return &jsonList{w: bufio.NewWriter(w)} }

func (l *jsonList) add(m proto.Message) error {
	b, err := jsonOpts.Marshal(m)
	if err != nil {
		return err
	}
	l.buf.Reset()
	if err := json.Indent(&l.buf, b, "  ", "  "); err != nil {
		return err
	}
	sep := ",\n  "
	if l.n == 0 {
		sep = "[\n  "
	}
	l.n++
	l.w.WriteString(sep)
	_, err = l.w.Write(l.buf.Bytes())
	return err
}

func (l *jsonList) close() error {
	if l.n == 0 {
		l.w.WriteString("[]\n")
	} else {
		l.w.WriteString("\n]\n")
	}
	return l.w.Flush()
}

func writeJSON(w io.Writer, v any) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

func printVM(w io.Writer, vm *threesv1.VM) {
	fmt.Fprintln(w, vm.GetName())
	tw := tabwriter.NewWriter(w, 0, 0, 1, ' ', 0)
	row := func(k, v string) {
		if v != "" {
			fmt.Fprintf(tw, "    %s:\t%s\n", k, v)
		}
	}
	row("ID", vm.GetId())
	row("Description", vm.GetDescription())
	row("Network", vm.GetNetwork())
	row("Image", vm.GetImage())
	row("Type", fmt.Sprintf("%s (%d vCPU, %d MiB)", typeWord(vm.GetType()), vm.GetVcpus(), vm.GetMemoryMib()))
	row("State", stateWord(vm.GetState()))
	row("Host", vm.GetHost())
	row("Management Address", vm.GetManagementIp())
	row("MAC", vm.GetMac())
	row("Created At", when(vm.GetCreatedAt()))
	row("Deleted At", when(vm.GetDeletedAt()))
	row("Tailnet Node", vm.GetTailnetNodeId())
	for i, p := range vm.GetPhases() {
		k := ""
		if i == 0 {
			k = "Phases:"
		}
		v := fmt.Sprintf("%-16s %s (+%.1fs)", phaseWord(p.GetPhase()), when(p.GetAt()), p.GetAt().AsTime().Sub(vm.GetCreatedAt().AsTime()).Seconds())
		if p.GetError() != "" {
			v += " FAILED: " + p.GetError()
		}
		fmt.Fprintf(tw, "    %s\t%s\n", k, v)
	}
	tw.Flush()
}

// vmTable writes VMs as a table, a row as each arrives. The table lines its
// columns up once the last row is in; the bufio.Writer beneath spares a write
// call for each cell's padding.
type vmTable struct {
	w  *bufio.Writer
	tw *tabwriter.Writer
}

func newVMTable(w io.Writer) *vmTable {
	bw := bufio.NewWriter(w)
	tw := tabwriter.NewWriter(bw, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "ID\tNAME\tNETWORK\tTYPE\tSTATE\tHOST\tADDRESS\tCREATED")
	return &vmTable{w: bw, tw: tw}
}

func (t *vmTable) add(vm *threesv1.VM) {
	fmt.Fprintf(t.tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n", vm.GetId(), vm.GetName(), vm.GetNetwork(),
		typeWord(vm.GetType()), stateWord(vm.GetState()), vm.GetHost(), vm.GetManagementIp(), when(vm.GetCreatedAt()))
}

func (t *vmTable) close() error {
	if err := t.tw.Flush(); err != nil {
		return err
	}
	return t.w.Flush()
}

func typeWord(t threesv1.VMType) string {
	if name, ok := appliance.TypeName(t); ok {
		return name
	}
	return strings.ToLower(strings.TrimPrefix(t.String(), "VM_TYPE_")) // a newer server's type
}

func stateWord(s threesv1.VMState) string {
	return strings.ToLower(strings.TrimPrefix(s.String(), "VM_STATE_"))
}

func when(ts *timestamppb.Timestamp) string {
	if ts == nil {
		return ""
	}
	return ts.AsTime().UTC().Format(time.RFC3339)
}
