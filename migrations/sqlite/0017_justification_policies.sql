-- A scope's own access-justification policy (issue 16 §2, ADR 0027), as canonical JSON
-- {"required": bool, "allowed": [codes]}; NULL when it has none. Policies along a path only
-- tighten; the effective policy is computed from the rows on the path, as the cascade is.
ALTER TABLE scope_view ADD COLUMN justification_policy TEXT;
