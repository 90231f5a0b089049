//! The access tables checked against the events (ADR 0018). `tokens` and `grants_view` carry
//! no seals, yet they decide who may do what: someone who can write the database could add
//! a token row, revive a revoked one, raise a role or add a grant. Every row must follow
//! from the organization's (sealed) events.
//!
//! What cannot be checked here: a token's hash is not in its event, so a row whose
//! `token_hash` was replaced looks the same (docs/adr/0024).

use std::collections::{BTreeMap, HashMap};

use ekm_domain::ScopeEvent;
use ekm_store::time::to_micros;
use ekm_store::{Db, StoredEvent};
use serde::Serialize;

use crate::error::ProjectionError;

/// A row of `tokens` or `grants_view` that the events do not account for.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Mismatch {
    /// `tokens`, `grants_view` or `schedule`.
    pub table: &'static str,
    /// `token_without_event` (a working token nobody issued), `token_altered` (principal,
    /// kind, role or expiry differs from its issue), `token_revived` (working although its
    /// revocation is recorded), `grant_without_event`, `grant_altered` (a grant row that
    /// differs from its event) or `grant_missing` (a grant the events hold and the table
    /// lost); in `schedule`, `grant_expiry_missing` (a live grant whose expiry is not
    /// scheduled at its instant) or `grant_expiry_without_grant`, `revoke_missing` (a pending
    /// revocation whose revoke is not scheduled at its instant) or `revoke_without_pending`.
    pub problem: &'static str,
    /// The token's id, or the grant's position.
    pub id: String,
    /// The event the row disagrees with, if there is one.
    pub position: Option<i64>,
    pub detail: String,
}

/// What the events say about one token.
struct Issued {
    position: i64,
    principal: String,
    kind: String,
    role: String,
    expires_at: Option<i64>,
    revoked: Option<i64>,
}

/// One grant as `grants_view` holds it, keyed by the granting event's position.
#[derive(Debug, PartialEq, Eq)]
struct GrantRow {
    principal: String,
    permission: String,
    scope_id: String,
    granted_at: i64,
    granted_by: String,
    /// As the projection writes it: microseconds, 0 for a time that cannot be read.
    expires_at: Option<i64>,
}

/// id, principal, principal_kind, role, expires_at, revoked_at.
type TokenRow = (
    String,
    Option<String>,
    Option<String>,
    String,
    Option<i64>,
    Option<i64>,
);

/// granted_position, principal, permission, scope_id, granted_at, granted_by.
type GrantTuple = (i64, String, String, String, i64, String, Option<i64>);

/// How often the grants are read again when the runner moved while they were read.
const ATTEMPTS: usize = 10;

/// Checks `org`'s token rows and grant rows against its events.
pub async fn verify_access_tables(db: &Db, org: &str) -> Result<Vec<Mismatch>, ProjectionError> {
    // Rows first, events after: a token's event is committed before its row is written, and
    // its row revoked before its revocation is recorded, so rows read first never run ahead
    // of the events read after them.
    let tokens: Vec<TokenRow> = ekm_store::with_read_pool!(db, pool => {
        sqlx::query_as(
            "SELECT id, principal, principal_kind, role, expires_at, revoked_at \
             FROM tokens WHERE org_id = $1 ORDER BY id",
        )
        .bind(org)
        .fetch_all(pool)
        .await?
    });
    // grants_view follows the events through the runner: compare it with the events up to
    // the runner's checkpoint, read before and after the rows (equal: the rows are that
    // checkpoint's).
    let mut grants = None;
    for _ in 0..ATTEMPTS {
        let before = scope_tree_checkpoint(db).await?;
        let rows: Vec<GrantTuple> = ekm_store::with_read_pool!(db, pool => {
            sqlx::query_as(
                "SELECT granted_position, principal, permission, scope_id, granted_at, granted_by, \
                 expires_at FROM grants_view WHERE org_id = $1",
            )
            .bind(org)
            .fetch_all(pool)
            .await?
        });
        // The grants' scheduled expiries (the scheduler records a removal only from these).
        let expiries: Vec<(i64, i64)> = ekm_store::with_read_pool!(db, pool => {
            sqlx::query_as(
                "SELECT scheduled_position, due_at FROM schedule \
                 WHERE scope_id = $1 AND kind = 'grant_expiry'",
            )
            .bind(org)
            .fetch_all(pool)
            .await?
        });
        if scope_tree_checkpoint(db).await? == before {
            grants = Some((before, rows, expiries));
            break;
        }
    }
    let (checkpoint, grant_rows, expiry_rows) = grants.ok_or(ProjectionError::CheckpointsMoved)?;
    let events = db.events_of(org).await?;

    let mut mismatches = check_tokens(&tokens, &events)?;
    let expected = fold_grants(events.iter().filter(|e| e.position <= checkpoint))?;
    let actual: BTreeMap<i64, GrantRow> = grant_rows
        .into_iter()
        .map(
            |(position, principal, permission, scope_id, granted_at, granted_by, expires_at)| {
                let row = GrantRow {
                    principal,
                    permission,
                    scope_id,
                    granted_at,
                    granted_by,
                    expires_at,
                };
                (position, row)
            },
        )
        .collect();
    for (position, row) in &actual {
        match expected.get(position) {
            None => mismatches.push(Mismatch {
                table: "grants_view",
                problem: "grant_without_event",
                id: position.to_string(),
                position: None,
                detail: format!(
                    "{} holds {} on {} with no grant recorded at position {position}, or one revoked since",
                    row.principal,
                    row.permission,
                    if row.scope_id.is_empty() { "the organization" } else { &row.scope_id }
                ),
            }),
            Some(event) if event != row => mismatches.push(Mismatch {
                table: "grants_view",
                problem: "grant_altered",
                id: position.to_string(),
                position: Some(*position),
                detail: format!(
                    "the row says {} holds {}{}, the event granted {} to {}{}",
                    row.principal,
                    row.permission,
                    until(row.expires_at),
                    event.permission,
                    event.principal,
                    until(event.expires_at)
                ),
            }),
            Some(_) => {}
        }
    }
    // Every live grant with a readable expiry has its removal scheduled at that instant,
    // and nothing else is scheduled: a row deleted or moved in SQL would keep a grant listed
    // for ever (it counts as expired either way) or remove it early.
    let scheduled: BTreeMap<i64, i64> = expiry_rows.into_iter().collect();
    for (position, event) in &expected {
        let Some(due) = event.expires_at.filter(|due| *due != 0) else {
            continue;
        };
        match scheduled.get(position) {
            Some(at) if *at == due => {}
            found => mismatches.push(Mismatch {
                table: "schedule",
                problem: "grant_expiry_missing",
                id: position.to_string(),
                position: Some(*position),
                detail: format!(
                    "{} was granted {}{}, but {}",
                    event.principal,
                    event.permission,
                    until(Some(due)),
                    match found {
                        Some(_) => "its removal is scheduled at another time",
                        None => "its removal is not scheduled",
                    }
                ),
            }),
        }
    }
    for position in scheduled.keys() {
        if expected
            .get(position)
            .is_none_or(|event| event.expires_at.is_none_or(|due| due == 0))
        {
            mismatches.push(Mismatch {
                table: "schedule",
                problem: "grant_expiry_without_grant",
                id: position.to_string(),
                position: None,
                detail: format!(
                    "a grant's removal is scheduled for position {position}, which holds no live grant that expires"
                ),
            });
        }
    }
    for (position, event) in &expected {
        if !actual.contains_key(position) {
            mismatches.push(Mismatch {
                table: "grants_view",
                problem: "grant_missing",
                id: position.to_string(),
                position: Some(*position),
                detail: format!(
                    "{} was granted {} and never revoked, but the row is gone",
                    event.principal, event.permission
                ),
            });
        }
    }
    Ok(mismatches)
}

async fn scope_tree_checkpoint(db: &Db) -> Result<i64, ProjectionError> {
    let position: Option<i64> = ekm_store::with_read_pool!(db, pool => {
        sqlx::query_scalar("SELECT position FROM projection_checkpoints WHERE name = 'scope_tree'")
            .fetch_optional(pool)
            .await?
    });
    Ok(position.unwrap_or(0))
}

fn check_tokens(
    rows: &[TokenRow],
    events: &[StoredEvent],
) -> Result<Vec<Mismatch>, ProjectionError> {
    let mut issued: HashMap<String, Issued> = HashMap::new();
    for stored in events {
        match stored.scope_event()? {
            ScopeEvent::OrganizationCreated {
                admin_token_id: Some(id),
                ..
            } => {
                // The first admin token: what `App::create_org` stores with it.
                issued.insert(
                    id,
                    Issued {
                        position: stored.position,
                        principal: "admin".into(),
                        kind: "user".into(),
                        role: "org_admin".into(),
                        expires_at: None,
                        revoked: None,
                    },
                );
            }
            ScopeEvent::TokenIssued {
                token_id,
                principal,
                kind,
                role,
                expires_at,
            } => {
                let expires_at = match expires_at {
                    Some(text) => Some(
                        chrono::DateTime::parse_from_rfc3339(&text)
                            .map(|at| to_micros(at.to_utc()))
                            .map_err(|_| ProjectionError::MalformedRow {
                                id: token_id.clone(),
                                problem: "the recorded expiry is not RFC 3339".into(),
                            })?,
                    ),
                    None => None,
                };
                issued.insert(
                    token_id,
                    Issued {
                        position: stored.position,
                        principal: principal.as_str().to_owned(),
                        kind: kind.as_str().to_owned(),
                        role: role.as_str().to_owned(),
                        expires_at,
                        revoked: None,
                    },
                );
            }
            ScopeEvent::TokenRevoked { token_id } => {
                if let Some(token) = issued.get_mut(&token_id) {
                    token.revoked = Some(stored.position);
                }
            }
            _ => {}
        }
    }
    let mut mismatches = vec![];
    for (id, principal, kind, role, expires_at, revoked_at) in rows {
        let token = |problem, position, detail| Mismatch {
            table: "tokens",
            problem,
            id: id.clone(),
            position,
            detail,
        };
        let Some(event) = issued.get(id) else {
            // A revoked row without an event cannot authenticate: what a failed organization
            // creation leaves behind.
            if revoked_at.is_none() {
                mismatches.push(token(
                    "token_without_event",
                    None,
                    "a working token that no event issued".into(),
                ));
            }
            continue;
        };
        if let (Some(revoked), None) = (event.revoked, revoked_at) {
            mismatches.push(token(
                "token_revived",
                Some(revoked),
                "the token works although its revocation is recorded".into(),
            ));
            continue;
        }
        let row = (
            principal.as_deref().unwrap_or(id),
            kind.as_deref().unwrap_or("user"),
            role.as_str(),
        );
        // A row that expires earlier than its event says only restricts the token.
        let expiry_extended = match (event.expires_at, expires_at) {
            (Some(_), None) => true,
            (Some(recorded), Some(row)) => *row > recorded,
            _ => false,
        };
        if row
            != (
                event.principal.as_str(),
                event.kind.as_str(),
                event.role.as_str(),
            )
            || expiry_extended
        {
            mismatches.push(token(
                "token_altered",
                Some(event.position),
                format!(
                    "the row says {} {} with role {}, the event issued it to {} {} with role {}{}",
                    row.1,
                    row.0,
                    row.2,
                    event.kind,
                    event.principal,
                    event.role,
                    if expiry_extended {
                        " (and the row outlives its expiry)"
                    } else {
                        ""
                    }
                ),
            ));
        }
    }
    Ok(mismatches)
}

/// " until T" for a grant that expires.
fn until(expires_at: Option<i64>) -> String {
    expires_at
        .map(|at| {
            format!(
                " until {}",
                ekm_store::time::rfc3339(ekm_store::time::from_micros(at))
            )
        })
        .unwrap_or_default()
}

/// The grants the events leave, as the scope tree projection writes them.
fn fold_grants<'a>(
    events: impl Iterator<Item = &'a StoredEvent>,
) -> Result<BTreeMap<i64, GrantRow>, ProjectionError> {
    let mut grants: BTreeMap<i64, GrantRow> = BTreeMap::new();
    for stored in events {
        match stored.scope_event()? {
            ScopeEvent::PermissionGranted {
                principal,
                permission,
                scope_id,
                expires_at,
            } => {
                let metadata = stored.event_metadata()?;
                let scope_text = scope_id.map(|s| s.to_string()).unwrap_or_default();
                // Granted again: the new row replaces the older.
                grants.retain(|_, grant| {
                    !(grant.principal == principal.as_str()
                        && grant.permission == permission.as_str()
                        && grant.scope_id == scope_text)
                });
                let expires_at =
                    expires_at.map(|at| crate::scope_tree::grant_expiry_micros(&at).unwrap_or(0));
                grants.insert(
                    stored.position,
                    GrantRow {
                        principal: principal.as_str().to_owned(),
                        permission: permission.as_str().to_owned(),
                        scope_id: scope_text,
                        granted_at: to_micros(stored.recorded_at),
                        granted_by: metadata.actor.to_string(),
                        expires_at,
                    },
                );
            }
            ScopeEvent::PermissionRevoked {
                principal,
                permission,
                scope_id,
            } => {
                let scope_id = scope_id.map(|s| s.to_string()).unwrap_or_default();
                grants.retain(|position, grant| {
                    !(*position < stored.position
                        && grant.principal == principal.as_str()
                        && grant.permission == permission.as_str()
                        && grant.scope_id == scope_id)
                });
            }
            _ => {}
        }
    }
    Ok(grants)
}

/// What a pending revocation's events say, in log order: gathered while the chain is
/// verified (those events are sealed), checked against the `revoke` rows of `schedule`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RevocationStep {
    Scheduled {
        scope_id: String,
        scope_path: String,
        due_at: String,
    },
    Cancelled {
        scope_id: String,
    },
    Revoked {
        scope_path: String,
    },
}

/// Every pending revocation (by the organization's sealed events up to the scope tree's
/// checkpoint) has its revoke scheduled at its instant, and nothing else is scheduled: a
/// row deleted in SQL would leave the scope pending for ever (refused, never revoked), one
/// moved would revoke early or late, and one added is fired by nobody (the aggregate fires
/// only what is pending) but misleads the listing. `steps`: (position, step), in order.
pub async fn verify_revocation_schedule(
    db: &Db,
    org: &str,
    steps: &[(i64, RevocationStep)],
) -> Result<Vec<Mismatch>, ProjectionError> {
    let mut read = None;
    for _ in 0..ATTEMPTS {
        let before = scope_tree_checkpoint(db).await?;
        let rows: Vec<(String, i64)> = ekm_store::with_read_pool!(db, pool => {
            sqlx::query_as(
                "SELECT scope_id, due_at FROM schedule WHERE org_id = $1 AND kind = 'revoke'",
            )
            .bind(org)
            .fetch_all(pool)
            .await?
        });
        if scope_tree_checkpoint(db).await? == before {
            read = Some((before, rows));
            break;
        }
    }
    let (checkpoint, rows) = read.ok_or(ProjectionError::CheckpointsMoved)?;
    // scope id → (path, due_at as written, due_at in microseconds if readable)
    let mut pending: BTreeMap<String, (String, String, Option<i64>)> = BTreeMap::new();
    for (_, step) in steps.iter().filter(|(position, _)| *position <= checkpoint) {
        match step {
            RevocationStep::Scheduled {
                scope_id,
                scope_path,
                due_at,
            } => {
                let micros = crate::scope_tree::grant_expiry_micros(due_at);
                pending.insert(
                    scope_id.clone(),
                    (scope_path.clone(), due_at.clone(), micros),
                );
            }
            RevocationStep::Cancelled { scope_id } => {
                pending.remove(scope_id);
            }
            RevocationStep::Revoked { scope_path } => {
                let below = format!("{scope_path}/");
                pending.retain(|_, (path, _, _)| path != scope_path && !path.starts_with(&below));
            }
        }
    }
    let scheduled: BTreeMap<String, i64> = rows.into_iter().collect();
    let mut mismatches = vec![];
    for (scope, (_, due_at, micros)) in &pending {
        // A due time the aggregate would not have accepted is not scheduled (fail closed).
        let Some(micros) = micros else {
            continue;
        };
        match scheduled.get(scope) {
            Some(at) if at == micros => {}
            found => mismatches.push(Mismatch {
                table: "schedule",
                problem: "revoke_missing",
                id: scope.clone(),
                position: None,
                detail: format!(
                    "the scope's revocation is pending until {due_at}, but {}",
                    match found {
                        Some(_) => "its revoke is scheduled at another time",
                        None => "its revoke is not scheduled: it would stay pending for ever",
                    }
                ),
            }),
        }
    }
    for scope in scheduled.keys() {
        if !pending.contains_key(scope) {
            mismatches.push(Mismatch {
                table: "schedule",
                problem: "revoke_without_pending",
                id: scope.clone(),
                position: None,
                detail: "a revoke is scheduled for a scope whose revocation is not pending".into(),
            });
        }
    }
    Ok(mismatches)
}
