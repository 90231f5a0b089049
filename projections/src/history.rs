//! Time travel: a scope's own state, effective state and cause as of a past position or
//! instant, computed from the events of the scopes on its path (never from read models).

use chrono::{DateTime, Utc};
use cqrs_es::Aggregate;
use ekm_domain::{effective_state, Effective, Scope, ScopeEvent, ScopeId, ScopeState};
use ekm_store::{Db, StoredEvent};

use crate::error::ProjectionError;
use crate::queries::StateChange;

/// A point in the past.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AsOf {
    Position(i64),
    Time(DateTime<Utc>),
}

/// A scope as it was.
#[derive(Clone, Debug, PartialEq)]
pub struct PastScope {
    pub state: ScopeState,
    pub effective: Effective,
    /// The cause scope's state as it was, and the event that put it there.
    pub cause: Option<(ScopeState, Option<StateChange>)>,
    /// The last position taken into account.
    pub position: i64,
    /// The scope's version then (its number of events).
    pub version: i64,
    pub created_at: DateTime<Utc>,
    /// Key versions that existed then: when each was created, its fingerprint, and whether
    /// it was retired by then.
    pub key_versions: Vec<PastKeyVersion>,
    /// The organization as it was (plan, tier, master key and its health): the scope itself
    /// for an organization.
    pub org: ScopeState,
}

/// A key version as it was.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PastKeyVersion {
    pub version: u32,
    pub created_at: DateTime<Utc>,
    /// A public name of the key version (never the key), as its event recorded it.
    pub fingerprint: Option<String>,
    /// When it was retired, if it was by then.
    pub retired_at: Option<DateTime<Utc>>,
}

struct Folded {
    state: ScopeState,
    last_change: Option<StateChange>,
    version: i64,
    created_at: DateTime<Utc>,
    key_versions: Vec<PastKeyVersion>,
    master_change: Option<StateChange>,
}

fn fold(events: &[StoredEvent], upto: i64) -> Result<Option<Folded>, ProjectionError> {
    let mut scope = Scope::default();
    let mut last_change = None;
    let mut master_change = None;
    let mut version = 0;
    let mut created_at = DateTime::<Utc>::default();
    let mut key_versions = vec![];
    for stored in events.iter().filter(|e| e.position <= upto) {
        let event = stored.scope_event()?;
        match &event {
            ScopeEvent::OrganizationCreated {
                key_version,
                key_fingerprint,
                ..
            }
            | ScopeEvent::ScopeCreated {
                key_version,
                key_fingerprint,
                ..
            } => {
                created_at = stored.recorded_at;
                key_versions.push(PastKeyVersion {
                    version: key_version.get(),
                    created_at: stored.recorded_at,
                    fingerprint: key_fingerprint.clone(),
                    retired_at: None,
                });
            }
            ScopeEvent::ScopeKeyRotated {
                key_version,
                key_fingerprint,
            } => {
                key_versions.push(PastKeyVersion {
                    version: key_version.get(),
                    created_at: stored.recorded_at,
                    fingerprint: key_fingerprint.clone(),
                    retired_at: None,
                });
            }
            ScopeEvent::ScopeKeyVersionsRetired { below } => {
                for version in key_versions.iter_mut() {
                    if version.version < below.get() && version.retired_at.is_none() {
                        version.retired_at = Some(stored.recorded_at);
                    }
                }
            }
            _ => {}
        }
        if matches!(
            event,
            ScopeEvent::ScopePaused {}
                | ScopeEvent::ScopeResumed {}
                | ScopeEvent::ScopeRevoked { .. }
                | ScopeEvent::ScopeRevocationScheduled { .. }
                | ScopeEvent::ScopeRevocationCancelled { .. }
        ) {
            let metadata = stored.event_metadata()?;
            last_change = Some(StateChange {
                event: stored.event_type.clone(),
                position: stored.position,
                at: stored.recorded_at,
                actor: metadata.actor.to_string(),
                reason: metadata.reason.map(|r| r.as_str().to_owned()),
            });
        }
        if matches!(
            event,
            ScopeEvent::OrganizationMasterKeyHealthChanged { .. }
                | ScopeEvent::OrganizationMasterKeyChanged { .. }
        ) {
            let metadata = stored.event_metadata()?;
            let reason = match &event {
                ScopeEvent::OrganizationMasterKeyHealthChanged { reason, .. } => {
                    reason.map(|r| r.as_str().to_owned())
                }
                _ => None,
            };
            master_change = Some(StateChange {
                event: stored.event_type.clone(),
                position: stored.position,
                at: stored.recorded_at,
                actor: metadata.actor.to_string(),
                reason,
            });
        }
        scope.apply(event);
        version = stored.sequence;
    }
    Ok(scope.state().cloned().map(|state| Folded {
        state,
        last_change,
        master_change,
        version,
        created_at,
        key_versions,
    }))
}

/// The scope `id` as of `as_of`, or `None` if it did not exist yet (or never existed).
pub async fn scope_as_of(
    db: &Db,
    id: ScopeId,
    as_of: AsOf,
) -> Result<Option<PastScope>, ProjectionError> {
    let upto = match as_of {
        AsOf::Position(position) => position,
        AsOf::Time(at) => db.position_at(at).await?,
    };
    let own_events = db.events_of(&id.to_string()).await?;
    let Some(own) = fold(&own_events, upto)? else {
        return Ok(None);
    };
    let mut on_path = Vec::with_capacity(own.state.path.len());
    for ancestor in &own.state.path[..own.state.path.len().saturating_sub(1)] {
        let events = db.events_of(&ancestor.to_string()).await?;
        match fold(&events, upto)? {
            Some(folded) => on_path.push(folded),
            None => {
                return Err(ProjectionError::MalformedRow {
                    id: ancestor.to_string(),
                    problem: "an ancestor has no events before its descendant".into(),
                })
            }
        }
    }
    let org = on_path.first().unwrap_or(&own);
    let org_state = org.state.clone();
    let effective = effective_state(
        on_path
            .iter()
            .map(|f| (f.state.id, f.state.own_state))
            .chain([(own.state.id, own.state.own_state)]),
    )
    .with_master_key(org.state.id, org.state.master_health);
    let cause = effective.cause().and_then(|by| {
        on_path
            .iter()
            .chain([&own])
            .find(|f| f.state.id == by)
            .map(|f| {
                let change = match effective {
                    Effective::Unavailable { .. } => f.master_change.clone(),
                    _ => f.last_change.clone(),
                };
                (f.state.clone(), change)
            })
    });
    Ok(Some(PastScope {
        state: own.state,
        effective,
        cause,
        position: upto,
        version: own.version,
        created_at: own.created_at,
        key_versions: own.key_versions,
        org: org_state,
    }))
}
