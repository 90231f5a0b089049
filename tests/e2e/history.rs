//! Time travel ("could thread X be decrypted at 14:02, and if not, who stopped it and why")
//! and blast radius before acting.

use serde_json::json;

use crate::harness::{Backend, TestApp};
use crate::on_both_backends;

async fn scope_as_of_answers_the_past_state_when_given_a_position_or_instant(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let (org, admin) = app.org("enterprise").await;
    let team = app.scope(&admin, "team", "research", &org).await;
    let thread = app.scope(&admin, "thread", "t", &team).await;
    let created = app.db.committed_head().await.unwrap();
    let before_creation = created - 1;
    app.pause(&admin, &org).await;
    let paused_at = app.db.committed_head().await.unwrap();
    app.resume(&admin, &org).await;
    app.revoke(&admin, &team).await;

    let at = |query: String| {
        let path = format!("/v1/scopes/{thread}/state?{query}");
        let (app, admin) = (&app, admin.clone());
        async move { app.get(&path, &admin).await }
    };
    let then = at(format!("position={paused_at}")).await;
    assert_eq!(then.status, 200, "{}", then.body);
    assert_eq!(then.body["effective_state"], "paused");
    assert_eq!(then.body["own_state"], "active");
    assert_eq!(then.body["cause"]["scope_id"], org.as_str());
    assert_eq!(then.body["cause"]["event"], "ScopePaused");
    assert_eq!(then.body["cause"]["reason"], "investigation 4711");
    assert_eq!(then.body["as_of"]["position"], paused_at);
    assert_eq!(then.body["path"], json!([org, team, thread]));

    let at_creation = at(format!("position={created}")).await;
    assert_eq!(at_creation.body["effective_state"], "active");
    assert!(at_creation.body["cause"].is_null());
    at(format!("position={before_creation}"))
        .await
        .assert_problem(404, "not_found");

    // By instant: the time the pause was recorded.
    let pause_entry = app.get("/v1/audit?action=scope.pause", &admin).await;
    let instant = pause_entry.body["items"][0]["recorded_at"]
        .as_str()
        .unwrap()
        .to_owned();
    let by_time = at(format!("at={instant}")).await;
    assert_eq!(
        by_time.body["effective_state"], "paused",
        "{}",
        by_time.body
    );
    assert_eq!(by_time.body["as_of"]["at"], instant.as_str());
    let long_ago = at("at=2001-01-01T00:00:00Z".into()).await;
    long_ago.assert_problem(404, "not_found");

    // Now: revoked by the team.
    let now = at(format!(
        "position={}",
        app.db.committed_head().await.unwrap()
    ))
    .await;
    assert_eq!(now.body["effective_state"], "revoked");
    assert_eq!(now.body["cause"]["scope_id"], team.as_str());

    at("position=-1".into())
        .await
        .assert_problem(400, "invalid_request");
    at("at=last-tuesday".into())
        .await
        .assert_problem(400, "invalid_request");
    at(format!("at={instant}&position=1"))
        .await
        .assert_problem(400, "invalid_request");
    app.get(&format!("/v1/scopes/{thread}/state"), &admin)
        .await
        .assert_problem(400, "invalid_request");
    app.stop().await;
}
on_both_backends!(scope_as_of_answers_the_past_state_when_given_a_position_or_instant);

async fn dry_run_counts_the_blast_radius_and_writes_nothing_when_asked(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let (org, admin) = app.org("enterprise").await;
    let research = app.scope(&admin, "team", "research", &org).await;
    let sales = app.scope(&admin, "team", "sales", &org).await;
    for i in 0..3 {
        app.scope(&admin, "thread", &format!("r{i}"), &research)
            .await;
    }
    app.scope(&admin, "thread", "s0", &sales).await;
    app.scope(&admin, "mcp_connector", "github", &org).await;
    app.pause(&admin, &sales).await;
    let events = app.db.event_count().await.unwrap();

    let dry = app
        .post(
            &format!("/v1/scopes/{org}/pause?dry_run=true"),
            &admin,
            json!({}),
        )
        .await;
    assert_eq!(dry.status, 200, "{}", dry.body);
    assert_eq!(dry.body["dry_run"], true);
    assert_eq!(dry.body["would_change"], true);
    assert_eq!(dry.body["scopes_in_subtree"], 8);
    assert_eq!(dry.body["would_become_inactive"]["total"], 6);
    assert_eq!(
        dry.body["would_become_inactive"]["by_kind"],
        json!({"organization": 1, "team": 1, "thread": 3, "mcp_connector": 1})
    );
    assert_eq!(
        dry.body["already_inactive"]["by_kind"],
        json!({"team": 1, "thread": 1})
    );

    let revoke = app
        .post(
            &format!("/v1/scopes/{research}/revoke?dry_run=true"),
            &admin,
            json!({}),
        )
        .await;
    assert_eq!(revoke.body["action"], "revoke");
    assert_eq!(revoke.body["would_become_inactive"]["total"], 4);
    // Nothing was written, and nothing changed.
    assert_eq!(app.db.event_count().await.unwrap(), events);
    assert_eq!(
        app.get(&format!("/v1/scopes/{org}"), &admin).await.body["own_state"],
        "active"
    );

    // A dry run is refused for the same reasons as the real thing.
    app.revoke(&admin, &sales).await;
    app.post(
        &format!("/v1/scopes/{sales}/pause?dry_run=true"),
        &admin,
        json!({}),
    )
    .await
    .assert_problem(409, "scope_revoked");
    app.post(
        &format!("/v1/scopes/{org}/pause?dry_run=maybe"),
        &admin,
        json!({}),
    )
    .await
    .assert_problem(400, "invalid_request");
    app.stop().await;
}
on_both_backends!(dry_run_counts_the_blast_radius_and_writes_nothing_when_asked);
