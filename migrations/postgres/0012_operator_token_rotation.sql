-- The operator token can be rotated (`ekm operator-token rotate`): the old row is kept,
-- revoked, so that the audit log still tells which token acted. One *live* operator token
-- at a time; two instances starting at once still cannot both create one.
DROP INDEX tokens_one_operator;
CREATE UNIQUE INDEX tokens_one_live_operator ON tokens (role)
    WHERE role = 'operator' AND revoked_at IS NULL;
