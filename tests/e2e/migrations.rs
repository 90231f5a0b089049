//! Migrations apply to an empty database, twice without harm, and give both backends the
//! same tables.

use ekm_store::Db;

use crate::harness::{Backend, TestDb};

async fn tables(db: &Db) -> Vec<String> {
    let mut names: Vec<String> = match db {
        Db::Sqlite(db) => sqlx::query_scalar(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'",
        )
        .fetch_all(&db.read)
        .await
        .unwrap(),
        Db::Postgres(db) => {
            sqlx::query_scalar("SELECT tablename::text FROM pg_tables WHERE schemaname = 'public'")
                .fetch_all(&db.pool)
                .await
                .unwrap()
        }
    };
    names.sort();
    names
}

async fn migrated_tables(backend: Backend) -> Vec<String> {
    let test_db = TestDb::new(backend).await;
    let db = Db::connect(&test_db.config).await.unwrap();
    assert!(tables(&db).await.is_empty(), "the database starts empty");
    db.migrate().await.unwrap();
    let first = tables(&db).await;
    db.migrate().await.unwrap();
    assert_eq!(tables(&db).await, first, "a second run changes nothing");
    db.close().await;
    first
}

/// One column: table, name, type class, whether it may be null, its place in the primary
/// key (0 when not part of it).
type Column = (String, String, String, bool, i64);

/// The type classes both backends share: what a value of the column is, whatever the
/// backend spells it.
fn type_class(declared: &str) -> String {
    let declared = declared.to_lowercase();
    let class = match declared.as_str() {
        "text" | "character varying" | "varchar" => "text",
        "integer" | "bigint" | "int8" | "int4" | "smallint" => "integer",
        "json" | "jsonb" => "json",
        "bytea" | "blob" => "bytes",
        "boolean" => "boolean",
        _ => declared.as_str(),
    };
    class.to_owned()
}

async fn columns(db: &Db) -> Vec<Column> {
    let mut columns: Vec<Column> = match db {
        Db::Sqlite(db) => {
            let rows: Vec<(String, String, String, bool, i64)> = sqlx::query_as(
                "SELECT m.name, c.name, c.type, c.\"notnull\" = 0 AND c.pk = 0, c.pk \
                 FROM sqlite_master m, pragma_table_xinfo(m.name) c \
                 WHERE m.type = 'table' AND m.name NOT LIKE 'sqlite_%' AND c.hidden <> 1",
            )
            .fetch_all(&db.read)
            .await
            .unwrap();
            rows
        }
        Db::Postgres(db) => sqlx::query_as(
            "SELECT c.table_name::text, c.column_name::text, c.data_type::text, \
                    c.is_nullable = 'YES', \
                    COALESCE((SELECT k.ordinal_position::int8 FROM information_schema.key_column_usage k \
                              JOIN information_schema.table_constraints t \
                                ON t.constraint_name = k.constraint_name AND t.table_name = k.table_name \
                              WHERE t.constraint_type = 'PRIMARY KEY' AND k.table_schema = 'public' \
                                AND k.table_name = c.table_name AND k.column_name = c.column_name), 0) \
             FROM information_schema.columns c WHERE c.table_schema = 'public'",
        )
        .fetch_all(&db.pool)
        .await
        .unwrap(),
    };
    for column in &mut columns {
        column.2 = type_class(&column.2);
    }
    columns.sort();
    columns
}

async fn migrated_columns(backend: Backend) -> Vec<Column> {
    let test_db = TestDb::new(backend).await;
    let db = Db::connect(&test_db.config).await.unwrap();
    db.migrate().await.unwrap();
    let columns = columns(&db).await;
    db.close().await;
    columns
}

/// The access log and its monthly partitions: on SQLite it lives in `access.db`, beside the
/// migrated database (ADR 0026); `access_log::both_backends_keep_the_same_access_log_columns`
/// compares the two.
fn is_access_log(table: &str) -> bool {
    table == "access_log" || table.starts_with("access_log_")
}

/// Where the backends differ on purpose, on SQLite's side: (table, column, type class,
/// nullable) as SQLite has it, and why.
const SQLITE_BY_DESIGN: [(&str, &str, &str, bool, &str); 4] = [
    (
        "events",
        "payload",
        "text",
        false,
        "SQLite has no JSON type",
    ),
    (
        "events",
        "metadata",
        "text",
        false,
        "SQLite has no JSON type",
    ),
    (
        "events",
        "position",
        "integer",
        true,
        "filled by an AFTER INSERT trigger (SQLite triggers cannot set NEW)",
    ),
    (
        "events",
        "recorded_at",
        "text",
        true,
        "filled by the same trigger; SQLite has no timestamp type",
    ),
];

/// Both backends give every table the same columns: names, type classes, nullability and
/// primary keys, but for the differences listed (and sqlx's own bookkeeping table).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_creates_the_same_columns_when_run_on_both_backends() {
    let keep = |columns: Vec<Column>| -> Vec<Column> {
        columns
            .into_iter()
            .filter(|c| c.0 != "_sqlx_migrations" && !is_access_log(&c.0))
            .collect()
    };
    let mut sqlite = keep(migrated_columns(Backend::Sqlite).await);
    let postgres = keep(migrated_columns(Backend::Postgres).await);
    for (table, column, class, nullable, _why) in SQLITE_BY_DESIGN {
        let ours = sqlite
            .iter_mut()
            .find(|c| c.0 == table && c.1 == column)
            .unwrap_or_else(|| panic!("{table}.{column} is gone: update SQLITE_BY_DESIGN"));
        assert_eq!(
            (ours.2.as_str(), ours.3),
            (class, nullable),
            "{table}.{column} changed: update SQLITE_BY_DESIGN"
        );
        let theirs = postgres
            .iter()
            .find(|c| c.0 == table && c.1 == column)
            .unwrap_or_else(|| panic!("PostgreSQL has no {table}.{column}"));
        assert_ne!(
            (&ours.2, ours.3),
            (&theirs.2, theirs.3),
            "{table}.{column} no longer differs: remove it from SQLITE_BY_DESIGN"
        );
        ours.2.clone_from(&theirs.2);
        ours.3 = theirs.3;
    }
    assert!(sqlite.len() > 50, "{} columns", sqlite.len());
    let only_sqlite: Vec<&Column> = sqlite.iter().filter(|c| !postgres.contains(c)).collect();
    let only_postgres: Vec<&Column> = postgres.iter().filter(|c| !sqlite.contains(c)).collect();
    assert!(
        only_sqlite.is_empty() && only_postgres.is_empty(),
        "columns differ\nSQLite only: {only_sqlite:#?}\nPostgreSQL only: {only_postgres:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_creates_the_same_tables_when_run_on_both_backends() {
    let sqlite = migrated_tables(Backend::Sqlite).await;
    let mut postgres = migrated_tables(Backend::Postgres).await;
    postgres.retain(|t| !is_access_log(t));
    for table in [
        "events",
        "projection_checkpoints",
        "scope_view",
        "key_version_view",
        "tokens",
        "_sqlx_migrations",
    ] {
        assert!(sqlite.contains(&table.to_owned()), "sqlite lacks {table}");
    }
    assert_eq!(sqlite, postgres);
}

/// Migration 0014: rows written by a release in which grants, tokens and re-key steps did
/// not move a scope's version are brought to the aggregate's sequence, so the ETag a client
/// reads after the upgrade is the one If-Match accepts.
async fn migration_0014_brings_versions_to_the_aggregates_sequence_when_rows_lag(backend: Backend) {
    let app = crate::harness::TestApp::spawn(backend).await;
    let (org, admin) = app.org("enterprise").await;
    app.grant(&admin, &org, "alice", "data:use", None).await;
    app.app.refresh().await.unwrap();
    // As an older release left it: created (1), then a grant that did not move the row.
    crate::audit::exec(
        &app.db,
        &format!("UPDATE scope_view SET version = 1 WHERE id = '{org}'"),
    )
    .await;
    let migration = if app.db.is_postgres() {
        include_str!("../../migrations/postgres/0014_versions_move_on_every_event.sql")
    } else {
        include_str!("../../migrations/sqlite/0014_versions_move_on_every_event.sql")
    };
    crate::audit::exec(&app.db, migration).await;
    let version: i64 = ekm_store::with_write_pool!(&app.db, pool => {
        sqlx::query_scalar(&format!("SELECT version FROM scope_view WHERE id = '{org}'"))
            .fetch_one(pool)
            .await
            .unwrap()
    });
    assert_eq!(version, 2, "created, then granted");
    app.stop().await;
}
crate::on_both_backends!(migration_0014_brings_versions_to_the_aggregates_sequence_when_rows_lag);
