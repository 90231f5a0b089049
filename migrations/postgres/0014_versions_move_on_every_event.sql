-- Every event of a scope now moves its row's version (the ETag If-Match compares with the
-- aggregate's sequence), grants, tokens and re-key steps included: bring the rows of
-- earlier releases there.
UPDATE scope_view v
   SET version = e.sequence, updated_position = e.position
  FROM (SELECT aggregate_id, MAX(sequence) AS sequence, MAX(position) AS position
          FROM events WHERE aggregate_type = 'scope' GROUP BY aggregate_id) e
 WHERE v.id = e.aggregate_id AND v.version < e.sequence;
