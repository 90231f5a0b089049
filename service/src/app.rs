//! The application service (behind the HTTP API and the binary's jobs): runs commands on the scope aggregate
//! (looking up what they need first), retries optimistic-concurrency conflicts, and answers
//! from the read models once they include the command's own events (read-your-writes).

use std::sync::Arc;
use std::time::Duration;

use cqrs_es::{AggregateContext, AggregateError};
use ekm_domain::{
    Admitted, Command, EventMetadata, KeyVersion, Lineage, Location, MintedKey, Needs, OrgId,
    ParentContext, Plan, Prepared, Scope, ScopeError, ScopeEvent, ScopeId, ScopeKind, ScopeName,
    Tier,
};
use ekm_projections::{
    AsOf, AuditEntry, AuditFilter, BlastRadius, ChainReport, MemoryLoad, MemoryTree, Page,
    PastScope, ProjectionError, Projector, ReadModels, ScopeSnapshot,
};
use ekm_store::{
    Appended, Db, KeyWrites, NewToken, Principal, Role, ScopeStore, StoreError, Tokens,
};
use rand::Rng;

use crate::keys::{KeyError, KeyService};
use crate::minter::KeyMinter;

/// How often a command is retried when another command on the same scope committed first.
const MAX_ATTEMPTS: u32 = 20;
/// Pauses before each attempt to read a committed change back (`App::read_back`).
const READ_BACK_BACKOFF: [Duration; 4] = [
    Duration::ZERO,
    Duration::from_millis(50),
    Duration::from_millis(250),
    Duration::from_millis(1_000),
];

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error(transparent)]
    Rule(#[from] ScopeError),
    #[error("the scope does not exist")]
    NotFound,
    #[error("the scope's version is {current}, not the {expected} given in If-Match")]
    VersionMismatch { expected: i64, current: i64 },
    #[error("the scope kept changing concurrently; try again")]
    Contended,
    /// The operator's token manages organizations, not what is inside them.
    #[error("the operator token manages organizations only; use an organization's token")]
    OperatorHasNoScopes,
    /// No scope with this id in the caller's organization (whether it exists elsewhere is
    /// not said).
    #[error("no scope with this id is visible to this token")]
    NotVisible,
    /// The data plane refuses: the scope is paused, by itself or the ancestor `by`.
    #[error("the scope is paused; encryption and decryption are refused until it is resumed")]
    Paused { by: ScopeId },
    /// The data plane refuses: a revoke waits for its due time on the scope, or on the
    /// ancestor `by`.
    #[error("the scope's revocation is pending (until {due_at}); encryption and decryption are refused unless the revocation is cancelled")]
    PendingRevocation { by: ScopeId, due_at: String },
    /// The data plane refuses: the scope is revoked, by itself or the ancestor `by`.
    #[error("the scope is revoked; its keys are destroyed")]
    Revoked { by: ScopeId },
    /// The data plane refuses: the organization's customer master key is unavailable.
    #[error("the organization's master key cannot be used (disabled, scheduled for deletion, access removed, or unreachable); requests fail closed until it is usable again")]
    MasterKeyUnavailable { by: ScopeId, reason: Option<String> },
    /// The caller's role and grants do not give it `permission` on the scope.
    #[error("this token's principal does not hold {permission} here; an org admin can grant it")]
    NotPermitted { permission: ekm_domain::Permission },
    /// Tokens and grants are managed by org admins only.
    #[error("only an org_admin manages tokens and grants")]
    NotOrgAdmin,
    /// The customer key offered is the one that holds the platform's own master key.
    #[error("this key holds the platform's own master key; connect a key of your own account")]
    PlatformKeyOffered,
    /// The customer key's `endpoint_url` is not among the operator's allowed endpoints. The
    /// URL is not echoed: problems are logged and shown in consoles, and the answer must not
    /// help probe what the platform would connect to.
    #[error("endpoint_url is not among the endpoints this platform allows (scheme://host[:port] only, no path); ask the operator to allow it (--kms-allowed-endpoints)")]
    EndpointNotAllowed,
    /// A customer master key failed validation when connecting it.
    #[error("the {provider} master key failed validation")]
    MasterKeyUnusable {
        provider: ekm_domain::Provider,
        #[source]
        source: ekm_kms::ProviderError,
    },
    #[error("storage failed")]
    Store(#[from] StoreError),
    #[error("read model failed")]
    Projection(#[from] ProjectionError),
    #[error("event store failed")]
    EventStore(#[source] AggregateError<ScopeError>),
    #[error("key hierarchy failed")]
    Key(#[from] KeyError),
    /// The command's events are committed (durable), but bringing the read models up to them
    /// or reading the scope back failed, even after retries. Reported apart from every other
    /// failure: repeating the request would repeat the change (a second scope, say).
    /// The data plane refuses: the read models stopped following the event log, so a pause
    /// or revoke committed since may not be seen (`watchdog`).
    #[error("the read models are {behind_ms} ms behind the event log (applied position {applied}, head {head}); encryption and decryption are refused until they catch up")]
    ProjectionsBehind {
        applied: i64,
        head: i64,
        behind_ms: u64,
    },
    #[error("the change to scope {id} was recorded, but reading it back failed")]
    Committed {
        id: ScopeId,
        position: Option<i64>,
        #[source]
        source: Box<AppError>,
    },
}

/// A command on a scope: one typed command per intent (ADR 0022). The name stays for the
/// callers that knew it as the action on an existing scope.
pub use ekm_domain::Command as Action;

/// What a command did.
#[derive(Clone, Debug)]
pub struct Outcome {
    pub scope: ScopeSnapshot,
    /// Whether the command recorded an event (pause and resume are idempotent).
    pub changed: bool,
    /// The position of the last event it recorded.
    pub position: Option<i64>,
}

/// The audit key, sealing access records.
pub struct AccessSeals(pub ekm_keys::SealKey);

impl ekm_store::access_log::AccessSealer for AccessSeals {
    fn seal(&self, org_id: &str, prev: &str, entry: &[u8]) -> String {
        self.0.seal_access(org_id, prev, entry)
    }
    fn verify(&self, org_id: &str, prev: &str, entry: &[u8], seal: &str) -> bool {
        self.0.verify_access(org_id, prev, entry, seal)
    }
}

/// Everything a request handler needs; cheap to clone.
#[derive(Clone)]
pub struct App {
    inner: Arc<Inner>,
}

/// Principals of recently seen tokens, keyed by the token's hash. An entry lives at most
/// `TOKEN_CACHE_TTL`, so a token revoked on another instance stops working within that
/// bound (the same bound as a pause reaching other instances); a revoke on this instance
/// evicts at once. Unknown tokens are never cached.
const TOKEN_CACHE_TTL: Duration = Duration::from_secs(1);
const TOKEN_CACHE_MAX: usize = 10_000;

/// Aggregates kept between commands (`App::load`): at most this many, then forgotten.
const AGGREGATE_CACHE_MAX: usize = 20_000;

pub(crate) struct Inner {
    /// Scope aggregates as of their last known sequence (`App::load`).
    aggregates: std::sync::Mutex<std::collections::HashMap<String, (Scope, i64)>>,
    /// The position of this instance's last committed event (`settled`).
    last_commit: std::sync::atomic::AtomicI64,
    /// Bumped by `forget_principals`: a lookup that started before it is not cached.
    token_generation: std::sync::atomic::AtomicU64,
    token_cache:
        std::sync::Mutex<std::collections::HashMap<String, (Principal, std::time::Instant)>>,
    db: Db,
    store: ScopeStore,
    projector: Arc<Projector>,
    read: ReadModels,
    /// The scope tree in memory, fed by the projector; answers `scope` once loaded.
    memory: Arc<MemoryTree>,
    tokens: Tokens,
    keys: Arc<KeyService>,
    /// Makes the key material commands need (`keys`, or a fake in unit tests).
    minter: Arc<dyn KeyMinter>,
    /// The audit key, to verify the seals (the projector seals with the same key).
    seal: ekm_keys::SealKey,
    /// The audit signing key, for the signed checkpoints of exports.
    signing: Arc<ekm_keys::SigningKey>,
    /// Set while the read models are behind the event log past the bound (`watchdog`): the
    /// data plane's fast check.
    pub(crate) stalled: std::sync::atomic::AtomicBool,
    /// The stall, for answers and waiters.
    pub(crate) stall: tokio::sync::watch::Sender<Option<crate::watchdog::Stall>>,
    /// The data plane's access log (`set_access_log`; none: nothing is recorded).
    access: std::sync::OnceLock<ekm_store::AccessLog>,
}

impl App {
    /// The key service's cache listens to the projector, so a pause, revoke or rotation
    /// evicts cached keys before the command is answered. The in-memory scope tree listens
    /// first: once a key is evicted, a reader that loads it again sees the event.
    /// Scopes are read from SQL until `load_memory` has run.
    pub fn new(
        db: Db,
        projector: Arc<Projector>,
        keys: Arc<KeyService>,
        seal: ekm_keys::SealKey,
        signing: Arc<ekm_keys::SigningKey>,
    ) -> Self {
        let minter: Arc<dyn KeyMinter> = keys.clone();
        Self::with_minter(db, projector, keys, (seal, signing), minter)
    }

    /// `new`, with the key material made by `minter` (a fake in unit tests).
    pub(crate) fn with_minter(
        db: Db,
        projector: Arc<Projector>,
        keys: Arc<KeyService>,
        (seal, signing): (ekm_keys::SealKey, Arc<ekm_keys::SigningKey>),
        minter: Arc<dyn KeyMinter>,
    ) -> Self {
        let memory = Arc::new(MemoryTree::new());
        projector.add_listener(memory.listener());
        projector.add_listener(keys.listener());
        Self {
            inner: Arc::new(Inner {
                aggregates: std::sync::Mutex::new(std::collections::HashMap::new()),
                last_commit: std::sync::atomic::AtomicI64::new(0),
                token_generation: std::sync::atomic::AtomicU64::new(0),
                token_cache: std::sync::Mutex::new(std::collections::HashMap::new()),
                store: ScopeStore::new(&db),
                read: ReadModels::new(db.clone()),
                memory,
                tokens: Tokens::new(db.clone()),
                db,
                projector,
                keys,
                minter,
                seal,
                signing,
                stalled: std::sync::atomic::AtomicBool::new(false),
                stall: tokio::sync::watch::Sender::new(None),
                access: std::sync::OnceLock::new(),
            }),
        }
    }

    /// Records the data plane's uses in `log` from now on (once; a second log is refused).
    pub fn set_access_log(&self, log: ekm_store::AccessLog) -> Result<(), AppError> {
        self.inner.access.set(log).map_err(|_| {
            AppError::Store(ekm_store::StoreError::Database(sqlx::Error::Configuration(
                "the access log was already set".into(),
            )))
        })
    }

    /// The data plane's access log, if this instance keeps one.
    pub fn access_log(&self) -> Option<&ekm_store::AccessLog> {
        self.inner.access.get()
    }

    /// Seals access records with this instance's audit key (for `AccessLog::open`).
    pub fn access_sealer(&self) -> Arc<dyn ekm_store::access_log::AccessSealer> {
        Arc::new(AccessSeals(self.inner.seal.clone()))
    }

    /// Checks `org`'s access records against their seals (ADR 0026).
    pub async fn verify_access(
        &self,
        org: OrgId,
    ) -> Result<Option<ekm_store::access_log::AccessReport>, AppError> {
        let Some(log) = self.access_log() else {
            return Ok(None);
        };
        let sealer = AccessSeals(self.inner.seal.clone());
        Ok(Some(
            // Nothing pinned here (the auditor's head file is the command line's).
            log.verify(&org.to_string(), &sealer, &Default::default(), 36_500)
                .await?,
        ))
    }

    pub(crate) fn inner(&self) -> &Inner {
        &self.inner
    }

    pub fn keys(&self) -> &Arc<KeyService> {
        &self.inner.keys
    }

    pub fn db(&self) -> &Db {
        &self.inner.db
    }

    pub fn read(&self) -> &ReadModels {
        &self.inner.read
    }

    /// How far the re-key of a revoked scope has got, from its events.
    pub async fn rekey_progress(
        &self,
        id: ScopeId,
    ) -> Result<Option<ekm_domain::RekeyProgress>, AppError> {
        let mut context = self
            .inner
            .store
            .load(&id.to_string())
            .await
            .map_err(AppError::EventStore)?;
        Ok(context.aggregate().state().and_then(|s| s.rekey.clone()))
    }

    /// The platform's audit signing key (Ed25519), which signs export checkpoints.
    pub fn signing_key(&self) -> &Arc<ekm_keys::SigningKey> {
        &self.inner.signing
    }

    /// The audit signing keys the database knows: the current one, then the retired ones.
    pub async fn signing_keys(&self) -> Result<Vec<ekm_projections::SigningKeyRecord>, AppError> {
        Ok(ekm_projections::signing_keys(&self.inner.db).await?)
    }

    /// The position up to which the audit chain has sealed every event, after catching the
    /// projections up to the head: an export then holds every event committed before it.
    pub async fn sealed_through(&self) -> Result<i64, AppError> {
        self.refresh().await?;
        Ok(ekm_projections::sealed_through(&self.inner.db).await?)
    }

    pub fn tokens(&self) -> &Tokens {
        &self.inner.tokens
    }

    /// The principal holding `secret`: from the short-lived cache, else the token table.
    pub async fn authenticate(&self, secret: &str) -> Result<Option<Principal>, AppError> {
        let key = ekm_store::token_hash(secret);
        let now = ekm_store::time::now_micros();
        if let Ok(cache) = self.inner.token_cache.lock() {
            if let Some((principal, at)) = cache.get(&key) {
                // A token that expired, or a grant of it that did, is looked up afresh.
                let unexpired = principal.expires_at.is_none_or(|e| e > now)
                    && principal.grants_until.is_none_or(|e| e > now);
                if at.elapsed() < TOKEN_CACHE_TTL && unexpired {
                    return Ok(Some(principal.clone()));
                }
            }
        }
        let generation = self
            .inner
            .token_generation
            .load(std::sync::atomic::Ordering::SeqCst);
        // The grants come from the memory tree once it is loaded (the same source as the
        // scopes they apply to), else from `grants_view`.
        let memory = &self.inner.memory;
        let found = if memory.is_ready() {
            self.inner
                .tokens
                .authenticate_token(secret)
                .await?
                .map(|mut principal| {
                    if let Some(org) = principal.org_id {
                        (principal.grants, principal.grants_until) =
                            memory.grants_of(org, &principal.principal, now);
                    }
                    principal
                })
        } else {
            self.inner.tokens.authenticate(secret).await?
        };
        if let (Some(principal), Ok(mut cache)) = (&found, self.inner.token_cache.lock()) {
            // Checked under the lock `forget_principals` takes: a revoke or grant change
            // that happened during the lookup keeps its result out of the cache.
            let current = self
                .inner
                .token_generation
                .load(std::sync::atomic::Ordering::SeqCst);
            if current == generation {
                if cache.len() >= TOKEN_CACHE_MAX {
                    cache.clear();
                }
                cache.insert(key, (principal.clone(), std::time::Instant::now()));
            }
        }
        Ok(found)
    }

    /// Forgets cached principals: after a token is revoked or a grant removed here, the
    /// next request authenticates afresh (other instances within `TOKEN_CACHE_TTL`).
    pub fn forget_principals(&self) {
        if let Ok(mut cache) = self.inner.token_cache.lock() {
            self.inner
                .token_generation
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            cache.clear();
        }
    }

    pub fn projector(&self) -> &Arc<Projector> {
        &self.inner.projector
    }

    /// Brings the read models up to every event committed so far, by any instance.
    /// (Every event below PostgreSQL's fence, and this instance's own commits even if an
    /// older transaction still holds the fence: then it waits for that one to end.)
    pub async fn refresh(&self) -> Result<(), AppError> {
        let head = self.inner.db.head_position().await?;
        let own = self
            .inner
            .last_commit
            .load(std::sync::atomic::Ordering::Acquire);
        self.inner.projector.catch_up_to(head.max(own)).await?;
        Ok(())
    }

    /// Loads the in-memory scope tree (start-up); from then on `scope` answers from it.
    pub async fn load_memory(&self) -> Result<MemoryLoad, AppError> {
        let inner = &self.inner;
        Ok(inner.memory.load(&inner.db, &inner.projector).await?)
    }

    pub fn memory(&self) -> &Arc<MemoryTree> {
        &self.inner.memory
    }

    /// A scope with its effective state: from memory once it is loaded (a revoke on the
    /// path adds one query, for the master key's activation), else from SQL.
    pub async fn scope(&self, id: ScopeId) -> Result<Option<ScopeSnapshot>, AppError> {
        let inner = &self.inner;
        if !inner.memory.is_ready() {
            return Ok(inner.read.scope(id).await?);
        }
        let snapshot = match inner.memory.snapshot(id)? {
            Some(snapshot) => snapshot,
            None => {
                // Perhaps created on another instance a moment ago, before its notification
                // reached this one: look once at everything committed.
                self.refresh().await?;
                match inner.memory.snapshot(id)? {
                    Some(snapshot) => snapshot,
                    None => return Ok(None),
                }
            }
        };
        let mut snapshot = snapshot;
        if let Some(destruction) = snapshot.destruction.as_mut() {
            destruction.master_activated_position =
                inner.read.master_key_activated_position().await?;
        }
        Ok(Some(snapshot))
    }

    /// Brings the SQL read models up to this instance's last commit, for the reads that
    /// still come from SQL (lists, search, blast radius): commands answered from memory
    /// (ADR 0020) leave the runner a little behind, and a client that just created a scope
    /// expects to find it in the list it asks for next.
    async fn settled(&self) -> Result<(), AppError> {
        let last = self
            .inner
            .last_commit
            .load(std::sync::atomic::Ordering::Acquire);
        if last > self.inner.projector.applied() {
            self.inner.projector.catch_up_to(last).await?;
        }
        Ok(())
    }

    pub async fn children(
        &self,
        parent: &ScopeSnapshot,
        after: Option<ScopeId>,
        limit: u32,
    ) -> Result<Page<ScopeSnapshot>, AppError> {
        self.settled().await?;
        Ok(self.inner.read.children(parent, after, limit).await?)
    }

    /// Scopes of `org` whose name contains `needle`, rows only (see `ReadModels::search_names`).
    pub async fn search_names(
        &self,
        org: OrgId,
        needle: &str,
        within: Option<&[ScopeId]>,
        after: Option<ScopeId>,
        limit: u32,
    ) -> Result<Page<ekm_projections::ScopeRecord>, AppError> {
        self.settled().await?;
        Ok(self
            .inner
            .read
            .search_names(org, needle, within, after, limit)
            .await?)
    }

    /// Creates an organization and its first `org_admin` token (returned once).
    pub async fn create_org(
        &self,
        name: ScopeName,
        plan: Plan,
        tier: Tier,
        metadata: &EventMetadata,
    ) -> Result<(Outcome, NewToken), AppError> {
        let id = OrgId::generate();
        // The token first: if the organization then fails to be created, the token points
        // at nothing and is revoked; the reverse order could leave an organization nobody
        // can administer.
        let token = self
            .inner
            .tokens
            .create(Role::ORG_ADMIN, Some(id), "admin")
            .await?;
        let command = Command::CreateOrganization {
            id,
            name,
            plan,
            tier,
            admin_token_id: Some(token.id.clone()),
        };
        match self.run(id.scope_id(), command, metadata, None).await {
            Ok(outcome) => Ok((outcome, token)),
            Err(error) => {
                if let Ok(mut cache) = self.inner.token_cache.lock() {
                    cache.remove(&ekm_store::token_hash(&token.secret));
                }
                if let Err(revoke_error) = self.inner.tokens.revoke(&token.id).await {
                    tracing::error!(error = %ekm_projections::error_chain(&revoke_error), token_id = %token.id, "could not revoke the token of an organization that failed to be created");
                }
                Err(error)
            }
        }
    }

    /// Creates a scope under `parent`.
    pub async fn create_scope(
        &self,
        parent: &ScopeSnapshot,
        kind: ScopeKind,
        name: ScopeName,
        metadata: &EventMetadata,
    ) -> Result<Outcome, AppError> {
        let id = ScopeId::generate();
        let command = Command::CreateScope {
            id,
            kind,
            name,
            parent: parent.scope.id,
        };
        self.run(id, command, metadata, None).await
    }

    /// Pauses, resumes, revokes or rotates an existing scope. With `expected_version`
    /// (If-Match), the command applies only to that version and is never retried.
    pub async fn act(
        &self,
        id: ScopeId,
        action: Action,
        metadata: &EventMetadata,
        expected_version: Option<i64>,
    ) -> Result<Outcome, AppError> {
        // Creating goes through `create_org` and `create_scope`: they make the new id (and an
        // organization's first token).
        if action.creates() {
            return Err(AppError::NotFound);
        }
        self.run(id, action, metadata, expected_version).await
    }

    /// What `action` would do, without doing it: the rules are checked exactly as for the
    /// real command, then the subtree is counted. Returns the scope, whether an event would
    /// be recorded, and the blast radius.
    pub async fn dry_run(
        &self,
        id: ScopeId,
        action: Action,
    ) -> Result<(ScopeSnapshot, bool, BlastRadius), AppError> {
        if action.creates() {
            return Err(AppError::NotFound);
        }
        self.refresh().await?;
        let (prepared, _) = self.lookup(id, &action).await?;
        let mut context = self
            .inner
            .store
            .load(&id.to_string())
            .await
            .map_err(AppError::EventStore)?;
        let would_change = matches!(
            context.aggregate().admits(&action, &prepared)?,
            Admitted::Records(_)
        );
        let scope = self.inner.read.scope(id).await?.ok_or(AppError::NotFound)?;
        let radius = self.inner.read.blast_radius(&scope).await?;
        Ok((scope, would_change, radius))
    }

    /// The scope as it was at `as_of`, computed from the events.
    pub async fn scope_as_of(
        &self,
        id: ScopeId,
        as_of: AsOf,
    ) -> Result<Option<PastScope>, AppError> {
        Ok(ekm_projections::scope_as_of(&self.inner.db, id, as_of).await?)
    }

    /// Who could use the keys of `id` at `at` (its `data:use` holders with their valid
    /// tokens, nobody unless the scope was active), computed from the events.
    pub async fn access_as_of(
        &self,
        id: ScopeId,
        at: chrono::DateTime<chrono::Utc>,
    ) -> Result<Option<ekm_projections::PastAccess>, AppError> {
        Ok(ekm_projections::access_as_of(&self.inner.db, id, at).await?)
    }

    /// Audit entries matching `filter`, in position order.
    pub async fn audit(&self, filter: &AuditFilter) -> Result<Vec<AuditEntry>, AppError> {
        Ok(ekm_projections::audit_entries(&self.inner.db, filter).await?)
    }

    /// Every entry matching `filter`, a page at a time, the next page read while this one is
    /// sent (exports; see `ekm_projections::audit_pages`).
    pub fn audit_pages(&self, filter: AuditFilter) -> ekm_projections::AuditPages {
        ekm_projections::audit_pages(self.inner.db.clone(), filter)
    }

    /// Organizations whose key is wrapped by a customer key (not revoked).
    pub async fn customer_key_orgs(&self) -> Result<Vec<ScopeId>, AppError> {
        self.settled().await?;
        Ok(self.inner.read.customer_key_orgs().await?)
    }

    /// Checks an organization's hash chain against the events.
    pub async fn verify(&self, org: OrgId) -> Result<ChainReport, AppError> {
        self.refresh().await?;
        let org = org.to_string();
        Ok(ekm_projections::verify_chain(&self.inner.db, &self.inner.seal, &org, None).await?)
    }

    /// What `command` needs looked up, and where it happens: the parent of a new scope, or
    /// the ancestors' state of an existing one (and whether a customer master key wraps its
    /// organization's key). Nothing is made here.
    async fn lookup(
        &self,
        id: ScopeId,
        command: &Command,
    ) -> Result<(Prepared, Location), AppError> {
        match command {
            Command::CreateOrganization { id, .. } => Ok((
                Prepared::default(),
                Location {
                    org_id: id.to_string(),
                    scope_path: id.to_string(),
                },
            )),
            Command::CreateScope { id, parent, .. } => {
                let parent = self.scope(*parent).await?.ok_or(AppError::NotFound)?;
                let location = Location {
                    org_id: parent.scope.org_id.to_string(),
                    scope_path: join_path(parent.scope.path.iter().chain([id])),
                };
                let parent = ParentContext {
                    id: parent.scope.id,
                    kind: parent.scope.kind,
                    org_id: parent.scope.org_id,
                    path: parent.scope.path,
                    effective: parent.effective,
                };
                let prepared = Prepared {
                    parent: Some(parent),
                    ..Prepared::default()
                };
                Ok((prepared, location))
            }
            _ => {
                let snapshot = self.scope(id).await?.ok_or(AppError::NotFound)?;
                let location = Location {
                    org_id: snapshot.scope.org_id.to_string(),
                    scope_path: join_path(snapshot.scope.path.iter()),
                };
                let prepared = Prepared {
                    lineage: Some(Lineage {
                        plan: snapshot.org_plan,
                        inherited: snapshot.inherited,
                        justification: snapshot.justification.without(snapshot.scope.id),
                    }),
                    customer_key: snapshot.scope.master_key.is_some(),
                    controls_in_force: match command {
                        Command::ChangePlan(Plan::Standard) => Some(
                            self.inner
                                .read
                                .controls_in_force(snapshot.scope.org_id.scope_id())
                                .await?,
                        ),
                        _ => None,
                    },
                    ..Prepared::default()
                };
                Ok((prepared, location))
            }
        }
    }

    /// Makes what the aggregate admitted `command` with (`needs`), through the key minter,
    /// into `prepared`; returns the key material to store in the command's own transaction
    /// (ADR 0020). Runs only once the rules passed: a refused command makes nothing.
    async fn mint(
        &self,
        id: ScopeId,
        command: &Command,
        scope: &Scope,
        needs: Needs,
        prepared: &mut Prepared,
    ) -> Result<KeyWrites, AppError> {
        let minter = &self.inner.minter;
        match needs {
            Needs::Nothing => Ok(KeyWrites::default()),
            Needs::KeyVersion(version) => {
                let (fingerprint, writes) = match (command, scope.state()) {
                    (Command::CreateOrganization { id: org, .. }, _) => {
                        minter.org_key(*org, version, None, true).await?
                    }
                    (Command::CreateScope { parent, .. }, _) => {
                        let parent = self.scope(*parent).await?.ok_or(AppError::NotFound)?;
                        minter.scope_key(id, version, &parent).await?
                    }
                    (_, Some(state)) => match state.parent_id {
                        None => {
                            minter
                                .org_key(state.org_id, version, state.master.as_ref(), false)
                                .await?
                        }
                        Some(parent_id) => {
                            let parent = self.scope(parent_id).await?.ok_or(AppError::NotFound)?;
                            minter.scope_key(id, version, &parent).await?
                        }
                    },
                    (_, None) => return Err(AppError::NotFound),
                };
                prepared.minted = Some(MintedKey {
                    version,
                    fingerprint,
                });
                Ok(writes)
            }
            Needs::Rewrap(live) => {
                let state = scope.state().ok_or(AppError::NotFound)?;
                let snapshot = self.inner.read.scope(id).await?.ok_or(AppError::NotFound)?;
                let live: Vec<(KeyVersion, String)> = live
                    .into_iter()
                    .filter_map(|version| {
                        snapshot
                            .key_versions
                            .iter()
                            .find(|k| k.version == version.get())
                            .and_then(|k| k.fingerprint.clone())
                            .map(|fingerprint| (version, fingerprint))
                    })
                    .collect();
                let target = match command {
                    Command::SetMasterKey { master, .. } => master.as_ref(),
                    _ => None,
                };
                let rewrapped = minter
                    .stage_master_switch(state.org_id, &live, target)
                    .await?;
                prepared.rewrapped = Some(rewrapped);
                Ok(KeyWrites::default())
            }
            Needs::RewrapChildren(below) => {
                // Nothing below the scope may still need the versions being destroyed.
                let snapshot = self.inner.read.scope(id).await?.ok_or(AppError::NotFound)?;
                minter.rewrap_children(&snapshot, below).await?;
                Ok(KeyWrites::default())
            }
        }
    }

    /// The scope aggregate and its sequence: the cached one brought up to date with the
    /// events after it (one indexed read, usually empty), or rebuilt from all of them. A
    /// cached aggregate can only be stale by events this read returns, and an append decided
    /// on a stale one conflicts on its sequence anyway.
    async fn load(&self, aggregate_id: &str) -> Result<(Scope, i64), AppError> {
        use cqrs_es::Aggregate as _;
        let (mut scope, mut sequence) = self.cached(aggregate_id).unwrap_or_default();
        let newer = self
            .inner
            .db
            .events_of_after(aggregate_id, sequence)
            .await?;
        if newer.is_empty() {
            return Ok((scope, sequence));
        }
        for event in &newer {
            scope.apply(event.scope_event()?);
            sequence = event.sequence;
        }
        self.cache_aggregate(aggregate_id, &scope, sequence);
        Ok((scope, sequence))
    }

    fn cached(&self, aggregate_id: &str) -> Option<(Scope, i64)> {
        self.inner
            .aggregates
            .lock()
            .ok()
            .and_then(|cache| cache.get(aggregate_id).cloned())
    }

    /// The aggregate without a read of the store, when this instance's memory vouches for
    /// it: the cached aggregate is at the sequence the memory tree last applied, or the
    /// command creates the scope (its id is new). Stale only if another instance appended
    /// in the last moments (before its notification arrived): then the append conflicts on
    /// the sequence, and the command is decided again on the stored events. `None`: read.
    fn vouched(&self, id: ScopeId, aggregate_id: &str, creates: bool) -> Option<(Scope, i64)> {
        if creates {
            return Some((Scope::default(), 0));
        }
        let cached = self.cached(aggregate_id)?;
        (self.inner.memory.sequence_of(id) == Some(cached.1)).then_some(cached)
    }

    /// The aggregate after its own committed events.
    fn remember(
        &self,
        aggregate_id: &str,
        mut scope: Scope,
        events: Vec<ScopeEvent>,
        sequence: i64,
    ) {
        use cqrs_es::Aggregate as _;
        for event in events {
            scope.apply(event);
        }
        self.cache_aggregate(aggregate_id, &scope, sequence);
    }

    fn cache_aggregate(&self, aggregate_id: &str, scope: &Scope, sequence: i64) {
        if let Ok(mut cache) = self.inner.aggregates.lock() {
            if cache.len() >= AGGREGATE_CACHE_MAX && !cache.contains_key(aggregate_id) {
                cache.clear();
            }
            let newer = cache
                .get(aggregate_id)
                .is_none_or(|(_, cached)| *cached < sequence);
            if newer {
                cache.insert(aggregate_id.to_owned(), (scope.clone(), sequence));
            }
        }
    }

    /// After a commit: the command's own events applied to this instance's memory tree and
    /// the key cache told (a data-plane request that starts after the answer sees the new
    /// state), and the scope read from memory. `None` when memory cannot take them now (not
    /// loaded yet, or an earlier event of the scope has not reached it: then the runner
    /// applies everything in order, `read_back`).
    async fn answer_from_memory(
        &self,
        id: ScopeId,
        events: &[ekm_store::StoredEvent],
        position: Option<i64>,
    ) -> Result<Option<Outcome>, AppError> {
        let inner = &self.inner;
        if !inner.memory.is_ready() || events.is_empty() {
            return Ok(None);
        }
        let applied = match inner.memory.apply(events) {
            Ok(applied) => applied,
            Err(error) => {
                tracing::warn!(scope = %id, error = %ekm_projections::error_chain(&error), "memory could not take a command's own events; waiting for the runner");
                return Ok(None);
            }
        };
        if applied.contains(&ekm_projections::Applied::Gap) {
            return Ok(None);
        }
        (inner.keys.listener())(events);
        let Some(scope) = self.scope(id).await? else {
            return Ok(None);
        };
        Ok(Some(Outcome {
            scope,
            changed: true,
            position,
        }))
    }

    /// After a commit: the read models brought up to the new event, and the scope read from
    /// them (read-your-writes). The event is durable whatever happens here, so a failure is
    /// retried a few times (a database blip) and then reported as `AppError::Committed`.
    async fn read_back(&self, id: ScopeId, position: Option<i64>) -> Result<Outcome, AppError> {
        let inner = &self.inner;
        let mut failure = None;
        for backoff in READ_BACK_BACKOFF {
            if !backoff.is_zero() {
                tokio::time::sleep(backoff).await;
            }
            let attempt = async {
                match position {
                    Some(position) => inner.projector.catch_up_to(position).await?,
                    None => self.refresh().await?,
                }
                self.scope(id).await?.ok_or(AppError::NotFound)
            };
            match attempt.await {
                Ok(scope) => {
                    return Ok(Outcome {
                        scope,
                        changed: true,
                        position,
                    })
                }
                Err(error) => {
                    tracing::warn!(scope = %id, error = %ekm_projections::error_chain(&error), "a committed change could not be read back; retrying");
                    failure = Some(error);
                }
            }
        }
        Err(AppError::Committed {
            id,
            position,
            source: Box::new(failure.unwrap_or(AppError::NotFound)),
        })
    }

    /// Prepares `command` once per attempt: looks up what it needs, loads the aggregate,
    /// checks that the aggregate admits it, and only then mints the key material it needs;
    /// the aggregate decides the pair once, and the events commit with that material in one
    /// transaction (ADR 0020, 0022). On a conflict, starts again from fresh state.
    /// `run_command`, counted in `ekm_commands_total` by outcome.
    async fn run(
        &self,
        id: ScopeId,
        command: Command,
        metadata: &EventMetadata,
        expected_version: Option<i64>,
    ) -> Result<Outcome, AppError> {
        let result = self
            .run_command(id, command, metadata, expected_version)
            .await;
        // As the API answers them: a conflict is worth a retry, a refusal is a rule or the
        // state, `unavailable` a customer key that cannot be reached, `unconfirmed` events
        // that are durable though not read back, `failed` the store or a bug.
        let outcome = match &result {
            Ok(outcome) if outcome.changed => "recorded",
            Ok(_) => "unchanged",
            Err(
                AppError::VersionMismatch { .. }
                | AppError::Contended
                | AppError::Key(KeyError::WrappingRace { .. }),
            ) => "conflict",
            Err(AppError::MasterKeyUnavailable { .. } | AppError::Key(KeyError::Provider(_))) => {
                "unavailable"
            }
            Err(AppError::Committed { .. }) => "unconfirmed",
            Err(AppError::Key(KeyError::Revoked { .. })) => "refused",
            Err(
                AppError::Store(_)
                | AppError::Projection(_)
                | AppError::EventStore(_)
                | AppError::Key(_),
            ) => "failed",
            Err(_) => "refused",
        };
        metrics::counter!("ekm_commands_total", "outcome" => outcome).increment(1);
        result
    }

    async fn run_command(
        &self,
        id: ScopeId,
        command: Command,
        metadata: &EventMetadata,
        expected_version: Option<i64>,
    ) -> Result<Outcome, AppError> {
        let inner = &self.inner;
        let aggregate_id = id.to_string();
        // Whether this attempt may decide on the aggregate memory vouches for, without
        // reading the store (`vouched`); after a conflict, or when that decision would
        // answer without an append, the next attempt reads.
        let mut trust_memory = true;
        for attempt in 0..MAX_ATTEMPTS {
            // Decisions use the aggregate for the scope itself and the read models for its
            // ancestors. No catch-up first: every acknowledged command, on any instance,
            // waited until the read models included it, so they hold every change a client
            // could have seen; one still in flight is a race the cascade absorbs (ADR 0003).
            // The commands that read the scope's own key versions from the read models (a
            // switch of master key, a retire, a tier change that may be one) do catch up.
            if command.refreshes_first() {
                self.refresh().await?;
            }
            let (mut prepared, location) = self.lookup(id, &command).await?;
            let org_id = location.org_id.clone();
            let metadata = EventMetadata {
                location: Some(location),
                ..metadata.clone()
            };
            let creates = command.creates();
            let vouched = match trust_memory {
                true => self.vouched(id, &aggregate_id, creates),
                false => None,
            };
            let read = vouched.is_none();
            let (scope, current) = match vouched {
                Some(vouched) => vouched,
                None => self.load(&aggregate_id).await?,
            };
            trust_memory = false;
            if let Some(expected) = expected_version {
                if expected != current {
                    if !read {
                        continue;
                    }
                    return Err(AppError::VersionMismatch { expected, current });
                }
            }
            // Whether a tier change is a switch of master key follows from the organization's
            // master key as looked up.
            let customer_key = prepared.customer_key;
            // Retiring versions and switching master keys destroy key material: once the
            // runner has deleted or replaced the rows, their bytes also leave the files.
            let destroys = command.destroys(customer_key);
            // A switch of master key holds the organization's key lock from staging to the
            // projection that applies it, so no new epoch of its wrapping key is made in
            // between (ADR 0013).
            let _org_keys = match command.switches_master(customer_key) {
                true => Some(inner.db.lock_org_keys(&org_id).await?),
                false => None,
            };
            // Answered from this instance's memory as soon as the events commit (the runner
            // applies them to the SQL read models in the background); the others wait for
            // the runner (`Command::answers_from_memory`).
            let from_memory = command.answers_from_memory(customer_key);
            // The rules first, before anything is made: a refused command mints no key.
            let admitted = scope.admits(&command, &prepared);
            // A refusal or "nothing to do" is an answer without an append to confirm the
            // state it was decided on: only from the stored events.
            if !read && !matches!(&admitted, Ok(Admitted::Records(_))) {
                continue;
            }
            let mut keys = KeyWrites::default();
            let events = match admitted? {
                Admitted::Unchanged => vec![],
                Admitted::Records(needs) => {
                    // Admitted: now make what it needs (a key version's material, a re-wrap),
                    // and decide once with it. The material is stored with the events.
                    keys = self
                        .mint(id, &command, &scope, needs, &mut prepared)
                        .await?;
                    scope.decide(&command, &prepared)?
                }
            };
            if events.is_empty() {
                let scope = self.scope(id).await?.ok_or(AppError::NotFound)?;
                return Ok(Outcome {
                    scope,
                    changed: false,
                    position: None,
                });
            }
            // What the runner had applied before this synchronous commit began: flushed by
            // it (ADR 0020, `Projector::confirm_durable`).
            let applied_before = inner.projector.applied();
            match inner
                .db
                .append(&aggregate_id, current, &events, &metadata.to_map(), &keys)
                .await?
            {
                Appended::Committed {
                    positions,
                    events: stored,
                    last_sequence,
                } => {
                    self.remember(&aggregate_id, scope, events, last_sequence);
                    inner.projector.confirm_durable(applied_before);
                    inner.projector.committed();
                    if let Some(last) = positions.last() {
                        inner
                            .last_commit
                            .fetch_max(*last, std::sync::atomic::Ordering::AcqRel);
                    }
                    // The runner applies them to the read models (and seals them) soon.
                    inner.projector.wake();
                    let position = positions.last().copied();
                    let answered = match from_memory {
                        true => self.answer_from_memory(id, &stored, position).await?,
                        false => None,
                    };
                    let outcome = match answered {
                        Some(outcome) => outcome,
                        None => self.read_back(id, position).await?,
                    };
                    if destroys {
                        if let Err(error) = inner.db.destroy_at_rest().await {
                            tracing::error!(scope = %id, error = %ekm_projections::error_chain(&error), "destroyed keys could not be removed from the database's files");
                        }
                    }
                    return Ok(outcome);
                }
                Appended::Conflict if expected_version.is_none() => {
                    // Someone else committed first: back off a little, with jitter, and
                    // decide again on the new state.
                    let ceiling = 2u64.saturating_pow(attempt.min(6)).saturating_mul(2);
                    let pause = rand::rng().random_range(1..=ceiling);
                    tokio::time::sleep(Duration::from_millis(pause)).await;
                }
                Appended::Conflict => {
                    let fresh = self.scope(id).await?.map(|s| s.scope.version);
                    return Err(AppError::VersionMismatch {
                        expected: expected_version.unwrap_or_default(),
                        current: fresh.unwrap_or(current),
                    });
                }
                Appended::KeysRaced => {
                    // A re-key or a rotation of the platform key got between preparing the
                    // key material and storing it: nothing was written; prepare again.
                    inner.keys.reload_after_race().await?;
                }
            }
        }
        Err(AppError::Contended)
    }
}

fn join_path<'a>(ids: impl Iterator<Item = &'a ScopeId>) -> String {
    ids.map(ToString::to_string).collect::<Vec<_>>().join("/")
}

impl From<AggregateError<ScopeError>> for AppError {
    fn from(error: AggregateError<ScopeError>) -> Self {
        match error {
            AggregateError::UserError(rule) => AppError::Rule(rule),
            other => AppError::EventStore(other),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use ekm_domain::{Actor, ActorKind, MasterKeyRef, Provider, Reason};
    use ekm_projections::ProjectorConfig;
    use ekm_store::DbConfig;

    use super::*;
    use crate::keys::local_master_key;
    use crate::minter::{FakeMinter, MintCall};

    /// An application on a temporary SQLite database whose key material comes from a fake
    /// minter (everything else is real).
    async fn app() -> (App, Arc<FakeMinter>, tempfile::TempDir) {
        let dir = tempfile::tempdir().expect("temporary directory");
        let config = DbConfig::Sqlite {
            path: dir.path().join("ekm.db"),
        };
        let db = Db::open(&config).await.expect("open database");
        let seal = ekm_keys::SealKey::load(&dir.path().join(ekm_keys::AUDIT_KEY_FILE), true)
            .expect("audit key")
            .expect("audit key created");
        ekm_projections::register_seal_key(&db, &seal)
            .await
            .expect("register the audit key");
        let projector = Arc::new(Projector::standard(
            db.clone(),
            ProjectorConfig::default(),
            seal.clone(),
        ));
        projector.init().await.expect("projector init");
        let master = local_master_key(&db, &dir.path().join(ekm_keys::MASTER_KEY_FILE))
            .await
            .expect("master key");
        let keys = KeyService::new(db.clone(), master, Duration::from_secs(300));
        let fake = Arc::new(FakeMinter::default());
        let minter: Arc<dyn KeyMinter> = fake.clone();
        let app = App::with_minter(
            db,
            projector,
            keys,
            (seal, Arc::new(ekm_keys::SigningKey::generate())),
            minter,
        );
        app.load_memory().await.expect("load the scope tree");
        (app, fake, dir)
    }

    fn metadata() -> EventMetadata {
        EventMetadata {
            actor: Actor {
                kind: ActorKind::User,
                id: "test".into(),
            },
            request_id: "test".into(),
            reason: Reason::parse("test").ok(),
            source_address: None,
            recorded_at: "2026-11-30T00:00:00Z".into(),
            location: None,
        }
    }

    async fn org(app: &App, plan: Plan) -> OrgId {
        let (outcome, _token) = app
            .create_org(
                ScopeName::parse("Acme").unwrap(),
                plan,
                Tier::Default,
                &metadata(),
            )
            .await
            .expect("organization created");
        OrgId::parse(&outcome.scope.scope.id.to_string()).unwrap()
    }

    fn fingerprints(outcome: &Outcome) -> Vec<(u32, Option<String>)> {
        outcome
            .scope
            .key_versions
            .iter()
            .map(|k| (k.version, k.fingerprint.clone()))
            .collect()
    }

    #[tokio::test]
    async fn rotate_mints_nothing_when_refused() {
        let (app, fake, _dir) = app().await;
        let org = org(&app, Plan::Standard).await;
        let before = fake.calls();
        assert_eq!(
            before,
            vec![MintCall::OrgKey {
                org,
                version: KeyVersion::FIRST,
                new_org: true
            }]
        );
        let refused = app
            .act(org.scope_id(), Action::Rotate, &metadata(), None)
            .await;
        assert!(
            matches!(
                refused,
                Err(AppError::Rule(ScopeError::ControlsNeedEnterprise))
            ),
            "{refused:?}"
        );
        assert_eq!(fake.calls(), before, "a refused rotation makes no key");
    }

    #[tokio::test]
    async fn rotate_mints_the_next_version_and_records_its_fingerprint() {
        let (app, fake, _dir) = app().await;
        let org = org(&app, Plan::Enterprise).await;
        let outcome = app
            .act(org.scope_id(), Action::Rotate, &metadata(), None)
            .await
            .expect("rotated");
        assert_eq!(
            fake.calls().last(),
            Some(&MintCall::OrgKey {
                org,
                version: KeyVersion::new(2),
                new_org: false
            })
        );
        assert_eq!(
            fake.calls().len(),
            2,
            "one key per version: {:?}",
            fake.calls()
        );
        assert_eq!(
            fingerprints(&outcome),
            vec![
                (1, Some(format!("fake-{org}-v1"))),
                (2, Some(format!("fake-{org}-v2"))),
            ]
        );
    }

    #[tokio::test]
    async fn set_master_key_rewraps_exactly_the_live_versions() {
        let (app, fake, _dir) = app().await;
        let org = org(&app, Plan::Enterprise).await;
        let id = org.scope_id();
        for _ in 0..2 {
            app.act(id, Action::Rotate, &metadata(), None)
                .await
                .expect("rotated");
        }
        app.act(
            id,
            Action::SetMinDecryptionVersion(KeyVersion::new(2)),
            &metadata(),
            None,
        )
        .await
        .expect("floor raised");
        app.act(
            id,
            Action::RetireKeyVersions(KeyVersion::new(2)),
            &metadata(),
            None,
        )
        .await
        .expect("retired");
        assert_eq!(
            fake.calls().last(),
            Some(&MintCall::RewrapChildren {
                scope: id,
                below: KeyVersion::new(2)
            })
        );
        let master = MasterKeyRef {
            provider: Provider::AwsKms,
            key_id: "arn:aws:kms:us-east-1:111122223333:key/test".into(),
            region: Some("us-east-1".into()),
            endpoint_url: None,
        };
        let outcome = app
            .act(
                id,
                Action::SetMasterKey {
                    master: Some(master.clone()),
                    tier: Tier::Byok,
                },
                &metadata(),
                None,
            )
            .await
            .expect("switched");
        assert_eq!(
            fake.calls().last(),
            Some(&MintCall::MasterSwitch {
                org,
                live: vec![KeyVersion::new(2), KeyVersion::new(3)],
                target: Some(master.clone()),
            })
        );
        assert_eq!(outcome.scope.scope.master_key, Some(master));
    }
}
