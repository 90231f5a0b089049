//! Pending revocation (issue 17 §1): a revoke waits out a window (the organization's
//! `revoke_window`, P7D by default) during which the scope is `pending_revocation`, refused
//! like paused with `scope_pending_revocation`, and can be cancelled; at its due time the
//! scheduler revokes it, naming the requester and carrying the request's reason.

use std::time::Duration;

use serde_json::json;

use crate::harness::{decrypt, encrypt, own_state_becomes, Backend, TestApp};
use crate::on_both_backends;

/// Microseconds between two RFC 3339 instants.
fn micros_between(from: &str, to: &str) -> i64 {
    let parse = |t: &str| chrono::DateTime::parse_from_rfc3339(t).unwrap();
    (parse(to) - parse(from)).num_microseconds().unwrap()
}

async fn revoke_waits_its_window_refuses_like_paused_and_cancels_back(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let (org, admin) = app.data_org("enterprise", "managed").await;
    let team = app.scope(&admin, "team", "research", &org).await;
    let thread = app.scope(&admin, "thread", "t", &team).await;
    let ciphertext = encrypt(&app, &admin, &thread, b"secret", "messages")
        .await
        .str("ciphertext");
    // Warm the key cache: the pending revocation must refuse all the same.
    assert_eq!(
        decrypt(&app, &admin, &thread, &ciphertext, "messages")
            .await
            .status,
        200
    );

    // The organization's policy says P7D until set.
    let policy = app.get(&format!("/v1/orgs/{org}/policy"), &admin).await;
    assert_eq!(policy.status, 200, "{}", policy.body);
    assert_eq!(policy.body["revoke_window"], "P7D");
    assert_eq!(policy.body["revoke_window_is_default"], true);

    // A dry run says when it would fall due and records nothing.
    let events = app.db.event_count().await.unwrap();
    let dry = app
        .post(
            &format!("/v1/scopes/{team}/revoke?dry_run=true"),
            &admin,
            json!({"after": "P2D"}),
        )
        .await;
    assert_eq!(dry.status, 200, "{}", dry.body);
    assert_eq!(dry.body["action"], "revoke");
    assert!(dry.body["due_at"].is_string(), "{}", dry.body);
    assert_eq!(dry.body["would_become_inactive"]["total"], 2);
    assert_eq!(app.db.event_count().await.unwrap(), events);

    // The revoke with the default window: pending at once, due in seven days.
    let asked = ekm_store::time::rfc3339(chrono::Utc::now());
    let pending = app
        .post(
            &format!("/v1/scopes/{team}/revoke"),
            &admin,
            json!({"reason": "offboarding the research team", "confirm": team}),
        )
        .await;
    assert_eq!(pending.status, 200, "{}", pending.body);
    assert_eq!(pending.body["own_state"], "pending_revocation");
    assert_eq!(pending.body["effective_state"], "pending_revocation");
    let due_at = pending.body["cause"]["due_at"].as_str().unwrap().to_owned();
    assert_eq!(pending.body["revocation_due_at"], due_at.as_str());
    let week = 7 * 86_400 * 1_000_000_i64;
    let ahead = micros_between(&asked, &due_at);
    assert!((week..week + 60_000_000).contains(&ahead), "{due_at}");

    // The subtree follows; the data plane refuses with the code and the due time.
    let child = app.get(&format!("/v1/scopes/{thread}"), &admin).await;
    assert_eq!(child.body["own_state"], "active");
    assert!(
        child.body.get("revocation_due_at").is_none(),
        "{}",
        child.body
    );
    assert_eq!(child.body["effective_state"], "pending_revocation");
    assert_eq!(child.body["cause"]["scope_id"], team.as_str());
    assert_eq!(child.body["cause"]["due_at"], due_at.as_str());
    let refused = decrypt(&app, &admin, &thread, &ciphertext, "messages").await;
    refused.assert_problem(409, "scope_pending_revocation");
    assert_eq!(refused.body["cause"]["scope_id"], team.as_str());
    assert_eq!(refused.body["cause"]["due_at"], due_at.as_str());
    encrypt(&app, &admin, &team, b"x", "messages")
        .await
        .assert_problem(409, "scope_pending_revocation");
    // Nothing new is created under it.
    let created = app
        .post(
            "/v1/scopes",
            &admin,
            json!({"kind": "thread", "name": "late", "parent_id": team}),
        )
        .await;
    assert_eq!(created.status, 409, "{}", created.body);

    // Pause, resume and a second window are refused: a revocation is undone only by name.
    for (action, body) in [
        ("pause", json!({"reason": "r"})),
        ("resume", json!({})),
        (
            "revoke",
            json!({"reason": "r", "confirm": team, "after": "P1D"}),
        ),
    ] {
        app.post(&format!("/v1/scopes/{team}/{action}"), &admin, body)
            .await
            .assert_problem(409, "scope_pending_revocation");
    }
    // Listed in the organization's schedule.
    let listed = app.get(&format!("/v1/orgs/{org}/schedule"), &admin).await;
    assert_eq!(
        listed.body["items"][0]["action"], "revoke",
        "{}",
        listed.body
    );
    assert_eq!(listed.body["items"][0]["scope_id"], team.as_str());

    // Cancelled: active again, the key works, nothing left in the schedule.
    let cancelled = app
        .post(
            &format!("/v1/scopes/{team}/cancel-revocation"),
            &admin,
            json!({"reason": "wrong team"}),
        )
        .await;
    assert_eq!(cancelled.status, 200, "{}", cancelled.body);
    assert_eq!(cancelled.body["own_state"], "active");
    assert_eq!(cancelled.body["changed"], true);
    assert_eq!(
        decrypt(&app, &admin, &thread, &ciphertext, "messages")
            .await
            .status,
        200
    );
    let listed = app.get(&format!("/v1/orgs/{org}/schedule"), &admin).await;
    assert_eq!(listed.body["items"], json!([]), "{}", listed.body);
    // Cancelling again changes nothing; without a reason it is refused.
    let again = app
        .post(
            &format!("/v1/scopes/{team}/cancel-revocation"),
            &admin,
            json!({"reason": "again"}),
        )
        .await;
    assert_eq!(again.body["changed"], false, "{}", again.body);
    app.post(
        &format!("/v1/scopes/{team}/cancel-revocation"),
        &admin,
        json!({}),
    )
    .await
    .assert_problem(400, "invalid_request");

    // A paused scope's revocation, cancelled, leaves it paused.
    app.pause(&admin, &team).await;
    let pending = app
        .post(
            &format!("/v1/scopes/{team}/revoke"),
            &admin,
            json!({"reason": "r", "confirm": team, "after": "PT12H"}),
        )
        .await;
    assert_eq!(pending.body["own_state"], "pending_revocation");
    let cancelled = app
        .post(
            &format!("/v1/scopes/{team}/cancel-revocation"),
            &admin,
            json!({"reason": "keep it paused"}),
        )
        .await;
    assert_eq!(cancelled.body["own_state"], "paused", "{}", cancelled.body);

    // The audit log holds every step, readable by people.
    let audit = app
        .get("/v1/audit?action=scope.revoke_schedule", &admin)
        .await;
    let items = audit.body["items"].as_array().cloned().unwrap_or_default();
    assert_eq!(items.len(), 2, "{}", audit.body);
    let cancels = app
        .get("/v1/audit?action=scope.revoke_cancel", &admin)
        .await;
    assert_eq!(cancels.body["items"].as_array().map(Vec::len), Some(2));
    app.stop().await;
}
on_both_backends!(revoke_waits_its_window_refuses_like_paused_and_cancels_back);

async fn bad_windows_and_policies_are_refused_clearly(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let (org, admin) = app.org("enterprise").await;
    let team = app.scope(&admin, "team", "a", &org).await;
    let revoke = |body: serde_json::Value| {
        let app = &app;
        let admin = admin.clone();
        let team = team.clone();
        async move {
            app.post(&format!("/v1/scopes/{team}/revoke"), &admin, body)
                .await
        }
    };
    for after in ["P1M", "P91D", "7D", "P1.5D", "", "PT-1S"] {
        revoke(json!({"reason": "r", "confirm": team, "after": after}))
            .await
            .assert_problem(400, "invalid_request");
    }
    revoke(json!({"reason": "r", "confirm": team, "after": "P1D", "immediately": true}))
        .await
        .assert_problem(400, "invalid_request");
    // `immediately` still needs the typed confirmation.
    revoke(json!({"reason": "r", "confirm": "nope", "immediately": true}))
        .await
        .assert_problem(400, "invalid_request");
    for body in [
        json!({"revoke_window": "P1Y"}),
        json!({"revoke_window": "P100D"}),
        json!({"revoke_window": 7}),
        json!({"rotation_period": "PT1H"}),
        json!({"rotation_period": "P1M"}),
        json!({"revoke_window": "P1D", "surprise": true}),
    ] {
        app.call(
            "PUT",
            &format!("/v1/orgs/{org}/policy"),
            Some(&admin),
            Some(body),
        )
        .await
        .assert_problem(400, "invalid_request");
    }
    assert_eq!(
        app.get(&format!("/v1/scopes/{team}"), &admin).await.body["own_state"],
        "active"
    );
    app.stop().await;
}
on_both_backends!(bad_windows_and_policies_are_refused_clearly);

async fn revocation_falls_due_once_by_the_scheduler_naming_the_requester(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let (org, admin) = app.data_org("enterprise", "managed").await;
    let team = app.scope(&admin, "team", "research", &org).await;
    // The organization's window, short enough to fall due here.
    let set = app
        .call(
            "PUT",
            &format!("/v1/orgs/{org}/policy"),
            Some(&admin),
            Some(json!({"revoke_window": "PT2S", "reason": "test window"})),
        )
        .await;
    assert_eq!(set.status, 200, "{}", set.body);
    assert_eq!(set.body["revoke_window"], "PT2S");
    assert_eq!(set.body["changed"], true);
    let pending = app
        .post(
            &format!("/v1/scopes/{team}/revoke"),
            &admin,
            json!({"reason": "offboarding 4711", "confirm": team}),
        )
        .await;
    assert_eq!(
        pending.body["own_state"], "pending_revocation",
        "{}",
        pending.body
    );

    let revoked = own_state_becomes(&app, &admin, &team, "revoked", Duration::from_secs(20)).await;
    assert_eq!(revoked.body["own_state"], "revoked", "{}", revoked.body);
    // The revoke's own machinery follows (the re-key that destroys the keys in copies).
    assert!(revoked.body["destruction"].is_object(), "{}", revoked.body);
    let audit = app.get("/v1/audit?action=scope.revoke", &admin).await;
    let items = audit.body["items"].as_array().cloned().unwrap_or_default();
    assert_eq!(items.len(), 1, "{}", audit.body);
    assert_eq!(items[0]["actor"], "system:scheduler", "{}", items[0]);
    assert_eq!(items[0]["reason"], "offboarding 4711", "{}", items[0]);
    let summary = items[0]["summary"].as_str().unwrap_or_default();
    assert!(summary.contains("user:admin"), "{}", items[0]);
    let listed = app.get(&format!("/v1/orgs/{org}/schedule"), &admin).await;
    assert_eq!(listed.body["items"], json!([]), "{}", listed.body);
    app.stop().await;
}
on_both_backends!(revocation_falls_due_once_by_the_scheduler_naming_the_requester);

async fn revocation_is_not_cancelled_once_due_even_if_the_scheduler_is_late(backend: Backend) {
    // No scheduler runs: the revocation falls due and waits to be fired.
    let options = crate::harness::Options {
        scheduler: false,
        ..Default::default()
    };
    let app = TestApp::spawn_with(backend, options).await;
    let (org, admin) = app.data_org("enterprise", "managed").await;
    let team = app.scope(&admin, "team", "research", &org).await;
    let pending = app
        .post(
            &format!("/v1/scopes/{team}/revoke"),
            &admin,
            json!({"reason": "r", "confirm": team, "after": "PT1S"}),
        )
        .await;
    let due_at = pending.body["revocation_due_at"]
        .as_str()
        .unwrap()
        .to_owned();
    // The wall clock has to pass the due time: there is no event to await.
    let due = chrono::DateTime::parse_from_rfc3339(&due_at).unwrap();
    let wait = (due.with_timezone(&chrono::Utc) - chrono::Utc::now())
        .to_std()
        .unwrap_or_default();
    tokio::time::sleep(wait + Duration::from_millis(50)).await;
    let late = app
        .post(
            &format!("/v1/scopes/{team}/cancel-revocation"),
            &admin,
            json!({"reason": "too late"}),
        )
        .await;
    late.assert_problem(409, "conflict");
    assert_eq!(late.body["due_at"], due_at.as_str(), "{}", late.body);
    let still = app.get(&format!("/v1/scopes/{team}"), &admin).await;
    assert_eq!(still.body["own_state"], "pending_revocation");
    encrypt(&app, &admin, &team, b"x", "messages")
        .await
        .assert_problem(409, "scope_pending_revocation");
    app.stop().await;
}
on_both_backends!(revocation_is_not_cancelled_once_due_even_if_the_scheduler_is_late);
