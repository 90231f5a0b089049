-- Destruction that holds against copies of the database (ADR 0013).
--
-- Every scope has a wrapping key in epochs: its own key versions and its children's wrapping
-- keys are wrapped under it, and the organization's is wrapped by the master key. Data keys
-- (key_material) are leaves, so a revoke can destroy the wrapping keys on its path (re-key
-- up the path) without destroying any surviving scope's data keys.
CREATE TABLE wrapping_keys
(
    scope_id           text NOT NULL,
    epoch              integer NOT NULL,
    fingerprint        text NOT NULL,
    -- base64 of the AES-SIV output (or of the master-key provider's ciphertext)
    wrapped            text NOT NULL,
    -- the wrapping key this one is wrapped under; null for organizations (master key)
    parent_id          text,
    parent_epoch       integer,
    -- what wraps an organization's wrapping key (as key_material.master_fingerprint)
    master_fingerprint text,
    -- the revoked scope whose re-key created this epoch (null for a scope's first epoch)
    rekey_of           text,
    created_at         integer NOT NULL,
    PRIMARY KEY (scope_id, epoch),
    -- A wrapping key is never destroyed while something is still wrapped under it: the
    -- check takes a row lock on PostgreSQL, so a child created during a re-key either
    -- lands before the old epoch goes (and is re-wrapped) or fails and is retried.
    FOREIGN KEY (parent_id, parent_epoch) REFERENCES wrapping_keys (scope_id, epoch)
        DEFERRABLE INITIALLY DEFERRED
) STRICT;

CREATE INDEX wrapping_keys_parent ON wrapping_keys (parent_id, parent_epoch);

-- A key version wrapped under its own scope's wrapping key says which epoch; rows without it
-- were written before this migration and are wrapped under the parent's key version (or
-- the master key for organizations), as before.
ALTER TABLE key_material ADD COLUMN node_epoch integer;
CREATE INDEX key_material_node ON key_material (scope_id, node_epoch);
-- (SQLite cannot add a composite foreign key to an existing table; its single writer makes
-- the re-key's check-then-delete atomic instead.)

-- Destruction progress of a revoked scope, from its re-key events: the state, and the
-- position of the event that completed it.
ALTER TABLE scope_view ADD COLUMN rekey_state text;
ALTER TABLE scope_view ADD COLUMN rekey_done_position integer;

-- The platform master key in versions: where the event log stood when it became the one
-- that wraps every organization key (a rotation committed). Positions, not clocks: the
-- rotation and the servers may run on different machines.
ALTER TABLE master_keys ADD COLUMN activated_position integer NOT NULL DEFAULT 0;

-- The platform master key when it lives in a KMS (`--master-key aws-kms:ARN`): the key
-- itself, wrapped by that KMS key, so that neither the data directory nor the database
-- holds a usable platform key. At most one row: the current key (a rotation replaces it
-- in the transaction that re-wraps everything under the new key).
CREATE TABLE platform_keys
(
    fingerprint text PRIMARY KEY,
    -- the KMS key that wraps it: provider:key_id (MasterKeyRef::wrapping_id)
    wrapped_by  text NOT NULL,
    wrapped     text NOT NULL,
    created_at  integer NOT NULL
) STRICT;
