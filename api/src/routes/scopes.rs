//! Scopes: creation, reading, children, the lifecycle (pause, resume, revoke, rotate, retire,
//! with `?dry_run=true` on pause and revoke) and the state at an earlier point.

use std::collections::HashMap;

use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use ekm_domain::{Permission, Reason, RevokeWindow, ScopeId, ScopeKind, ScopeName};
use ekm_projections::AsOf;
use ekm_service::app::{Action, Outcome};
use ekm_store::time::rfc3339;
use serde_json::json;

use super::*;
use crate::context::Caller;
use crate::cursor::{Binding, List};
use crate::dto::{
    AccessAtJson, CreateScopeRequest, JsonBody, LifecycleJson, ListJson, OptionalJsonBody,
    PastScopeJson, PauseRequest, ReasonRequest, RetireRequest, RevokeRequest, ScopeJson,
};
use crate::error::{ApiError, Code};
use crate::state::AppState;

#[utoipa::path(
    post,
    path = "/v1/scopes",
    tag = "scopes",
    summary = "Create a scope under a parent",
    request_body = crate::dto::CreateScopeRequest,
    responses(
        (status = 201, description = "Created", body = crate::dto::ScopeJson, headers(("ETag" = String, description = "Entity tag")))
    )
)]
pub(crate) async fn create_scope(
    State(state): State<AppState>,
    caller: Caller,
    JsonBody(body): JsonBody<CreateScopeRequest>,
) -> Result<Response, ApiError> {
    // Only kinds this server knows: a made-up name is refused, never remembered.
    let kind = ScopeKind::known(&body.kind).map_err(|e| ApiError::invalid(e.to_string()))?;
    if kind == ScopeKind::Organization {
        return Err(ApiError::invalid(
            "kind: organizations are created with POST /v1/orgs",
        ));
    }
    let name = ScopeName::parse(&body.name).map_err(|e| ApiError::invalid(e.to_string()))?;
    let parent = visible_scope(
        &state,
        &caller,
        &body.parent_id,
        Permission::EncryptionManage,
    )
    .await
    .map_err(|e| match e.code() {
        Code::NotFound => {
            ApiError::not_found("parent_id: no scope with this id is visible to this token")
        }
        _ => e,
    })?;
    let outcome = state
        .app
        .create_scope(&parent, kind, name, &caller.metadata(None))
        .await?;
    let mut response = (StatusCode::CREATED, Json(ScopeJson::from(&outcome.scope))).into_response();
    if let Ok(location) = HeaderValue::from_str(&format!("/v1/scopes/{}", outcome.scope.scope.id)) {
        response.headers_mut().insert(header::LOCATION, location);
    }
    etag(&mut response, outcome.scope.scope.version);
    Ok(response)
}

#[utoipa::path(
    get,
    path = "/v1/scopes/{id}",
    tag = "scopes",
    summary = "A scope, with its effective state and cause",
    params(
        crate::openapi::ScopePath,
        crate::openapi::IfNoneMatch
    ),
    responses(
        (status = 200, description = "The scope", body = crate::dto::ScopeJson, headers(("ETag" = String, description = "Entity tag"))),
        (status = 304, description = "Not modified (If-None-Match).")
    )
)]
pub(crate) async fn get_scope(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    path: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let snapshot = visible_scope(
        &state,
        &caller,
        &path_text(path)?,
        Permission::EncryptionView,
    )
    .await?;
    conditional_json(
        &headers,
        Some(snapshot.scope.version),
        &ScopeJson::from(&snapshot),
    )
}

#[utoipa::path(
    get,
    path = "/v1/scopes/{id}/children",
    tag = "scopes",
    summary = "A scope's children",
    params(
        crate::openapi::ScopePath,
        crate::openapi::PageParams
    ),
    responses(
        (status = 200, description = "A page", body = crate::openapi::ScopePageDoc)
    )
)]
pub(crate) async fn list_children(
    State(state): State<AppState>,
    caller: Caller,
    path: Result<Path<String>, PathRejection>,
    query: Result<Query<HashMap<String, String>>, QueryRejection>,
) -> Result<Json<ListJson<ScopeJson>>, ApiError> {
    let Query(query) = query.map_err(|_| ApiError::invalid("the query string is not valid"))?;
    check_keys(&query, &["cursor", "limit"])?;
    let parent = visible_scope(
        &state,
        &caller,
        &path_text(path)?,
        Permission::EncryptionView,
    )
    .await?;
    let parent_id = parent.scope.id.to_string();
    let binding = Binding {
        list: List::Children,
        query: &[&parent_id],
    };
    let after = match query.get("cursor") {
        None => None,
        Some(cursor) => {
            let after = binding.decode_scope(cursor)?;
            // Only a child of this parent continues this list.
            match state.app.scope(after).await? {
                Some(child) if child.scope.parent_id == Some(parent.scope.id) => Some(after),
                _ => return Err(crate::cursor::invalid()),
            }
        }
    };
    let limit = page_limit(query.get("limit"))?;
    let page = state.app.children(&parent, after, limit).await?;
    Ok(Json(ListJson {
        items: page.items.iter().map(ScopeJson::from).collect(),
        next_cursor: page.next_after.map(|last| binding.encode_scope(last)),
    }))
}

pub(crate) async fn lifecycle(
    state: AppState,
    caller: Caller,
    path: Result<Path<String>, PathRejection>,
    headers: &HeaderMap,
    action: Action,
    reason: Option<Reason>,
) -> Result<Response, ApiError> {
    let scope = visible_scope(
        &state,
        &caller,
        &path_text(path)?,
        Permission::EncryptionManage,
    )
    .await?;
    let expected = expected_version(headers)?;
    let outcome: Outcome = state
        .app
        .act(scope.scope.id, action, &caller.metadata(reason), expected)
        .await?;
    let version = outcome.scope.scope.version;
    let mut response = Json(LifecycleJson {
        scope: ScopeJson::from(&outcome.scope),
        changed: outcome.changed,
    })
    .into_response();
    etag(&mut response, version);
    Ok(response)
}

/// `?dry_run=true` on pause and revoke: check the rules and count the blast radius,
/// record nothing.
fn is_dry_run(
    query: Result<Query<HashMap<String, String>>, QueryRejection>,
) -> Result<bool, ApiError> {
    let Query(query) = query.map_err(|_| ApiError::invalid("the query string is not valid"))?;
    check_keys(&query, &["dry_run"])?;
    match query.get("dry_run").map(String::as_str) {
        None | Some("false") => Ok(false),
        Some("true") => Ok(true),
        Some(_) => Err(ApiError::invalid("dry_run: expected true or false")),
    }
}

async fn dry_run(
    state: AppState,
    caller: Caller,
    path: Result<Path<String>, PathRejection>,
    action: Action,
) -> Result<Response, ApiError> {
    let scope = visible_scope(
        &state,
        &caller,
        &path_text(path)?,
        Permission::EncryptionManage,
    )
    .await?;
    let (name, due_at) = match &action {
        Action::Revoke { .. } => ("revoke", None),
        Action::ScheduleRevocation { due_at, .. } => ("revoke", Some(due_at.clone())),
        _ => ("pause", None),
    };
    let (scope, would_change, radius) = state.app.dry_run(scope.scope.id, action).await?;
    let count = |map: &std::collections::BTreeMap<&'static str, i64>| json!({ "total": map.values().sum::<i64>(), "by_kind": map });
    Ok(Json(json!({
        "dry_run": true,
        "action": name,
        "scope": ScopeJson::from(&scope),
        "would_change": would_change,
        "scopes_in_subtree": radius.total,
        "would_become_inactive": count(&radius.would_become_inactive),
        "already_inactive": count(&radius.already_inactive),
        // A revoke with a waiting period: when it would fall due (absent: at once).
        "due_at": due_at,
    }))
    .into_response())
}

/// The longest a pause may be given to last before the scheduler resumes it.
const MAX_PAUSE_DAYS: i64 = 366;

/// `until` as the instant a pause ends: RFC 3339, in the future, within a year; normalized
/// to UTC with microseconds (the form the scheduler fires with).
fn pause_until(until: &str) -> Result<String, ApiError> {
    let at = chrono::DateTime::parse_from_rfc3339(until)
        .map_err(|_| ApiError::invalid("until: an RFC 3339 instant, e.g. 2026-12-24T08:00:00Z"))?
        .with_timezone(&chrono::Utc);
    let now = chrono::Utc::now();
    if at <= now {
        return Err(ApiError::invalid("until: must lie in the future"));
    }
    if at > now + chrono::Duration::days(MAX_PAUSE_DAYS) {
        return Err(ApiError::invalid("until: at most 366 days ahead"));
    }
    Ok(rfc3339(at))
}

#[utoipa::path(
    post,
    path = "/v1/scopes/{id}/pause",
    tag = "lifecycle",
    summary = "Pause a scope and its subtree",
    params(
        crate::openapi::ScopePath,
        ("dry_run" = Option<bool>, Query, description = "`true`: check the rules and count what would change; record nothing."),
        crate::openapi::IfMatch
    ),
    request_body = crate::dto::PauseRequest,
    responses(
        (status = 200, description = "The scope and `changed`, or a dry run", body = crate::openapi::LifecycleOrDryRunDoc)
    )
)]
pub(crate) async fn pause(
    State(state): State<AppState>,
    caller: Caller,
    path: Result<Path<String>, PathRejection>,
    query: Result<Query<HashMap<String, String>>, QueryRejection>,
    headers: HeaderMap,
    OptionalJsonBody(body): OptionalJsonBody<PauseRequest>,
) -> Result<Response, ApiError> {
    let action = match body.until.as_deref() {
        Some(until) => Action::PauseUntil(pause_until(until)?),
        None => Action::Pause,
    };
    if is_dry_run(query)? {
        return dry_run(state, caller, path, action).await;
    }
    let reason = reason(body.reason.as_deref(), true)?;
    lifecycle(state, caller, path, &headers, action, reason).await
}

#[utoipa::path(
    post,
    path = "/v1/scopes/{id}/resume",
    tag = "lifecycle",
    summary = "Resume a paused scope",
    params(
        crate::openapi::ScopePath,
        crate::openapi::IfMatch
    ),
    request_body = crate::dto::ReasonRequest,
    responses(
        (status = 200, description = "The scope and `changed`", body = crate::dto::LifecycleJson)
    )
)]
pub(crate) async fn resume(
    State(state): State<AppState>,
    caller: Caller,
    path: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    OptionalJsonBody(body): OptionalJsonBody<ReasonRequest>,
) -> Result<Response, ApiError> {
    let reason = reason(body.reason.as_deref(), false)?;
    lifecycle(state, caller, path, &headers, Action::Resume, reason).await
}

/// The waiting period of a revoke: `immediately`, else `after`, else the organization's
/// `revoke_window`, else the default (P7D).
async fn revoke_window(
    state: &AppState,
    path: &Result<Path<String>, PathRejection>,
    body: &RevokeRequest,
) -> Result<RevokeWindow, ApiError> {
    match (body.immediately, body.after.as_deref()) {
        (Some(true), Some(_)) => Err(ApiError::invalid(
            "give either `immediately` or `after`, not both",
        )),
        (Some(true), None) => Ok(RevokeWindow::ZERO),
        (_, Some(after)) => {
            RevokeWindow::parse("after", after).map_err(|e| ApiError::invalid(e.to_string()))
        }
        (_, None) => {
            // The organization's policy. A scope this caller cannot see gets the default
            // here and `not_found` from the command, as any other.
            let Some(id) = path_text_ref(path).and_then(|p| ScopeId::parse(&p).ok()) else {
                return Ok(RevokeWindow::DEFAULT);
            };
            let org = match state.app.scope(id).await? {
                Some(scope) => state.app.scope(scope.scope.org_id.scope_id()).await?,
                None => None,
            };
            Ok(org
                .and_then(|o| o.scope.revoke_window)
                .and_then(|w| RevokeWindow::parse("revoke_window", &w).ok())
                .unwrap_or(RevokeWindow::DEFAULT))
        }
    }
}

/// `POST /v1/scopes/{id}/revoke {"confirm", "reason", "after"?, "immediately"?}`: revokes
/// for good at the end of a waiting period (issue 17 §1). Until then the scope is
/// `pending_revocation`, refused like paused, and the revocation can be cancelled; a
/// window of zero (`immediately`, `PT0S`) revokes now.
#[utoipa::path(
    post,
    path = "/v1/scopes/{id}/revoke",
    tag = "lifecycle",
    summary = "Revoke a scope for good, after a waiting period",
    params(
        crate::openapi::ScopePath,
        ("dry_run" = Option<bool>, Query, description = "`true`: check the rules and count what would change; record nothing."),
        crate::openapi::IfMatch
    ),
    request_body = crate::dto::RevokeRequest,
    responses(
        (status = 200, description = "The scope and `changed`, or a dry run", body = crate::openapi::LifecycleOrDryRunDoc)
    )
)]
pub(crate) async fn revoke(
    State(state): State<AppState>,
    caller: Caller,
    path: Result<Path<String>, PathRejection>,
    query: Result<Query<HashMap<String, String>>, QueryRejection>,
    headers: HeaderMap,
    OptionalJsonBody(body): OptionalJsonBody<RevokeRequest>,
) -> Result<Response, ApiError> {
    let dry = is_dry_run(query)?;
    let window = revoke_window(&state, &path, &body).await?;
    let confirm = match dry {
        true => path_text_ref(&path).unwrap_or_default(),
        false => body.confirm.clone().ok_or_else(|| {
            ApiError::invalid("confirm: required; repeat the scope's id to revoke it for good")
        })?,
    };
    let action = match window.is_zero() {
        true => Action::Revoke { confirm },
        false => {
            let seconds = i64::try_from(window.seconds()).unwrap_or(i64::MAX);
            Action::ScheduleRevocation {
                confirm,
                due_at: rfc3339(chrono::Utc::now() + chrono::Duration::seconds(seconds)),
                requested_by: caller.metadata(None).actor.to_string(),
            }
        }
    };
    if dry {
        return dry_run(state, caller, path, action).await;
    }
    let reason = reason(body.reason.as_deref(), true)?;
    lifecycle(state, caller, path, &headers, action, reason).await
}

#[derive(Debug, serde::Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct RotationPeriodRequest {
    /// Required: a period, or `null` to lift the scope's own.
    #[serde(default, deserialize_with = "super::orgs::present")]
    rotation_period: Option<Option<String>>,
    reason: Option<String>,
}

/// `PUT /v1/scopes/{id}/rotation-period {"rotation_period": "P30D" | null, "reason"?}`: the
/// scope's own key rotation period (issue 17 §2), which its subtree inherits unless a scope
/// below sets its own; `null` lifts it (the scope inherits again). Setting one needs the
/// enterprise plan; lifting one does not.
#[utoipa::path(
    put,
    path = "/v1/scopes/{id}/rotation-period",
    tag = "lifecycle",
    summary = "Set or lift the scope's key rotation period",
    params(
        crate::openapi::ScopePath,
        crate::openapi::IfMatch
    ),
    request_body = RotationPeriodRequest,
    responses(
        (status = 200, description = "The scope and `changed`", body = crate::dto::LifecycleJson)
    )
)]
pub(crate) async fn set_rotation_period(
    State(state): State<AppState>,
    caller: Caller,
    path: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    JsonBody(body): JsonBody<RotationPeriodRequest>,
) -> Result<Response, ApiError> {
    let period = body.rotation_period.ok_or_else(|| {
        ApiError::invalid("rotation_period: required (null lifts the scope's own period)")
    })?;
    let period = duration_field(period.as_deref(), |t| {
        ekm_domain::RotationPeriod::parse("rotation_period", t)
    })?;
    let reason = reason(body.reason.as_deref(), false)?;
    let action = Action::SetRotationPeriod(period);
    lifecycle(state, caller, path, &headers, action, reason).await
}

/// `POST /v1/scopes/{id}/cancel-revocation {"reason"}`: the pending revocation is cancelled
/// and the scope returns to the own state it had (`changed: false` when nothing was
/// pending). Works on any plan, like resume (ADR 0029).
#[utoipa::path(
    post,
    path = "/v1/scopes/{id}/cancel-revocation",
    tag = "lifecycle",
    summary = "Cancel a pending revocation",
    params(
        crate::openapi::ScopePath,
        crate::openapi::IfMatch
    ),
    request_body = crate::dto::ReasonRequest,
    responses(
        (status = 200, description = "The scope and `changed`", body = crate::dto::LifecycleJson)
    )
)]
pub(crate) async fn cancel_revocation(
    State(state): State<AppState>,
    caller: Caller,
    path: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    OptionalJsonBody(body): OptionalJsonBody<ReasonRequest>,
) -> Result<Response, ApiError> {
    let reason = reason(body.reason.as_deref(), true)?;
    lifecycle(
        state,
        caller,
        path,
        &headers,
        Action::CancelRevocation {
            now: rfc3339(chrono::Utc::now()),
        },
        reason,
    )
    .await
}

#[utoipa::path(
    post,
    path = "/v1/scopes/{id}/rotate",
    tag = "lifecycle",
    summary = "Rotate the scope's key",
    params(
        crate::openapi::ScopePath,
        crate::openapi::IfMatch
    ),
    request_body = crate::dto::ReasonRequest,
    responses(
        (status = 200, description = "The scope and `changed`", body = crate::dto::LifecycleJson)
    )
)]
pub(crate) async fn rotate(
    State(state): State<AppState>,
    caller: Caller,
    path: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    OptionalJsonBody(body): OptionalJsonBody<ReasonRequest>,
) -> Result<Response, ApiError> {
    let reason = reason(body.reason.as_deref(), false)?;
    lifecycle(state, caller, path, &headers, Action::Rotate, reason).await
}

/// `POST /v1/scopes/{id}/retire {"below": N}`: destroys the key material of every version
/// below N (N at most the current version). Rewrap ciphertexts first: a retired version
/// decrypts nothing.
#[utoipa::path(
    post,
    path = "/v1/scopes/{id}/retire",
    tag = "lifecycle",
    summary = "Destroy key versions below N",
    params(
        crate::openapi::ScopePath,
        crate::openapi::IfMatch
    ),
    request_body = crate::dto::RetireRequest,
    responses(
        (status = 200, description = "The scope and `changed`", body = crate::dto::LifecycleJson)
    )
)]
pub(crate) async fn retire(
    State(state): State<AppState>,
    caller: Caller,
    path: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    JsonBody(body): JsonBody<RetireRequest>,
) -> Result<Response, ApiError> {
    if body.below < 2 {
        return Err(ApiError::invalid(
            "below: at least 2 (version 1 is the first)",
        ));
    }
    let reason = reason(body.reason.as_deref(), false)?;
    let action = Action::RetireKeyVersions(ekm_domain::KeyVersion::new(body.below));
    lifecycle(state, caller, path, &headers, action, reason).await
}

/// `GET /v1/scopes/{id}/state?at=RFC3339` or `?position=N`: the scope as it was then,
/// computed from the events.
#[utoipa::path(
    get,
    path = "/v1/scopes/{id}/state",
    tag = "history",
    summary = "The scope as it was at an instant or position",
    params(
        crate::openapi::ScopePath,
        ("at" = Option<String>, Query, description = "RFC 3339 instant."),
        ("position" = Option<i64>, Query, description = "Event position.")
    ),
    responses(
        (status = 200, description = "The scope then", body = crate::dto::PastScopeJson)
    )
)]
pub(crate) async fn state_as_of(
    State(state): State<AppState>,
    caller: Caller,
    path: Result<Path<String>, PathRejection>,
    query: Result<Query<HashMap<String, String>>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(query) = query.map_err(|_| ApiError::invalid("the query string is not valid"))?;
    check_keys(&query, &["at", "position"])?;
    let as_of = match (query.get("at"), query.get("position")) {
        (Some(at), None) => AsOf::Time(instant(at)?),
        (None, Some(position)) => AsOf::Position(
            position
                .parse::<i64>()
                .ok()
                .filter(|p| *p >= 0)
                .ok_or_else(|| ApiError::invalid("position: expected a whole number"))?,
        ),
        _ => return Err(ApiError::invalid("give exactly one of `at` or `position`")),
    };
    // Visibility is decided on the scope as it is now: a scope of another organization is
    // not found, whatever the instant asked for.
    let current = visible_scope(
        &state,
        &caller,
        &path_text(path)?,
        Permission::EncryptionView,
    )
    .await?;
    let past = state
        .app
        .scope_as_of(current.scope.id, as_of)
        .await?
        .ok_or_else(|| ApiError::not_found("the scope did not exist yet at that point"))?;
    let at = match as_of {
        AsOf::Time(at) => Some(rfc3339(at)),
        AsOf::Position(_) => None,
    };
    Ok(Json(PastScopeJson::new(&past, at)).into_response())
}

/// `GET /v1/scopes/{id}/access-at?at=RFC3339`: who could decrypt the scope's data at that
/// instant: the principals whose `data:use` grants covered it, each with its tokens valid
/// then, and its effective state then (nobody while paused, revoked or unavailable, with the
/// cause). Computed from the events. An auditor's question: needs `audit:read` on the scope.
#[utoipa::path(
    get,
    path = "/v1/scopes/{id}/access-at",
    tag = "history",
    summary = "Who could decrypt the scope's data at an instant",
    params(
        crate::openapi::ScopePath,
        ("at" = String, Query, description = "RFC 3339 instant, not in the future.")
    ),
    responses(
        (status = 200, description = "The principals and their tokens then", body = crate::dto::AccessAtJson)
    )
)]
pub(crate) async fn access_as_of(
    State(state): State<AppState>,
    caller: Caller,
    path: Result<Path<String>, PathRejection>,
    query: Result<Query<HashMap<String, String>>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(query) = query.map_err(|_| ApiError::invalid("the query string is not valid"))?;
    check_keys(&query, &["at"])?;
    let at = instant(query.get("at").ok_or_else(|| {
        ApiError::invalid("at: required, an RFC 3339 time such as 2026-11-28T14:02:00Z")
    })?)?;
    if at > chrono::Utc::now() {
        return Err(ApiError::invalid(
            "at: is in the future; who could decrypt is known only up to now",
        ));
    }
    // Visibility is decided on the scope as it is now, as for `/state`.
    let current = visible_scope(&state, &caller, &path_text(path)?, Permission::AuditRead).await?;
    let access = state
        .app
        .access_as_of(current.scope.id, at)
        .await?
        .ok_or_else(|| ApiError::not_found("the scope did not exist yet at that instant"))?;
    Ok(Json(AccessAtJson::from(&access)).into_response())
}

/// The `at` of time travel: an RFC 3339 instant.
fn instant(text: &str) -> Result<chrono::DateTime<chrono::Utc>, ApiError> {
    chrono::DateTime::parse_from_rfc3339(text)
        .map(|t| t.with_timezone(&chrono::Utc))
        .map_err(|_| {
            ApiError::invalid("at: expected an RFC 3339 time such as 2026-11-28T14:02:00Z")
        })
}
