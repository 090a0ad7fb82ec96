-- 0005_hosts: the hosts that share the database. Each host writes its own row when
-- it starts and at every reconcile pass (its heartbeat, so updated_at says when it
-- was last heard from), with the tailnet IP other hosts reach it at and the capacity
-- placement weighs. name is the host's --hostname, which is also its Raft node ID.
-- The overcommit ratios are stored in thousandths, so they stay exact integers.
CREATE TABLE hosts (
    name                    TEXT PRIMARY KEY NOT NULL,
    tailnet_ip              TEXT NOT NULL DEFAULT '',
    vcpus                   INTEGER NOT NULL DEFAULT 0,
    memory_mib              INTEGER NOT NULL DEFAULT 0,
    cpu_overcommit_milli    INTEGER NOT NULL DEFAULT 1000,
    memory_overcommit_milli INTEGER NOT NULL DEFAULT 1000,
    updated_at              INTEGER NOT NULL
) STRICT;

-- A host's row goes only once it runs no live VM: VMs are carried by their host.
CREATE TRIGGER hosts_not_in_use BEFORE DELETE ON hosts
WHEN EXISTS (SELECT 1 FROM vms WHERE host = OLD.name AND deleted_at IS NULL)
BEGIN
    SELECT RAISE(ABORT, 'embeddb: host in use');
END;

-- Placement's load per host (live VMs by host and type) reads this index only.
CREATE INDEX vms_live_host ON vms (host, type) WHERE deleted_at IS NULL;
