-- Per-projection state kept beside the checkpoint (for example the audit chain's head per
-- organization), written in the same transaction as the projection's rows.
CREATE TABLE projection_state
(
    projection text NOT NULL,
    key        text NOT NULL,
    value      text NOT NULL,
    PRIMARY KEY (projection, key)
);

-- The audit log: one entry per event. A read model: it can be rebuilt from the events.
CREATE TABLE audit_log
(
    position       bigint PRIMARY KEY,
    recorded_at    bigint NOT NULL,
    org_id         text NOT NULL,
    scope_id       text NOT NULL,
    scope_path     text NOT NULL,
    action         text NOT NULL,
    event_type     text NOT NULL,
    event_version  text NOT NULL,
    actor          text NOT NULL,
    actor_kind     text NOT NULL,
    reason         text,
    request_id     text NOT NULL,
    source_address text,
    summary        text NOT NULL,
    details        text NOT NULL
);

CREATE INDEX audit_log_org ON audit_log (org_id, position);
CREATE INDEX audit_log_org_path ON audit_log (org_id, scope_path, position);
CREATE INDEX audit_log_org_actor ON audit_log (org_id, actor, position);
CREATE INDEX audit_log_org_action ON audit_log (org_id, action, position);
CREATE INDEX audit_log_org_time ON audit_log (org_id, recorded_at);

-- The tamper-evidence seals: a SHA-256 chain per organization over its events in global
-- order, computed once when an event is first projected. Never rebuilt: a rebuild from
-- altered events must not launder the alteration. See docs/adr/0005-audit-hash-chain.md.
CREATE TABLE audit_chain
(
    position  bigint PRIMARY KEY,
    org_id    text NOT NULL,
    prev_hash text NOT NULL,
    hash      text NOT NULL
);

CREATE INDEX audit_chain_org ON audit_chain (org_id, position);

-- Time travel maps an instant to a position; blast radius reads a subtree by path.
CREATE INDEX events_recorded_at ON events (recorded_at);
CREATE INDEX scope_view_path ON scope_view (org_id, path);
