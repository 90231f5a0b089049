//! The HTTP routes, one file per resource, and what their handlers share: finding the scope
//! or organization a caller may see, parsing reasons, versions (`If-Match`) and page sizes,
//! setting the `ETag`.
//!
//! - `system`: liveness, readiness, `GET /v1/me`;
//! - `orgs`: organizations, their tier and the name search;
//! - `scopes`: scopes, their lifecycle and their past states;
//! - `master_key`: an organization's master key;
//! - `tokens` and `grants`: access, managed by org admins;
//! - `audit`: the audit log (list, signed export, verify, the public signing key);
//! - `data_plane`: encrypt, decrypt, data keys, rewrap.

use std::collections::HashMap;

use axum::extract::rejection::PathRejection;
use axum::extract::Path;
use axum::http::{header, HeaderMap, HeaderValue};
use axum::response::Response;
use ekm_domain::{Permission, Reason, ScopeId, ScopeKind};
use ekm_projections::ScopeSnapshot;

use crate::context::Caller;
use crate::endpoints::{Endpoints, Verb};
use crate::error::ApiError;
use crate::state::AppState;
use ekm_service::AppError;

pub mod access;
pub mod audit;
pub(crate) mod data_plane;
mod grants;
mod justification;
mod key_versions;
mod master_key;
mod orgs;
mod rate_limits;
pub(crate) mod scopes;
pub(crate) mod system;
mod tokens;

/// Every endpoint: method, path and handler. The router is built from this list and the
/// access-control matrix test reads it, so an endpoint cannot be added without a row there.
pub(crate) fn register(endpoints: &mut Endpoints) {
    use Verb::{Delete, Get, Post, Put};
    endpoints.add(Get, "/healthz", system::healthz);
    endpoints.add(Get, "/readyz", system::readyz);
    endpoints.add(Get, "/metrics", system::metrics);
    endpoints.add(Post, "/v1/orgs", orgs::create_org);
    endpoints.add(Get, "/v1/orgs/{org}", orgs::get_org);
    endpoints.add(Put, "/v1/orgs/{org}/tier", orgs::change_tier);
    endpoints.add(Put, "/v1/orgs/{org}/plan", orgs::change_plan);
    endpoints.add(Get, "/v1/orgs/{org}/policy", orgs::policy);
    endpoints.add(Put, "/v1/orgs/{org}/policy", orgs::set_policy);
    endpoints.add(Get, "/v1/orgs/{org}/schedule", orgs::schedule);
    endpoints.add(Get, "/v1/orgs/{org}/limits", rate_limits::get);
    endpoints.add(Put, "/v1/orgs/{org}/limits", rate_limits::put);
    endpoints.add(Put, "/v1/orgs/{org}/master-key", master_key::set);
    endpoints.add(Get, "/v1/orgs/{org}/master-key", master_key::show);
    endpoints.add(Post, "/v1/orgs/{org}/tokens", tokens::create_token);
    endpoints.add(Get, "/v1/orgs/{org}/tokens", tokens::list_tokens);
    endpoints.add(Delete, "/v1/orgs/{org}/tokens/{id}", tokens::revoke_token);
    endpoints.add(Post, "/v1/orgs/{org}/grants", grants::add_grant);
    endpoints.add(Get, "/v1/orgs/{org}/grants", grants::list_grants);
    endpoints.add(
        Delete,
        "/v1/orgs/{org}/grants/{principal}/{permission}",
        grants::remove_grant,
    );
    endpoints.add(Post, "/v1/scopes", scopes::create_scope);
    endpoints.add(Get, "/v1/scopes/{id}", scopes::get_scope);
    endpoints.add(Get, "/v1/scopes/{id}/children", scopes::list_children);
    endpoints.add(Post, "/v1/scopes/{id}/pause", scopes::pause);
    endpoints.add(Post, "/v1/scopes/{id}/resume", scopes::resume);
    endpoints.add(Post, "/v1/scopes/{id}/revoke", scopes::revoke);
    endpoints.add(
        Post,
        "/v1/scopes/{id}/cancel-revocation",
        scopes::cancel_revocation,
    );
    endpoints.add(
        Put,
        "/v1/scopes/{id}/rotation-period",
        scopes::set_rotation_period,
    );
    endpoints.add(Post, "/v1/scopes/{id}/rotate", scopes::rotate);
    endpoints.add(Post, "/v1/scopes/{id}/retire", scopes::retire);
    endpoints.add(Get, "/v1/scopes/{id}/state", scopes::state_as_of);
    endpoints.add(Get, "/v1/scopes/{id}/access-at", scopes::access_as_of);
    endpoints.add(
        Put,
        "/v1/scopes/{id}/min-decryption-version",
        key_versions::set_floor,
    );
    endpoints.add(Get, "/v1/scopes/{id}/key-versions", key_versions::list);
    endpoints.add(
        Get,
        "/v1/scopes/{id}/justification-policy",
        justification::get,
    );
    endpoints.add(
        Put,
        "/v1/scopes/{id}/justification-policy",
        justification::put,
    );
    endpoints.add(Get, "/v1/audit", audit::list);
    endpoints.add(Get, "/v1/audit/export", audit::export);
    endpoints.add(Get, "/v1/audit/verify", audit::verify);
    endpoints.add(Get, "/v1/audit/signing-key", audit::signing_key);
    endpoints.add(Get, "/v1/audit/access", access::list);
    endpoints.add(Get, "/v1/audit/access/export", access::export);
    endpoints.add(Get, "/v1/scopes/{id}/access-summary", access::summary);
    endpoints.add(Get, "/v1/me", system::me);
    endpoints.add(Get, "/v1/orgs/{org}/scopes", orgs::search_scopes);
    endpoints.add(
        Post,
        "/v1/orgs/{org}/admin-tokens",
        tokens::break_glass_admin_token,
    );
    endpoints.add(Get, "/v1/openapi.json", crate::openapi::serve);
    data_plane::register(endpoints);
}

/// The OpenAPI document's operations and schemas (`crate::openapi` completes it). Every
/// handler registered above is listed here; a test holds the two lists equal.
#[derive(utoipa::OpenApi)]
#[openapi(paths(
    system::healthz,
    system::readyz,
    system::metrics,
    system::me,
    orgs::create_org,
    orgs::get_org,
    orgs::change_tier,
    orgs::change_plan,
    orgs::policy,
    orgs::set_policy,
    orgs::schedule,
    orgs::search_scopes,
    rate_limits::get,
    rate_limits::put,
    master_key::set,
    master_key::show,
    tokens::create_token,
    tokens::list_tokens,
    tokens::revoke_token,
    tokens::break_glass_admin_token,
    grants::add_grant,
    grants::list_grants,
    grants::remove_grant,
    scopes::create_scope,
    scopes::get_scope,
    scopes::list_children,
    scopes::pause,
    scopes::resume,
    scopes::revoke,
    scopes::cancel_revocation,
    scopes::set_rotation_period,
    scopes::rotate,
    scopes::retire,
    scopes::state_as_of,
    scopes::access_as_of,
    key_versions::set_floor,
    key_versions::list,
    justification::get,
    justification::put,
    audit::list,
    audit::export,
    audit::verify,
    audit::signing_key,
    access::list,
    access::export,
    access::summary,
    data_plane::encrypt,
    data_plane::decrypt,
    data_plane::rewrap,
    data_plane::datakey,
    crate::console::index,
    crate::console::asset,
    crate::openapi::serve,
))]
pub(crate) struct ApiDoc;

pub(crate) const DEFAULT_PAGE: u32 = 50;

pub(crate) const MAX_PAGE: u32 = 500;

pub(crate) fn parse_scope_id(text: &str) -> Result<ScopeId, ApiError> {
    ScopeId::parse(text).map_err(|e| ApiError::invalid(e.to_string()))
}

pub(crate) fn path_text_ref(path: &Result<Path<String>, PathRejection>) -> Option<String> {
    path.as_ref().ok().map(|Path(text)| text.clone())
}

pub(crate) fn path_text(path: Result<Path<String>, PathRejection>) -> Result<String, ApiError> {
    path.map(|Path(text)| text)
        .map_err(|_| ApiError::invalid("the path is not valid"))
}

/// The scope `id` if this caller may see it; otherwise the same 404 as for a scope that does
/// not exist, so that ids of other organizations reveal nothing.
/// The scope `id` if it is in the caller's organization (else 404, as if it did not exist)
/// and the caller holds `permission` on it (else 403).
pub(crate) async fn visible_scope(
    state: &AppState,
    caller: &Caller,
    id: &str,
    permission: Permission,
) -> Result<ScopeSnapshot, ApiError> {
    if caller.is_operator() {
        return Err(AppError::OperatorHasNoScopes.into());
    }
    let id = parse_scope_id(id)?;
    Ok(state.app.visible_scope(caller, id, permission).await?)
}

/// Refuses a query string with a parameter outside `allowed`, naming it.
pub(crate) fn check_keys(
    query: &HashMap<String, String>,
    allowed: &[&str],
) -> Result<(), ApiError> {
    match query.keys().find(|k| !allowed.contains(&k.as_str())) {
        Some(unknown) => Err(ApiError::invalid(format!(
            "unknown query parameter `{}` (expected {})",
            unknown.chars().take(64).collect::<String>(),
            allowed.join(", ")
        ))),
        None => Ok(()),
    }
}

pub(crate) const ORG_NOT_FOUND: &str = "no organization with this id is visible to this token";

/// The organization named in the path, like `visible_scope`, and 404 for a scope that is
/// not an organization.
pub(crate) async fn visible_org(
    state: &AppState,
    caller: &Caller,
    path: Result<Path<String>, PathRejection>,
    permission: Permission,
) -> Result<ScopeSnapshot, ApiError> {
    let org = visible_scope(state, caller, &path_text(path)?, permission).await?;
    if org.scope.kind != ScopeKind::Organization {
        return Err(ApiError::not_found(ORG_NOT_FOUND));
    }
    Ok(org)
}

pub(crate) fn parse_field<T: std::str::FromStr<Err = ekm_domain::ValueError>>(
    value: Option<&str>,
    default: T,
) -> Result<T, ApiError> {
    match value {
        None => Ok(default),
        Some(text) => text
            .parse()
            .map_err(|e: ekm_domain::ValueError| ApiError::invalid(e.to_string())),
    }
}

/// An `expires_at` a client sent: RFC 3339, in the future, as events record it (UTC,
/// microseconds), and only an instant whose record reads back (RFC 3339 has four-digit
/// years). Tokens and grants share it.
pub(crate) fn future_expiry(text: &str) -> Result<chrono::DateTime<chrono::Utc>, ApiError> {
    use chrono::{DateTime, Utc};
    let at = DateTime::parse_from_rfc3339(text)
        .map_err(|_| ApiError::invalid("expires_at: not an RFC 3339 time"))?
        .with_timezone(&Utc);
    if at <= Utc::now() {
        return Err(ApiError::invalid("expires_at: must be in the future"));
    }
    let at = ekm_store::time::from_micros(at.timestamp_micros());
    if DateTime::parse_from_rfc3339(&ekm_store::time::rfc3339(at)).is_err() {
        return Err(ApiError::invalid(
            "expires_at: must be before the year 10000",
        ));
    }
    Ok(at)
}

pub(crate) fn reason(value: Option<&str>, required: bool) -> Result<Option<Reason>, ApiError> {
    match value {
        None if required => Err(ApiError::invalid(
            "reason: required; say why, it is kept in the audit log",
        )),
        None => Ok(None),
        Some(text) => Reason::parse(text)
            .map(Some)
            .map_err(|e| ApiError::invalid(e.to_string())),
    }
}

/// The entity tag of a representation read with GET: `"<version>.<digest>"` for a scope
/// (`version` given), `"<digest>"` for a list; the digest is the first 16 bytes of the
/// body's SHA-256, in hex (128 bits: a list whose entries an admin chooses, such as grants,
/// must not be made to collide with a birthday search). A scope's body changes without its version when an ancestor's
/// state changes (a pause above it), so the version alone would let a client keep an
/// `active` it should no longer believe; `If-Match` takes the version before the dot.
pub(crate) fn representation_tag(version: Option<i64>, body: &[u8]) -> String {
    use sha2::Digest as _;
    let digest = hex::encode(&sha2::Sha256::digest(body)[..16]);
    match version {
        Some(version) => format!("\"{version}.{digest}\""),
        None => format!("\"{digest}\""),
    }
}

/// Answers `value` as JSON with its entity tag, or `304 Not Modified` (no body, the same
/// tag) when `If-None-Match` names that tag or is `*`. Compared weakly (RFC 9110, 13.1.2):
/// `W/` is set aside. A header that is not text matches nothing: the full answer.
pub(crate) fn conditional_json(
    headers: &HeaderMap,
    version: Option<i64>,
    value: &impl serde::Serialize,
) -> Result<Response, ApiError> {
    use axum::response::IntoResponse as _;
    let body = serde_json::to_vec(value).map_err(|e| crate::error::internal(&e))?;
    let tag = representation_tag(version, &body);
    let unchanged = headers
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .map(str::trim)
        .any(|listed| listed == "*" || listed.strip_prefix("W/").unwrap_or(listed) == tag);
    let mut response = match unchanged {
        true => axum::http::StatusCode::NOT_MODIFIED.into_response(),
        false => (
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            )],
            body,
        )
            .into_response(),
    };
    if let Ok(value) = HeaderValue::from_str(&tag) {
        response.headers_mut().insert(header::ETAG, value);
    }
    Ok(response)
}

/// An ISO 8601 duration a client sent for `field` (`None`: none), checked by `parse` and
/// kept in canonical form (`RevokeWindow`, `RotationPeriod`).
pub(crate) fn duration_field<T: std::fmt::Display>(
    text: Option<&str>,
    parse: impl Fn(&str) -> Result<T, ekm_domain::ValueError>,
) -> Result<Option<String>, ApiError> {
    text.map(|t| parse(t).map(|d| d.to_string()))
        .transpose()
        .map_err(|e| ApiError::invalid(e.to_string()))
}

/// A command's answer: `body` with `"changed"`, tagged with the scope's new version.
pub(crate) fn changed_answer(
    mut body: serde_json::Value,
    outcome: &ekm_service::app::Outcome,
) -> Response {
    use axum::response::IntoResponse;
    if let Some(object) = body.as_object_mut() {
        object.insert("changed".into(), serde_json::Value::Bool(outcome.changed));
    }
    let mut response = axum::Json(body).into_response();
    etag(&mut response, outcome.scope.scope.version);
    response
}

pub(crate) fn etag(response: &mut Response, version: i64) {
    if let Ok(value) = HeaderValue::from_str(&format!("\"{version}\"")) {
        response.headers_mut().insert(header::ETAG, value);
    }
}

/// A scope's path as the logs keep it: its ids, organization first, joined by `/`.
pub(crate) fn joined_path<T: ToString>(path: &[T]) -> String {
    path.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("/")
}

pub(crate) fn page_limit(value: Option<&String>) -> Result<u32, ApiError> {
    match value {
        None => Ok(DEFAULT_PAGE),
        Some(text) => match text.parse::<u32>() {
            Ok(n) if (1..=MAX_PAGE).contains(&n) => Ok(n),
            _ => Err(ApiError::invalid(format!(
                "limit: must be a whole number from 1 to {MAX_PAGE}"
            ))),
        },
    }
}

/// `If-Match: "N"` (or `N`, or `W/"N"`, or the tag a GET gave, `"N.<digest>"`: its
/// version is what counts); `*` or no header means any version.
pub(crate) fn expected_version(headers: &HeaderMap) -> Result<Option<i64>, ApiError> {
    let Some(value) = headers.get(header::IF_MATCH) else {
        return Ok(None);
    };
    let invalid = || ApiError::invalid("If-Match: expected the scope's version, as in \"3\"");
    let text = value.to_str().map_err(|_| invalid())?.trim();
    if text == "*" {
        return Ok(None);
    }
    let text = text.strip_prefix("W/").unwrap_or(text);
    let text = text.trim_matches('"');
    let text = text.split_once('.').map_or(text, |(version, _)| version);
    text.parse::<i64>().map(Some).map_err(|_| invalid())
}
