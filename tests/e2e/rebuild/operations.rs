//! Operating rebuilds: the CLI's status and rebuild, waking on other instances' commits,
//! one rebuild at a time, and a rebuild before the first start.

use std::process::Command;

use ekm_domain::ScopeId;
use ekm_projections::{rebuild, Projector, ProjectorConfig};
use ekm_store::Db;

use super::*;
use crate::harness::{Backend, TestApp, TestDb};

/// The re-key job runs only when a test calls it (`run_pending`): in the background it could
/// record a step between the live rows being taken and the rebuild they are compared with.
fn by_hand() -> crate::harness::Options {
    crate::harness::Options {
        rekey_in_background: false,
        ..crate::harness::Options::default()
    }
}

fn projections_status_and_rebuild_report_positions_when_run_from_the_cli(backend: Backend) {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let (dir, head) = runtime.block_on(async {
        let app = TestApp::spawn_with(backend, by_hand()).await;
        random_history(&app.app, 5, 40).await;
        // The revokes' re-keys record events too: let them finish before comparing.
        app.rekeyer.run_pending().await.unwrap();
        // The runner follows the answers (ADR 0020): the status is read once it holds all.
        app.app.refresh().await.unwrap();
        let head = app.db.committed_head().await.unwrap();
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
fn projections_status_and_rebuild_report_positions_when_run_from_the_cli_on_sqlite() {
    projections_status_and_rebuild_report_positions_when_run_from_the_cli(Backend::Sqlite);
}

#[test]
fn projections_status_and_rebuild_report_positions_when_run_from_the_cli_on_postgres() {
    projections_status_and_rebuild_report_positions_when_run_from_the_cli(Backend::Postgres);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runner_wakes_through_notify_when_another_instance_commits() {
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
    // The committed head, not the fenced one: the fence may stand lower for a moment (a
    // transaction of another test's database, ADR 0020), and the wait would end at once.
    let position = db.committed_head().await.unwrap();
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
async fn rebuild_is_refused_when_another_runs_on_the_same_database() {
    let app = TestApp::spawn_with(Backend::Postgres, by_hand()).await;
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
    // The runner follows the answers (ADR 0020, 0024: it lets 20 ms of commits gather):
    // compare once it holds everything.
    app.app.refresh().await.unwrap();
    let live = dump(&app.db).await;
    rebuild(&app.db, &mut |_, _| {}).await.unwrap();
    assert_same_rows(&dump(&app.db).await, &live);
    app.stop().await;
}

/// `ekm projections rebuild --database-url` on a database whose events no server has
/// projected yet (no checkpoint rows): the first start afterwards continues from the rebuild
/// instead of replaying into the rebuilt rows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebuild_leaves_checkpoints_when_run_before_the_first_start() {
    let app = TestApp::spawn_with(Backend::Postgres, by_hand()).await;
    random_history(&app.app, 21, 60).await;
    // The revokes' re-keys record events too: let them finish before comparing.
    app.rekeyer.run_pending().await.unwrap();
    // The runner follows the answers (ADR 0020, 0024): take the rows once it holds
    // everything.
    app.app.refresh().await.unwrap();
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

/// `ekm projections rebuild --metrics-listen` serves the rebuild's progress (issue 19 §1),
/// and `--metrics-linger` keeps it up after the end, so that a scrape sees how it ended.
#[test]
fn rebuild_serves_its_progress_as_metrics_when_asked_to() {
    use std::io::{BufRead, BufReader};
    use std::process::Stdio;
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let (dir, head) = runtime.block_on(async {
        let app = TestApp::spawn_with(Backend::Sqlite, by_hand()).await;
        random_history(&app.app, 3, 20).await;
        app.rekeyer.run_pending().await.unwrap();
        app.app.refresh().await.unwrap();
        let head = app.db.committed_head().await.unwrap();
        app.db.close().await;
        (app, head)
    });
    let port = crate::harness::free_port();
    let mut child = Command::new(env!("CARGO_BIN_EXE_ekm"))
        .args(["projections", "rebuild", "--json", "--metrics-listen"])
        .arg(format!("127.0.0.1:{port}"))
        .args(["--metrics-linger", "60s", "--data-dir"])
        .arg(dir.data_dir())
        .env_remove("EKM_DATABASE_URL")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Given the rebuild's report on stdout (it is done, and lingers)
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let report: serde_json::Value = serde_json::from_str(&line).expect("the JSON report");
    assert_eq!(report["position"], head);
    // When its metrics are scraped, then they say it ran to the head and stopped
    let text = runtime.block_on(async {
        reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    });
    let _ = child.kill();
    let _ = child.wait();
    let metrics = crate::metrics::parse(&text);
    let gauge = |name: &str| metrics[name][0].1;
    assert_eq!(gauge("ekm_rebuild_running"), 0.0, "{text}");
    assert_eq!(gauge("ekm_rebuild_head_position"), head as f64);
    assert_eq!(gauge("ekm_rebuild_applied_position"), head as f64);
    drop(dir);
    drop(runtime);
}

/// On a terminal the rebuild draws a progress bar on stderr (issue 19 §2); in a pipe it
/// prints plain lines instead. The terminal is a pseudo-terminal from util-linux's
/// `script`.
#[test]
fn rebuild_draws_a_progress_bar_only_on_a_terminal() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let (dir, head) = runtime.block_on(async {
        let app = TestApp::spawn_with(Backend::Sqlite, by_hand()).await;
        random_history(&app.app, 2, 10).await;
        app.rekeyer.run_pending().await.unwrap();
        app.app.refresh().await.unwrap();
        let head = app.db.committed_head().await.unwrap();
        app.db.close().await;
        (app, head)
    });
    let rebuild = format!(
        "{} projections rebuild --data-dir {}",
        env!("CARGO_BIN_EXE_ekm"),
        dir.data_dir().display()
    );
    // On a terminal: the bar, up to the head
    let on_terminal = Command::new("script")
        .args(["-qec", &rebuild, "/dev/null"])
        .env_remove("EKM_DATABASE_URL")
        .output()
        .expect("util-linux's script runs");
    let text = String::from_utf8_lossy(&on_terminal.stdout);
    assert!(on_terminal.status.success(), "{text}");
    assert!(text.contains("rebuilding read models ["), "{text}");
    assert!(text.contains(&format!("{head}/{head} (100%)")), "{text}");
    // In a pipe: lines, no bar
    let piped = Command::new(env!("CARGO_BIN_EXE_ekm"))
        .args(["projections", "rebuild", "--data-dir"])
        .arg(dir.data_dir())
        .env_remove("EKM_DATABASE_URL")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&piped.stderr);
    assert!(piped.status.success(), "{stderr}");
    assert!(
        stderr.contains("rebuilding read models: position"),
        "{stderr}"
    );
    assert!(!stderr.contains("rebuilding read models ["), "{stderr}");
    drop(dir);
    drop(runtime);
}
