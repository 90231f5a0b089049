-- Grants that expire (issue 17 §2): the instant in microseconds since the epoch (UTC), NULL
-- for a grant that does not. A grant stops counting at that instant, whether or not the
-- scheduler has recorded its removal yet.
ALTER TABLE grants_view ADD COLUMN expires_at BIGINT;
-- What a scheduled action is about, within its scope and kind: '' for a scope's own resume;
-- the grant, as canonical JSON, for a grant's expiry (several per organization).
ALTER TABLE schedule ADD COLUMN subject TEXT NOT NULL DEFAULT '';
-- The organization's listing pages by (due_at, scope_id, kind, subject).
DROP INDEX schedule_org;
CREATE INDEX schedule_org ON schedule (org_id, due_at, scope_id, kind, subject);
