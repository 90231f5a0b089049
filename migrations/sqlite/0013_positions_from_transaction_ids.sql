-- Nothing changes on SQLite: its single writer makes insertion order the commit order.
-- (PostgreSQL's positions now come from transaction ids; see the migration of the same
-- number there.) Kept so both backends carry the same migration numbers.
SELECT 1;
