-- Read models, written only by the projection runner, in the same transaction as its
-- checkpoint. Times are microseconds since the Unix epoch (UTC) on both backends.
CREATE TABLE projection_checkpoints
(
    name       text PRIMARY KEY,
    position   bigint NOT NULL,
    updated_at bigint NOT NULL
);

-- One row per scope. Effective state is not stored: it is computed from the rows on the
-- path when read, so pausing an organization updates exactly one row.
CREATE TABLE scope_view
(
    id               text PRIMARY KEY,
    org_id           text NOT NULL,
    parent_id        text,
    kind             text NOT NULL,
    name             text NOT NULL,
    -- ids from the root to this scope, joined by '/'
    path             text NOT NULL,
    depth            bigint NOT NULL,
    own_state        text NOT NULL,
    plan             text,
    tier             text,
    key_version      bigint NOT NULL,
    version          bigint NOT NULL,
    created_at       bigint NOT NULL,
    created_position bigint NOT NULL,
    updated_position bigint NOT NULL,
    -- the event that last changed own_state (null while never changed)
    state_event      text,
    state_position   bigint,
    state_at         bigint,
    state_actor      text,
    state_reason     text
);

CREATE INDEX scope_view_children ON scope_view (parent_id, id);
CREATE INDEX scope_view_org ON scope_view (org_id, id);

CREATE TABLE key_version_view
(
    scope_id         text NOT NULL,
    version          bigint NOT NULL,
    created_at       bigint NOT NULL,
    created_position bigint NOT NULL,
    PRIMARY KEY (scope_id, version)
);
