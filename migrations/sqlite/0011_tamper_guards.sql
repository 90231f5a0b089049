-- Tamper guards and keyed seals (docs/adr/0018-tamper-evidence-without-trusting-the-database.md).

-- Keyed seals. The seals so far were plain SHA-256, which anyone who can write the database
-- can recompute. From here on each seal is an HMAC under the audit key (audit.key), which the
-- database never holds. The unkeyed seals are kept aside as they were, for an auditor; the
-- chain starts again, and the first start after this migration seals the existing history
-- with the key once, when the operator asks for it (`ekm serve --seal-existing-history`):
-- verify the old chain with the previous release before upgrading.
ALTER TABLE audit_chain RENAME TO audit_chain_unkeyed;
DROP INDEX audit_chain_org;
CREATE INDEX audit_chain_unkeyed_org ON audit_chain_unkeyed (org_id, position);

CREATE TABLE audit_chain
(
    position  integer PRIMARY KEY,
    org_id    text NOT NULL,
    prev_hash text NOT NULL,
    hash      text NOT NULL
) STRICT;

CREATE INDEX audit_chain_org ON audit_chain (org_id, position);

-- Which audit key this database's seals are made with (its public fingerprint, never the
-- key): an instance started with another key file is refused instead of sealing entries
-- nobody can verify, and an auditor with the wrong key is told so.
CREATE TABLE audit_keys
(
    id          integer PRIMARY KEY CHECK (id = 1),
    fingerprint text NOT NULL,
    created_at  integer NOT NULL
) STRICT;

UPDATE projection_checkpoints SET position = 0 WHERE name = 'audit_chain';
DELETE FROM projection_state WHERE projection = 'audit_chain';

-- `INSERT OR REPLACE` deletes the row it conflicts with before inserting, and that implicit
-- delete fires delete triggers only when the connection turned `recursive_triggers` on,
-- which an ordinary `sqlite3` session does not: it rewrote an event past `events_no_delete`.
-- The conflict resolution of the statement overrides the table's, so the guard is a BEFORE
-- INSERT trigger that refuses an insert whose key is already taken. A plain INSERT that
-- conflicts meets it too (it runs before the primary key check); the store maps its message
-- back to the optimistic-concurrency conflict (ekm_store::event_log).
CREATE TRIGGER events_no_replace BEFORE INSERT ON events
WHEN EXISTS (SELECT 1 FROM events
              WHERE aggregate_type = NEW.aggregate_type
                AND aggregate_id = NEW.aggregate_id
                AND sequence = NEW.sequence)
BEGIN
    SELECT RAISE(ABORT, 'ekm: event already exists');
END;

-- Positions are assigned by `events_assign_position`; an insert that names one could only
-- be meant to REPLACE the event holding it (through the unique index on position).
CREATE TRIGGER events_no_given_position BEFORE INSERT ON events
WHEN NEW.position IS NOT NULL OR NEW.recorded_at IS NOT NULL
BEGIN
    SELECT RAISE(ABORT, 'ekm: positions are assigned by the database');
END;
