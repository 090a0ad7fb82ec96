package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"strings"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	threesv1 "github.com/threes-dev/threes/proto/threes/v1"
)

// waitTimeout bounds create --wait when --timeout is not given: a VM under
// emulation takes tens of seconds to boot and join, more than one call's default.
const waitTimeout = 5 * time.Minute

// phaseWord names a phase as the CLI prints it.
func phaseWord(p threesv1.VMPhase) string {
	if p == threesv1.VMPhase_VM_PHASE_ON_TAILNET {
		return "on the tailnet"
	}
	return strings.ReplaceAll(strings.ToLower(strings.TrimPrefix(p.String(), "VM_PHASE_")), "_", " ")
}

// allPhases are the phases in the order a VM reaches them.
func allPhases() []threesv1.VMPhase {
	var ps []threesv1.VMPhase
	for v := range len(threesv1.VMPhase_name) {
		if p := threesv1.VMPhase(v); p != threesv1.VMPhase_VM_PHASE_UNSPECIFIED {
			ps = append(ps, p)
		}
	}
	return ps
}

// waitForTailnet follows the VM with Watch, printing each phase to w as the
// appliance records it, with its time since the create, until the VM is on the
// tailnet. It fails naming the phase that failed or that it was still waiting for
// when ctx ended, the VM stopped, or it was deleted.
func waitForTailnet(ctx context.Context, cl threesv1.ThreesClient, vm *threesv1.VM, w io.Writer) (*threesv1.VM, error) {
	printed := map[threesv1.VMPhase]bool{}
	created := vm.GetCreatedAt().AsTime()
	start := time.Now()
	// show prints the phases not printed yet and reports the first failed one.
	show := func(vm *threesv1.VM) error {
		for _, p := range vm.GetPhases() {
			if printed[p.GetPhase()] {
				continue
			}
			printed[p.GetPhase()] = true
			line := fmt.Sprintf("%-16s +%.1fs", phaseWord(p.GetPhase()), p.GetAt().AsTime().Sub(created).Seconds())
			if p.GetError() != "" {
				line += "  FAILED: " + p.GetError()
			}
			fmt.Fprintln(w, line)
			if p.GetError() != "" {
				return fmt.Errorf("phase %q failed: %s", phaseWord(p.GetPhase()), p.GetError())
			}
		}
		return nil
	}
	next := func() threesv1.VMPhase {
		for _, p := range allPhases() {
			if !printed[p] {
				return p
			}
		}
		return threesv1.VMPhase_VM_PHASE_UNSPECIFIED
	}
	fail := func(why string) error {
		return fmt.Errorf("vm %s: %s; the VM is left as it is (threes vm get %s; threes vm delete %s && threes vm purge %s removes it, its key and its device)",
			vm.GetName(), why, vm.GetId(), vm.GetId(), vm.GetId())
	}
	ref := &threesv1.VMRef{Id: vm.GetId()}
	for {
		stream, err := cl.Watch(ctx, ref)
		for err == nil {
			var got *threesv1.VM
			if got, err = stream.Recv(); err != nil {
				break
			}
			vm = got
			if perr := show(vm); perr != nil {
				return vm, fail(perr.Error())
			}
			if printed[threesv1.VMPhase_VM_PHASE_ON_TAILNET] {
				return vm, nil
			}
			switch vm.GetState() {
			case threesv1.VMState_VM_STATE_STOPPED, threesv1.VMState_VM_STATE_CRASHED,
				threesv1.VMState_VM_STATE_DELETED, threesv1.VMState_VM_STATE_MISSING:
				return vm, fail(fmt.Sprintf("it is %s, before phase %q", stateWord(vm.GetState()), phaseWord(next())))
			}
		}
		// The deadline first: the stream may end cleanly as it passes.
		if errors.Is(err, io.EOF) && ctx.Err() == nil {
			return vm, fmt.Errorf("vm %s: purged while waiting for phase %q", vm.GetName(), phaseWord(next()))
		}
		if ctx.Err() != nil || status.Code(err) == codes.DeadlineExceeded || status.Code(err) == codes.Canceled {
			why := fmt.Sprintf("timed out after %s waiting for phase %q", time.Since(start).Round(time.Second), phaseWord(next()))
			switch next() {
			case threesv1.VMPhase_VM_PHASE_KEY_TAKEN:
				why += " (the VM never asked for its tailnet auth key: does its image have Tailscale?)"
			case threesv1.VMPhase_VM_PHASE_ON_TAILNET:
				why += " (the VM's key was taken but no node joined the tailnet with it)"
			}
			return vm, fail(why)
		}
		if status.Code(err) != codes.Unavailable {
			return vm, fmt.Errorf("vm %s: watch: %w", vm.GetName(), err)
		}
		// The appliance went away (a restart): watch again until the deadline.
		select {
		case <-ctx.Done():
		case <-time.After(time.Second):
		}
	}
}
