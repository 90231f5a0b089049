//! Access-justification policies (issue 16 §2, ADR 0027): `PUT` and `GET
//! /v1/scopes/{id}/justification-policy`. A policy is an event on its scope and is inherited
//! by the subtree, where policies only tighten; the data plane enforces the path's policies.

use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::Response;
use ekm_domain::{EffectiveJustification, JustificationCode, JustificationPolicy, Permission};
use ekm_projections::ScopeSnapshot;
use serde::Deserialize;
use serde_json::{json, Value};

use super::{changed_answer, conditional_json, expected_version, path_text, reason, visible_scope};
use crate::context::Caller;
use crate::dto::JsonBody;
use crate::error::ApiError;
use crate::state::AppState;
use ekm_service::app::Action;

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[schema(as = JustificationPolicyRequest)]
#[serde(deny_unknown_fields)]
pub struct PolicyRequest {
    pub required: bool,
    #[serde(default)]
    pub allowed: Vec<String>,
    pub reason: Option<String>,
}

/// The answer of both verbs: the scope's own policy and what its path imposes.
fn policy_json(snapshot: &ScopeSnapshot) -> Value {
    let own = snapshot.scope.justification.clone().unwrap_or_default();
    let effective = &snapshot.justification;
    json!({
        "scope_id": snapshot.scope.id.to_string(),
        "required": own.required,
        "allowed": own.allowed.iter().map(JustificationCode::as_str).collect::<Vec<_>>(),
        "effective": effective_json(effective),
    })
}

fn effective_json(effective: &EffectiveJustification) -> Value {
    json!({
        "required": effective.required_by.is_some(),
        "required_by": effective.required_by.map(|id| id.to_string()),
        // null: any well-formed reason; otherwise only these (possibly none).
        "allowed": effective.allowed().map(|codes| {
            codes.iter().map(|c| c.as_str().to_owned()).collect::<Vec<_>>()
        }),
        "allowed_by": effective.lists.iter().map(|(id, _)| id.to_string()).collect::<Vec<_>>(),
    })
}

/// `GET /v1/scopes/{id}/justification-policy`: the scope's own policy and the effective one.
/// Its tag is a representation tag (ADR 0025): the effective policy changes with the
/// ancestors' policies, which do not move this scope's version.
#[utoipa::path(
    get,
    operation_id = "get_justification_policy",
    path = "/v1/scopes/{id}/justification-policy",
    tag = "lifecycle",
    summary = "The justification policy, own and effective",
    params(
        crate::openapi::ScopePath,
        crate::openapi::IfNoneMatch
    ),
    responses(
        (status = 200, description = "The policy", body = crate::openapi::JustificationPolicyDoc, headers(("ETag" = String, description = "Entity tag"))),
        (status = 304, description = "Not modified (If-None-Match).")
    )
)]
pub(crate) async fn get(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    path: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let scope = visible_scope(
        &state,
        &caller,
        &path_text(path)?,
        Permission::EncryptionView,
    )
    .await?;
    conditional_json(&headers, Some(scope.scope.version), &policy_json(&scope))
}

/// `PUT /v1/scopes/{id}/justification-policy {"required", "allowed", "reason"?}`: sets the
/// scope's own policy (an event; `{"required": false, "allowed": []}` lifts it). Refused
/// with 409 `justification_policy_conflict` when, with the policies above the scope, no
/// reason would be allowed (decided by the aggregate, after the version and lifecycle rules).
#[utoipa::path(
    put,
    operation_id = "set_justification_policy",
    path = "/v1/scopes/{id}/justification-policy",
    tag = "lifecycle",
    summary = "Set the justification policy",
    params(
        crate::openapi::ScopePath,
        crate::openapi::IfMatch
    ),
    request_body = PolicyRequest,
    responses(
        (status = 200, description = "The policy and `changed`", body = crate::openapi::JustificationPolicyDoc)
    )
)]
pub(crate) async fn put(
    State(state): State<AppState>,
    caller: Caller,
    path: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    JsonBody(body): JsonBody<PolicyRequest>,
) -> Result<Response, ApiError> {
    let allowed = body
        .allowed
        .iter()
        .map(|text| JustificationCode::parse(text))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| ApiError::invalid(format!("allowed: {}", e.problem)))?;
    let policy = JustificationPolicy::new(body.required, allowed)
        .map_err(|e| ApiError::invalid(e.to_string()))?;
    let reason = reason(body.reason.as_deref(), false)?;
    let scope = visible_scope(
        &state,
        &caller,
        &path_text(path)?,
        Permission::EncryptionManage,
    )
    .await?;
    let expected = expected_version(&headers)?;
    let outcome = state
        .app
        .act(
            scope.scope.id,
            Action::SetJustificationPolicy(policy),
            &caller.metadata(reason),
            expected,
        )
        .await?;
    Ok(changed_answer(policy_json(&outcome.scope), &outcome))
}
