-- The event log. Columns up to `metadata` are the ones postgres-es inserts by name;
-- `position` and `recorded_at` are ours, filled by the trigger below.
CREATE TABLE events
(
    aggregate_type text                         NOT NULL,
    aggregate_id   text                         NOT NULL,
    sequence       bigint CHECK (sequence >= 0) NOT NULL,
    event_type     text                         NOT NULL,
    event_version  text                         NOT NULL,
    payload        json                         NOT NULL,
    metadata       json                         NOT NULL,
    position       bigint                       NOT NULL,
    recorded_at    timestamptz                  NOT NULL,
    PRIMARY KEY (aggregate_type, aggregate_id, sequence)
);

CREATE UNIQUE INDEX events_position ON events (position);

CREATE SEQUENCE events_position_seq AS bigint;

-- A sequence alone is not commit-ordered: a transaction can take position 10, commit after
-- the one holding 11, and a reader that already passed 11 would skip 10 forever. Taking a
-- transaction-scoped advisory lock before nextval() serialises appenders until commit, so
-- positions become visible in increasing order. Positions may have gaps (rolled back
-- inserts); they never appear out of order. See docs/adr/0002-global-position.md.
CREATE FUNCTION ekm_events_assign_position() RETURNS trigger
    LANGUAGE plpgsql AS
$$
BEGIN
    PERFORM pg_advisory_xact_lock(7431000001);
    NEW.position := nextval('events_position_seq');
    NEW.recorded_at := clock_timestamp();
    RETURN NEW;
END;
$$;

CREATE TRIGGER events_assign_position
    BEFORE INSERT ON events
    FOR EACH ROW EXECUTE FUNCTION ekm_events_assign_position();

CREATE FUNCTION ekm_events_immutable() RETURNS trigger
    LANGUAGE plpgsql AS
$$
BEGIN
    RAISE EXCEPTION 'events are immutable';
END;
$$;

CREATE TRIGGER events_no_update_or_delete
    BEFORE UPDATE OR DELETE ON events
    FOR EACH ROW EXECUTE FUNCTION ekm_events_immutable();

-- Tell other instances that events were committed (delivered at commit, in commit order).
CREATE FUNCTION ekm_events_notify() RETURNS trigger
    LANGUAGE plpgsql AS
$$
BEGIN
    PERFORM pg_notify('ekm_events', '');
    RETURN NULL;
END;
$$;

CREATE TRIGGER events_notify
    AFTER INSERT ON events
    FOR EACH STATEMENT EXECUTE FUNCTION ekm_events_notify();
