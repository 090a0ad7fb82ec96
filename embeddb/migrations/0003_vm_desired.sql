-- 0003_vm_desired: what the VM's owner wants (desired) apart from what libvirt last
-- reported (state). Reconcile starts live VMs whose desired state is running.
-- Until now state held both, and a restart started VMs whose state was running, so a
-- VM that was stopped (by its owner or by delete) stays stopped.
ALTER TABLE vms ADD COLUMN desired TEXT NOT NULL DEFAULT 'running';
UPDATE vms SET desired = 'stopped' WHERE state = 'stopped' OR deleted_at IS NOT NULL;
