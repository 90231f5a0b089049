-- Principals: every token belongs to a principal of its organization (a person or a
-- service), which is the actor recorded in events. Tokens made before principals existed
-- belong to a principal named after the token.
ALTER TABLE tokens ADD COLUMN principal text;
ALTER TABLE tokens ADD COLUMN principal_kind text;
UPDATE tokens SET principal = id, principal_kind = 'user' WHERE principal IS NULL;
CREATE INDEX tokens_principal ON tokens (org_id, principal);

-- Permissions granted to principals (events PermissionGranted / PermissionRevoked), limited
-- to a subtree when scope_id is set. Written by the scope tree projection.
CREATE TABLE grants_view
(
    org_id           text NOT NULL,
    principal        text NOT NULL,
    permission       text NOT NULL,
    -- '' for the whole organization; else the root of the subtree
    scope_id         text NOT NULL,
    -- the position of the PermissionGranted event: a revoke deletes the grants made before
    -- it, so grant, revoke and grant again in one projected batch leaves the last grant
    granted_position bigint PRIMARY KEY,
    granted_at       bigint NOT NULL,
    granted_by       text NOT NULL
);

CREATE INDEX grants_view_principal ON grants_view (org_id, principal);
