//! The data plane: envelope encryption that obeys pause and revoke, rotation, and keys that
//! a revoke destroys for good.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use serde_json::json;

use crate::harness::{Backend, TestApp};
use crate::on_both_backends;

pub(crate) async fn encrypt(
    app: &TestApp,
    token: &str,
    scope: &str,
    plaintext: &[u8],
    class: &str,
) -> crate::harness::Response {
    app.post(
        &format!("/v1/scopes/{scope}/encrypt"),
        token,
        json!({"plaintext": STANDARD.encode(plaintext), "class": class}),
    )
    .await
}

pub(crate) async fn decrypt(
    app: &TestApp,
    token: &str,
    scope: &str,
    ciphertext: &str,
    class: &str,
) -> crate::harness::Response {
    app.post(
        &format!("/v1/scopes/{scope}/decrypt"),
        token,
        json!({"ciphertext": ciphertext, "class": class}),
    )
    .await
}

pub(crate) async fn managed_org(app: &TestApp) -> (String, String) {
    app.data_org("enterprise", "managed").await
}

async fn round_trips_and_refuses_what_was_not_made_here(backend: Backend) {
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
on_both_backends!(round_trips_and_refuses_what_was_not_made_here);

async fn the_default_tier_covers_credentials_and_mcp_secrets_only(backend: Backend) {
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
on_both_backends!(the_default_tier_covers_credentials_and_mcp_secrets_only);

async fn pause_and_revoke_stop_the_data_plane_for_the_subtree(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let (org, admin) = managed_org(&app).await;
    let team = app.scope(&admin, "team", "research", &org).await;
    let thread = app.scope(&admin, "thread", "t", &team).await;
    let ciphertext = encrypt(&app, &admin, &thread, b"secret", "messages")
        .await
        .str("ciphertext");
    // Warm the cache, then pause the organization: refused at once, cache or not.
    assert_eq!(
        decrypt(&app, &admin, &thread, &ciphertext, "messages")
            .await
            .status,
        200
    );
    app.pause(&admin, &org).await;
    let refused = decrypt(&app, &admin, &thread, &ciphertext, "messages").await;
    refused.assert_problem(409, "scope_paused");
    assert_eq!(refused.body["cause"]["scope_id"], org.as_str());
    encrypt(&app, &admin, &team, b"x", "messages")
        .await
        .assert_problem(409, "scope_paused");
    app.resume(&admin, &org).await;
    assert_eq!(
        decrypt(&app, &admin, &thread, &ciphertext, "messages")
            .await
            .status,
        200
    );

    app.revoke(&admin, &team).await;
    decrypt(&app, &admin, &thread, &ciphertext, "messages")
        .await
        .assert_problem(409, "scope_revoked");
    // The team's key material is shredded; the organization's is untouched.
    assert_eq!(app.db.key_count(&team).await.unwrap(), 0);
    assert!(app.db.key_count(&org).await.unwrap() > 0);
    app.stop().await;
}
on_both_backends!(pause_and_revoke_stop_the_data_plane_for_the_subtree);

async fn rotation_keeps_old_ciphertexts_and_rewrap_moves_them_forward(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let (org, admin) = managed_org(&app).await;
    let team = app.scope(&admin, "team", "research", &org).await;
    let old = encrypt(&app, &admin, &team, b"v1 data", "files")
        .await
        .str("ciphertext");
    let rotated = app
        .post(&format!("/v1/scopes/{team}/rotate"), &admin, json!({}))
        .await;
    assert_eq!(rotated.body["key_versions"][1]["version"], 2);
    assert!(rotated.body["key_versions"][1]["fingerprint"]
        .as_str()
        .is_some_and(|f| f.len() == 32));
    // Rotating the organization re-wraps nothing below: the team's keys still unwrap.
    app.post(&format!("/v1/scopes/{org}/rotate"), &admin, json!({}))
        .await;

    let new = encrypt(&app, &admin, &team, b"v2 data", "files").await;
    assert_eq!(new.body["key_version"], 2);
    assert_eq!(
        STANDARD
            .decode(
                decrypt(&app, &admin, &team, &old, "files")
                    .await
                    .str("plaintext")
            )
            .unwrap(),
        b"v1 data"
    );
    let rewrapped = app
        .post(
            &format!("/v1/scopes/{team}/rewrap"),
            &admin,
            json!({"ciphertext": old, "class": "files"}),
        )
        .await;
    assert_eq!(rewrapped.status, 200, "{}", rewrapped.body);
    assert_eq!(rewrapped.body["key_version"], 2);
    assert!(
        rewrapped.body.get("plaintext").is_none(),
        "rewrap never reveals plaintext"
    );
    let moved = rewrapped.str("ciphertext");
    assert!(moved.starts_with(&format!("ekm1.{team}.2.files.")));
    assert_eq!(
        STANDARD
            .decode(
                decrypt(&app, &admin, &team, &moved, "files")
                    .await
                    .str("plaintext")
            )
            .unwrap(),
        b"v1 data"
    );
    // Events carry fingerprints, never key bytes.
    for event in app.db.events_of(&team).await.unwrap() {
        assert!(!event.payload.contains("wrapped"));
    }
    app.stop().await;
}
on_both_backends!(rotation_keeps_old_ciphertexts_and_rewrap_moves_them_forward);

/// Everything an attacker with a full copy of the database and the master key file can
/// unwrap: organization keys through the master key, then every row whose parent key they
/// already hold, until nothing more opens.
/// Every key an attacker with the live database and the master key can unwrap.
async fn every_recoverable_key(app: &TestApp) -> Vec<ekm_keys::Kek> {
    let master = crate::destruction::master_key(app.data_dir());
    crate::destruction::KeyCopy::take(&app.db)
        .await
        .recover(&[master])
}

async fn revoke_shreds_the_subtree_even_for_someone_with_the_database_and_master_key(
    backend: Backend,
) {
    let app = TestApp::spawn(backend).await;
    let (org, admin) = managed_org(&app).await;
    let team = app.scope(&admin, "team", "research", &org).await;
    let thread = app.scope(&admin, "thread", "t", &team).await;
    let sibling = app.scope(&admin, "team", "sales", &org).await;
    let secret = encrypt(
        &app,
        &admin,
        &thread,
        b"the merger closes friday",
        "messages",
    )
    .await
    .str("ciphertext");
    let kept = encrypt(&app, &admin, &sibling, b"sales numbers", "messages")
        .await
        .str("ciphertext");
    let parse = |text: &str| ekm_keys::Ciphertext::parse(text).unwrap();

    // Before: the attacker's procedure does open the thread's ciphertext (the test can fail).
    let keys = every_recoverable_key(&app).await;
    assert!(keys.iter().any(|k| parse(&secret).open(k).is_ok()));

    app.revoke(&admin, &team).await;
    let keys = every_recoverable_key(&app).await;
    assert!(!keys.is_empty());
    assert!(
        keys.iter().all(|k| parse(&secret).open(k).is_err()),
        "no recoverable key opens the revoked thread's data"
    );
    assert!(
        keys.iter().any(|k| parse(&kept).open(k).is_ok()),
        "the sibling team is untouched"
    );
    app.stop().await;
}
on_both_backends!(revoke_shreds_the_subtree_even_for_someone_with_the_database_and_master_key);

/// Every byte the server keeps: files of the data directory, and (PostgreSQL) every row.
async fn everything_at_rest(app: &TestApp) -> Vec<u8> {
    let mut bytes = vec![];
    for entry in std::fs::read_dir(app.data_dir()).unwrap() {
        let path = entry.unwrap().path();
        if path.is_file() {
            bytes.extend(std::fs::read(&path).unwrap());
        }
    }
    if let ekm_store::Db::Postgres(db) = &app.db {
        let tables: Vec<String> =
            sqlx::query_scalar("SELECT tablename::text FROM pg_tables WHERE schemaname = 'public'")
                .fetch_all(&db.pool)
                .await
                .unwrap();
        for table in tables {
            let rows: Vec<String> =
                sqlx::query_scalar(&format!("SELECT CAST(t.* AS TEXT) FROM {table} t"))
                    .fetch_all(&db.pool)
                    .await
                    .unwrap();
            for row in rows {
                bytes.extend(row.into_bytes());
            }
        }
    }
    bytes
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

async fn no_plaintext_or_data_key_is_ever_at_rest(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let (org, admin) = managed_org(&app).await;
    let team = app.scope(&admin, "team", "research", &org).await;
    let marker = b"PLAINTEXT-MARKER-4711-do-not-store";
    for _ in 0..20 {
        encrypt(&app, &admin, &team, marker, "messages").await;
    }
    let datakey = app
        .post(
            &format!("/v1/scopes/{team}/datakey"),
            &admin,
            json!({"class": "files"}),
        )
        .await;
    let data_key = STANDARD.decode(datakey.str("plaintext")).unwrap();
    app.post(&format!("/v1/scopes/{team}/rotate"), &admin, json!({}))
        .await;
    app.db.close().await;
    let stored = everything_at_rest(&app).await;
    assert!(
        stored.len() > 10_000,
        "the scan read the store: {} bytes",
        stored.len()
    );
    assert!(!contains(&stored, marker));
    assert!(!contains(&stored, STANDARD.encode(marker).as_bytes()));
    assert!(!contains(&stored, &data_key));
    assert!(!contains(&stored, STANDARD.encode(&data_key).as_bytes()));
    assert!(!contains(&stored, hex::encode(&data_key).as_bytes()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_plaintext_at_rest_on_sqlite() {
    no_plaintext_or_data_key_is_ever_at_rest(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_plaintext_at_rest_on_postgres() {
    // The scan reads every table before the pool closes.
    let app = TestApp::spawn(Backend::Postgres).await;
    let (org, admin) = managed_org(&app).await;
    let team = app.scope(&admin, "team", "research", &org).await;
    let marker = b"PLAINTEXT-MARKER-4711-do-not-store";
    encrypt(&app, &admin, &team, marker, "messages").await;
    let datakey = app
        .post(
            &format!("/v1/scopes/{team}/datakey"),
            &admin,
            json!({"class": "files"}),
        )
        .await;
    let data_key = STANDARD.decode(datakey.str("plaintext")).unwrap();
    let stored = everything_at_rest(&app).await;
    assert!(
        contains(&stored, team.as_bytes()),
        "the scan read the tables"
    );
    assert!(!contains(&stored, marker) && !contains(&stored, STANDARD.encode(marker).as_bytes()));
    assert!(
        !contains(&stored, STANDARD.encode(&data_key).as_bytes())
            && !contains(&stored, hex::encode(&data_key).as_bytes())
    );
    app.stop().await;
}

/// Several tasks decrypt as fast as they can while the scope is paused: no decrypt that
/// starts after the pause was acknowledged succeeds, and many did start after it.
async fn no_decrypt_succeeds_after_the_pause_is_acknowledged(backend: Backend) {
    let app = Arc::new(TestApp::spawn(backend).await);
    let (org, admin) = managed_org(&app).await;
    let team = app.scope(&admin, "team", "research", &org).await;
    let ciphertext = encrypt(&app, &admin, &team, b"hot data", "messages")
        .await
        .str("ciphertext");
    let acknowledged: Arc<std::sync::Mutex<Option<Instant>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let late_successes = Arc::new(AtomicUsize::new(0));
    // Decrypts that started after the acknowledgement and have been answered.
    let late_answers = Arc::new(AtomicUsize::new(0));
    let successes = Arc::new(AtomicUsize::new(0));
    let mut tasks = vec![];
    for _ in 0..6 {
        let (app, admin, team, ciphertext) =
            (app.clone(), admin.clone(), team.clone(), ciphertext.clone());
        let (acknowledged, stop, late, answered, ok) = (
            acknowledged.clone(),
            stop.clone(),
            late_successes.clone(),
            late_answers.clone(),
            successes.clone(),
        );
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::SeqCst) {
                let started = Instant::now();
                let response = decrypt(&app, &admin, &team, &ciphertext, "messages").await;
                let after_ack = acknowledged
                    .lock()
                    .unwrap()
                    .is_some_and(|ack| started > ack);
                if response.status == 200 {
                    ok.fetch_add(1, Ordering::SeqCst);
                    if after_ack {
                        late.fetch_add(1, Ordering::SeqCst);
                    }
                } else {
                    response.assert_problem(409, "scope_paused");
                }
                if after_ack {
                    answered.fetch_add(1, Ordering::SeqCst);
                }
            }
        }));
    }
    // Let the hammering run (the key is cached by now), then pause.
    while successes.load(Ordering::SeqCst) < 50 {
        tokio::task::yield_now().await;
    }
    let paused = app.pause(&admin, &org).await;
    *acknowledged.lock().unwrap() = Some(Instant::now());
    assert_eq!(paused.status, 200);
    // Keep hammering until plenty of decrypts that started after the acknowledgement have
    // been answered.
    tokio::time::timeout(std::time::Duration::from_secs(60), async {
        while late_answers.load(Ordering::SeqCst) < 60 {
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("decrypts started after the pause are answered");
    stop.store(true, Ordering::SeqCst);
    for task in tasks {
        task.await.unwrap();
    }
    assert!(late_answers.load(Ordering::SeqCst) >= 60);
    assert_eq!(
        late_successes.load(Ordering::SeqCst),
        0,
        "decrypts that started after the pause response succeeded"
    );
}
on_both_backends!(no_decrypt_succeeds_after_the_pause_is_acknowledged);

/// Two instances on one PostgreSQL database: a pause acknowledged by A stops decrypts on B
/// (which had the key cached) within the documented bound of one second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_instance_stops_decrypting_within_a_second_of_the_pause() {
    let a = TestApp::spawn(Backend::Postgres).await;
    let b = Arc::new(a.peer().await);
    let (org, admin) = managed_org(&a).await;
    let team = a.scope(&admin, "team", "research", &org).await;
    let ciphertext = encrypt(&a, &admin, &team, b"shared", "messages")
        .await
        .str("ciphertext");
    // B reads the grants from the read models, which A's runner brings up a moment after
    // A's answers (ADR 0020): B first catches up with everything committed. (Under a busy
    // core B once answered 403 here.)
    b.app.refresh().await.unwrap();
    assert_eq!(
        decrypt(&b, &admin, &team, &ciphertext, "messages")
            .await
            .status,
        200,
        "B has the key cached"
    );

    let acknowledged: Arc<std::sync::Mutex<Option<Instant>>> = Arc::default();
    let last_success: Arc<std::sync::Mutex<Option<Instant>>> = Arc::default();
    let refused = Arc::new(AtomicBool::new(false));
    let first_refusal: Arc<std::sync::Mutex<Option<Instant>>> = Arc::default();
    let hammer = {
        let first_refusal = first_refusal.clone();
        let (b, admin, team, ciphertext) =
            (b.clone(), admin.clone(), team.clone(), ciphertext.clone());
        let (refused, last_success) = (refused.clone(), last_success.clone());
        tokio::spawn(async move {
            let deadline = Instant::now() + std::time::Duration::from_secs(10);
            while Instant::now() < deadline {
                let started = Instant::now();
                let response = decrypt(&b, &admin, &team, &ciphertext, "messages").await;
                match response.status.as_u16() {
                    200 => *last_success.lock().unwrap() = Some(started),
                    _ => {
                        response.assert_problem(409, "scope_paused");
                        *first_refusal.lock().unwrap() = Some(Instant::now());
                        refused.store(true, Ordering::SeqCst);
                        return;
                    }
                }
            }
        })
    };
    assert_eq!(a.pause(&admin, &org).await.status, 200);
    *acknowledged.lock().unwrap() = Some(Instant::now());
    hammer.await.unwrap();
    assert!(
        refused.load(Ordering::SeqCst),
        "B kept decrypting for 10 s after the pause"
    );
    let ack = acknowledged.lock().unwrap().unwrap();
    let delay = last_success
        .lock()
        .unwrap()
        .map(|t| t.saturating_duration_since(ack))
        .unwrap_or_default();
    let refusal = first_refusal
        .lock()
        .unwrap()
        .map(|t| t.saturating_duration_since(ack))
        .unwrap_or_default();
    eprintln!("cross-instance revocation: last success started {delay:?} after the acknowledgement; first refusal answered {refusal:?} after it");
    assert!(delay < std::time::Duration::from_secs(1), "{delay:?}");
}

async fn changing_tier_changes_coverage_and_keeps_ciphertexts(backend: Backend) {
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
    let old_message = messages.str("ciphertext");
    decrypt(&app, &admin, &team, &old_message, "messages")
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
on_both_backends!(changing_tier_changes_coverage_and_keeps_ciphertexts);

async fn a_cold_key_walks_the_hierarchy_once_then_hits_the_cache(backend: Backend) {
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

on_both_backends!(a_cold_key_walks_the_hierarchy_once_then_hits_the_cache);

async fn retiring_old_versions_destroys_them_and_keeps_children_working(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let (org, admin) = managed_org(&app).await;
    let team = app.scope(&admin, "team", "research", &org).await;
    let thread = app.scope(&admin, "thread", "t", &team).await;
    let in_thread = encrypt(&app, &admin, &thread, b"child data", "messages")
        .await
        .str("ciphertext");
    let v1 = encrypt(&app, &admin, &team, b"old data", "files")
        .await
        .str("ciphertext");
    for _ in 0..2 {
        app.post(&format!("/v1/scopes/{team}/rotate"), &admin, json!({}))
            .await;
    }
    let v3 = encrypt(&app, &admin, &team, b"new data", "files")
        .await
        .str("ciphertext");
    let moved = app
        .post(
            &format!("/v1/scopes/{team}/rewrap"),
            &admin,
            json!({"ciphertext": v1, "class": "files"}),
        )
        .await
        .str("ciphertext");

    let retired = app
        .post(
            &format!("/v1/scopes/{team}/retire"),
            &admin,
            json!({"below": 3, "reason": "quarterly"}),
        )
        .await;
    assert_eq!(retired.status, 200, "{}", retired.body);
    assert_eq!(retired.body["changed"], true);
    let flags: Vec<bool> = retired.body["key_versions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["retired"].as_bool().unwrap())
        .collect();
    assert_eq!(flags, [true, true, false]);
    assert_eq!(
        app.db.key_count(&team).await.unwrap(),
        1,
        "versions 1 and 2 are shredded"
    );

    // The thread's key was wrapped under team version 1: it was re-wrapped, so it still works.
    let child = decrypt(&app, &admin, &thread, &in_thread, "messages").await;
    assert_eq!(child.status, 200, "{}", child.body);
    // What was rewrapped and what is new still decrypt; the old ciphertext never will.
    assert_eq!(
        decrypt(&app, &admin, &team, &moved, "files").await.status,
        200
    );
    assert_eq!(decrypt(&app, &admin, &team, &v3, "files").await.status, 200);
    decrypt(&app, &admin, &team, &v1, "files")
        .await
        .assert_problem(400, "invalid_ciphertext");
    let keys = every_recoverable_key(&app).await;
    let old = ekm_keys::Ciphertext::parse(&v1).unwrap();
    assert!(
        keys.iter().all(|k| old.open(k).is_err()),
        "no key opens a retired version's data"
    );

    let again = app
        .post(
            &format!("/v1/scopes/{team}/retire"),
            &admin,
            json!({"below": 3}),
        )
        .await;
    assert_eq!(again.body["changed"], false);
    app.post(
        &format!("/v1/scopes/{team}/retire"),
        &admin,
        json!({"below": 4}),
    )
    .await
    .assert_problem(400, "invalid_request");
    app.post(
        &format!("/v1/scopes/{team}/retire"),
        &admin,
        json!({"below": 1}),
    )
    .await
    .assert_problem(400, "invalid_request");
    assert_eq!(
        app.get("/v1/audit?action=scope.retire", &admin).await.body["items"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    app.stop().await;
}
on_both_backends!(retiring_old_versions_destroys_them_and_keeps_children_working);
