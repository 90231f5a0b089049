//! Revocation that holds against copies of the database (ADR 0013): the attacker holds a
//! copy made before the revoke, every row of the database afterwards and the platform's
//! master key, and still opens nothing of the revoked subtree; and no byte of a destroyed
//! key stays in the database's files. Shared here: the attacker (`KeyCopy`) and helpers.

mod at_rest;
mod copies;
mod platform_key;
mod rekey_job;

use std::collections::HashMap;
use std::path::Path;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use ekm_keys::{Ciphertext, Kek, LocalMasterKey};
use ekm_store::Db;
use serde_json::Value;

use crate::harness::TestApp;

/// The key rows of a database, as anyone holding a copy (or a dump, a backup, a replica)
/// has them: every table that holds wrapped keys, staged re-wraps included.
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
                sqlx::query_as("SELECT scope_id, version, wrapped, parent_id, parent_version, node_epoch FROM key_material \
                        UNION ALL SELECT scope_id, version, wrapped, NULL, NULL, NULL FROM master_key_rewraps \
                        WHERE fingerprint NOT LIKE 'wrap:%'")
                    .fetch_all(pool).await.unwrap(),
                sqlx::query_as("SELECT scope_id, epoch, wrapped, parent_id, parent_epoch, master_fingerprint FROM wrapping_keys \
                        UNION ALL SELECT scope_id, version, wrapped, NULL, NULL, wrapped_by FROM master_key_rewraps \
                        WHERE fingerprint LIKE 'wrap:%'")
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

pub(super) fn destruction(scope: &Value) -> (String, String) {
    let d = &scope["destruction"];
    (
        d["live"].as_str().unwrap_or("absent").to_owned(),
        d["copies"].as_str().unwrap_or("absent").to_owned(),
    )
}

/// Rotates the platform master key the way `ekm master-key rotate` does: beside the running
/// server on PostgreSQL, with the server stopped on SQLite. Returns the running app.
pub(super) async fn rotate_master_key(app: TestApp) -> TestApp {
    rotate_master_key_with(app, crate::harness::Options::default()).await
}

pub(super) async fn rotate_master_key_with(
    app: TestApp,
    options: crate::harness::Options,
) -> TestApp {
    let path = app.data_dir().join("master.key");
    match app.database_url() {
        Some(_) => {
            let db = Db::open(&app.config).await.unwrap();
            let rotation = ekm_service::keys::rotate_local_master_key(&db, &path)
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
            ekm_service::keys::rotate_local_master_key(&db, &path)
                .await
                .unwrap();
            db.close().await;
            TestApp::spawn_on_with(test_db, options).await
        }
    }
}

pub(super) trait StrOf {
    fn str_of(&self, key: &str) -> String;
}

impl StrOf for Value {
    fn str_of(&self, key: &str) -> String {
        self[key].as_str().unwrap_or_default().to_owned()
    }
}

/// A customer's AWS KMS key (a real moto_server), for the BYOK stories.
pub(super) struct CustomerKey {
    pub moto: crate::kms_servers::Moto,
    pub arn: String,
}

impl CustomerKey {
    pub async fn create() -> CustomerKey {
        let moto = crate::kms_servers::Moto::start().await;
        let arn = moto.create_key().await;
        CustomerKey { moto, arn }
    }

    /// Server options that reach it.
    pub fn options(&self) -> crate::harness::Options {
        crate::byok::options(
            crate::kms_servers::aws_environment(),
            std::time::Duration::from_secs(60),
            std::time::Duration::from_secs(300),
        )
    }

    /// Connects it as the organization's master key.
    pub async fn connect(&self, app: &TestApp, token: &str, org: &str) {
        let connected = crate::byok::connect(
            app,
            token,
            org,
            serde_json::json!({"provider": "aws-kms", "key_id": self.arn, "endpoint_url": self.moto.url, "reason": "go-live"}),
        )
        .await;
        assert_eq!(connected.status, 200, "{:?}", connected.body);
    }
}
