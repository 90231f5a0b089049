//! Automatic key rotation (issue 17 §2): an organization's `rotation_period`, which a scope
//! may override and its subtree inherits; the scheduler rotates each key once its current
//! version is that old (actor `system:scheduler`), once, and never under a revoke. The
//! scheduler is asked to look ahead in time (`Scheduler::rotate_due_at`): periods are days.

use serde_json::{json, Value};

use crate::harness::{decrypt, encrypt, Backend, TestApp};
use crate::on_both_backends;

const DAY: i64 = 86_400_000_000;

fn version(scope: &Value) -> u64 {
    scope["key_versions"]
        .as_array()
        .and_then(|v| v.iter().filter_map(|k| k["version"].as_u64()).max())
        .unwrap_or(0)
}

async fn keys_rotate_on_the_nearest_period_once_and_never_under_a_revoke(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let (org, admin) = app.data_org("enterprise", "managed").await;
    let team = app.scope(&admin, "team", "research", &org).await;
    let thread = app.scope(&admin, "thread", "t", &team).await;
    let slow = app.scope(&admin, "team", "archive", &org).await;
    let slow_thread = app.scope(&admin, "thread", "old", &slow).await;
    let gone = app.scope(&admin, "team", "gone", &org).await;
    let ciphertext = encrypt(&app, &admin, &thread, b"secret", "messages")
        .await
        .str("ciphertext");

    // The organization rotates daily; the archive team every 30 days.
    let policy = app
        .call(
            "PUT",
            &format!("/v1/orgs/{org}/policy"),
            Some(&admin),
            Some(json!({"rotation_period": "P1D", "reason": "key hygiene"})),
        )
        .await;
    assert_eq!(policy.status, 200, "{}", policy.body);
    assert_eq!(policy.body["rotation_period"], "P1D");
    assert_eq!(policy.body["revoke_window"], "P7D");
    let set = app
        .call(
            "PUT",
            &format!("/v1/scopes/{slow}/rotation-period"),
            Some(&admin),
            Some(json!({"rotation_period": "P30D"})),
        )
        .await;
    assert_eq!(set.status, 200, "{}", set.body);
    assert_eq!(set.body["rotation_period"], "P30D");
    assert_eq!(set.body["changed"], true);
    assert_eq!(app.revoke(&admin, &gone).await.status, 200);

    // The schedule lists each key's next rotation (revoked subtrees have none), soonest
    // first, page by page.
    let mut listed = vec![];
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            Some(c) => format!("/v1/orgs/{org}/schedule?limit=2&cursor={c}"),
            None => format!("/v1/orgs/{org}/schedule?limit=2"),
        };
        let page = app.get(&path, &admin).await;
        assert_eq!(page.status, 200, "{}", page.body);
        listed.extend(page.body["items"].as_array().cloned().unwrap_or_default());
        match page.body["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => break,
        }
    }
    let rotations: Vec<&Value> = listed
        .iter()
        .filter(|i| i["action"] == "rotation")
        .collect();
    let mut scopes: Vec<&str> = rotations
        .iter()
        .map(|i| i["scope_id"].as_str().unwrap())
        .collect();
    scopes.sort();
    let mut expected = vec![
        org.as_str(),
        team.as_str(),
        thread.as_str(),
        slow.as_str(),
        slow_thread.as_str(),
    ];
    expected.sort();
    assert_eq!(scopes, expected, "{listed:?}");
    let due: Vec<&str> = listed
        .iter()
        .map(|i| i["due_at"].as_str().unwrap())
        .collect();
    assert!(due.windows(2).all(|w| w[0] <= w[1]), "{due:?}");
    assert_eq!(rotations[0]["rotation_period"], "P1D");
    assert_eq!(rotations[0]["key_version"], 1);

    // Nothing is due now: the keys were made moments ago.
    let scheduler = ekm_service::scheduler::Scheduler::new(app.app.clone());
    let now = chrono::Utc::now().timestamp_micros();
    let events = app.db.event_count().await.unwrap();
    scheduler.rotate_due_at(now).await;
    assert_eq!(app.db.event_count().await.unwrap(), events);

    // A day and a half on: the daily scopes rotate once; the archive and the revoked team do
    // not.
    scheduler.rotate_due_at(now + DAY + DAY / 2).await;
    let shown = |id: String| {
        let app = &app;
        let admin = admin.clone();
        async move { app.get(&format!("/v1/scopes/{id}"), &admin).await.body }
    };
    for id in [&org, &team, &thread] {
        assert_eq!(version(&shown(id.clone()).await), 2, "{id}");
    }
    for id in [&slow, &slow_thread, &gone] {
        assert_eq!(version(&shown(id.clone()).await), 1, "{id}");
    }
    // What was sealed before still opens; new data uses the new version.
    assert_eq!(
        decrypt(&app, &admin, &thread, &ciphertext, "messages")
            .await
            .status,
        200
    );
    let sealed = encrypt(&app, &admin, &thread, b"x", "messages").await;
    assert_eq!(sealed.body["key_version"], 2, "{}", sealed.body);
    // Recorded by the scheduler, with the period as the reason.
    let audit = app.get("/v1/audit?action=scope.rotate", &admin).await;
    let items = audit.body["items"].as_array().cloned().unwrap_or_default();
    assert_eq!(items.len(), 3, "{}", audit.body);
    for item in &items {
        assert_eq!(item["actor"], "system:scheduler", "{item}");
        assert!(
            item["reason"].as_str().unwrap_or_default().contains("P1D"),
            "{item}"
        );
    }

    // A policy change that names only the window leaves the period as it is.
    let window = app
        .call(
            "PUT",
            &format!("/v1/orgs/{org}/policy"),
            Some(&admin),
            Some(json!({"revoke_window": "P3D"})),
        )
        .await;
    assert_eq!(window.body["rotation_period"], "P1D", "{}", window.body);
    assert_eq!(window.body["revoke_window"], "P3D");
    // The organization's period lifted (null): only the archive's own period is left.
    let lifted = app
        .call(
            "PUT",
            &format!("/v1/orgs/{org}/policy"),
            Some(&admin),
            Some(json!({"rotation_period": null})),
        )
        .await;
    assert_eq!(lifted.body["revoke_window"], "P3D");
    assert_eq!(
        lifted.body["rotation_period"],
        Value::Null,
        "{}",
        lifted.body
    );
    scheduler.rotate_due_at(now + 40 * DAY).await;
    for id in [&slow, &slow_thread] {
        assert_eq!(version(&shown(id.clone()).await), 2, "{id}");
    }
    for id in [&org, &team, &thread] {
        assert_eq!(version(&shown(id.clone()).await), 2, "{id}");
    }
    app.stop().await;
}
on_both_backends!(keys_rotate_on_the_nearest_period_once_and_never_under_a_revoke);

async fn rotation_periods_are_refused_clearly(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let (org, admin) = app.org("enterprise").await;
    let team = app.scope(&admin, "team", "a", &org).await;
    for body in [
        json!({"rotation_period": "PT1H"}),
        json!({"rotation_period": "P1M"}),
        json!({"rotation_period": "P3651D"}),
        json!({"rotation_period": 90}),
        json!({"period": "P90D"}),
        // Required: `null` lifts, nothing is not a request.
        json!({}),
    ] {
        app.call(
            "PUT",
            &format!("/v1/scopes/{team}/rotation-period"),
            Some(&admin),
            Some(body),
        )
        .await
        .assert_problem(400, "invalid_request");
    }
    // Setting one is a scope control: the standard plan cannot.
    let (standard, standard_admin) = app.org("standard").await;
    app.call(
        "PUT",
        &format!("/v1/orgs/{standard}/policy"),
        Some(&standard_admin),
        Some(json!({"rotation_period": "P90D"})),
    )
    .await
    .assert_problem(403, "plan_required");
    app.stop().await;
}
on_both_backends!(rotation_periods_are_refused_clearly);
