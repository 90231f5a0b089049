-- Bearer tokens. Only a SHA-256 hash of each token is stored; the token itself is shown
-- once, when it is created.
CREATE TABLE tokens
(
    id          text PRIMARY KEY,
    token_hash  text NOT NULL UNIQUE,
    role        text NOT NULL,
    org_id      text,
    name        text NOT NULL,
    created_at  integer NOT NULL,
    expires_at  integer,
    revoked_at  integer
) STRICT;

-- There is one operator token; two instances starting at once cannot both create one.
CREATE UNIQUE INDEX tokens_one_operator ON tokens (role) WHERE role = 'operator';
CREATE INDEX tokens_org ON tokens (org_id);
