-- Positions without a database-wide lock (docs/adr/0020-one-commit-per-command.md).
--
-- Until now every append took `pg_advisory_xact_lock` before `nextval()` and held it until
-- commit, so that positions became visible in increasing order: appends were serialised
-- and commits could not share WAL flushes. Now an event's position is derived from its
-- transaction's id: `xid * 8192 + n` for the n-th event of the transaction. Transaction ids
-- are handed out in increasing order, so a reader that only passes positions below the
-- oldest transaction that may still be writing (the fence, `ekm_events_fence()`) never
-- skips an event that commits late. Positions may have gaps; they never appear out of order.
--
-- Two rules make the order per scope hold too: the events are the first write of their
-- transaction (its id is taken after the aggregate was loaded, so after every earlier
-- event of that scope committed), and a transaction appends at most 8192 events.

CREATE OR REPLACE FUNCTION ekm_events_assign_position() RETURNS trigger
    LANGUAGE plpgsql AS
$$
DECLARE
    n bigint := COALESCE(NULLIF(current_setting('ekm.events_in_transaction', true), ''), '0')::bigint;
BEGIN
    IF n = 0 AND pg_current_xact_id_if_assigned() IS NOT NULL THEN
        RAISE EXCEPTION 'ekm: events must be the first write of their transaction';
    END IF;
    IF n >= 8192 THEN
        RAISE EXCEPTION 'ekm: at most 8192 events per transaction';
    END IF;
    NEW.position := (pg_current_xact_id()::text::bigint << 13) + n;
    PERFORM set_config('ekm.events_in_transaction', (n + 1)::text, true);
    NEW.recorded_at := clock_timestamp();
    RETURN NEW;
END;
$$;

-- The position below which every event is final: the oldest transaction of this database
-- that may still be writing, times 8192. Transactions seen running in *another* database
-- are passed over (a transaction never writes two databases), so a long transaction
-- elsewhere in the cluster does not hold readers back; any transaction that cannot be
-- placed (it ended meanwhile, or its session's details are hidden) counts as ours.
CREATE FUNCTION ekm_events_fence() RETURNS bigint
    LANGUAGE plpgsql STABLE AS
$$
DECLARE
    snapshot pg_snapshot := pg_current_snapshot();
    oldest   xid8;
BEGIN
    -- Nothing running: everything below the snapshot's horizon is final. (The common case
    -- costs no look at the backends.)
    IF NOT EXISTS (SELECT 1 FROM pg_snapshot_xip(snapshot)) THEN
        RETURN pg_snapshot_xmax(snapshot)::text::bigint << 13;
    END IF;
    SELECT min(x) INTO oldest
      FROM pg_snapshot_xip(snapshot) AS x
     WHERE NOT EXISTS (SELECT 1
                         FROM pg_stat_get_activity(NULL) AS a
                        WHERE a.backend_xid = xid(x)
                          AND a.datid <> (SELECT oid FROM pg_database WHERE datname = current_database()));
    RETURN COALESCE(oldest, pg_snapshot_xmax(snapshot))::text::bigint << 13;
END;
$$;

-- Positions so far came from the sequence; every new one must lie above them.
DO
$$
BEGIN
    IF (SELECT COALESCE(MAX(position), 0) FROM events) >= (pg_current_xact_id()::text::bigint << 13) THEN
        RAISE EXCEPTION 'ekm: stored positions reach beyond the transaction-id positions';
    END IF;
END;
$$;

-- NOTIFY inside the append transaction takes the notification queue's global lock at
-- commit, which serialises commits again: the committing instance notifies after commit,
-- coalesced (ekm_store::Db::notify_committed).
DROP TRIGGER events_notify ON events;
DROP FUNCTION ekm_events_notify();
DROP SEQUENCE events_position_seq;
