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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrations_create_the_same_tables_on_both_backends() {
    let sqlite = migrated_tables(Backend::Sqlite).await;
    let postgres = migrated_tables(Backend::Postgres).await;
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
