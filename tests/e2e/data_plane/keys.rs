//! Key versions: rotation and rewrap, retirement, and what a revoke leaves to someone
//! holding the database and the master key; nothing secret at rest.

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use serde_json::json;

use super::managed_org;
use crate::harness::{decrypt, encrypt, Backend, TestApp};
use crate::on_both_backends;

async fn rotate_keeps_old_ciphertexts_and_rewrap_moves_them_forward(backend: Backend) {
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
on_both_backends!(rotate_keeps_old_ciphertexts_and_rewrap_moves_them_forward);

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

async fn revoke_shreds_the_subtree_when_the_attacker_holds_the_database_and_master_key(
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
on_both_backends!(revoke_shreds_the_subtree_when_the_attacker_holds_the_database_and_master_key);

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
async fn nothing_secret_is_at_rest_when_data_was_encrypted_on_sqlite() {
    no_plaintext_or_data_key_is_ever_at_rest(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_secret_is_at_rest_when_data_was_encrypted_on_postgres() {
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

async fn retire_destroys_old_versions_and_keeps_children_working(backend: Backend) {
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

    // Versions that still decrypt cannot be destroyed: the floor comes first.
    app.post(
        &format!("/v1/scopes/{team}/retire"),
        &admin,
        json!({"below": 3}),
    )
    .await
    .assert_problem(409, "conflict");
    app.floor(&admin, &team, 3).await;
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
on_both_backends!(retire_destroys_old_versions_and_keeps_children_working);
