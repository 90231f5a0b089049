//! The JSON shapes of the API. Only this module knows them: requests are parsed into domain
//! values and responses are built from read models by hand, so that a change on the wire is
//! never an accident of a refactoring elsewhere.

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::StatusCode;
use ekm_projections::{Cause, Destruction, KeyVersionRecord, ScopeSnapshot, StateChange};
use ekm_store::time::rfc3339;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::error::{ApiError, Code};

/// The largest request body accepted on the control plane.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// A JSON request body. Parse failures are problems with code `invalid_request`.
pub struct JsonBody<T>(pub T);

/// A JSON request body that may be absent (an empty body reads as `T::default()`).
pub struct OptionalJsonBody<T>(pub T);

/// 413 for a body beyond its endpoint's limit: the control plane's, or the data plane's.
pub(crate) fn body_too_large() -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        Code::InvalidRequest,
        format!(
            "the request body is larger than this endpoint takes ({MAX_BODY_BYTES} bytes on the control plane, {} on the data plane)",
            crate::routes::data_plane::MAX_DATA_BODY_BYTES
        ),
    )
}

async fn bytes_of(request: Request) -> Result<Bytes, ApiError> {
    Bytes::from_request(request, &())
        .await
        .map_err(|rejection| {
            if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                body_too_large()
            } else {
                ApiError::invalid("the request body could not be read")
            }
        })
}

fn parse<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(bytes).map_err(|error| {
        let mut detail = format!("the body is not valid JSON for this request: {error}");
        if detail.len() > 300 {
            detail = detail.chars().take(300).collect();
        }
        ApiError::invalid(detail)
    })
}

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, _state: &S) -> Result<Self, ApiError> {
        let bytes = bytes_of(request).await?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Err(ApiError::invalid("a JSON body is required"));
        }
        parse(&bytes).map(JsonBody)
    }
}

/// The most items in one batch of the data plane.
pub const MAX_BATCH_ITEMS: usize = 1000;

/// A data-plane body: one request, or `{"items": [...]}` of up to `MAX_BATCH_ITEMS` of them
/// (issue 18 §5). An item that does not parse is that item's problem, not the batch's.
pub enum OneOrBatch<T> {
    One(T),
    Batch(Vec<Result<T, ApiError>>),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Batch {
    items: Vec<serde_json::Value>,
}

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for OneOrBatch<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, _state: &S) -> Result<Self, ApiError> {
        let bytes = bytes_of(request).await?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Err(ApiError::invalid("a JSON body is required"));
        }
        // The single request first: it pays nothing for batches. A body that is not one is
        // a batch if it has exactly `items`; otherwise the single request's error stands.
        let one = match parse::<T>(&bytes) {
            Ok(one) => return Ok(Self::One(one)),
            Err(error) => error,
        };
        let Ok(Batch { items }) = serde_json::from_slice::<Batch>(&bytes) else {
            return Err(one);
        };
        if items.is_empty() || items.len() > MAX_BATCH_ITEMS {
            return Err(ApiError::invalid(format!(
                "items: from 1 to {MAX_BATCH_ITEMS} items, not {}",
                items.len()
            )));
        }
        let items = items
            .into_iter()
            .enumerate()
            .map(|(i, item)| {
                serde_json::from_value::<T>(item).map_err(|error| {
                    let detail = format!("items[{i}]: {error}");
                    ApiError::invalid(detail.chars().take(300).collect::<String>())
                })
            })
            .collect();
        Ok(Self::Batch(items))
    }
}

impl<S: Send + Sync, T: DeserializeOwned + Default> FromRequest<S> for OptionalJsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, _state: &S) -> Result<Self, ApiError> {
        let bytes = bytes_of(request).await?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(OptionalJsonBody(T::default()));
        }
        parse(&bytes).map(OptionalJsonBody)
    }
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateOrgRequest {
    pub name: String,
    pub plan: Option<String>,
    pub tier: Option<String>,
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateScopeRequest {
    pub kind: String,
    pub name: String,
    pub parent_id: String,
}

/// Body of pause (reason required) and of resume and rotate (reason optional).
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReasonRequest {
    pub reason: Option<String>,
}

/// A pause: why, and (optionally) until when; the scheduler resumes it then.
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PauseRequest {
    pub reason: Option<String>,
    pub until: Option<String>,
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RetireRequest {
    pub below: u32,
    pub reason: Option<String>,
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TierRequest {
    pub tier: String,
    pub reason: Option<String>,
}

#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RevokeRequest {
    pub reason: Option<String>,
    pub confirm: Option<String>,
    /// The waiting period (ISO 8601 duration, `PT0S` to `P90D`); absent: the organization's
    /// `revoke_window`.
    pub after: Option<String>,
    /// `true`: revoke now (the same as `"after": "PT0S"`), for emergencies.
    pub immediately: Option<bool>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct CauseJson {
    pub scope_id: String,
    /// The event type that put the cause scope in its state (`ScopePaused`, ...).
    pub event: Option<String>,
    pub scope_kind: &'static str,
    pub scope_name: String,
    pub position: Option<i64>,
    pub at: Option<String>,
    pub actor: Option<String>,
    pub reason: Option<String>,
    /// A pending revocation's due time (RFC 3339), when that is the cause.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub due_at: Option<String>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct KeyVersionJson {
    pub version: u32,
    pub created_at: String,
    /// A public name of the key version (never the key).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fingerprint: Option<String>,
    /// Retired versions decrypt nothing: their key material is destroyed.
    pub retired: bool,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ScopeJson {
    pub id: String,
    pub kind: &'static str,
    pub name: String,
    pub parent_id: Option<String>,
    pub org_id: String,
    pub path: Vec<String>,
    pub own_state: &'static str,
    pub effective_state: &'static str,
    pub cause: Option<CauseJson>,
    pub version: i64,
    pub key_versions: Vec<KeyVersionJson>,
    /// Key versions below this one do not decrypt (`key_version_disabled`); 1: all do.
    pub min_decryption_version: u32,
    /// While its own state is `pending_revocation`: when the revoke falls due (shown even
    /// when a paused ancestor is the cause of the effective state).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub revocation_due_at: Option<String>,
    /// The scope's own key rotation period, if it set one (its subtree inherits it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rotation_period: Option<String>,
    pub created_at: String,
    /// Once a revoke exists on the path: how far its keys are destroyed (ADR 0013).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub destruction: Option<DestructionJson>,
}

/// `live`: the revoked keys are gone from the live database and its files (`pending` while
/// the re-key runs). `copies`: copies of the database made before (backups, WAL archives,
/// replicas) open nothing once the platform master key has been rotated after that.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct DestructionJson {
    pub live: &'static str,
    pub copies: &'static str,
}

impl From<&Destruction> for DestructionJson {
    fn from(destruction: &Destruction) -> Self {
        DestructionJson {
            live: if destruction.live_done() {
                "done"
            } else {
                "pending"
            },
            copies: if destruction.copies_done() {
                "done"
            } else {
                "after_master_key_rotation"
            },
        }
    }
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct LifecycleJson {
    #[serde(flatten)]
    pub scope: ScopeJson,
    pub changed: bool,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct OrgJson {
    pub id: String,
    pub name: String,
    pub plan: &'static str,
    pub tier: &'static str,
    pub own_state: &'static str,
    pub effective_state: &'static str,
    pub cause: Option<CauseJson>,
    pub version: i64,
    pub key_versions: Vec<KeyVersionJson>,
    pub created_at: String,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct CreatedOrgJson {
    #[serde(flatten)]
    pub org: OrgJson,
    /// The organization's first `org_admin` token, shown this once.
    pub admin_token: String,
}

#[derive(Debug, Serialize)]
pub struct ListJson<T> {
    pub items: Vec<T>,
    pub next_cursor: Option<String>,
}

/// The cause of a past scope's state, as it was.
fn past_cause_json(past: &ekm_projections::PastScope) -> Option<CauseJson> {
    past.cause.as_ref().map(|(scope, change)| {
        cause_json(&Cause {
            scope_id: scope.id,
            kind: scope.kind,
            name: scope.name.as_str().to_owned(),
            change: change.clone(),
            due_at: match past.effective {
                ekm_domain::Effective::PendingRevocation { .. } => {
                    scope.pending_revocation.as_ref().map(|p| p.due_at.clone())
                }
                _ => None,
            },
        })
    })
}

fn cause_json(cause: &Cause) -> CauseJson {
    let change: Option<&StateChange> = cause.change.as_ref();
    CauseJson {
        scope_id: cause.scope_id.to_string(),
        event: change.map(|c| c.event.clone()),
        scope_kind: cause.kind.as_str(),
        scope_name: cause.name.clone(),
        position: change.map(|c| c.position),
        at: change.map(|c| rfc3339(c.at)),
        actor: change.map(|c| c.actor.clone()),
        reason: change.and_then(|c| c.reason.clone()),
        due_at: cause.due_at.clone(),
    }
}

fn key_versions_json(versions: &[KeyVersionRecord]) -> Vec<KeyVersionJson> {
    versions
        .iter()
        .map(|k| KeyVersionJson {
            version: k.version,
            created_at: rfc3339(k.created_at),
            fingerprint: k.fingerprint.clone(),
            retired: k.retired,
        })
        .collect()
}

impl From<&ScopeSnapshot> for ScopeJson {
    fn from(snapshot: &ScopeSnapshot) -> Self {
        let scope = &snapshot.scope;
        ScopeJson {
            id: scope.id.to_string(),
            kind: scope.kind.as_str(),
            name: scope.name.clone(),
            parent_id: scope.parent_id.map(|p| p.to_string()),
            org_id: scope.org_id.to_string(),
            path: scope.path.iter().map(ToString::to_string).collect(),
            own_state: scope.own_state.as_str(),
            effective_state: snapshot.effective.as_str(),
            cause: snapshot.cause.as_ref().map(cause_json),
            version: scope.version,
            key_versions: key_versions_json(&snapshot.key_versions),
            min_decryption_version: scope.min_decryption_version,
            revocation_due_at: scope.revoke_due_at.clone(),
            rotation_period: scope.rotation_period.clone(),
            created_at: rfc3339(scope.created_at),
            destruction: snapshot.destruction.as_ref().map(DestructionJson::from),
        }
    }
}

impl From<&ScopeSnapshot> for OrgJson {
    fn from(snapshot: &ScopeSnapshot) -> Self {
        let scope = &snapshot.scope;
        OrgJson {
            id: scope.id.to_string(),
            name: scope.name.clone(),
            plan: snapshot.org_plan.as_str(),
            tier: scope.tier.map(|t| t.as_str()).unwrap_or("default"),
            own_state: scope.own_state.as_str(),
            effective_state: snapshot.effective.as_str(),
            cause: snapshot.cause.as_ref().map(cause_json),
            version: scope.version,
            key_versions: key_versions_json(&snapshot.key_versions),
            created_at: rfc3339(scope.created_at),
        }
    }
}

/// The scope JSON as of a past position or instant, plus `as_of`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct PastScopeJson {
    #[serde(flatten)]
    pub scope: ScopeJson,
    pub as_of: AsOfJson,
    /// The scope's organization as it was then.
    pub org: PastOrgJson,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct AsOfJson {
    /// The last event position taken into account.
    pub position: i64,
    /// The instant asked for, when the question was an instant.
    pub at: Option<String>,
}

impl PastScopeJson {
    pub fn new(past: &ekm_projections::PastScope, at: Option<String>) -> Self {
        let state = &past.state;
        PastScopeJson {
            scope: ScopeJson {
                id: state.id.to_string(),
                kind: state.kind.as_str(),
                name: state.name.as_str().to_owned(),
                parent_id: state.parent_id.map(|p| p.to_string()),
                org_id: state.org_id.to_string(),
                path: state.path.iter().map(ToString::to_string).collect(),
                own_state: state.own_state.as_str(),
                effective_state: past.effective.as_str(),
                cause: past_cause_json(past),
                version: past.version,
                key_versions: past
                    .key_versions
                    .iter()
                    .map(|k| KeyVersionJson {
                        version: k.version,
                        created_at: rfc3339(k.created_at),
                        fingerprint: k.fingerprint.clone(),
                        retired: k.retired_at.is_some(),
                    })
                    .collect(),
                min_decryption_version: state.min_decryption.get(),
                revocation_due_at: state.pending_revocation.as_ref().map(|p| p.due_at.clone()),
                rotation_period: state.rotation_period.clone(),
                created_at: rfc3339(past.created_at),
                // Time travel answers the lifecycle as it was; how far destruction has got
                // is a fact of now, on `GET /v1/scopes/{id}`.
                destruction: None,
            },
            as_of: AsOfJson {
                position: past.position,
                at,
            },
            org: PastOrgJson::from(&past.org),
        }
    }
}

/// The organization as it was: what decided which keys its scopes used.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct PastOrgJson {
    pub id: String,
    pub plan: Option<&'static str>,
    pub tier: Option<&'static str>,
    /// `{"provider": "local", "key_id": null}` for the platform's key, else the customer's.
    pub master_key: serde_json::Value,
    /// `available`, or why the customer's key could not be used then.
    pub master_key_status: &'static str,
    pub master_key_reason: Option<&'static str>,
}

impl From<&ekm_domain::ScopeState> for PastOrgJson {
    fn from(org: &ekm_domain::ScopeState) -> Self {
        let master_key = match &org.master {
            None => serde_json::json!({"provider": "local", "key_id": null}),
            Some(master) => serde_json::json!({
                "provider": master.provider.as_str(),
                "key_id": master.key_id,
                "region": master.region,
                "endpoint_url": master.endpoint_url,
            }),
        };
        PastOrgJson {
            id: org.id.to_string(),
            plan: org.plan.map(|p| p.as_str()),
            tier: org.tier.map(|t| t.as_str()),
            master_key,
            master_key_status: org.master_health.as_str(),
            master_key_reason: org.master_unavailable.map(|r| r.as_str()),
        }
    }
}

/// `GET /v1/scopes/{id}/access-at?at=`: who could decrypt the scope's data then.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct AccessAtJson {
    pub scope_id: String,
    pub at: String,
    /// The last event position taken into account.
    pub position: i64,
    pub effective_state: &'static str,
    pub cause: Option<CauseJson>,
    /// Empty unless the scope was active.
    pub principals: Vec<HolderJson>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct HolderJson {
    pub principal: String,
    pub permission: &'static str,
    /// The scope the grant was made on (the organization for an organization-wide grant).
    pub granted_on: String,
    /// When the grant was to expire, if it was (RFC 3339, as granted).
    pub grant_expires_at: Option<String>,
    pub tokens: Vec<PastTokenJson>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct PastTokenJson {
    pub token_id: String,
    pub expires_at: Option<String>,
}

impl From<&ekm_projections::PastAccess> for AccessAtJson {
    fn from(access: &ekm_projections::PastAccess) -> Self {
        let past = &access.scope;
        AccessAtJson {
            scope_id: past.state.id.to_string(),
            at: rfc3339(access.at),
            position: past.position,
            effective_state: past.effective.as_str(),
            cause: past_cause_json(past),
            principals: access
                .principals
                .iter()
                .map(|h| HolderJson {
                    principal: h.principal.to_string(),
                    permission: h.permission.as_str(),
                    granted_on: h.granted_on.to_string(),
                    grant_expires_at: h.expires_at.clone(),
                    tokens: h
                        .tokens
                        .iter()
                        .map(|t| PastTokenJson {
                            token_id: t.token_id.clone(),
                            expires_at: t.expires_at.clone(),
                        })
                        .collect(),
                })
                .collect(),
        }
    }
}
