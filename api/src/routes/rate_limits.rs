//! An organization's rate limits (issue 18 §4, ADR 0036): the operator sets them, as an
//! event; the organization's members with `encryption:view` may read them. Enforcement is
//! `crate::rate_limit`'s.

use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::Response;
use ekm_domain::{Permission, RateBucket, RateClass, RateHolder, RateLimits, ScopeKind};
use ekm_projections::ScopeSnapshot;
use serde::Deserialize;
use serde_json::{json, Value};

use super::{
    changed_answer, conditional_json, expected_version, parse_scope_id, path_text, reason,
    visible_org, ORG_NOT_FOUND,
};
use crate::context::Caller;
use crate::dto::JsonBody;
use crate::error::ApiError;
use crate::state::AppState;
use ekm_service::app::Action;

/// A token bucket as a client sends it.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BucketRequest {
    /// Tokens added per second (1 to 10,000,000).
    pub per_second: u32,
    /// The most tokens the bucket holds: the largest burst (1 to 10,000,000).
    pub burst: u32,
}

/// `PUT /v1/orgs/{org}/limits`: the organization's own limits, all four at once; a limit
/// absent or `null` is the server's default.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RateLimitsRequest {
    pub data_plane_principal: Option<BucketRequest>,
    pub data_plane_organization: Option<BucketRequest>,
    pub commands_principal: Option<BucketRequest>,
    pub commands_organization: Option<BucketRequest>,
    pub reason: Option<String>,
}

const LIMITS: [(&str, RateClass, RateHolder); 4] = [
    (
        "data_plane_principal",
        RateClass::DataPlane,
        RateHolder::Principal,
    ),
    (
        "data_plane_organization",
        RateClass::DataPlane,
        RateHolder::Organization,
    ),
    (
        "commands_principal",
        RateClass::Commands,
        RateHolder::Principal,
    ),
    (
        "commands_organization",
        RateClass::Commands,
        RateHolder::Organization,
    ),
];

/// The limits in force for `org`, each with where it comes from.
fn limits_json(state: &AppState, org: &ScopeSnapshot) -> Value {
    let defaults = state.rate_defaults();
    let own = &org.scope.rate_limits;
    let mut body = json!({ "org_id": org.scope.id.to_string() });
    for (name, class, holder) in LIMITS {
        let (bucket, source) = defaults.effective(own, class, holder);
        body[name] = match bucket {
            Some(bucket) => json!({
                "per_second": bucket.per_second(),
                "burst": bucket.burst(),
                "source": source,
            }),
            None => json!({"per_second": null, "burst": null, "source": source}),
        };
    }
    body
}

/// The organization for the operator (any) or for one of its own members.
async fn org_for(
    state: &AppState,
    caller: &Caller,
    path: Result<Path<String>, PathRejection>,
) -> Result<ScopeSnapshot, ApiError> {
    if !caller.is_operator() {
        return visible_org(state, caller, path, Permission::EncryptionView).await;
    }
    let id = parse_scope_id(&path_text(path)?)?;
    match state.app.scope(id).await? {
        Some(found) if found.scope.kind == ScopeKind::Organization => Ok(found),
        _ => Err(ApiError::not_found(ORG_NOT_FOUND)),
    }
}

#[utoipa::path(
    get,
    operation_id = "get_rate_limits",
    path = "/v1/orgs/{org}/limits",
    tag = "organizations",
    summary = "The rate limits in force, and where each comes from",
    params(
        crate::openapi::OrgPath,
        crate::openapi::IfNoneMatch
    ),
    responses(
        (status = 200, description = "The limits", body = crate::openapi::RateLimitsDoc, headers(("ETag" = String, description = "Entity tag"))),
        (status = 304, description = "Not modified (If-None-Match).")
    )
)]
pub(crate) async fn get(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    path: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let org = org_for(&state, &caller, path).await?;
    conditional_json(
        &headers,
        Some(org.scope.version),
        &limits_json(&state, &org),
    )
}

#[utoipa::path(
    put,
    operation_id = "set_rate_limits",
    path = "/v1/orgs/{org}/limits",
    tag = "organizations",
    summary = "Set the organization's own rate limits (operator token)",
    params(
        crate::openapi::OrgPath,
        crate::openapi::IfMatch
    ),
    request_body = RateLimitsRequest,
    responses(
        (status = 200, description = "The limits in force and `changed`", body = crate::openapi::RateLimitsDoc)
    )
)]
pub(crate) async fn put(
    State(state): State<AppState>,
    caller: Caller,
    path: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    JsonBody(body): JsonBody<RateLimitsRequest>,
) -> Result<Response, ApiError> {
    if !caller.is_operator() {
        return Err(ApiError::forbidden(
            "only the platform operator token sets an organization's rate limits",
        ));
    }
    let bucket = |field: &'static str, given: Option<BucketRequest>| {
        given
            .map(|b| RateBucket::new(field, b.per_second, b.burst))
            .transpose()
            .map_err(|e| ApiError::invalid(e.to_string()))
    };
    let limits = RateLimits {
        data_plane_principal: bucket("data_plane_principal", body.data_plane_principal)?,
        data_plane_organization: bucket("data_plane_organization", body.data_plane_organization)?,
        commands_principal: bucket("commands_principal", body.commands_principal)?,
        commands_organization: bucket("commands_organization", body.commands_organization)?,
    };
    let reason = reason(body.reason.as_deref(), false)?;
    let org = org_for(&state, &caller, path).await?;
    let expected = expected_version(&headers)?;
    let outcome = state
        .app
        .act(
            org.scope.id,
            Action::SetRateLimits(limits),
            &caller.metadata(reason),
            expected,
        )
        .await?;
    Ok(changed_answer(
        limits_json(&state, &outcome.scope),
        &outcome,
    ))
}
