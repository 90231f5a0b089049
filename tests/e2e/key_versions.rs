//! The reversible floor before destruction (issue 17 §3): versions below a scope's decryption
//! floor refuse with `key_version_disabled` until it is lowered again, retire destroys only
//! below it, and the key-version list shows each version's use from the access log.

use serde_json::{json, Value};

use crate::harness::{decrypt, encrypt, Backend, Options, Response, TestApp};
use crate::on_both_backends;

async fn set_floor(app: &TestApp, token: &str, scope: &str, version: u32) -> Response {
    app.call(
        "PUT",
        &format!("/v1/scopes/{scope}/min-decryption-version"),
        Some(token),
        Some(json!({"version": version, "reason": "re-encryption done"})),
    )
    .await
}

async fn versions(app: &TestApp, token: &str, scope: &str) -> Vec<Value> {
    let listed = app
        .get(&format!("/v1/scopes/{scope}/key-versions"), token)
        .await;
    assert_eq!(listed.status, 200, "{}", listed.body);
    listed.body["items"].as_array().cloned().unwrap_or_default()
}

async fn floor_disables_old_versions_reversibly_and_guards_retire(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let (org, admin) = app.data_org("enterprise", "managed").await;
    let team = app.scope(&admin, "team", "archive", &org).await;
    let v1 = encrypt(&app, &admin, &team, b"old minutes", "messages")
        .await
        .str("ciphertext");
    for _ in 0..3 {
        assert_eq!(
            decrypt(&app, &admin, &team, &v1, "messages").await.status,
            200
        );
    }
    let rotated = app
        .post(&format!("/v1/scopes/{team}/rotate"), &admin, json!({}))
        .await;
    assert_eq!(rotated.status, 200, "{}", rotated.body);
    let v2 = encrypt(&app, &admin, &team, b"new minutes", "messages")
        .await
        .str("ciphertext");

    // The re-encryption debt: version 1 was opened three times, version 2 not yet.
    let listed = versions(&app, &admin, &team).await;
    assert_eq!(listed.len(), 2);
    assert_eq!(listed[0]["state"], "enabled");
    assert_eq!(listed[0]["decrypts_30d"], 3, "{listed:?}");
    assert!(listed[0]["last_used_at"].is_string());
    assert_eq!(listed[1]["current"], true);
    assert_eq!(listed[1]["decrypts_30d"], 0);
    assert!(listed[1]["last_used_at"].is_string(), "encrypt used it");

    // Retire is refused while version 1 still decrypts.
    app.post(
        &format!("/v1/scopes/{team}/retire"),
        &admin,
        json!({"below": 2}),
    )
    .await
    .assert_problem(409, "conflict");

    // Raised: version 1 refuses at once (its keys were cached), version 2 works.
    let raised = set_floor(&app, &admin, &team, 2).await;
    assert_eq!(raised.status, 200, "{}", raised.body);
    assert_eq!(raised.body["changed"], true);
    assert_eq!(raised.body["min_decryption_version"], 2);
    let refused = decrypt(&app, &admin, &team, &v1, "messages").await;
    refused.assert_problem(403, "key_version_disabled");
    assert_eq!(refused.body["min_decryption_version"], 2);
    app.post(
        &format!("/v1/scopes/{team}/rewrap"),
        &admin,
        json!({"ciphertext": v1, "class": "messages"}),
    )
    .await
    .assert_problem(403, "key_version_disabled");
    assert_eq!(
        decrypt(&app, &admin, &team, &v2, "messages").await.status,
        200
    );
    // What still needs version 1 while it is disabled: the two refusals, counted.
    let disabled = &versions(&app, &admin, &team).await[0];
    assert_eq!(disabled["state"], "disabled");
    assert_eq!(disabled["refused_30d"], 2, "{disabled}");
    assert!(disabled["last_refused_at"].is_string());
    // A made-up ciphertext naming version 1 is not authentic: not counted as a refusal.
    let forged = format!("ekm1.{team}.1.messages.{}", "A".repeat(40));
    decrypt(&app, &admin, &team, &forged, "messages")
        .await
        .assert_problem(400, "invalid_ciphertext");
    assert_eq!(versions(&app, &admin, &team).await[0]["refused_30d"], 2);
    // Usage comes from the access log: a viewer without audit:read does not see it.
    let viewer = app.token(&admin, &org, "viewer", "member").await;
    app.grant(&admin, &org, "viewer", "encryption:view", None)
        .await;
    let seen = app
        .get(&format!("/v1/scopes/{team}/key-versions"), &viewer)
        .await;
    assert_eq!(seen.body["usage"], "needs_audit_read", "{}", seen.body);
    assert!(seen.body["items"][0]["decrypts_30d"].is_null());
    let scope = app.get(&format!("/v1/scopes/{team}"), &admin).await;
    assert_eq!(scope.body["min_decryption_version"], 2);

    // Lowered: reversible, nothing was destroyed.
    let lowered = set_floor(&app, &admin, &team, 1).await;
    assert_eq!(lowered.status, 200, "{}", lowered.body);
    assert_eq!(
        decrypt(&app, &admin, &team, &v1, "messages").await.status,
        200
    );
    assert_eq!(
        set_floor(&app, &admin, &team, 1).await.body["changed"],
        false
    );

    // Bad floors: above the current version, zero, not a number.
    set_floor(&app, &admin, &team, 3)
        .await
        .assert_problem(400, "invalid_request");
    set_floor(&app, &admin, &team, 0)
        .await
        .assert_problem(400, "invalid_request");
    app.call(
        "PUT",
        &format!("/v1/scopes/{team}/min-decryption-version"),
        Some(&admin),
        Some(json!({"version": "2"})),
    )
    .await
    .assert_problem(400, "invalid_request");

    // Raised again, then retired: version 1 is destroyed for good.
    set_floor(&app, &admin, &team, 2).await;
    let retired = app
        .post(
            &format!("/v1/scopes/{team}/retire"),
            &admin,
            json!({"below": 2}),
        )
        .await;
    assert_eq!(retired.status, 200, "{}", retired.body);
    decrypt(&app, &admin, &team, &v1, "messages")
        .await
        .assert_problem(400, "invalid_ciphertext");
    assert_eq!(versions(&app, &admin, &team).await[0]["state"], "destroyed");
    // Lowering the floor now re-enables nothing that was destroyed.
    set_floor(&app, &admin, &team, 1).await;
    decrypt(&app, &admin, &team, &v1, "messages")
        .await
        .assert_problem(400, "invalid_ciphertext");

    // Each move of the floor is an event in the audit log.
    let audit = app
        .get("/v1/audit?action=scope.min_decryption_version", &admin)
        .await;
    assert_eq!(
        audit.body["items"].as_array().map(Vec::len),
        Some(4),
        "{}",
        audit.body
    );
    // Time travel tells the floor as it was.
    let first = audit.body["items"][0]["position"].as_i64().unwrap();
    let before = app
        .get(
            &format!("/v1/scopes/{team}/state?position={}", first - 1),
            &admin,
        )
        .await;
    assert_eq!(before.body["min_decryption_version"], 1, "{}", before.body);
    let after = app
        .get(&format!("/v1/scopes/{team}/state?position={first}"), &admin)
        .await;
    assert_eq!(after.body["min_decryption_version"], 2, "{}", after.body);

    // Another organization learns nothing; a viewer reads, cannot set.
    let (_, stranger) = app.data_org("enterprise", "managed").await;
    set_floor(&app, &stranger, &team, 2)
        .await
        .assert_problem(404, "not_found");
    app.get(&format!("/v1/scopes/{team}/key-versions"), &stranger)
        .await
        .assert_problem(404, "not_found");
    app.stop().await;
}
on_both_backends!(floor_disables_old_versions_reversibly_and_guards_retire);

async fn key_versions_say_so_when_the_access_log_is_off(backend: Backend) {
    let app = TestApp::spawn_with(
        backend,
        Options {
            access_log: ekm_store::AccessLogMode::Off,
            ..Options::default()
        },
    )
    .await;
    let (org, admin) = app.data_org("enterprise", "managed").await;
    let sealed = encrypt(&app, &admin, &org, b"x", "messages").await;
    assert_eq!(sealed.status, 200, "{}", sealed.body);
    let listed = app
        .get(&format!("/v1/scopes/{org}/key-versions"), &admin)
        .await;
    assert_eq!(listed.body["usage"], "access_log_off", "{}", listed.body);
    assert!(listed.body["items"][0]["decrypts_30d"].is_null());
    assert!(listed.body["items"][0]["last_used_at"].is_null());
    app.stop().await;
}
on_both_backends!(key_versions_say_so_when_the_access_log_is_off);
