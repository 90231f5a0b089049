-- The data plane's access log (issue 16 §1, docs/adr/0026-access-log.md): one record per
-- encrypt, decrypt, datakey and rewrap, allowed or refused. Partitioned by month on `at`, so
-- that retention drops whole partitions instead of deleting rows.

CREATE SEQUENCE access_log_id_seq AS bigint;

CREATE TABLE access_log (
    id bigint NOT NULL DEFAULT nextval('access_log_id_seq'),
    at timestamptz NOT NULL,
    org_id text NOT NULL,
    scope_id text NOT NULL,
    scope_path text NOT NULL,
    principal text NOT NULL,
    token_id text NOT NULL,
    operation text NOT NULL,
    class text,
    key_version bigint,
    outcome text NOT NULL,
    request_id text NOT NULL,
    source_address text,
    justification text,
    -- The record's place in its writer's chain and its seal (ADR 0026).
    stream text NOT NULL,
    seq bigint NOT NULL,
    seal text NOT NULL
) PARTITION BY RANGE (at);

ALTER SEQUENCE access_log_id_seq OWNED BY access_log.id;

CREATE INDEX access_log_org ON access_log (org_id, id);
CREATE INDEX access_log_path ON access_log (org_id, scope_path, id);
CREATE INDEX access_log_time ON access_log (org_id, at);

-- Records outside every monthly partition (a clock far off) still land somewhere.
CREATE TABLE access_log_default PARTITION OF access_log DEFAULT;

-- A subtree is a range of paths. With the default statistics the planner misjudged a
-- team's share of 10M records by 26 times and sorted all of its records for one page
-- (85 ms); with these it pages through the organization in id order (4 ms). BENCHMARKS.md,
-- "The access log's cost". Partitions made later get the same (`access_log_maintain`).
ALTER TABLE access_log ALTER COLUMN scope_path SET STATISTICS 2000;

-- Append-only: a row trigger on the partitioned table is cloned to every partition, those
-- created later included.
CREATE FUNCTION access_log_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'ekm: the access log is append-only';
END $$;
CREATE TRIGGER access_log_no_update_or_delete
    BEFORE UPDATE OR DELETE ON access_log
    FOR EACH ROW EXECUTE FUNCTION access_log_append_only();
-- Row triggers do not fire on TRUNCATE (migration 0011 guards the event log likewise). A
-- TRUNCATE trigger on the partitioned table does not fire for a partition truncated by
-- name, so each partition gets its own (`access_log_maintain` adds it to those it creates).
CREATE TRIGGER access_log_no_truncate
    BEFORE TRUNCATE ON access_log
    FOR EACH STATEMENT EXECUTE FUNCTION access_log_append_only();
CREATE TRIGGER access_log_no_truncate
    BEFORE TRUNCATE ON access_log_default
    FOR EACH STATEMENT EXECUTE FUNCTION access_log_append_only();

-- Creates this month's and the next two months' partitions, and drops the monthly partitions
-- whose every record is older than `keep_days` days (never fewer than 30). It runs as its
-- owner (the schema's owner), so the server's role, which has no DDL rights, can run it; the
-- floor keeps a leaked server credential from emptying the log through it. Returns how many
-- partitions it dropped.
--
-- Safe against the caller's session: its own search path (pg_temp last, every name written
-- with its schema), time zone and date style. Creating or dropping a partition locks the log
-- against inserts for a moment: each waits at most 2 s for the lock (a long query on the log
-- holds it off until the next hour, without undoing the rest of the run) rather than hold
-- every insert behind it for long.
CREATE FUNCTION access_log_maintain(keep_days integer) RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET TimeZone = 'UTC'
SET DateStyle = 'ISO'
SET lock_timeout = '2s'
AS $$
DECLARE
    this_month timestamp := date_trunc('month', now() AT TIME ZONE 'UTC');
    first timestamp;
    name text;
    dropped integer := 0;
    part record;
BEGIN
    IF keep_days IS NULL OR keep_days < 30 THEN
        RAISE EXCEPTION 'ekm: the access log keeps at least 30 days';
    END IF;
    FOR i IN 0..2 LOOP
        first := this_month + make_interval(months => i);
        name := 'access_log_' || to_char(first, 'YYYY_MM');
        IF to_regclass(format('public.%I', name)) IS NULL THEN
            BEGIN
                EXECUTE format(
                    'CREATE TABLE public.%I PARTITION OF public.access_log '
                    'FOR VALUES FROM (%L) TO (%L)',
                    name, to_char(first, 'YYYY-MM-DD HH24:MI:SS') || '+00',
                    to_char(first + interval '1 month', 'YYYY-MM-DD HH24:MI:SS') || '+00');
                EXECUTE format(
                    'CREATE TRIGGER access_log_no_truncate BEFORE TRUNCATE ON public.%I '
                    'FOR EACH STATEMENT EXECUTE FUNCTION public.access_log_append_only()',
                    name);
                EXECUTE format(
                    'ALTER TABLE public.%I ALTER COLUMN scope_path SET STATISTICS 2000', name);
            EXCEPTION
                WHEN duplicate_table OR duplicate_object OR check_violation THEN
                    -- Another instance made it first, or the default partition holds
                    -- records of that month (they stay there, and are kept).
                    NULL;
                WHEN lock_not_available THEN
                    -- A long query holds the log: the next run (an hour on) tries again,
                    -- and what this run did stays done.
                    RAISE WARNING 'ekm: access log partition % not created: the log is busy', name;
            END;
        END IF;
    END LOOP;
    FOR part IN
        SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
        WHERE i.inhparent = 'public.access_log'::regclass
          AND c.relname ~ '^access_log_[0-9]{4}_[0-9]{2}$'
    LOOP
        first := to_date(substr(part.relname, 12), 'YYYY_MM')::timestamp;
        IF ((first + interval '1 month') AT TIME ZONE 'UTC')
                < now() - make_interval(days => keep_days) THEN
            BEGIN
                EXECUTE format('DROP TABLE public.%I', part.relname);
                dropped := dropped + 1;
            EXCEPTION
                WHEN undefined_table THEN
                    -- Another instance dropped it first.
                    NULL;
                WHEN lock_not_available THEN
                    RAISE WARNING 'ekm: access log partition % not dropped: the log is busy',
                        part.relname;
            END;
        END IF;
    END LOOP;
    RETURN dropped;
END $$;
REVOKE ALL ON FUNCTION access_log_maintain(integer) FROM PUBLIC;

SELECT access_log_maintain(400);
