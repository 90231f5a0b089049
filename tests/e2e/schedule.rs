//! Scheduled actions (issue 17 §2): a pause given `until` resumes on its own, fired once by
//! the scheduler (actor `system:scheduler`) across instances and restarts; the schedule is
//! listed per organization.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::harness::{get_when_available, own_state_becomes, Backend, Options, TestApp};
use crate::on_both_backends;

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
    let listed = get_when_available(&app, &format!("/v1/orgs/{org}/schedule"), &admin).await;
    assert_eq!(listed.status, 200, "{}", listed.body);
    assert_eq!(listed.body["items"][0]["scope_id"], team, "{}", listed.body);
    assert_eq!(listed.body["items"][0]["action"], "resume");

    // Two instances run the scheduler: the resume is recorded once, by the system.
    let resumed = own_state_becomes(&app, &admin, &team, "active", Duration::from_secs(15)).await;
    assert_eq!(resumed.body["own_state"], "active", "{}", resumed.body);
    // (Two instances share SQLite's one file here: a read may meet the peer's writer and
    // answer 503, which a client retries.)
    let audit = get_when_available(&app, "/v1/audit?action=scope.resume", &admin).await;
    let items = audit.body["items"].as_array().cloned().unwrap_or_default();
    assert_eq!(items.len(), 1, "{}", audit.body);
    assert_eq!(items[0]["actor"], "system:scheduler", "{}", items[0]);
    let schedule = format!("/v1/orgs/{org}/schedule");
    let listed = get_when_available(&app, &schedule, &admin).await;
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

/// The audit entries of `action` in the caller's organization, polled until there are `n`,
/// for at most `within`: the scheduler fires on the clock.
async fn audit_entries(
    app: &TestApp,
    token: &str,
    action: &str,
    n: usize,
    within: Duration,
) -> Vec<Value> {
    let deadline = Instant::now() + within;
    loop {
        let audit = app.get(&format!("/v1/audit?action={action}"), token).await;
        let items = audit.body["items"].as_array().cloned().unwrap_or_default();
        if items.len() >= n || Instant::now() > deadline {
            return items;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// A grant given `expires_at` counts until that instant and not after, before the scheduler
/// has removed it (here an instance that runs no scheduler refuses it while the removal is
/// still pending); two instances that run one then record the removal once, as
/// `system:scheduler`. Granted again with another expiry, the first expiry never fires. Only
/// org admins are shown grant expiries in the schedule.
async fn a_grant_stops_counting_at_its_expiry_and_its_removal_is_recorded_once(backend: Backend) {
    let app = TestApp::spawn_with(
        backend,
        Options {
            scheduler: false,
            ..Options::default()
        },
    )
    .await;
    let (org, admin) = app.data_org("enterprise", "managed").await;
    let team = app.scope(&admin, "team", "support", &org).await;
    let temporary = app.token(&admin, &org, "agent-7", "member").await;
    let extended = app.token(&admin, &org, "agent-8", "member").await;
    let it_admin = app.token(&admin, &org, "it", "it_admin").await;
    let grant = |principal: &str, expires_at: &str| {
        json!({"principal": principal, "permission": "data:use", "scope_id": team,
               "expires_at": expires_at, "reason": "ticket 4711"})
    };
    let grants = format!("/v1/orgs/{org}/grants");
    let schedule = format!("/v1/orgs/{org}/schedule");

    // Given a grant on the team until soon, granted again until tomorrow
    let soon = in_ms(4_000);
    let first = app.post(&grants, &admin, grant("agent-8", &soon)).await;
    assert_eq!(first.status, 201, "{}", first.body);
    let tomorrow = in_ms(24 * 3_600 * 1_000);
    let again = app.post(&grants, &admin, grant("agent-8", &tomorrow)).await;
    assert_eq!(again.status, 201, "{}", again.body);
    let same = app.post(&grants, &admin, grant("agent-8", &tomorrow)).await;
    assert_eq!(
        (same.status.as_u16(), &same.body["changed"]),
        (200, &json!(false))
    );
    // And another until soon
    let granted = app.post(&grants, &admin, grant("agent-7", &soon)).await;
    assert_eq!(granted.status, 201, "{}", granted.body);
    assert_eq!(
        granted.body["expires_at"],
        soon.as_str(),
        "{}",
        granted.body
    );
    // Then both encrypt, the list shows the expiries, and the schedule the two removals
    for token in [&temporary, &extended] {
        let sealed = crate::harness::encrypt(&app, token, &team, b"hello", "messages").await;
        assert_eq!(sealed.status, 200, "{}", sealed.body);
    }
    let listed = app.get(&grants, &admin).await;
    let expiries: Vec<(&str, &str)> = listed.body["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| {
            (
                g["principal"].as_str().unwrap(),
                g["expires_at"].as_str().unwrap_or(""),
            )
        })
        .collect();
    assert!(
        expiries.contains(&("agent-7", soon.as_str())),
        "{}",
        listed.body
    );
    assert!(
        expiries.contains(&("agent-8", tomorrow.as_str())),
        "{}",
        listed.body
    );
    let items = app.get(&schedule, &admin).await.body["items"].clone();
    assert_eq!(items.as_array().unwrap().len(), 2, "{items}");
    assert_eq!(items[0]["action"], "grant_expiry");
    assert_eq!(items[0]["due_at"], soon.as_str());
    assert_eq!(
        items[0]["grant"],
        json!({"principal": "agent-7", "permission": "data:use", "scope_id": team})
    );
    assert_eq!(items[1]["due_at"], tomorrow.as_str());
    // An IT admin may see the schedule but not the grants
    let shown = app.get(&schedule, &it_admin).await;
    assert_eq!(shown.status, 200, "{}", shown.body);
    assert_eq!(shown.body["items"], json!([]), "{}", shown.body);

    // When the first expiry passes (no scheduler has run)
    let due = chrono::DateTime::parse_from_rfc3339(&soon).unwrap();
    let wait = (due.with_timezone(&chrono::Utc) - chrono::Utc::now()).to_std();
    tokio::time::sleep(wait.unwrap_or_default() + Duration::from_millis(10)).await;
    // Then the expired grant no longer counts, though its removal is still pending
    crate::harness::encrypt(&app, &temporary, &team, b"hello", "messages")
        .await
        .assert_problem(403, "forbidden");
    let sealed = crate::harness::encrypt(&app, &extended, &team, b"hello", "messages").await;
    assert_eq!(sealed.status, 200, "{}", sealed.body);
    let pending = app.get(&schedule, &admin).await;
    assert_eq!(pending.body["items"].as_array().unwrap().len(), 2);

    // When two instances that run the scheduler start (one on SQLite, whose file is meant
    // for one server)
    let mut peers = vec![app.peer().await];
    if backend == Backend::Postgres {
        peers.push(app.peer().await);
    }
    // Then the removal leaves the schedule, recorded once, by the system, with why
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        // A refresh or a listing may meet the peer's writer on SQLite's one file for a
        // moment (503 `unavailable`, retryable): only the final answer is judged.
        let _ = app.app.refresh().await;
        let listed = app.get(&schedule, &admin).await;
        let left = listed.body["items"].clone();
        let done = left.as_array().is_some_and(|items| items.len() == 1);
        if done || Instant::now() > deadline {
            assert_eq!(listed.status, 200, "{}", listed.body);
            assert_eq!(left[0]["grant"]["principal"], "agent-8", "{left}");
            break;
        }
        assert!(
            listed.status == 200 || listed.status == 503,
            "{} {}",
            listed.status,
            listed.body
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let removed = audit_entries(&app, &admin, "grant.remove", 1, Duration::from_secs(5)).await;
    assert_eq!(removed.len(), 1, "{removed:?}");
    assert_eq!(removed[0]["actor"], "system:scheduler", "{}", removed[0]);
    assert!(
        removed[0]["summary"].as_str().unwrap().contains("agent-7"),
        "{}",
        removed[0]
    );
    assert_eq!(
        removed[0]["reason"],
        format!("the grant expired at {soon}"),
        "{}",
        removed[0]
    );

    // Bad instants: past, not RFC 3339, past the year 9999 once in UTC
    for expires_at in [
        in_ms(-1_000),
        "tomorrow".to_owned(),
        "9999-12-31T23:30:00-10:00".to_owned(),
    ] {
        app.post(&grants, &admin, grant("agent-7", &expires_at))
            .await
            .assert_problem(400, "invalid_request");
    }
    for peer in peers {
        peer.stop().await;
    }
    app.stop().await;
}
on_both_backends!(a_grant_stops_counting_at_its_expiry_and_its_removal_is_recorded_once);

/// Many grant expiries of one organization due at one instant (all on its aggregate) are
/// all recorded, once each, without one holding up another.
async fn grant_expiries_of_one_organization_all_fire_when_due_together(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let (org, admin) = app.data_org("enterprise", "managed").await;
    let grants = format!("/v1/orgs/{org}/grants");
    let due = in_ms(3_000);
    let n = 40;
    for i in 0..n {
        let granted = app
            .post(
                &grants,
                &admin,
                json!({"principal": format!("agent-{i}"), "permission": "data:use",
                       "expires_at": due}),
            )
            .await;
        assert_eq!(granted.status, 201, "{}", granted.body);
    }
    let removed = audit_entries(&app, &admin, "grant.remove", n, Duration::from_secs(20)).await;
    assert_eq!(removed.len(), n, "{removed:?}");
    assert!(removed.iter().all(|e| e["actor"] == "system:scheduler"));
    app.app.refresh().await.unwrap();
    let left = app.get(&format!("/v1/orgs/{org}/schedule"), &admin).await;
    assert_eq!(left.body["items"], json!([]), "{}", left.body);
    let listed = app.get(&grants, &admin).await;
    assert!(
        listed.body["items"]
            .as_array()
            .unwrap()
            .iter()
            .all(|g| !g["principal"].as_str().unwrap().starts_with("agent-")),
        "{}",
        listed.body
    );
    app.stop().await;
}
on_both_backends!(grant_expiries_of_one_organization_all_fire_when_due_together);
