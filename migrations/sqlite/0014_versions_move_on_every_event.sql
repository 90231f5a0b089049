-- Every event of a scope now moves its row's version (the ETag If-Match compares with the
-- aggregate's sequence), grants, tokens and re-key steps included: bring the rows of
-- earlier releases there.
UPDATE scope_view
   SET version = (SELECT MAX(sequence) FROM events
                   WHERE aggregate_type = 'scope' AND aggregate_id = scope_view.id),
       updated_position = (SELECT MAX(position) FROM events
                            WHERE aggregate_type = 'scope' AND aggregate_id = scope_view.id)
 WHERE version < (SELECT MAX(sequence) FROM events
                   WHERE aggregate_type = 'scope' AND aggregate_id = scope_view.id);
