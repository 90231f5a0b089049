//! The scope tree read model: one row per scope (own state, the event that set it, key
//! version) and one row per key version. Effective state is derived when read.

use ekm_domain::{Grant, JustificationPolicy, OwnState, ScopeEvent};
use ekm_store::time::to_micros;
use ekm_store::StoredEvent;

use crate::error::ProjectionError;
use crate::runner::{Projection, ProjectionState};
use crate::sql::{Param, Statement};

pub struct ScopeTree;

const SCOPE_COLUMNS: &[&str] = &[
    "id",
    "org_id",
    "parent_id",
    "kind",
    "name",
    "path",
    "depth",
    "own_state",
    "plan",
    "tier",
    "key_version",
    "version",
    "created_at",
    "created_position",
    "updated_position",
    // Set by later events only; named here (as NULL) so that the runner folds such an update
    // into the insert when both fall in one batch, instead of updating a row it just wrote.
    "state_event",
    "state_position",
    "state_at",
    "state_actor",
    "state_reason",
    "master_key",
    "master_health",
    "master_reason",
    "master_detail",
    "master_position",
    "master_at",
];

const KEY_VERSION_COLUMNS: &[&str] = &[
    "scope_id",
    "version",
    "created_at",
    "created_position",
    "fingerprint",
];

const STATE_COLUMNS: &[&str] = &[
    "own_state",
    "version",
    "updated_position",
    "state_event",
    "state_position",
    "state_at",
    "state_actor",
    "state_reason",
];

const KEY_COLUMNS: &[&str] = &["key_version", "version", "updated_position"];

/// What every event of a scope moves, even one that changes nothing else in the row (a
/// grant, a token, a re-key step): the version is the aggregate's sequence, the ETag that
/// If-Match compares with it.
const VERSION_COLUMNS: &[&str] = &["version", "updated_position"];

/// Forgets the scope's actions of `kind` scheduled before this event (fired, cancelled,
/// replaced, or moot). Bounded by position because a batch's raw statements run after its
/// inserts (the merging contract): a schedule made by this very event stays.
fn unschedule(stored: &StoredEvent, kind: &str) -> Statement {
    Statement::Raw {
        sql: "DELETE FROM schedule WHERE scope_id = $1 AND kind = $2 AND scheduled_position < $3",
        params: vec![
            Param::Text(stored.aggregate_id.clone()),
            Param::Text(kind.to_owned()),
            Param::Int(stored.position),
        ],
    }
}

/// Forgets every action scheduled in the subtree of the event's scope, whenever it was
/// scheduled (the revoked subtree can never act again).
fn unschedule_subtree(stored: &StoredEvent) -> Result<Option<Statement>, ProjectionError> {
    Ok(stored
        .event_metadata()?
        .location
        .map(|location| Statement::Raw {
            sql: "DELETE FROM schedule WHERE org_id = $1 \
                  AND scope_id IN (SELECT id FROM scope_view WHERE org_id = $1 \
                   AND (path = $2 OR path LIKE $3))",
            params: vec![
                Param::Text(location.org_id.clone()),
                Param::Text(location.scope_path.clone()),
                Param::Text(format!("{}/%", location.scope_path)),
            ],
        }))
}

const SCHEDULE_COLUMNS: &[&str] = &[
    "scope_id",
    "kind",
    "org_id",
    "due_at",
    "at",
    "scheduled_position",
    "subject",
];

/// The kind of a pending revocation's scheduled revoke.
pub const REVOKE: &str = "revoke";

/// A pending revocation's due time on the scope's row (`None`: nothing pending).
fn revoke_due_at(stored: &StoredEvent, due_at: Option<String>) -> Statement {
    Statement::Update {
        table: "scope_view",
        key_column: "id",
        key: Param::Text(stored.aggregate_id.clone()),
        columns: &["revoke_due_at"],
        values: vec![Param::OptText(due_at)],
    }
}

/// The kind of a grant's scheduled expiry; its subject is the grant.
pub const GRANT_EXPIRY: &str = "grant_expiry";

/// A grant's recorded expiry in microseconds since the epoch, `None` when it cannot be read
/// (a row written around the aggregate: callers count the grant as expired, fail closed).
/// The one reading `grants_view`, the memory tree and `ekm audit verify` share.
pub(crate) fn grant_expiry_micros(at: &str) -> Option<i64> {
    chrono::DateTime::parse_from_rfc3339(at)
        .ok()
        .map(|due| to_micros(due.with_timezone(&chrono::Utc)))
}

/// A grant as the schedule names it: its canonical JSON.
pub fn grant_subject(grant: &Grant) -> String {
    serde_json::to_string(grant).unwrap_or_default()
}

/// Forgets the expiry scheduled for one grant before this event (replaced, removed, fired).
fn unschedule_grant(stored: &StoredEvent, subject: &str) -> Statement {
    Statement::Raw {
        sql: "DELETE FROM schedule WHERE scope_id = $1 AND kind = $2 AND subject = $3 \
              AND scheduled_position < $4",
        params: vec![
            Param::Text(stored.aggregate_id.clone()),
            Param::Text(GRANT_EXPIRY.to_owned()),
            Param::Text(subject.to_owned()),
            Param::Int(stored.position),
        ],
    }
}

/// Deletes the organization's rows of `grant` made before this event.
fn delete_grant(stored: &StoredEvent, grant: &Grant) -> Statement {
    Statement::Raw {
        sql: "DELETE FROM grants_view WHERE org_id = $1 AND principal = $2 \
              AND permission = $3 AND scope_id = $4 AND granted_position < $5",
        params: vec![
            Param::Text(stored.aggregate_id.clone()),
            Param::Text(grant.principal.as_str().to_owned()),
            Param::Text(grant.permission.as_str().to_owned()),
            Param::Text(grant.scope.map(|s| s.to_string()).unwrap_or_default()),
            Param::Int(stored.position),
        ],
    }
}

fn version_moved(stored: &StoredEvent) -> Statement {
    Statement::Update {
        table: "scope_view",
        key_column: "id",
        key: Param::Text(stored.aggregate_id.clone()),
        columns: VERSION_COLUMNS,
        values: vec![Param::Int(stored.sequence), Param::Int(stored.position)],
    }
}

#[allow(clippy::too_many_arguments)]
fn scope_row(
    stored: &StoredEvent,
    org_id: String,
    parent_id: Option<String>,
    kind: &str,
    name: &str,
    path: String,
    depth: i64,
    plan: Option<String>,
    tier: Option<String>,
    key_version: u32,
) -> Statement {
    Statement::Insert {
        table: "scope_view",
        columns: SCOPE_COLUMNS,
        values: vec![
            Param::Text(stored.aggregate_id.clone()),
            Param::Text(org_id),
            Param::OptText(parent_id),
            Param::Text(kind.to_owned()),
            Param::Text(name.to_owned()),
            Param::Text(path),
            Param::Int(depth),
            Param::Text(OwnState::Active.as_str().to_owned()),
            Param::OptText(plan),
            Param::OptText(tier),
            Param::Int(i64::from(key_version)),
            Param::Int(stored.sequence),
            Param::Int(to_micros(stored.recorded_at)),
            Param::Int(stored.position),
            Param::Int(stored.position),
            Param::OptText(None),
            Param::OptInt(None),
            Param::OptInt(None),
            Param::OptText(None),
            Param::OptText(None),
            Param::OptText(None),
            Param::OptText(None),
            Param::OptText(None),
            Param::OptText(None),
            Param::OptInt(None),
            Param::OptInt(None),
        ],
    }
}

fn key_version_row(stored: &StoredEvent, version: u32, fingerprint: Option<String>) -> Statement {
    Statement::Insert {
        table: "key_version_view",
        columns: KEY_VERSION_COLUMNS,
        values: vec![
            Param::Text(stored.aggregate_id.clone()),
            Param::Int(i64::from(version)),
            Param::Int(to_micros(stored.recorded_at)),
            Param::Int(stored.position),
            Param::OptText(fingerprint),
        ],
    }
}

const GRANT_COLUMNS: &[&str] = &[
    "org_id",
    "principal",
    "permission",
    "scope_id",
    "granted_position",
    "granted_at",
    "granted_by",
    "expires_at",
];

const MASTER_KEY_COLUMNS: &[&str] = &[
    "tier",
    "master_key",
    "master_health",
    "master_reason",
    "master_detail",
    "master_position",
    "master_at",
    "version",
    "updated_position",
];

const MASTER_HEALTH_COLUMNS: &[&str] = &[
    "master_health",
    "master_reason",
    "master_detail",
    "master_position",
    "master_at",
    "version",
    "updated_position",
];

/// Applies the re-wrapped organization key versions staged for the master key an event
/// switched to: their new wrapping replaces (and so destroys) the old one.
const APPLY_REWRAPS: &str = "UPDATE key_material SET \
    wrapped = (SELECT r.wrapped FROM master_key_rewraps r WHERE r.scope_id = key_material.scope_id \
        AND r.version = key_material.version AND r.fingerprint = key_material.fingerprint AND r.target = $2), \
    master_fingerprint = (SELECT r.wrapped_by FROM master_key_rewraps r WHERE r.scope_id = key_material.scope_id \
        AND r.version = key_material.version AND r.fingerprint = key_material.fingerprint AND r.target = $2) \
    WHERE scope_id = $1 AND parent_id IS NULL AND EXISTS (SELECT 1 FROM master_key_rewraps r \
        WHERE r.scope_id = key_material.scope_id AND r.version = key_material.version \
        AND r.fingerprint = key_material.fingerprint AND r.target = $2)";

/// Applies staged re-wraps of the organization's wrapping-key epochs (staged with the
/// fingerprint prefixed `wrap:` and the epoch as version).
const APPLY_WRAPPING_REWRAPS: &str = "UPDATE wrapping_keys SET \
    wrapped = (SELECT r.wrapped FROM master_key_rewraps r WHERE r.scope_id = wrapping_keys.scope_id \
        AND r.version = wrapping_keys.epoch AND r.fingerprint = 'wrap:' || wrapping_keys.fingerprint AND r.target = $2), \
    master_fingerprint = (SELECT r.wrapped_by FROM master_key_rewraps r WHERE r.scope_id = wrapping_keys.scope_id \
        AND r.version = wrapping_keys.epoch AND r.fingerprint = 'wrap:' || wrapping_keys.fingerprint AND r.target = $2) \
    WHERE scope_id = $1 AND parent_id IS NULL AND EXISTS (SELECT 1 FROM master_key_rewraps r \
        WHERE r.scope_id = wrapping_keys.scope_id AND r.version = wrapping_keys.epoch \
        AND r.fingerprint = 'wrap:' || wrapping_keys.fingerprint AND r.target = $2)";

/// Deletes the key material of a revoked scope and of everything below it (wrapping keys,
/// key versions, staged re-wraps), found through the scope tree: `$1` the organization,
/// `$2` the revoked scope's path, `$3` that path followed by `/%` (ids hold no wildcard).
/// A child created after the revoke (born revoked) is not in the tree yet: the re-key job
/// deletes the subtree again once it has finished.
const SHRED_SUBTREE: [&str; 3] = [
    "DELETE FROM key_material WHERE scope_id IN (SELECT id FROM scope_view \
        WHERE org_id = $1 AND (path = $2 OR path LIKE $3))",
    "DELETE FROM wrapping_keys WHERE scope_id IN (SELECT id FROM scope_view \
        WHERE org_id = $1 AND (path = $2 OR path LIKE $3))",
    "DELETE FROM master_key_rewraps WHERE scope_id IN (SELECT id FROM scope_view \
        WHERE org_id = $1 AND (path = $2 OR path LIKE $3))",
];

const REKEY_COLUMNS: &[&str] = &[
    "rekey_state",
    "rekey_done_position",
    "version",
    "updated_position",
];

/// How far a revoked scope's re-key has got (ADR 0013).
fn rekey_state(stored: &StoredEvent, state: &str, done_position: Option<i64>) -> Statement {
    Statement::Update {
        table: "scope_view",
        key_column: "id",
        key: Param::Text(stored.aggregate_id.clone()),
        columns: REKEY_COLUMNS,
        values: vec![
            Param::OptText(Some(state.to_owned())),
            Param::OptInt(done_position),
            Param::Int(stored.sequence),
            Param::Int(stored.position),
        ],
    }
}

fn state_change(stored: &StoredEvent, state: OwnState) -> Result<Statement, ProjectionError> {
    let metadata = stored.event_metadata()?;
    Ok(Statement::Update {
        table: "scope_view",
        key_column: "id",
        key: Param::Text(stored.aggregate_id.clone()),
        columns: STATE_COLUMNS,
        values: vec![
            Param::Text(state.as_str().to_owned()),
            Param::Int(stored.sequence),
            Param::Int(stored.position),
            Param::OptText(Some(stored.event_type.clone())),
            Param::OptInt(Some(stored.position)),
            Param::OptInt(Some(to_micros(stored.recorded_at))),
            Param::OptText(Some(metadata.actor.to_string())),
            Param::OptText(metadata.reason.map(|r| r.as_str().to_owned())),
        ],
    })
}

impl Projection for ScopeTree {
    fn name(&self) -> &'static str {
        "scope_tree"
    }

    fn tables(&self) -> &'static [&'static str] {
        &["scope_view", "key_version_view", "grants_view", "schedule"]
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
        Ok(match event {
            ScopeEvent::OrganizationCreated {
                org_id,
                name,
                plan,
                tier,
                key_version,
                key_fingerprint,
                ..
            } => vec![
                scope_row(
                    stored,
                    org_id.to_string(),
                    None,
                    "organization",
                    name.as_str(),
                    stored.aggregate_id.clone(),
                    0,
                    Some(plan.as_str().into()),
                    Some(tier.as_str().into()),
                    key_version.get(),
                ),
                key_version_row(stored, key_version.get(), key_fingerprint),
            ],
            ScopeEvent::ScopeCreated {
                kind,
                name,
                parent_id,
                org_id,
                path,
                key_version,
                key_fingerprint,
                ..
            } => {
                let depth = i64::try_from(path.len().saturating_sub(1)).unwrap_or(i64::MAX);
                let path = path
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join("/");
                vec![
                    scope_row(
                        stored,
                        org_id.to_string(),
                        Some(parent_id.to_string()),
                        kind.as_str(),
                        name.as_str(),
                        path,
                        depth,
                        None,
                        None,
                        key_version.get(),
                    ),
                    key_version_row(stored, key_version.get(), key_fingerprint),
                ]
            }
            ScopeEvent::ScopeKeyVersionsRetired { below } => vec![
                Statement::Update {
                    table: "scope_view",
                    key_column: "id",
                    key: Param::Text(stored.aggregate_id.clone()),
                    columns: &["version", "updated_position"],
                    values: vec![Param::Int(stored.sequence), Param::Int(stored.position)],
                },
                Statement::Raw {
                    sql: "UPDATE key_version_view SET retired_position = $3 \
                          WHERE scope_id = $1 AND version < $2 AND retired_position IS NULL",
                    params: vec![
                        Param::Text(stored.aggregate_id.clone()),
                        Param::Int(i64::from(below.get())),
                        Param::Int(stored.position),
                    ],
                },
            ],
            ScopeEvent::OrganizationTierChanged { to, .. } => vec![Statement::Update {
                table: "scope_view",
                key_column: "id",
                key: Param::Text(stored.aggregate_id.clone()),
                columns: &["tier", "version", "updated_position"],
                values: vec![
                    Param::OptText(Some(to.as_str().to_owned())),
                    Param::Int(stored.sequence),
                    Param::Int(stored.position),
                ],
            }],
            ScopeEvent::OrganizationPlanChanged { to, .. } => vec![Statement::Update {
                table: "scope_view",
                key_column: "id",
                key: Param::Text(stored.aggregate_id.clone()),
                columns: &["plan", "version", "updated_position"],
                values: vec![
                    Param::OptText(Some(to.as_str().to_owned())),
                    Param::Int(stored.sequence),
                    Param::Int(stored.position),
                ],
            }],
            ScopeEvent::OrganizationMasterKeyChanged { to, tier_to, .. } => {
                let master = to
                    .as_ref()
                    .map(serde_json::to_string)
                    .transpose()
                    .map_err(|e| ProjectionError::MalformedRow {
                        id: stored.aggregate_id.clone(),
                        problem: e.to_string(),
                    })?;
                let health = to.as_ref().map(|_| "available".to_owned());
                vec![Statement::Update {
                    table: "scope_view",
                    key_column: "id",
                    key: Param::Text(stored.aggregate_id.clone()),
                    columns: MASTER_KEY_COLUMNS,
                    values: vec![
                        Param::OptText(Some(tier_to.as_str().to_owned())),
                        Param::OptText(master),
                        Param::OptText(health),
                        Param::OptText(None),
                        Param::OptText(None),
                        Param::OptInt(Some(stored.position)),
                        Param::OptInt(Some(to_micros(stored.recorded_at))),
                        Param::Int(stored.sequence),
                        Param::Int(stored.position),
                    ],
                }]
            }
            ScopeEvent::OrganizationMasterKeyHealthChanged {
                health,
                reason,
                detail,
            } => vec![Statement::Update {
                table: "scope_view",
                key_column: "id",
                key: Param::Text(stored.aggregate_id.clone()),
                columns: MASTER_HEALTH_COLUMNS,
                values: vec![
                    Param::OptText(Some(health.as_str().to_owned())),
                    Param::OptText(reason.map(|r| r.as_str().to_owned())),
                    Param::OptText(Some(detail)),
                    Param::OptInt(Some(stored.position)),
                    Param::OptInt(Some(to_micros(stored.recorded_at))),
                    Param::Int(stored.sequence),
                    Param::Int(stored.position),
                ],
            }],
            ScopeEvent::PermissionGranted {
                principal,
                permission,
                scope_id,
                expires_at,
            } => {
                let metadata = stored.event_metadata()?;
                let grant = Grant {
                    principal,
                    permission,
                    scope: scope_id,
                };
                let subject = grant_subject(&grant);
                // The aggregate accepts only RFC 3339 instants, so a time that cannot be read
                // is a tampered or foreign row: the grant then counts as expired already
                // (fail closed), and nothing is scheduled.
                let due = expires_at.as_deref().map(|at| {
                    grant_expiry_micros(at).ok_or_else(|| {
                        tracing::warn!(org = %stored.aggregate_id, position = stored.position, at, "a grant whose expiry cannot be read counts as expired");
                    })
                });
                let mut statements = vec![
                    Statement::Insert {
                        table: "grants_view",
                        columns: GRANT_COLUMNS,
                        values: vec![
                            Param::Text(stored.aggregate_id.clone()),
                            Param::Text(grant.principal.as_str().to_owned()),
                            Param::Text(grant.permission.as_str().to_owned()),
                            Param::Text(grant.scope.map(|s| s.to_string()).unwrap_or_default()),
                            Param::Int(stored.position),
                            Param::Int(to_micros(stored.recorded_at)),
                            Param::Text(metadata.actor.to_string()),
                            Param::OptInt(due.map(|due| due.unwrap_or(0))),
                        ],
                    },
                    // Granted again (another expiry, or none): this row replaces the older.
                    delete_grant(stored, &grant),
                    unschedule_grant(stored, &subject),
                ];
                if let (Some(Ok(due)), Some(at)) = (due, expires_at) {
                    statements.push(Statement::Insert {
                        table: "schedule",
                        columns: SCHEDULE_COLUMNS,
                        values: vec![
                            Param::Text(stored.aggregate_id.clone()),
                            Param::Text(GRANT_EXPIRY.to_owned()),
                            Param::Text(stored.aggregate_id.clone()),
                            Param::Int(due),
                            Param::Text(at),
                            Param::Int(stored.position),
                            Param::Text(subject),
                        ],
                    });
                }
                statements.push(version_moved(stored));
                statements
            }
            ScopeEvent::PermissionRevoked {
                principal,
                permission,
                scope_id,
            } => {
                let grant = Grant {
                    principal,
                    permission,
                    scope: scope_id,
                };
                vec![
                    delete_grant(stored, &grant),
                    unschedule_grant(stored, &grant_subject(&grant)),
                    version_moved(stored),
                ]
            }
            ScopeEvent::TokenIssued { .. } | ScopeEvent::TokenRevoked { .. } => {
                vec![version_moved(stored)]
            }
            ScopeEvent::ScopePaused {} => vec![state_change(stored, OwnState::Paused)?],
            ScopeEvent::ScopeResumed {} => vec![
                state_change(stored, OwnState::Active)?,
                unschedule(stored, "resume"),
            ],
            ScopeEvent::ScopeRevoked { .. } => {
                let mut statements = vec![
                    state_change(stored, OwnState::Revoked)?,
                    revoke_due_at(stored, None),
                    rekey_state(stored, "pending", None),
                    unschedule(stored, "resume"),
                    unschedule(stored, REVOKE),
                ];
                // Nothing scheduled in the revoked subtree can fire any more.
                statements.extend(unschedule_subtree(stored)?);
                statements
            }
            ScopeEvent::ScopeResumeScheduled { at } => {
                let mut statements = vec![unschedule(stored, "resume")];
                if let Some(at) = at {
                    // The aggregate accepts only RFC 3339 instants, so this is a tampered or
                    // foreign row. Failing closed here means leaving the scope paused: the
                    // schedule is skipped (and said so), the projection does not halt.
                    let Ok(due) = chrono::DateTime::parse_from_rfc3339(&at) else {
                        tracing::warn!(scope = %stored.aggregate_id, position = stored.position, at, "a scheduled resume whose time cannot be read is skipped; the scope stays paused");
                        statements.push(version_moved(stored));
                        return Ok(statements);
                    };
                    let org_id = stored
                        .event_metadata()?
                        .location
                        .map(|l| l.org_id)
                        .unwrap_or_default();
                    statements.push(Statement::Insert {
                        table: "schedule",
                        columns: SCHEDULE_COLUMNS,
                        values: vec![
                            Param::Text(stored.aggregate_id.clone()),
                            Param::Text("resume".to_owned()),
                            Param::Text(org_id),
                            Param::Int(to_micros(due.with_timezone(&chrono::Utc))),
                            Param::Text(at),
                            Param::Int(stored.position),
                            Param::Text(String::new()),
                        ],
                    });
                }
                statements.push(version_moved(stored));
                statements
            }
            ScopeEvent::ScopeRevocationScheduled { due_at, .. } => {
                let mut statements = vec![
                    state_change(stored, OwnState::PendingRevocation)?,
                    revoke_due_at(stored, Some(due_at.clone())),
                    unschedule(stored, REVOKE),
                ];
                // As for a scheduled resume: an instant the aggregate would not have accepted
                // is a tampered row. The scope stays pending (refused, fail closed) and the
                // schedule is skipped, said so; cancelling or revoking immediately still works.
                match chrono::DateTime::parse_from_rfc3339(&due_at) {
                    Ok(due) => statements.push(Statement::Insert {
                        table: "schedule",
                        columns: SCHEDULE_COLUMNS,
                        values: vec![
                            Param::Text(stored.aggregate_id.clone()),
                            Param::Text(REVOKE.to_owned()),
                            Param::Text(
                                stored
                                    .event_metadata()?
                                    .location
                                    .map(|l| l.org_id)
                                    .unwrap_or_default(),
                            ),
                            Param::Int(to_micros(due.with_timezone(&chrono::Utc))),
                            Param::Text(due_at),
                            Param::Int(stored.position),
                            Param::Text(String::new()),
                        ],
                    }),
                    Err(_) => {
                        tracing::warn!(scope = %stored.aggregate_id, position = stored.position, due_at, "a pending revocation whose due time cannot be read is not scheduled; the scope stays pending");
                    }
                }
                statements
            }
            ScopeEvent::ScopeRevocationCancelled { to } => vec![
                state_change(stored, to)?,
                revoke_due_at(stored, None),
                unschedule(stored, REVOKE),
            ],
            ScopeEvent::ScopeRotationPeriodSet { period } => vec![
                Statement::Update {
                    table: "scope_view",
                    key_column: "id",
                    key: Param::Text(stored.aggregate_id.clone()),
                    columns: &["rotation_period"],
                    values: vec![Param::OptText(period)],
                },
                version_moved(stored),
            ],
            ScopeEvent::OrganizationPolicySet { revoke_window } => vec![
                Statement::Update {
                    table: "scope_view",
                    key_column: "id",
                    key: Param::Text(stored.aggregate_id.clone()),
                    columns: &["revoke_window"],
                    values: vec![Param::OptText(revoke_window)],
                },
                version_moved(stored),
            ],
            ScopeEvent::OrganizationRateLimitsSet { limits } => vec![
                Statement::Update {
                    table: "scope_view",
                    key_column: "id",
                    key: Param::Text(stored.aggregate_id.clone()),
                    columns: &["rate_limits"],
                    values: vec![Param::OptText(
                        (!limits.is_default())
                            .then(|| serde_json::to_string(&limits).unwrap_or_default()),
                    )],
                },
                version_moved(stored),
            ],
            ScopeEvent::RevocationRekeyStarted { .. } => vec![rekey_state(stored, "running", None)],
            ScopeEvent::RevocationRekeyProgressed { .. } => vec![version_moved(stored)],
            ScopeEvent::RevocationRekeyCompleted { .. } => {
                // Sweep again: an action scheduled in the subtree by a command that raced the
                // revoke (committed after it) would otherwise wait in the schedule for ever.
                let mut statements = vec![rekey_state(stored, "done", Some(stored.position))];
                statements.extend(unschedule_subtree(stored)?);
                statements
            }
            ScopeEvent::ScopeMinDecryptionVersionSet { version } => vec![Statement::Update {
                table: "scope_view",
                key_column: "id",
                key: Param::Text(stored.aggregate_id.clone()),
                columns: &["min_decryption_version", "version", "updated_position"],
                values: vec![
                    Param::Int(i64::from(version.get())),
                    Param::Int(stored.sequence),
                    Param::Int(stored.position),
                ],
            }],
            ScopeEvent::ScopeJustificationPolicySet { required, allowed } => {
                let policy = JustificationPolicy { required, allowed };
                let text = if policy.is_empty() {
                    None
                } else {
                    Some(serde_json::to_string(&policy).map_err(|e| {
                        ProjectionError::MalformedRow {
                            id: stored.aggregate_id.clone(),
                            problem: e.to_string(),
                        }
                    })?)
                };
                vec![Statement::Update {
                    table: "scope_view",
                    key_column: "id",
                    key: Param::Text(stored.aggregate_id.clone()),
                    columns: &["justification_policy", "version", "updated_position"],
                    values: vec![
                        Param::OptText(text),
                        Param::Int(stored.sequence),
                        Param::Int(stored.position),
                    ],
                }]
            }
            ScopeEvent::ScopeKeyRotated {
                key_version,
                key_fingerprint,
            } => vec![
                Statement::Update {
                    table: "scope_view",
                    key_column: "id",
                    key: Param::Text(stored.aggregate_id.clone()),
                    columns: KEY_COLUMNS,
                    values: vec![
                        Param::Int(i64::from(key_version.get())),
                        Param::Int(stored.sequence),
                        Param::Int(stored.position),
                    ],
                },
                key_version_row(stored, key_version.get(), key_fingerprint),
            ],
        })
    }
}

/// Shreds a revoked scope's key material, in the same transaction as the runner's
/// checkpoint: once the revoke is applied (before the command is answered, and on restart
/// after a crash), the scope's wrapped keys are gone, and with them every key below it.
pub struct KeyShredder;

impl Projection for KeyShredder {
    fn name(&self) -> &'static str {
        "key_shredder"
    }

    /// It owns no read model: `key_material` is not derived from events and is never
    /// emptied by a rebuild.
    fn tables(&self) -> &'static [&'static str] {
        &[]
    }

    fn rebuildable(&self) -> bool {
        false
    }

    fn statements(
        &self,
        stored: &StoredEvent,
        _state: &mut ProjectionState,
    ) -> Result<Vec<Statement>, ProjectionError> {
        if stored.aggregate_type != "scope" {
            return Ok(vec![]);
        }
        Ok(match stored.event_type.as_str() {
            "ScopeRevoked" => {
                let location = stored.event_metadata()?.location.ok_or_else(|| {
                    ProjectionError::MalformedRow {
                        id: stored.aggregate_id.clone(),
                        problem: "a revoke without its scope path".into(),
                    }
                })?;
                SHRED_SUBTREE
                    .iter()
                    .map(|sql| Statement::Raw {
                        sql,
                        params: vec![
                            Param::Text(location.org_id.clone()),
                            Param::Text(location.scope_path.clone()),
                            Param::Text(format!("{}/%", location.scope_path)),
                        ],
                    })
                    .collect()
            }
            "OrganizationMasterKeyChanged" => match stored.scope_event()? {
                ScopeEvent::OrganizationMasterKeyChanged { to, .. } => {
                    let target = to.map_or_else(|| "local".to_owned(), |k| k.wrapping_id());
                    vec![
                        Statement::Raw {
                            sql: APPLY_REWRAPS,
                            params: vec![
                                Param::Text(stored.aggregate_id.clone()),
                                Param::Text(target.clone()),
                            ],
                        },
                        Statement::Raw {
                            sql: APPLY_WRAPPING_REWRAPS,
                            params: vec![
                                Param::Text(stored.aggregate_id.clone()),
                                Param::Text(target),
                            ],
                        },
                        Statement::Raw {
                            sql: "DELETE FROM master_key_rewraps WHERE scope_id = $1",
                            params: vec![Param::Text(stored.aggregate_id.clone())],
                        },
                    ]
                }
                _ => vec![],
            },
            "ScopeKeyVersionsRetired" => match stored.scope_event()? {
                ScopeEvent::ScopeKeyVersionsRetired { below } => vec![Statement::Raw {
                    sql: "DELETE FROM key_material WHERE scope_id = $1 AND version < $2",
                    params: vec![
                        Param::Text(stored.aggregate_id.clone()),
                        Param::Int(i64::from(below.get())),
                    ],
                }],
                _ => vec![],
            },
            _ => vec![],
        })
    }
}
