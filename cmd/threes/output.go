package main

import (
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
	raw := make([]json.RawMessage, len(msgs))
	for i, m := range msgs {
		b, err := jsonOpts.Marshal(m)
		if err != nil {
			return err
		}
		raw[i] = b
	}
	return writeJSON(w, raw)
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

func printVMTable(w io.Writer, vms []*threesv1.VM) {
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "ID\tNAME\tNETWORK\tTYPE\tSTATE\tADDRESS\tCREATED")
	for _, vm := range vms {
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\n", vm.GetId(), vm.GetName(), vm.GetNetwork(),
			typeWord(vm.GetType()), stateWord(vm.GetState()), vm.GetManagementIp(), when(vm.GetCreatedAt()))
	}
	tw.Flush()
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
