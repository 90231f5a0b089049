-- An organization's own rate limits (issue 18 §4, ADR 0036): JSON, NULL for the server's defaults.
ALTER TABLE scope_view ADD COLUMN rate_limits TEXT;
