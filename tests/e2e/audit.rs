//! The audit log as compliance auditors use it: who did what, when, why; filters; exports;
//! and a hash chain that catches tampering with the stored events.

use ekm_store::Db;
use serde_json::{json, Value};

use crate::harness::{Backend, TestApp};
use crate::on_both_backends;

pub async fn exec(db: &Db, sql: &str) {
    ekm_store::with_write_pool!(db, pool => {
        sqlx::raw_sql(sql).execute(pool).await.unwrap();
    });
}

/// Lets a test act as an attacker with full database access: the immutability triggers go.
pub async fn drop_immutability(db: &Db) {
    match db {
        Db::Sqlite(_) => {
            exec(
                db,
                "DROP TRIGGER events_no_update; DROP TRIGGER events_no_delete; \
                 DROP TRIGGER events_no_replace; DROP TRIGGER events_no_given_position;",
            )
            .await
        }
        Db::Postgres(_) => {
            exec(
                db,
                "DROP TRIGGER events_no_update_or_delete ON events; \
                 DROP TRIGGER events_no_truncate ON events; \
                 DROP TRIGGER audit_chain_no_truncate ON audit_chain;",
            )
            .await
        }
    }
}

/// The entries of a signed JSON Lines export, as the list shows them: the event lines
/// without their line number, link and seal (docs/audit-format.md).
pub(crate) fn exported_entries(text: &str) -> Vec<Value> {
    text.lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|v| v["kind"] == "event")
        .map(|mut v| {
            let object = v.as_object_mut().unwrap();
            for field in ["n", "kind", "prev", "seal"] {
                assert!(
                    object.remove(field).is_some(),
                    "{field} in every entry line"
                );
            }
            v
        })
        .collect()
}

async fn entries(app: &TestApp, token: &str, query: &str) -> Vec<Value> {
    let response = app.get(&format!("/v1/audit{query}"), token).await;
    assert_eq!(response.status, 200, "{}", response.body);
    response.body["items"].as_array().unwrap().clone()
}

async fn audit_log_answers_who_what_when_why_when_filtered(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let (org, admin) = app.org("enterprise").await;
    let (_other_org, other_admin) = app.org("enterprise").await;
    let team = app.scope(&admin, "team", "research", &org).await;
    let thread = app.scope(&admin, "thread", "t", &team).await;
    let sales = app.scope(&admin, "team", "sales", &org).await;
    app.pause(&admin, &team).await;
    app.post(
        &format!("/v1/scopes/{thread}/rotate"),
        &admin,
        json!({"reason": "quarterly"}),
    )
    .await;
    app.revoke(&admin, &sales).await;
    // The revoke's re-key (system actor) records its steps too; wait for it.
    app.rekeyer.run_pending().await.unwrap();

    let all = entries(&app, &admin, "").await;
    let actions: Vec<&str> = all.iter().map(|e| e["action"].as_str().unwrap()).collect();
    assert_eq!(
        actions,
        [
            "org.create",
            "scope.create",
            "scope.create",
            "scope.create",
            "scope.pause",
            "scope.rotate",
            "scope.revoke",
            "scope.rekey_start",
            "scope.rekey_progress",
            "scope.rekey_complete"
        ]
    );
    assert_eq!(all[9]["actor"], "system:revocation-rekey");
    let pause = &all[4];
    assert_eq!(pause["scope_id"], team.as_str());
    assert_eq!(pause["org_id"], org.as_str());
    assert_eq!(pause["path"], json!([org, team]));
    assert_eq!(pause["reason"], "investigation 4711");
    assert_eq!(pause["actor_kind"], "user");
    assert_eq!(pause["source_address"], "127.0.0.1");
    assert_eq!(pause["event_type"], "ScopePaused");
    assert_eq!(pause["summary"], "paused");
    assert!(pause["request_id"].as_str().is_some_and(|r| !r.is_empty()));
    assert!(all[0]["actor"].as_str().unwrap().starts_with("operator:"));
    assert!(all
        .windows(2)
        .all(|w| w[0]["position"].as_i64() < w[1]["position"].as_i64()));

    // Subtree: the team and everything under it.
    let subtree = entries(&app, &admin, &format!("?scope={team}")).await;
    let ids: Vec<&str> = subtree
        .iter()
        .map(|e| e["scope_id"].as_str().unwrap())
        .collect();
    assert_eq!(
        ids,
        [
            team.as_str(),
            thread.as_str(),
            team.as_str(),
            thread.as_str()
        ]
    );
    // Action and actor.
    assert_eq!(entries(&app, &admin, "?action=scope.revoke").await.len(), 1);
    let actor = pause["actor"].as_str().unwrap();
    assert_eq!(
        entries(&app, &admin, &format!("?actor={actor}"))
            .await
            .len(),
        6
    );
    // Time range: from the pause on.
    let from = pause["recorded_at"].as_str().unwrap();
    let since = entries(&app, &admin, &format!("?from={from}")).await;
    assert_eq!(since.len(), 6);
    assert_eq!(entries(&app, &admin, &format!("?to={from}")).await.len(), 4);
    // Pagination.
    let first = app.get("/v1/audit?limit=4", &admin).await;
    assert_eq!(first.body["items"].as_array().unwrap().len(), 4);
    let cursor = first.str("next_cursor");
    let second = app
        .get(&format!("/v1/audit?limit=4&cursor={cursor}"), &admin)
        .await;
    assert_eq!(second.body["items"].as_array().unwrap().len(), 4);
    let cursor = second.str("next_cursor");
    let third = app
        .get(&format!("/v1/audit?limit=4&cursor={cursor}"), &admin)
        .await;
    assert_eq!(third.body["items"].as_array().unwrap().len(), 2);
    assert!(third.body["next_cursor"].is_null());

    // Another organization sees only its own entries and cannot ask for ours.
    assert_eq!(entries(&app, &other_admin, "").await.len(), 1);
    app.get(&format!("/v1/audit?org={org}"), &other_admin)
        .await
        .assert_problem(404, "not_found");
    app.get(&format!("/v1/audit?scope={team}"), &other_admin)
        .await
        .assert_problem(404, "not_found");
    app.get("/v1/audit?from=yesterday", &admin)
        .await
        .assert_problem(400, "invalid_request");
    app.get("/v1/audit?colour=red", &admin)
        .await
        .assert_problem(400, "invalid_request");
    app.get("/v1/audit", &app.operator_token)
        .await
        .assert_problem(403, "forbidden");
    app.stop().await;
}
on_both_backends!(audit_log_answers_who_what_when_why_when_filtered);

/// An export reads page after page, one page ahead of the writer: whatever the page size
/// (one, a divisor of the count, or more than the count), it yields every entry once, in
/// position order, and the same entries as one big read.
async fn export_covers_the_log_exactly_once_when_paged(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let (org, admin) = app.org("enterprise").await;
    let team = app.scope(&admin, "team", "research", &org).await;
    for _ in 0..2 {
        app.pause(&admin, &team).await;
        app.post(
            &format!("/v1/scopes/{team}/resume"),
            &admin,
            json!({"reason": "done"}),
        )
        .await;
    }
    // Sealed first, so that no seal appears between two reads.
    app.app.refresh().await.unwrap();
    let all = ekm_projections::AuditFilter {
        org_id: org.clone(),
        limit: 1_000,
        ..Default::default()
    };
    let expected = ekm_projections::audit_entries(&app.db, &all).await.unwrap();
    assert_eq!(expected.len(), 6);
    for limit in [1, 2, 3, 4, 6, 7] {
        let mut pages = ekm_projections::audit_pages(
            app.db.clone(),
            ekm_projections::AuditFilter {
                limit,
                ..all.clone()
            },
        );
        let mut got = vec![];
        while let Some(page) = pages.next().await {
            let page = page.unwrap();
            assert!(!page.is_empty() && page.len() <= limit as usize);
            got.extend(page);
        }
        assert_eq!(got, expected, "pages of {limit}");
    }
    app.stop().await;
}

on_both_backends!(export_covers_the_log_exactly_once_when_paged);

async fn export_streams_jsonl_and_csv_when_asked_by_format(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let (org, admin) = app.org("enterprise").await;
    let team = app.scope(&admin, "team", "research", &org).await;
    // A reason crafted to run a formula in a spreadsheet, with a comma and a quote.
    app.post(
        &format!("/v1/scopes/{team}/pause"),
        &admin,
        json!({"reason": "=HYPERLINK(\"x\"), really"}),
    )
    .await;

    let jsonl = app
        .client
        .get(format!("{}/v1/audit/export?format=jsonl", app.base))
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap();
    assert_eq!(jsonl.status(), 200);
    assert_eq!(jsonl.headers()["content-type"], "application/jsonl");
    let text = jsonl.text().await.unwrap();
    let lines = exported_entries(&text);
    assert_eq!(lines.len(), 3);
    assert_eq!(lines[2]["reason"], "=HYPERLINK(\"x\"), really");
    assert_eq!(lines, entries(&app, &admin, "").await);
    // A header, the three entries and the final signed checkpoint.
    assert_eq!(text.lines().count(), 5);

    let csv = app
        .client
        .get(format!("{}/v1/audit/export?format=csv", app.base))
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap();
    assert_eq!(csv.status(), 200);
    let text = csv.text().await.unwrap();
    let rows: Vec<&str> = text.lines().collect();
    assert_eq!(rows.len(), 4);
    assert!(rows[0].starts_with("position,recorded_at,org_id"));
    assert!(
        rows[3].contains("\"'=HYPERLINK(\"\"x\"\"), really\""),
        "{}",
        rows[3]
    );

    app.get("/v1/audit/export?format=xml", &admin)
        .await
        .assert_problem(400, "invalid_request");
    app.stop().await;
}
on_both_backends!(export_streams_jsonl_and_csv_when_asked_by_format);

fn ekm_verify(test_app: &TestApp, org: &str) -> (bool, String) {
    let output = test_app
        .ekm(&["audit", "verify", "--org", org])
        .output()
        .unwrap();
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).to_string(),
    )
}

async fn verify_reports_the_position_when_an_event_is_tampered(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let (org, admin) = app.org("enterprise").await;
    let team = app.scope(&admin, "team", "research", &org).await;
    app.pause(&admin, &team).await;
    app.resume(&admin, &team).await;
    app.pause(&admin, &team).await;

    let report = app
        .get(&format!("/v1/audit/verify?org={org}"), &admin)
        .await;
    assert_eq!(report.body["ok"], true, "{}", report.body);
    assert_eq!(report.body["entries"], 5);
    let (ok, out) = ekm_verify(&app, &org);
    assert!(ok, "{out}");
    assert!(out.starts_with("ok"));

    // An attacker with database access rewrites history: the first pause never had a reason.
    let events = app.db.events_of(&team).await.unwrap();
    let pause = events
        .iter()
        .find(|e| e.event_type == "ScopePaused")
        .unwrap()
        .position;
    app.app.refresh().await.unwrap(); // tampering starts from sealed history (ADR 0020)
    drop_immutability(&app.db).await;
    exec(&app.db, &format!(
        "UPDATE events SET metadata = '{{\"actor_kind\":\"user\",\"actor_id\":\"nobody\"}}' WHERE position = {pause}"
    ))
    .await;
    let report = app
        .get(&format!("/v1/audit/verify?org={org}"), &admin)
        .await;
    assert_eq!(report.body["ok"], false);
    assert_eq!(report.body["first_failure"]["position"], pause);
    assert_eq!(report.body["first_failure"]["problem"], "altered");
    assert_eq!(report.body["first_failure"]["scope_id"], team.as_str());
    let (ok, out) = ekm_verify(&app, &org);
    assert!(!ok, "exit code must be non-zero on tampering");
    assert!(
        out.contains("TAMPERED") && out.contains(&format!("position {pause}")),
        "{out}"
    );
    app.stop().await;
}
on_both_backends!(verify_reports_the_position_when_an_event_is_tampered);

async fn verify_reports_removed_when_events_are_deleted_and_reinserted(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let (org, admin) = app.org("enterprise").await;
    let team = app.scope(&admin, "team", "research", &org).await;
    app.pause(&admin, &team).await;
    app.resume(&admin, &team).await;
    let events = app.db.events_of(&team).await.unwrap();
    let (pause, resume) = (events[1].position, events[2].position);
    app.app.refresh().await.unwrap(); // tampering starts from sealed history (ADR 0020)
    drop_immutability(&app.db).await;

    // Removing the resume: the chain has a seal for an event that is gone.
    // The stored columns only: the audit columns are generated from them.
    let columns = "aggregate_type, aggregate_id, sequence, event_type, event_version, payload, \
                   metadata, position, recorded_at";
    let copy = format!("CREATE TABLE stash AS SELECT {columns} FROM events WHERE position = ");
    exec(&app.db, &format!("{copy}{resume}")).await;
    exec(
        &app.db,
        &format!("DELETE FROM events WHERE position = {resume}"),
    )
    .await;
    let report = app.get("/v1/audit/verify", &admin).await;
    assert_eq!(
        report.body["first_failure"]["problem"], "removed",
        "{}",
        report.body
    );
    assert_eq!(report.body["first_failure"]["position"], resume);

    // Putting it back under a new position inside the sealed range, after moving the pause:
    // the chain no longer matches at the pause.
    exec(&app.db, &format!("UPDATE stash SET position = {pause}")).await;
    exec(
        &app.db,
        &format!("UPDATE events SET position = {resume} WHERE position = {pause}"),
    )
    .await;
    exec(
        &app.db,
        &format!("INSERT INTO events ({columns}) SELECT {columns} FROM stash"),
    )
    .await;
    let report = app.get("/v1/audit/verify", &admin).await;
    assert_eq!(report.body["ok"], false);
    assert_eq!(
        report.body["first_failure"]["position"], pause,
        "{}",
        report.body
    );
    // The database gives the re-inserted row a position of its own at the head (the
    // position trigger still runs), so the first sealed position that fails is the pause's,
    // left empty by the move.
    assert_eq!(report.body["first_failure"]["problem"], "removed");
    let moved = app.db.events_of(&team).await.unwrap();
    assert!(
        moved
            .iter()
            .any(|e| e.event_type == "ScopeResumed" && e.position > resume),
        "the resume was put back at the head"
    );
    app.stop().await;
}
on_both_backends!(verify_reports_removed_when_events_are_deleted_and_reinserted);

async fn verify_reports_altered_when_a_payload_is_edited_and_cli_exports(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let (org, admin) = app.org("enterprise").await;
    let team = app.scope(&admin, "team", "research", &org).await;
    app.pause(&admin, &team).await;

    // The CLI export matches the API, line for line. It holds what the audit chain has
    // sealed (a process of its own cannot catch the server's projections up): let the
    // server seal the pause first.
    app.app.refresh().await.unwrap();
    let output = app
        .ekm(&["audit", "export", "--org", &org, "--format", "jsonl"])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let exported = exported_entries(&String::from_utf8_lossy(&output.stdout));
    assert_eq!(exported, entries(&app, &admin, "").await);

    // Rename the team in its creation event, straight in the database.
    let created = app.db.events_of(&team).await.unwrap()[0].position;
    app.app.refresh().await.unwrap(); // tampering starts from sealed history (ADR 0020)
    drop_immutability(&app.db).await;
    let forged = app.db.events_of(&team).await.unwrap()[0]
        .payload
        .replace("research", "harmless");
    exec(
        &app.db,
        &format!("UPDATE events SET payload = '{forged}' WHERE position = {created}"),
    )
    .await;
    let report = app.get("/v1/audit/verify", &admin).await;
    assert_eq!(report.body["ok"], false);
    assert_eq!(report.body["first_failure"]["position"], created);
    assert_eq!(report.body["first_failure"]["problem"], "altered");
    let (ok, out) = ekm_verify(&app, &org);
    assert!(!ok && out.contains("TAMPERED"), "{out}");
    app.stop().await;
}
on_both_backends!(verify_reports_altered_when_a_payload_is_edited_and_cli_exports);

/// A subtree auditor: `audit:read` granted on a team reads that team's entries (list,
/// export, who could decrypt), and nothing of the organization's own events or of another
/// team.
async fn audit_log_shows_only_the_subtree_when_audit_read_is_granted_on_a_team(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let (org, admin) = app.org("enterprise").await;
    let team = app.scope(&admin, "team", "research", &org).await;
    let other = app.scope(&admin, "team", "sales", &org).await;
    let thread = app.scope(&admin, "thread", "t", &team).await;
    app.grant(&admin, &org, "auditor", "audit:read", Some(&team))
        .await;
    let auditor = app.token(&admin, &org, "auditor", "member").await;
    assert_eq!(app.pause(&admin, &thread).await.status, 200);
    assert_eq!(app.pause(&admin, &other).await.status, 200);

    // The team's entries: the team's and the thread's creation and the thread's pause.
    let seen = entries(&app, &auditor, &format!("?scope={team}")).await;
    let actions: Vec<(&str, &str)> = seen
        .iter()
        .map(|e| {
            (
                e["scope_id"].as_str().unwrap(),
                e["action"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        actions,
        [
            (team.as_str(), "scope.create"),
            (thread.as_str(), "scope.create"),
            (thread.as_str(), "scope.pause"),
        ]
    );
    // Below the team, too.
    assert_eq!(
        entries(&app, &auditor, &format!("?scope={thread}"))
            .await
            .len(),
        2
    );
    // Exported the same way.
    let export = app
        .client
        .get(format!(
            "{}/v1/audit/export?format=jsonl&scope={team}",
            app.base
        ))
        .bearer_auth(&auditor)
        .send()
        .await
        .unwrap();
    assert_eq!(export.status(), 200);
    assert_eq!(exported_entries(&export.text().await.unwrap()).len(), 3);
    // Who could decrypt the thread: answered.
    let at = seen[2]["recorded_at"].as_str().unwrap();
    let who = app
        .get(&format!("/v1/scopes/{thread}/access-at?at={at}"), &auditor)
        .await;
    assert_eq!(who.status, 200, "{}", who.body);

    // Nothing else: the whole organization, its root, another team, the chain's verify.
    for query in [
        String::new(),
        format!("?org={org}"),
        format!("?scope={org}"),
        format!("?scope={other}"),
    ] {
        app.get(&format!("/v1/audit{query}"), &auditor)
            .await
            .assert_problem(403, "forbidden");
    }
    app.get("/v1/audit/export", &auditor)
        .await
        .assert_problem(403, "forbidden");
    app.get("/v1/audit/verify", &auditor)
        .await
        .assert_problem(403, "forbidden");
    app.get(&format!("/v1/scopes/{other}/access-at?at={at}"), &auditor)
        .await
        .assert_problem(403, "forbidden");
    // The org admin still reads everything.
    assert!(entries(&app, &admin, "").await.len() > seen.len());
    app.stop().await;
}
on_both_backends!(audit_log_shows_only_the_subtree_when_audit_read_is_granted_on_a_team);
