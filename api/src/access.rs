//! Tokens and grants of an organization, managed by its org admins. Issuing and revoking a
//! token and granting and removing a permission are events, so the audit log shows who did
//! what; token secrets are shown once and stored only as hashes.

use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use chrono::{DateTime, Utc};
use ekm_domain::{
    Grant, OrgId, OrgRole, Permission, PrincipalKind, PrincipalName, ScopeId, ScopeKind,
};
use ekm_store::time::{from_micros, rfc3339};
use ekm_store::Tokens;
use serde::Deserialize;
use serde_json::{json, Value};
use std::collections::HashMap;

use crate::app::{Action, AppError};
use crate::context::Caller;
use crate::dto::JsonBody;
use crate::error::ApiError;
use crate::routes::ORG_NOT_FOUND;
use crate::state::AppState;

/// The caller's own organization named in the path, for an org admin.
fn own_org(caller: &Caller, org: &str) -> Result<OrgId, ApiError> {
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

fn path_parts<T>(path: Result<Path<T>, PathRejection>) -> Result<T, ApiError> {
    path.map(|Path(p)| p)
        .map_err(|_| ApiError::invalid("the path is not valid"))
}

#[derive(Debug, Deserialize)]
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
    let expires_at = match body.expires_at.as_deref() {
        None => None,
        Some(text) => {
            let at = DateTime::parse_from_rfc3339(text)
                .map_err(|_| ApiError::invalid("expires_at: not an RFC 3339 time"))?
                .with_timezone(&Utc);
            if at <= Utc::now() {
                return Err(ApiError::invalid("expires_at: must be in the future"));
            }
            Some(at)
        }
    };
    let reason = crate::routes::reason(body.reason.as_deref(), false)?;
    let token = issue(
        &state, &caller, org, &principal, kind, role, expires_at, reason,
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

/// Records a `TokenIssued` event (the audit entry, with the caller as actor), then stores
/// the token's hash. Returns the token, whose secret is shown once.
#[allow(clippy::too_many_arguments)]
async fn issue(
    state: &AppState,
    caller: &Caller,
    org: OrgId,
    principal: &PrincipalName,
    kind: PrincipalKind,
    role: OrgRole,
    expires_at: Option<DateTime<Utc>>,
    reason: Option<ekm_domain::Reason>,
) -> Result<ekm_store::NewToken, ApiError> {
    let token = Tokens::new_token();
    let issued = state
        .app
        .act(
            org.scope_id(),
            Action::IssueToken {
                token_id: token.id.clone(),
                principal: principal.clone(),
                kind,
                role,
                expires_at: expires_at.map(rfc3339),
            },
            &caller.metadata(reason),
            None,
        )
        .await;
    match issued {
        // Recorded, even if the read models could not be brought up to it: the issue is
        // audited, so the token is stored and handed out as usual.
        Ok(_) | Err(AppError::Committed { .. }) => {}
        Err(other) => return Err(other.into()),
    }
    // The hash is stored once the issue is recorded: a token nobody audited never works.
    state
        .app
        .tokens()
        .issue(
            &token,
            org,
            principal.as_str(),
            kind.as_str(),
            role,
            expires_at.map(|at| at.timestamp_micros()),
        )
        .await
        .map_err(AppError::Store)?;
    Ok(token)
}

#[derive(Debug, Deserialize)]
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
    let token = issue(&state, &caller, org, &principal, kind, role, None, reason).await?;
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
pub async fn list_tokens(
    State(state): State<AppState>,
    caller: Caller,
    path: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let org = own_org(&caller, &path_parts(path)?)?;
    // The list is read from SQL, which the runner brings up to the commands a moment
    // later: settle first, so a token just issued is listed.
    state.app.refresh().await?;
    let tokens = state
        .app
        .tokens()
        .list(org)
        .await
        .map_err(AppError::Store)?;
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
    Ok(Json(json!({"items": items, "next_cursor": null})).into_response())
}

/// `DELETE /v1/orgs/{org}/tokens/{id}`: the token stops working at once on this instance
/// (and within a second on others).
pub async fn revoke_token(
    State(state): State<AppState>,
    caller: Caller,
    path: Result<Path<(String, String)>, PathRejection>,
) -> Result<Response, ApiError> {
    let (org, token_id) = path_parts(path)?;
    let org = own_org(&caller, &org)?;
    let owner = state
        .app
        .tokens()
        .org_of(&token_id)
        .await
        .map_err(AppError::Store)?;
    if owner != Some(Some(org.to_string())) {
        return Err(ApiError::not_found(
            "no token with this id in this organization",
        ));
    }
    // Revoke first: the refusal starts now, whatever happens to the event.
    state
        .app
        .tokens()
        .revoke(&token_id)
        .await
        .map_err(AppError::Store)?;
    state.app.forget_principals();
    let outcome = state
        .app
        .act(
            org.scope_id(),
            Action::RevokeToken(token_id.clone()),
            &caller.metadata(None),
            None,
        )
        .await;
    match outcome {
        // A token issued before token events existed has no event to revoke.
        // Committed: the revocation is recorded, though not yet read back.
        Ok(_)
        | Err(AppError::Rule(ekm_domain::ScopeError::TokenNotFound))
        | Err(AppError::Committed { .. }) => {}
        Err(other) => return Err(other.into()),
    }
    Ok(Json(json!({"id": token_id, "revoked": true})).into_response())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrantRequest {
    pub principal: String,
    pub permission: String,
    /// Limits the grant to this scope's subtree.
    pub scope_id: Option<String>,
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

fn grant_json(grant: &Grant) -> Value {
    json!({
        "principal": grant.principal.as_str(),
        "permission": grant.permission.as_str(),
        "scope_id": grant.scope.map(|s| s.to_string()),
    })
}

/// `POST /v1/orgs/{org}/grants {"principal", "permission", "scope_id"?}` → 201 (200 when
/// the grant existed already).
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
    let reason = crate::routes::reason(body.reason.as_deref(), false)?;
    let outcome = state
        .app
        .act(
            org.scope_id(),
            Action::Grant(grant.clone()),
            &caller.metadata(reason),
            None,
        )
        .await?;
    state.app.forget_principals();
    let mut body = grant_json(&grant);
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
        .act(
            org.scope_id(),
            Action::Ungrant(grant.clone()),
            &caller.metadata(None),
            None,
        )
        .await?;
    state.app.forget_principals();
    let mut body = grant_json(&grant);
    body["removed"] = json!(true);
    Ok(Json(body).into_response())
}

/// `GET /v1/orgs/{org}/grants`: every grant of the organization.
pub async fn list_grants(
    State(state): State<AppState>,
    caller: Caller,
    path: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let org = own_org(&caller, &path_parts(path)?)?;
    // As for tokens: a grant just added is listed.
    state.app.refresh().await?;
    let grants = state
        .app
        .tokens()
        .grants(org)
        .await
        .map_err(AppError::Store)?;
    let items: Vec<Value> = grants.iter().map(grant_json).collect();
    Ok(Json(json!({"items": items, "next_cursor": null})).into_response())
}
