//! Who is calling and from where: the bearer token's principal, the request id and the
//! source address, turned into event metadata.

use std::net::SocketAddr;

use axum::extract::{ConnectInfo, FromRequestParts};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, HeaderValue, Request};
use axum::middleware::Next;
use axum::response::Response;
use chrono::Utc;
use ekm_domain::{Actor, ActorKind, EventMetadata, OrgId, Permission, Reason, ScopeId};
use ekm_store::{Principal, Role};

use crate::error::ApiError;
use crate::state::AppState;

pub const REQUEST_ID_HEADER: &str = "x-request-id";

/// The request's id: the caller's `X-Request-Id` when it is sensible, else a fresh one.
#[derive(Clone, Debug)]
pub struct RequestId(pub String);

fn acceptable_request_id(value: &HeaderValue) -> Option<String> {
    let text = value.to_str().ok()?;
    let ok = !text.is_empty()
        && text.len() <= 128
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b));
    ok.then(|| text.to_owned())
}

/// Middleware: assigns the request id and echoes it in the response.
pub async fn request_id(mut request: Request<axum::body::Body>, next: Next) -> Response {
    let id = request
        .headers()
        .get(REQUEST_ID_HEADER)
        .and_then(acceptable_request_id)
        .unwrap_or_else(|| uuid::Uuid::now_v7().to_string());
    request.extensions_mut().insert(RequestId(id.clone()));
    let mut response = next.run(request).await;
    if let Ok(value) = HeaderValue::from_str(&id) {
        response.headers_mut().insert(REQUEST_ID_HEADER, value);
    }
    response
}

/// An authenticated caller and the facts about its request.
#[derive(Clone, Debug)]
pub struct Caller {
    pub principal: Principal,
    pub request_id: String,
    pub source_address: Option<String>,
}

impl Caller {
    pub fn metadata(&self, reason: Option<Reason>) -> EventMetadata {
        // The principal behind the token is the actor (the operator has only its token).
        let (kind, id) = match self.principal.role {
            Role::Operator => (ActorKind::Operator, self.principal.token_id.clone()),
            Role::Org(_) if self.principal.kind == "service" => {
                (ActorKind::Service, self.principal.principal.clone())
            }
            Role::Org(_) => (ActorKind::User, self.principal.principal.clone()),
        };
        EventMetadata {
            actor: Actor { kind, id },
            request_id: self.request_id.clone(),
            reason,
            source_address: self.source_address.clone(),
            recorded_at: ekm_store::time::rfc3339(Utc::now()),
            location: None,
        }
    }

    /// The organization this caller acts for; the operator acts for none.
    pub fn org(&self) -> Option<OrgId> {
        self.principal.org_id
    }

    pub fn is_operator(&self) -> bool {
        self.principal.role == Role::Operator
    }

    /// Whether the caller holds `permission` on the scope whose path (root first) is
    /// `path`: through its role, or a grant on the whole organization or on an ancestor of
    /// (or the scope itself). The caller's organization was checked before.
    pub fn holds(&self, permission: Permission, path: &[ScopeId]) -> bool {
        let by_role = match self.principal.role {
            Role::Operator => false,
            Role::Org(role) => role.holds(permission),
        };
        by_role
            || self.principal.grants.iter().any(|grant| {
                grant.permission.implies(permission)
                    && grant.scope.is_none_or(|scope| path.contains(&scope))
            })
    }

    /// Where in its organization the caller holds `permission`: `None` for everywhere (its
    /// role, or a grant on the whole organization), else the roots of the subtrees it was
    /// granted (possibly none). Lists filter by this, so they never page through rows the
    /// caller may not see.
    pub fn subtrees(&self, permission: Permission) -> Option<Vec<ScopeId>> {
        let everywhere = match self.principal.role {
            Role::Operator => false,
            Role::Org(role) => role.holds(permission),
        } || self
            .principal
            .grants
            .iter()
            .any(|grant| grant.permission.implies(permission) && grant.scope.is_none());
        if everywhere {
            return None;
        }
        Some(
            self.principal
                .grants
                .iter()
                .filter(|grant| grant.permission.implies(permission))
                .filter_map(|grant| grant.scope)
                .collect(),
        )
    }

    /// `holds`, as a refusal: 403 `forbidden` naming what is missing.
    pub fn require(&self, permission: Permission, path: &[ScopeId]) -> Result<(), ApiError> {
        if self.holds(permission, path) {
            Ok(())
        } else {
            Err(ApiError::forbidden(format!(
                "this token's principal does not hold {permission} here; an org admin can grant it"
            )))
        }
    }

    /// Org admins only (tokens and grants).
    pub fn require_org_admin(&self) -> Result<(), ApiError> {
        if self.principal.role == Role::ORG_ADMIN {
            Ok(())
        } else {
            Err(ApiError::forbidden(
                "only an org_admin manages tokens and grants",
            ))
        }
    }
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty() && t.len() <= 256)
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let token = bearer(&parts.headers).ok_or_else(ApiError::unauthorized)?;
        let principal = state
            .app
            .authenticate(token)
            .await?
            .ok_or_else(ApiError::unauthorized)?;
        let request_id = parts
            .extensions
            .get::<RequestId>()
            .map(|r| r.0.clone())
            .unwrap_or_default();
        let source_address = parts
            .extensions
            .get::<ConnectInfo<SocketAddr>>()
            .map(|c| c.0.ip().to_string());
        Ok(Caller {
            principal,
            request_id,
            source_address,
        })
    }
}
