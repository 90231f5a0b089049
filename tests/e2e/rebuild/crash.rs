//! A catch-up interrupted at any point (a crash) resumes without losing or repeating.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use ekm_projections::{Projector, ProjectorConfig};
use ekm_store::Db;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::*;
use crate::harness::{Backend, Options, TestApp};
use crate::kms_servers::Moto;
use crate::on_both_backends;
use crate::rich_history::{self, RichHistory};

/// The read models' tables on PostgreSQL: each with its persistence (`p`: logged) and its
/// indexes' definitions.
pub(super) async fn pg_shape(db: &Db) -> Vec<(String, String, Vec<String>)> {
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

pub(super) async fn first_org(db: &Db) -> String {
    db.chained_orgs().await.unwrap().remove(0)
}

/// Polls a future at most `polls` times, then drops it wherever it stands: a crash at an
/// arbitrary await point, in the middle of a transaction included.
pub struct CrashAfter<F> {
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

async fn catch_up_resumes_without_loss_or_duplicates_when_interrupted(backend: Backend) {
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
    let mut history = RichHistory::start(&app, &moto, &arn, 12).await;
    history.run(100).await;
    // Whatever the random history does next, one retire destroys key material that exists
    // now: a team of an organization the history does not touch, with two key versions.
    let (org, admin) = app.data_org("enterprise", "managed").await;
    let doomed = app.scope(&admin, "team", "doomed", &org).await;
    let rotated = app
        .post(
            &format!("/v1/scopes/{doomed}/rotate"),
            &admin,
            serde_json::json!({}),
        )
        .await;
    assert_eq!(rotated.status, 200, "{}", rotated.body);
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
    app.floor(&admin, &doomed, 2).await;
    let retired = app
        .post(
            &format!("/v1/scopes/{doomed}/retire"),
            &admin,
            serde_json::json!({"below": 2}),
        )
        .await;
    assert_eq!(retired.status, 200, "{}", retired.body);
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
    let head = db.committed_head().await.unwrap();
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
on_both_backends!(catch_up_resumes_without_loss_or_duplicates_when_interrupted);
