-- Wrapped key-encryption keys: one row per scope and key version, outside the event log.
-- Revoking a scope deletes its rows (the key shredder projection), which makes its whole
-- subtree undecryptable. A row is keyed by its fingerprint too, so material prepared for a
-- command that then lost a concurrency race never collides with the winner's.
CREATE TABLE key_material
(
    scope_id           text NOT NULL,
    version            bigint NOT NULL,
    fingerprint        text NOT NULL,
    -- base64 of the AES-SIV output
    wrapped            text NOT NULL,
    -- the key version this one is wrapped under; null for organizations (master key)
    parent_id          text,
    parent_version     bigint,
    master_fingerprint text,
    created_at         bigint NOT NULL,
    PRIMARY KEY (scope_id, version, fingerprint)
);

-- The master keys this database's organization keys are wrapped by, so an instance started
-- with a different key file is refused instead of failing on every request.
CREATE TABLE master_keys
(
    fingerprint text PRIMARY KEY,
    provider    text NOT NULL,
    created_at  bigint NOT NULL
);

-- One local master key per database: of two instances racing with fresh key files, one wins.
CREATE UNIQUE INDEX master_keys_one_local ON master_keys (provider) WHERE provider = 'local';

ALTER TABLE key_version_view ADD COLUMN fingerprint text;
