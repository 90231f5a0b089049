-- Read models, written only by the projection runner, in the same transaction as its
-- checkpoint. Times are microseconds since the Unix epoch (UTC) on both backends.
CREATE TABLE projection_checkpoints
(
    name       text PRIMARY KEY,
    position   integer NOT NULL,
    updated_at integer NOT NULL
) STRICT;

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
    depth            integer NOT NULL,
    own_state        text NOT NULL,
    plan             text,
    tier             text,
    key_version      integer NOT NULL,
    version          integer NOT NULL,
    created_at       integer NOT NULL,
    created_position integer NOT NULL,
    updated_position integer NOT NULL,
    -- the event that last changed own_state (null while never changed)
    state_event      text,
    state_position   integer,
    state_at         integer,
    state_actor      text,
    state_reason     text
) STRICT;

CREATE INDEX scope_view_children ON scope_view (parent_id, id);
CREATE INDEX scope_view_org ON scope_view (org_id, id);

CREATE TABLE key_version_view
(
    scope_id         text NOT NULL,
    version          integer NOT NULL,
    created_at       integer NOT NULL,
    created_position integer NOT NULL,
    PRIMARY KEY (scope_id, version)
) STRICT;
