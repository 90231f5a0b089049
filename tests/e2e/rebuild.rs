//! Read models can always be rebuilt from the log: a rebuild gives exactly the live rows,
//! and a catch-up interrupted at any point (a crash) resumes without losing or repeating.

use std::future::Future;
use std::pin::Pin;
use std::process::Command;
use std::task::{Context, Poll};

use ekm_api::app::Action;
use ekm_api::App;
use ekm_domain::{
    Actor, ActorKind, EventMetadata, Plan, Reason, ScopeId, ScopeKind, ScopeName, Tier,
};
use ekm_projections::{rebuild, Projector, ProjectorConfig};
use ekm_store::Db;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::harness::{Backend, Options, TestApp, TestDb};
use crate::kms_servers::Moto;
use crate::on_both_backends;
use crate::rich_history::{self, rich_history, RichHistory};

/// The tables of every rebuildable read model, as the projections declare them.
pub fn read_model_tables() -> Vec<&'static str> {
    ekm_projections::standard_projections(None)
        .iter()
        .filter(|p| p.rebuildable())
        .flat_map(|p| p.tables().iter().copied())
        .collect()
}

/// Every column of `table`, from the database's own catalog: a column added by a later
/// migration is compared without anyone remembering to list it.
pub async fn columns(db: &Db, table: &str) -> Vec<String> {
    let columns: Vec<String> = match db {
        Db::Sqlite(sqlite) => {
            sqlx::query_scalar("SELECT name FROM pragma_table_info($1) ORDER BY cid")
                .bind(table)
                .fetch_all(&sqlite.read)
                .await
                .unwrap()
        }
        Db::Postgres(pg) => sqlx::query_scalar(
            "SELECT column_name::text FROM information_schema.columns \
             WHERE table_schema = 'public' AND table_name = $1 ORDER BY ordinal_position",
        )
        .bind(table)
        .fetch_all(&pg.pool)
        .await
        .unwrap(),
    };
    assert!(!columns.is_empty(), "no columns found for {table}");
    columns
}

/// Every row of every rebuildable read model, every column, as text, sorted.
pub async fn dump(db: &Db) -> Vec<String> {
    let mut out = vec![];
    for table in read_model_tables() {
        out.extend(dump_table(db, table).await);
    }
    out
}

/// Asserts two dumps are equal, showing only the rows that differ.
#[track_caller]
pub fn assert_same_rows(actual: &[String], expected: &[String]) {
    if actual == expected {
        return;
    }
    let missing: Vec<&String> = expected.iter().filter(|r| !actual.contains(r)).collect();
    let extra: Vec<&String> = actual.iter().filter(|r| !expected.contains(r)).collect();
    panic!(
        "the rows differ ({} against {} expected)\nmissing: {missing:#?}\nunexpected: {extra:#?}",
        actual.len(),
        expected.len()
    );
}

/// Every row of `table`, every column, as text, sorted.
pub async fn dump_table(db: &Db, table: &str) -> Vec<String> {
    let cells: Vec<String> = columns(db, table)
        .await
        .iter()
        .map(|c| format!("'{c}=' || COALESCE(CAST({c} AS TEXT), '<null>')"))
        .collect();
    let sql = format!("SELECT {} AS row FROM {table}", cells.join(" || '|' || "));
    let mut rows: Vec<String> = ekm_store::with_read_pool!(db, pool => {
        sqlx::query_scalar(&sql).fetch_all(pool).await.unwrap()
    });
    rows.sort();
    rows.into_iter().map(|r| format!("{table}: {r}")).collect()
}

/// Every column of every read model holds a value in some row: the history reached it, so
/// the comparison covers it.
async fn assert_every_column_is_set(db: &Db) {
    let mut never_set = vec![];
    for table in read_model_tables() {
        for column in columns(db, table).await {
            let sql = format!("SELECT COUNT(*) FROM {table} WHERE {column} IS NOT NULL");
            let set: i64 = ekm_store::with_read_pool!(db, pool => {
                sqlx::query_scalar(&sql).fetch_one(pool).await.unwrap()
            });
            if set == 0 {
                never_set.push(format!("{table}.{column}"));
            }
        }
    }
    assert!(
        never_set.is_empty(),
        "never set by the history: {never_set:?}"
    );
}

pub fn metadata() -> EventMetadata {
    EventMetadata {
        actor: Actor {
            kind: ActorKind::User,
            id: "history".into(),
        },
        request_id: "r".into(),
        reason: Reason::parse("random history").ok(),
        source_address: Some("127.0.0.1".into()),
        recorded_at: "2026-11-28T00:00:00Z".into(),
        location: None,
    }
}

/// A seeded random history of `steps` commands over a growing tree: mostly creations and
/// pauses/resumes, some rotations, a few revocations (never of the organization).
pub async fn random_history(app: &App, seed: u64, steps: usize) {
    let mut rng = StdRng::seed_from_u64(seed);
    let name = ScopeName::parse("n").unwrap();
    let (org, _) = app
        .create_org(name.clone(), Plan::Enterprise, Tier::Managed, &metadata())
        .await
        .unwrap();
    let mut scopes: Vec<(ScopeId, ScopeKind)> = vec![(org.scope.scope.id, ScopeKind::Organization)];
    for _ in 0..steps {
        let (target, kind) = scopes[rng.random_range(0..scopes.len())];
        match rng.random_range(0..12) {
            0..=4 => {
                let parents: Vec<ScopeId> = scopes
                    .iter()
                    .filter(|(_, k)| matches!(k, ScopeKind::Organization | ScopeKind::Team))
                    .map(|(id, _)| *id)
                    .collect();
                let parent_id = parents[rng.random_range(0..parents.len())];
                let parent = app.scope(parent_id).await.unwrap().unwrap();
                let choices: &[ScopeKind] = if parent.scope.kind == ScopeKind::Organization {
                    &[
                        ScopeKind::Team,
                        ScopeKind::Team,
                        ScopeKind::Thread,
                        ScopeKind::McpConnector,
                    ]
                } else {
                    &[ScopeKind::Thread, ScopeKind::Agent, ScopeKind::McpConnector]
                };
                let kind = choices[rng.random_range(0..choices.len())];
                if let Ok(outcome) = app
                    .create_scope(&parent, kind, name.clone(), &metadata())
                    .await
                {
                    scopes.push((outcome.scope.scope.id, kind));
                }
            }
            5..=6 => drop(app.act(target, Action::Pause, &metadata(), None).await),
            7..=9 => drop(app.act(target, Action::Resume, &metadata(), None).await),
            10 => drop(app.act(target, Action::Rotate, &metadata(), None).await),
            _ => {
                if kind != ScopeKind::Organization && rng.random_range(0..3) == 0 {
                    let revoke = Action::Revoke {
                        confirm: target.to_string(),
                    };
                    drop(app.act(target, revoke, &metadata(), None).await);
                }
            }
        }
    }
    // Commands answered from memory leave the runner a moment behind (ADR 0020): the read
    // models the callers compare hold the whole history first.
    app.refresh().await.unwrap();
}

async fn rebuild_yields_exactly_the_live_read_models(backend: Backend) {
    let moto = Moto::start().await;
    let arn = moto.create_key().await;
    let test_db = TestDb::new(backend).await;
    let app = TestApp::spawn_on_with(test_db, rich_history::options()).await;
    random_history(&app.app, 7, 300).await;
    // The revokes' re-keys record events too: let them finish before comparing.
    app.rekeyer.run_pending().await.unwrap();
    let mut history = RichHistory::start(&app, &moto, &arn, 8).await;
    history.run(300).await;
    history.end_unavailable().await;
    // The revokes' re-keys record events too: let them finish before comparing.
    app.rekeyer.run_pending().await.unwrap();
    rich_history::assert_every_event_type(&app.db).await;
    // The runner follows the answers (ADR 0020): compare once it holds everything.
    app.app.refresh().await.unwrap();
    let live = dump(&app.db).await;
    assert!(live.len() > 120, "a long history: {} rows", live.len());
    assert_every_column_is_set(&app.db).await;
    let seals_before: i64 = count(&app.db, "audit_chain").await;

    match backend {
        // PostgreSQL: beside the running server.
        Backend::Postgres => {
            let shape_before = pg_shape(&app.db).await;
            let mut reported = vec![];
            let report = rebuild(&app.db, &mut |applied, head| reported.push((applied, head)))
                .await
                .unwrap();
            assert_eq!(report.position, app.db.head_position().await.unwrap());
            assert!(reported.len() >= 2 && reported.last().unwrap().0 == report.position);
            assert_same_rows(&dump(&app.db).await, &live);
            // The swapped-in tables are durable again and carry every index the old ones had.
            assert_eq!(pg_shape(&app.db).await, shape_before);
            // The live server keeps working on the swapped-in tables.
            rich_history(&app, &moto, &arn, 9, 40).await;
            // The revokes' re-keys record events too: let them finish before comparing.
            app.rekeyer.run_pending().await.unwrap();
            app.app.refresh().await.unwrap();
            let after = dump(&app.db).await;
            assert!(after.len() > live.len());
            rebuild(&app.db, &mut |_, _| {}).await.unwrap();
            assert_same_rows(&dump(&app.db).await, &after);
        }
        // SQLite: with the server stopped, as the CLI requires.
        Backend::Sqlite => {
            let config = app.config.clone();
            let server_db = app.db.clone();
            server_db.close().await;
            let db = Db::open(&config).await.unwrap();
            let report = rebuild(&db, &mut |_, _| {}).await.unwrap();
            assert_eq!(report.projections, ["scope_tree"]);
            assert_same_rows(&dump(&db).await, &live);
            db.close().await;
        }
    }
    let db = Db::open(&app.config).await.unwrap();
    assert_eq!(
        count(&db, "audit_chain").await,
        seals_before.max(count(&db, "audit_chain").await)
    );
    let seal = crate::harness::seal_key(app.data_dir());
    let report = ekm_projections::verify_chain(&db, &seal, &first_org(&db).await, None)
        .await
        .unwrap();
    assert!(report.ok, "the seals survive a rebuild: {report:?}");
    db.close().await;
}
on_both_backends!(rebuild_yields_exactly_the_live_read_models);

/// The read models' tables on PostgreSQL: each with its persistence (`p`: logged) and its
/// indexes' definitions.
async fn pg_shape(db: &Db) -> Vec<(String, String, Vec<String>)> {
    let Db::Postgres(pg) = db else {
        unreachable!("PostgreSQL only")
    };
    let shape: Vec<(String, String, Vec<String>)> = sqlx::query_as(
        "SELECT c.relname::text, c.relpersistence::text, \
                ARRAY(SELECT indexdef FROM pg_indexes i WHERE i.schemaname = 'public' \
                      AND i.tablename = c.relname ORDER BY indexdef) \
         FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
         WHERE n.nspname = 'public' AND c.relkind = 'r' \
           AND c.relname IN ('scope_view', 'key_version_view', 'grants_view') \
         ORDER BY c.relname",
    )
    .fetch_all(&pg.pool)
    .await
    .unwrap();
    assert_eq!(shape.len(), 3);
    assert!(
        shape.iter().all(|(_, persistence, _)| persistence == "p"),
        "{shape:?}"
    );
    assert!(
        shape.iter().all(|(_, _, indexes)| !indexes.is_empty()),
        "{shape:?}"
    );
    shape
}

async fn count(db: &Db, table: &str) -> i64 {
    ekm_store::with_read_pool!(db, pool => {
        sqlx::query_scalar(&format!("SELECT COUNT(*) FROM {table}")).fetch_one(pool).await.unwrap()
    })
}

async fn first_org(db: &Db) -> String {
    db.chained_orgs().await.unwrap().remove(0)
}

/// Polls a future at most `polls` times, then drops it wherever it stands: a crash at an
/// arbitrary await point, in the middle of a transaction included.
pub(crate) struct CrashAfter<F> {
    pub(crate) inner: Pin<Box<F>>,
    pub(crate) polls: u32,
}

impl<F: Future> Future for CrashAfter<F> {
    type Output = Option<F::Output>;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        if self.polls == 0 {
            return Poll::Ready(None);
        }
        self.polls -= 1;
        self.inner.as_mut().poll(cx).map(Some)
    }
}

/// The tables the key shredder deletes from: not rebuilt, not derived from events. In the
/// order rows can be put back (key versions refer to their scope's wrapping key).
const KEY_TABLES: [(&str, &str); 3] = [
    ("wrapping_keys", "scope_id, epoch"),
    ("key_material", "scope_id, version, fingerprint"),
    (
        "master_key_rewraps",
        "scope_id, version, fingerprint, target",
    ),
];

async fn key_dump(db: &Db) -> Vec<String> {
    let mut out = vec![];
    for (table, _) in KEY_TABLES {
        out.extend(dump_table(db, table).await);
    }
    out
}

async fn interrupted_catch_up_resumes_without_loss_or_duplicates(backend: Backend) {
    let moto = Moto::start().await;
    let arn = moto.create_key().await;
    let app = TestApp::spawn_with(
        backend,
        Options {
            rekey_in_background: false,
            ..rich_history::options()
        },
    )
    .await;
    random_history(&app.app, 11, 60).await;
    // The revokes' re-keys record events too: let them finish before comparing.
    app.rekeyer.run_pending().await.unwrap();
    let mut history = RichHistory::start(&app, &moto, &arn, 11).await;
    history.run(100).await;
    // The key material as it stood before the rest of the history: what the key shredder
    // destroys from here on (revokes, retires; no re-key job runs) is put back below, as if
    // the crash had come before the shredder applied those events.
    for (table, _) in KEY_TABLES {
        crate::audit::exec(
            &app.db,
            &format!("CREATE TABLE before_{table} AS SELECT * FROM {table}"),
        )
        .await;
    }
    history.run(100).await;
    history.end_unavailable().await;
    rich_history::assert_every_event_type(&app.db).await;
    // The runner follows the answers (ADR 0020): take the live rows once it holds
    // everything. (Under a busy core the last health verdict was not yet applied.)
    app.app.refresh().await.unwrap();
    let live = dump(&app.db).await;
    let live_keys = key_dump(&app.db).await;
    let config = app.config.clone();
    app.db.close().await;

    // Forget the read models, then catch up again through many small crashes.
    let db = Db::open(&config).await.unwrap();
    let mut restored = 0;
    for (table, key) in KEY_TABLES {
        let missing =
            format!("FROM before_{table} b WHERE ({key}) NOT IN (SELECT {key} FROM {table})");
        restored += count(&db, &format!("(SELECT 1 {missing}) AS m")).await;
        crate::audit::exec(
            &db,
            &format!("INSERT INTO {table} SELECT * {missing}; DROP TABLE before_{table}"),
        )
        .await;
    }
    assert!(
        restored > 0,
        "the history destroyed no key material to restore"
    );
    // The seals too (here only: they are never rebuilt): they are one row per scope event,
    // so they show whether a crash left a batch half-written.
    for table in read_model_tables().into_iter().chain(["audit_chain"]) {
        crate::audit::exec(&db, &format!("DELETE FROM {table}")).await;
    }
    crate::audit::exec(
        &db,
        "DELETE FROM projection_state WHERE projection = 'audit_chain'",
    )
    .await;
    crate::audit::exec(
        &db,
        "UPDATE projection_checkpoints SET position = 0 \
         WHERE name IN ('scope_tree', 'audit_chain', 'key_shredder')",
    )
    .await;
    let head = db.head_position().await.unwrap();
    let mut rng = StdRng::seed_from_u64(3);
    let mut crashes = 0;
    loop {
        let projector = Projector::standard(
            db.clone(),
            ProjectorConfig {
                batch_size: 5,
                ..ProjectorConfig::default()
            },
            ekm_keys::SealKey::generate(),
        );
        let outcome = CrashAfter {
            inner: Box::pin(projector.catch_up()),
            // The first attempts stop early enough to crash for certain (a catch-up needs
            // far more polls than that); later ones may run to the end.
            polls: if crashes < 5 {
                rng.random_range(1..12)
            } else {
                rng.random_range(1..40)
            },
        }
        .await;
        let checkpoints = projector.checkpoints().await.unwrap();
        // Whatever was committed is whole: rows match the checkpoint exactly.
        let audit_checkpoint = checkpoints
            .iter()
            .find(|(n, _)| n == "audit_chain")
            .unwrap()
            .1;
        let scope_events: i64 = db
            .events_after(0, 100_000)
            .await
            .unwrap()
            .iter()
            .filter(|e| e.aggregate_type == "scope" && e.position <= audit_checkpoint)
            .count() as i64;
        assert_eq!(count(&db, "audit_chain").await, scope_events);
        match outcome {
            Some(result) => {
                assert_eq!(result.unwrap(), head);
                break;
            }
            None => crashes += 1,
        }
    }
    assert!(
        crashes > 3,
        "the test crashed the runner only {crashes} times"
    );
    assert_same_rows(&dump(&db).await, &live);
    // The shredder, reset and crashed too, destroyed again what it had destroyed live.
    assert_same_rows(&key_dump(&db).await, &live_keys);
    db.close().await;
}
on_both_backends!(interrupted_catch_up_resumes_without_loss_or_duplicates);

fn cli_status_and_rebuild_report_positions(backend: Backend) {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let (dir, head) = runtime.block_on(async {
        let app = TestApp::spawn(backend).await;
        random_history(&app.app, 5, 40).await;
        // The revokes' re-keys record events too: let them finish before comparing.
        app.rekeyer.run_pending().await.unwrap();
        // The runner follows the answers (ADR 0020): the status is read once it holds all.
        app.app.refresh().await.unwrap();
        let head = app.db.head_position().await.unwrap();
        let config = app.config.clone();
        app.db.close().await;
        let _ = config;
        (app, head)
    });
    let ekm = |args: &[&str]| {
        let mut command = Command::new(env!("CARGO_BIN_EXE_ekm"));
        command
            .args(args)
            .arg("--data-dir")
            .arg(dir.data_dir())
            .env_remove("EKM_DATABASE_URL");
        if let Some(url) = dir.database_url() {
            command.args(["--database-url", url]);
        }
        command.output().unwrap()
    };
    let status = ekm(&["projections", "status", "--json"]);
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );
    let statuses: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    for s in statuses.as_array().unwrap() {
        assert_eq!(s["position"], head);
        assert_eq!(s["lag"], 0);
    }
    let rebuilt = ekm(&["projections", "rebuild", "--json"]);
    assert!(
        rebuilt.status.success(),
        "{}",
        String::from_utf8_lossy(&rebuilt.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&rebuilt.stdout).unwrap();
    assert_eq!(report["position"], head);
    assert!(String::from_utf8_lossy(&rebuilt.stderr).contains("rebuilding read models: position"));
    drop(dir);
    drop(runtime);
}

#[test]
fn sqlite_cli_status_and_rebuild_report_positions() {
    cli_status_and_rebuild_report_positions(Backend::Sqlite);
}

#[test]
fn postgres_cli_status_and_rebuild_report_positions() {
    cli_status_and_rebuild_report_positions(Backend::Postgres);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_runner_wakes_on_a_commit_made_elsewhere_through_notify() {
    let test_db = TestDb::new(Backend::Postgres).await;
    let db = Db::open(&test_db.config).await.unwrap();
    // Polling once an hour: only a notification can wake it within the test.
    let projector = std::sync::Arc::new(Projector::standard(
        db.clone(),
        ProjectorConfig {
            poll_interval: std::time::Duration::from_secs(3600),
            ..ProjectorConfig::default()
        },
        ekm_keys::SealKey::generate(),
    ));
    projector.init().await.unwrap();
    let mut applied = projector.subscribe();
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let runner = tokio::spawn(projector.clone().run(stopped));
    // Wait until the runner has made its first pass and listens.
    tokio::time::timeout(std::time::Duration::from_secs(10), async {
        while !projector.listening() {
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("the runner listens");

    // Another "instance" commits an event with plain SQL.
    let org = uuid::Uuid::now_v7().to_string();
    let payload = format!(
        r#"{{"OrganizationCreated":{{"org_id":"{org}","name":"Elsewhere","plan":"enterprise","tier":"default","key_version":1,"admin_token_id":null}}}}"#
    );
    let mut other: sqlx::PgConnection = sqlx::Connection::connect(test_db.url.as_deref().unwrap())
        .await
        .unwrap();
    sqlx::query("INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata) VALUES ('scope', $1, 1, 'OrganizationCreated', '2', CAST($2 AS json), '{}')")
        .bind(&org)
        .bind(payload)
        .execute(&mut other)
        .await
        .unwrap();
    // What the committing instance does after its commit (`Db::append`): one coalesced
    // NOTIFY from its own connection pool.
    let elsewhere = Db::connect(&test_db.config).await.unwrap();
    elsewhere.notify_committed();
    let position = db.head_position().await.unwrap();
    tokio::time::timeout(
        std::time::Duration::from_secs(10),
        applied.wait_for(|p| *p >= position),
    )
    .await
    .expect("woken by NOTIFY well before the hourly poll")
    .unwrap();
    let read = ekm_projections::ReadModels::new(db.clone());
    let scope = read
        .scope(ScopeId::parse(&org).unwrap())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(scope.scope.name, "Elsewhere");
    stop.send(true).unwrap();
    runner.await.unwrap();
    db.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_rebuild_on_the_same_postgres_database_is_refused() {
    let app = TestApp::spawn(Backend::Postgres).await;
    random_history(&app.app, 4, 30).await;
    // The revokes' re-keys record events too: let them finish before comparing.
    app.rekeyer.run_pending().await.unwrap();
    // Hold the rebuild lock as a running rebuild would.
    let mut holder: sqlx::PgConnection = sqlx::Connection::connect(app.database_url().unwrap())
        .await
        .unwrap();
    sqlx::query("SELECT pg_advisory_lock(7431000002)")
        .execute(&mut holder)
        .await
        .unwrap();
    let refused = rebuild(&app.db, &mut |_, _| {}).await;
    assert!(
        matches!(
            refused,
            Err(ekm_projections::ProjectionError::RebuildRunning)
        ),
        "{refused:?}"
    );
    sqlx::query("SELECT pg_advisory_unlock(7431000002)")
        .execute(&mut holder)
        .await
        .unwrap();
    let live = dump(&app.db).await;
    rebuild(&app.db, &mut |_, _| {}).await.unwrap();
    assert_same_rows(&dump(&app.db).await, &live);
    app.stop().await;
}

/// `ekm projections rebuild --database-url` on a database whose events no server has
/// projected yet (no checkpoint rows): the first start afterwards continues from the rebuild
/// instead of replaying into the rebuilt rows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebuild_before_the_first_start_leaves_checkpoints_for_it() {
    let app = TestApp::spawn(Backend::Postgres).await;
    random_history(&app.app, 21, 60).await;
    // The revokes' re-keys record events too: let them finish before comparing.
    app.rekeyer.run_pending().await.unwrap();
    let live = dump(&app.db).await;
    let config = app.config.clone();
    app.db.close().await;

    let db = Db::open(&config).await.unwrap();
    // As if no runner had ever run here: no checkpoints, no seals.
    crate::audit::exec(
        &db,
        "DELETE FROM projection_checkpoints; DELETE FROM audit_chain; DELETE FROM projection_state",
    )
    .await;
    rebuild(&db, &mut |_, _| {}).await.unwrap();
    assert_same_rows(&dump(&db).await, &live);
    // The first start.
    let projector = Projector::standard(
        db.clone(),
        ProjectorConfig::default(),
        ekm_keys::SealKey::generate(),
    );
    projector.init().await.unwrap();
    projector.catch_up().await.unwrap();
    assert_same_rows(&dump(&db).await, &live);
    db.close().await;
}
