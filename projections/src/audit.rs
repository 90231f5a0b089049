//! The audit log and its tamper-evidence seals.
//!
//! The audit log is the event log (ADR 0011): an entry is one scope event, read from the
//! `events` table through the columns the database computes from each event for the filters
//! (`audit_org`, `audit_path`, `audit_actor`, migration 0009). Nothing is projected, so there
//! is nothing to rebuild and no lag. `AuditChain` seals each event into a chain per
//! organization when it is first projected, with HMAC-SHA256 under the audit key, which the
//! database never holds (ADR 0018); it is never rebuilt, so rebuilding from altered events
//! cannot launder the alteration. `verify_chain` recomputes the chain from the events, compares
//! it with the head an auditor recorded outside the database, and names the first entry that
//! differs.

use std::collections::{BTreeMap, HashMap};

use chrono::{DateTime, Utc};
use ekm_domain::metadata::EventMetadata;
use ekm_domain::{Location, ScopeEvent};
use ekm_keys::SealKey;
use ekm_store::time::{from_sqlite_event_time, rfc3339, to_sqlite_event_time};
use ekm_store::{Db, StoreError, StoredEvent};
use serde::{Deserialize, Serialize};
use sqlx::Row;

use crate::access_check::{
    verify_access_tables, verify_revocation_schedule, Mismatch, RevocationStep,
};
use crate::error::ProjectionError;
use crate::runner::{Projection, ProjectionState};
use crate::sql::{Param, Statement};

/// The `prev_hash` of an organization's first entry.
pub const GENESIS_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// Where an event happened. Events carry it in their metadata; creation events also in their
/// payload, which wins (it is what the aggregate itself stored).
fn location(stored: &StoredEvent, event: &ScopeEvent, metadata: &EventMetadata) -> Location {
    match event {
        ScopeEvent::OrganizationCreated { org_id, .. } => Location {
            org_id: org_id.to_string(),
            scope_path: org_id.to_string(),
        },
        ScopeEvent::ScopeCreated { org_id, path, .. } => Location {
            org_id: org_id.to_string(),
            scope_path: path
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("/"),
        },
        _ => metadata.location.clone().unwrap_or_else(|| Location {
            org_id: String::new(),
            scope_path: stored.aggregate_id.clone(),
        }),
    }
}

/// One line a person can read.
fn summary(event: &ScopeEvent) -> String {
    match event {
        ScopeEvent::OrganizationCreated {
            name, plan, tier, ..
        } => format!(
            "created organization \"{}\" (plan {plan}, tier {tier})",
            name.as_str()
        ),
        ScopeEvent::ScopeCreated {
            kind,
            name,
            parent_id,
            ..
        } => {
            format!("created {kind} \"{}\" under {parent_id}", name.as_str())
        }
        ScopeEvent::OrganizationTierChanged { from, to } => {
            format!("changed the encryption tier from {from} to {to}")
        }
        ScopeEvent::ScopeResumeScheduled { at: Some(at) } => {
            format!("paused until {at}, when the scheduler resumes it")
        }
        ScopeEvent::ScopeResumeScheduled { at: None } => {
            "cancelled the scheduled resume: paused until resumed by hand".to_owned()
        }
        ScopeEvent::OrganizationPlanChanged { from, to } => {
            format!("changed the plan from {} to {}", from.as_str(), to.as_str())
        }
        ScopeEvent::ScopeKeyVersionsRetired { below } => {
            format!("retired key versions below {below} (their key material is destroyed)")
        }
        ScopeEvent::ScopePaused {} => "paused".to_owned(),
        ScopeEvent::ScopeResumed {} => "resumed".to_owned(),
        ScopeEvent::ScopeRevoked { requested_by: None } => "revoked (final)".to_owned(),
        ScopeEvent::ScopeRevoked {
            requested_by: Some(by),
        } => format!("revoked (final), as {by} requested when the waiting period ended"),
        ScopeEvent::ScopeRevocationScheduled { due_at, .. } => {
            format!("revocation pending: revoked for good at {due_at} unless cancelled")
        }
        ScopeEvent::ScopeRevocationCancelled { to } => {
            format!("cancelled the pending revocation (back to {})", to.as_str())
        }
        ScopeEvent::ScopeRotationPeriodSet { period: Some(period) } => {
            format!("the key rotates automatically every {period}")
        }
        ScopeEvent::ScopeRotationPeriodSet { period: None } => {
            "lifted its own key rotation period (it inherits again)".to_owned()
        }
        ScopeEvent::OrganizationPolicySet { revoke_window } => format!(
            "set the revoke waiting period to {}",
            revoke_window.as_deref().unwrap_or("the default, P7D")
        ),
        ScopeEvent::ScopeKeyRotated { key_version, .. } => {
            format!("rotated the key to version {key_version}")
        }
        ScopeEvent::OrganizationRateLimitsSet { limits } => {
            let show = |bucket: Option<ekm_domain::RateBucket>| {
                bucket.map_or("default".to_owned(), |b| {
                    format!("{}/s, burst {}", b.per_second(), b.burst())
                })
            };
            format!(
                "set the rate limits: data plane {} per principal, {} per organization; \
                 commands {} per principal, {} per organization",
                show(limits.data_plane_principal),
                show(limits.data_plane_organization),
                show(limits.commands_principal),
                show(limits.commands_organization),
            )
        }
        ScopeEvent::OrganizationMasterKeyChanged {
            to,
            tier_to,
            rewrapped,
            ..
        } => {
            let versions = rewrapped.len();
            match to {
                Some(key) => format!(
                    "connected the customer master key {} {} (tier {tier_to}; {versions} key version(s) re-wrapped)",
                    key.provider, key.key_id
                ),
                None => format!(
                    "switched back to the platform master key (tier {tier_to}; {versions} key version(s) re-wrapped)"
                ),
            }
        }
        ScopeEvent::RevocationRekeyStarted { ancestors } => format!(
            "started destroying the revoked keys in every copy: re-keying {} scope(s) on the path",
            ancestors.len()
        ),
        ScopeEvent::RevocationRekeyProgressed {
            scope_id,
            rewrapped,
        } => format!("re-keyed {scope_id} ({rewrapped} key(s) re-wrapped, old wrapping keys destroyed)"),
        ScopeEvent::ScopeMinDecryptionVersionSet { version } => format!(
            "key versions below {version} no longer decrypt (a lower floor enables them again)"
        ),
        ScopeEvent::ScopeJustificationPolicySet { required, allowed } => {
            let allowed = allowed
                .iter()
                .map(|c| c.as_str())
                .collect::<Vec<_>>()
                .join(", ");
            match (required, allowed.is_empty()) {
                (false, true) => "lifted its access-justification policy".to_owned(),
                (true, true) => "requires an access justification".to_owned(),
                (true, false) => format!("requires an access justification, one of: {allowed}"),
                (false, false) => format!("allows only these access justifications: {allowed}"),
            }
        }
        ScopeEvent::RevocationRekeyCompleted { rewrapped } => format!(
            "destroyed the revoked keys in the live database ({rewrapped} key(s) re-wrapped); copies are useless once the platform master key is rotated"
        ),
        ScopeEvent::OrganizationMasterKeyHealthChanged {
            health,
            reason,
            detail,
            ..
        } => match reason {
            Some(reason) => format!(
                "master key {}: {} ({detail})",
                health.as_str(),
                reason.as_str()
            ),
            None => format!("master key {} ({detail})", health.as_str()),
        },
        ScopeEvent::TokenIssued {
            token_id,
            principal,
            kind,
            role,
            expires_at,
        } => format!(
            "issued token {token_id} to {} {principal} (role {}{})",
            kind.as_str(),
            role.as_str(),
            expires_at
                .as_deref()
                .map(|at| format!(", expires {at}"))
                .unwrap_or_default()
        ),
        ScopeEvent::TokenRevoked { token_id } => format!("revoked token {token_id}"),
        ScopeEvent::PermissionGranted {
            principal,
            permission,
            scope_id,
            expires_at,
        } => format!(
            "granted {permission} to {principal} on {}{}",
            on(scope_id),
            expires_at
                .as_deref()
                .map(|at| format!(", expires {at}"))
                .unwrap_or_default()
        ),
        ScopeEvent::PermissionRevoked {
            principal,
            permission,
            scope_id,
        } => format!("removed {permission} from {principal} on {}", on(scope_id)),
    }
}

fn on(scope: &Option<ekm_domain::ScopeId>) -> String {
    scope.map_or_else(
        || "the whole organization".to_owned(),
        |s| format!("subtree {s}"),
    )
}

/// Seals every scope event into its organization's chain. Holds the audit key; without one
/// (`unkeyed`, for listing projections) it refuses to seal.
pub struct AuditChain {
    key: Option<SealKey>,
}

impl AuditChain {
    pub fn new(key: SealKey) -> Self {
        Self { key: Some(key) }
    }

    /// The projection without its key: enough to name it and its tables, not to apply it.
    pub fn unkeyed() -> Self {
        Self { key: None }
    }

    fn org(stored: &StoredEvent) -> Result<String, ProjectionError> {
        let event = stored.scope_event()?;
        let metadata = stored.event_metadata()?;
        Ok(location(stored, &event, &metadata).org_id)
    }
}

impl Projection for AuditChain {
    fn name(&self) -> &'static str {
        "audit_chain"
    }

    fn tables(&self) -> &'static [&'static str] {
        &["audit_chain"]
    }

    fn rebuildable(&self) -> bool {
        false
    }

    fn state_keys(&self, stored: &StoredEvent) -> Vec<String> {
        if stored.aggregate_type != "scope" {
            return vec![];
        }
        Self::org(stored).map(|org| vec![org]).unwrap_or_default()
    }

    fn statements(
        &self,
        stored: &StoredEvent,
        state: &mut ProjectionState,
    ) -> Result<Vec<Statement>, ProjectionError> {
        if stored.aggregate_type != "scope" {
            return Ok(vec![]);
        }
        let key = self.key.as_ref().ok_or(ProjectionError::NoSealKey)?;
        let org = Self::org(stored)?;
        let prev = state.get(&org).unwrap_or(GENESIS_HASH).to_owned();
        let hash = seal_entry(key, &org, &prev, stored)?;
        state.set(&org, hash.clone());
        Ok(vec![Statement::Insert {
            table: "audit_chain",
            columns: &["position", "org_id", "prev_hash", "hash"],
            values: vec![
                Param::Int(stored.position),
                Param::Text(org),
                Param::Text(prev),
                Param::Text(hash),
            ],
        }])
    }
}

#[derive(Serialize)]
struct Canonical<'a> {
    position: i64,
    recorded_at: String,
    aggregate_type: &'a str,
    aggregate_id: &'a str,
    sequence: i64,
    event_type: &'a str,
    event_version: &'a str,
    payload: serde_json::Value,
    metadata: BTreeMap<String, String>,
}

/// Every stored field of the event in a canonical JSON form (fixed field order, sorted
/// object keys, whatever the stored text's spacing and key order). Fails only if the stored
/// payload or metadata is not JSON.
fn canonical_entry(stored: &StoredEvent) -> Result<Vec<u8>, StoreError> {
    let canonical = Canonical {
        position: stored.position,
        recorded_at: rfc3339(stored.recorded_at),
        aggregate_type: &stored.aggregate_type,
        aggregate_id: &stored.aggregate_id,
        sequence: stored.sequence,
        event_type: &stored.event_type,
        event_version: &stored.event_version,
        payload: stored.payload_value()?,
        metadata: stored.metadata_map()?.into_iter().collect(),
    };
    Ok(serde_json::to_vec(&canonical).unwrap_or_default())
}

/// The seal of one event in `org`'s chain after `prev`: HMAC-SHA256 under the audit key over
/// the organization, the previous seal and the canonical event (`SealKey::seal`). Hex.
pub fn seal_entry(
    key: &SealKey,
    org: &str,
    prev: &str,
    stored: &StoredEvent,
) -> Result<String, StoreError> {
    Ok(key.seal(org, prev, &canonical_entry(stored)?))
}

/// One audit entry.
#[derive(Clone, Debug, PartialEq)]
pub struct AuditEntry {
    pub position: i64,
    pub recorded_at: DateTime<Utc>,
    pub org_id: String,
    pub scope_id: String,
    pub scope_path: Vec<String>,
    pub action: String,
    pub event_type: String,
    pub event_version: String,
    pub actor: String,
    pub actor_kind: String,
    pub reason: Option<String>,
    pub request_id: String,
    pub source_address: Option<String>,
    pub summary: String,
    /// The event's payload as stored: JSON text, passed through unparsed.
    pub details: String,
    /// The entry's seal in its organization's chain (hex), if the chain has sealed it.
    pub seal: Option<String>,
}

/// Which entries to read. `from` is inclusive, `to` exclusive; `after` is a position cursor.
#[derive(Clone, Debug, Default)]
pub struct AuditFilter {
    pub org_id: String,
    /// A scope path (ids joined by '/'): the scope and everything below it.
    pub subtree: Option<String>,
    pub actor: Option<String>,
    pub action: Option<String>,
    pub from: Option<DateTime<Utc>>,
    pub to: Option<DateTime<Utc>>,
    pub after: Option<i64>,
    /// Only entries at or before this position (an export stops where the chain has sealed).
    pub through: Option<i64>,
    pub limit: i64,
}

enum Bind {
    Text(String),
    Int(i64),
    Time(DateTime<Utc>),
}

/// What an entry is read from: the event row and the columns computed for the filters.
const ENTRY_SELECT: &str =
    "SELECT e.position, e.recorded_at, e.audit_org, e.aggregate_type, e.aggregate_id, \
     e.sequence, e.audit_path, e.event_type, e.event_version, \
     CAST(e.payload AS TEXT) AS payload, CAST(e.metadata AS TEXT) AS metadata, \
     c.hash AS seal \
     FROM events e LEFT JOIN audit_chain c ON c.position = e.position \
     WHERE e.audit_org = $1";

impl AuditFilter {
    fn sql(&self) -> (String, Vec<Bind>) {
        let mut binds = vec![Bind::Text(self.org_id.clone())];
        let mut sql = String::from(ENTRY_SELECT);
        let mut push = |clause: &str, bind: Bind, binds: &mut Vec<Bind>| {
            binds.push(bind);
            sql.push_str(&clause.replace('?', &format!("${}", binds.len())));
        };
        if let Some(path) = &self.subtree {
            // The path itself and every path below it: ids have a fixed length, so after a
            // full path the next character is '/', and '0' is the character after '/'.
            push(
                " AND e.audit_path >= ?",
                Bind::Text(path.clone()),
                &mut binds,
            );
            push(
                " AND e.audit_path < ?",
                Bind::Text(format!("{path}0")),
                &mut binds,
            );
        }
        if let Some(actor) = &self.actor {
            push(
                " AND e.audit_actor = ?",
                Bind::Text(actor.clone()),
                &mut binds,
            );
        }
        if let Some(action) = &self.action {
            // Each action is one event type; an unknown action matches nothing.
            let event_type = ScopeEvent::type_of_action(action).unwrap_or("");
            push(
                " AND e.event_type = ?",
                Bind::Text(event_type.to_owned()),
                &mut binds,
            );
        }
        if let Some(from) = self.from {
            push(" AND e.recorded_at >= ?", Bind::Time(from), &mut binds);
        }
        if let Some(to) = self.to {
            push(" AND e.recorded_at < ?", Bind::Time(to), &mut binds);
        }
        if let Some(after) = self.after {
            push(" AND e.position > ?", Bind::Int(after), &mut binds);
        }
        if let Some(through) = self.through {
            push(" AND e.position <= ?", Bind::Int(through), &mut binds);
        }
        binds.push(Bind::Int(self.limit));
        sql.push_str(&format!(" ORDER BY e.position LIMIT ${}", binds.len()));
        (sql, binds)
    }
}

/// One entry from its event, its organization and its path (the audit columns). A payload
/// that no longer decodes still makes an entry (an auditor must see every event): its action
/// is `unknown` and its summary says why.
fn entry(row: StoredEvent, org_id: String, path: &str, seal: Option<String>) -> AuditEntry {
    let metadata = row
        .event_metadata()
        .unwrap_or_else(|_| EventMetadata::from_map(&HashMap::new()));
    let (action, summary) = match row.scope_event() {
        Ok(event) => (event.action().to_owned(), summary(&event)),
        Err(e) => (
            "unknown".to_owned(),
            format!(
                "the stored payload could not be read as a {} event: {}",
                row.event_type,
                std::error::Error::source(&e).map_or_else(|| e.to_string(), ToString::to_string)
            ),
        ),
    };
    AuditEntry {
        position: row.position,
        recorded_at: row.recorded_at,
        org_id,
        scope_id: row.aggregate_id,
        scope_path: path.split('/').map(ToOwned::to_owned).collect(),
        action,
        event_type: row.event_type,
        event_version: row.event_version,
        actor: metadata.actor.to_string(),
        actor_kind: metadata.actor.kind.as_str().to_owned(),
        reason: metadata.reason.map(|r| r.as_str().to_owned()),
        request_id: metadata.request_id,
        source_address: metadata.source_address,
        summary,
        details: row.payload,
        seal,
    }
}

macro_rules! decode_entry {
    ($row:expr, $recorded_at:expr) => {{
        let row = $row;
        let path: String = row.try_get("audit_path")?;
        let stored = StoredEvent {
            position: row.try_get("position")?,
            recorded_at: $recorded_at,
            aggregate_type: row.try_get("aggregate_type")?,
            aggregate_id: row.try_get("aggregate_id")?,
            sequence: row.try_get("sequence")?,
            event_type: row.try_get("event_type")?,
            event_version: row.try_get("event_version")?,
            payload: row.try_get("payload")?,
            metadata: row.try_get("metadata")?,
        };
        Ok::<_, ProjectionError>(entry(
            stored,
            row.try_get("audit_org")?,
            &path,
            row.try_get("seal")?,
        ))
    }};
}

/// Every entry matching `filter` from its `after` on, page by page (`limit` entries each),
/// for an export: a task of its own reads and decodes the next page while the caller writes
/// this one. At most two pages wait in the channel, so memory stays flat whatever the
/// history's length. Dropping the `AuditPages` stops the task.
pub fn audit_pages(db: Db, mut filter: AuditFilter) -> AuditPages {
    let (pages, receiver) = tokio::sync::mpsc::channel(2);
    tokio::spawn(async move {
        loop {
            let page = match audit_entries(&db, &filter).await {
                Ok(page) => page,
                Err(error) => {
                    let _ = pages.send(Err(error)).await;
                    return;
                }
            };
            let last = page.last().map(|e| e.position);
            let full = page.len() as i64 >= filter.limit;
            if !page.is_empty() && pages.send(Ok(Some(page))).await.is_err() {
                return;
            }
            match last {
                Some(last) if full => filter.after = Some(last),
                // A short page has read everything that matched when it was read.
                _ => {
                    let _ = pages.send(Ok(None)).await;
                    return;
                }
            }
        }
    });
    AuditPages {
        receiver,
        ended: false,
    }
}

/// The pages of an export (`audit_pages`). The reading task marks the end explicitly, so a
/// task that stopped early (a panic) is an error, never a silently short export.
pub struct AuditPages {
    receiver: tokio::sync::mpsc::Receiver<Result<Option<Vec<AuditEntry>>, ProjectionError>>,
    ended: bool,
}

impl AuditPages {
    /// The next page; `None` once every page has been read; an error ends the pages.
    pub async fn next(&mut self) -> Option<Result<Vec<AuditEntry>, ProjectionError>> {
        if self.ended {
            return None;
        }
        let message = self.receiver.recv().await;
        match message {
            Some(Ok(Some(page))) => return Some(Ok(page)),
            Some(Ok(None)) => {
                self.ended = true;
                return None;
            }
            _ => self.ended = true,
        }
        Some(Err(match message {
            Some(Err(error)) => error,
            _ => ProjectionError::ReaderStopped,
        }))
    }
}

/// Entries matching `filter`, in position order.
pub async fn audit_entries(
    db: &Db,
    filter: &AuditFilter,
) -> Result<Vec<AuditEntry>, ProjectionError> {
    let (sql, binds) = filter.sql();
    match db {
        Db::Sqlite(db) => {
            let mut query = sqlx::query(&sql);
            for bind in binds {
                query = match bind {
                    Bind::Text(v) => query.bind(v),
                    Bind::Int(v) => query.bind(v),
                    Bind::Time(v) => query.bind(to_sqlite_event_time(v)),
                };
            }
            query
                .fetch_all(&db.read)
                .await?
                .into_iter()
                .map(|row| {
                    let text: String = row.try_get("recorded_at")?;
                    decode_entry!(row, from_sqlite_event_time(&text))
                })
                .collect()
        }
        Db::Postgres(db) => {
            let mut query = sqlx::query(&sql);
            for bind in binds {
                query = match bind {
                    Bind::Text(v) => query.bind(v),
                    Bind::Int(v) => query.bind(v),
                    Bind::Time(v) => query.bind(v),
                };
            }
            query
                .fetch_all(&db.pool)
                .await?
                .into_iter()
                .map(|row| {
                    let at: DateTime<Utc> = row.try_get("recorded_at")?;
                    decode_entry!(row, at)
                })
                .collect()
        }
    }
}

/// What went wrong at the first bad entry of a chain.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ChainFailure {
    pub position: i64,
    /// `altered`, `removed`, `inserted`, `reordered` (a broken link), or, against a head
    /// recorded outside the database: `truncated` (the chain ends before it), `emptied` (no
    /// entry left) and `resealed` (valid seals that are not the recorded ones: the history up
    /// to the recorded head was changed and sealed again).
    pub problem: &'static str,
    pub scope_id: Option<String>,
    pub event_type: Option<String>,
    pub detail: String,
}

/// The result of checking one organization's chain.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ChainReport {
    pub org_id: String,
    pub ok: bool,
    pub entries: i64,
    pub head_position: Option<i64>,
    pub head_hash: Option<String>,
    pub first_failure: Option<ChainFailure>,
    /// Rows of the unsealed access tables (`tokens`, `grants_view`) that the organization's
    /// events do not account for.
    pub access_mismatches: Vec<Mismatch>,
}

/// The last verified head of an organization's chain, as an auditor recorded it outside the
/// database (`ekm audit verify --head-file`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordedHead {
    pub position: i64,
    pub seal: String,
}

const VERIFY_PAGE: i64 = 500;

/// Recomputes `org`'s chain from the stored events with the audit key, compares it with the
/// seals and, when given, with the head recorded by an earlier verification.
pub async fn verify_chain(
    db: &Db,
    key: &SealKey,
    org: &str,
    recorded: Option<&RecordedHead>,
) -> Result<ChainReport, ProjectionError> {
    let mut report = ChainReport {
        org_id: org.to_owned(),
        ok: true,
        entries: 0,
        head_position: None,
        head_hash: None,
        first_failure: None,
        access_mismatches: vec![],
    };
    let mut expected_prev = GENESIS_HASH.to_owned();
    let mut after = 0i64;
    let mut reached_recorded = false;
    // Pending revocations, from the sealed events (checked against the schedule after).
    let mut revocations: Vec<(i64, RevocationStep)> = vec![];
    'pages: loop {
        let seals: Vec<(i64, String, String)> = ekm_store::with_read_pool!(db, pool => {
            sqlx::query_as(
                "SELECT position, prev_hash, hash FROM audit_chain \
                 WHERE org_id = $1 AND position > $2 ORDER BY position LIMIT $3",
            )
            .bind(org)
            .bind(after)
            .bind(VERIFY_PAGE)
            .fetch_all(pool)
            .await?
        });
        let Some(last) = seals.last().map(|s| s.0) else {
            break;
        };
        let positions: Vec<i64> = seals.iter().map(|s| s.0).collect();
        let events: HashMap<i64, StoredEvent> = db
            .events_at(&positions)
            .await?
            .into_iter()
            .map(|e| (e.position, e))
            .collect();
        for (position, prev_hash, hash) in seals {
            report.entries += 1;
            let failure =
                |problem: &'static str, event: Option<&StoredEvent>, detail: String| ChainFailure {
                    position,
                    problem,
                    scope_id: event.map(|e| e.aggregate_id.clone()),
                    event_type: event.map(|e| e.event_type.clone()),
                    detail,
                };
            let event = events.get(&position);
            let found = if prev_hash != expected_prev {
                Some(failure("reordered", event, "the chain's links do not follow each other: an entry was removed from or moved within the chain".into()))
            } else {
                match event {
                    None => Some(failure(
                        "removed",
                        None,
                        "the sealed event is missing from the event log".into(),
                    )),
                    Some(event)
                        if !canonical_entry(event)
                            .is_ok_and(|entry| key.verify(org, &expected_prev, &entry, &hash)) =>
                    {
                        Some(failure(
                            "altered",
                            Some(event),
                            "the stored event differs from what was sealed".into(),
                        ))
                    }
                    Some(_) => match recorded {
                        Some(head) if !reached_recorded && position >= head.position => {
                            reached_recorded = true;
                            (position != head.position || hash != head.seal)
                                .then(|| resealed(head, event))
                        }
                        _ => None,
                    },
                }
            };
            if let Some(failure) = found {
                report.ok = false;
                report.first_failure = Some(failure);
                break 'pages;
            }
            if let Some(step) = event.and_then(revocation_step) {
                revocations.push((position, step));
            }
            expected_prev = hash.clone();
            report.head_position = Some(position);
            report.head_hash = Some(hash);
        }
        after = last;
    }
    // The chain ends before the head recorded outside the database: its tail was cut, seals
    // and all, or the organization's whole history was removed.
    if let Some(head) = recorded {
        if report.ok && !reached_recorded {
            report.ok = false;
            report.first_failure = Some(ChainFailure {
                position: head.position,
                problem: if report.entries == 0 { "emptied" } else { "truncated" },
                scope_id: None,
                event_type: None,
                detail: format!(
                    "the chain ends at position {} but reached position {} when it was last verified",
                    report.head_position.unwrap_or(0),
                    head.position
                ),
            });
        }
    }
    // Events that claim this organization, lie where the runner has sealed every event, and
    // were never sealed: inserted behind the chain's back (or their seals removed).
    let sealed_through = db
        .sealed_through()
        .await?
        .max(report.head_position.unwrap_or(0));
    let limit = report
        .first_failure
        .as_ref()
        .map_or(sealed_through, |f| f.position.min(sealed_through));
    for event in db.unsealed_events_up_to(limit, org).await? {
        // An event whose payload or metadata cannot be read may be anyone's: it counts.
        let claims_org = match (event.scope_event(), event.event_metadata()) {
            (Ok(e), Ok(metadata)) => location(&event, &e, &metadata).org_id == org,
            _ => true,
        };
        if claims_org {
            report.ok = false;
            report.first_failure = Some(ChainFailure {
                position: event.position,
                problem: "inserted",
                scope_id: Some(event.aggregate_id.clone()),
                event_type: Some(event.event_type.clone()),
                detail: "an event inside the sealed range was never sealed".into(),
            });
            break;
        }
    }
    report.access_mismatches = verify_access_tables(db, org).await?;
    // Only against a whole chain: a broken one is already the finding.
    if report.first_failure.is_none() {
        report
            .access_mismatches
            .extend(verify_revocation_schedule(db, org, &revocations).await?);
    }
    report.ok &= report.access_mismatches.is_empty();
    Ok(report)
}

/// What a sealed event says about a pending revocation, if anything.
fn revocation_step(event: &StoredEvent) -> Option<RevocationStep> {
    // Most events are none of these: no second decoding of their payload.
    if !matches!(
        event.event_type.as_str(),
        "ScopeRevocationScheduled"
            | "ScopeRevocationCancelled"
            | "ScopeRevoked"
            | "RevocationRekeyCompleted"
    ) {
        return None;
    }
    let path = || {
        event
            .event_metadata()
            .ok()
            .and_then(|m| m.location)
            .map(|l| l.scope_path)
            .unwrap_or_else(|| event.aggregate_id.clone())
    };
    match event.scope_event().ok()? {
        ScopeEvent::ScopeRevocationScheduled { due_at, .. } => Some(RevocationStep::Scheduled {
            scope_id: event.aggregate_id.clone(),
            scope_path: path(),
            due_at,
        }),
        ScopeEvent::ScopeRevocationCancelled { .. } => Some(RevocationStep::Cancelled {
            scope_id: event.aggregate_id.clone(),
        }),
        // The projection sweeps the revoked subtree's schedule at the revoke, and again when
        // its re-key completes (a command that raced the revoke may have scheduled after it).
        ScopeEvent::ScopeRevoked { .. } | ScopeEvent::RevocationRekeyCompleted { .. } => {
            Some(RevocationStep::Revoked { scope_path: path() })
        }
        _ => None,
    }
}

fn resealed(head: &RecordedHead, event: Option<&StoredEvent>) -> ChainFailure {
    ChainFailure {
        position: head.position,
        problem: "resealed",
        scope_id: event.map(|e| e.aggregate_id.clone()),
        event_type: event.map(|e| e.event_type.clone()),
        detail: format!(
            "the seals verify, but the seal at position {} is not the one recorded when the chain was last verified: the history up to it was changed and sealed again",
            head.position
        ),
    }
}

/// Records which audit key this database's seals are made with (its fingerprint), on first
/// use, and refuses any other key afterwards: an instance started with a key file of its own
/// would seal entries that nobody can verify.
pub async fn register_seal_key(db: &Db, key: &SealKey) -> Result<(), ProjectionError> {
    ekm_store::with_write_pool!(db, pool => {
        sqlx::query(
            "INSERT INTO audit_keys (id, fingerprint, created_at) VALUES (1, $1, $2) \
             ON CONFLICT (id) DO NOTHING",
        )
        .bind(key.fingerprint())
        .bind(ekm_store::time::now_micros())
        .execute(pool)
        .await?;
    });
    check_seal_key(db, key).await
}

/// Fails if the seals are made with another key than `key` (nothing recorded yet: no seal
/// was made with a key, any key will do).
pub async fn check_seal_key(db: &Db, key: &SealKey) -> Result<(), ProjectionError> {
    let recorded: Option<String> = ekm_store::with_write_pool!(db, pool => {
        sqlx::query_scalar("SELECT fingerprint FROM audit_keys WHERE id = 1")
            .fetch_optional(pool)
            .await?
    });
    match recorded {
        Some(recorded) if recorded != key.fingerprint() => Err(ProjectionError::WrongSealKey {
            recorded,
            given: key.fingerprint(),
        }),
        _ => Ok(()),
    }
}

/// One audit signing key the database knows: the current one, or one it replaced.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SigningKeyRecord {
    pub key_id: String,
    /// Standard base64 of the raw 32-byte Ed25519 public key.
    pub public_key: String,
    /// Microseconds since the epoch.
    pub created_at: i64,
    /// When a rotation replaced it (`None` for the current key).
    pub retired_at: Option<i64>,
}

/// The audit signing keys, the current one first, then the retired ones, newest first.
pub async fn signing_keys(db: &Db) -> Result<Vec<SigningKeyRecord>, ProjectionError> {
    let rows: Vec<(String, String, i64, Option<i64>)> = ekm_store::with_read_pool!(db, pool => {
        sqlx::query_as(
            "SELECT key_id, public_key, created_at, retired_at FROM audit_signing_keys \
             ORDER BY retired_at IS NOT NULL, retired_at DESC",
        )
        .fetch_all(pool)
        .await?
    });
    Ok(rows
        .into_iter()
        .map(
            |(key_id, public_key, created_at, retired_at)| SigningKeyRecord {
                key_id,
                public_key,
                created_at,
                retired_at,
            },
        )
        .collect())
}

fn wrong_signing_key(records: &[SigningKeyRecord], key: &ekm_keys::SigningKey) -> ProjectionError {
    let current = records
        .iter()
        .find(|r| r.retired_at.is_none())
        .map_or_else(|| "(none)".to_owned(), |r| r.key_id.clone());
    let retired = records
        .iter()
        .any(|r| r.key_id == key.key_id() && r.retired_at.is_some());
    ProjectionError::WrongSigningKey {
        recorded: current,
        given: if retired {
            format!("{}, which a rotation retired", key.key_id())
        } else {
            key.key_id()
        },
    }
}

/// Records which audit signing key signs this database's exports (its public key) on first
/// use, and refuses any other key afterwards, a retired one included: instances with key
/// files of their own would publish one key and sign with another (ADR 0023).
pub async fn register_signing_key(
    db: &Db,
    key: &ekm_keys::SigningKey,
) -> Result<(), ProjectionError> {
    ekm_store::with_write_pool!(db, pool => {
        // A second instance racing on an empty table meets the unique index: nothing is
        // inserted, and the check below refuses its key.
        sqlx::query(
            "INSERT INTO audit_signing_keys (key_id, public_key, created_at) \
             SELECT $1, $2, $3 WHERE NOT EXISTS (SELECT 1 FROM audit_signing_keys) \
             ON CONFLICT DO NOTHING",
        )
        .bind(key.key_id())
        .bind(key.public_key_base64())
        .bind(ekm_store::time::now_micros())
        .execute(pool)
        .await?;
    });
    let records = signing_keys(db).await?;
    match records.iter().find(|r| r.retired_at.is_none()) {
        Some(current) if current.key_id == key.key_id() => Ok(()),
        _ => Err(wrong_signing_key(&records, key)),
    }
}

/// Replaces the current audit signing key `old` by `new` in one transaction: `old` is
/// retired (its public key stays, for older exports), `new` becomes current. Refuses if
/// `old` is not the current key.
pub async fn rotate_signing_key(
    db: &Db,
    old: &ekm_keys::SigningKey,
    new: &ekm_keys::SigningKey,
) -> Result<(), ProjectionError> {
    let now = ekm_store::time::now_micros();
    let retired = ekm_store::with_write_pool!(db, pool => {
        let mut tx = pool.begin().await?;
        let retired = sqlx::query(
            "UPDATE audit_signing_keys SET retired_at = $1 WHERE key_id = $2 AND retired_at IS NULL",
        )
        .bind(now)
        .bind(old.key_id())
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if retired == 1 {
            sqlx::query(
                "INSERT INTO audit_signing_keys (key_id, public_key, created_at) VALUES ($1, $2, $3)",
            )
            .bind(new.key_id())
            .bind(new.public_key_base64())
            .bind(now)
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
        }
        retired
    });
    if retired == 1 {
        Ok(())
    } else {
        Err(wrong_signing_key(&signing_keys(db).await?, old))
    }
}

/// The position up to which the audit chain has sealed every event (its checkpoint): an
/// export stops there, so that every exported entry carries its seal.
pub async fn sealed_through(db: &Db) -> Result<i64, ProjectionError> {
    let position: Option<i64> = ekm_store::with_read_pool!(db, pool => {
        sqlx::query_scalar("SELECT position FROM projection_checkpoints WHERE name = 'audit_chain'")
            .fetch_optional(pool)
            .await?
    });
    Ok(position.unwrap_or(0))
}

/// Refuses to let a server seal history that was sealed before (ADR 0018): an attacker who
/// can write the database but not read the audit key could otherwise alter events, delete
/// the seals, reset the chain's checkpoint and let the next start seal the altered history
/// with the real key. Normally the chain's checkpoint moves with the key shredder's (both
/// are never rebuilt and move in the same transactions), and is 0 only while no event
/// exists. A database whose events were written outside EKM (seeded, or upgraded from
/// unkeyed seals) is sealed once with `ekm serve --seal-existing-history`.
pub async fn refuse_resealing(db: &Db) -> Result<(), ProjectionError> {
    let checkpoints: Vec<(String, i64)> = ekm_store::with_read_pool!(db, pool => {
        sqlx::query_as(
            "SELECT name, position FROM projection_checkpoints \
             WHERE name IN ('audit_chain', 'key_shredder')",
        )
        .fetch_all(pool)
        .await?
    });
    let of = |name: &str| {
        checkpoints
            .iter()
            .find(|(n, _)| n == name)
            .map_or(0, |(_, p)| *p)
    };
    let (chain, shredder) = (of("audit_chain"), of("key_shredder"));
    let first_event: Option<i64> = ekm_store::with_read_pool!(db, pool => {
        sqlx::query_scalar("SELECT MIN(position) FROM events WHERE aggregate_type = 'scope'")
            .fetch_one(pool)
            .await?
    });
    let reset = chain < shredder || (chain == 0 && first_event.is_some());
    if reset {
        return Err(ProjectionError::ResealRefused {
            checkpoint: chain,
            expected: shredder.max(first_event.unwrap_or(0)),
        });
    }
    Ok(())
}
