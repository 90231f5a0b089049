//! The start-up read: the three tables and the checkpoint, in one consistent snapshot.

use ekm_domain::{JustificationPolicy, KeyHealth, MasterKeyRef, ScopeId};
use ekm_store::Db;
use futures_util::TryStreamExt;
use sqlx::Row;

use super::{
    malformed, Change, Fingerprint, GrantRow, Interner, KeyVer, Node, OrgFields, Rare, Rekey, Tree,
    ROOT,
};
use crate::error::ProjectionError;

const LOAD_SCOPES: &str = "SELECT id, parent_id, kind, name, own_state, plan, tier, key_version, \
    version, created_at, updated_position, state_event, state_position, state_at, state_actor, \
    state_reason, master_key, master_health, master_reason, master_detail, master_position, \
    master_at, rekey_state, rekey_done_position, justification_policy, min_decryption_version, \
    revoke_due_at, revoke_window, rotation_period, rate_limits FROM scope_view";
const LOAD_KEY_VERSIONS: &str = "SELECT scope_id, version, created_at, fingerprint, \
    retired_position FROM key_version_view ORDER BY scope_id, version";
const LOAD_GRANTS: &str = "SELECT org_id, principal, permission, scope_id, granted_position, \
    granted_at, granted_by, expires_at FROM grants_view ORDER BY granted_position";
const LOAD_CHECKPOINT: &str =
    "SELECT position FROM projection_checkpoints WHERE name = 'scope_tree'";

/// Reads the three tables and the checkpoint inside `$tx`, one consistent snapshot.
macro_rules! read_rows_in {
    ($tx:ident) => {{
        let tx = &mut $tx;
        let checkpoint: Option<i64> = sqlx::query_scalar(LOAD_CHECKPOINT)
            .fetch_optional(&mut **tx)
            .await?;
        let mut tree = Tree {
            floor: checkpoint.unwrap_or(0),
            position: checkpoint.unwrap_or(0),
            ..Tree::default()
        };
        let count: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM scope_view")
            .fetch_one(&mut **tx)
            .await?;
        let count = usize::try_from(count).unwrap_or(0);
        tree.nodes.reserve_exact(count);
        tree.index.reserve(count);
        let mut parents: Vec<Option<ScopeId>> = Vec::with_capacity(count);
        {
            let mut rows = sqlx::query(LOAD_SCOPES).fetch(&mut **tx);
            while let Some(row) = rows.try_next().await? {
                let (node, parent) = decode_node(&mut tree.strings, &row)?;
                tree.insert(node);
                parents.push(parent);
            }
        }
        for (slot, parent) in parents.into_iter().enumerate() {
            if let Some(parent) = parent {
                let id = tree.nodes[slot].id;
                let parent = tree.index.get(&parent).copied().ok_or_else(|| {
                    malformed(&id.to_string(), "its parent is not in the scope tree")
                })?;
                tree.nodes[slot].parent = parent;
            }
        }
        {
            let mut rows = sqlx::query(LOAD_KEY_VERSIONS).fetch(&mut **tx);
            let mut current: Option<(u32, Vec<KeyVer>)> = None;
            while let Some(row) = rows.try_next().await? {
                let scope: String = row.try_get("scope_id")?;
                let id = ScopeId::parse(&scope).map_err(|e| malformed(&scope, e.to_string()))?;
                let Some(slot) = tree.index.get(&id).copied() else {
                    continue;
                };
                let version: i64 = row.try_get("version")?;
                let retired: Option<i64> = row.try_get("retired_position")?;
                let key = KeyVer {
                    version: u32::try_from(version)
                        .map_err(|e| malformed(&scope, e.to_string()))?,
                    retired: retired.is_some(),
                    created_at: row.try_get("created_at")?,
                    fingerprint: Fingerprint::new(row.try_get("fingerprint")?),
                };
                match &mut current {
                    Some((at, versions)) if *at == slot => versions.push(key),
                    _ => {
                        if let Some((at, versions)) = current.take() {
                            tree.nodes[at as usize].key_versions = versions.into_boxed_slice();
                        }
                        current = Some((slot, vec![key]));
                    }
                }
            }
            if let Some((at, versions)) = current.take() {
                tree.nodes[at as usize].key_versions = versions.into_boxed_slice();
            }
        }
        {
            let mut rows = sqlx::query(LOAD_GRANTS).fetch(&mut **tx);
            while let Some(row) = rows.try_next().await? {
                let org: String = row.try_get("org_id")?;
                let org_id = ScopeId::parse(&org).map_err(|e| malformed(&org, e.to_string()))?;
                let scope: String = row.try_get("scope_id")?;
                let scope_id = if scope.is_empty() {
                    None
                } else {
                    Some(ScopeId::parse(&scope).map_err(|e| malformed(&org, e.to_string()))?)
                };
                let permission: String = row.try_get("permission")?;
                let granted_by: String = row.try_get("granted_by")?;
                let principal: String = row.try_get("principal")?;
                let grant = GrantRow {
                    principal: principal.into_boxed_str(),
                    permission: tree.strings.intern(&permission),
                    scope_id,
                    granted_position: row.try_get("granted_position")?,
                    granted_at: row.try_get("granted_at")?,
                    granted_by: tree.strings.intern(&granted_by),
                    expires_at: row.try_get("expires_at")?,
                };
                tree.grants.entry(org_id).or_default().push(grant);
            }
        }
        Ok::<_, ProjectionError>((tree, checkpoint.unwrap_or(0)))
    }};
}

pub(super) async fn read_rows(db: &Db) -> Result<(Tree, i64), ProjectionError> {
    match db {
        Db::Sqlite(db) => {
            // One read transaction: SQLite (WAL) reads every statement from one snapshot.
            let mut tx = db.read.begin().await?;
            let out = read_rows_in!(tx)?;
            tx.rollback().await?;
            Ok(out)
        }
        Db::Postgres(db) => {
            let mut tx = db.pool.begin().await?;
            sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
                .execute(&mut *tx)
                .await?;
            let out = read_rows_in!(tx)?;
            tx.rollback().await?;
            Ok(out)
        }
    }
}

fn decode_node<R>(
    strings: &mut Interner,
    row: &R,
) -> Result<(Node, Option<ScopeId>), ProjectionError>
where
    R: Row,
    for<'a> &'a str: sqlx::ColumnIndex<R>,
    for<'a> String: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
    for<'a> i64: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
{
    let id: String = row.try_get("id")?;
    let parse = |text: &str| ScopeId::parse(text).map_err(|e| malformed(&id, e.to_string()));
    let bad = |e: ekm_domain::ValueError| malformed(&id, e.to_string());
    let parent: Option<String> = row.try_get("parent_id")?;
    let kind: String = row.try_get("kind")?;
    let own_state: String = row.try_get("own_state")?;
    let plan: Option<String> = row.try_get("plan")?;
    let tier: Option<String> = row.try_get("tier")?;
    let state_event: Option<String> = row.try_get("state_event")?;
    let state_change = match state_event {
        Some(event) => Some(Change {
            event: strings.intern(&event),
            position: row
                .try_get::<Option<i64>, _>("state_position")?
                .unwrap_or(0),
            at: row.try_get::<Option<i64>, _>("state_at")?.unwrap_or(0),
            actor: strings.intern(
                &row.try_get::<Option<String>, _>("state_actor")?
                    .unwrap_or_default(),
            ),
            reason: row
                .try_get::<Option<String>, _>("state_reason")?
                .map(String::into_boxed_str),
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
        Some("unavailable") => Some(KeyHealth::Unavailable),
        Some(_) => Some(KeyHealth::Available),
        None => None,
    };
    let is_org = parent.is_none();
    let org = is_org.then(|| -> Result<OrgFields, ProjectionError> {
        Ok(OrgFields {
            plan: plan.as_deref().map(str::parse).transpose().map_err(bad)?,
            tier: tier.as_deref().map(str::parse).transpose().map_err(bad)?,
            master_key,
            master_health,
            master_reason: row
                .try_get::<Option<String>, _>("master_reason")?
                .map(String::into_boxed_str),
            master_detail: row
                .try_get::<Option<String>, _>("master_detail")?
                .map(String::into_boxed_str),
            master_position: row.try_get("master_position")?,
            master_at: row.try_get("master_at")?,
            revoke_window: row
                .try_get::<Option<String>, _>("revoke_window")?
                .map(String::into_boxed_str),
            rate_limits: crate::queries::rate_limits(&id, row.try_get("rate_limits")?)?,
        })
    });
    let org = org.transpose()?;
    let rekey_state: Option<String> = row.try_get("rekey_state")?;
    let rekey_done_position: Option<i64> = row.try_get("rekey_done_position")?;
    let justification: Option<JustificationPolicy> = row
        .try_get::<Option<String>, _>("justification_policy")?
        .map(|text| serde_json::from_str(&text))
        .transpose()
        .map_err(|e| malformed(&id, e.to_string()))?;
    let min_decryption = u32::try_from(row.try_get::<i64, _>("min_decryption_version")?)
        .map_err(|e| malformed(&id, e.to_string()))?;
    let min_decryption = (min_decryption != 1).then_some(min_decryption);
    let revoke_due_at: Option<Box<str>> = row
        .try_get::<Option<String>, _>("revoke_due_at")?
        .map(String::into_boxed_str);
    let rotation = row
        .try_get::<Option<String>, _>("rotation_period")?
        .map(|text| super::rotation(&text));
    let rare = (state_change.is_some()
        || rekey_done_position.is_some()
        || org.is_some()
        || justification.is_some()
        || min_decryption.is_some()
        || revoke_due_at.is_some()
        || rotation.is_some())
    .then(|| {
        Box::new(Rare {
            state_change,
            rekey_done_position,
            org,
            justification,
            min_decryption,
            revoke_due_at,
            rotation,
        })
    });
    let version: i64 = row.try_get("version")?;
    let key_version: i64 = row.try_get("key_version")?;
    let node = Node {
        id: parse(&id)?,
        parent: ROOT,
        kind: kind.parse().map_err(bad)?,
        own_state: own_state.parse().map_err(bad)?,
        rekey: Rekey::parse(rekey_state.as_deref()),
        key_version: u32::try_from(key_version).map_err(|e| malformed(&id, e.to_string()))?,
        version,
        created_at: row.try_get("created_at")?,
        updated_position: row.try_get("updated_position")?,
        name: row.try_get::<String, _>("name")?.into_boxed_str(),
        rare,
        key_versions: Box::new([]),
    };
    Ok((node, parent.as_deref().map(parse).transpose()?))
}
