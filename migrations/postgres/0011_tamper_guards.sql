-- Tamper guards and keyed seals (docs/adr/0018-tamper-evidence-without-trusting-the-database.md).

-- Keyed seals. The seals so far were plain SHA-256, which anyone who can write the database
-- can recompute. From here on each seal is an HMAC under the audit key (audit.key), which the
-- database never holds. The unkeyed seals are kept aside as they were, for an auditor; the
-- chain starts again, and the first start after this migration seals the existing history
-- with the key once, when the operator asks for it (`ekm serve --seal-existing-history`):
-- verify the old chain with the previous release before upgrading.
ALTER TABLE audit_chain RENAME TO audit_chain_unkeyed;
ALTER TABLE audit_chain_unkeyed RENAME CONSTRAINT audit_chain_pkey TO audit_chain_unkeyed_pkey;
ALTER INDEX audit_chain_org RENAME TO audit_chain_unkeyed_org;

CREATE TABLE audit_chain
(
    position  bigint PRIMARY KEY,
    org_id    text NOT NULL,
    prev_hash text NOT NULL,
    hash      text NOT NULL
);

CREATE INDEX audit_chain_org ON audit_chain (org_id, position);

-- Which audit key this database's seals are made with (its public fingerprint, never the
-- key): an instance started with another key file is refused instead of sealing entries
-- nobody can verify, and an auditor with the wrong key is told so.
CREATE TABLE audit_keys
(
    id          bigint PRIMARY KEY CHECK (id = 1),
    fingerprint text NOT NULL,
    created_at  bigint NOT NULL
);

UPDATE projection_checkpoints SET position = 0 WHERE name = 'audit_chain';
DELETE FROM projection_state WHERE projection = 'audit_chain';

-- TRUNCATE fires no row trigger, so `events_no_update_or_delete` let `TRUNCATE events,
-- audit_chain` empty the history, and verification then found nothing to check. Statement
-- triggers refuse it on both append-only tables.
CREATE FUNCTION ekm_append_only_no_truncate() RETURNS trigger
    LANGUAGE plpgsql AS
$$
BEGIN
    RAISE EXCEPTION '% is append-only: TRUNCATE is refused', TG_TABLE_NAME;
END;
$$;

CREATE TRIGGER events_no_truncate
    BEFORE TRUNCATE ON events
    FOR EACH STATEMENT EXECUTE FUNCTION ekm_append_only_no_truncate();

CREATE TRIGGER audit_chain_no_truncate
    BEFORE TRUNCATE ON audit_chain
    FOR EACH STATEMENT EXECUTE FUNCTION ekm_append_only_no_truncate();

CREATE TRIGGER audit_chain_unkeyed_no_truncate
    BEFORE TRUNCATE ON audit_chain_unkeyed
    FOR EACH STATEMENT EXECUTE FUNCTION ekm_append_only_no_truncate();
