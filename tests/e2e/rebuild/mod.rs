//! Read models can always be rebuilt from the log: a rebuild gives exactly the live rows,
//! and a catch-up interrupted at any point (a crash) resumes without losing or repeating.

mod crash;
mod operations;

pub(crate) use crash::CrashAfter;
use crash::{first_org, pg_shape};

use ekm_domain::{Plan, ScopeId, ScopeKind, ScopeName, Tier};
use ekm_projections::rebuild;
use ekm_service::app::Action;
use ekm_service::App;
use ekm_store::Db;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::harness::{metadata, Backend, TestApp, TestDb};
use crate::kms_servers::Moto;
use crate::on_both_backends;
use crate::rich_history::{self, rich_history, RichHistory};

/// The tables of every rebuildable read model, as the projections declare them.
pub fn read_model_tables() -> Vec<&'static str> {
    ekm_projections::read_model_tables()
}

/// Every column of `table`, from the database's own catalog.
pub async fn columns(db: &Db, table: &str) -> Vec<String> {
    let columns = ekm_projections::table_columns(db, table).await.unwrap();
    assert!(!columns.is_empty(), "no columns found for {table}");
    columns
}

/// Every row of every rebuildable read model, every column, as text, sorted.
pub async fn dump(db: &Db) -> Vec<String> {
    ekm_projections::read_model_rows(db).await.unwrap()
}

/// Asserts two dumps are equal, showing only the rows that differ.
#[track_caller]
pub fn assert_same_rows(actual: &[String], expected: &[String]) {
    if actual == expected {
        return;
    }
    let (missing, extra) = ekm_projections::row_differences(actual, expected);
    panic!(
        "the rows differ ({} against {} expected)\nmissing: {missing:#?}\nunexpected: {extra:#?}",
        actual.len(),
        expected.len()
    );
}

/// Every row of `table`, every column, as text, sorted.
pub async fn dump_table(db: &Db, table: &str) -> Vec<String> {
    ekm_projections::table_rows(db, table).await.unwrap()
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

async fn rebuild_yields_exactly_the_live_read_models_when_the_history_is_rich(backend: Backend) {
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
    app.finish_rekeys().await;
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
            assert_eq!(report.position, app.db.committed_head().await.unwrap());
            assert!(reported.len() >= 2 && reported.last().unwrap().0 == report.position);
            assert_same_rows(&dump(&app.db).await, &live);
            // The swapped-in tables are durable again and carry every index the old ones had.
            assert_eq!(pg_shape(&app.db).await, shape_before);
            // The live server keeps working on the swapped-in tables.
            rich_history(&app, &moto, &arn, 9, 40).await;
            // The revokes' re-keys record events too: let them finish before comparing.
            app.finish_rekeys().await;
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
on_both_backends!(rebuild_yields_exactly_the_live_read_models_when_the_history_is_rich);

async fn count(db: &Db, table: &str) -> i64 {
    ekm_store::with_read_pool!(db, pool => {
        sqlx::query_scalar(&format!("SELECT COUNT(*) FROM {table}")).fetch_one(pool).await.unwrap()
    })
}
