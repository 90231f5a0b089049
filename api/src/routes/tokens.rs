//! Tokens of an organization, managed by its org admins (and the operator's break-glass
//! token): the HTTP side of `ekm_service::access`. Token secrets are shown once.

use std::collections::HashMap;

use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use ekm_domain::{OrgId, OrgRole, PrincipalKind, PrincipalName, ScopeKind};
use ekm_store::time::{from_micros, rfc3339};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::context::Caller;
use crate::cursor::{Binding, List};
use crate::dto::JsonBody;
use crate::error::ApiError;
use crate::routes::{check_keys, conditional_json, page_limit, ORG_NOT_FOUND};
use crate::state::AppState;
use ekm_service::AppError;

/// The caller's own organization named in the path, for an org admin.
pub(crate) fn own_org(caller: &Caller, org: &str) -> Result<OrgId, ApiError> {
    if caller.is_operator() {
        return Err(ApiError::forbidden(
            "the operator token manages organizations only; use an organization's token",
        ));
    }
    let org = OrgId::parse(org).map_err(|e| ApiError::invalid(format!("org: {e}")))?;
    if caller.org() != Some(org) {
        return Err(ApiError::not_found(ORG_NOT_FOUND));
    }
    caller.require_org_admin()?;
    Ok(org)
}

pub(crate) fn path_parts<T>(path: Result<Path<T>, PathRejection>) -> Result<T, ApiError> {
    path.map(|Path(p)| p)
        .map_err(|_| ApiError::invalid("the path is not valid"))
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TokenRequest {
    pub principal: String,
    pub kind: Option<String>,
    pub role: Option<String>,
    /// RFC 3339; the token stops working then.
    pub expires_at: Option<String>,
    pub reason: Option<String>,
}

/// `POST /v1/orgs/{org}/tokens {"principal", "kind"?: user|service, "role"?:
/// member|it_admin|org_admin, "expires_at"?}` → 201 with the token, shown this once.
#[utoipa::path(
    post,
    path = "/v1/orgs/{org}/tokens",
    tag = "access",
    summary = "Issue a token (org admin)",
    params(
        crate::openapi::OrgPath
    ),
    request_body = TokenRequest,
    responses(
        (status = 201, description = "The token, shown this once", body = crate::openapi::TokenCreatedDoc)
    )
)]
pub async fn create_token(
    State(state): State<AppState>,
    caller: Caller,
    path: Result<Path<String>, PathRejection>,
    JsonBody(body): JsonBody<TokenRequest>,
) -> Result<Response, ApiError> {
    let org = own_org(&caller, &path_parts(path)?)?;
    let principal =
        PrincipalName::parse(&body.principal).map_err(|e| ApiError::invalid(e.to_string()))?;
    let kind: PrincipalKind = body
        .kind
        .as_deref()
        .unwrap_or("service")
        .parse()
        .map_err(|e: ekm_domain::ValueError| ApiError::invalid(e.to_string()))?;
    let role: OrgRole = body
        .role
        .as_deref()
        .unwrap_or("member")
        .parse()
        .map_err(|e: ekm_domain::ValueError| ApiError::invalid(e.to_string()))?;
    let expires_at = body
        .expires_at
        .as_deref()
        .map(crate::routes::future_expiry)
        .transpose()?;
    let reason = crate::routes::reason(body.reason.as_deref(), false)?;
    let token = state
        .app
        .issue_token(
            org,
            &principal,
            kind,
            role,
            expires_at,
            &caller.metadata(reason),
        )
        .await?;
    Ok((
        StatusCode::CREATED,
        Json(json!({
            "id": token.id,
            "token": token.secret,
            "principal": principal.as_str(),
            "kind": kind.as_str(),
            "role": role.as_str(),
            "expires_at": expires_at.map(rfc3339),
        })),
    )
        .into_response())
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BreakGlassRequest {
    /// Required: why the operator steps in (kept in the organization's audit log).
    pub reason: Option<String>,
    /// Who the token is for; `break-glass-admin` by default.
    pub principal: Option<String>,
}

/// `POST /v1/orgs/{org}/admin-tokens {"reason", "principal"?}` → 201 with a new org_admin
/// token, shown once. The operator's break-glass for an organization left without an admin
/// (e.g. `POST /v1/orgs` committed but could not be read back, so its first token was
/// revoked). Operator token only; the issue is a `TokenIssued` event with the operator as
/// the actor and the reason, in the organization's audit log like any token (ADR 0017).
#[utoipa::path(
    post,
    path = "/v1/orgs/{org}/admin-tokens",
    tag = "access",
    summary = "Break-glass org_admin token (operator token, audited)",
    params(
        crate::openapi::OrgPath
    ),
    request_body = BreakGlassRequest,
    responses(
        (status = 201, description = "The token, shown this once", body = crate::openapi::TokenCreatedDoc)
    )
)]
pub async fn break_glass_admin_token(
    State(state): State<AppState>,
    caller: Caller,
    path: Result<Path<String>, PathRejection>,
    JsonBody(body): JsonBody<BreakGlassRequest>,
) -> Result<Response, ApiError> {
    if !caller.is_operator() {
        return Err(ApiError::forbidden(
            "only the platform operator issues break-glass admin tokens; org admins use \
             POST /v1/orgs/{org}/tokens",
        ));
    }
    let org =
        OrgId::parse(&path_parts(path)?).map_err(|e| ApiError::invalid(format!("org: {e}")))?;
    let reason = crate::routes::reason(body.reason.as_deref(), true)?;
    let principal = PrincipalName::parse(body.principal.as_deref().unwrap_or("break-glass-admin"))
        .map_err(|e| ApiError::invalid(e.to_string()))?;
    match state.app.scope(org.scope_id()).await? {
        Some(found) if found.scope.kind == ScopeKind::Organization => {}
        _ => return Err(ApiError::not_found(ORG_NOT_FOUND)),
    }
    let role = OrgRole::OrgAdmin;
    let kind = PrincipalKind::User;
    let token = state
        .app
        .issue_token(org, &principal, kind, role, None, &caller.metadata(reason))
        .await?;
    tracing::warn!(
        org_id = %org,
        token_id = %token.id,
        principal = principal.as_str(),
        "break-glass org_admin token issued by the operator"
    );
    Ok((
        StatusCode::CREATED,
        Json(json!({
            "id": token.id,
            "token": token.secret,
            "org_id": org.to_string(),
            "principal": principal.as_str(),
            "kind": kind.as_str(),
            "role": role.as_str(),
            "expires_at": null,
        })),
    )
        .into_response())
}

/// `GET /v1/orgs/{org}/tokens`: every token of the organization, never a secret.
#[utoipa::path(
    get,
    path = "/v1/orgs/{org}/tokens",
    tag = "access",
    summary = "The organization's tokens (never a secret)",
    params(
        crate::openapi::OrgPath,
        crate::openapi::PageParams,
        crate::openapi::IfNoneMatch
    ),
    responses(
        (status = 200, description = "A page", body = crate::openapi::TokenPageDoc, headers(("ETag" = String, description = "Entity tag"))),
        (status = 304, description = "Not modified (If-None-Match).")
    )
)]
pub async fn list_tokens(
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
        list: List::Tokens,
        query: &[org_text.as_str()],
    };
    let after: Option<(i64, String)> = query
        .get("cursor")
        .map(|c| binding.decode_json(c))
        .transpose()?;
    // The list is read from SQL, which the runner brings up to the commands a moment
    // later: settle first, so a token just issued is listed.
    state.app.refresh().await?;
    let mut tokens = state
        .app
        .tokens()
        .list_page(org, after, i64::from(limit) + 1)
        .await
        .map_err(AppError::Store)?;
    let more = tokens.len() > limit as usize;
    tokens.truncate(limit as usize);
    let next_cursor = match tokens.last() {
        Some(last) if more => Some(binding.encode_json(&json!([last.created_at, last.id]))),
        _ => None,
    };
    let items: Vec<Value> = tokens
        .into_iter()
        .map(|t| {
            json!({
                "id": t.id,
                "principal": t.principal,
                "kind": t.kind,
                "role": t.role,
                "created_at": rfc3339(from_micros(t.created_at)),
                "expires_at": t.expires_at.map(|at| rfc3339(from_micros(at))),
                "revoked_at": t.revoked_at.map(|at| rfc3339(from_micros(at))),
            })
        })
        .collect();
    conditional_json(
        &headers,
        None,
        &json!({"items": items, "next_cursor": next_cursor}),
    )
}

/// `DELETE /v1/orgs/{org}/tokens/{id}`: the token stops working at once on this instance
/// (and within a second on others).
#[utoipa::path(
    delete,
    path = "/v1/orgs/{org}/tokens/{id}",
    tag = "access",
    summary = "Revoke a token",
    params(
        crate::openapi::OrgPath,
        ("id" = String, Path, description = "The token's id.")
    ),
    responses(
        (status = 200, description = "Revoked", body = crate::openapi::TokenRevokedDoc)
    )
)]
pub async fn revoke_token(
    State(state): State<AppState>,
    caller: Caller,
    path: Result<Path<(String, String)>, PathRejection>,
) -> Result<Response, ApiError> {
    let (org, token_id) = path_parts(path)?;
    let org = own_org(&caller, &org)?;
    if !state
        .app
        .revoke_token(org, &token_id, &caller.metadata(None))
        .await?
    {
        return Err(ApiError::not_found(
            "no token with this id in this organization",
        ));
    }
    Ok(Json(json!({"id": token_id, "revoked": true})).into_response())
}
