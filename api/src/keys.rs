//! The key service: creates, wraps and unwraps scope keys along the hierarchy, and caches
//! unwrapped keys for the data plane.
//!
//! A cache entry exists only for a scope that was effectively active when it was loaded,
//! and is evicted (with every entry below it) as soon as this process sees a pause, revoke
//! or rotation on its path; entries also expire after a TTL. Eviction bumps an epoch, and a
//! load that raced with an eviction is used once but not cached, so no request that starts
//! after an eviction can be served from a stale entry.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ekm_domain::{KeyVersion, MasterKeyRef, OrgId, ScopeId, Tier};
use ekm_keys::{Kek, LocalMasterKey};
use ekm_kms::{KmsSettings, LocalProvider, MasterKeyProvider, ProviderError, WrapContext};
use ekm_projections::{EventListener, ProjectionError, ReadModels, ScopeSnapshot};
use ekm_store::{Db, KeyRow, StoreError, StoredEvent};

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("key material for scope {scope} version {version} is gone (shredded by a revoke)")]
    Missing { scope: String, version: u32 },
    #[error("a stored key does not unwrap under its parent: the key hierarchy is damaged")]
    Unwrap,
    #[error("storage failed")]
    Store(#[from] StoreError),
    #[error("read model failed")]
    Projection(#[from] ProjectionError),
    #[error("the organization's master key cannot be used")]
    Provider(#[source] ProviderError),
    #[error("organization key version {version} is wrapped by a master key the organization no longer uses")]
    WrongMaster { version: u32 },
}

/// How customer master keys are reached, and how long an outage is tolerated.
#[derive(Clone, Debug)]
pub struct KmsOptions {
    pub settings: KmsSettings,
    /// While a customer's KMS is unreachable (timeouts, throttling, 5xx), organization keys
    /// unwrapped before the outage keep serving for this long past their cache TTL; then the
    /// data plane fails closed. The health monitor records the organization `unavailable`
    /// after the same period.
    pub grace: Duration,
}

impl Default for KmsOptions {
    fn default() -> Self {
        KmsOptions {
            settings: KmsSettings::default(),
            grace: Duration::from_secs(300),
        }
    }
}

/// An unwrapped organization key version.
struct OrgKeyEntry {
    key: Kek,
    loaded: Instant,
}

/// The unwrapped keys of one active scope.
pub struct ScopeKeys {
    pub scope_id: ScopeId,
    pub org_id: OrgId,
    pub path: Vec<ScopeId>,
    pub tier: Tier,
    pub current: u32,
    /// The event position this process had seen when the entry was loaded: the keys and
    /// the scope's active state are valid as of that position (and stay cached only while
    /// no later event on the path evicts them).
    pub valid_at_position: i64,
    keys: HashMap<u32, Kek>,
    loaded: Instant,
}

impl std::fmt::Debug for ScopeKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ScopeKeys")
            .field("scope_id", &self.scope_id)
            .field("current", &self.current)
            .field("versions", &self.keys.len())
            .finish_non_exhaustive()
    }
}

impl ScopeKeys {
    pub fn key(&self, version: u32) -> Option<&Kek> {
        self.keys.get(&version)
    }

    pub fn current_key(&self) -> Option<&Kek> {
        self.keys.get(&self.current)
    }
}

pub struct KeyService {
    db: Db,
    read: ReadModels,
    master: LocalMasterKey,
    local: LocalProvider,
    kms: KmsOptions,
    ttl: Duration,
    cache: Mutex<HashMap<ScopeId, Arc<ScopeKeys>>>,
    /// Organization keys, so that loading many scopes of one organization calls a
    /// customer's KMS once per TTL, not once per scope.
    org_keys: Mutex<HashMap<(ScopeId, u32), OrgKeyEntry>>,
    providers: tokio::sync::Mutex<HashMap<MasterKeyRef, Arc<dyn MasterKeyProvider>>>,
    epoch: AtomicU64,
    unwraps: AtomicU64,
    kms_calls: AtomicU64,
    /// Organizations whose customer key just failed an unwrap: the health monitor checks
    /// them at once.
    failed_tx: tokio::sync::mpsc::UnboundedSender<ScopeId>,
    failed_rx: Mutex<Option<tokio::sync::mpsc::UnboundedReceiver<ScopeId>>>,
}

/// Events after which cached keys on the scope's path must go.
const EVICTING: [&str; 7] = [
    "ScopePaused",
    "ScopeRevoked",
    "ScopeKeyRotated",
    "ScopeKeyVersionsRetired",
    "OrganizationTierChanged",
    "OrganizationMasterKeyChanged",
    "OrganizationMasterKeyHealthChanged",
];

impl KeyService {
    pub fn new(db: Db, master: LocalMasterKey, ttl: Duration) -> Arc<KeyService> {
        KeyService::with_kms(db, master, ttl, KmsOptions::default())
    }

    pub fn with_kms(
        db: Db,
        master: LocalMasterKey,
        ttl: Duration,
        kms: KmsOptions,
    ) -> Arc<KeyService> {
        let (failed_tx, failed_rx) = tokio::sync::mpsc::unbounded_channel();
        Arc::new(KeyService {
            read: ReadModels::new(db.clone()),
            db,
            local: LocalProvider::new(master.clone()),
            master,
            kms,
            ttl,
            cache: Mutex::new(HashMap::new()),
            org_keys: Mutex::new(HashMap::new()),
            providers: tokio::sync::Mutex::new(HashMap::new()),
            epoch: AtomicU64::new(0),
            unwraps: AtomicU64::new(0),
            kms_calls: AtomicU64::new(0),
            failed_tx,
            failed_rx: Mutex::new(Some(failed_rx)),
        })
    }

    pub fn kms_options(&self) -> &KmsOptions {
        &self.kms
    }

    /// Calls made to customer KMSes since start (wrap and unwrap; health checks excluded).
    pub fn kms_call_count(&self) -> u64 {
        self.kms_calls.load(Ordering::Relaxed)
    }

    /// The organizations whose customer key failed an unwrap, for the health monitor (the
    /// first caller takes the stream).
    pub fn take_failures(&self) -> Option<tokio::sync::mpsc::UnboundedReceiver<ScopeId>> {
        self.failed_rx.lock().ok()?.take()
    }

    /// The provider of a customer key (built once, then shared).
    pub async fn provider(
        &self,
        key: &MasterKeyRef,
    ) -> Result<Arc<dyn MasterKeyProvider>, ProviderError> {
        let mut providers = self.providers.lock().await;
        if let Some(provider) = providers.get(key) {
            return Ok(provider.clone());
        }
        let provider = ekm_kms::provider_for(key, &self.kms.settings).await?;
        providers.insert(key.clone(), provider.clone());
        Ok(provider)
    }

    /// The listener the projector calls with every event this process sees.
    pub fn listener(self: &Arc<Self>) -> EventListener {
        let service = Arc::downgrade(self);
        Arc::new(move |events: &[StoredEvent]| {
            if let Some(service) = service.upgrade() {
                service.evict(events);
            }
        })
    }

    fn evict(&self, events: &[StoredEvent]) {
        let scopes: Vec<ScopeId> = events
            .iter()
            .filter(|e| EVICTING.contains(&e.event_type.as_str()))
            .filter_map(|e| ScopeId::parse(&e.aggregate_id).ok())
            .collect();
        if scopes.is_empty() {
            return;
        }
        if let Ok(mut cache) = self.cache.lock() {
            cache.retain(|_, entry| !entry.path.iter().any(|p| scopes.contains(p)));
            self.epoch.fetch_add(1, Ordering::SeqCst);
        }
        if let Ok(mut org_keys) = self.org_keys.lock() {
            org_keys.retain(|(org, _), _| !scopes.contains(org));
        }
    }

    /// The eviction epoch: read it before reading a snapshot to load keys for.
    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::SeqCst)
    }

    /// How many keys were unwrapped since start (a cold key walks the hierarchy once).
    pub fn unwrap_count(&self) -> u64 {
        self.unwraps.load(Ordering::Relaxed)
    }

    /// A cached entry, if present and fresh.
    pub fn cached(&self, scope: ScopeId) -> Option<Arc<ScopeKeys>> {
        let cache = self.cache.lock().ok()?;
        cache
            .get(&scope)
            .filter(|entry| entry.loaded.elapsed() < self.ttl)
            .cloned()
    }

    /// Unwraps every key version of an active scope and caches them, unless an eviction
    /// happened meanwhile.
    ///
    /// `epoch` is `self.epoch()` read before the snapshot was: an eviction between the two
    /// keeps the entry out of the cache.
    pub async fn load(
        &self,
        snapshot: &ScopeSnapshot,
        position: i64,
        epoch: u64,
    ) -> Result<Arc<ScopeKeys>, KeyError> {
        let scope_id = snapshot.scope.id;
        let mut keys = HashMap::new();
        for version in snapshot.key_versions.iter().filter(|v| !v.retired) {
            let Some(fingerprint) = &version.fingerprint else {
                continue;
            };
            let key = self
                .unwrap_version(&scope_id.to_string(), version.version, fingerprint)
                .await?;
            keys.insert(version.version, key);
        }
        let entry = Arc::new(ScopeKeys {
            scope_id,
            org_id: snapshot.scope.org_id,
            path: snapshot.scope.path.clone(),
            tier: snapshot.org_tier,
            current: snapshot.scope.key_version,
            valid_at_position: position,
            keys,
            loaded: Instant::now(),
        });
        if let Ok(mut cache) = self.cache.lock() {
            if self.epoch.load(Ordering::SeqCst) == epoch {
                cache.insert(scope_id, entry.clone());
            }
        }
        Ok(entry)
    }

    /// Unwraps one key version, walking up to the master key.
    fn unwrap_version<'a>(
        &'a self,
        scope: &'a str,
        version: u32,
        fingerprint: &'a str,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<Kek, KeyError>> + Send + 'a>>
    {
        Box::pin(async move {
            let row = self
                .db
                .key(scope, version, fingerprint)
                .await?
                .ok_or_else(|| KeyError::Missing {
                    scope: scope.to_owned(),
                    version,
                })?;
            let key = match &row.parent {
                None => return self.unwrap_org_key(&row).await,
                Some((parent, parent_version)) => {
                    let parent_fingerprint = self
                        .read
                        .key_fingerprint(parent, *parent_version)
                        .await?
                        .ok_or_else(|| KeyError::Missing {
                            scope: parent.clone(),
                            version: *parent_version,
                        })?;
                    let parent_key = self
                        .unwrap_version(parent, *parent_version, &parent_fingerprint)
                        .await?;
                    let version_text = version.to_string();
                    let parent_version_text = parent_version.to_string();
                    parent_key.unwrap_key(
                        &row.wrapped,
                        &[
                            scope.as_bytes(),
                            version_text.as_bytes(),
                            parent.as_bytes(),
                            parent_version_text.as_bytes(),
                        ],
                    )
                }
            };
            self.unwraps.fetch_add(1, Ordering::Relaxed);
            let key = key.map_err(|_| KeyError::Unwrap)?;
            if key.fingerprint() != row.fingerprint {
                return Err(KeyError::Unwrap);
            }
            Ok(key)
        })
    }

    /// The customer key an organization key row is wrapped by, or `None` for the local
    /// master key.
    /// The organization's read model and its key rows change in the same transaction, so
    /// a row's wrapping must match the organization's master key: a row the platform key
    /// wraps is never opened with it while the organization has a customer key.
    async fn wrapping_key(&self, row: &KeyRow) -> Result<Option<MasterKeyRef>, KeyError> {
        let org = ScopeId::parse(&row.scope_id).map_err(|_| KeyError::Unwrap)?;
        let current = self
            .read
            .scope(org)
            .await?
            .and_then(|snapshot| snapshot.scope.master_key);
        let wrong = || KeyError::WrongMaster {
            version: row.version,
        };
        let local = self.master.fingerprint();
        match (row.master_fingerprint.as_deref(), current) {
            (None, None) => Ok(None),
            (Some(fingerprint), None) if fingerprint == local => Ok(None),
            (Some(wrapping_id), Some(master)) if master.wrapping_id() == wrapping_id => {
                Ok(Some(master))
            }
            _ => Err(wrong()),
        }
    }

    /// Unwraps an organization key version through its master key: from the cache while
    /// fresh; on a transient KMS failure, from the cache while within the grace period.
    async fn unwrap_org_key(&self, row: &KeyRow) -> Result<Kek, KeyError> {
        let org = ScopeId::parse(&row.scope_id).map_err(|_| KeyError::Unwrap)?;
        let slot = (org, row.version);
        let cached = |limit: Duration| -> Option<Kek> {
            let org_keys = self.org_keys.lock().ok()?;
            org_keys
                .get(&slot)
                .filter(|e| e.loaded.elapsed() < limit && e.key.fingerprint() == row.fingerprint)
                .map(|e| e.key.clone())
        };
        if let Some(key) = cached(self.ttl) {
            return Ok(key);
        }
        let epoch = self.epoch.load(Ordering::SeqCst);
        let context = WrapContext {
            org_id: &row.scope_id,
            key_version: row.version,
        };
        self.unwraps.fetch_add(1, Ordering::Relaxed);
        let bytes = match self.wrapping_key(row).await? {
            None => self.local.unwrap(&row.wrapped, context).await,
            Some(master) => {
                let provider = self.provider(&master).await.map_err(KeyError::Provider)?;
                self.kms_calls.fetch_add(1, Ordering::Relaxed);
                provider.unwrap(&row.wrapped, context).await
            }
        };
        let bytes = match bytes {
            Ok(bytes) => bytes,
            Err(error) => {
                let _ = self.failed_tx.send(org);
                if error.kind.is_transient() {
                    if let Some(key) = cached(self.ttl + self.kms.grace) {
                        tracing::warn!(
                            org = %org,
                            kind = error.kind.as_str(),
                            "customer KMS unreachable; serving the organization key within its grace period"
                        );
                        return Ok(key);
                    }
                }
                return Err(KeyError::Provider(error));
            }
        };
        let key = Kek::from_bytes(&bytes).map_err(|_| KeyError::Unwrap)?;
        if key.fingerprint() != row.fingerprint {
            return Err(KeyError::Unwrap);
        }
        if let Ok(mut org_keys) = self.org_keys.lock() {
            if self.epoch.load(Ordering::SeqCst) == epoch {
                org_keys.insert(
                    slot,
                    OrgKeyEntry {
                        key: key.clone(),
                        loaded: Instant::now(),
                    },
                );
            }
        }
        Ok(key)
    }

    /// Re-wraps every live organization key version under `target` (a customer key, or the
    /// platform's with `None`) and stages the result; the switch happens when the event that
    /// records it is projected. Returns the versions staged.
    /// `live` names each live version with its fingerprint (from the read model), so a row
    /// left by a command that lost a race (same version, another key) is not staged.
    pub async fn stage_master_switch(
        &self,
        org: OrgId,
        live: &[(KeyVersion, String)],
        target: Option<&MasterKeyRef>,
    ) -> Result<Vec<KeyVersion>, KeyError> {
        let org_id = org.to_string();
        let rows = self.db.org_keys(&org_id).await?;
        let target_id = target.map_or_else(|| "local".to_owned(), MasterKeyRef::wrapping_id);
        let mut staged = vec![];
        for row in rows.iter().filter(|r| {
            live.iter()
                .any(|(v, fingerprint)| v.get() == r.version && *fingerprint == r.fingerprint)
        }) {
            let key = self.unwrap_org_key(row).await?;
            let (wrapped, wrapped_by) = self.wrap_org_key(&key, org, row.version, target).await?;
            self.db
                .stage_rewrap(row, &target_id, &wrapped_by, &wrapped)
                .await?;
            staged.push(KeyVersion::new(row.version));
        }
        Ok(staged)
    }

    /// Re-wraps every key that a child of `scope` wraps under a version below `below`, under
    /// the scope's current version: afterwards nothing needs those versions. Each row is
    /// updated on its own; a crash half-way leaves the old versions in place (the retirement
    /// is only recorded after this returns), and a second run finishes the job.
    pub async fn rewrap_children(
        &self,
        scope: &ScopeSnapshot,
        below: u32,
    ) -> Result<usize, KeyError> {
        let scope_id = scope.scope.id.to_string();
        let fingerprint_of = |version: u32| {
            scope
                .key_versions
                .iter()
                .find(|k| k.version == version)
                .and_then(|k| k.fingerprint.clone())
                .ok_or_else(|| KeyError::Missing {
                    scope: scope_id.clone(),
                    version,
                })
        };
        let current = scope.scope.key_version;
        let current_key = self
            .unwrap_version(&scope_id, current, &fingerprint_of(current)?)
            .await?;
        let rows = self.db.keys_wrapped_under(&scope_id, below).await?;
        let mut old_keys: HashMap<u32, Kek> = HashMap::new();
        for row in &rows {
            let Some((_, old_version)) = row.parent else {
                continue;
            };
            if let std::collections::hash_map::Entry::Vacant(slot) = old_keys.entry(old_version) {
                let fingerprint = fingerprint_of(old_version)?;
                slot.insert(
                    self.unwrap_version(&scope_id, old_version, &fingerprint)
                        .await?,
                );
            }
            let old_key = old_keys.get(&old_version).ok_or(KeyError::Unwrap)?;
            let context = |parent_version: u32| {
                (
                    row.scope_id.clone(),
                    row.version.to_string(),
                    scope_id.clone(),
                    parent_version.to_string(),
                )
            };
            let (a, b, c, d) = context(old_version);
            let child = old_key
                .unwrap_key(
                    &row.wrapped,
                    &[a.as_bytes(), b.as_bytes(), c.as_bytes(), d.as_bytes()],
                )
                .map_err(|_| KeyError::Unwrap)?;
            let (a, b, c, d) = context(current);
            let wrapped = current_key
                .wrap(
                    &child,
                    &[a.as_bytes(), b.as_bytes(), c.as_bytes(), d.as_bytes()],
                )
                .map_err(|_| KeyError::Unwrap)?;
            self.db.rewrap_key(row, &wrapped, current).await?;
        }
        Ok(rows.len())
    }

    /// Creates and stores an organization's key version, wrapped by the master key.
    /// Returns its fingerprint.
    /// `master` is the organization's customer key as the deciding aggregate has it (not
    /// the read model, which may lag a switch that just committed).
    pub async fn create_org_key(
        &self,
        org: OrgId,
        version: u32,
        master: Option<&MasterKeyRef>,
    ) -> Result<String, KeyError> {
        let key = Kek::generate();
        // A rotation under byok wraps the new version with the customer's key.
        let (wrapped, master_fingerprint) = self.wrap_org_key(&key, org, version, master).await?;
        let fingerprint = key.fingerprint();
        self.db
            .insert_key(&KeyRow {
                scope_id: org.to_string(),
                version,
                fingerprint: fingerprint.clone(),
                wrapped,
                parent: None,
                master_fingerprint: Some(master_fingerprint),
            })
            .await?;
        Ok(fingerprint)
    }

    /// Wraps an organization key version under `master` (a customer key), or the platform
    /// key with `None`. Returns the wrapped key and what wraps it, as key rows record it.
    async fn wrap_org_key(
        &self,
        key: &Kek,
        org: OrgId,
        version: u32,
        master: Option<&MasterKeyRef>,
    ) -> Result<(Vec<u8>, String), KeyError> {
        let org_id = org.to_string();
        let context = WrapContext {
            org_id: &org_id,
            key_version: version,
        };
        let plaintext = key.for_master_key_provider();
        match master {
            Some(master) => {
                let provider = self.provider(master).await.map_err(KeyError::Provider)?;
                self.kms_calls.fetch_add(1, Ordering::Relaxed);
                let wrapped = provider
                    .wrap(&plaintext, context)
                    .await
                    .map_err(KeyError::Provider)?;
                Ok((wrapped, master.wrapping_id()))
            }
            None => Ok((
                self.local
                    .wrap(&plaintext, context)
                    .await
                    .map_err(KeyError::Provider)?,
                self.master.fingerprint(),
            )),
        }
    }

    /// Creates and stores a key version for `scope`, wrapped under the current key of
    /// `parent`. Returns its fingerprint.
    pub async fn create_scope_key(
        &self,
        scope: ScopeId,
        version: u32,
        parent: &ScopeSnapshot,
    ) -> Result<String, KeyError> {
        let parent_id = parent.scope.id.to_string();
        let parent_version = parent.scope.key_version;
        let parent_fingerprint = parent
            .key_versions
            .iter()
            .find(|k| k.version == parent_version)
            .and_then(|k| k.fingerprint.clone())
            .ok_or_else(|| KeyError::Missing {
                scope: parent_id.clone(),
                version: parent_version,
            })?;
        let parent_key = self
            .unwrap_version(&parent_id, parent_version, &parent_fingerprint)
            .await?;
        let key = Kek::generate();
        let scope_text = scope.to_string();
        let version_text = version.to_string();
        let parent_version_text = parent_version.to_string();
        let wrapped = parent_key
            .wrap(
                &key,
                &[
                    scope_text.as_bytes(),
                    version_text.as_bytes(),
                    parent_id.as_bytes(),
                    parent_version_text.as_bytes(),
                ],
            )
            .map_err(|_| KeyError::Unwrap)?;
        let fingerprint = key.fingerprint();
        self.db
            .insert_key(&KeyRow {
                scope_id: scope_text,
                version,
                fingerprint: fingerprint.clone(),
                wrapped,
                parent: Some((parent_id, parent_version)),
                master_fingerprint: None,
            })
            .await?;
        Ok(fingerprint)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum MasterKeySetupError {
    #[error(transparent)]
    File(#[from] ekm_keys::MasterKeyError),
    #[error("storage failed")]
    Store(#[from] StoreError),
    #[error("this database's keys are wrapped by local master key {known}, but {path} {found}; copy the master key file from an instance of this database (or pass --master-key-file)")]
    Mismatch {
        known: String,
        path: String,
        found: String,
    },
}

/// Loads the local master key (creating it on a database that has none yet) and checks that
/// the database's organization keys are wrapped by it.
pub async fn local_master_key(
    db: &Db,
    path: &std::path::Path,
) -> Result<LocalMasterKey, MasterKeySetupError> {
    let known = db.master_keys("local").await?;
    let shown = path.display().to_string();
    let key = match LocalMasterKey::load(path, known.is_empty())? {
        Some(key) => key,
        None => {
            return Err(MasterKeySetupError::Mismatch {
                known: known.join(", "),
                path: shown,
                found: "does not exist".into(),
            })
        }
    };
    match db.check_master_key(&key.fingerprint(), "local").await? {
        ekm_store::MasterKeyCheck::Registered => Ok(key),
        ekm_store::MasterKeyCheck::Unknown { known } => Err(MasterKeySetupError::Mismatch {
            known: known.join(", "),
            path: shown,
            found: format!("holds key {}", key.fingerprint()),
        }),
    }
}
