-- Which audit signing key signs this database's exports (its public key, never the seed):
-- an instance started with another key file is refused, so that every instance signs with
-- the key that GET /v1/audit/signing-key publishes (ADR 0023).
CREATE TABLE audit_signing_keys
(
    id         integer PRIMARY KEY CHECK (id = 1),
    key_id     text    NOT NULL,
    public_key text    NOT NULL,
    created_at integer NOT NULL
) STRICT;
