//! The scope tree read model: one row per scope (own state, the event that set it, key
//! version) and one row per key version. Effective state is derived when read.

use ekm_domain::metadata::EventMetadata;
use ekm_domain::{OwnState, ScopeEvent};
use ekm_store::time::to_micros;
use ekm_store::StoredEvent;

use crate::error::ProjectionError;
use crate::runner::{Projection, ProjectionState};
use crate::sql::{Param, Statement};

pub struct ScopeTree;

const INSERT_SCOPE: &str = "INSERT INTO scope_view \
    (id, org_id, parent_id, kind, name, path, depth, own_state, plan, tier, key_version, \
     version, created_at, created_position, updated_position) \
    VALUES ($1, $2, $3, $4, $5, $6, $7, 'active', $8, $9, $10, $11, $12, $13, $13)";

const INSERT_KEY_VERSION: &str = "INSERT INTO key_version_view \
    (scope_id, version, created_at, created_position) VALUES ($1, $2, $3, $4)";

const SET_STATE: &str = "UPDATE scope_view SET own_state = $2, version = $3, \
    updated_position = $4, state_event = $5, state_position = $4, state_at = $6, \
    state_actor = $7, state_reason = $8 WHERE id = $1";

const SET_KEY_VERSION: &str = "UPDATE scope_view SET key_version = $2, version = $3, \
    updated_position = $4 WHERE id = $1";

impl Projection for ScopeTree {
    fn name(&self) -> &'static str {
        "scope_tree"
    }

    fn tables(&self) -> &'static [&'static str] {
        &["scope_view", "key_version_view"]
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
        let at = to_micros(stored.recorded_at);
        let id = stored.aggregate_id.clone();
        let key_version_row = |version: u32| {
            Statement::new(
                INSERT_KEY_VERSION,
                vec![
                    Param::Text(id.clone()),
                    Param::Int(i64::from(version)),
                    Param::Int(at),
                    Param::Int(stored.position),
                ],
            )
        };
        let state_change = |state: OwnState| {
            let metadata = EventMetadata::from_map(&stored.metadata);
            Statement::new(
                SET_STATE,
                vec![
                    Param::Text(id.clone()),
                    Param::Text(state.as_str().to_owned()),
                    Param::Int(stored.sequence),
                    Param::Int(stored.position),
                    Param::Text(stored.event_type.clone()),
                    Param::Int(at),
                    Param::Text(metadata.actor.to_string()),
                    Param::OptText(metadata.reason.map(|r| r.as_str().to_owned())),
                ],
            )
        };
        Ok(match event {
            ScopeEvent::OrganizationCreated {
                org_id,
                name,
                plan,
                tier,
                key_version,
                ..
            } => vec![
                Statement::new(
                    INSERT_SCOPE,
                    vec![
                        Param::Text(id.clone()),
                        Param::Text(org_id.to_string()),
                        Param::OptText(None),
                        Param::Text("organization".into()),
                        Param::Text(name.as_str().to_owned()),
                        Param::Text(id.clone()),
                        Param::Int(0),
                        Param::OptText(Some(plan.as_str().into())),
                        Param::OptText(Some(tier.as_str().into())),
                        Param::Int(i64::from(key_version.get())),
                        Param::Int(stored.sequence),
                        Param::Int(at),
                        Param::Int(stored.position),
                    ],
                ),
                key_version_row(key_version.get()),
            ],
            ScopeEvent::ScopeCreated {
                kind,
                name,
                parent_id,
                org_id,
                path,
                key_version,
                ..
            } => {
                let depth = i64::try_from(path.len().saturating_sub(1)).unwrap_or(i64::MAX);
                let path = path
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join("/");
                vec![
                    Statement::new(
                        INSERT_SCOPE,
                        vec![
                            Param::Text(id.clone()),
                            Param::Text(org_id.to_string()),
                            Param::OptText(Some(parent_id.to_string())),
                            Param::Text(kind.as_str().into()),
                            Param::Text(name.as_str().to_owned()),
                            Param::Text(path),
                            Param::Int(depth),
                            Param::OptText(None),
                            Param::OptText(None),
                            Param::Int(i64::from(key_version.get())),
                            Param::Int(stored.sequence),
                            Param::Int(at),
                            Param::Int(stored.position),
                        ],
                    ),
                    key_version_row(key_version.get()),
                ]
            }
            ScopeEvent::ScopePaused {} => vec![state_change(OwnState::Paused)],
            ScopeEvent::ScopeResumed {} => vec![state_change(OwnState::Active)],
            ScopeEvent::ScopeRevoked {} => vec![state_change(OwnState::Revoked)],
            ScopeEvent::ScopeKeyRotated { key_version } => vec![
                Statement::new(
                    SET_KEY_VERSION,
                    vec![
                        Param::Text(id.clone()),
                        Param::Int(i64::from(key_version.get())),
                        Param::Int(stored.sequence),
                        Param::Int(stored.position),
                    ],
                ),
                key_version_row(key_version.get()),
            ],
        })
    }
}
