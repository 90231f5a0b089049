//! Reading the scope tree: a scope with its effective state and cause, and a page of
//! children. The cascade is resolved here, from the rows on the scope's path.

use chrono::{DateTime, Utc};
use ekm_domain::{
    effective_state, Effective, EffectiveJustification, JustificationPolicy, KeyHealth,
    MasterKeyRef, OrgId, OwnState, Plan, ScopeId, ScopeKind, Tier,
};
use ekm_store::time::from_micros;
use ekm_store::Db;
use sqlx::Row;

use crate::error::ProjectionError;

/// The event that last changed a scope's own state.
#[derive(Clone, Debug, PartialEq)]
pub struct StateChange {
    pub event: String,
    pub position: i64,
    pub at: DateTime<Utc>,
    pub actor: String,
    pub reason: Option<String>,
}

/// One row of the scope tree.
#[derive(Clone, Debug, PartialEq)]
pub struct ScopeRecord {
    pub id: ScopeId,
    pub org_id: OrgId,
    pub parent_id: Option<ScopeId>,
    pub kind: ScopeKind,
    pub name: String,
    /// From the root to this scope, inclusive.
    pub path: Vec<ScopeId>,
    pub own_state: OwnState,
    pub plan: Option<Plan>,
    pub tier: Option<Tier>,
    pub key_version: u32,
    /// The aggregate's version: the sequence number of its latest event.
    pub version: i64,
    pub created_at: DateTime<Utc>,
    pub updated_position: i64,
    pub state_change: Option<StateChange>,
    /// Organizations only: the customer's master key (`None`: the platform's).
    pub master_key: Option<MasterKeyRef>,
    /// Organizations only: whether the customer's key can be used, as last recorded.
    pub master_health: KeyHealth,
    /// The event that last set `master_health`, its reason and what the provider said.
    pub master_change: Option<StateChange>,
    pub master_detail: Option<String>,
    /// Revoked scopes: `pending`, `running` or `done` (ADR 0013), and when it was done.
    pub rekey_state: Option<String>,
    pub rekey_done_position: Option<i64>,
    /// The scope's own access-justification policy, if it set one (ADR 0027).
    pub justification: Option<JustificationPolicy>,
    /// Key versions below this one do not decrypt (1: all do).
    pub min_decryption_version: u32,
    /// While `pending_revocation`: when the revoke falls due (RFC 3339).
    pub revoke_due_at: Option<String>,
    /// Organizations: the default waiting period of a revoke (ISO 8601), if set.
    pub revoke_window: Option<String>,
    /// The scope's own key rotation period (ISO 8601), if it set one.
    pub rotation_period: Option<String>,
    /// Organizations: the rate limits the operator set (ADR 0036); the rest are defaults.
    pub rate_limits: ekm_domain::RateLimits,
}

/// An action the scheduler fires (issue 17 §2).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScheduledAction {
    pub scope_id: ScopeId,
    /// `resume`: a pause with `until`; `grant_expiry`: a grant's `expires_at`.
    pub kind: String,
    pub org_id: String,
    /// Microseconds since the epoch.
    pub due_at: i64,
    /// The instant as the event recorded it (what the scheduler fires with).
    pub at: String,
    /// What the action is about within its scope: `""` for a resume, the grant (canonical
    /// JSON, `grant_subject`) for a grant's expiry.
    pub subject: String,
}

impl ScheduledAction {
    /// The grant a `grant_expiry` is about.
    pub fn grant(&self) -> Option<ekm_domain::Grant> {
        match self.kind == crate::scope_tree::GRANT_EXPIRY {
            true => serde_json::from_str(&self.subject).ok(),
            false => None,
        }
    }
}

type ScheduleRow = (String, String, String, i64, String, String);

/// The rows that read as actions. One that does not (a scope id written around the
/// projection) is skipped with a warning: it cannot stop the others from firing.
fn readable(rows: Vec<ScheduleRow>) -> Vec<ScheduledAction> {
    rows.into_iter()
        .filter_map(|row| {
            scheduled(row)
                .map_err(
                    |error| tracing::warn!(%error, "a schedule row that cannot be read; skipped"),
                )
                .ok()
        })
        .collect()
}

fn scheduled(
    (scope_id, kind, org_id, due_at, at, subject): ScheduleRow,
) -> Result<ScheduledAction, ProjectionError> {
    Ok(ScheduledAction {
        scope_id: ScopeId::parse(&scope_id).map_err(|e| malformed(&scope_id, e.to_string()))?,
        kind,
        org_id,
        due_at,
        at,
        subject,
    })
}

/// How far destroying a revoke's keys has got, for a scope whose path holds a revoke.
#[derive(Clone, Debug, PartialEq)]
pub struct Destruction {
    /// The highest revoked scope on the path.
    pub revoked: ScopeId,
    /// The position of the event that recorded its re-key finished (the destroyed bytes
    /// gone from the database's files); `None` while pending.
    pub live_done_position: Option<i64>,
    /// Where the event log stood when the platform master key in use was activated: once
    /// at or past `live_done_position`, no copy of the database opens the revoked keys.
    pub master_activated_position: Option<i64>,
}

impl Destruction {
    pub fn live_done(&self) -> bool {
        self.live_done_position.is_some()
    }

    pub fn copies_done(&self) -> bool {
        // The rotation saw the completion event in the log (positions follow commit order):
        // it came after the re-key.
        matches!((self.live_done_position, self.master_activated_position), (Some(done), Some(master)) if master >= done)
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct KeyVersionRecord {
    pub version: u32,
    pub created_at: DateTime<Utc>,
    /// Absent only for versions recorded before keys existed.
    pub fingerprint: Option<String>,
    /// Retired: its key material is destroyed.
    pub retired: bool,
}

/// Why a scope is not active: the highest scope on its path in that state, and the event
/// that put it there.
#[derive(Clone, Debug, PartialEq)]
pub struct Cause {
    pub scope_id: ScopeId,
    pub kind: ScopeKind,
    pub name: String,
    pub change: Option<StateChange>,
    /// A pending revocation's due time (RFC 3339), when that is the cause.
    pub due_at: Option<String>,
}

/// A scope as the API shows it.
#[derive(Clone, Debug, PartialEq)]
pub struct ScopeSnapshot {
    pub scope: ScopeRecord,
    pub effective: Effective,
    /// The effective state of the parent (`Active` for an organization).
    pub inherited: Effective,
    pub cause: Option<Cause>,
    pub org_plan: Plan,
    pub org_tier: Tier,
    pub key_versions: Vec<KeyVersionRecord>,
    pub destruction: Option<Destruction>,
    /// What the policies on the path impose on the data plane (ADR 0027).
    pub justification: EffectiveJustification,
}

/// A page of a list and the key to continue after it.
#[derive(Clone, Debug, PartialEq)]
pub struct Page<T> {
    pub items: Vec<T>,
    pub next_after: Option<ScopeId>,
}

const SCOPE_COLUMNS: &str = "id, org_id, parent_id, kind, name, path, own_state, plan, tier, \
    key_version, version, created_at, updated_position, state_event, state_position, state_at, \
    state_actor, state_reason, master_key, master_health, master_reason, master_detail, \
    master_position, master_at, rekey_state, rekey_done_position, justification_policy, \
    min_decryption_version, revoke_due_at, revoke_window, rotation_period, rate_limits";

/// The `rate_limits` column: JSON, NULL for the defaults.
pub(crate) fn rate_limits(
    id: &str,
    text: Option<String>,
) -> Result<ekm_domain::RateLimits, ProjectionError> {
    text.map(|text| serde_json::from_str(&text).map_err(|e| malformed(id, e.to_string())))
        .transpose()
        .map(Option::unwrap_or_default)
}

fn malformed(id: &str, problem: impl Into<String>) -> ProjectionError {
    ProjectionError::MalformedRow {
        id: id.to_owned(),
        problem: problem.into(),
    }
}

macro_rules! decode_scope {
    ($row:expr) => {{
        let row = $row;
        let id: String = row.try_get("id")?;
        let parse_id = |text: &str| ScopeId::parse(text).map_err(|e| malformed(&id, e.to_string()));
        let parent_id: Option<String> = row.try_get("parent_id")?;
        let path: String = row.try_get("path")?;
        let plan: Option<String> = row.try_get("plan")?;
        let tier: Option<String> = row.try_get("tier")?;
        let kind: String = row.try_get("kind")?;
        let own_state: String = row.try_get("own_state")?;
        let state_event: Option<String> = row.try_get("state_event")?;
        let key_version: i64 = row.try_get("key_version")?;
        let state_change = match state_event {
            Some(event) => Some(StateChange {
                event,
                position: row
                    .try_get::<Option<i64>, _>("state_position")?
                    .unwrap_or(0),
                at: from_micros(row.try_get::<Option<i64>, _>("state_at")?.unwrap_or(0)),
                actor: row
                    .try_get::<Option<String>, _>("state_actor")?
                    .unwrap_or_default(),
                reason: row.try_get("state_reason")?,
            }),
            None => None,
        };
        let master_key: Option<String> = row.try_get("master_key")?;
        let master_key: Option<MasterKeyRef> = master_key
            .map(|text| serde_json::from_str(&text))
            .transpose()
            .map_err(|e| malformed(&id, e.to_string()))?;
        let master_health = match row
            .try_get::<Option<String>, _>("master_health")?
            .as_deref()
        {
            Some("unavailable") => KeyHealth::Unavailable,
            _ => KeyHealth::Available,
        };
        let master_change = match row.try_get::<Option<i64>, _>("master_position")? {
            Some(position) => Some(StateChange {
                event: if master_health == KeyHealth::Unavailable {
                    "OrganizationMasterKeyHealthChanged".to_owned()
                } else {
                    "OrganizationMasterKeyChanged".to_owned()
                },
                position,
                at: from_micros(row.try_get::<Option<i64>, _>("master_at")?.unwrap_or(0)),
                actor: "system".to_owned(),
                reason: row.try_get("master_reason")?,
            }),
            None => None,
        };
        Ok::<_, ProjectionError>(ScopeRecord {
            id: parse_id(&id)?,
            org_id: OrgId::parse(&row.try_get::<String, _>("org_id")?)
                .map_err(|e| malformed(&id, e.to_string()))?,
            parent_id: parent_id.as_deref().map(parse_id).transpose()?,
            kind: kind
                .parse()
                .map_err(|e: ekm_domain::ValueError| malformed(&id, e.to_string()))?,
            name: row.try_get("name")?,
            path: path.split('/').map(parse_id).collect::<Result<_, _>>()?,
            own_state: own_state
                .parse()
                .map_err(|e: ekm_domain::ValueError| malformed(&id, e.to_string()))?,
            plan: plan
                .map(|p| p.parse())
                .transpose()
                .map_err(|e: ekm_domain::ValueError| malformed(&id, e.to_string()))?,
            tier: tier
                .map(|t| t.parse())
                .transpose()
                .map_err(|e: ekm_domain::ValueError| malformed(&id, e.to_string()))?,
            key_version: u32::try_from(key_version).map_err(|e| malformed(&id, e.to_string()))?,
            version: row.try_get("version")?,
            created_at: from_micros(row.try_get("created_at")?),
            updated_position: row.try_get("updated_position")?,
            state_change,
            master_key,
            master_health,
            master_change,
            master_detail: row.try_get("master_detail")?,
            rekey_state: row.try_get("rekey_state")?,
            rekey_done_position: row.try_get("rekey_done_position")?,
            min_decryption_version: u32::try_from(row.try_get::<i64, _>("min_decryption_version")?)
                .map_err(|e| malformed(&id, e.to_string()))?,
            revoke_due_at: row.try_get("revoke_due_at")?,
            revoke_window: row.try_get("revoke_window")?,
            rotation_period: row.try_get("rotation_period")?,
            rate_limits: rate_limits(&id, row.try_get("rate_limits")?)?,
            justification: row
                .try_get::<Option<String>, _>("justification_policy")?
                .map(|text| serde_json::from_str(&text))
                .transpose()
                .map_err(|e| malformed(&id, e.to_string()))?,
        })
    }};
}

fn placeholders(count: usize, first: usize) -> String {
    (first..first + count)
        .map(|i| format!("${i}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Queries on the read models.
#[derive(Clone, Debug)]
pub struct ReadModels {
    db: Db,
}

impl ReadModels {
    pub fn new(db: Db) -> Self {
        Self { db }
    }

    async fn records(&self, ids: &[ScopeId]) -> Result<Vec<ScopeRecord>, ProjectionError> {
        if ids.is_empty() {
            return Ok(vec![]);
        }
        let sql = format!(
            "SELECT {SCOPE_COLUMNS} FROM scope_view WHERE id IN ({})",
            placeholders(ids.len(), 1)
        );
        ekm_store::with_read_pool!(&self.db, pool => {
            let mut query = sqlx::query(&sql);
            for id in ids {
                query = query.bind(id.to_string());
            }
            query.fetch_all(pool).await?.into_iter().map(|row| decode_scope!(row)).collect()
        })
    }

    async fn key_versions(
        &self,
        ids: &[ScopeId],
    ) -> Result<Vec<(ScopeId, KeyVersionRecord)>, ProjectionError> {
        if ids.is_empty() {
            return Ok(vec![]);
        }
        let sql = format!(
            "SELECT scope_id, version, created_at, fingerprint, retired_position FROM key_version_view \
             WHERE scope_id IN ({}) ORDER BY scope_id, version",
            placeholders(ids.len(), 1)
        );
        type Row = (String, i64, i64, Option<String>, Option<i64>);
        let rows: Vec<Row> = ekm_store::with_read_pool!(&self.db, pool => {
            let mut query = sqlx::query_as(&sql);
            for id in ids {
                query = query.bind(id.to_string());
            }
            query.fetch_all(pool).await?
        });
        rows.into_iter()
            .map(|(id, version, at, fingerprint, retired)| {
                Ok((
                    ScopeId::parse(&id).map_err(|e| malformed(&id, e.to_string()))?,
                    KeyVersionRecord {
                        version: u32::try_from(version)
                            .map_err(|e| malformed(&id, e.to_string()))?,
                        created_at: from_micros(at),
                        fingerprint,
                        retired: retired.is_some(),
                    },
                ))
            })
            .collect()
    }

    /// Organizations with a customer master key, except revoked ones.
    pub async fn customer_key_orgs(&self) -> Result<Vec<ScopeId>, ProjectionError> {
        let sql = "SELECT id FROM scope_view WHERE parent_id IS NULL AND master_key IS NOT NULL \
                   AND own_state <> 'revoked' ORDER BY id";
        let ids: Vec<String> = ekm_store::with_read_pool!(&self.db, pool => {
            sqlx::query_scalar(sql).fetch_all(pool).await?
        });
        ids.iter()
            .map(|id| ScopeId::parse(id).map_err(|e| malformed(id, e.to_string())))
            .collect()
    }

    /// The scope controls in force in `org`'s tree, outside revoked subtrees (which nothing
    /// changes any more): own pauses, justification policies, and decryption floors that
    /// still disable a live version (one whose versions below are all retired disables
    /// nothing).
    pub async fn controls_in_force(
        &self,
        org: ScopeId,
    ) -> Result<ekm_domain::ControlsInForce, ProjectionError> {
        let sql = "SELECT \
            COALESCE(SUM(CASE WHEN s.own_state IN ('paused', 'pending_revocation') THEN 1 ELSE 0 END), 0) AS paused, \
            COALESCE(SUM(CASE WHEN s.justification_policy IS NOT NULL THEN 1 ELSE 0 END), 0) AS policies, \
            COALESCE(SUM(CASE WHEN EXISTS (SELECT 1 FROM key_version_view k \
                WHERE k.scope_id = s.id AND k.version < s.min_decryption_version \
                AND k.retired_position IS NULL) THEN 1 ELSE 0 END), 0) AS floors \
            FROM scope_view s WHERE s.org_id = $1 AND s.own_state <> 'revoked' \
            AND (s.own_state IN ('paused', 'pending_revocation') OR s.justification_policy IS NOT NULL OR s.min_decryption_version > 1) \
            AND NOT EXISTS (SELECT 1 FROM scope_view r WHERE r.org_id = s.org_id \
                AND r.own_state = 'revoked' AND s.path LIKE r.path || '/%')";
        let (paused, policies, floors): (i64, i64, i64) = ekm_store::with_read_pool!(&self.db, pool => {
            sqlx::query_as(sql).bind(org.to_string()).fetch_one(pool).await?
        });
        let count = |n: i64| u64::try_from(n).unwrap_or(0);
        Ok(ekm_domain::ControlsInForce {
            paused: count(paused),
            justification_policies: count(policies),
            floors: count(floors),
        })
    }

    /// Scheduled actions due at or before `now` (microseconds since the epoch), oldest
    /// first: scope, kind and the instant as scheduled.
    pub async fn due_actions(
        &self,
        now: i64,
        limit: i64,
    ) -> Result<Vec<ScheduledAction>, ProjectionError> {
        let sql = "SELECT scope_id, kind, org_id, due_at, at, subject FROM schedule \
                   WHERE due_at <= $1 ORDER BY due_at, scope_id, kind, subject LIMIT $2";
        let rows: Vec<ScheduleRow> = ekm_store::with_read_pool!(&self.db, pool => {
            sqlx::query_as(sql).bind(now).bind(limit).fetch_all(pool).await?
        });
        Ok(readable(rows))
    }

    /// `due_actions`, after the action whose `(due_at, scope_id, kind, subject)` is `after`:
    /// the scheduler pages through everything due. Also returns where the next page starts,
    /// when this one was full (counting rows that could not be read).
    #[allow(clippy::type_complexity)]
    pub async fn due_actions_after(
        &self,
        now: i64,
        after: Option<(i64, String, String, String)>,
        limit: i64,
    ) -> Result<(Vec<ScheduledAction>, Option<(i64, String, String, String)>), ProjectionError>
    {
        let (after_due, after_id, after_kind, after_subject) =
            after.unwrap_or((i64::MIN, String::new(), String::new(), String::new()));
        let sql = "SELECT scope_id, kind, org_id, due_at, at, subject FROM schedule \
                   WHERE due_at <= $1 AND (due_at, scope_id, kind, subject) > ($2, $3, $4, $5) \
                   ORDER BY due_at, scope_id, kind, subject LIMIT $6";
        let rows: Vec<ScheduleRow> = ekm_store::with_read_pool!(&self.db, pool => {
            sqlx::query_as(sql)
                .bind(now)
                .bind(after_due)
                .bind(after_id)
                .bind(after_kind)
                .bind(after_subject)
                .bind(limit)
                .fetch_all(pool)
                .await?
        });
        let next = match rows.len() as i64 == limit {
            true => rows
                .last()
                .map(|r| (r.3, r.0.clone(), r.1.clone(), r.5.clone())),
            false => None,
        };
        Ok((readable(rows), next))
    }

    /// An organization's scheduled actions in due order, after the one whose
    /// `(due_at, scope_id, kind, subject)` is `after` (several actions may share a time and a
    /// scope: an organization's grants expiring together).
    /// `grants`: whether grant expiries are listed (they name grants).
    pub async fn org_schedule(
        &self,
        org: ScopeId,
        grants: bool,
        after: Option<(i64, String, String, String)>,
        limit: i64,
    ) -> Result<Vec<ScheduledAction>, ProjectionError> {
        let (after_due, after_id, after_kind, after_subject) =
            after.unwrap_or((i64::MIN, String::new(), String::new(), String::new()));
        let sql = "SELECT scope_id, kind, org_id, due_at, at, subject FROM schedule \
                   WHERE org_id = $1 AND (due_at, scope_id, kind, subject) > ($2, $3, $4, $5) \
                   AND ($7 OR kind <> 'grant_expiry') \
                   ORDER BY due_at, scope_id, kind, subject LIMIT $6";
        let rows: Vec<ScheduleRow> = ekm_store::with_read_pool!(&self.db, pool => {
            sqlx::query_as(sql)
                .bind(org.to_string())
                .bind(after_due)
                .bind(after_id)
                .bind(after_kind)
                .bind(after_subject)
                .bind(limit)
                .bind(grants)
                .fetch_all(pool)
                .await?
        });
        Ok(readable(rows))
    }

    /// Revoked scopes whose re-key has not completed, oldest revoke first.
    pub async fn pending_rekeys(&self) -> Result<Vec<ScopeId>, ProjectionError> {
        let sql = "SELECT id FROM scope_view WHERE rekey_state IN ('pending', 'running') \
                   ORDER BY state_position";
        let ids: Vec<String> = ekm_store::with_read_pool!(&self.db, pool => {
            sqlx::query_scalar(sql).fetch_all(pool).await?
        });
        ids.iter()
            .map(|id| ScopeId::parse(id).map_err(|e| malformed(id, e.to_string())))
            .collect()
    }

    /// The ids of a scope and of everything below it.
    pub async fn subtree_ids(&self, root: &ScopeRecord) -> Result<Vec<String>, ProjectionError> {
        let path = root
            .path
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("/");
        let sql = "SELECT id FROM scope_view WHERE org_id = $1 AND (path = $2 OR path LIKE $3)";
        let ids: Vec<String> = ekm_store::with_read_pool!(&self.db, pool => {
            sqlx::query_scalar(sql)
                .bind(root.org_id.to_string())
                .bind(&path)
                .bind(format!("{path}/%"))
                .fetch_all(pool)
                .await?
        });
        Ok(ids)
    }

    /// Where the event log stood when the platform master key in use became the one that
    /// wraps every organization key: copies of the database made before then open nothing.
    pub async fn master_key_activated_position(&self) -> Result<Option<i64>, ProjectionError> {
        let sql = "SELECT MAX(activated_position) FROM master_keys WHERE provider = 'local'";
        let at: Option<i64> = ekm_store::with_read_pool!(&self.db, pool => {
            sqlx::query_scalar(sql).fetch_one(pool).await?
        });
        Ok(at)
    }

    /// A scope with its effective state, or `None` if no such scope exists.
    pub async fn scope(&self, id: ScopeId) -> Result<Option<ScopeSnapshot>, ProjectionError> {
        let Some(record) = self.records(&[id]).await?.pop() else {
            return Ok(None);
        };
        let path = record.path.clone();
        let mut on_path = self.records(&path[..path.len().saturating_sub(1)]).await?;
        on_path.push(record);
        // Root first.
        on_path.sort_by_key(|r| path.iter().position(|p| *p == r.id));
        let key_versions = self
            .key_versions(&[id])
            .await?
            .into_iter()
            .map(|(_, k)| k)
            .collect();
        let mut snapshot = snapshot(on_path, key_versions)?;
        self.fill_destruction(std::slice::from_mut(&mut snapshot))
            .await?;
        Ok(Some(snapshot))
    }

    /// Adds the master key's activation to snapshots whose path holds a revoke.
    async fn fill_destruction(
        &self,
        snapshots: &mut [ScopeSnapshot],
    ) -> Result<(), ProjectionError> {
        if snapshots.iter().all(|s| s.destruction.is_none()) {
            return Ok(());
        }
        let activated = self.master_key_activated_position().await?;
        for destruction in snapshots.iter_mut().filter_map(|s| s.destruction.as_mut()) {
            destruction.master_activated_position = activated;
        }
        Ok(())
    }

    /// The fingerprint recorded for a key version, if the version exists.
    pub async fn key_fingerprint(
        &self,
        scope: &str,
        version: u32,
    ) -> Result<Option<String>, ProjectionError> {
        let found: Option<Option<String>> = ekm_store::with_read_pool!(&self.db, pool => {
            sqlx::query_scalar("SELECT fingerprint FROM key_version_view WHERE scope_id = $1 AND version = $2")
                .bind(scope)
                .bind(i64::from(version))
                .fetch_optional(pool)
                .await?
        });
        Ok(found.flatten())
    }

    /// The children of `parent`, ordered by id (creation order), after `after`.
    pub async fn children(
        &self,
        parent: &ScopeSnapshot,
        after: Option<ScopeId>,
        limit: u32,
    ) -> Result<Page<ScopeSnapshot>, ProjectionError> {
        let after = after.map(|a| a.to_string()).unwrap_or_default();
        let sql = format!(
            "SELECT {SCOPE_COLUMNS} FROM scope_view WHERE parent_id = $1 AND id > $2 \
             ORDER BY id LIMIT $3"
        );
        let mut records: Vec<ScopeRecord> = ekm_store::with_read_pool!(&self.db, pool => {
            sqlx::query(&sql)
                .bind(parent.scope.id.to_string())
                .bind(after)
                .bind(i64::from(limit) + 1)
                .fetch_all(pool)
                .await?
                .into_iter()
                .map(|row| decode_scope!(row))
                .collect::<Result<_, _>>()?
        });
        let more = records.len() > limit as usize;
        records.truncate(limit as usize);
        let ids: Vec<ScopeId> = records.iter().map(|r| r.id).collect();
        let mut key_versions = self.key_versions(&ids).await?;
        let items = records
            .into_iter()
            .map(|record| {
                let mine = key_versions
                    .iter()
                    .filter(|(id, _)| *id == record.id)
                    .map(|(_, k)| k.clone())
                    .collect();
                key_versions.retain(|(id, _)| *id != record.id);
                child_snapshot(parent, record, mine)
            })
            .collect::<Vec<_>>();
        let mut items = items;
        self.fill_destruction(&mut items).await?;
        let next_after = if more {
            items.last().map(|s| s.scope.id)
        } else {
            None
        };
        Ok(Page { items, next_after })
    }
}

impl ReadModels {
    /// Scopes of `org` whose name contains `needle` (case-insensitive; ASCII case folding on
    /// SQLite), ordered by id, after `after`, and only in the subtrees of `within` when it
    /// is given (`None`: the whole organization). Rows only: the caller resolves the
    /// cascade of those it keeps. Filtering here, not after the page is read, is what
    /// keeps a page's last row, and so its cursor, one the caller may see (ADR 0016).
    pub async fn search_names(
        &self,
        org: OrgId,
        needle: &str,
        within: Option<&[ScopeId]>,
        after: Option<ScopeId>,
        limit: u32,
    ) -> Result<Page<ScopeRecord>, ProjectionError> {
        if within.is_some_and(<[ScopeId]>::is_empty) {
            return Ok(Page {
                items: vec![],
                next_after: None,
            });
        }
        let after = after.map(|a| a.to_string()).unwrap_or_default();
        let mut pattern = String::with_capacity(needle.len() + 2);
        pattern.push('%');
        for c in needle.to_lowercase().chars() {
            if matches!(c, '%' | '_' | '\\') {
                pattern.push('\\');
            }
            pattern.push(c);
        }
        pattern.push('%');
        // A scope is in a subtree when the subtree's root is on its path (ids hold no LIKE
        // wildcards).
        let roots = within.unwrap_or_default();
        let in_subtrees = if roots.is_empty() {
            String::new()
        } else {
            let any = (0..roots.len())
                .map(|i| format!("('/' || path || '/') LIKE ${}", i + 5))
                .collect::<Vec<_>>()
                .join(" OR ");
            format!("AND ({any})")
        };
        let sql = format!(
            "SELECT {SCOPE_COLUMNS} FROM scope_view WHERE org_id = $1 AND id > $2 \
             AND lower(name) LIKE $3 ESCAPE '\\' {in_subtrees} ORDER BY id LIMIT $4"
        );
        let mut records: Vec<ScopeRecord> = ekm_store::with_read_pool!(&self.db, pool => {
            let mut query = sqlx::query(&sql)
                .bind(org.to_string())
                .bind(after)
                .bind(&pattern)
                .bind(i64::from(limit) + 1);
            for root in roots {
                query = query.bind(format!("%/{root}/%"));
            }
            query
                .fetch_all(pool)
                .await?
                .into_iter()
                .map(|row| decode_scope!(row))
                .collect::<Result<_, _>>()?
        });
        let more = records.len() > limit as usize;
        records.truncate(limit as usize);
        let next_after = if more {
            records.last().map(|r| r.id)
        } else {
            None
        };
        Ok(Page {
            items: records,
            next_after,
        })
    }
}

/// How many scopes of each kind an action on a subtree would make inactive, and how many
/// already are.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BlastRadius {
    pub total: i64,
    pub would_become_inactive: std::collections::BTreeMap<&'static str, i64>,
    pub already_inactive: std::collections::BTreeMap<&'static str, i64>,
}

impl ReadModels {
    /// Walks `root`'s subtree (itself included) in path order, a page at a time, so memory
    /// holds only the ids of inactive scopes, whatever the subtree's size.
    pub async fn blast_radius(&self, root: &ScopeSnapshot) -> Result<BlastRadius, ProjectionError> {
        let path = root
            .scope
            .path
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("/");
        let upper = format!("{path}0");
        let mut radius = BlastRadius::default();
        let mut inactive: std::collections::HashSet<String> = std::collections::HashSet::new();
        let root_inherited_inactive = !root.inherited.is_active();
        let mut after = String::new();
        loop {
            let sql = "SELECT id, kind, own_state, parent_id, path FROM scope_view \
                       WHERE org_id = $1 AND path >= $2 AND path < $3 AND path > $4 \
                       ORDER BY path LIMIT 1000";
            let rows: Vec<(String, String, String, Option<String>, String)> = ekm_store::with_read_pool!(&self.db, pool => {
                sqlx::query_as(sql)
                    .bind(root.scope.org_id.to_string())
                    .bind(&path)
                    .bind(&upper)
                    .bind(&after)
                    .fetch_all(pool)
                    .await?
            });
            let Some(last) = rows.last().map(|r| r.4.clone()) else {
                break;
            };
            for (id, kind, own_state, parent_id, _) in rows {
                let kind: ScopeKind = kind
                    .parse()
                    .map_err(|e: ekm_domain::ValueError| malformed(&id, e.to_string()))?;
                let parent_inactive = if id == root.scope.id.to_string() {
                    root_inherited_inactive
                } else {
                    parent_id.is_some_and(|p| inactive.contains(&p))
                };
                radius.total += 1;
                if parent_inactive || own_state != OwnState::Active.as_str() {
                    *radius.already_inactive.entry(kind.as_str()).or_default() += 1;
                    inactive.insert(id);
                } else {
                    *radius
                        .would_become_inactive
                        .entry(kind.as_str())
                        .or_default() += 1;
                }
            }
            after = last;
        }
        Ok(radius)
    }
}

fn cause_of(effective: &Effective, records: &[&ScopeRecord]) -> Option<Cause> {
    let by = effective.cause()?;
    let record = records.iter().find(|r| r.id == by)?;
    let change = match effective {
        Effective::Unavailable { .. } => record.master_change.clone(),
        _ => record.state_change.clone(),
    };
    Some(Cause {
        scope_id: record.id,
        kind: record.kind,
        name: record.name.clone(),
        change,
        due_at: match effective {
            Effective::PendingRevocation { .. } => record.revoke_due_at.clone(),
            _ => None,
        },
    })
}

/// Builds the snapshot of the last record of `on_path` (root first).
fn snapshot(
    on_path: Vec<ScopeRecord>,
    key_versions: Vec<KeyVersionRecord>,
) -> Result<ScopeSnapshot, ProjectionError> {
    let Some(scope) = on_path.last() else {
        return Err(malformed("", "empty path"));
    };
    if on_path.len() != scope.path.len() {
        // A row on the path is missing: the read model is behind or damaged. Refuse to
        // guess an effective state.
        return Err(malformed(
            &scope.id.to_string(),
            "an ancestor is missing from the scope tree",
        ));
    }
    let org = &on_path[0];
    let inherited = effective_state(
        on_path[..on_path.len() - 1]
            .iter()
            .map(|r| (r.id, r.own_state)),
    );
    // The master key's health is the organization's; an organization's own inherited state
    // (it has no parent) stays active.
    let effective = inherited
        .child(scope.id, scope.own_state)
        .with_master_key(org.id, org.master_health);
    let inherited = if on_path.len() > 1 {
        inherited.with_master_key(org.id, org.master_health)
    } else {
        inherited
    };
    let refs: Vec<&ScopeRecord> = on_path.iter().collect();
    let cause = cause_of(&effective, &refs);
    let org_plan = on_path
        .first()
        .and_then(|org| org.plan)
        .unwrap_or(Plan::Standard);
    let org_tier = on_path
        .first()
        .and_then(|org| org.tier)
        .unwrap_or(Tier::Default);
    let destruction = on_path.iter().find_map(destruction_of);
    let justification =
        EffectiveJustification::along(on_path.iter().map(|r| (r.id, r.justification.as_ref())));
    let scope = scope.clone();
    Ok(ScopeSnapshot {
        scope,
        effective,
        inherited,
        cause,
        org_plan,
        org_tier,
        key_versions,
        destruction,
        justification,
    })
}

fn destruction_of(record: &ScopeRecord) -> Option<Destruction> {
    (record.own_state == OwnState::Revoked).then(|| Destruction {
        revoked: record.id,
        live_done_position: record
            .rekey_done_position
            .filter(|_| record.rekey_state.as_deref() == Some("done")),
        master_activated_position: None,
    })
}

fn child_snapshot(
    parent: &ScopeSnapshot,
    record: ScopeRecord,
    key_versions: Vec<KeyVersionRecord>,
) -> ScopeSnapshot {
    let effective = parent.effective.child(record.id, record.own_state);
    let cause = if effective.cause() == Some(record.id) {
        cause_of(&effective, &[&record])
    } else {
        parent.cause.clone()
    };
    let destruction = parent
        .destruction
        .clone()
        .or_else(|| destruction_of(&record));
    let justification = parent
        .justification
        .clone()
        .then(record.id, record.justification.as_ref());
    ScopeSnapshot {
        scope: record,
        effective,
        inherited: parent.effective,
        cause,
        org_plan: parent.org_plan,
        org_tier: parent.org_tier,
        key_versions,
        destruction,
        justification,
    }
}
