-- A scope's own key rotation period (issue 17 §2; ISO 8601; NULL: inherited, or none).
ALTER TABLE scope_view ADD COLUMN rotation_period TEXT;
