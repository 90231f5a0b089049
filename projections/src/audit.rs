//! The audit log and its tamper-evidence seals.
//!
//! `AuditLog` writes one entry per event (a read model, rebuildable). `AuditChain` seals each
//! event into a SHA-256 chain per organization when it is first projected; it is never
//! rebuilt, so rebuilding from altered events cannot launder the alteration. `verify_chain`
//! recomputes the chain from the events and names the first entry that differs.

use std::collections::{BTreeMap, HashMap};

use chrono::{DateTime, Utc};
use ekm_domain::metadata::EventMetadata;
use ekm_domain::{Location, ScopeEvent};
use ekm_store::time::{from_micros, rfc3339, to_micros};
use ekm_store::{Db, StoredEvent};
use serde::Serialize;
use sha2::{Digest, Sha256};
use sqlx::Row;

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
        ScopeEvent::ScopeKeyVersionsRetired { below } => {
            format!("retired key versions below {below} (their key material is destroyed)")
        }
        ScopeEvent::ScopePaused {} => "paused".to_owned(),
        ScopeEvent::ScopeResumed {} => "resumed".to_owned(),
        ScopeEvent::ScopeRevoked {} => "revoked (final)".to_owned(),
        ScopeEvent::ScopeKeyRotated { key_version, .. } => {
            format!("rotated the key to version {key_version}")
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
        } => format!("granted {permission} to {principal} on {}", on(scope_id)),
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

pub struct AuditLog;

const ENTRY_COLUMNS: &[&str] = &[
    "position",
    "recorded_at",
    "org_id",
    "scope_id",
    "scope_path",
    "action",
    "event_type",
    "event_version",
    "actor",
    "actor_kind",
    "reason",
    "request_id",
    "source_address",
    "summary",
    "details",
];

impl Projection for AuditLog {
    fn name(&self) -> &'static str {
        "audit_log"
    }

    fn tables(&self) -> &'static [&'static str] {
        &["audit_log"]
    }

    fn statements(
        &self,
        stored: &StoredEvent,
        _state: &mut ProjectionState,
    ) -> Result<Vec<Statement>, ProjectionError> {
        if stored.aggregate_type != "scope" {
            return Ok(vec![]);
        }
        let event = stored.scope_event()?;
        let metadata = EventMetadata::from_map(&stored.metadata);
        let location = location(stored, &event, &metadata);
        Ok(vec![Statement::Insert {
            table: "audit_log",
            columns: ENTRY_COLUMNS,
            values: vec![
                Param::Int(stored.position),
                Param::Int(to_micros(stored.recorded_at)),
                Param::Text(location.org_id),
                Param::Text(stored.aggregate_id.clone()),
                Param::Text(location.scope_path),
                Param::Text(event.action().to_owned()),
                Param::Text(stored.event_type.clone()),
                Param::Text(stored.event_version.clone()),
                Param::Text(metadata.actor.to_string()),
                Param::Text(metadata.actor.kind.as_str().to_owned()),
                Param::OptText(metadata.reason.map(|r| r.as_str().to_owned())),
                Param::Text(metadata.request_id),
                Param::OptText(metadata.source_address),
                Param::Text(summary(&event)),
                Param::Text(stored.payload.to_string()),
            ],
        }])
    }
}

pub struct AuditChain;

impl AuditChain {
    fn org(stored: &StoredEvent) -> Result<String, ProjectionError> {
        let event = stored.scope_event()?;
        let metadata = EventMetadata::from_map(&stored.metadata);
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
        let org = Self::org(stored)?;
        let prev = state.get(&org).unwrap_or(GENESIS_HASH).to_owned();
        let hash = entry_hash(&prev, stored);
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
    payload: &'a serde_json::Value,
    metadata: BTreeMap<&'a str, &'a str>,
}

/// SHA-256 over the previous hash and every stored field of the event, in a canonical JSON
/// form (fixed field order, sorted metadata keys). Hex, lower case.
pub fn entry_hash(prev: &str, stored: &StoredEvent) -> String {
    let canonical = Canonical {
        position: stored.position,
        recorded_at: rfc3339(stored.recorded_at),
        aggregate_type: &stored.aggregate_type,
        aggregate_id: &stored.aggregate_id,
        sequence: stored.sequence,
        event_type: &stored.event_type,
        event_version: &stored.event_version,
        payload: &stored.payload,
        metadata: stored
            .metadata
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect(),
    };
    let mut hasher = Sha256::new();
    hasher.update(prev.as_bytes());
    hasher.update(b"\n");
    hasher.update(serde_json::to_vec(&canonical).unwrap_or_default());
    hex::encode(hasher.finalize())
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
    pub limit: i64,
}

enum Bind {
    Text(String),
    Int(i64),
}

impl AuditFilter {
    fn sql(&self) -> (String, Vec<Bind>) {
        let mut binds = vec![Bind::Text(self.org_id.clone())];
        let mut sql = String::from(
            "SELECT position, recorded_at, org_id, scope_id, scope_path, action, event_type, \
             event_version, actor, actor_kind, reason, request_id, source_address, summary, details \
             FROM audit_log WHERE org_id = $1",
        );
        let mut push = |clause: &str, bind: Bind, binds: &mut Vec<Bind>| {
            binds.push(bind);
            sql.push_str(&clause.replace('?', &format!("${}", binds.len())));
        };
        if let Some(path) = &self.subtree {
            // The path itself and every path below it: ids have a fixed length, so after a
            // full path the next character is '/', and '0' is the character after '/'.
            push(" AND scope_path >= ?", Bind::Text(path.clone()), &mut binds);
            push(
                " AND scope_path < ?",
                Bind::Text(format!("{path}0")),
                &mut binds,
            );
        }
        if let Some(actor) = &self.actor {
            push(" AND actor = ?", Bind::Text(actor.clone()), &mut binds);
        }
        if let Some(action) = &self.action {
            push(" AND action = ?", Bind::Text(action.clone()), &mut binds);
        }
        if let Some(from) = self.from {
            push(
                " AND recorded_at >= ?",
                Bind::Int(to_micros(from)),
                &mut binds,
            );
        }
        if let Some(to) = self.to {
            push(" AND recorded_at < ?", Bind::Int(to_micros(to)), &mut binds);
        }
        if let Some(after) = self.after {
            push(" AND position > ?", Bind::Int(after), &mut binds);
        }
        binds.push(Bind::Int(self.limit));
        sql.push_str(&format!(" ORDER BY position LIMIT ${}", binds.len()));
        (sql, binds)
    }
}

macro_rules! decode_entry {
    ($row:expr) => {{
        let row = $row;
        let path: String = row.try_get("scope_path")?;
        let details: String = row.try_get("details")?;
        Ok::<_, ProjectionError>(AuditEntry {
            position: row.try_get("position")?,
            recorded_at: from_micros(row.try_get("recorded_at")?),
            org_id: row.try_get("org_id")?,
            scope_id: row.try_get("scope_id")?,
            scope_path: path.split('/').map(ToOwned::to_owned).collect(),
            action: row.try_get("action")?,
            event_type: row.try_get("event_type")?,
            event_version: row.try_get("event_version")?,
            actor: row.try_get("actor")?,
            actor_kind: row.try_get("actor_kind")?,
            reason: row.try_get("reason")?,
            request_id: row.try_get("request_id")?,
            source_address: row.try_get("source_address")?,
            summary: row.try_get("summary")?,
            details,
        })
    }};
}

/// Entries matching `filter`, in position order.
pub async fn audit_entries(
    db: &Db,
    filter: &AuditFilter,
) -> Result<Vec<AuditEntry>, ProjectionError> {
    let (sql, binds) = filter.sql();
    ekm_store::with_read_pool!(db, pool => {
        let mut query = sqlx::query(&sql);
        for bind in binds {
            query = match bind {
                Bind::Text(v) => query.bind(v),
                Bind::Int(v) => query.bind(v),
            };
        }
        query.fetch_all(pool).await?.into_iter().map(|row| decode_entry!(row)).collect()
    })
}

/// What went wrong at the first bad entry of a chain.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ChainFailure {
    pub position: i64,
    /// `altered`, `removed`, `inserted` or `reordered`.
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
}

const VERIFY_PAGE: i64 = 500;

/// Recomputes `org`'s chain from the stored events and compares it with the seals.
pub async fn verify_chain(db: &Db, org: &str) -> Result<ChainReport, ProjectionError> {
    let mut report = ChainReport {
        org_id: org.to_owned(),
        ok: true,
        entries: 0,
        head_position: None,
        head_hash: None,
        first_failure: None,
    };
    let mut expected_prev = GENESIS_HASH.to_owned();
    let mut after = 0i64;
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
                    Some(event) if entry_hash(&expected_prev, event) != hash => Some(failure(
                        "altered",
                        Some(event),
                        "the stored event differs from what was sealed".into(),
                    )),
                    Some(_) => None,
                }
            };
            if let Some(failure) = found {
                report.ok = false;
                report.first_failure = Some(failure);
                break 'pages;
            }
            expected_prev = hash.clone();
            report.head_position = Some(position);
            report.head_hash = Some(hash);
        }
        after = last;
    }
    // Events that claim this organization, lie inside the sealed range, and were never
    // sealed: inserted behind the chain's back.
    if let Some(head) = report.head_position {
        let limit = report
            .first_failure
            .as_ref()
            .map(|f| f.position)
            .unwrap_or(head);
        for event in db.unsealed_events_up_to(limit).await? {
            let metadata = EventMetadata::from_map(&event.metadata);
            let claims_org = event
                .scope_event()
                .map(|e| location(&event, &e, &metadata).org_id == org)
                .unwrap_or(true);
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
    }
    Ok(report)
}
