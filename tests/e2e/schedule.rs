//! Scheduled actions (issue 17 §2): a pause given `until` resumes on its own, fired once by
//! the scheduler (actor `system:scheduler`) across instances and restarts; the schedule is
//! listed per organization.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::harness::{Backend, Response, TestApp};
use crate::on_both_backends;

/// Polls the scope until its own state is `state`, for at most `within`: the scheduler fires
/// on the clock, so there is no event of ours to await.
async fn own_state_becomes(
    app: &TestApp,
    token: &str,
    scope: &str,
    state: &str,
    within: Duration,
) -> Response {
    let deadline = Instant::now() + within;
    loop {
        let shown = app.get(&format!("/v1/scopes/{scope}"), token).await;
        if shown.body["own_state"] == state || Instant::now() > deadline {
            return shown;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

fn in_ms(ms: i64) -> String {
    (chrono::Utc::now() + chrono::Duration::milliseconds(ms))
        .to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
}

async fn pause_until_resumes_once_when_it_falls_due(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let peer = app.peer().await;
    let (org, admin) = app.data_org("enterprise", "managed").await;
    let team = app.scope(&admin, "team", "incident", &org).await;
    let until = in_ms(1_500);
    let paused = app
        .post(
            &format!("/v1/scopes/{team}/pause"),
            &admin,
            json!({"reason": "investigation 4711", "until": until}),
        )
        .await;
    assert_eq!(paused.status, 200, "{}", paused.body);
    assert_eq!(paused.body["own_state"], "paused");

    // Listed while pending.
    let listed = app.get(&format!("/v1/orgs/{org}/schedule"), &admin).await;
    assert_eq!(listed.status, 200, "{}", listed.body);
    assert_eq!(listed.body["items"][0]["scope_id"], team, "{}", listed.body);
    assert_eq!(listed.body["items"][0]["action"], "resume");

    // Two instances run the scheduler: the resume is recorded once, by the system.
    let resumed = own_state_becomes(&app, &admin, &team, "active", Duration::from_secs(15)).await;
    assert_eq!(resumed.body["own_state"], "active", "{}", resumed.body);
    let audit = app.get("/v1/audit?action=scope.resume", &admin).await;
    let items = audit.body["items"].as_array().cloned().unwrap_or_default();
    assert_eq!(items.len(), 1, "{}", audit.body);
    assert_eq!(items[0]["actor"], "system:scheduler", "{}", items[0]);
    let listed = app.get(&format!("/v1/orgs/{org}/schedule"), &admin).await;
    assert_eq!(listed.body["items"], json!([]), "{}", listed.body);
    // Both instances see it fired (the peer within its projector's reach).
    let on_peer = own_state_becomes(&peer, &admin, &team, "active", Duration::from_secs(10)).await;
    assert_eq!(on_peer.body["own_state"], "active");
    peer.stop().await;
    app.stop().await;
}
on_both_backends!(pause_until_resumes_once_when_it_falls_due);

async fn scheduled_resume_is_cancelled_when_paused_for_good_or_revoked(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let (org, admin) = app.data_org("enterprise", "managed").await;
    let team = app.scope(&admin, "team", "a", &org).await;
    let thread = app.scope(&admin, "thread", "t", &team).await;
    let pause = |scope: String, body: Value| {
        let app = &app;
        let admin = admin.clone();
        async move {
            app.post(&format!("/v1/scopes/{scope}/pause"), &admin, body)
                .await
        }
    };
    // Paused until soon, then paused for good: the resume is cancelled.
    let first = pause(team.clone(), json!({"reason": "r", "until": in_ms(800)})).await;
    assert_eq!(first.status, 200, "{}", first.body);
    let again = pause(team.clone(), json!({"reason": "for good"})).await;
    assert_eq!(again.body["changed"], true, "{}", again.body);
    // A thread under it, paused until soon, whose ancestor is then revoked: never fires.
    let second = pause(thread.clone(), json!({"reason": "r", "until": in_ms(800)})).await;
    assert_eq!(second.status, 200, "{}", second.body);
    assert_eq!(app.revoke(&admin, &team).await.status, 200);
    // Nothing is left for the scheduler to fire (what it fires is this list).
    let listed = app.get(&format!("/v1/orgs/{org}/schedule"), &admin).await;
    assert_eq!(listed.body["items"], json!([]), "{}", listed.body);

    // Bad instants: past, too far, not RFC 3339.
    let other = app.scope(&admin, "team", "b", &org).await;
    for until in [
        in_ms(-1_000),
        in_ms(400 * 24 * 3_600 * 1_000),
        "tomorrow".to_owned(),
    ] {
        pause(other.clone(), json!({"reason": "r", "until": until}))
            .await
            .assert_problem(400, "invalid_request");
    }
    app.stop().await;
}
on_both_backends!(scheduled_resume_is_cancelled_when_paused_for_good_or_revoked);
