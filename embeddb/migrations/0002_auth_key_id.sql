-- The control plane's ID of a VM's auth key, so a key never used can be revoked when
-- the VM is deleted. Empty when no control plane minted one.
ALTER TABLE vm_configs ADD COLUMN auth_key_id TEXT NOT NULL DEFAULT '';
