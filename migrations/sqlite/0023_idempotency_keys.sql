-- Idempotency-Key (issue 18 §3, ADR 0035): the first answer to a POST, PUT or DELETE that
-- carried a key, per principal, replayed to a retry with the same key and body for 24 hours.
-- `status` NULL: the first request is still running (a concurrent duplicate answers 409);
-- `claim` names that run, so that only it can keep its answer or let the key go.
-- `fingerprint` is SHA-256 of the method, the path and the body; the answer is kept as the
-- client received it (no plaintext key material: data-plane answers are never kept).
CREATE TABLE idempotency_keys (
    principal TEXT NOT NULL,
    key TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    claim TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    status INTEGER,
    response_headers TEXT,
    response_body BLOB,
    PRIMARY KEY (principal, key)
) STRICT;
CREATE INDEX idempotency_keys_created ON idempotency_keys (created_at);
