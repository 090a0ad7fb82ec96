-- 0001_init: threes' first schema.
-- Times are Unix nanoseconds (INTEGER); NULL means "not set".
-- Foreign keys are enforced (rqlite FKConstraints), so ON DELETE CASCADE
-- removes a purged VM's config, KVs and address with it.

CREATE TABLE networks (
    name       TEXT PRIMARY KEY NOT NULL,
    tag        TEXT NOT NULL DEFAULT '',
    created_at INTEGER NOT NULL
) STRICT;

-- A tag names one network's tailnet ACL group; empty means none yet.
CREATE UNIQUE INDEX networks_tag ON networks (tag) WHERE tag <> '';

-- vms.network is not a foreign key: a soft-deleted VM keeps the name of a
-- network that may since have been deleted. The triggers below keep live VMs
-- and networks consistent instead.
CREATE TABLE vms (
    id          TEXT PRIMARY KEY NOT NULL,
    name        TEXT NOT NULL,
    description TEXT NOT NULL DEFAULT '',
    network     TEXT NOT NULL,
    image       TEXT NOT NULL DEFAULT '',
    type        TEXT NOT NULL DEFAULT '',
    state       TEXT NOT NULL DEFAULT '',
    host        TEXT NOT NULL DEFAULT '',
    created_at  INTEGER NOT NULL,
    updated_at  INTEGER NOT NULL,
    deleted_at  INTEGER
) STRICT;

-- Only live VMs hold their name.
CREATE UNIQUE INDEX vms_live_name ON vms (name) WHERE deleted_at IS NULL;
CREATE INDEX vms_live_network ON vms (network) WHERE deleted_at IS NULL;
CREATE INDEX vms_created ON vms (created_at, id);

CREATE TRIGGER vms_network_exists BEFORE INSERT ON vms
WHEN NOT EXISTS (SELECT 1 FROM networks WHERE name = NEW.network)
BEGIN
    SELECT RAISE(ABORT, 'embeddb: network does not exist');
END;

CREATE TRIGGER networks_not_in_use BEFORE DELETE ON networks
WHEN EXISTS (SELECT 1 FROM vms WHERE network = OLD.name AND deleted_at IS NULL)
BEGIN
    SELECT RAISE(ABORT, 'embeddb: network in use');
END;

CREATE TABLE vm_configs (
    vm_id              TEXT PRIMARY KEY NOT NULL REFERENCES vms (id) ON DELETE CASCADE,
    hostname           TEXT NOT NULL DEFAULT '',
    script             TEXT NOT NULL DEFAULT '',
    public_key         TEXT NOT NULL DEFAULT '',
    auth_key           TEXT NOT NULL DEFAULT '',
    auth_key_served_at INTEGER
) STRICT;

CREATE TABLE kvs (
    vm_id  TEXT NOT NULL REFERENCES vms (id) ON DELETE CASCADE,
    name   TEXT NOT NULL,
    value  TEXT NOT NULL,
    secret INTEGER NOT NULL DEFAULT 0 CHECK (secret IN (0, 1)),
    PRIMARY KEY (vm_id, name)
) STRICT;

-- Management addresses. vm_id is NULL for addresses not held by a VM, so the
-- IPAM can reserve others; a VM holds at most one.
CREATE TABLE addresses (
    ip        TEXT PRIMARY KEY NOT NULL,
    mac       TEXT NOT NULL UNIQUE,
    hostname  TEXT NOT NULL DEFAULT '',
    vm_id     TEXT UNIQUE REFERENCES vms (id) ON DELETE CASCADE,
    leased_at INTEGER
) STRICT;
