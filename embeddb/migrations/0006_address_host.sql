-- 0006_address_host: management addresses are per host. Each host has a bridge of
-- its own and the same range may repeat on every host, so an IP is unique only
-- within its host; a MAC stays unique across the cluster (two hosts' VMs may meet
-- on one L2 or tailnet later). An address takes its VM's host; one with no VM, or
-- whose VM recorded no host (from before hosts were recorded), gets '', which every
-- host counts as its own, as it does such VMs.
--
-- SQLite cannot change a column's constraint in place: a new table, the rows copied,
-- the old one dropped and the new one renamed, all in this migration's transaction.
-- No table, trigger or view refers to addresses (it refers to vms), so dropping it
-- with foreign keys on deletes nothing elsewhere.
CREATE TABLE addresses_by_host (
    host      TEXT NOT NULL DEFAULT '',
    ip        TEXT NOT NULL,
    mac       TEXT NOT NULL UNIQUE,
    hostname  TEXT NOT NULL DEFAULT '',
    vm_id     TEXT UNIQUE REFERENCES vms (id) ON DELETE CASCADE,
    leased_at INTEGER,
    PRIMARY KEY (host, ip)
) STRICT;

INSERT INTO addresses_by_host (host, ip, mac, hostname, vm_id, leased_at)
    SELECT COALESCE(v.host, ''), a.ip, a.mac, a.hostname, a.vm_id, a.leased_at
    FROM addresses a LEFT JOIN vms v ON v.id = a.vm_id;

DROP TABLE addresses;
ALTER TABLE addresses_by_host RENAME TO addresses;
