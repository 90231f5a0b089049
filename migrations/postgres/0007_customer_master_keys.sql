-- Customer master keys (BYOK). An organization row of the scope tree says which master key
-- wraps its key and whether that key can be used (the health monitor's last recorded
-- verdict, from events).
ALTER TABLE scope_view ADD COLUMN master_key text;
ALTER TABLE scope_view ADD COLUMN master_health text;
ALTER TABLE scope_view ADD COLUMN master_reason text;
ALTER TABLE scope_view ADD COLUMN master_detail text;
ALTER TABLE scope_view ADD COLUMN master_position bigint;
ALTER TABLE scope_view ADD COLUMN master_at bigint;

-- Organization key versions re-wrapped under a new master key, waiting for the event that
-- switches to it. The key shredder applies them in the runner's transaction when that event
-- is projected (replacing, and so destroying, the old wrapping), then deletes them. Rows of
-- a command that lost a race are deleted the same way, by the next switch of that
-- organization.
CREATE TABLE master_key_rewraps
(
    scope_id    text NOT NULL,
    version     bigint NOT NULL,
    fingerprint text NOT NULL,
    -- the master key switched to: provider:key_id (MasterKeyRef::wrapping_id), or `local`
    target      text NOT NULL,
    -- what key_material.master_fingerprint becomes: the same, or the local key's fingerprint
    wrapped_by  text NOT NULL,
    wrapped     text NOT NULL,
    created_at  bigint NOT NULL,
    PRIMARY KEY (scope_id, version, fingerprint, target)
);

-- The health monitor's latest check of each customer key: operational, not history (a
-- check every minute is not an event; a change of health is).
CREATE TABLE master_key_checks
(
    org_id     text PRIMARY KEY,
    checked_at bigint NOT NULL,
    ok         bigint NOT NULL,
    detail     text NOT NULL
);
