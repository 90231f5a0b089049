-- Idempotency-Key (issue 18 §3, ADR 0035): the first answer to a POST, PUT or DELETE that
-- carried a key, per principal, replayed to a retry with the same key and body for 24 hours.
-- `status` NULL: the first request is still running (a concurrent duplicate answers 409);
-- `claim` names that run, so that only it can keep its answer or let the key go.
-- `fingerprint` is SHA-256 of the method, the path and the body; the answer is kept as the
-- client received it (no plaintext key material: data-plane answers are never kept).
CREATE TABLE idempotency_keys (
    principal text NOT NULL,
    key text NOT NULL,
    fingerprint text NOT NULL,
    claim text NOT NULL,
    created_at bigint NOT NULL,
    status bigint,
    response_headers text,
    response_body bytea,
    PRIMARY KEY (principal, key)
);
CREATE INDEX idempotency_keys_created ON idempotency_keys (created_at);
