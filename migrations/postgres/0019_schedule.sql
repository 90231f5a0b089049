-- What the scheduler fires (issue 17 §2): one row per scope and kind of scheduled action,
-- kept by the scope_tree projection from the events (so a rebuild reproduces it). `at` is
-- the instant as the event recorded it (the scheduler fires with it), `due_at` the same in
-- microseconds since the epoch (UTC) for ordering.
CREATE TABLE schedule (
    scope_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    org_id TEXT NOT NULL,
    due_at BIGINT NOT NULL,
    at TEXT NOT NULL,
    scheduled_position BIGINT NOT NULL,
    PRIMARY KEY (scope_id, kind, scheduled_position)
);
CREATE INDEX schedule_due ON schedule (due_at);
CREATE INDEX schedule_org ON schedule (org_id, due_at, scope_id);
