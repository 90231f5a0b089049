//! Grants of an organization's permissions, managed by its org admins: the HTTP side of
//! `ekm_service::access`.

use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use chrono::{DateTime, Utc};
use ekm_domain::{Grant, OrgId, Permission, PrincipalName, ScopeId, ScopeKind};
use ekm_store::time::{from_micros, rfc3339};
use serde::Deserialize;
use serde_json::{json, Value};
use std::collections::HashMap;

use super::tokens::{own_org, path_parts};
use crate::context::Caller;
use crate::cursor::{Binding, List};
use crate::dto::JsonBody;
use crate::error::ApiError;
use crate::routes::{check_keys, conditional_json, page_limit};
use crate::state::AppState;
use ekm_service::AppError;

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct GrantRequest {
    pub principal: String,
    pub permission: String,
    /// Limits the grant to this scope's subtree.
    pub scope_id: Option<String>,
    /// RFC 3339, in the future: the grant stops counting then (issue 17 §2).
    pub expires_at: Option<String>,
    pub reason: Option<String>,
}

async fn grant_of(
    state: &AppState,
    org: OrgId,
    principal: &str,
    permission: &str,
    scope: Option<&str>,
) -> Result<Grant, ApiError> {
    let principal =
        PrincipalName::parse(principal).map_err(|e| ApiError::invalid(e.to_string()))?;
    let permission: Permission = permission
        .parse()
        .map_err(|e: ekm_domain::ValueError| ApiError::invalid(e.to_string()))?;
    let scope = match scope {
        None => None,
        Some(text) => {
            let id =
                ScopeId::parse(text).map_err(|e| ApiError::invalid(format!("scope_id: {e}")))?;
            match state.app.scope(id).await? {
                Some(s) if s.scope.org_id == org => {
                    // The organization itself is the same as no limit.
                    (s.scope.kind != ScopeKind::Organization).then_some(id)
                }
                _ => {
                    return Err(ApiError::not_found(
                        "scope_id: no scope with this id is visible to this token",
                    ))
                }
            }
        }
    };
    Ok(Grant {
        principal,
        permission,
        scope,
    })
}

fn grant_json(grant: &Grant, expires_at: Option<DateTime<Utc>>) -> Value {
    json!({
        "principal": grant.principal.as_str(),
        "permission": grant.permission.as_str(),
        "scope_id": grant.scope.map(|s| s.to_string()),
        "expires_at": expires_at.map(rfc3339),
    })
}

/// `POST /v1/orgs/{org}/grants {"principal", "permission", "scope_id"?, "expires_at"?}` →
/// 201 (200 when the grant existed already, with the same expiry). Granting again with
/// another expiry, or none, replaces the one it had.
#[utoipa::path(
    post,
    path = "/v1/orgs/{org}/grants",
    tag = "access",
    summary = "Grant a permission",
    params(
        crate::openapi::OrgPath
    ),
    request_body = GrantRequest,
    responses(
        (status = 201, description = "Granted", body = crate::openapi::GrantDoc),
        (status = 200, description = "Already granted (`changed: false`), or its expiry changed", body = crate::openapi::GrantDoc)
    )
)]
pub async fn add_grant(
    State(state): State<AppState>,
    caller: Caller,
    path: Result<Path<String>, PathRejection>,
    JsonBody(body): JsonBody<GrantRequest>,
) -> Result<Response, ApiError> {
    let org = own_org(&caller, &path_parts(path)?)?;
    let grant = grant_of(
        &state,
        org,
        &body.principal,
        &body.permission,
        body.scope_id.as_deref(),
    )
    .await?;
    let expires_at = body
        .expires_at
        .as_deref()
        .map(crate::routes::future_expiry)
        .transpose()?;
    let reason = crate::routes::reason(body.reason.as_deref(), false)?;
    let outcome = state
        .app
        .grant(org, grant.clone(), expires_at, &caller.metadata(reason))
        .await?;
    let mut body = grant_json(&grant, expires_at);
    body["changed"] = json!(outcome.changed);
    let status = if outcome.changed {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(body)).into_response())
}

/// `DELETE /v1/orgs/{org}/grants/{principal}/{permission}` (`?scope_id=` for a grant
/// limited to a subtree).
#[utoipa::path(
    delete,
    path = "/v1/orgs/{org}/grants/{principal}/{permission}",
    tag = "access",
    summary = "Remove a grant",
    params(
        crate::openapi::OrgPath,
        ("principal" = String, Path, description = "The principal."),
        ("permission" = String, Path, description = "The permission, as `data:use`."),
        ("scope_id" = Option<String>, Query, description = "The scope the grant names (none: organization-wide).")
    ),
    responses(
        (status = 200, description = "Removed", body = crate::openapi::GrantDoc)
    )
)]
pub async fn remove_grant(
    State(state): State<AppState>,
    caller: Caller,
    path: Result<Path<(String, String, String)>, PathRejection>,
    query: Result<Query<HashMap<String, String>>, QueryRejection>,
) -> Result<Response, ApiError> {
    let (org, principal, permission) = path_parts(path)?;
    let org = own_org(&caller, &org)?;
    let Query(query) = query.map_err(|_| ApiError::invalid("the query string is not valid"))?;
    crate::routes::check_keys(&query, &["scope_id"])?;
    let grant = grant_of(
        &state,
        org,
        &principal,
        &permission,
        query.get("scope_id").map(String::as_str),
    )
    .await?;
    state
        .app
        .ungrant(org, grant.clone(), &caller.metadata(None))
        .await?;
    let mut body = grant_json(&grant, None);
    if let Some(fields) = body.as_object_mut() {
        fields.remove("expires_at");
    }
    body["removed"] = json!(true);
    Ok(Json(body).into_response())
}

/// `GET /v1/orgs/{org}/grants`: every grant of the organization.
#[utoipa::path(
    get,
    path = "/v1/orgs/{org}/grants",
    tag = "access",
    summary = "The organization's grants",
    params(
        crate::openapi::OrgPath,
        crate::openapi::PageParams,
        crate::openapi::IfNoneMatch
    ),
    responses(
        (status = 200, description = "A page", body = crate::openapi::GrantPageDoc, headers(("ETag" = String, description = "Entity tag"))),
        (status = 304, description = "Not modified (If-None-Match).")
    )
)]
pub async fn list_grants(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    path: Result<Path<String>, PathRejection>,
    query: Result<Query<HashMap<String, String>>, QueryRejection>,
) -> Result<Response, ApiError> {
    let org = own_org(&caller, &path_parts(path)?)?;
    let Query(query) = query.map_err(|_| ApiError::invalid("the query string is not valid"))?;
    check_keys(&query, &["limit", "cursor"])?;
    let limit = page_limit(query.get("limit"))?;
    let org_text = org.to_string();
    let binding = Binding {
        list: List::Grants,
        query: &[org_text.as_str()],
    };
    let after: Option<(String, String, i64)> = query
        .get("cursor")
        .map(|c| binding.decode_json(c))
        .transpose()?;
    // As for tokens: a grant just added is listed.
    state.app.refresh().await?;
    let mut grants = state
        .app
        .tokens()
        .grants_page(org, after, i64::from(limit) + 1)
        .await
        .map_err(AppError::Store)?;
    let more = grants.len() > limit as usize;
    grants.truncate(limit as usize);
    let next_cursor = match grants.last() {
        Some((_, _, key)) if more => Some(binding.encode_json(&json!(key))),
        _ => None,
    };
    let items: Vec<Value> = grants
        .iter()
        .filter_map(|(g, expires_at, _)| {
            g.as_ref()
                .map(|g| grant_json(g, expires_at.map(from_micros)))
        })
        .collect();
    conditional_json(
        &headers,
        None,
        &json!({"items": items, "next_cursor": next_cursor}),
    )
}
