-- The event log. Columns up to `metadata` are the ones sqlite-es inserts by name; `position`
-- and `recorded_at` are ours, filled by the trigger below. SQLite has a single writer, so
-- insertion order is commit order and MAX(position) + 1 follows it.
CREATE TABLE events
(
    aggregate_type text                          NOT NULL,
    aggregate_id   text                          NOT NULL,
    sequence       integer CHECK (sequence >= 0) NOT NULL,
    event_type     text                          NOT NULL,
    event_version  text                          NOT NULL,
    payload        text                          NOT NULL,
    metadata       text                          NOT NULL,
    position       integer,
    recorded_at    text,
    PRIMARY KEY (aggregate_type, aggregate_id, sequence)
) STRICT;

CREATE UNIQUE INDEX events_position ON events (position);

CREATE TRIGGER events_assign_position AFTER INSERT ON events
BEGIN
    UPDATE events
       SET position    = (SELECT IFNULL(MAX(position), 0) + 1 FROM events),
           recorded_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now')
     WHERE rowid = NEW.rowid;
END;

-- Events are immutable: once positioned, a row can be neither changed nor deleted through
-- SQL that respects the schema. (Tamper evidence for the rest is the audit hash chain.)
CREATE TRIGGER events_no_update BEFORE UPDATE ON events
WHEN OLD.position IS NOT NULL
BEGIN
    SELECT RAISE(ABORT, 'events are immutable');
END;

CREATE TRIGGER events_no_delete BEFORE DELETE ON events
BEGIN
    SELECT RAISE(ABORT, 'events are immutable');
END;
