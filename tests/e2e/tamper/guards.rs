//! The guards an attacker with SQL access meets first, and the upgrade from unkeyed seals.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncate_is_refused_when_postgres_history_would_be_emptied() {
    let app = TestApp::spawn(Backend::Postgres).await;
    let (org, admin) = app.org("enterprise").await;
    app.scope(&admin, "team", "research", &org).await;
    app.app.refresh().await.unwrap(); // sealed by the runner, which follows the answers
    let events = count(&app.db, "SELECT COUNT(*) FROM events").await;
    let seals = count(&app.db, "SELECT COUNT(*) FROM audit_chain").await;
    assert!(events >= 2 && seals >= 2);

    for sql in [
        "TRUNCATE events, audit_chain",
        "TRUNCATE events",
        "TRUNCATE audit_chain",
    ] {
        let refused = try_exec(&app.db, sql).await.unwrap_err();
        assert!(refused.contains("append-only"), "{sql}: {refused}");
    }
    assert_eq!(count(&app.db, "SELECT COUNT(*) FROM events").await, events);
    assert_eq!(
        count(&app.db, "SELECT COUNT(*) FROM audit_chain").await,
        seals
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn insert_or_replace_is_refused_when_the_sqlite_event_exists() {
    let app = TestApp::spawn(Backend::Sqlite).await;
    let (org, admin) = app.org("enterprise").await;
    let team = app.scope(&admin, "team", "research", &org).await;
    let before = app.db.events_of(&team).await.unwrap();
    let created = &before[0];

    // The same key, a forged payload: REPLACE would delete the event without firing the
    // delete trigger (recursive_triggers is off in an ordinary session).
    let replace = format!(
        "INSERT OR REPLACE INTO events (aggregate_type, aggregate_id, sequence, event_type, \
         event_version, payload, metadata) VALUES ('scope', '{team}', {}, '{}', '{}', \
         '{}', '{}')",
        created.sequence,
        created.event_type,
        created.event_version,
        created.payload.replace("research", "harmless"),
        created.metadata,
    );
    let refused = try_exec(&app.db, &replace).await.unwrap_err();
    assert!(refused.contains("event already exists"), "{refused}");

    // A new key that names the position of an existing event: REPLACE through the unique
    // index on position would delete that event.
    let by_position = format!(
        "INSERT OR REPLACE INTO events (aggregate_type, aggregate_id, sequence, event_type, \
         event_version, payload, metadata, position) VALUES ('scope', '{team}', 99, '{}', \
         '{}', '{}', '{}', {})",
        created.event_type,
        created.event_version,
        created.payload,
        created.metadata,
        created.position,
    );
    let refused = try_exec(&app.db, &by_position).await.unwrap_err();
    assert!(refused.contains("positions are assigned"), "{refused}");

    assert_eq!(app.db.events_of(&team).await.unwrap(), before);
    let report = app
        .get(&format!("/v1/audit/verify?org={org}"), &admin)
        .await;
    assert_eq!(report.body["ok"], true, "{}", report.body);
    app.stop().await;
}

/// The guard runs before SQLite's primary key check, so a plain append that loses the race
/// for a sequence number meets it: that must still be the retryable conflict, not an error.
async fn append_conflict_stays_retryable_when_the_guards_are_installed(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let (org, admin) = app.org("enterprise").await;
    let team = app.scope(&admin, "team", "research", &org).await;
    let version: i64 = app.get(&format!("/v1/scopes/{team}"), &admin).await.body["version"]
        .as_i64()
        .unwrap();
    let paused = [ekm_domain::ScopeEvent::ScopePaused {}];
    let none = ekm_store::KeyWrites::default();
    let meta = Default::default();
    let first = app.db.append(&team, version, &paused, &meta, &none).await;
    assert!(
        matches!(first, Ok(ekm_store::Appended::Committed { .. })),
        "{first:?}"
    );
    let lost = app.db.append(&team, version, &paused, &meta, &none).await;
    assert!(
        matches!(lost, Ok(ekm_store::Appended::Conflict)),
        "{lost:?}"
    );
    app.stop().await;
}
on_both_backends!(append_conflict_stays_retryable_when_the_guards_are_installed);

// ---------------------------------------------------------------------------------------
// Upgrading a database sealed by the previous release.

async fn upgrade_keeps_unkeyed_seals_aside_when_not_asked_to_reseal(backend: Backend) {
    let test_db = crate::harness::TestDb::new(backend).await;
    let db = Db::connect(&test_db.config).await.unwrap();
    // The migrations of the previous release: those before 0011.
    let folder = match backend {
        Backend::Sqlite => "sqlite",
        Backend::Postgres => "postgres",
    };
    let previous = tempfile::tempdir().unwrap();
    let source = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("migrations")
        .join(folder);
    for entry in std::fs::read_dir(&source).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        if name.as_str() < "0011" {
            std::fs::copy(&path, previous.path().join(&name)).unwrap();
        }
    }
    let migrator = sqlx::migrate::Migrator::new(previous.path()).await.unwrap();
    ekm_store::with_write_pool!(&db, pool => migrator.run(pool).await.unwrap());
    // A history the previous release sealed (unkeyed) and projected.
    exec(
        &db,
        "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, \
         payload, metadata) VALUES ('scope', 'org', 1, 'OrganizationCreated', '1', '{}', '{}'); \
         INSERT INTO audit_chain (position, org_id, prev_hash, hash) VALUES (1, 'org', 'genesis', 'unkeyed'); \
         INSERT INTO projection_checkpoints (name, position, updated_at) VALUES \
         ('scope_tree', 1, 0), ('audit_chain', 1, 0), ('key_shredder', 1, 0); \
         INSERT INTO projection_state (projection, key, value) VALUES ('audit_chain', 'org', 'unkeyed')",
    )
    .await;

    db.migrate().await.unwrap();
    assert_eq!(
        count(
            &db,
            "SELECT COUNT(*) FROM audit_chain_unkeyed WHERE hash = 'unkeyed'"
        )
        .await,
        1,
        "the old seals are kept as they were"
    );
    assert_eq!(count(&db, "SELECT COUNT(*) FROM audit_chain").await, 0);
    assert_eq!(
        count(
            &db,
            "SELECT position FROM projection_checkpoints WHERE name = 'audit_chain'"
        )
        .await,
        0
    );
    // Sealing the existing history again is the operator's decision, not a start's.
    let refused = ekm_projections::refuse_resealing(&db).await.unwrap_err();
    assert!(
        matches!(
            refused,
            ekm_projections::ProjectionError::ResealRefused {
                checkpoint: 0,
                expected: 1
            }
        ),
        "{refused:?}"
    );
    db.close().await;
}
on_both_backends!(upgrade_keeps_unkeyed_seals_aside_when_not_asked_to_reseal);

/// Instances on one PostgreSQL database (or a restored SQLite file) must share `audit.key`:
/// one with a key of its own would seal entries nobody can verify.
async fn serve_refuses_another_audit_key_when_the_database_is_sealed(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let (org, _) = app.org("enterprise").await;
    let other = app.data_dir().join("other-audit.key");
    let command = app.ekm(&[
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--audit-key-file",
        other.to_str().unwrap(),
    ]);
    let refused = exits_within(command, std::time::Duration::from_secs(60));
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("same audit.key"), "{stderr}");

    // An auditor with that key is told so, rather than shown every entry as altered.
    let output = app
        .ekm(&[
            "audit",
            "verify",
            "--org",
            &org,
            "--audit-key-file",
            other.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("same audit.key"), "{stderr}");
    app.stop().await;
}
on_both_backends!(serve_refuses_another_audit_key_when_the_database_is_sealed);

/// PostgreSQL, the read models committed without a flush of their own (ADR 0020): the
/// running server still refuses to seal again a history whose seals were reset, even when
/// no command committed after its runner applied the last events (so no synchronous commit
/// has confirmed them flushed). The server has not stopped since, so nothing it applied
/// can have been lost: a checkpoint below it was moved back by someone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn catch_up_refuses_to_reseal_when_seals_are_reset_and_nothing_confirmed_them_flushed() {
    let app = TestApp::spawn(Backend::Postgres).await;
    let (_org, _admin) = app.org("enterprise").await;
    // The runner applies and seals the creation after it was answered; no command follows.
    app.app.refresh().await.unwrap();
    crate::audit::exec(
        &app.db,
        "DELETE FROM audit_chain; DELETE FROM projection_state WHERE projection = 'audit_chain'; \
         UPDATE projection_checkpoints SET position = 0 WHERE name = 'audit_chain'",
    )
    .await;
    let running = app.app.projector().catch_up().await.unwrap_err();
    assert!(
        matches!(
            running,
            ekm_projections::ProjectionError::ResealRefused { .. }
        ),
        "{running:?}"
    );
    app.stop().await;
}
