//! Tamper evidence that does not trust the database (ADR 0024): the guards an attacker with
//! SQL access meets first, and what `ekm audit verify` finds after each kind of tampering.

use std::path::Path;
use std::process::Command;

use ekm_store::{Db, StoredEvent};
use serde_json::Value;

use crate::audit::{drop_immutability, exec};
use crate::harness::{Backend, TestApp};
use crate::on_both_backends;

/// Runs `sql` and returns the database's refusal, if any.
async fn try_exec(db: &Db, sql: &str) -> Result<(), String> {
    ekm_store::with_write_pool!(db, pool => {
        sqlx::raw_sql(sql)
            .execute(pool)
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    })
}

async fn count(db: &Db, sql: &str) -> i64 {
    ekm_store::with_read_pool!(db, pool => {
        sqlx::query_scalar(sql).fetch_one(pool).await.unwrap()
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncate_refused_when_postgres_history_would_be_emptied() {
    let app = TestApp::spawn(Backend::Postgres).await;
    let (org, admin) = app.org("enterprise").await;
    app.scope(&admin, "team", "research", &org).await;
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
async fn insert_or_replace_refused_when_sqlite_event_exists() {
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
async fn append_conflict_stays_retryable_when_guarded(backend: Backend) {
    use ekm_store::ScopeStore;
    let app = TestApp::spawn(backend).await;
    let (org, admin) = app.org("enterprise").await;
    let team = app.scope(&admin, "team", "research", &org).await;
    let store = ScopeStore::new(&app.db);
    let first = store.load(&team).await.unwrap();
    let second = store.load(&team).await.unwrap();
    let paused = || vec![ekm_domain::ScopeEvent::ScopePaused {}];
    store
        .commit(paused(), first, Default::default())
        .await
        .unwrap();
    let lost = store
        .commit(paused(), second, Default::default())
        .await
        .unwrap_err();
    assert!(
        matches!(lost, cqrs_es::AggregateError::AggregateConflict),
        "{lost:?}"
    );
    app.stop().await;
}
on_both_backends!(append_conflict_stays_retryable_when_guarded);

// ---------------------------------------------------------------------------------------
// What `ekm audit verify` finds, by kind and position of the first bad entry.

/// `ekm audit verify --json`, as an auditor runs it: its exit status and its reports.
fn verify(app: &TestApp, org: Option<&str>, head_file: Option<&Path>) -> (bool, Vec<Value>) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_ekm"));
    command
        .args(["audit", "verify", "--json", "--data-dir"])
        .arg(app.data_dir())
        .env_remove("EKM_DATABASE_URL");
    if let Some(url) = app.database_url() {
        command.args(["--database-url", url]);
    }
    if let Some(org) = org {
        command.args(["--org", org]);
    }
    if let Some(path) = head_file {
        command.arg("--head-file").arg(path);
    }
    let output = command.output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let reports: Vec<Value> = serde_json::from_str(&stdout).unwrap_or_else(|_| {
        panic!(
            "not JSON: {stdout} {}",
            String::from_utf8_lossy(&output.stderr)
        )
    });
    (output.status.success(), reports)
}

/// Runs `command` to its end, or kills it and fails if it is still running after `limit`
/// (a server that should have refused to start).
pub fn exits_within(mut command: Command, limit: std::time::Duration) -> std::process::Output {
    let child = command
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let (done, finished) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = done.send(child.wait_with_output());
    });
    match finished.recv_timeout(limit) {
        Ok(output) => output.unwrap(),
        Err(_) => {
            let _ = Command::new("kill").arg(pid.to_string()).status();
            panic!("the command was still running after {limit:?}");
        }
    }
}

/// A running `ekm serve`, killed when dropped.
pub struct Served(std::process::Child);

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `command` (an `ekm --log-format json serve …`) and returns once it logs that it
/// listens; fails with its log if it exits first or is not ready within a minute.
pub fn serve_until_listening(mut command: Command) -> Served {
    let mut child = command
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let served = Served(child);
    let (ready, listening) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        let mut log = vec![];
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            if line.contains("\"listening\"") {
                let _ = ready.send(Ok(()));
            }
            log.push(line);
        }
        let _ = ready.send(Err(log.join("\n")));
    });
    listening
        .recv_timeout(std::time::Duration::from_secs(60))
        .unwrap()
        .unwrap_or_else(|log| panic!("ekm serve did not start: {log}"));
    served
}

/// The kind and position of `org`'s first bad entry (None when its chain verifies).
fn first_failure(reports: &[Value], org: &str) -> Option<(String, i64)> {
    let report = reports
        .iter()
        .find(|r| r["org_id"] == org)
        .unwrap_or_else(|| panic!("no report for {org}: {reports:?}"));
    let failure = &report["first_failure"];
    if failure.is_null() {
        // Only the access tables can fail a report whose chain verifies.
        let clean = report["access_mismatches"].as_array().unwrap().is_empty();
        assert_eq!(report["ok"], clean, "{report}");
        return None;
    }
    assert_eq!(report["ok"], false, "{report}");
    Some((
        failure["problem"].as_str().unwrap().to_owned(),
        failure["position"].as_i64().unwrap(),
    ))
}

/// An organization with a team paused, resumed and paused again; its events in order.
async fn history(app: &TestApp) -> (String, String, String, Vec<StoredEvent>) {
    let (org, admin) = app.org("enterprise").await;
    let team = app.scope(&admin, "team", "research", &org).await;
    app.pause(&admin, &team).await;
    app.resume(&admin, &team).await;
    app.pause(&admin, &team).await;
    let events = org_events(&app.db, &org).await;
    (org, admin, team, events)
}

async fn org_events(db: &Db, org: &str) -> Vec<StoredEvent> {
    let positions: Vec<i64> = ekm_store::with_read_pool!(db, pool => {
        sqlx::query_scalar("SELECT position FROM events WHERE audit_org = $1 ORDER BY position")
            .bind(org)
            .fetch_all(pool)
            .await
            .unwrap()
    });
    db.events_at(&positions).await.unwrap()
}

async fn verify_reports_altered_when_seals_are_recomputed_without_the_key(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let (org, _, team, events) = history(&app).await;
    assert_eq!(first_failure(&verify(&app, Some(&org), None).1, &org), None);
    let pause = events
        .iter()
        .find(|e| e.event_type == "ScopePaused")
        .unwrap()
        .clone();

    // The attacker rewrites the first pause's reason and seals the chain again from there,
    // with the only key they can have: not the audit key, which the database never held.
    drop_immutability(&app.db).await;
    exec(
        &app.db,
        &format!(
            "UPDATE events SET metadata = '{}' WHERE position = {}",
            pause.metadata.replace("investigation 4711", "routine"),
            pause.position
        ),
    )
    .await;
    let guessed = ekm_keys::SealKey::from_bytes(&[0u8; 32]).unwrap();
    let seals: Vec<(i64, String)> = ekm_store::with_read_pool!(&app.db, pool => {
        sqlx::query_as("SELECT position, prev_hash FROM audit_chain WHERE org_id = $1 AND position >= $2 ORDER BY position")
            .bind(&org)
            .bind(pause.position)
            .fetch_all(pool)
            .await
            .unwrap()
    });
    let mut prev = seals[0].1.clone();
    for (position, _) in seals {
        let event = &app.db.events_at(&[position]).await.unwrap()[0];
        let seal = ekm_projections::seal_entry(&guessed, &org, &prev, event).unwrap();
        exec(
            &app.db,
            &format!("UPDATE audit_chain SET prev_hash = '{prev}', hash = '{seal}' WHERE position = {position}"),
        )
        .await;
        prev = seal;
    }
    let (ok, reports) = verify(&app, Some(&org), None);
    assert!(!ok);
    assert_eq!(
        first_failure(&reports, &org),
        Some(("altered".into(), pause.position))
    );
    assert_eq!(reports[0]["first_failure"]["scope_id"], team.as_str());
    app.stop().await;
}
on_both_backends!(verify_reports_altered_when_seals_are_recomputed_without_the_key);

async fn verify_reports_removed_when_a_sealed_event_is_deleted(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let (org, _, _, events) = history(&app).await;
    let resume = events
        .iter()
        .find(|e| e.event_type == "ScopeResumed")
        .unwrap()
        .position;
    drop_immutability(&app.db).await;
    exec(
        &app.db,
        &format!("DELETE FROM events WHERE position = {resume}"),
    )
    .await;
    let (ok, reports) = verify(&app, Some(&org), None);
    assert!(!ok);
    assert_eq!(
        first_failure(&reports, &org),
        Some(("removed".into(), resume))
    );
    app.stop().await;
}
on_both_backends!(verify_reports_removed_when_a_sealed_event_is_deleted);

async fn verify_reports_inserted_when_an_event_fills_a_position_gap(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let (org, admin) = app.org("enterprise").await;
    let team = app.scope(&admin, "team", "research", &org).await;
    // An event of another aggregate type takes a position (a gap once it is gone: on
    // PostgreSQL rolled-back inserts leave such gaps too), then the team's history goes on.
    exec(
        &app.db,
        "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, \
         payload, metadata) VALUES ('test', 'gap', 1, 'Tested', '1', '{}', '{}')",
    )
    .await;
    let gap = app.db.head_position().await.unwrap();
    app.pause(&admin, &team).await;
    app.resume(&admin, &team).await;
    assert_eq!(first_failure(&verify(&app, Some(&org), None).1, &org), None);

    // The attacker forges a pause of the team into the gap.
    let pause = app.db.events_of(&team).await.unwrap()[1].clone();
    assert_eq!(pause.event_type, "ScopePaused");
    drop_immutability(&app.db).await;
    exec(
        &app.db,
        &format!("DELETE FROM events WHERE position = {gap}"),
    )
    .await;
    exec(
        &app.db,
        &format!(
            "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, \
             event_version, payload, metadata) VALUES ('scope', '{team}', 99, 'ScopePaused', \
             '{}', '{}', '{}')",
            pause.event_version, pause.payload, pause.metadata
        ),
    )
    .await;
    exec(
        &app.db,
        &format!(
            "UPDATE events SET position = {gap} WHERE aggregate_id = '{team}' AND sequence = 99"
        ),
    )
    .await;
    let (ok, reports) = verify(&app, Some(&org), None);
    assert!(!ok);
    assert_eq!(
        first_failure(&reports, &org),
        Some(("inserted".into(), gap))
    );
    app.stop().await;
}
on_both_backends!(verify_reports_inserted_when_an_event_fills_a_position_gap);

async fn verify_reports_reordered_when_a_seal_link_is_edited(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let (org, _, _, events) = history(&app).await;
    let resume = events
        .iter()
        .find(|e| e.event_type == "ScopeResumed")
        .unwrap()
        .position;
    // The resume's link now names the entry two back, as if the pause before it had moved.
    exec(
        &app.db,
        &format!(
            "UPDATE audit_chain SET prev_hash = (SELECT prev_hash FROM audit_chain WHERE position = \
             (SELECT MAX(position) FROM audit_chain WHERE org_id = '{org}' AND position < {resume})) \
             WHERE position = {resume}"
        ),
    )
    .await;
    let (ok, reports) = verify(&app, Some(&org), None);
    assert!(!ok);
    assert_eq!(
        first_failure(&reports, &org),
        Some(("reordered".into(), resume))
    );
    app.stop().await;
}
on_both_backends!(verify_reports_reordered_when_a_seal_link_is_edited);

async fn verify_reports_truncated_when_the_tail_is_cut_with_its_seals(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let (org, _, _, events) = history(&app).await;
    let heads = app.data_dir().join("auditor-heads.json");
    let (ok, _) = verify(&app, None, Some(&heads));
    assert!(ok);
    let head = events.last().unwrap().position;
    let recorded: Value = serde_json::from_str(&std::fs::read_to_string(&heads).unwrap()).unwrap();
    assert_eq!(recorded["orgs"][&org]["position"], head);

    // The last two entries go, events and seals, with the chain's state: what is left is a
    // perfectly valid, shorter chain.
    let cut = events[events.len() - 2].position;
    drop_immutability(&app.db).await;
    exec(
        &app.db,
        &format!(
            "DELETE FROM events WHERE position >= {cut}; DELETE FROM audit_chain WHERE position >= {cut}"
        ),
    )
    .await;
    let (ok, reports) = verify(&app, None, Some(&heads));
    assert!(!ok);
    assert_eq!(
        first_failure(&reports, &org),
        Some(("truncated".into(), head))
    );
    // The failed run kept the recorded head: the next run fails the same way.
    let (ok, reports) = verify(&app, None, Some(&heads));
    assert!(!ok);
    assert_eq!(
        first_failure(&reports, &org),
        Some(("truncated".into(), head))
    );
    app.stop().await;
}
on_both_backends!(verify_reports_truncated_when_the_tail_is_cut_with_its_seals);

async fn verify_reports_emptied_when_an_organization_history_is_removed(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let (org, _, _, events) = history(&app).await;
    let heads = app.data_dir().join("auditor-heads.json");
    assert!(verify(&app, None, Some(&heads)).0);
    let head = events.last().unwrap().position;

    drop_immutability(&app.db).await;
    exec(
        &app.db,
        &format!(
            "DELETE FROM events WHERE audit_org = '{org}'; DELETE FROM audit_chain WHERE org_id = '{org}'; \
             DELETE FROM projection_state WHERE projection = 'audit_chain' AND key = '{org}'"
        ),
    )
    .await;
    // Every organization (no --org): the emptied one is still listed by the head file.
    let (ok, reports) = verify(&app, None, Some(&heads));
    assert!(!ok);
    assert_eq!(
        first_failure(&reports, &org),
        Some(("emptied".into(), head))
    );
    app.stop().await;
}
on_both_backends!(verify_reports_emptied_when_an_organization_history_is_removed);

async fn verify_reports_resealed_when_the_server_seals_an_altered_history_again(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let (org, _, _, events) = history(&app).await;
    let heads = app.data_dir().join("auditor-heads.json");
    assert!(verify(&app, None, Some(&heads)).0);
    let head = events.last().unwrap().position;
    let pause = events
        .iter()
        .find(|e| e.event_type == "ScopePaused")
        .unwrap()
        .clone();

    // Alter an event, then make the chain forget it ever sealed anything.
    drop_immutability(&app.db).await;
    exec(
        &app.db,
        &format!(
            "UPDATE events SET metadata = '{}' WHERE position = {}; \
             DELETE FROM audit_chain; DELETE FROM projection_state WHERE projection = 'audit_chain'; \
             UPDATE projection_checkpoints SET position = 0 WHERE name = 'audit_chain'",
            pause.metadata.replace("investigation 4711", "routine"),
            pause.position
        ),
    )
    .await;
    // Without seals, events the runner had sealed are found unsealed.
    let (ok, reports) = verify(&app, Some(&org), None);
    assert!(!ok);
    assert_eq!(
        first_failure(&reports, &org),
        Some(("inserted".into(), events[0].position))
    );
    // A server started now refuses to seal that history again.
    let mut command = Command::new(env!("CARGO_BIN_EXE_ekm"));
    command
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(app.data_dir())
        .env_remove("EKM_DATABASE_URL");
    if let Some(url) = app.database_url() {
        command.args(["--database-url", url]);
    }
    let refused = exits_within(command, std::time::Duration::from_secs(60));
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("--seal-existing-history"), "{stderr}");
    // Nor does the running one.
    let running = app.app.projector().catch_up().await.unwrap_err();
    assert!(
        matches!(
            running,
            ekm_projections::ProjectionError::ResealRefused { .. }
        ),
        "{running:?}"
    );

    // One that is told to seals the altered history with the real key: every seal
    // verifies, but not the one the auditor recorded.
    let mut command = Command::new(env!("CARGO_BIN_EXE_ekm"));
    command
        .args(["--log-format", "json", "serve", "--seal-existing-history"])
        .args(["--listen", "127.0.0.1:0", "--data-dir"])
        .arg(app.data_dir())
        .env_remove("EKM_DATABASE_URL");
    if let Some(url) = app.database_url() {
        command.args(["--database-url", url]);
    }
    // Listening means its read models, and so the seals, have caught up.
    drop(serve_until_listening(command));
    assert_eq!(first_failure(&verify(&app, Some(&org), None).1, &org), None);
    let (ok, reports) = verify(&app, None, Some(&heads));
    assert!(!ok);
    assert_eq!(
        first_failure(&reports, &org),
        Some(("resealed".into(), head))
    );
    app.stop().await;
}
on_both_backends!(verify_reports_resealed_when_the_server_seals_an_altered_history_again);

// ---------------------------------------------------------------------------------------
// The access tables carry no seals: verify checks them against the events.

/// The mismatches `verify` reports for `org`: (table, problem, id).
fn access_mismatches(reports: &[Value], org: &str) -> Vec<(String, String, String)> {
    let report = reports.iter().find(|r| r["org_id"] == org).unwrap();
    report["access_mismatches"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["table"].as_str().unwrap().to_owned(),
                m["problem"].as_str().unwrap().to_owned(),
                m["id"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

/// An organization whose tokens and grants went through their whole life by the API: a
/// token issued and revoked, a grant made and removed, a grant kept.
async fn access_history(app: &TestApp) -> (String, String, String) {
    let (org, admin) = app.org("enterprise").await;
    let team = app.scope(&admin, "team", "research", &org).await;
    let member = app.token(&admin, &org, "ci", "member").await;
    let listed = app.get(&format!("/v1/orgs/{org}/tokens"), &admin).await;
    let ci = listed.body["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["principal"] == "ci")
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    app.token(&admin, &org, "temp", "it_admin").await;
    app.grant(&admin, &org, "ci", "data:use", Some(&team)).await;
    app.grant(&admin, &org, "ci", "audit:read", None).await;
    let removed = app
        .call(
            "DELETE",
            &format!("/v1/orgs/{org}/grants/ci/audit:read"),
            Some(&admin),
            None,
        )
        .await;
    assert!(removed.status.is_success(), "{}", removed.body);
    drop(member);
    (org, admin, ci)
}

async fn verify_reports_a_token_row_added_in_sql(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let (org, _, _) = access_history(&app).await;
    let (ok, reports) = verify(&app, Some(&org), None);
    assert!(ok, "{reports:?}");
    assert_eq!(access_mismatches(&reports, &org), vec![]);

    // A working org_admin token that no event issued.
    let secret = "ekm_forged_secret";
    exec(
        &app.db,
        &format!(
            "INSERT INTO tokens (id, token_hash, role, org_id, name, created_at, principal, principal_kind) \
             VALUES ('tok_forged', '{}', 'org_admin', '{org}', 'mallory', 0, 'mallory', 'user')",
            ekm_store::token_hash(secret)
        ),
    )
    .await;
    assert_eq!(
        app.get(&format!("/v1/orgs/{org}/tokens"), secret)
            .await
            .status,
        200,
        "the forged row is a working token"
    );
    let (ok, reports) = verify(&app, Some(&org), None);
    assert!(!ok);
    // The chain itself is intact; the access table is not.
    assert_eq!(first_failure(&reports, &org), None);
    assert_eq!(
        access_mismatches(&reports, &org),
        vec![(
            "tokens".into(),
            "token_without_event".into(),
            "tok_forged".into()
        )]
    );
    app.stop().await;
}
on_both_backends!(verify_reports_a_token_row_added_in_sql);

async fn verify_reports_revived_raised_and_granted_rows(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let (org, admin, ci) = access_history(&app).await;
    let revoked = app
        .call(
            "DELETE",
            &format!("/v1/orgs/{org}/tokens/{ci}"),
            Some(&admin),
            None,
        )
        .await;
    assert!(revoked.status.is_success(), "{}", revoked.body);
    assert!(verify(&app, Some(&org), None).0);

    let kept: i64 = ekm_store::with_read_pool!(&app.db, pool => {
        sqlx::query_scalar("SELECT granted_position FROM grants_view WHERE org_id = $1")
            .bind(&org)
            .fetch_one(pool)
            .await
            .unwrap()
    });
    exec(
        &app.db,
        &format!(
            "UPDATE tokens SET revoked_at = NULL WHERE id = '{ci}'; \
             UPDATE tokens SET role = 'org_admin' WHERE org_id = '{org}' AND principal = 'temp'; \
             INSERT INTO grants_view (org_id, principal, permission, scope_id, granted_position, granted_at, granted_by) \
             VALUES ('{org}', 'ci', 'encryption:manage', '', 999999, 0, 'user:mallory'); \
             DELETE FROM grants_view WHERE granted_position = {kept}"
        ),
    )
    .await;
    let (ok, reports) = verify(&app, Some(&org), None);
    assert!(!ok);
    let mut found: Vec<(String, String)> = access_mismatches(&reports, &org)
        .into_iter()
        .map(|(table, problem, _)| (table, problem))
        .collect();
    found.sort();
    let expected: Vec<(String, String)> = [
        ("grants_view", "grant_missing"),
        ("grants_view", "grant_without_event"),
        ("tokens", "token_altered"),
        ("tokens", "token_revived"),
    ]
    .iter()
    .map(|(t, p)| (t.to_string(), p.to_string()))
    .collect();
    assert_eq!(found, expected);
    app.stop().await;
}
on_both_backends!(verify_reports_revived_raised_and_granted_rows);

// ---------------------------------------------------------------------------------------
// Upgrading a database sealed by the previous release.

async fn upgrade_keeps_unkeyed_seals_aside_and_refuses_to_reseal_unasked(backend: Backend) {
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
on_both_backends!(upgrade_keeps_unkeyed_seals_aside_and_refuses_to_reseal_unasked);
