-- Running EKM on PostgreSQL with two roles (docs/adr/0019-postgres-roles.md):
--   owner: owns the schema; runs `ekm migrate` and `ekm projections rebuild`.
--   app:   runs `ekm serve --no-migrate`; may INSERT and SELECT the event log and the audit
--          seals, never UPDATE, DELETE or TRUNCATE them, and runs no DDL (so it cannot drop
--          the immutability triggers either).
-- A leaked application credential, or SQL injected through the server, then cannot rewrite
-- history; only the owner's credentials can, and the keyed seals still reveal it (ADR 0018).
--
-- Run with psql, naming the roles and the database:
--   psql -v owner=ekm_owner -v app=ekm_app -v database=ekm ...
-- Part 1 as a superuser (or a role with CREATEROLE and CREATEDB), once. Then, as the owner:
--   ekm migrate --database-url postgres://ekm_owner@host/ekm
-- Then part 2 as the owner; again after every `ekm migrate` (it is idempotent). The tests
-- (tests/e2e/postgres_roles.rs) run this file as it is written here.

-- Part 1: roles and database (as a superuser). Give them passwords or certificates as your
-- authentication setup requires (ALTER ROLE ... PASSWORD ...).
CREATE ROLE :"owner" LOGIN;
CREATE ROLE :"app" LOGIN;
CREATE DATABASE :"database" OWNER :"owner";
REVOKE ALL ON DATABASE :"database" FROM PUBLIC;
GRANT CONNECT ON DATABASE :"database" TO :"app";

-- Part 2: privileges (as the owner, connected to the database, after `ekm migrate`).
REVOKE CREATE ON SCHEMA public FROM PUBLIC;
GRANT USAGE ON SCHEMA public TO :"app";
-- Read models, tokens, key material and checkpoints: the server writes them.
GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO :"app";
-- The event log and the seals are append-only for the server.
REVOKE UPDATE, DELETE, TRUNCATE ON events, audit_chain, audit_keys, audit_signing_keys FROM :"app";
-- The access log likewise (its partitions are guarded by a row trigger as well, since the
-- default privileges below reach the monthly partitions `access_log_maintain` creates).
REVOKE UPDATE, DELETE, TRUNCATE ON access_log, access_log_default FROM :"app";
GRANT USAGE ON SEQUENCE access_log_id_seq TO :"app";
-- Creates the coming months' partitions and applies retention (never below 30 days).
GRANT EXECUTE ON FUNCTION access_log_maintain(integer) TO :"app";
-- Read only: the seals made before keyed seals, and the migrations the server checks.
REVOKE INSERT, UPDATE, DELETE, TRUNCATE ON audit_chain_unkeyed, _sqlx_migrations FROM :"app";
-- (Positions come from transaction ids since migration 0013: no sequence to grant.)
-- Tables a rebuild or a later migration creates (as the owner) are the server's read models.
-- A later append-only table needs its own REVOKE line above.
ALTER DEFAULT PRIVILEGES FOR ROLE :"owner" IN SCHEMA public
    GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO :"app";
ALTER DEFAULT PRIVILEGES FOR ROLE :"owner" IN SCHEMA public
    GRANT USAGE ON SEQUENCES TO :"app";
