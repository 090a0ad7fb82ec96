-- 0004_vm_phases: the steps a new VM takes onto the tailnet, each with the time the
-- appliance first saw it (defined, running, address leased, config fetched, key taken,
-- on the tailnet), and the ID of the tailnet node the VM joined as, so its device is
-- removed by that ID rather than by the hostname the guest reports.
-- error is set when the VM failed the phase (its key already taken, say); a later
-- success replaces it.
CREATE TABLE vm_phases (
    vm_id TEXT NOT NULL REFERENCES vms (id) ON DELETE CASCADE,
    phase TEXT NOT NULL,
    at    INTEGER NOT NULL,
    error TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (vm_id, phase)
) STRICT;

ALTER TABLE vms ADD COLUMN tailnet_node_id TEXT NOT NULL DEFAULT '';
