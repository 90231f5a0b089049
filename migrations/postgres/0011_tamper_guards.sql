-- Tamper guards (docs/adr/0024-tamper-evidence-without-trusting-the-database.md).
--
-- TRUNCATE fires no row trigger, so `events_no_update_or_delete` let `TRUNCATE events,
-- audit_chain` empty the history, and verification then found nothing to check. Statement
-- triggers refuse it on both append-only tables.
CREATE FUNCTION ekm_append_only_no_truncate() RETURNS trigger
    LANGUAGE plpgsql AS
$$
BEGIN
    RAISE EXCEPTION '% is append-only: TRUNCATE is refused', TG_TABLE_NAME;
END;
$$;

CREATE TRIGGER events_no_truncate
    BEFORE TRUNCATE ON events
    FOR EACH STATEMENT EXECUTE FUNCTION ekm_append_only_no_truncate();

CREATE TRIGGER audit_chain_no_truncate
    BEFORE TRUNCATE ON audit_chain
    FOR EACH STATEMENT EXECUTE FUNCTION ekm_append_only_no_truncate();
