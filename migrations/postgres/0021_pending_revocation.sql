-- Pending revocation (issue 17 §1): while a scope's own state is `pending_revocation`, the
-- instant its revoke falls due (RFC 3339, as the event recorded it); and an organization's
-- default waiting period for a revoke (ISO 8601; NULL: the built-in P7D).
ALTER TABLE scope_view ADD COLUMN revoke_due_at TEXT;
ALTER TABLE scope_view ADD COLUMN revoke_window TEXT;
