-- The audit log is the event log (docs/adr/0011-audit-log-is-the-event-log.md): every
-- audit entry is one scope event, so instead of copying each event into a projected
-- `audit_log` table, the events table gets the columns the audit filters need, computed by
-- the database from the event itself (virtual: stored only in the indexes), and indexed.

-- Where the event happened: creation events carry it in their payload (which wins, it is what
-- the aggregate stored); every other event in its metadata.
ALTER TABLE events ADD COLUMN audit_org text GENERATED ALWAYS AS (
    CASE
        WHEN aggregate_type <> 'scope' THEN NULL
        WHEN event_type = 'OrganizationCreated' THEN json_extract(payload, '$.OrganizationCreated.org_id')
        WHEN event_type = 'ScopeCreated' THEN json_extract(payload, '$.ScopeCreated.org_id')
        ELSE COALESCE(json_extract(metadata, '$.org_id'), '')
    END) VIRTUAL;
ALTER TABLE events ADD COLUMN audit_path text GENERATED ALWAYS AS (
    CASE
        WHEN aggregate_type <> 'scope' THEN NULL
        ELSE COALESCE(json_extract(metadata, '$.scope_path'), aggregate_id)
    END) VIRTUAL;
ALTER TABLE events ADD COLUMN audit_actor text GENERATED ALWAYS AS (
    CASE
        WHEN aggregate_type <> 'scope' THEN NULL
        ELSE COALESCE(json_extract(metadata, '$.actor_kind'), 'system') || ':' || COALESCE(json_extract(metadata, '$.actor_id'), '')
    END) VIRTUAL;

CREATE INDEX events_audit_org ON events (audit_org, position);
CREATE INDEX events_audit_path ON events (audit_org, audit_path, position);
CREATE INDEX events_audit_actor ON events (audit_org, audit_actor, position);
CREATE INDEX events_audit_type ON events (audit_org, event_type, position);
CREATE INDEX events_audit_time ON events (audit_org, recorded_at);

DROP TABLE audit_log;
DELETE FROM projection_checkpoints WHERE name = 'audit_log';
DELETE FROM projection_state WHERE projection = 'audit_log';
