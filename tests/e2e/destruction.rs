//! Revocation that holds against copies of the database (ADR 0013): the attacker holds a
//! copy made before the revoke, every row of the database afterwards and the platform's
//! master key, and still opens nothing of the revoked subtree; and no byte of a destroyed
//! key stays in the database's files.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use ekm_keys::{Ciphertext, Kek, LocalMasterKey};
use ekm_store::Db;
use serde_json::Value;

use crate::data_plane::{decrypt, encrypt, managed_org};
use crate::harness::{Backend, TestApp};
use crate::on_both_backends;

/// The key rows of a database, as anyone holding a copy (or a dump, a backup, a replica)
/// has them.
#[derive(Clone, Default)]
pub struct KeyCopy {
    versions: Vec<VersionRow>,
    wrapping: Vec<WrappingRow>,
}

#[derive(Clone)]
struct VersionRow {
    scope: String,
    version: i64,
    wrapped: Vec<u8>,
    parent: Option<(String, i64)>,
    epoch: Option<i64>,
}

#[derive(Clone)]
struct WrappingRow {
    scope: String,
    epoch: i64,
    wrapped: Vec<u8>,
    parent: Option<(String, i64)>,
    master: Option<String>,
}

type VersionTuple = (
    String,
    i64,
    String,
    Option<String>,
    Option<i64>,
    Option<i64>,
);
type WrappingTuple = (
    String,
    i64,
    String,
    Option<String>,
    Option<i64>,
    Option<String>,
);

fn pair(id: Option<String>, n: Option<i64>) -> Option<(String, i64)> {
    id.zip(n)
}

impl KeyCopy {
    pub async fn take(db: &Db) -> KeyCopy {
        let (versions, wrapping): (Vec<VersionTuple>, Vec<WrappingTuple>) = ekm_store::with_write_pool!(db, pool => {
            (
                sqlx::query_as("SELECT scope_id, version, wrapped, parent_id, parent_version, node_epoch FROM key_material")
                    .fetch_all(pool).await.unwrap(),
                sqlx::query_as("SELECT scope_id, epoch, wrapped, parent_id, parent_epoch, master_fingerprint FROM wrapping_keys")
                    .fetch_all(pool).await.unwrap(),
            )
        });
        KeyCopy {
            versions: versions
                .into_iter()
                .map(|(scope, version, wrapped, p, pv, epoch)| VersionRow {
                    scope,
                    version,
                    wrapped: STANDARD.decode(wrapped).unwrap(),
                    parent: pair(p, pv),
                    epoch,
                })
                .collect(),
            wrapping: wrapping
                .into_iter()
                .map(|(scope, epoch, wrapped, p, pe, master)| WrappingRow {
                    scope,
                    epoch,
                    wrapped: STANDARD.decode(wrapped).unwrap(),
                    parent: pair(p, pe),
                    master,
                })
                .collect(),
        }
    }

    /// Every row of every copy, together.
    pub fn merge(copies: &[&KeyCopy]) -> KeyCopy {
        KeyCopy {
            versions: copies.iter().flat_map(|c| c.versions.clone()).collect(),
            wrapping: copies.iter().flat_map(|c| c.wrapping.clone()).collect(),
        }
    }

    /// Every key version an attacker opens with these rows and master keys. The bindings
    /// are written out here as the format has them, not taken from the code under test.
    pub fn recover(&self, masters: &[LocalMasterKey]) -> Vec<Kek> {
        self.recover_from(masters, HashMap::new())
    }

    /// `recover`, for an attacker who may also call the customer's KMS (as the platform
    /// can): organization wrapping keys the customer key wraps are opened through it, after
    /// peeling the platform key's seal with any of `masters`.
    pub async fn recover_with_kms(
        &self,
        masters: &[LocalMasterKey],
        kms: &dyn ekm_kms::MasterKeyProvider,
    ) -> Vec<Kek> {
        let mut opened = HashMap::new();
        // Rows a customer key wraps name it (`aws-kms:…`); the platform key's are its
        // fingerprint alone.
        let customer_wrapped = |r: &&WrappingRow| {
            r.parent.is_none() && r.master.as_deref().is_some_and(|m| m.contains(':'))
        };
        for row in self.wrapping.iter().filter(customer_wrapped) {
            let context = ekm_kms::WrapContext::wrapping_key(&row.scope, row.epoch as u32);
            let mut candidates = vec![row.wrapped.clone()];
            for master in masters {
                if let Ok(inner) = master.open_outer(&row.wrapped, &context.local_binding()) {
                    candidates.push(inner.to_vec());
                }
            }
            for candidate in candidates {
                if let Ok(bytes) = kms.unwrap(&candidate, context).await {
                    opened.insert(
                        (row.scope.clone(), row.epoch),
                        Kek::from_bytes(&bytes).unwrap(),
                    );
                }
            }
        }
        self.recover_from(masters, opened)
    }

    fn recover_from(
        &self,
        masters: &[LocalMasterKey],
        mut wrapping: HashMap<(String, i64), Kek>,
    ) -> Vec<Kek> {
        let mut versions: HashMap<(String, i64), Kek> = HashMap::new();
        loop {
            let before = wrapping.len() + versions.len();
            for row in &self.wrapping {
                let slot = (row.scope.clone(), row.epoch);
                if wrapping.contains_key(&slot) {
                    continue;
                }
                let epoch = row.epoch.to_string();
                let key = match &row.parent {
                    None => masters.iter().find_map(|m| {
                        m.unwrap_bound(
                            &row.wrapped,
                            &[
                                b"ekm-org-wrap-v1".to_vec(),
                                row.scope.as_bytes().to_vec(),
                                epoch.as_bytes().to_vec(),
                            ],
                        )
                        .ok()
                    }),
                    Some((parent, parent_epoch)) => wrapping
                        .get(&(parent.clone(), *parent_epoch))
                        .and_then(|pk| {
                            pk.unwrap_key(
                                &row.wrapped,
                                &[
                                    b"ekm-wrap-v1",
                                    row.scope.as_bytes(),
                                    epoch.as_bytes(),
                                    parent.as_bytes(),
                                    parent_epoch.to_string().as_bytes(),
                                ],
                            )
                            .ok()
                        }),
                };
                if let Some(key) = key {
                    wrapping.insert(slot, key);
                }
            }
            for row in &self.versions {
                let slot = (row.scope.clone(), row.version);
                if versions.contains_key(&slot) {
                    continue;
                }
                let version = row.version.to_string();
                let key = match (&row.epoch, &row.parent) {
                    (Some(epoch), _) => wrapping.get(&(row.scope.clone(), *epoch)).and_then(|w| {
                        w.unwrap_key(
                            &row.wrapped,
                            &[
                                b"ekm-kek-v2",
                                row.scope.as_bytes(),
                                version.as_bytes(),
                                b"epoch",
                                epoch.to_string().as_bytes(),
                            ],
                        )
                        .ok()
                    }),
                    (None, None) => masters
                        .iter()
                        .find_map(|m| m.unwrap(&row.wrapped, &row.scope, row.version as u32).ok()),
                    (None, Some((parent, pv))) => {
                        versions.get(&(parent.clone(), *pv)).and_then(|pk| {
                            pk.unwrap_key(
                                &row.wrapped,
                                &[
                                    row.scope.as_bytes(),
                                    version.as_bytes(),
                                    parent.as_bytes(),
                                    pv.to_string().as_bytes(),
                                ],
                            )
                            .ok()
                        })
                    }
                };
                if let Some(key) = key {
                    versions.insert(slot, key);
                }
            }
            if wrapping.len() + versions.len() == before {
                break;
            }
        }
        versions.into_values().collect()
    }
}

pub fn opens(keys: &[Kek], ciphertext: &str) -> bool {
    let ciphertext = Ciphertext::parse(ciphertext).unwrap();
    keys.iter().any(|k| ciphertext.open(k).is_ok())
}

pub fn master_key(app_dir: &Path) -> LocalMasterKey {
    LocalMasterKey::load(&app_dir.join("master.key"), false)
        .unwrap()
        .unwrap()
}

fn destruction(scope: &Value) -> (String, String) {
    let d = &scope["destruction"];
    (
        d["live"].as_str().unwrap_or("absent").to_owned(),
        d["copies"].as_str().unwrap_or("absent").to_owned(),
    )
}

/// Rotates the platform master key the way `ekm master-key rotate` does: beside the running
/// server on PostgreSQL, with the server stopped on SQLite. Returns the running app.
async fn rotate_master_key(app: TestApp) -> TestApp {
    rotate_master_key_with(app, crate::harness::Options::default()).await
}

async fn rotate_master_key_with(app: TestApp, options: crate::harness::Options) -> TestApp {
    let path = app.data_dir().join("master.key");
    match app.database_url() {
        Some(_) => {
            let db = Db::open(&app.config).await.unwrap();
            let rotation = ekm_api::keys::rotate_local_master_key(&db, &path)
                .await
                .unwrap();
            assert!(rotation.rewrapped >= 1);
            db.close().await;
            app
        }
        None => {
            let config = app.config.clone();
            let test_db = app.stop_keeping_database().await;
            let db = Db::open(&config).await.unwrap();
            ekm_api::keys::rotate_local_master_key(&db, &path)
                .await
                .unwrap();
            db.close().await;
            TestApp::spawn_on_with(test_db, options).await
        }
    }
}

async fn revoke_holds_against_copies_once_the_master_key_is_rotated(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let (org, token) = managed_org(&app).await;
    let team = app.scope(&token, "team", "research", &org).await;
    let thread = app.scope(&token, "thread", "t", &team).await;
    let survivor = app.scope(&token, "thread", "kept", &team).await;
    let ct = |r: crate::harness::Response| r.str("ciphertext");
    let secret = ct(encrypt(
        &app,
        &token,
        &thread,
        b"the merger closes friday",
        "messages",
    )
    .await);
    let team_data = ct(encrypt(&app, &token, &team, b"team notes", "messages").await);
    let kept = ct(encrypt(&app, &token, &survivor, b"kept thread", "messages").await);
    let old_master = master_key(app.data_dir());

    // The attacker's copy, made before the revoke; with the master key it opens the thread
    // (so this test can fail).
    let before = KeyCopy::take(&app.db).await;
    assert!(opens(
        &before.recover(std::slice::from_ref(&old_master)),
        &secret
    ));

    let revoked = app.revoke(&token, &thread).await;
    assert_eq!(revoked.status, 200, "{:?}", revoked.body);
    assert_eq!(destruction(&revoked.body).1, "after_master_key_rotation");
    // The job runs in the background from the revoke on; waiting for it here is
    // deterministic (one run at a time per process).
    app.rekeyer.run_pending().await.unwrap();
    let scope = app.get(&format!("/v1/scopes/{thread}"), &token).await;
    assert_eq!(
        destruction(&scope.body),
        ("done".to_owned(), "after_master_key_rotation".to_owned())
    );
    // A scope below a revoke reports the same; one beside it has no destruction.
    let beside = app.get(&format!("/v1/scopes/{survivor}"), &token).await;
    assert!(beside.body.get("destruction").is_none());

    // The live database alone no longer opens the thread, and still opens the rest.
    let after = KeyCopy::take(&app.db).await;
    let live = after.recover(std::slice::from_ref(&old_master));
    assert!(!opens(&live, &secret));
    assert!(opens(&live, &team_data) && opens(&live, &kept));
    // Every ancestor was re-keyed: the old copy's wrapping keys of the team and the
    // organization are gone from the live database, so the old copy together with today's
    // rows opens the thread only through the old master key.
    let with_old_copy = KeyCopy::merge(&[&before, &after]);
    assert!(
        opens(
            &with_old_copy.recover(std::slice::from_ref(&old_master)),
            &secret
        ),
        "until the master key rotates, an old copy still opens the thread: `copies` says so"
    );

    let app = rotate_master_key(app).await;
    let new_master = master_key(app.data_dir());
    assert_ne!(new_master.fingerprint(), old_master.fingerprint());
    assert!(!app.data_dir().join("master.key.new").exists());
    let rotated = KeyCopy::take(&app.db).await;
    // Everything the platform holds afterwards (every row, the master key) plus every copy
    // ever made: the thread stays closed, the survivors open.
    let everything = KeyCopy::merge(&[&before, &after, &rotated]);
    let keys = everything.recover(&[new_master]);
    assert!(!opens(&keys, &secret), "no copy opens the revoked thread");
    assert!(opens(&keys, &team_data) && opens(&keys, &kept));
    // The server (which loads the rotated key from the file) still serves the survivors.
    for (scope, ciphertext) in [(&team, &team_data), (&survivor, &kept)] {
        let answer = decrypt(&app, &token, scope, ciphertext, "messages").await;
        assert_eq!(answer.status, 200, "{:?}", answer.body);
    }
    let scope = app.get(&format!("/v1/scopes/{thread}"), &token).await;
    assert_eq!(
        destruction(&scope.body),
        ("done".to_owned(), "done".to_owned())
    );
    // The re-key is in the audit log.
    let audit = app
        .get(&format!("/v1/audit?org={org}&scope={thread}"), &token)
        .await;
    let actions: Vec<&str> = audit.body["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["action"].as_str())
        .collect();
    assert_eq!(
        actions[actions.len() - 5..],
        [
            "scope.revoke",
            "scope.rekey_start",
            "scope.rekey_progress",
            "scope.rekey_progress",
            "scope.rekey_complete"
        ],
        "{actions:?}"
    );
    app.stop().await;
}
on_both_backends!(revoke_holds_against_copies_once_the_master_key_is_rotated);

/// The files that hold the key tables: every file of the data directory (SQLite: the
/// database, its WAL and shared memory), or (PostgreSQL) the key tables' relation files,
/// flushed by a checkpoint first. Also any file named in `extra` (old relation files).
async fn key_files(app: &TestApp) -> Vec<PathBuf> {
    match &app.db {
        Db::Sqlite(_) => std::fs::read_dir(app.data_dir())
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.is_file())
            .collect(),
        Db::Postgres(db) => {
            sqlx::query("CHECKPOINT").execute(&db.pool).await.unwrap();
            let dir: String = sqlx::query_scalar("SHOW data_directory")
                .fetch_one(&db.pool)
                .await
                .unwrap();
            let mut files = vec![];
            for table in ["key_material", "wrapping_keys", "master_key_rewraps"] {
                let relative: String =
                    sqlx::query_scalar(&format!("SELECT pg_relation_filepath('{table}')"))
                        .fetch_one(&db.pool)
                        .await
                        .unwrap();
                files.push(Path::new(&dir).join(relative));
            }
            files
        }
    }
}

fn found_in(files: &[PathBuf], needles: &[Vec<u8>]) -> usize {
    let mut found = 0;
    for file in files {
        let Ok(bytes) = std::fs::read(file) else {
            continue;
        };
        for needle in needles {
            if bytes.windows(needle.len()).any(|w| w == needle.as_slice()) {
                found += 1;
            }
        }
    }
    found
}

/// The stored text (base64) of the wrapped keys of `scopes`, and of their wrapping keys.
async fn stored_key_text(db: &Db, scopes: &[&str]) -> Vec<Vec<u8>> {
    let mut out = vec![];
    for scope in scopes {
        let rows: Vec<String> = ekm_store::with_write_pool!(db, pool => {
            sqlx::query_scalar("SELECT wrapped FROM key_material WHERE scope_id = $1 \
                                UNION ALL SELECT wrapped FROM wrapping_keys WHERE scope_id = $1")
                .bind(*scope)
                .fetch_all(pool)
                .await
                .unwrap()
        });
        out.extend(rows.into_iter().map(String::into_bytes));
    }
    out
}

async fn revoke_leaves_no_byte_of_a_destroyed_key_in_the_files(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let (org, token) = managed_org(&app).await;
    let team = app.scope(&token, "team", "research", &org).await;
    let thread = app.scope(&token, "thread", "t", &team).await;
    let _survivor = app.scope(&token, "thread", "kept", &team).await;
    // The thread's keys, and the team's and organization's wrapping keys as they are now
    // (the re-key destroys them).
    let destroyed = stored_key_text(&app.db, &[&thread]).await;
    let old_wrapping: Vec<Vec<u8>> = {
        let rows: Vec<String> = ekm_store::with_write_pool!(&app.db, pool => {
            sqlx::query_scalar("SELECT wrapped FROM wrapping_keys WHERE scope_id = $1 OR scope_id = $2")
                .bind(&team)
                .bind(&org)
                .fetch_all(pool)
                .await
                .unwrap()
        });
        rows.into_iter().map(String::into_bytes).collect()
    };
    assert_eq!(
        destroyed.len(),
        2,
        "the thread's key version and wrapping key"
    );
    assert_eq!(old_wrapping.len(), 2);
    let needles: Vec<Vec<u8>> = destroyed.iter().chain(&old_wrapping).cloned().collect();
    let files_before = key_files(&app).await;
    assert_eq!(
        found_in(&files_before, &needles),
        needles.len(),
        "before the revoke, the files hold every one of them (so this test can fail)"
    );

    assert_eq!(app.revoke(&token, &thread).await.status, 200);
    app.rekeyer.run_pending().await.unwrap();
    let mut files = key_files(&app).await;
    files.extend(files_before);
    assert_eq!(
        found_in(&files, &needles),
        0,
        "no byte of a destroyed key stays in {files:?}"
    );
    app.stop().await;
}
on_both_backends!(revoke_leaves_no_byte_of_a_destroyed_key_in_the_files);

/// BYOK: a copy made while the platform key alone wrapped the organization key, together
/// with everything the platform holds after the switch and a master-key rotation, yields
/// nothing without the customer's KMS.
async fn byok_switch_holds_against_copies_once_the_master_key_is_rotated(backend: Backend) {
    use crate::kms_servers::{aws_environment, Moto};
    let moto = Moto::start().await;
    let arn = moto.create_key().await;
    let options = || {
        crate::byok::options(
            aws_environment(),
            std::time::Duration::from_secs(60),
            std::time::Duration::from_secs(300),
        )
    };
    let app = TestApp::spawn_with(backend, options()).await;
    let (org, token) = managed_org(&app).await;
    let thread = app.scope(&token, "thread", "t", &org).await;
    let secret = encrypt(&app, &token, &thread, b"before byok", "messages")
        .await
        .str("ciphertext");
    let old_master = master_key(app.data_dir());
    let before = KeyCopy::take(&app.db).await;
    assert!(opens(
        &before.recover(std::slice::from_ref(&old_master)),
        &secret
    ));

    let connected = crate::byok::connect(
        &app,
        &token,
        &org,
        serde_json::json!({"provider": "aws-kms", "key_id": arn, "endpoint_url": moto.url, "reason": "go-live"}),
    )
    .await;
    assert_eq!(connected.status, 200, "{:?}", connected.body);
    // Today's rows and the platform key: nothing, the customer's KMS is needed.
    let after = KeyCopy::take(&app.db).await;
    assert!(!opens(
        &after.recover(std::slice::from_ref(&old_master)),
        &secret
    ));
    // Until the platform key rotates, the old copy still opens with it.
    assert!(opens(
        &KeyCopy::merge(&[&before, &after]).recover(std::slice::from_ref(&old_master)),
        &secret
    ));

    let app = rotate_master_key_with(app, options()).await;
    let new_master = master_key(app.data_dir());
    let rotated = KeyCopy::take(&app.db).await;
    let everything = KeyCopy::merge(&[&before, &after, &rotated]);
    assert!(
        !opens(&everything.recover(&[new_master]), &secret),
        "every copy and the platform's keys open nothing without the customer's KMS"
    );
    // With the customer's KMS, the server still decrypts.
    let opened = decrypt(&app, &token, &thread, &secret, "messages").await;
    assert_eq!(opened.status, 200, "{:?}", opened.body);
    app.stop().await;
}
on_both_backends!(byok_switch_holds_against_copies_once_the_master_key_is_rotated);

/// BYOK and a revoke: the platform can still call the customer's key, so a copy made after
/// the switch would open the revoked thread through it if the customer key alone wrapped
/// the organization key. The platform key's seal around it makes the rotation retire that
/// copy too.
async fn byok_revoke_holds_against_copies_even_with_the_customer_kms(backend: Backend) {
    use crate::kms_servers::{aws_environment, Moto};
    let moto = Moto::start().await;
    let arn = moto.create_key().await;
    let options = || {
        crate::byok::options(
            aws_environment(),
            std::time::Duration::from_secs(60),
            std::time::Duration::from_secs(300),
        )
    };
    let app = TestApp::spawn_with(backend, options()).await;
    let (org, token) = managed_org(&app).await;
    let connected = crate::byok::connect(
        &app,
        &token,
        &org,
        serde_json::json!({"provider": "aws-kms", "key_id": arn, "endpoint_url": moto.url, "reason": "go-live"}),
    )
    .await;
    assert_eq!(connected.status, 200, "{:?}", connected.body);
    let team = app.scope(&token, "team", "research", &org).await;
    let thread = app.scope(&token, "thread", "t", &team).await;
    let secret = encrypt(&app, &token, &thread, b"byok secret", "messages")
        .await
        .str("ciphertext");
    let kms = ekm_kms::provider_for(
        &ekm_domain::MasterKeyRef::parse(ekm_domain::Provider::AwsKms, &arn, None, Some(&moto.url))
            .unwrap(),
        &options().kms.settings,
    )
    .await
    .unwrap();
    let old_master = master_key(app.data_dir());
    let before = KeyCopy::take(&app.db).await;
    // With the KMS and the platform key, the copy opens the thread (the test can fail).
    assert!(opens(
        &before
            .recover_with_kms(std::slice::from_ref(&old_master), kms.as_ref())
            .await,
        &secret
    ));
    // With the KMS alone, nothing: the platform key's seal is needed too.
    assert!(!opens(
        &before.recover_with_kms(&[], kms.as_ref()).await,
        &secret
    ));

    assert_eq!(app.revoke(&token, &thread).await.status, 200);
    app.rekeyer.run_pending().await.unwrap();
    let app = rotate_master_key_with(app, options()).await;
    let new_master = master_key(app.data_dir());
    let everything = KeyCopy::merge(&[&before, &KeyCopy::take(&app.db).await]);
    assert!(
        !opens(
            &everything
                .recover_with_kms(&[new_master], kms.as_ref())
                .await,
            &secret
        ),
        "no copy opens the revoked thread, even with the customer's KMS"
    );
    app.stop().await;
}
on_both_backends!(byok_revoke_holds_against_copies_even_with_the_customer_kms);

/// The re-key job stopped at arbitrary points (its future dropped mid-transaction, as a
/// kill -9 would stop it) and started again: no survivor's key is ever lost, every step is
/// recorded once, and in the end the revoked thread is destroyed.
async fn rekey_interrupted_anywhere_resumes_and_loses_nothing(backend: Backend) {
    use rand::{Rng, SeedableRng};
    let app = TestApp::spawn_with(
        backend,
        crate::harness::Options {
            rekey_in_background: false,
            ..Default::default()
        },
    )
    .await;
    let (org, token) = managed_org(&app).await;
    let team = app.scope(&token, "team", "research", &org).await;
    let doomed = app.scope(&token, "thread", "doomed", &team).await;
    let secret = encrypt(&app, &token, &doomed, b"gone", "messages")
        .await
        .str("ciphertext");
    let mut kept = vec![encrypt(&app, &token, &team, b"team", "messages")
        .await
        .str("ciphertext")];
    for i in 0..12 {
        let thread = app.scope(&token, "thread", &format!("t{i}"), &team).await;
        kept.push(
            encrypt(&app, &token, &thread, b"kept", "messages")
                .await
                .str("ciphertext"),
        );
    }
    let master = master_key(app.data_dir());
    assert_eq!(app.revoke(&token, &doomed).await.status, 200);

    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut attempts = 0;
    loop {
        attempts += 1;
        assert!(attempts < 500, "the re-key never finished");
        // Two keys per transaction, so that a crash lands between batches too.
        let job = ekm_api::rekey::Rekeyer::with_batch(app.app.clone(), 2);
        let finished = crate::rebuild::CrashAfter {
            inner: Box::pin(async move { job.run_pending().await }),
            polls: if attempts <= 5 {
                rng.random_range(1..15)
            } else {
                rng.random_range(1..200)
            },
        }
        .await;
        // Whatever the crash left behind, every survivor still opens.
        let keys = KeyCopy::take(&app.db)
            .await
            .recover(std::slice::from_ref(&master));
        for ciphertext in &kept {
            assert!(opens(&keys, ciphertext), "a survivor's key was lost");
        }
        if matches!(finished, Some(Ok(_))) {
            let scope = app.get(&format!("/v1/scopes/{doomed}"), &token).await;
            if destruction(&scope.body).0 == "done" {
                break;
            }
        }
    }
    assert!(attempts > 5, "the first attempts crashed");
    let keys = KeyCopy::take(&app.db).await.recover(&[master]);
    assert!(!opens(&keys, &secret));
    let audit = app
        .get(&format!("/v1/audit?org={org}&scope={doomed}"), &token)
        .await;
    let mut actions: Vec<&str> = audit.body["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["action"].as_str())
        .filter(|a| a.starts_with("scope.rekey"))
        .collect();
    actions.sort_unstable();
    assert_eq!(
        actions,
        [
            "scope.rekey_complete",
            "scope.rekey_progress",
            "scope.rekey_progress",
            "scope.rekey_start"
        ],
        "every step recorded once"
    );
    app.stop().await;
}
on_both_backends!(rekey_interrupted_anywhere_resumes_and_loses_nothing);

/// `ekm master-key rotate` as an operator runs it: refused beside a running server on
/// SQLite, beside running servers on PostgreSQL (which then load the new key from the file,
/// even to create an organization, whose key they would otherwise wrap with the old one).
fn cli_rotates_the_platform_master_key(backend: Backend) {
    use crate::process::{call, mode, read_token, serve};
    use std::process::Command;
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let test_db = runtime.block_on(crate::harness::TestDb::new(backend));
    let url = test_db.url.clone();
    let dir = test_db.data_dir().join("rotate");
    let rotate = || {
        let mut command = Command::new(env!("CARGO_BIN_EXE_ekm"));
        command
            .args(["master-key", "rotate", "--json", "--data-dir"])
            .arg(&dir)
            .env_remove("EKM_DATABASE_URL");
        if let Some(url) = &url {
            command.args(["--database-url", url]);
        }
        command.output().unwrap()
    };
    let server = serve(&dir, url.as_deref());
    let operator = read_token(&dir);
    let (status, org) = call(
        "POST",
        &format!("{}/v1/orgs", server.base),
        &operator,
        Some(serde_json::json!({"name": "Acme", "plan": "enterprise", "tier": "managed"})),
    );
    assert_eq!(status, 201, "{org}");
    let (org_id, admin) = (org.str_of("id"), org.str_of("admin_token"));
    let base = server.base.clone();
    let (status, _) = call(
        "POST",
        &format!("{base}/v1/orgs/{org_id}/grants"),
        &admin,
        Some(serde_json::json!({"principal": "admin", "permission": "data:use"})),
    );
    assert_eq!(status, 201);
    let (status, sealed) = call(
        "POST",
        &format!("{base}/v1/scopes/{org_id}/encrypt"),
        &admin,
        Some(serde_json::json!({"plaintext": "aGVsbG8=", "class": "messages"})),
    );
    assert_eq!(status, 200, "{sealed}");
    let ciphertext = sealed.str_of("ciphertext");
    let before = master_key(&dir).fingerprint();

    let server = if url.is_none() {
        let refused = rotate();
        assert!(!refused.status.success());
        assert!(String::from_utf8_lossy(&refused.stderr).contains("another ekm process"));
        assert_eq!(server.terminate().0, 0);
        None
    } else {
        Some(server)
    };
    let output = rotate();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let report: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(report["old_fingerprint"], before.as_str());
    let after = master_key(&dir).fingerprint();
    assert_eq!(report["new_fingerprint"], after.as_str());
    assert_ne!(before, after);
    assert_eq!(report["rewrapped"], 1);
    assert_eq!(mode(&dir.join("master.key")), 0o600);
    assert!(!dir.join("master.key.new").exists());

    let server = server.unwrap_or_else(|| serve(&dir, url.as_deref()));
    let base = server.base.clone();
    let (status, opened) = call(
        "POST",
        &format!("{base}/v1/scopes/{org_id}/decrypt"),
        &admin,
        Some(serde_json::json!({"ciphertext": ciphertext, "class": "messages"})),
    );
    assert_eq!(
        (status, opened.str_of("plaintext")),
        (200, "aGVsbG8=".into())
    );
    // A new organization's key is wrapped with the new key.
    let (status, second) = call(
        "POST",
        &format!("{base}/v1/orgs"),
        &operator,
        Some(serde_json::json!({"name": "Beta", "plan": "enterprise", "tier": "managed"})),
    );
    assert_eq!(status, 201, "{second}");
    let config = match &url {
        Some(_) => test_db.config.clone(),
        None => ekm_store::DbConfig::sqlite_in(&dir),
    };
    let db = runtime.block_on(ekm_store::Db::connect(&config)).unwrap();
    let rows = runtime
        .block_on(db.wrapping_keys(&second.str_of("id")))
        .unwrap();
    assert_eq!(rows[0].master_fingerprint.as_deref(), Some(after.as_str()));
    runtime.block_on(db.close());
    assert_eq!(server.terminate().0, 0);
}

trait StrOf {
    fn str_of(&self, key: &str) -> String;
}

impl StrOf for Value {
    fn str_of(&self, key: &str) -> String {
        self[key].as_str().unwrap_or_default().to_owned()
    }
}

#[test]
fn cli_rotates_the_platform_master_key_with_the_sqlite_server_stopped() {
    cli_rotates_the_platform_master_key(Backend::Sqlite);
}

#[test]
fn cli_rotates_the_platform_master_key_beside_a_running_postgres_server() {
    cli_rotates_the_platform_master_key(Backend::Postgres);
}

/// The platform master key kept in a KMS (`--master-key aws-kms:ARN`, a real moto_server):
/// moved there from the file by a rotation, after which the data directory holds no key
/// file, a server without the flag is refused clearly, and rotations keep it in the KMS.
fn platform_master_key_lives_in_a_kms(backend: Backend) {
    use crate::process::{call, read_token, serve, serve_configured};
    use std::process::Command;
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let moto = runtime.block_on(crate::kms_servers::Moto::start());
    let arn = runtime.block_on(moto.create_key());
    let test_db = runtime.block_on(crate::harness::TestDb::new(backend));
    let url = test_db.url.clone();
    let dir = test_db.data_dir().join("kms");
    let spec = format!("aws-kms:{arn}");
    let creds = [
        ("AWS_ACCESS_KEY_ID", "testing"),
        ("AWS_SECRET_ACCESS_KEY", "testing"),
    ];
    let kms_flags = ["--master-key", &spec, "--master-key-endpoint", &moto.url];
    let ekm = |args: &[&str]| {
        let mut command = Command::new(env!("CARGO_BIN_EXE_ekm"));
        command
            .args(args)
            .arg("--data-dir")
            .arg(&dir)
            .env_remove("EKM_DATABASE_URL")
            .envs(creds);
        if let Some(url) = &url {
            command.args(["--database-url", url]);
        }
        command.output().unwrap()
    };
    let server = serve(&dir, url.as_deref());
    let operator = read_token(&dir);
    let (status, org) = call(
        "POST",
        &format!("{}/v1/orgs", server.base),
        &operator,
        Some(serde_json::json!({"name": "Acme", "plan": "enterprise", "tier": "managed"})),
    );
    assert_eq!(status, 201, "{org}");
    let (org_id, admin) = (org.str_of("id"), org.str_of("admin_token"));
    let base = server.base.clone();
    call(
        "POST",
        &format!("{base}/v1/orgs/{org_id}/grants"),
        &admin,
        Some(serde_json::json!({"principal": "admin", "permission": "data:use"})),
    );
    let (_, sealed) = call(
        "POST",
        &format!("{base}/v1/scopes/{org_id}/encrypt"),
        &admin,
        Some(serde_json::json!({"plaintext": "aGk=", "class": "messages"})),
    );
    let ciphertext = sealed.str_of("ciphertext");
    assert_eq!(server.terminate().0, 0);

    // Into the KMS.
    let to = [
        "master-key",
        "rotate",
        "--json",
        "--to",
        &spec,
        "--master-key-endpoint",
        &moto.url,
    ];
    let moved = ekm(&to);
    assert!(
        moved.status.success(),
        "{}",
        String::from_utf8_lossy(&moved.stderr)
    );
    assert!(
        !dir.join("master.key").exists(),
        "the key file is destroyed: the KMS holds the key"
    );
    // Without the KMS key, a server cannot start, and says why.
    let refused = Command::new(env!("CARGO_BIN_EXE_ekm"))
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(&dir)
        .args(url.iter().flat_map(|u| ["--database-url", u.as_str()]))
        .env_remove("EKM_DATABASE_URL")
        .output()
        .unwrap();
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains(&spec),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );

    let decrypts = |base: &str| {
        let (status, opened) = call(
            "POST",
            &format!("{base}/v1/scopes/{org_id}/decrypt"),
            &admin,
            Some(serde_json::json!({"ciphertext": ciphertext, "class": "messages"})),
        );
        assert_eq!(
            (status, opened.str_of("plaintext")),
            (200, "aGk=".into()),
            "{opened}"
        );
    };
    let server = serve_configured(&dir, url.as_deref(), &kms_flags, &creds);
    decrypts(&server.base);
    // A rotation that stays in the KMS: beside the server on PostgreSQL.
    let server = if url.is_some() {
        Some(server)
    } else {
        assert_eq!(server.terminate().0, 0);
        None
    };
    let mut again = vec!["master-key", "rotate", "--json"];
    again.extend(kms_flags);
    let rotated = ekm(&again);
    assert!(
        rotated.status.success(),
        "{}",
        String::from_utf8_lossy(&rotated.stderr)
    );
    let report: Value = serde_json::from_slice(&rotated.stdout).unwrap();
    assert!(!dir.join("master.key").exists());
    let server =
        server.unwrap_or_else(|| serve_configured(&dir, url.as_deref(), &kms_flags, &creds));
    // A new organization is wrapped with the rotated key (the running server loads it
    // from the database through the KMS), and the old data still decrypts.
    let (status, _) = call(
        "POST",
        &format!("{}/v1/orgs", server.base),
        &operator,
        Some(serde_json::json!({"name": "Beta", "plan": "enterprise", "tier": "managed"})),
    );
    assert_eq!(status, 201);
    decrypts(&server.base);
    let config = match &url {
        Some(_) => test_db.config.clone(),
        None => ekm_store::DbConfig::sqlite_in(&dir),
    };
    let db = runtime.block_on(ekm_store::Db::connect(&config)).unwrap();
    let held: Vec<(String, String)> = runtime.block_on(async {
        ekm_store::with_write_pool!(&db, pool => {
            sqlx::query_as("SELECT fingerprint, wrapped_by FROM platform_keys")
                .fetch_all(pool)
                .await
                .unwrap()
        })
    });
    assert_eq!(
        held,
        [(report.str_of("new_fingerprint"), spec.clone())],
        "one platform key, the new one, held by the KMS key"
    );
    runtime.block_on(db.close());
    assert_eq!(server.terminate().0, 0);
}

#[test]
fn platform_master_key_lives_in_a_kms_on_sqlite() {
    platform_master_key_lives_in_a_kms(Backend::Sqlite);
}

#[test]
fn platform_master_key_lives_in_a_kms_on_postgres() {
    platform_master_key_lives_in_a_kms(Backend::Postgres);
}

/// The stored text of a scope's key versions below `below`.
async fn version_text(db: &Db, scope: &str, below: i64) -> Vec<Vec<u8>> {
    let rows: Vec<String> = ekm_store::with_write_pool!(db, pool => {
        sqlx::query_scalar("SELECT wrapped FROM key_material WHERE scope_id = $1 AND version < $2")
            .bind(scope)
            .bind(below)
            .fetch_all(pool)
            .await
            .unwrap()
    });
    rows.into_iter().map(String::into_bytes).collect()
}

/// Retiring key versions destroys them in the files too, not only in the table.
async fn retire_leaves_no_byte_of_a_retired_version_in_the_files(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let (org, token) = managed_org(&app).await;
    let team = app.scope(&token, "team", "research", &org).await;
    let rotated = app
        .post(
            &format!("/v1/scopes/{team}/rotate"),
            &token,
            serde_json::json!({}),
        )
        .await;
    assert_eq!(rotated.status, 200, "{:?}", rotated.body);
    let retired = version_text(&app.db, &team, 2).await;
    assert_eq!(retired.len(), 1);
    let files_before = key_files(&app).await;
    assert_eq!(found_in(&files_before, &retired), 1, "present before");
    let answer = app
        .post(
            &format!("/v1/scopes/{team}/retire"),
            &token,
            serde_json::json!({"below": 2}),
        )
        .await;
    assert_eq!(answer.status, 200, "{:?}", answer.body);
    let mut files = key_files(&app).await;
    files.extend(files_before);
    assert_eq!(found_in(&files, &retired), 0, "gone from {files:?}");
    app.stop().await;
}
on_both_backends!(retire_leaves_no_byte_of_a_retired_version_in_the_files);

/// Switching to a customer key replaces the organization key's platform-only wrapping, and
/// that wrapping leaves the files too.
async fn byok_switch_leaves_no_platform_only_wrapping_in_the_files(backend: Backend) {
    use crate::kms_servers::{aws_environment, Moto};
    let moto = Moto::start().await;
    let arn = moto.create_key().await;
    let app = TestApp::spawn_with(
        backend,
        crate::byok::options(
            aws_environment(),
            std::time::Duration::from_secs(60),
            std::time::Duration::from_secs(300),
        ),
    )
    .await;
    let (org, token) = managed_org(&app).await;
    let platform_only: Vec<Vec<u8>> = {
        let rows: Vec<String> = ekm_store::with_write_pool!(&app.db, pool => {
            sqlx::query_scalar("SELECT wrapped FROM wrapping_keys WHERE scope_id = $1")
                .bind(&org)
                .fetch_all(pool)
                .await
                .unwrap()
        });
        rows.into_iter().map(String::into_bytes).collect()
    };
    assert_eq!(platform_only.len(), 1);
    let files_before = key_files(&app).await;
    assert_eq!(found_in(&files_before, &platform_only), 1, "present before");
    let connected = crate::byok::connect(
        &app,
        &token,
        &org,
        serde_json::json!({"provider": "aws-kms", "key_id": arn, "endpoint_url": moto.url, "reason": "go-live"}),
    )
    .await;
    assert_eq!(connected.status, 200, "{:?}", connected.body);
    let mut files = key_files(&app).await;
    files.extend(files_before);
    assert_eq!(found_in(&files, &platform_only), 0, "gone from {files:?}");
    app.stop().await;
}
on_both_backends!(byok_switch_leaves_no_platform_only_wrapping_in_the_files);
