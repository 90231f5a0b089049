-- The audit signing keys that sign this database's exports (public keys, never a seed): the
-- current one (`retired_at` NULL), which every instance must hold, and those it replaced,
-- which auditors need for older exports. An instance started with another key file is
-- refused, so that every instance signs with the key that GET /v1/audit/signing-key
-- publishes (ADR 0023).
CREATE TABLE audit_signing_keys
(
    key_id     text PRIMARY KEY,
    public_key text   NOT NULL,
    created_at bigint NOT NULL,
    retired_at bigint
);

-- One current key at most.
CREATE UNIQUE INDEX audit_signing_keys_current ON audit_signing_keys ((retired_at IS NULL))
    WHERE retired_at IS NULL;
