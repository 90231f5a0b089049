//! Faults (issue 20): the data plane fails closed when the read models stop following the
//! event log.

use std::time::Duration;

use serde_json::json;

use crate::audit::{drop_immutability, exec};
use crate::harness::{encrypt, Backend, Options, TestApp};
use crate::on_both_backends;

/// Waits until `app`'s watch reports a stall that covers `position`: not one left over from
/// the set-up (an instance hears of another's commands through NOTIFY or a 500 ms poll, and
/// the bound in these tests is 300 ms).
async fn stall_covering(app: &TestApp, position: i64) {
    let mut stall = app.app.subscribe_stall();
    tokio::time::timeout(
        Duration::from_secs(30),
        stall.wait_for(|s| s.as_ref().is_some_and(|s| s.head >= position)),
    )
    .await
    .expect("the watch reports the runner behind within the bound")
    .unwrap();
}

/// An event the runner cannot decode, written straight into the log (as someone with write
/// access to the database could, or a bug).
pub(crate) async fn insert_undecodable_event(db: &ekm_store::Db, scope: &str) {
    exec(
        db,
        &format!(
            "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, \
             event_version, payload, metadata) VALUES ('scope', '{scope}', 9999, 'ScopePaused', \
             '1', '{{\"NoSuchEvent\": 1}}', '{{}}')"
        ),
    )
    .await;
}

/// Instances A and B on one PostgreSQL database, B with a bound of 300 ms; an organization
/// whose admin holds `data:use`, a thread under a team, and B's key cache warm for it.
struct Peers {
    a: TestApp,
    b: TestApp,
    admin: String,
    team: String,
    thread: String,
}

async fn peers_with_a_warm_thread() -> Peers {
    let a = TestApp::spawn(Backend::Postgres).await;
    let b = a
        .peer_with(Options {
            max_projection_lag: Duration::from_millis(300),
            ..Options::default()
        })
        .await;
    let (org, admin) = a.data_org("enterprise", "managed").await;
    let team = a.scope(&admin, "team", "research", &org).await;
    let thread = a.scope(&admin, "thread", "t", &team).await;
    b.app.refresh().await.unwrap();
    assert_eq!(
        encrypt(&b, &admin, &thread, b"x", "messages").await.status,
        200
    );
    Peers {
        a,
        b,
        admin,
        team,
        thread,
    }
}

/// Reproduced from the issue: one event the runner cannot decode stops it, and a pause
/// committed after that event never reaches the in-memory tree the data plane answers
/// from. Past `--max-projection-lag` the data plane refuses (503 `unavailable`, with
/// `Retry-After`) and `/readyz` fails; once the runner gets past the event, both recover
/// and the pause holds.
async fn data_plane_fails_closed_when_the_projector_is_stuck_on_an_event(backend: Backend) {
    let app = TestApp::spawn_with(
        backend,
        Options {
            max_projection_lag: Duration::from_millis(300),
            ..Options::default()
        },
    )
    .await;
    let (org, admin) = app.data_org("enterprise", "managed").await;
    let team = app.scope(&admin, "team", "research", &org).await;
    let paused = app.scope(&admin, "thread", "paused-later", &team).await;
    let other = app.scope(&admin, "thread", "other", &team).await;
    assert_eq!(
        encrypt(&app, &admin, &other, b"x", "messages").await.status,
        200
    );
    assert_eq!(app.call("GET", "/readyz", None, None).await.status, 200);

    // An event the runner cannot decode, written straight into the log.
    insert_undecodable_event(&app.db, &team).await;
    // A pause committed after it: the tree never hears of it while the runner is stuck.
    let pause = app
        .post(
            &format!("/v1/scopes/{paused}/pause"),
            &admin,
            json!({"reason": "investigation"}),
        )
        .await;
    assert_ne!(pause.status, 500, "{}", pause.body);
    stall_covering(&app, app.db.committed_head().await.unwrap()).await;
    let mut stall = app.app.subscribe_stall();

    // Fail closed: no encryption anywhere, and not ready.
    for scope in [&paused, &other] {
        let refused = encrypt(&app, &admin, scope, b"x", "messages").await;
        refused.assert_problem(503, "unavailable");
        assert_eq!(refused.headers["retry-after"], "1");
    }
    let ready = app.call("GET", "/readyz", None, None).await;
    ready.assert_problem(503, "unavailable");
    assert!(ready.body["detail"]
        .as_str()
        .unwrap()
        .contains("behind the event log"));

    // The operator removes the event; the runner catches up and the data plane serves again,
    // with the pause in force.
    drop_immutability(&app.db).await;
    exec(
        &app.db,
        &format!("DELETE FROM events WHERE aggregate_id = '{team}' AND sequence = 9999"),
    )
    .await;
    tokio::time::timeout(Duration::from_secs(30), stall.wait_for(Option::is_none))
        .await
        .expect("the stall lifts once the runner catches up")
        .unwrap();
    assert_eq!(
        encrypt(&app, &admin, &other, b"x", "messages").await.status,
        200
    );
    encrypt(&app, &admin, &paused, b"x", "messages")
        .await
        .assert_problem(409, "scope_paused");
    assert_eq!(app.call("GET", "/readyz", None, None).await.status, 200);
    app.stop().await;
}
on_both_backends!(data_plane_fails_closed_when_the_projector_is_stuck_on_an_event);

/// The fail-open the watch closes: instance A commits a pause after the event that stopped
/// every runner; instance B never hears of it, and without the watch would go on
/// encrypting for the paused scope from its warm key cache. With it, B refuses within the
/// bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_instance_refuses_rather_than_miss_a_pause_when_the_projector_is_stuck() {
    let Peers {
        a,
        b,
        admin,
        team,
        thread,
    } = peers_with_a_warm_thread().await;

    insert_undecodable_event(&a.db, &team).await;
    assert_eq!(a.pause(&admin, &thread).await.status, 200);
    stall_covering(&b, a.db.committed_head().await.unwrap()).await;
    encrypt(&b, &admin, &thread, b"x", "messages")
        .await
        .assert_problem(503, "unavailable");
    b.stop().await;
    a.stop().await;
}

/// A transaction held open in the database (an idle session, a long job) holds the fence of
/// ADR 0020 down: no runner reads past it, and the fenced head stays where the runner is.
/// The watch reads the committed head, so instance B still refuses rather than serve a scope
/// that instance A paused meanwhile; once the transaction ends, B catches up and the pause
/// holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_instance_refuses_when_an_open_transaction_hides_a_pause_from_its_runner() {
    let Peers {
        a,
        b,
        admin,
        thread,
        ..
    } = peers_with_a_warm_thread().await;

    let ekm_store::Db::Postgres(pg) = &a.db else {
        unreachable!("PostgreSQL")
    };
    let mut open = pg.pool.begin().await.unwrap();
    sqlx::query("SELECT pg_current_xact_id()")
        .execute(&mut *open)
        .await
        .unwrap();
    assert_eq!(a.pause(&admin, &thread).await.status, 200);
    stall_covering(&b, a.db.committed_head().await.unwrap()).await;
    let mut stall = b.app.subscribe_stall();
    encrypt(&b, &admin, &thread, b"x", "messages")
        .await
        .assert_problem(503, "unavailable");

    open.rollback().await.unwrap();
    tokio::time::timeout(Duration::from_secs(30), stall.wait_for(Option::is_none))
        .await
        .expect("the stall lifts once the transaction ends")
        .unwrap();
    encrypt(&b, &admin, &thread, b"x", "messages")
        .await
        .assert_problem(409, "scope_paused");
    b.stop().await;
    a.stop().await;
}
