package embeddb

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"time"
)

// VMPhase is a step a VM reached (or failed) on its way onto the tailnet, as the
// appliance names it, with the time it first saw it.
type VMPhase struct {
	Phase string
	At    time.Time
	Error string // set when the VM failed the phase; empty when it reached it
}

// RecordVMPhase records that the VM reached phase at time at, or failed it when
// failure is not empty. The first time a phase is reached is kept: later calls change
// nothing, except that reaching a phase replaces an earlier failure of it. It reports
// whether it changed the record; an unknown VM is ErrNotFound.
func (db *DB) RecordVMPhase(ctx context.Context, vmID, phase string, at time.Time, failure string) (bool, error) {
	if vmID == "" || phase == "" {
		return false, fmt.Errorf("record vm phase: vm id and phase are required: %w", ErrInvalid)
	}
	if err := checkTime("phase time", at, true); err != nil {
		return false, fmt.Errorf("record vm %s phase %s: %w", vmID, phase, err)
	}
	defer db.touch(vmID)
	res, err := db.exec(ctx, q(`INSERT INTO vm_phases (vm_id, phase, at, error)
		SELECT ?, ?, ?, ? WHERE EXISTS (SELECT 1 FROM vms WHERE id = ?)
		ON CONFLICT (vm_id, phase) DO UPDATE SET at = excluded.at, error = ''
		WHERE vm_phases.error <> '' AND excluded.error = ''`,
		vmID, phase, timeArg(at), failure, vmID))
	if err != nil {
		return false, fmt.Errorf("record vm %s phase %s: %w", vmID, phase, err)
	}
	if rowsAffected(res, 0) > 0 {
		return true, nil
	}
	if _, err := db.GetVM(ctx, vmID); err != nil {
		return false, err
	}
	return false, nil
}

// SetVMNodeID records the ID of the tailnet node the VM joined as.
func (db *DB) SetVMNodeID(ctx context.Context, vmID, nodeID string) error {
	defer db.touch(vmID)
	res, err := db.exec(ctx, q(`UPDATE vms SET tailnet_node_id = ? WHERE id = ?`, nodeID, vmID))
	if err != nil {
		return fmt.Errorf("set vm %s tailnet node: %w", vmID, err)
	}
	if rowsAffected(res, 0) == 0 {
		return fieldErr(FieldVMID, vmID, ErrNotFound)
	}
	return nil
}

// VMByAuthKeyID returns the VM whose auth key the control plane knows by keyID,
// live or soft-deleted.
func (db *DB) VMByAuthKeyID(ctx context.Context, keyID string) (VM, error) {
	if keyID == "" {
		return VM{}, fmt.Errorf("get vm by auth key: %w", fieldErr("auth key id", "", ErrInvalid))
	}
	res, err := db.query(ctx,
		q(`SELECT `+vmColumns+` JOIN vm_configs c ON c.vm_id = v.id WHERE c.auth_key_id = ?`, keyID),
		q(`SELECT p.vm_id, p.phase, p.at, p.error FROM vm_phases p JOIN vm_configs c ON c.vm_id = p.vm_id
			WHERE c.auth_key_id = ?`, keyID))
	if err != nil {
		return VM{}, fmt.Errorf("get vm by auth key %s: %w", keyID, err)
	}
	vms := withPhases(rows(res[0]), rows(res[1]))
	if len(vms) == 0 {
		return VM{}, fieldErr("auth key id", keyID, ErrNotFound)
	}
	return vms[0], nil
}

const phaseColumns = `SELECT vm_id, phase, at, error FROM vm_phases`

// withPhases scans VM rows and hangs each VM's phase rows on it, oldest first.
func withPhases(vmRows, phaseRows []row) []VM {
	vms := make([]VM, len(vmRows))
	at := make(map[string]int, len(vmRows))
	for i, r := range vmRows {
		vms[i] = scanVM(r)
		at[vms[i].ID] = i
	}
	for _, r := range phaseRows {
		if i, ok := at[r.str(0)]; ok {
			vms[i].Phases = append(vms[i].Phases, VMPhase{Phase: r.str(1), At: r.time(2), Error: r.str(3)})
		}
	}
	for i := range vms {
		sortPhases(vms[i].Phases)
	}
	return vms
}

func sortPhases(ps []VMPhase) {
	slices.SortStableFunc(ps, func(a, b VMPhase) int {
		if c := a.At.Compare(b.At); c != 0 {
			return c
		}
		return strings.Compare(a.Phase, b.Phase)
	})
}
