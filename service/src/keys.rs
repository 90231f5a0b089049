//! The key service: creates, wraps and unwraps scope keys along the hierarchy, and caches
//! unwrapped keys for the data plane.
//!
//! A cache entry exists only for a scope that was effectively active when it was loaded,
//! and is evicted (with every entry below it) as soon as this process sees a pause, revoke,
//! rotation, retirement, tier or master-key change, or a change of justification policy or
//! decryption floor on its path; entries also expire after a TTL. Eviction bumps an epoch, and a
//! load that raced with an eviction is used once but not cached, so no request that starts
//! after an eviction can be served from a stale entry.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ekm_domain::{EffectiveJustification, KeyVersion, MasterKeyRef, OrgId, ScopeId, Tier};
use ekm_keys::{Kek, LocalMasterKey};
use ekm_kms::{
    KmsSettings, LocalProvider, MasterKeyProvider, Operation, ProviderError, WrapContext,
    WrapPurpose,
};
use ekm_projections::{EventListener, ProjectionError, ReadModels, ScopeSnapshot};
use ekm_store::{Db, KeyRow, KeyWrites, StoreError, StoredEvent, Wrapped, WrappingKeyRow};

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
    #[error("the wrapping key of scope {scope} epoch {epoch} is gone")]
    MissingWrapping { scope: String, epoch: u32 },
    #[error("another instance changed scope {scope}'s wrapping keys at the same time; try again")]
    WrappingRace { scope: String },
    #[error("scope {scope} is revoked (or below a revoked scope): its wrapping keys are destroyed and no new one is made")]
    Revoked { scope: String },
}

/// A call to a customer's KMS, counted by provider and outcome and timed
/// (`ekm_kms_calls_total`, `ekm_kms_call_duration_seconds`).
pub(crate) async fn timed_kms_call<T>(
    provider: ekm_domain::Provider,
    call: impl std::future::Future<Output = Result<T, ProviderError>>,
) -> Result<T, ProviderError> {
    let started = std::time::Instant::now();
    let result = call.await;
    let outcome = match &result {
        Ok(_) => "ok",
        Err(error) if error.kind.is_transient() => "unavailable",
        Err(_) => "refused",
    };
    let provider = provider.as_str();
    metrics::counter!("ekm_kms_calls_total", "provider" => provider, "outcome" => outcome)
        .increment(1);
    metrics::histogram!("ekm_kms_call_duration_seconds", "provider" => provider)
        .record(started.elapsed().as_secs_f64());
    result
}

/// How customer master keys are reached, and how long an outage is tolerated.
#[derive(Clone, Debug)]
pub struct KmsOptions {
    pub settings: KmsSettings,
    /// The KMS key that holds the platform master key (`--master-key`); `None`: the key
    /// is a file.
    pub platform_key: Option<MasterKeyRef>,
    /// While a customer's KMS is unreachable (timeouts, throttling, 5xx), organization keys
    /// unwrapped before the outage keep serving for this long past their cache TTL; then the
    /// data plane fails closed. The health monitor records the organization `unavailable`
    /// after the same period.
    pub grace: Duration,
    /// When calls to a failing customer KMS stop for a while (`crate::breaker`).
    pub breaker: crate::breaker::BreakerSettings,
}

impl Default for KmsOptions {
    fn default() -> Self {
        KmsOptions {
            settings: KmsSettings::default(),
            platform_key: None,
            grace: Duration::from_secs(300),
            breaker: crate::breaker::BreakerSettings::default(),
        }
    }
}

/// An unwrapped organization key version.
struct OrgKeyEntry {
    key: Kek,
    loaded: Instant,
}

/// An organization key version, for one purpose: what one customer-KMS unwrap yields.
type OrgSlot = (ScopeId, u32, WrapPurpose);

/// How long a failed unwrap through a customer's KMS answers for every request of its slot
/// without another call (a negative cache): during an outage, the KMS sees one call per
/// slot per second, not one per request.
const NEGATIVE_TTL: Duration = Duration::from_secs(1);

/// Takes a slot's turn out of `KeyService::inflight` when dropped if nobody else waits.
struct Turn<'a> {
    keys: &'a KeyService,
    slot: OrgSlot,
    gate: Arc<tokio::sync::Mutex<()>>,
}

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        if let Ok(mut inflight) = self.keys.inflight.lock() {
            // The map's reference and ours: no other request holds or waits for the gate,
            // and none can take it while the map is locked.
            if Arc::strong_count(&self.gate) <= 2 {
                inflight.remove(&self.slot);
            }
        }
    }
}

/// The unwrapped keys of one active scope.
pub struct ScopeKeys {
    pub scope_id: ScopeId,
    pub org_id: OrgId,
    pub path: Vec<ScopeId>,
    pub tier: Tier,
    pub current: KeyVersion,
    /// The event position this process had seen when the entry was loaded: the keys and
    /// the scope's active state are valid as of that position (and stay cached only while
    /// no later event on the path evicts them).
    pub valid_at_position: i64,
    /// What the justification policies on the path impose (ADR 0027); a change of policy
    /// on the path evicts the entry, as a pause does.
    pub justification: EffectiveJustification,
    /// Versions below this one do not decrypt (reversibly); a change evicts the entry.
    pub min_decryption: KeyVersion,
    keys: HashMap<KeyVersion, Kek>,
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
    pub fn key(&self, version: KeyVersion) -> Option<&Kek> {
        self.keys.get(&version)
    }

    pub fn current_key(&self) -> Option<&Kek> {
        self.keys.get(&self.current)
    }
}

pub struct KeyService {
    db: Db,
    read: ReadModels,
    /// The platform master key; replaced when `ekm master-key rotate` has rotated it
    /// (found in the key file when a row names a key this process does not hold).
    master: std::sync::RwLock<LocalMasterKey>,
    kms: KmsOptions,
    ttl: Duration,
    cache: Mutex<HashMap<ScopeId, Arc<ScopeKeys>>>,
    /// Organization keys, so that loading many scopes of one organization calls a
    /// customer's KMS once per TTL, not once per scope.
    org_keys: Mutex<HashMap<OrgSlot, OrgKeyEntry>>,
    /// One unwrap in flight per slot: concurrent misses wait for it, then find its key in
    /// `org_keys` or its failure in `failures`.
    inflight: Mutex<HashMap<OrgSlot, Arc<tokio::sync::Mutex<()>>>>,
    /// The last failed unwrap through a customer's KMS per slot, for `NEGATIVE_TTL`.
    failures: Mutex<HashMap<OrgSlot, (Instant, ekm_kms::ProviderError)>>,
    providers: tokio::sync::Mutex<HashMap<MasterKeyRef, Arc<dyn MasterKeyProvider>>>,
    /// One circuit breaker per customer key: an outage's calls fail at once, not each after
    /// a timeout.
    breakers: crate::breaker::Breakers,
    epoch: AtomicU64,
    unwraps: AtomicU64,
    kms_calls: AtomicU64,
    /// Organizations whose customer key just failed an unwrap: the health monitor checks
    /// them at once.
    failed_tx: tokio::sync::mpsc::UnboundedSender<ScopeId>,
    failed_rx: Mutex<Option<tokio::sync::mpsc::UnboundedReceiver<ScopeId>>>,
}

/// Events after which cached keys on the scope's path must go, and with them (on an
/// organization) its unwrapped organization keys and remembered KMS failures.
const EVICTING: [&str; 8] = [
    "ScopePaused",
    "ScopeRevocationScheduled",
    "ScopeRevoked",
    "ScopeKeyRotated",
    "ScopeKeyVersionsRetired",
    "OrganizationTierChanged",
    "OrganizationMasterKeyChanged",
    "OrganizationMasterKeyHealthChanged",
];

/// Events that change only what a cache entry carries besides its keys (the justification
/// policy, the decryption floor): the entries on the path go, but an organization's
/// unwrapped keys and its KMS outage grace stay (an admin's policy change must not cost a
/// KMS call, or, during an outage, the organization's data plane).
const EVICTING_ENTRIES_ONLY: [&str; 2] = [
    "ScopeJustificationPolicySet",
    "ScopeMinDecryptionVersionSet",
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
        let breaker = kms.breaker;
        Arc::new(KeyService {
            read: ReadModels::new(db.clone()),
            db,
            master: std::sync::RwLock::new(master),
            kms,
            ttl,
            cache: Mutex::new(HashMap::new()),
            org_keys: Mutex::new(HashMap::new()),
            inflight: Mutex::new(HashMap::new()),
            failures: Mutex::new(HashMap::new()),
            providers: tokio::sync::Mutex::new(HashMap::new()),
            breakers: crate::breaker::Breakers::new(breaker),
            epoch: AtomicU64::new(0),
            unwraps: AtomicU64::new(0),
            kms_calls: AtomicU64::new(0),
            failed_tx,
            failed_rx: Mutex::new(Some(failed_rx)),
        })
    }

    /// Unwraps in flight or awaited, and failures remembered (both empty when idle): for tests
    /// that the coalescing leaves nothing behind.
    pub fn pending_slots(&self) -> (usize, usize) {
        let inflight = self.inflight.lock().map_or(0, |m| m.len());
        let failures = self.failures.lock().map_or(0, |m| {
            m.values()
                .filter(|(at, _)| at.elapsed() < NEGATIVE_TTL)
                .count()
        });
        (inflight, failures)
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

    /// A call to a customer's KMS through its circuit breaker: refused at once while the
    /// breaker is open, counted and timed otherwise, its outcome recorded.
    async fn guarded_kms_call<T>(
        &self,
        master: &MasterKeyRef,
        operation: Operation,
        call: impl std::future::Future<Output = Result<T, ProviderError>>,
    ) -> Result<T, ProviderError> {
        let admission = self.breakers.admit(master, operation)?;
        self.kms_calls.fetch_add(1, Ordering::Relaxed);
        let result = timed_kms_call(master.provider, call).await;
        admission.finish(&result);
        result
    }

    /// The circuit breakers of the customer keys (the health monitor records its checks).
    pub fn breakers(&self) -> &crate::breaker::Breakers {
        &self.breakers
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
        let of = |types: &[&str]| -> Vec<ScopeId> {
            events
                .iter()
                .filter(|e| types.contains(&e.event_type.as_str()))
                .filter_map(|e| ScopeId::parse(&e.aggregate_id).ok())
                .collect()
        };
        let scopes = of(&EVICTING);
        let entries: Vec<ScopeId> = scopes
            .iter()
            .copied()
            .chain(of(&EVICTING_ENTRIES_ONLY))
            .collect();
        if entries.is_empty() {
            return;
        }
        if let Ok(mut cache) = self.cache.lock() {
            let before = cache.len();
            cache.retain(|_, entry| !entry.path.iter().any(|p| entries.contains(p)));
            metrics::counter!("ekm_key_cache_evictions_total")
                .increment((before - cache.len()) as u64);
            self.epoch.fetch_add(1, Ordering::SeqCst);
        }
        if scopes.is_empty() {
            return;
        }
        if let Ok(mut org_keys) = self.org_keys.lock() {
            org_keys.retain(|(org, _, _), _| !scopes.contains(org));
        }
        // A failure remembered before the event (a key switched, re-enabled) says nothing
        // about the key after it.
        if let Ok(mut failures) = self.failures.lock() {
            failures.retain(|(org, _, _), _| !scopes.contains(org));
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
        let found = {
            let cache = self.cache.lock().ok()?;
            cache
                .get(&scope)
                .filter(|entry| entry.loaded.elapsed() < self.ttl)
                .cloned()
        };
        // Literal labels: a static key, nothing allocated on the data plane's path.
        match found.is_some() {
            true => metrics::counter!("ekm_key_cache_lookups_total", "result" => "hit"),
            false => metrics::counter!("ekm_key_cache_lookups_total", "result" => "miss"),
        }
        .increment(1);
        found
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
            keys.insert(KeyVersion::new(version.version), key);
        }
        let entry = Arc::new(ScopeKeys {
            scope_id,
            org_id: snapshot.scope.org_id,
            path: snapshot.scope.path.clone(),
            tier: snapshot.org_tier,
            current: KeyVersion::new(snapshot.scope.key_version),
            valid_at_position: position,
            justification: snapshot.justification.clone(),
            min_decryption: KeyVersion::new(snapshot.scope.min_decryption_version),
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
            let read = || async {
                self.db
                    .key(scope, version, fingerprint)
                    .await?
                    .ok_or_else(|| KeyError::Missing {
                        scope: scope.to_owned(),
                        version,
                    })
            };
            let mut row = read().await?;
            let mut moved = 0;
            while let Some(epoch) = row.node_epoch {
                let wrapping = match self.unwrap_wrapping(scope, epoch).await {
                    Ok(wrapping) => wrapping,
                    // A re-key moved this version onto a newer epoch and destroyed this one
                    // between the two reads: read the version again (it moves before the
                    // epoch goes, ADR 0013).
                    Err(KeyError::MissingWrapping {
                        scope: gone,
                        epoch: e,
                    }) if moved < 3 && gone == scope && e == epoch => {
                        moved += 1;
                        row = read().await?;
                        if row.node_epoch == Some(epoch) {
                            return Err(KeyError::MissingWrapping { scope: gone, epoch });
                        }
                        continue;
                    }
                    Err(error) => return Err(error),
                };
                let key = wrapping
                    .unwrap_key(
                        &row.wrapped,
                        &version_binding(scope, version, epoch).parts(),
                    )
                    .map_err(|_| KeyError::Unwrap)?;
                self.unwraps.fetch_add(1, Ordering::Relaxed);
                if key.fingerprint() != row.fingerprint {
                    return Err(KeyError::Unwrap);
                }
                return Ok(key);
            }
            let key = match &row.parent {
                None => return self.unwrap_org_key(&MasterWrapped::version(&row)).await,
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
    async fn wrapping_key(&self, row: &MasterWrapped) -> Result<Option<MasterKeyRef>, KeyError> {
        let org = ScopeId::parse(&row.scope_id).map_err(|_| KeyError::Unwrap)?;
        let current = self
            .read
            .scope(org)
            .await?
            .and_then(|snapshot| snapshot.scope.master_key);
        let wrong = || KeyError::WrongMaster {
            version: row.version,
        };
        let local = self.local_master().fingerprint();
        if let (Some(fingerprint), None) = (row.master_fingerprint.as_deref(), &current) {
            if fingerprint != local && self.reload_master(fingerprint).await {
                return Ok(None);
            }
        }
        match (row.master_fingerprint.as_deref(), current) {
            (None, None) => Ok(None),
            (Some(fingerprint), None) if fingerprint == local => Ok(None),
            (Some(wrapping_id), Some(master))
                if master.wrapping_id() == customer_part(wrapping_id) =>
            {
                Ok(Some(master))
            }
            _ => Err(wrong()),
        }
    }

    /// Unwraps an organization key version through its master key: from the cache while
    /// fresh; on a transient KMS failure, from the cache while within the grace period.
    async fn unwrap_org_key(&self, row: &MasterWrapped) -> Result<Kek, KeyError> {
        let org = ScopeId::parse(&row.scope_id).map_err(|_| KeyError::Unwrap)?;
        let slot = (org, row.version, row.purpose);
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
        // Coalescing: one unwrap per slot at a time; who waited takes its outcome.
        // The turn holds the only clone of the gate besides the map's, so that its drop
        // can tell whether anyone else holds or waits for it (dropped after `_held`).
        let turn = Turn {
            keys: self,
            slot,
            gate: match self.inflight.lock() {
                Ok(mut inflight) => inflight.entry(slot).or_default().clone(),
                Err(_) => Arc::new(tokio::sync::Mutex::new(())),
            },
        };
        let _held = turn.gate.lock().await;
        if let Some(key) = cached(self.ttl) {
            return Ok(key);
        }
        let recent = self.failures.lock().ok().and_then(|failures| {
            failures
                .get(&slot)
                .filter(|(at, _)| at.elapsed() < NEGATIVE_TTL)
                .map(|(_, error)| error.clone())
        });
        if let Some(error) = recent {
            if error.kind.is_transient() {
                if let Some(key) = cached(self.ttl + self.kms.grace) {
                    return Ok(key);
                }
            }
            return Err(KeyError::Provider(error));
        }
        let epoch = self.epoch.load(Ordering::SeqCst);
        let context = WrapContext {
            org_id: &row.scope_id,
            key_version: row.version,
            purpose: row.purpose,
        };
        self.unwraps.fetch_add(1, Ordering::Relaxed);
        let bytes = match self.wrapping_key(row).await? {
            None => {
                LocalProvider::new(self.local_master())
                    .unwrap(&row.wrapped, context)
                    .await
            }
            Some(master) => {
                let provider = self.provider(&master).await.map_err(KeyError::Provider)?;
                // Sealed by the platform key around the customer's ciphertext (ADR 0013);
                // rows written before that hold the customer's ciphertext alone.
                let inner = match platform_part(row.master_fingerprint.as_deref()) {
                    Some(fingerprint) => {
                        let mut local = self.local_master();
                        if local.fingerprint() != fingerprint
                            && self.reload_master(fingerprint).await
                        {
                            local = self.local_master();
                        }
                        local
                            .open_outer(&row.wrapped, &context.local_binding())
                            .map_err(|_| KeyError::Unwrap)?
                    }
                    None => zeroize::Zeroizing::new(row.wrapped.clone()),
                };
                self.guarded_kms_call(
                    &master,
                    Operation::Decrypt,
                    provider.unwrap(&inner, context),
                )
                .await
            }
        };
        let bytes = match bytes {
            Ok(bytes) => bytes,
            Err(error) => {
                // Held back by the breaker: the failures that opened it prompted the checks
                // already; one per refusal would call the KMS the breaker spares.
                if error.code != "CircuitOpen" {
                    let _ = self.failed_tx.send(org);
                }
                if let Ok(mut failures) = self.failures.lock() {
                    // Only while nothing was evicted meanwhile (as for keys), and the map
                    // keeps what is still fresh only.
                    failures.retain(|_, (at, _)| at.elapsed() < NEGATIVE_TTL);
                    if self.epoch.load(Ordering::SeqCst) == epoch {
                        failures.insert(slot, (Instant::now(), error.clone()));
                    }
                }
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
        if let Ok(mut failures) = self.failures.lock() {
            failures.remove(&slot);
        }
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
        // The caller holds the organization's key lock: rows staged before are leftovers of
        // a switch that never committed.
        self.db.clear_staged_rewraps(&org_id).await?;
        let rows = self.db.org_keys(&org_id).await?;
        let target_id = target.map_or_else(|| "local".to_owned(), MasterKeyRef::wrapping_id);
        let mut staged = vec![];
        for row in rows.iter().filter(|r| {
            live.iter()
                .any(|(v, fingerprint)| v.get() == r.version && *fingerprint == r.fingerprint)
        }) {
            let key = self.unwrap_org_key(&MasterWrapped::version(row)).await?;
            let (wrapped, wrapped_by) = self
                .wrap_by_master(&key, WrapContext::key_version(&org_id, row.version), target)
                .await?;
            self.stage(row, &target_id, &wrapped_by, &wrapped).await?;
            staged.push(KeyVersion::new(row.version));
        }
        // Versions under the organization's wrapping key: re-wrapping its epochs re-wraps
        // them all (ADR 0013).
        let epochs = self.db.wrapping_keys(&org_id).await?;
        for row in &epochs {
            let key = self.unwrap_wrapping(&org_id, row.epoch).await?;
            let (wrapped, wrapped_by) = self
                .wrap_by_master(&key, WrapContext::wrapping_key(&org_id, row.epoch), target)
                .await?;
            self.stage(
                &KeyRow {
                    scope_id: org_id.clone(),
                    version: row.epoch,
                    fingerprint: format!("{WRAPPING_STAGE_PREFIX}{}", row.fingerprint),
                    wrapped: vec![],
                    parent: None,
                    master_fingerprint: None,
                    node_epoch: None,
                },
                &target_id,
                &wrapped_by,
                &wrapped,
            )
            .await?;
        }
        if !epochs.is_empty() {
            for (version, _) in live {
                if !staged.contains(version) {
                    staged.push(*version);
                }
            }
            staged.sort();
        }
        Ok(staged)
    }

    /// Stages one re-wrap, unless the platform key in it was rotated away meanwhile (then
    /// the new key is loaded and the switch refused, to be retried).
    async fn stage(
        &self,
        row: &KeyRow,
        target_id: &str,
        wrapped_by: &str,
        wrapped: &[u8],
    ) -> Result<(), KeyError> {
        let platform = platform_key_of(wrapped_by);
        if self
            .db
            .stage_rewrap(row, target_id, wrapped_by, wrapped, platform)
            .await?
        {
            return Ok(());
        }
        for fingerprint in self.db.master_keys("local").await? {
            self.reload_master(&fingerprint).await;
        }
        Err(KeyError::WrappingRace {
            scope: row.scope_id.clone(),
        })
    }

    /// Re-wraps every key that a child of `scope` wraps under a version below `below`, under
    /// the scope's current version: afterwards nothing needs those versions. Each row is
    /// updated on its own; a crash half-way leaves the old versions in place (the retirement
    /// is only recorded after this returns), and a second run finishes the job.
    pub async fn rewrap_children(
        &self,
        scope: &ScopeSnapshot,
        below: KeyVersion,
    ) -> Result<usize, KeyError> {
        let below = below.get();
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

    /// Creates and stores a key version for `scope` outside a command, with its first
    /// wrapping-key epoch if it has none (benchmarks seed key tables this way; commands
    /// store what `prepare_scope_key` makes with their events, `Db::append`). Returns its
    /// fingerprint.
    pub async fn create_scope_key(
        &self,
        scope: ScopeId,
        version: KeyVersion,
        parent: &ScopeSnapshot,
    ) -> Result<String, KeyError> {
        let (fingerprint, writes) = self.prepare_scope_key(scope, version, parent).await?;
        let raced = || KeyError::WrappingRace {
            scope: scope.to_string(),
        };
        if let Some((row, platform)) = &writes.wrapping {
            if !self
                .db
                .insert_wrapping_key(row, platform.as_deref())
                .await?
            {
                return Err(raced());
            }
        }
        if let Some(row) = &writes.version {
            if !self.db.insert_key(row).await? {
                return Err(raced());
            }
        }
        Ok(fingerprint)
    }

    /// A new key version of an organization, made and wrapped but not stored: the rows go
    /// into the command's own transaction with its events (`Db::append`, ADR 0020). A new
    /// organization's first wrapping key epoch is made here too, under `master`.
    pub async fn prepare_org_key(
        &self,
        org: OrgId,
        version: KeyVersion,
        master: Option<&MasterKeyRef>,
        new_org: bool,
    ) -> Result<(String, KeyWrites), KeyError> {
        let scope = org.to_string();
        let version = version.get();
        if !new_org {
            // An existing organization's wrapping key exists (or is made, under the key lock,
            // for one created before wrapping keys).
            let (epoch, wrapping) = self
                .current_wrapping(&scope, WrappingParent::Master(master.cloned()))
                .await?;
            return self.prepare_version(&scope, version, epoch, &wrapping, None);
        }
        let parent = WrappingParent::Master(master.cloned());
        self.prepare_with_first_epoch(&scope, version, &parent)
            .await
    }

    /// A new key version of `scope`, made and wrapped but not stored (see
    /// `prepare_org_key`); a scope without a wrapping key yet (a new one) gets its first
    /// epoch, under `parent`'s newest.
    pub async fn prepare_scope_key(
        &self,
        scope: ScopeId,
        version: KeyVersion,
        parent: &ScopeSnapshot,
    ) -> Result<(String, KeyWrites), KeyError> {
        let scope = scope.to_string();
        let version = version.get();
        if let Some(row) = self.db.wrapping_keys(&scope).await?.pop() {
            let wrapping = self.unwrap_wrapping(&scope, row.epoch).await?;
            return self.prepare_version(&scope, version, row.epoch, &wrapping, None);
        }
        let parent = WrappingParent::Scope(parent.scope.id);
        self.prepare_with_first_epoch(&scope, version, &parent)
            .await
    }

    async fn prepare_with_first_epoch(
        &self,
        scope: &str,
        version: u32,
        parent: &WrappingParent,
    ) -> Result<(String, KeyWrites), KeyError> {
        let wrapping = Kek::generate();
        let row = self
            .wrap_wrapping_key(scope, 1, &wrapping, parent, None)
            .await?;
        // The platform key that wraps the row, or seals the customer's ciphertext (BYOK):
        // the append refuses the row if that key was rotated away meanwhile.
        let platform = match (&row.parent, row.master_fingerprint.as_deref()) {
            (None, Some(by)) => platform_key_of(by).map(str::to_owned),
            _ => None,
        };
        self.prepare_version(scope, version, 1, &wrapping, Some((row, platform)))
    }

    fn prepare_version(
        &self,
        scope: &str,
        version: u32,
        epoch: u32,
        wrapping: &Kek,
        first_epoch: Option<(WrappingKeyRow, Option<String>)>,
    ) -> Result<(String, KeyWrites), KeyError> {
        let key = Kek::generate();
        let fingerprint = key.fingerprint();
        let wrapped = wrapping
            .wrap(&key, &version_binding(scope, version, epoch).parts())
            .map_err(|_| KeyError::Unwrap)?;
        let writes = KeyWrites {
            wrapping: first_epoch,
            version: Some(KeyRow {
                scope_id: scope.to_owned(),
                version,
                fingerprint: fingerprint.clone(),
                wrapped,
                parent: None,
                master_fingerprint: None,
                node_epoch: Some(epoch),
            }),
        };
        Ok((fingerprint, writes))
    }

    /// The append lost a race on the key material (`Appended::KeysRaced`): the platform
    /// master key may have been rotated meanwhile; load the current one before preparing
    /// again.
    pub async fn reload_after_race(&self) -> Result<(), KeyError> {
        for fingerprint in self.db.master_keys("local").await? {
            self.reload_master(&fingerprint).await;
        }
        Ok(())
    }

    /// The newest epoch of a scope's wrapping key, unwrapped; made (epoch 1) when the scope
    /// has none yet: a new scope, or one created before wrapping keys existed.
    fn current_wrapping<'a>(
        &'a self,
        scope: &'a str,
        parent: WrappingParent,
    ) -> BoxFuture<'a, Result<(u32, Kek), KeyError>> {
        Box::pin(async move {
            for _ in 0..3 {
                if let Some(row) = self.db.wrapping_keys(scope).await?.pop() {
                    let key = self.unwrap_wrapping(scope, row.epoch).await?;
                    return Ok((row.epoch, key));
                }
                // A revoke destroyed this scope's wrapping keys (or an ancestor's): never make
                // a new one. A child created under it meanwhile (born revoked, ADR 0003),
                // committing after the re-key job finished, would otherwise be wrapped under a
                // fresh, live key of the revoked subtree. The revoke deletes the rows in the
                // transaction that projects it, so "no row" and "revoked" are read consistently.
                if let Ok(id) = ScopeId::parse(scope) {
                    if let Some(snapshot) = self.read.scope(id).await? {
                        if matches!(snapshot.effective, ekm_domain::Effective::Revoked { .. }) {
                            return Err(KeyError::Revoked {
                                scope: scope.to_owned(),
                            });
                        }
                    }
                }
                // An organization's first epoch: not while a switch of master key runs.
                let _lock = match parent {
                    WrappingParent::Master(_) => {
                        let lock = self.db.lock_org_keys(scope).await?;
                        if let Some(row) = self.db.wrapping_keys(scope).await?.pop() {
                            let key = self.unwrap_wrapping(scope, row.epoch).await?;
                            return Ok((row.epoch, key));
                        }
                        Some(lock)
                    }
                    WrappingParent::Scope(_) => None,
                };
                let key = Kek::generate();
                let row = self
                    .wrap_wrapping_key(scope, 1, &key, &parent, None)
                    .await?;
                if self.store_wrapping_key(&row).await? {
                    return Ok((1, key));
                }
                // Another command made the scope's first epoch at the same time (use theirs),
                // or the platform master key was rotated meanwhile (now reloaded).
            }
            Err(KeyError::WrappingRace {
                scope: scope.to_owned(),
            })
        })
    }

    /// Where `scope`'s wrapping key is wrapped, from the read models.
    async fn parent_of(&self, scope: ScopeId) -> Result<WrappingParent, KeyError> {
        let snapshot = self
            .read
            .scope(scope)
            .await?
            .ok_or_else(|| KeyError::MissingWrapping {
                scope: scope.to_string(),
                epoch: 0,
            })?;
        Ok(match snapshot.scope.parent_id {
            None => WrappingParent::Master(snapshot.scope.master_key),
            Some(parent) => WrappingParent::Scope(parent),
        })
    }

    /// `key` as epoch `epoch` of `scope`'s wrapping key, wrapped under its parent's newest
    /// wrapping key, or by the master key for an organization.
    async fn wrap_wrapping_key(
        &self,
        scope: &str,
        epoch: u32,
        key: &Kek,
        parent: &WrappingParent,
        rekey_of: Option<&str>,
    ) -> Result<WrappingKeyRow, KeyError> {
        let (wrapped, parent, master_fingerprint) = match parent {
            WrappingParent::Master(master) => {
                let (wrapped, by) = self
                    .wrap_by_master(
                        key,
                        WrapContext::wrapping_key(scope, epoch),
                        master.as_ref(),
                    )
                    .await?;
                (wrapped, None, Some(by))
            }
            WrappingParent::Scope(parent) => {
                let parent_id = parent.to_string();
                // The parent's newest epoch; only a parent without one (created before
                // wrapping keys) needs its own parent looked up, to make it.
                let (parent_epoch, parent_key) =
                    match self.db.wrapping_keys(&parent_id).await?.pop() {
                        Some(row) => (
                            row.epoch,
                            self.unwrap_wrapping(&parent_id, row.epoch).await?,
                        ),
                        None => {
                            let grand = self.parent_of(*parent).await?;
                            self.current_wrapping(&parent_id, grand).await?
                        }
                    };
                let wrapped = parent_key
                    .wrap(
                        key,
                        &wrapping_binding(scope, epoch, &parent_id, parent_epoch).parts(),
                    )
                    .map_err(|_| KeyError::Unwrap)?;
                (wrapped, Some((parent_id, parent_epoch)), None)
            }
        };
        Ok(WrappingKeyRow {
            scope_id: scope.to_owned(),
            epoch,
            fingerprint: key.fingerprint(),
            wrapped,
            parent,
            master_fingerprint,
            rekey_of: rekey_of.map(str::to_owned),
        })
    }

    /// Stores a new wrapping key; false if the epoch exists already, or if it is wrapped by
    /// a platform master key that was rotated away meanwhile (then the new key is loaded,
    /// and the caller wraps again).
    async fn store_wrapping_key(&self, row: &WrappingKeyRow) -> Result<bool, KeyError> {
        // The platform key that wraps the row, or seals the customer's ciphertext (BYOK).
        let platform = match (&row.parent, row.master_fingerprint.as_deref()) {
            (None, Some(by)) => platform_key_of(by),
            _ => None,
        };
        if self.db.insert_wrapping_key(row, platform).await? {
            return Ok(true);
        }
        if platform.is_some() {
            for fingerprint in self.db.master_keys("local").await? {
                self.reload_master(&fingerprint).await;
            }
        }
        Ok(false)
    }

    /// Unwraps epoch `epoch` of a scope's wrapping key, walking up to the master key.
    fn unwrap_wrapping<'a>(
        &'a self,
        scope: &'a str,
        epoch: u32,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<Kek, KeyError>> + Send + 'a>>
    {
        Box::pin(async move {
            let read = || async {
                self.db
                    .wrapping_key(scope, epoch)
                    .await?
                    .ok_or_else(|| KeyError::MissingWrapping {
                        scope: scope.to_owned(),
                        epoch,
                    })
            };
            let mut row = read().await?;
            let mut moved = 0;
            let key = match row.parent.clone() {
                None => {
                    return self
                        .unwrap_org_key(&MasterWrapped {
                            scope_id: row.scope_id.clone(),
                            version: row.epoch,
                            purpose: WrapPurpose::WrappingKey,
                            fingerprint: row.fingerprint.clone(),
                            wrapped: row.wrapped.clone(),
                            master_fingerprint: row.master_fingerprint.clone(),
                        })
                        .await
                }
                Some((mut parent, mut parent_epoch)) => loop {
                    match self.unwrap_wrapping(&parent, parent_epoch).await {
                        Ok(parent_key) => {
                            break parent_key.unwrap_key(
                                &row.wrapped,
                                &wrapping_binding(scope, epoch, &parent, parent_epoch).parts(),
                            )
                        }
                        // A re-key of the parent moved this row onto its newer epoch and
                        // destroyed the one it named between the two reads: read it again.
                        Err(KeyError::MissingWrapping {
                            scope: gone,
                            epoch: e,
                        }) if moved < 3 && gone == parent && e == parent_epoch => {
                            moved += 1;
                            row = read().await?;
                            match row.parent.clone() {
                                Some(next) if next != (parent.clone(), parent_epoch) => {
                                    (parent, parent_epoch) = next;
                                }
                                _ => {
                                    return Err(KeyError::MissingWrapping {
                                        scope: gone,
                                        epoch: e,
                                    })
                                }
                            }
                        }
                        Err(error) => return Err(error),
                    }
                },
            };
            self.unwraps.fetch_add(1, Ordering::Relaxed);
            let key = key.map_err(|_| KeyError::Unwrap)?;
            if key.fingerprint() != row.fingerprint {
                return Err(KeyError::Unwrap);
            }
            Ok(key)
        })
    }

    /// Re-keys one scope on the path of a revoked scope (`revoked`): a new epoch of its
    /// wrapping key (or the one an interrupted run of the same re-key made), everything the
    /// older epochs wrap re-wrapped under it in batches, then the older epochs destroyed.
    /// Safe to run again after a crash at any point. Returns how many keys were re-wrapped.
    pub async fn rekey_scope(
        &self,
        scope: &ScopeSnapshot,
        revoked: ScopeId,
        batch: i64,
    ) -> Result<u64, KeyError> {
        let scope_id = scope.scope.id.to_string();
        let revoked_id = revoked.to_string();
        // An organization's new epoch is wrapped by its master key: not while a switch of
        // master key is under way, and with the master key as it is once the lock is held.
        let (_lock, org_master) = match scope.scope.parent_id {
            None => {
                let lock = self.db.lock_org_keys(&scope_id).await?;
                let fresh = self
                    .read
                    .scope(scope.scope.id)
                    .await?
                    .and_then(|s| s.scope.master_key);
                (Some(lock), fresh)
            }
            Some(_) => (None, None),
        };
        // A store that fails means another run made this epoch (the next pass takes it as
        // an interrupted run's), or the platform master key was rotated beside this process
        // (`store_wrapping_key` reloaded it): look again, a few times.
        let mut attempts = 0;
        let (epoch, key) = loop {
            let existing = self.db.wrapping_keys(&scope_id).await?;
            match existing.last() {
                // An interrupted run of this re-key made the epoch already.
                Some(last) if last.rekey_of.as_deref() == Some(revoked_id.as_str()) => {
                    break (
                        last.epoch,
                        self.unwrap_wrapping(&scope_id, last.epoch).await?,
                    );
                }
                // Nothing was ever wrapped under this scope's own wrapping key (a scope
                // created before wrapping keys, whose children are still wrapped under its
                // key versions): there is nothing on this level to re-key yet.
                None => return Ok(0),
                Some(last) => {
                    let epoch = last.epoch + 1;
                    let key = Kek::generate();
                    let parent = match scope.scope.parent_id {
                        None => WrappingParent::Master(org_master.clone()),
                        Some(parent_id) => WrappingParent::Scope(parent_id),
                    };
                    let row = self
                        .wrap_wrapping_key(&scope_id, epoch, &key, &parent, Some(&revoked_id))
                        .await?;
                    if self.store_wrapping_key(&row).await? {
                        break (epoch, key);
                    }
                    attempts += 1;
                    if attempts == 3 {
                        return Err(KeyError::WrappingRace { scope: scope_id });
                    }
                }
            }
        };
        self.rewrap_onto(&scope_id, epoch, &key, batch).await
    }

    /// Re-wraps everything under `scope`'s older epochs onto `epoch`, then destroys them.
    async fn rewrap_onto(
        &self,
        scope_id: &str,
        epoch: u32,
        key: &Kek,
        batch: i64,
    ) -> Result<u64, KeyError> {
        let mut old: HashMap<u32, Kek> = HashMap::new();
        let mut total = 0u64;
        loop {
            let items = self
                .db
                .wrapped_under_other_epochs(scope_id, epoch, batch)
                .await?;
            if items.is_empty() {
                if self.db.destroy_other_epochs(scope_id, epoch).await? {
                    return Ok(total);
                }
                continue;
            }
            let mut done = Vec::with_capacity(items.len());
            for item in items {
                let (old_epoch, binding_old, binding_new, wrapped) = match &item {
                    Wrapped::KeyVersion {
                        scope_id: id,
                        version,
                        wrapped,
                        epoch: e,
                        ..
                    } => (
                        *e,
                        version_binding(id, *version, *e),
                        version_binding(id, *version, epoch),
                        wrapped,
                    ),
                    Wrapped::WrappingKey {
                        scope_id: id,
                        epoch: child_epoch,
                        wrapped,
                        parent_epoch,
                    } => (
                        *parent_epoch,
                        wrapping_binding(id, *child_epoch, scope_id, *parent_epoch),
                        wrapping_binding(id, *child_epoch, scope_id, epoch),
                        wrapped,
                    ),
                };
                if let std::collections::hash_map::Entry::Vacant(slot) = old.entry(old_epoch) {
                    slot.insert(self.unwrap_wrapping(scope_id, old_epoch).await?);
                }
                let old_key = old.get(&old_epoch).ok_or(KeyError::Unwrap)?;
                let inner = old_key
                    .unwrap_key(wrapped, &binding_old.parts())
                    .map_err(|_| KeyError::Unwrap)?;
                let rewrapped = key
                    .wrap(&inner, &binding_new.parts())
                    .map_err(|_| KeyError::Unwrap)?;
                done.push((item, rewrapped));
            }
            total += done.len() as u64;
            self.db.apply_rewraps(&done, epoch).await?;
        }
    }

    /// Wraps a key under `master` (a customer key), or the platform key with `None`.
    /// Returns the wrapped key and what wraps it, as key rows record it.
    async fn wrap_by_master(
        &self,
        key: &Kek,
        context: WrapContext<'_>,
        master: Option<&MasterKeyRef>,
    ) -> Result<(Vec<u8>, String), KeyError> {
        let plaintext = key.for_master_key_provider();
        match master {
            Some(master) => {
                let provider = self.provider(master).await.map_err(KeyError::Provider)?;
                let inner = self
                    .guarded_kms_call(
                        master,
                        Operation::Encrypt,
                        provider.wrap(&plaintext, context),
                    )
                    .await
                    .map_err(KeyError::Provider)?;
                let local = self.local_master();
                let wrapped = local
                    .seal_outer(&inner, &context.local_binding())
                    .map_err(|_| KeyError::Unwrap)?;
                Ok((
                    wrapped,
                    format!(
                        "{}{PLATFORM_SEAL}{}",
                        master.wrapping_id(),
                        local.fingerprint()
                    ),
                ))
            }
            None => {
                let master = self.local_master();
                let wrapped = LocalProvider::new(master.clone())
                    .wrap(&plaintext, context)
                    .await
                    .map_err(KeyError::Provider)?;
                Ok((wrapped, master.fingerprint()))
            }
        }
    }

    /// The platform master key this process holds now.
    pub fn local_master(&self) -> LocalMasterKey {
        match self.master.read() {
            Ok(master) => master.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Looks for the platform master key with `fingerprint` in the key file (or the file a
    /// rotation writes first), or in the database when a KMS holds it, after `ekm
    /// master-key rotate` ran beside this process. Returns whether this process now holds it.
    async fn reload_master(&self, fingerprint: &str) -> bool {
        if let Some(platform) = &self.kms.platform_key {
            return match open_platform_key(&self.db, platform, &self.kms.settings, fingerprint)
                .await
            {
                Ok(Some(key)) => {
                    if let Ok(mut master) = self.master.write() {
                        *master = key;
                    }
                    tracing::info!(
                        fingerprint,
                        "the platform master key was rotated; now using the new key"
                    );
                    true
                }
                Ok(None) => false,
                Err(error) => {
                    tracing::warn!(error = %ekm_projections::error_chain(&error), "the rotated platform master key could not be opened");
                    false
                }
            };
        }
        let current = self.local_master();
        for path in [current.path().to_owned(), rotating_path(current.path())] {
            if let Ok(Some(key)) = LocalMasterKey::load(&path, false) {
                if key.fingerprint() == fingerprint {
                    let mut loaded = key;
                    loaded.set_path(current.path());
                    if let Ok(mut master) = self.master.write() {
                        *master = loaded;
                    }
                    tracing::info!(
                        fingerprint,
                        "the platform master key was rotated; now using the new key"
                    );
                    return true;
                }
            }
        }
        false
    }
}

/// Where `ekm master-key rotate` writes the new master key before the database uses it.
pub fn rotating_path(path: &std::path::Path) -> std::path::PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".new");
    path.with_file_name(name)
}

/// How a staged re-wrap of a wrapping key's epoch is told apart from a key version's in
/// `master_key_rewraps` (the shredder applies each to its table).
pub const WRAPPING_STAGE_PREFIX: &str = "wrap:";

/// In a row's `master_fingerprint`, what follows the customer key's id when the platform
/// key seals the customer's ciphertext (`aws-kms:arn…+local:<fingerprint>`).
pub const PLATFORM_SEAL: &str = "+local:";

/// The customer key's part of a row's `master_fingerprint`.
fn customer_part(wrapped_by: &str) -> &str {
    wrapped_by
        .split_once(PLATFORM_SEAL)
        .map_or(wrapped_by, |(customer, _)| customer)
}

/// The platform key that seals a customer-wrapped row, if one does.
fn platform_part(wrapped_by: Option<&str>) -> Option<&str> {
    wrapped_by?
        .split_once(PLATFORM_SEAL)
        .map(|(_, local)| local)
}

/// The platform key a master-wrapped row depends on: its fingerprint when the platform key
/// wraps the row, or the part after `+local:` when it seals a customer's ciphertext; `None`
/// for a customer key alone (`provider:key_id`).
fn platform_key_of(wrapped_by: &str) -> Option<&str> {
    platform_part(Some(wrapped_by)).or(Some(wrapped_by).filter(|b| !b.contains(':')))
}

/// A boxed future, for the methods that recurse up the hierarchy.
type BoxFuture<'a, T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;

/// Where a new wrapping key goes: under the master key (an organization's: the customer's
/// key, or the platform's with `None`), or under its parent scope's newest wrapping key.
enum WrappingParent {
    Master(Option<MasterKeyRef>),
    Scope(ScopeId),
}

/// A key wrapped by a master key: an organization key version written before wrapping keys,
/// or an epoch of an organization's wrapping key.
struct MasterWrapped {
    scope_id: String,
    version: u32,
    purpose: WrapPurpose,
    fingerprint: String,
    wrapped: Vec<u8>,
    master_fingerprint: Option<String>,
}

impl MasterWrapped {
    fn version(row: &KeyRow) -> MasterWrapped {
        MasterWrapped {
            scope_id: row.scope_id.clone(),
            version: row.version,
            purpose: WrapPurpose::KeyVersion,
            fingerprint: row.fingerprint.clone(),
            wrapped: row.wrapped.clone(),
            master_fingerprint: row.master_fingerprint.clone(),
        }
    }
}

/// Associated data that binds a wrapped key to where it belongs.
struct Binding([String; 5]);

impl Binding {
    fn parts(&self) -> [&[u8]; 5] {
        let [a, b, c, d, e] = &self.0;
        [
            a.as_bytes(),
            b.as_bytes(),
            c.as_bytes(),
            d.as_bytes(),
            e.as_bytes(),
        ]
    }
}

/// A scope's key version under its own wrapping key.
fn version_binding(scope: &str, version: u32, epoch: u32) -> Binding {
    Binding([
        "ekm-kek-v2".to_owned(),
        scope.to_owned(),
        version.to_string(),
        "epoch".to_owned(),
        epoch.to_string(),
    ])
}

/// A scope's wrapping key under its parent's.
fn wrapping_binding(scope: &str, epoch: u32, parent: &str, parent_epoch: u32) -> Binding {
    Binding([
        "ekm-wrap-v1".to_owned(),
        scope.to_owned(),
        epoch.to_string(),
        parent.to_owned(),
        parent_epoch.to_string(),
    ])
}

#[derive(Debug, thiserror::Error)]
pub enum MasterKeySetupError {
    #[error(transparent)]
    File(#[from] ekm_keys::MasterKeyError),
    #[error("storage failed")]
    Store(#[from] StoreError),
    #[error("the KMS key that holds the platform master key cannot be used")]
    Kms(#[source] ProviderError),
    #[error("this database's platform master key is held by {held_by}, not by the key given with --master-key")]
    OtherKms { held_by: String },
    #[error("this database's platform master key is kept in a file (master.key), not in a KMS: run `ekm master-key rotate --master-key …` to move it into the KMS")]
    KeptInFile,
    #[error("the platform master key the KMS returned is not the one the database names")]
    Damaged,
    #[error(
        "this database's platform master key is held by a KMS: start with --master-key {held_by}"
    )]
    HeldByKms { held_by: String },
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
    if let Some(fingerprint) = known.first() {
        if let Some(row) = db.platform_key(fingerprint).await? {
            return Err(MasterKeySetupError::HeldByKms {
                held_by: row.wrapped_by,
            });
        }
    }
    let shown = path.display().to_string();
    finish_rotation(&known, path)?;
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

/// A rotation that committed in the database but stopped before its new key file replaced
/// the old one: finish it (the database already needs the new key; the old one opens
/// nothing it holds).
fn finish_rotation(known: &[String], path: &std::path::Path) -> Result<(), MasterKeySetupError> {
    let next = rotating_path(path);
    let Ok(Some(candidate)) = LocalMasterKey::load(&next, false) else {
        return Ok(());
    };
    if !known.contains(&candidate.fingerprint()) {
        return Ok(());
    }
    let io = |source| {
        MasterKeySetupError::File(ekm_keys::MasterKeyError::Io {
            path: path.display().to_string(),
            source,
        })
    };
    std::fs::rename(&next, path).map_err(io)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io)?;
    }
    tracing::info!(path = %path.display(), "finished an interrupted master key rotation");
    Ok(())
}

/// What `ekm master-key rotate` did.
#[derive(Debug)]
pub struct Rotation {
    pub old: String,
    pub new: String,
    pub rewrapped: usize,
}

/// Rotates the platform master key (ADR 0013): a new key, every organization key the old
/// one wraps (or seals) re-wrapped under it in one transaction that also records the new
/// key as the database's, and the old key destroyed.
///
/// `file` is where a file-kept key lives (`master.key`); `target` is where the new key is
/// kept: the file, or (`Some`) the database, wrapped by that KMS key. The current key is
/// opened where it is: in the database when a KMS holds it (`current_kms` must name that KMS
/// key), else in the file. A file key is written first as `master.key.new` (0600); a crash
/// after the commit is finished by the next start. Moving to a KMS deletes the old file.
/// Instances running beside it on PostgreSQL load the new key when they first meet it.
pub async fn rotate_platform_master_key(
    db: &Db,
    file: &std::path::Path,
    current_kms: Option<&MasterKeyRef>,
    target: Option<&MasterKeyRef>,
    settings: &KmsSettings,
) -> Result<Rotation, MasterKeySetupError> {
    rotate_platform_master_key_with_progress(db, file, current_kms, target, settings, &|| {}).await
}

/// `rotate_platform_master_key`, calling `rewrapped` once per key re-wrapped (a progress
/// bar's step).
pub async fn rotate_platform_master_key_with_progress(
    db: &Db,
    file: &std::path::Path,
    current_kms: Option<&MasterKeyRef>,
    target: Option<&MasterKeyRef>,
    settings: &KmsSettings,
    rewrapped: &(dyn Fn() + Sync),
) -> Result<Rotation, MasterKeySetupError> {
    let known = db.master_keys("local").await?;
    let held_by_kms = match known.first() {
        Some(fingerprint) => db.platform_key(fingerprint).await?,
        None => None,
    };
    let current = match (&held_by_kms, current_kms) {
        (Some(row), Some(kms)) => open_platform_key(db, kms, settings, &row.fingerprint)
            .await?
            .ok_or(MasterKeySetupError::Damaged)?,
        (Some(row), None) => {
            return Err(MasterKeySetupError::HeldByKms {
                held_by: row.wrapped_by.clone(),
            })
        }
        (None, _) => local_master_key(db, file).await?,
    };
    let next = rotating_path(file);
    let (new, new_row) = match target {
        Some(kms) => {
            let new = LocalMasterKey::held(Kek::generate());
            let row = hold_in_kms(&new, kms, settings).await?;
            (new, Some(row))
        }
        None => {
            // Left by a rotation that failed before its commit: never used by the database.
            match std::fs::remove_file(&next) {
                Err(error) if error.kind() != std::io::ErrorKind::NotFound => {
                    return Err(MasterKeySetupError::File(ekm_keys::MasterKeyError::Io {
                        path: next.display().to_string(),
                        source: error,
                    }))
                }
                _ => {}
            }
            let new = LocalMasterKey::generate(&next);
            new.write_new()?;
            (new, None)
        }
    };
    let old_fingerprint = current.fingerprint();
    let new_fingerprint = new.fingerprint();
    let rewrapped = db
        .rotate_local_master(
            &old_fingerprint,
            &new_fingerprint,
            new_row.as_ref(),
            |kind, sealed, org, number, wrapped| {
                rewrapped();
                let context = match kind {
                    ekm_store::MasterWrappedKind::WrappingKey => {
                        WrapContext::wrapping_key(org, number)
                    }
                    ekm_store::MasterWrappedKind::KeyVersion => {
                        WrapContext::key_version(org, number)
                    }
                };
                let binding = context.local_binding();
                if sealed {
                    // BYOK: the customer's ciphertext, re-sealed; the customer key is not
                    // called.
                    let inner = current.open_outer(wrapped, &binding).ok()?;
                    return new.seal_outer(&inner, &binding).ok();
                }
                let key = current.unwrap_bound(wrapped, &binding).ok()?;
                new.wrap_bound(&key, &binding).ok()
            },
        )
        .await?;
    let io = |source| {
        MasterKeySetupError::File(ekm_keys::MasterKeyError::Io {
            path: file.display().to_string(),
            source,
        })
    };
    match target {
        None => finish_rotation(&db.master_keys("local").await?, file)?,
        // The old key's file, if it was kept in one, is destroyed: the KMS holds the key now.
        Some(_) => match std::fs::remove_file(file) {
            Err(error) if error.kind() != std::io::ErrorKind::NotFound => return Err(io(error)),
            _ => {}
        },
    }
    db.destroy_at_rest().await?;
    Ok(Rotation {
        old: old_fingerprint,
        new: new_fingerprint,
        rewrapped,
    })
}

/// `rotate_platform_master_key` for a key kept in `path`, staying there.
pub async fn rotate_local_master_key(
    db: &Db,
    path: &std::path::Path,
) -> Result<Rotation, MasterKeySetupError> {
    rotate_platform_master_key(db, path, None, None, &KmsSettings::default()).await
}

/// What the platform master key's KMS binding names in place of an organization.
const PLATFORM_CONTEXT: &str = "ekm-platform-master-key";

/// The provider of the KMS key that holds the platform master key. The operator named its
/// endpoint on the command line, so it needs no place in the customer allow-list.
async fn platform_provider(
    key: &MasterKeyRef,
    settings: &KmsSettings,
) -> Result<Arc<dyn MasterKeyProvider>, MasterKeySetupError> {
    let mut settings = settings.clone();
    if let Some(endpoint) = &key.endpoint_url {
        settings.allowed_endpoints = vec![endpoint.clone()];
    }
    ekm_kms::provider_for(key, &settings)
        .await
        .map_err(MasterKeySetupError::Kms)
}

/// Opens the KMS-held platform key with `fingerprint`, if the database holds it.
async fn open_platform_key(
    db: &Db,
    key: &MasterKeyRef,
    settings: &KmsSettings,
    fingerprint: &str,
) -> Result<Option<LocalMasterKey>, MasterKeySetupError> {
    let Some(row) = db.platform_key(fingerprint).await? else {
        return Ok(None);
    };
    if row.wrapped_by != key.wrapping_id() {
        return Err(MasterKeySetupError::OtherKms {
            held_by: row.wrapped_by,
        });
    }
    let provider = platform_provider(key, settings).await?;
    let bytes = provider
        .unwrap(&row.wrapped, WrapContext::wrapping_key(PLATFORM_CONTEXT, 1))
        .await
        .map_err(MasterKeySetupError::Kms)?;
    let kek = Kek::from_bytes(&bytes).map_err(|_| MasterKeySetupError::Damaged)?;
    if kek.fingerprint() != fingerprint {
        return Err(MasterKeySetupError::Damaged);
    }
    Ok(Some(LocalMasterKey::held(kek)))
}

/// Wraps a platform key with the KMS key that is to hold it.
async fn hold_in_kms(
    key: &LocalMasterKey,
    kms: &MasterKeyRef,
    settings: &KmsSettings,
) -> Result<ekm_store::PlatformKeyRow, MasterKeySetupError> {
    let provider = platform_provider(kms, settings).await?;
    let plaintext = key.as_kek().for_master_key_provider();
    let wrapped = provider
        .wrap(&plaintext, WrapContext::wrapping_key(PLATFORM_CONTEXT, 1))
        .await
        .map_err(MasterKeySetupError::Kms)?;
    Ok(ekm_store::PlatformKeyRow {
        fingerprint: key.fingerprint(),
        wrapped_by: kms.wrapping_id(),
        wrapped,
    })
}

/// Where the platform master key is kept.
#[derive(Clone, Debug)]
pub enum PlatformKeySource {
    /// A 0600 file (the embedded default: `DIR/master.key`).
    File(std::path::PathBuf),
    /// In the database, wrapped by a KMS key (`--master-key aws-kms:ARN`): a stolen data
    /// directory or database holds no usable platform key.
    Kms(MasterKeyRef),
}

/// Loads the platform master key from where it is kept, creating it on a new database.
pub async fn platform_master_key(
    db: &Db,
    source: &PlatformKeySource,
    settings: &KmsSettings,
) -> Result<LocalMasterKey, MasterKeySetupError> {
    let kms = match source {
        PlatformKeySource::File(path) => return local_master_key(db, path).await,
        PlatformKeySource::Kms(kms) => kms,
    };
    for _ in 0..2 {
        let known = db.master_keys("local").await?;
        if let Some(fingerprint) = known.first() {
            return open_platform_key(db, kms, settings, fingerprint)
                .await?
                .ok_or(MasterKeySetupError::KeptInFile);
        }
        let key = LocalMasterKey::held(Kek::generate());
        let row = hold_in_kms(&key, kms, settings).await?;
        if db.register_platform_key(&row).await? {
            return Ok(key);
        }
        // Another instance registered its key first: use that one.
    }
    Err(MasterKeySetupError::KeptInFile)
}
