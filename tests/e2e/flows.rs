//! The user stories of the control plane: create an organization and its tree, pause,
//! resume, revoke, rotate; effective state and cause follow the cascade.

use serde_json::json;

use crate::harness::{Backend, TestApp};
use crate::on_both_backends;

async fn pause_cascades_with_its_cause_when_run_as_the_quick_start(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let (org, admin) = app.org("enterprise").await;
    let team = app.scope(&admin, "team", "research", &org).await;
    let thread = app.scope(&admin, "thread", "launch plans", &team).await;
    let connector = app.scope(&admin, "mcp_connector", "github", &org).await;

    let read = app.get(&format!("/v1/scopes/{thread}"), &admin).await;
    assert_eq!(read.status, 200);
    assert_eq!(read.body["path"], json!([org, team, thread]));
    assert_eq!(read.body["effective_state"], "active");
    assert_eq!(read.body["cause"], json!(null));
    assert_eq!(read.body["org_id"], org.as_str());
    assert_eq!(read.body["parent_id"], team.as_str());
    assert_eq!(read.body["key_versions"][0]["version"], 1);

    // Pausing the organization is one event and reaches every descendant.
    let paused = app.pause(&admin, &org).await;
    assert_eq!(paused.status, 200, "{}", paused.body);
    assert_eq!(paused.body["changed"], true);
    assert_eq!(paused.body["version"], 2);
    assert_eq!(app.db.event_count().await.unwrap(), 5);
    for id in [&team, &thread, &connector] {
        let scope = app.get(&format!("/v1/scopes/{id}"), &admin).await;
        assert_eq!(scope.body["own_state"], "active");
        assert_eq!(scope.body["effective_state"], "paused");
        assert_eq!(scope.body["cause"]["scope_id"], org.as_str());
        assert_eq!(scope.body["cause"]["event"], "ScopePaused");
        assert_eq!(scope.body["cause"]["reason"], "investigation 4711");
        assert!(scope.body["cause"]["actor"]
            .as_str()
            .unwrap()
            .starts_with("user:"));
    }

    // Pausing again changes nothing and records nothing.
    let again = app.pause(&admin, &org).await;
    assert_eq!(again.body["changed"], false);
    assert_eq!(again.body["version"], 2);
    assert_eq!(app.db.event_count().await.unwrap(), 5);

    // Pause the team too, then resume it while the organization is still paused: its own
    // state is active again, its effective state stays paused, and the answer says why.
    assert_eq!(app.pause(&admin, &team).await.body["changed"], true);
    let resumed = app.resume(&admin, &team).await;
    assert_eq!(resumed.body["changed"], true);
    assert_eq!(resumed.body["own_state"], "active");
    assert_eq!(resumed.body["effective_state"], "paused");
    assert_eq!(resumed.body["cause"]["scope_id"], org.as_str());

    // Nothing is created under a paused scope.
    let refused = app
        .post(
            "/v1/scopes",
            &admin,
            json!({"kind": "agent", "name": "bot", "parent_id": team}),
        )
        .await;
    refused.assert_problem(409, "scope_paused");
    assert_eq!(refused.body["cause"]["scope_id"], org.as_str());

    // Resume the organization: everything is active again.
    assert_eq!(app.resume(&admin, &org).await.body["changed"], true);
    let thread_now = app.get(&format!("/v1/scopes/{thread}"), &admin).await;
    assert_eq!(thread_now.body["effective_state"], "active");
    assert_eq!(thread_now.body["cause"], json!(null));

    // The organization endpoint shows the same root.
    let org_json = app.get(&format!("/v1/orgs/{org}"), &admin).await;
    assert_eq!(org_json.status, 200);
    assert_eq!(org_json.body["plan"], "enterprise");
    assert_eq!(org_json.body["tier"], "default");
    assert_eq!(org_json.body["effective_state"], "active");
    app.stop().await;
}
on_both_backends!(pause_cascades_with_its_cause_when_run_as_the_quick_start);

async fn resume_is_refused_when_the_subtree_is_revoked(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let (org, admin) = app.org("enterprise").await;
    let team = app.scope(&admin, "team", "research", &org).await;
    let thread = app.scope(&admin, "thread", "t", &team).await;
    let sibling = app.scope(&admin, "team", "sales", &org).await;

    // Revoke needs the scope's id as confirmation.
    let unconfirmed = app
        .post(
            &format!("/v1/scopes/{team}/revoke"),
            &admin,
            json!({"reason": "r", "confirm": org}),
        )
        .await;
    unconfirmed.assert_problem(400, "invalid_request");
    let missing = app
        .post(
            &format!("/v1/scopes/{team}/revoke"),
            &admin,
            json!({"reason": "r"}),
        )
        .await;
    missing.assert_problem(400, "invalid_request");
    assert_eq!(
        app.get(&format!("/v1/scopes/{team}"), &admin).await.body["own_state"],
        "active"
    );

    // A paused scope can still be revoked; revocation then wins over the pause above.
    app.pause(&admin, &org).await;
    let revoked = app.revoke(&admin, &team).await;
    assert_eq!(revoked.status, 200, "{}", revoked.body);
    assert_eq!(revoked.body["own_state"], "revoked");
    assert_eq!(revoked.body["effective_state"], "revoked");
    assert_eq!(revoked.body["cause"]["scope_id"], team.as_str());
    assert_eq!(revoked.body["cause"]["event"], "ScopeRevoked");
    app.resume(&admin, &org).await;

    // Readable, but every later command on it or below it is refused.
    let thread_json = app.get(&format!("/v1/scopes/{thread}"), &admin).await;
    assert_eq!(thread_json.body["effective_state"], "revoked");
    assert_eq!(thread_json.body["cause"]["scope_id"], team.as_str());
    for action in ["pause", "resume", "rotate"] {
        let on_team = app
            .post(
                &format!("/v1/scopes/{team}/{action}"),
                &admin,
                json!({"reason": "x"}),
            )
            .await;
        on_team.assert_problem(409, "scope_revoked");
        let on_thread = app
            .post(
                &format!("/v1/scopes/{thread}/{action}"),
                &admin,
                json!({"reason": "x"}),
            )
            .await;
        on_thread.assert_problem(409, "scope_revoked");
        assert_eq!(on_thread.body["cause"]["scope_id"], team.as_str());
    }
    app.revoke(&admin, &team)
        .await
        .assert_problem(409, "scope_revoked");
    app.revoke(&admin, &thread)
        .await
        .assert_problem(409, "scope_revoked");
    app.post(
        "/v1/scopes",
        &admin,
        json!({"kind": "thread", "name": "n", "parent_id": team}),
    )
    .await
    .assert_problem(409, "scope_revoked");

    // The sibling is untouched.
    let sibling_json = app.get(&format!("/v1/scopes/{sibling}"), &admin).await;
    assert_eq!(sibling_json.body["effective_state"], "active");
    app.stop().await;
}
on_both_backends!(resume_is_refused_when_the_subtree_is_revoked);

async fn rotate_adds_key_versions_and_children_paginate_when_listed(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let (org, admin) = app.org("enterprise").await;
    let team = app.scope(&admin, "team", "research", &org).await;
    for expected in 2..=3 {
        let rotated = app
            .post(&format!("/v1/scopes/{team}/rotate"), &admin, json!({}))
            .await;
        assert_eq!(rotated.status, 200, "{}", rotated.body);
        assert_eq!(rotated.body["changed"], true);
        let versions = rotated.body["key_versions"].as_array().unwrap();
        assert_eq!(versions.len(), expected);
        assert_eq!(versions.last().unwrap()["version"], expected);
    }
    // Rotation with no body at all is accepted too.
    let bare = app
        .call(
            "POST",
            &format!("/v1/scopes/{team}/rotate"),
            Some(&admin),
            None,
        )
        .await;
    assert_eq!(bare.status, 200, "{}", bare.body);

    let mut created = vec![];
    for i in 0..7 {
        created.push(app.scope(&admin, "thread", &format!("t{i}"), &team).await);
    }
    let mut seen = vec![];
    let mut cursor: Option<String> = None;
    loop {
        let query = match &cursor {
            Some(c) => format!("?limit=3&cursor={c}"),
            None => "?limit=3".to_owned(),
        };
        let page = app
            .get(&format!("/v1/scopes/{team}/children{query}"), &admin)
            .await;
        assert_eq!(page.status, 200, "{}", page.body);
        for item in page.body["items"].as_array().unwrap() {
            seen.push(item["id"].as_str().unwrap().to_owned());
        }
        match page.body["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => break,
        }
    }
    assert_eq!(seen, created);
    app.stop().await;
}
on_both_backends!(rotate_adds_key_versions_and_children_paginate_when_listed);

async fn pause_is_refused_with_412_when_if_match_is_stale(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let (org, admin) = app.org("enterprise").await;
    let team = app.scope(&admin, "team", "research", &org).await;
    let stale = app
        .client
        .post(format!("{}/v1/scopes/{team}/pause", app.base))
        .bearer_auth(&admin)
        .header("if-match", "\"7\"")
        .json(&json!({"reason": "r"}))
        .send()
        .await
        .unwrap();
    assert_eq!(stale.status(), 412);
    assert_eq!(
        app.get(&format!("/v1/scopes/{team}"), &admin).await.body["own_state"],
        "active"
    );
    let fresh = app
        .client
        .post(format!("{}/v1/scopes/{team}/pause", app.base))
        .bearer_auth(&admin)
        .header("if-match", "\"1\"")
        .json(&json!({"reason": "r"}))
        .send()
        .await
        .unwrap();
    assert_eq!(fresh.status(), 200);
    assert_eq!(fresh.headers()["etag"], "\"2\"");
    app.stop().await;
}
on_both_backends!(pause_is_refused_with_412_when_if_match_is_stale);

/// A grant is an event of the organization: the version (ETag) a client reads afterwards is
/// the one If-Match must accept.
async fn pause_is_accepted_when_if_match_has_the_version_read_after_a_grant(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let (org, admin) = app.org("enterprise").await;
    let granted = app
        .post(
            &format!("/v1/orgs/{org}/grants"),
            &admin,
            json!({"principal": "alice", "permission": "data:use"}),
        )
        .await;
    assert_eq!(granted.status, 201, "{}", granted.body);
    let read = app.get(&format!("/v1/scopes/{org}"), &admin).await;
    let version = read.body["version"].as_i64().unwrap();
    assert_eq!(version, 2, "created, then granted: {}", read.body);
    let paused = app
        .client
        .post(format!("{}/v1/scopes/{org}/pause", app.base))
        .bearer_auth(&admin)
        .header("if-match", format!("\"{version}\""))
        .json(&json!({"reason": "r"}))
        .send()
        .await
        .unwrap();
    assert_eq!(paused.status(), 200);
    assert_eq!(paused.headers()["etag"], "\"3\"");
    app.stop().await;
}
on_both_backends!(pause_is_accepted_when_if_match_has_the_version_read_after_a_grant);

async fn scope_controls_are_refused_when_the_plan_is_standard(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let (org, admin) = app.org("standard").await;
    // Scopes can be created; controls need the enterprise plan.
    let team = app.scope(&admin, "team", "research", &org).await;
    app.pause(&admin, &team)
        .await
        .assert_problem(403, "plan_required");
    app.post(&format!("/v1/scopes/{team}/rotate"), &admin, json!({}))
        .await
        .assert_problem(403, "plan_required");
    // And so do the managed and byok tiers.
    app.post(
        "/v1/orgs",
        &app.operator_token,
        json!({"name": "B", "plan": "standard", "tier": "managed"}),
    )
    .await
    .assert_problem(403, "plan_required");
    app.post(
        "/v1/orgs",
        &app.operator_token,
        json!({"name": "B", "plan": "enterprise", "tier": "byok"}),
    )
    .await
    .assert_problem(400, "invalid_request");
    app.stop().await;
}
on_both_backends!(scope_controls_are_refused_when_the_plan_is_standard);

async fn commands_record_actor_request_reason_source_and_time_when_committed(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let (org, admin) = app.org("enterprise").await;
    let response = app
        .client
        .post(format!("{}/v1/scopes/{org}/pause", app.base))
        .bearer_auth(&admin)
        .header("x-request-id", "req-4711")
        .json(&json!({"reason": "investigation 4711"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.headers()["x-request-id"], "req-4711");
    let events = app.db.events_of(&org).await.unwrap();
    let pause = events.last().unwrap();
    assert_eq!(pause.event_type, "ScopePaused");
    assert_eq!(pause.event_version, "1");
    let metadata = pause.metadata_map().unwrap();
    assert_eq!(metadata["request_id"], "req-4711");
    assert_eq!(metadata["reason"], "investigation 4711");
    assert_eq!(metadata["source_address"], "127.0.0.1");
    assert_eq!(metadata["actor_kind"], "user");
    // The actor is the token's principal (the first admin is `admin`), not the token.
    assert_eq!(metadata["actor_id"], "admin");
    assert!(chrono::DateTime::parse_from_rfc3339(&metadata["recorded_at"]).is_ok());
    assert!(pause.position > events[0].position);
    // The admin token's secret is nowhere in the events.
    for event in &events {
        let text = format!("{:?}{:?}", event.payload, event.metadata);
        assert!(!text.contains(&admin));
    }
    app.stop().await;
}
on_both_backends!(commands_record_actor_request_reason_source_and_time_when_committed);

/// A command whose event commits, but whose read models cannot be brought up to it, says so
/// (`committed_unconfirmed`, with the scope's id) instead of failing like a change that did
/// not happen and inviting a repeat. The change is recorded exactly once, and is there as
/// soon as the read models work again.
async fn command_answers_committed_when_it_cannot_be_read_back(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let (org, admin) = app.org("enterprise").await;
    let team = app.scope(&admin, "team", "research", &org).await;
    app.app.refresh().await.unwrap();
    // Every catch-up that reaches a revoke now fails; reads still work.
    let (break_sql, mend_sql) = match backend {
        Backend::Sqlite => (
            "CREATE TRIGGER refuse_revokes BEFORE UPDATE ON scope_view \
             WHEN NEW.own_state = 'revoked' BEGIN SELECT RAISE(ABORT, 'refused by the test'); END;",
            "DROP TRIGGER refuse_revokes",
        ),
        Backend::Postgres => (
            "ALTER TABLE scope_view ADD CONSTRAINT refuse_revokes \
             CHECK (own_state <> 'revoked') NOT VALID",
            "ALTER TABLE scope_view DROP CONSTRAINT refuse_revokes",
        ),
    };
    crate::audit::exec(&app.db, break_sql).await;
    // A revoke is answered once the runner has applied it (its keys go there): it cannot be.
    let response = app.revoke(&admin, &team).await;
    response.assert_problem(500, "committed_unconfirmed");
    assert_eq!(response.str("scope_id"), team);
    let events = app.db.events_of(&team).await.unwrap();
    assert_eq!(events.len(), 2, "recorded exactly once");
    assert_eq!(events[1].event_type, "ScopeRevoked");
    assert_eq!(response.body["position"], events[1].position);

    crate::audit::exec(&app.db, mend_sql).await;
    app.app.refresh().await.unwrap();
    let scope = app.get(&format!("/v1/scopes/{team}"), &admin).await;
    assert_eq!(scope.status, 200, "{}", scope.body);
    assert_eq!(scope.body["effective_state"], "revoked");
    app.stop().await;
}
on_both_backends!(command_answers_committed_when_it_cannot_be_read_back);
