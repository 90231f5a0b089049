//! Envelope encryption: round trips, what each tier covers, tier changes, and the key
//! cache.

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use serde_json::json;

use super::managed_org;
use crate::harness::{decrypt, encrypt, Backend, TestApp};
use crate::on_both_backends;

async fn decrypt_round_trips_and_refuses_when_not_made_here(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let (org, admin) = managed_org(&app).await;
    let team = app.scope(&admin, "team", "research", &org).await;
    let thread = app.scope(&admin, "thread", "t", &team).await;
    let other = app.scope(&admin, "thread", "u", &team).await;

    let sealed = encrypt(&app, &admin, &thread, b"launch at dawn", "messages").await;
    assert_eq!(sealed.status, 200, "{}", sealed.body);
    assert_eq!(sealed.body["key_version"], 1);
    let ciphertext = sealed.str("ciphertext");
    assert!(ciphertext.starts_with(&format!("ekm1.{thread}.1.messages.")));
    let opened = decrypt(&app, &admin, &thread, &ciphertext, "messages").await;
    assert_eq!(opened.status, 200, "{}", opened.body);
    assert_eq!(
        STANDARD.decode(opened.str("plaintext")).unwrap(),
        b"launch at dawn"
    );

    // Moved to another scope or class, or altered: refused, with a clear code.
    decrypt(&app, &admin, &other, &ciphertext, "messages")
        .await
        .assert_problem(400, "invalid_ciphertext");
    decrypt(&app, &admin, &thread, &ciphertext, "files")
        .await
        .assert_problem(400, "invalid_ciphertext");
    let forged = ciphertext.replace(&thread, &other);
    decrypt(&app, &admin, &other, &forged, "messages")
        .await
        .assert_problem(400, "invalid_ciphertext");
    let mut flipped = ciphertext.clone().into_bytes();
    let last = flipped.len() - 3;
    flipped[last] = if flipped[last] == b'A' { b'B' } else { b'A' };
    decrypt(
        &app,
        &admin,
        &thread,
        &String::from_utf8(flipped).unwrap(),
        "messages",
    )
    .await
    .assert_problem(400, "invalid_ciphertext");
    decrypt(&app, &admin, &thread, "not a ciphertext", "messages")
        .await
        .assert_problem(400, "invalid_ciphertext");

    // A data key: plaintext once, and a ciphertext that decrypts to it.
    let datakey = app
        .post(
            &format!("/v1/scopes/{thread}/datakey"),
            &admin,
            json!({"class": "files"}),
        )
        .await;
    assert_eq!(datakey.status, 200, "{}", datakey.body);
    assert_eq!(STANDARD.decode(datakey.str("plaintext")).unwrap().len(), 32);
    let back = decrypt(&app, &admin, &thread, &datakey.str("ciphertext"), "files").await;
    assert_eq!(back.str("plaintext"), datakey.str("plaintext"));

    // Bad input.
    app.post(
        &format!("/v1/scopes/{thread}/encrypt"),
        &admin,
        json!({"plaintext": "%%%", "class": "messages"}),
    )
    .await
    .assert_problem(400, "invalid_request");
    encrypt(&app, &admin, &thread, b"x", "diaries")
        .await
        .assert_problem(400, "invalid_request");
    let big = vec![7u8; 1024 * 1024 + 1];
    encrypt(&app, &admin, &thread, &big, "files")
        .await
        .assert_problem(413, "invalid_request");
    let large = vec![7u8; 700 * 1024];
    assert_eq!(
        encrypt(&app, &admin, &thread, &large, "files").await.status,
        200,
        "bodies up to 1 MiB of plaintext"
    );
    encrypt(&app, &app.operator_token, &thread, b"x", "messages")
        .await
        .assert_problem(403, "forbidden");
    app.stop().await;
}
on_both_backends!(decrypt_round_trips_and_refuses_when_not_made_here);

async fn encrypt_is_refused_when_the_default_tier_does_not_cover_the_class(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let (org, admin) = app.data_org("standard", "default").await;
    let agent = app.scope(&admin, "agent", "bot", &org).await;
    assert_eq!(
        encrypt(&app, &admin, &agent, b"token", "credentials")
            .await
            .status,
        200
    );
    assert_eq!(
        encrypt(&app, &admin, &agent, b"token", "mcp_secrets")
            .await
            .status,
        200
    );
    encrypt(&app, &admin, &agent, b"hello", "messages")
        .await
        .assert_problem(403, "class_not_covered");
    let (_, other_admin) = app.org("enterprise").await;
    encrypt(&app, &other_admin, &agent, b"x", "credentials")
        .await
        .assert_problem(404, "not_found");
    app.stop().await;
}
on_both_backends!(encrypt_is_refused_when_the_default_tier_does_not_cover_the_class);

async fn change_tier_keeps_ciphertexts_when_coverage_changes(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let (org, admin) = app.data_org("enterprise", "default").await;
    let team = app.scope(&admin, "team", "research", &org).await;
    let credentials = encrypt(&app, &admin, &team, b"api key", "credentials")
        .await
        .str("ciphertext");
    encrypt(&app, &admin, &team, b"hello", "messages")
        .await
        .assert_problem(403, "class_not_covered");

    let changed = app
        .call(
            "PUT",
            &format!("/v1/orgs/{org}/tier"),
            Some(&admin),
            Some(json!({"tier": "managed", "reason": "upgrade"})),
        )
        .await;
    assert_eq!(changed.status, 200, "{}", changed.body);
    assert_eq!(changed.body["tier"], "managed");
    assert_eq!(changed.body["changed"], true);
    // Coverage follows at once, cached keys or not; old ciphertexts still decrypt.
    let messages = encrypt(&app, &admin, &team, b"hello", "messages").await;
    assert_eq!(messages.status, 200, "{}", messages.body);
    assert_eq!(
        decrypt(&app, &admin, &team, &credentials, "credentials")
            .await
            .status,
        200
    );
    let again = app
        .call(
            "PUT",
            &format!("/v1/orgs/{org}/tier"),
            Some(&admin),
            Some(json!({"tier": "managed"})),
        )
        .await;
    assert_eq!(again.body["changed"], false);

    app.call(
        "PUT",
        &format!("/v1/orgs/{org}/tier"),
        Some(&admin),
        Some(json!({"tier": "default"})),
    )
    .await;
    // Downgraded: no new messages are sealed, but the old ones still open, so that the
    // platform can migrate them (issue 17 §4); a rewrap seals, so it is refused too.
    let old_message = messages.str("ciphertext");
    encrypt(&app, &admin, &team, b"hello", "messages")
        .await
        .assert_problem(403, "class_not_covered");
    let opened = decrypt(&app, &admin, &team, &old_message, "messages").await;
    assert_eq!(opened.status, 200, "{}", opened.body);
    app.post(
        &format!("/v1/scopes/{team}/rewrap"),
        &admin,
        json!({"ciphertext": old_message, "class": "messages"}),
    )
    .await
    .assert_problem(403, "class_not_covered");
    app.call(
        "PUT",
        &format!("/v1/orgs/{org}/tier"),
        Some(&admin),
        Some(json!({"tier": "byok"})),
    )
    .await
    .assert_problem(400, "invalid_request");
    app.call(
        "PUT",
        &format!("/v1/orgs/{team}/tier"),
        Some(&admin),
        Some(json!({"tier": "managed"})),
    )
    .await
    .assert_problem(404, "not_found");
    let audit = app.get("/v1/audit?action=org.tier", &admin).await;
    assert_eq!(audit.body["items"].as_array().unwrap().len(), 2);
    // A standard plan cannot leave the default tier.
    let (standard, standard_admin) = app.org("standard").await;
    app.call(
        "PUT",
        &format!("/v1/orgs/{standard}/tier"),
        Some(&standard_admin),
        Some(json!({"tier": "managed"})),
    )
    .await
    .assert_problem(403, "plan_required");
    app.stop().await;
}
on_both_backends!(change_tier_keeps_ciphertexts_when_coverage_changes);

async fn encrypt_walks_the_hierarchy_once_when_the_key_is_cold(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let (org, admin) = managed_org(&app).await;
    let team = app.scope(&admin, "team", "research", &org).await;
    let thread = app.scope(&admin, "thread", "t", &team).await;
    let ciphertext = encrypt(&app, &admin, &thread, b"x", "messages")
        .await
        .str("ciphertext");
    // A fresh instance has nothing cached: beside the first on PostgreSQL, after it on
    // SQLite (one process per data directory).
    let (_first, cold) = match backend {
        Backend::Postgres => {
            let cold = app.peer().await;
            // It reads the grants from the read models: everything committed first.
            cold.app.refresh().await.unwrap();
            (Some(app), cold)
        }
        Backend::Sqlite => {
            let test_db = app.stop_keeping_database().await;
            (None, TestApp::spawn_on(test_db).await)
        }
    };
    let before = cold.app.keys().unwrap_count();
    assert_eq!(
        decrypt(&cold, &admin, &thread, &ciphertext, "messages")
            .await
            .status,
        200
    );
    let walked = cold.app.keys().unwrap_count() - before;
    assert_eq!(
        walked, 4,
        "the thread's key version and the wrapping keys of thread, team and organization, once each"
    );
    for _ in 0..20 {
        assert_eq!(
            decrypt(&cold, &admin, &thread, &ciphertext, "messages")
                .await
                .status,
            200
        );
    }
    assert_eq!(
        cold.app.keys().unwrap_count() - before,
        walked,
        "then only the cache"
    );
}

on_both_backends!(encrypt_walks_the_hierarchy_once_when_the_key_is_cold);

async fn tier_dry_run_lists_the_classes_a_downgrade_stops_encrypting(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let (org, admin) = app.data_org("enterprise", "managed").await;
    let dry = app
        .call(
            "PUT",
            &format!("/v1/orgs/{org}/tier?dry_run=true"),
            Some(&admin),
            Some(json!({"tier": "default"})),
        )
        .await;
    assert_eq!(dry.status, 200, "{}", dry.body);
    assert_eq!(dry.body["would_change"], true);
    assert_eq!(
        dry.body["classes_losing_coverage"],
        json!(["playbooks", "skills", "files", "messages", "threads"])
    );
    assert_eq!(dry.body["classes_gaining_coverage"], json!([]));
    // Nothing was recorded: the tier is still managed.
    let shown = app.get(&format!("/v1/orgs/{org}"), &admin).await;
    assert_eq!(shown.body["tier"], "managed", "{}", shown.body);
    app.call(
        "PUT",
        &format!("/v1/orgs/{org}/tier?dry_run=maybe"),
        Some(&admin),
        Some(json!({"tier": "default"})),
    )
    .await
    .assert_problem(400, "invalid_request");
    // The rules are checked as for the real change.
    let (standard, standard_admin) = app.org("standard").await;
    app.call(
        "PUT",
        &format!("/v1/orgs/{standard}/tier?dry_run=true"),
        Some(&standard_admin),
        Some(json!({"tier": "managed"})),
    )
    .await
    .assert_problem(403, "plan_required");
    app.stop().await;
}
on_both_backends!(tier_dry_run_lists_the_classes_a_downgrade_stops_encrypting);
