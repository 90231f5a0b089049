//! The HTTP routes and their handlers.

use std::collections::HashMap;

use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use ekm_domain::{Permission, Plan, Reason, ScopeId, ScopeKind, ScopeName, Tier};
use ekm_projections::{AsOf, ScopeSnapshot};
use ekm_store::time::rfc3339;
use serde_json::json;

use crate::context::Caller;
use crate::cursor::{Binding, List};
use crate::dto::{
    CreateOrgRequest, CreateScopeRequest, CreatedOrgJson, JsonBody, LifecycleJson, ListJson,
    OptionalJsonBody, OrgJson, PastScopeJson, ReasonRequest, RetireRequest, RevokeRequest,
    ScopeJson, TierRequest,
};
use crate::endpoints::{Endpoints, Verb};
use crate::error::{ApiError, Code};
use crate::state::AppState;
use ekm_service::app::{Action, Outcome};

/// Every endpoint: method, path and handler. The router is built from this list and the
/// access-control matrix test reads it, so an endpoint cannot be added without a row there.
pub(crate) fn register(endpoints: &mut Endpoints) {
    use Verb::{Delete, Get, Post, Put};
    endpoints.add(Get, "/healthz", healthz);
    endpoints.add(Get, "/readyz", readyz);
    endpoints.add(Post, "/v1/orgs", create_org);
    endpoints.add(Get, "/v1/orgs/{org}", get_org);
    endpoints.add(Put, "/v1/orgs/{org}/tier", change_tier);
    endpoints.add(Put, "/v1/orgs/{org}/master-key", crate::master_key::set);
    endpoints.add(Get, "/v1/orgs/{org}/master-key", crate::master_key::show);
    endpoints.add(Post, "/v1/orgs/{org}/tokens", crate::access::create_token);
    endpoints.add(Get, "/v1/orgs/{org}/tokens", crate::access::list_tokens);
    endpoints.add(
        Delete,
        "/v1/orgs/{org}/tokens/{id}",
        crate::access::revoke_token,
    );
    endpoints.add(Post, "/v1/orgs/{org}/grants", crate::access::add_grant);
    endpoints.add(Get, "/v1/orgs/{org}/grants", crate::access::list_grants);
    endpoints.add(
        Delete,
        "/v1/orgs/{org}/grants/{principal}/{permission}",
        crate::access::remove_grant,
    );
    endpoints.add(Post, "/v1/scopes", create_scope);
    endpoints.add(Get, "/v1/scopes/{id}", get_scope);
    endpoints.add(Get, "/v1/scopes/{id}/children", list_children);
    endpoints.add(Post, "/v1/scopes/{id}/pause", pause);
    endpoints.add(Post, "/v1/scopes/{id}/resume", resume);
    endpoints.add(Post, "/v1/scopes/{id}/revoke", revoke);
    endpoints.add(Post, "/v1/scopes/{id}/rotate", rotate);
    endpoints.add(Post, "/v1/scopes/{id}/retire", retire);
    endpoints.add(Get, "/v1/scopes/{id}/state", state_as_of);
    endpoints.add(Get, "/v1/audit", crate::audit::list);
    endpoints.add(Get, "/v1/audit/export", crate::audit::export);
    endpoints.add(Get, "/v1/audit/verify", crate::audit::verify);
    endpoints.add(Get, "/v1/me", me);
    endpoints.add(Get, "/v1/orgs/{org}/scopes", search_scopes);
    endpoints.add(
        Post,
        "/v1/orgs/{org}/admin-tokens",
        crate::access::break_glass_admin_token,
    );
}

const SCOPE_NOT_FOUND: &str = "no scope with this id is visible to this token";
const DEFAULT_PAGE: u32 = 50;
const MAX_PAGE: u32 = 500;

async fn healthz() -> Json<serde_json::Value> {
    Json(json!({ "status": "ok" }))
}

async fn readyz(State(state): State<AppState>) -> Result<Json<serde_json::Value>, ApiError> {
    let unavailable = |what: &str| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            Code::Unavailable,
            format!("not ready: {what}"),
        )
    };
    let db = state.app.db();
    db.ping()
        .await
        .map_err(|_| unavailable("the database cannot be reached"))?;
    let head = db
        .head_position()
        .await
        .map_err(|_| unavailable("the event log cannot be read"))?;
    Ok(Json(json!({
        "status": "ready",
        "backend": db.backend_name(),
        "head_position": head,
        "applied_position": state.app.projector().applied(),
    })))
}

fn parse_scope_id(text: &str) -> Result<ScopeId, ApiError> {
    ScopeId::parse(text).map_err(|e| ApiError::invalid(e.to_string()))
}

fn path_text_ref(path: &Result<Path<String>, PathRejection>) -> Option<String> {
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
        return Err(ApiError::forbidden(
            "the operator token manages organizations only; use an organization's token",
        ));
    }
    let id = parse_scope_id(id)?;
    match state.app.scope(id).await? {
        Some(snapshot) if Some(snapshot.scope.org_id) == caller.org() => {
            caller.require(permission, &snapshot.scope.path)?;
            Ok(snapshot)
        }
        _ => Err(ApiError::not_found(SCOPE_NOT_FOUND)),
    }
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

fn parse_field<T: std::str::FromStr<Err = ekm_domain::ValueError>>(
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

pub(crate) fn etag(response: &mut Response, version: i64) {
    if let Ok(value) = HeaderValue::from_str(&format!("\"{version}\"")) {
        response.headers_mut().insert(header::ETAG, value);
    }
}

async fn create_org(
    State(state): State<AppState>,
    caller: Caller,
    JsonBody(body): JsonBody<CreateOrgRequest>,
) -> Result<Response, ApiError> {
    if !caller.is_operator() {
        return Err(ApiError::forbidden(
            "only the platform operator token creates organizations",
        ));
    }
    let name = ScopeName::parse(&body.name).map_err(|e| ApiError::invalid(e.to_string()))?;
    let plan = parse_field(body.plan.as_deref(), Plan::Standard)?;
    let tier = parse_field(body.tier.as_deref(), Tier::Default)?;
    let (outcome, token) = state
        .app
        .create_org(name, plan, tier, &caller.metadata(None))
        .await?;
    let json = CreatedOrgJson {
        org: OrgJson::from(&outcome.scope),
        admin_token: token.secret,
    };
    let mut response = (StatusCode::CREATED, Json(json)).into_response();
    if let Ok(location) = HeaderValue::from_str(&format!("/v1/orgs/{}", outcome.scope.scope.id)) {
        response.headers_mut().insert(header::LOCATION, location);
    }
    etag(&mut response, outcome.scope.scope.version);
    Ok(response)
}

async fn get_org(
    State(state): State<AppState>,
    caller: Caller,
    path: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let id = parse_scope_id(&path_text(path)?)?;
    let not_found = || ApiError::not_found(ORG_NOT_FOUND);
    let snapshot = state.app.scope(id).await?.ok_or_else(not_found)?;
    let visible = caller.is_operator() || Some(snapshot.scope.org_id) == caller.org();
    if !visible || snapshot.scope.kind != ScopeKind::Organization {
        return Err(not_found());
    }
    if !caller.is_operator() {
        caller.require(Permission::EncryptionView, &snapshot.scope.path)?;
    }
    let mut response = Json(OrgJson::from(&snapshot)).into_response();
    etag(&mut response, snapshot.scope.version);
    Ok(response)
}

async fn create_scope(
    State(state): State<AppState>,
    caller: Caller,
    JsonBody(body): JsonBody<CreateScopeRequest>,
) -> Result<Response, ApiError> {
    let kind: ScopeKind = body
        .kind
        .parse()
        .map_err(|e: ekm_domain::ValueError| ApiError::invalid(e.to_string()))?;
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

async fn get_scope(
    State(state): State<AppState>,
    caller: Caller,
    path: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let snapshot = visible_scope(
        &state,
        &caller,
        &path_text(path)?,
        Permission::EncryptionView,
    )
    .await?;
    let mut response = Json(ScopeJson::from(&snapshot)).into_response();
    etag(&mut response, snapshot.scope.version);
    Ok(response)
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

async fn list_children(
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

/// `If-Match: "N"` (or `N`, or `W/"N"`); `*` or no header means any version.
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
    text.parse::<i64>().map(Some).map_err(|_| invalid())
}

async fn lifecycle(
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
    let name = match action {
        Action::Revoke { .. } => "revoke",
        _ => "pause",
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
    }))
    .into_response())
}

async fn pause(
    State(state): State<AppState>,
    caller: Caller,
    path: Result<Path<String>, PathRejection>,
    query: Result<Query<HashMap<String, String>>, QueryRejection>,
    headers: HeaderMap,
    OptionalJsonBody(body): OptionalJsonBody<ReasonRequest>,
) -> Result<Response, ApiError> {
    if is_dry_run(query)? {
        return dry_run(state, caller, path, Action::Pause).await;
    }
    let reason = reason(body.reason.as_deref(), true)?;
    lifecycle(state, caller, path, &headers, Action::Pause, reason).await
}

async fn resume(
    State(state): State<AppState>,
    caller: Caller,
    path: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    OptionalJsonBody(body): OptionalJsonBody<ReasonRequest>,
) -> Result<Response, ApiError> {
    let reason = reason(body.reason.as_deref(), false)?;
    lifecycle(state, caller, path, &headers, Action::Resume, reason).await
}

async fn revoke(
    State(state): State<AppState>,
    caller: Caller,
    path: Result<Path<String>, PathRejection>,
    query: Result<Query<HashMap<String, String>>, QueryRejection>,
    headers: HeaderMap,
    OptionalJsonBody(body): OptionalJsonBody<RevokeRequest>,
) -> Result<Response, ApiError> {
    if is_dry_run(query)? {
        let confirm = path_text_ref(&path).unwrap_or_default();
        return dry_run(state, caller, path, Action::Revoke { confirm }).await;
    }
    let reason = reason(body.reason.as_deref(), true)?;
    let confirm = body.confirm.ok_or_else(|| {
        ApiError::invalid("confirm: required; repeat the scope's id to revoke it for good")
    })?;
    lifecycle(
        state,
        caller,
        path,
        &headers,
        Action::Revoke { confirm },
        reason,
    )
    .await
}

async fn rotate(
    State(state): State<AppState>,
    caller: Caller,
    path: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    OptionalJsonBody(body): OptionalJsonBody<ReasonRequest>,
) -> Result<Response, ApiError> {
    let reason = reason(body.reason.as_deref(), false)?;
    lifecycle(state, caller, path, &headers, Action::Rotate, reason).await
}

/// `GET /v1/scopes/{id}/state?at=RFC3339` or `?position=N`: the scope as it was then,
/// computed from the events.
async fn state_as_of(
    State(state): State<AppState>,
    caller: Caller,
    path: Result<Path<String>, PathRejection>,
    query: Result<Query<HashMap<String, String>>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(query) = query.map_err(|_| ApiError::invalid("the query string is not valid"))?;
    check_keys(&query, &["at", "position"])?;
    let as_of = match (query.get("at"), query.get("position")) {
        (Some(at), None) => AsOf::Time(
            chrono::DateTime::parse_from_rfc3339(at)
                .map(|t| t.with_timezone(&chrono::Utc))
                .map_err(|_| {
                    ApiError::invalid("at: expected an RFC 3339 time such as 2026-11-28T14:02:00Z")
                })?,
        ),
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

/// `PUT /v1/orgs/{org}/tier {"tier": "default"|"managed"}`: what is encrypted. Existing
/// ciphertexts keep working; `byok` is reached by connecting a master key.
async fn change_tier(
    State(state): State<AppState>,
    caller: Caller,
    path: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    JsonBody(body): JsonBody<TierRequest>,
) -> Result<Response, ApiError> {
    let tier: Tier = body
        .tier
        .parse()
        .map_err(|e: ekm_domain::ValueError| ApiError::invalid(e.to_string()))?;
    let reason = reason(body.reason.as_deref(), false)?;
    let org = visible_org(&state, &caller, path, Permission::EncryptionManage).await?;
    let expected = expected_version(&headers)?;
    let outcome = state
        .app
        .act(
            org.scope.id,
            Action::ChangeTier(tier),
            &caller.metadata(reason),
            expected,
        )
        .await?;
    let mut body = serde_json::to_value(OrgJson::from(&outcome.scope)).unwrap_or_default();
    if let Some(object) = body.as_object_mut() {
        object.insert("changed".into(), json!(outcome.changed));
    }
    let mut response = Json(body).into_response();
    etag(&mut response, outcome.scope.scope.version);
    Ok(response)
}

/// `POST /v1/scopes/{id}/retire {"below": N}`: destroys the key material of every version
/// below N (N at most the current version). Rewrap ciphertexts first: a retired version
/// decrypts nothing.
async fn retire(
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

/// `GET /v1/me`: who this token is, so that a client (the console) knows its organization,
/// role and grants without being told. Any valid token; the operator has no organization.
async fn me(caller: Caller) -> Json<serde_json::Value> {
    let principal = &caller.principal;
    let grants: Vec<serde_json::Value> = principal
        .grants
        .iter()
        .map(|grant| {
            json!({
                "permission": grant.permission.as_str(),
                "scope_id": grant.scope.map(|s| s.to_string()),
            })
        })
        .collect();
    let role = match principal.role {
        ekm_store::Role::Operator => "operator",
        ekm_store::Role::Org(role) => role.as_str(),
    };
    // What the token holds on the whole organization (role and organization-wide grants);
    // grants on a subtree are in `grants`.
    let permissions: Vec<&str> = match caller.org() {
        Some(org) => Permission::ALL
            .into_iter()
            .filter(|p| caller.holds(*p, &[org.scope_id()]))
            .map(Permission::as_str)
            .collect(),
        None => vec![],
    };
    let kind = if caller.is_operator() {
        "operator"
    } else {
        principal.kind.as_str()
    };
    Json(json!({
        "org_id": caller.org().map(|o| o.to_string()),
        "principal": if caller.is_operator() { "operator" } else { principal.principal.as_str() },
        "kind": kind,
        "role": role,
        "token_id": principal.token_id,
        "permissions": permissions,
        "grants": grants,
    }))
}

const MAX_QUERY_CHARS: usize = 200;

/// `GET /v1/orgs/{org}/scopes?q=&limit=&cursor=`: the organization's scopes whose name
/// contains `q` (case-insensitive), in id order, only those the caller may view. A page can
/// hold fewer than `limit` items (even none) while `next_cursor` says there is more.
async fn search_scopes(
    State(state): State<AppState>,
    caller: Caller,
    path: Result<Path<String>, PathRejection>,
    query: Result<Query<HashMap<String, String>>, QueryRejection>,
) -> Result<Json<ListJson<ScopeJson>>, ApiError> {
    let Query(query) = query.map_err(|_| ApiError::invalid("the query string is not valid"))?;
    check_keys(&query, &["q", "cursor", "limit"])?;
    let needle = query.get("q").map(|q| q.trim()).unwrap_or("");
    if needle.chars().count() > MAX_QUERY_CHARS {
        return Err(ApiError::invalid(format!(
            "q: at most {MAX_QUERY_CHARS} characters"
        )));
    }
    if needle.chars().any(char::is_control) {
        return Err(ApiError::invalid("q: control characters are not allowed"));
    }
    let limit = page_limit(query.get("limit"))?;
    if caller.is_operator() {
        return Err(ApiError::forbidden(
            "the operator token manages organizations only; use an organization's token",
        ));
    }
    let org = ekm_domain::OrgId::parse(&path_text(path)?)
        .map_err(|e| ApiError::invalid(format!("org: {e}")))?;
    if caller.org() != Some(org) {
        return Err(ApiError::not_found(ORG_NOT_FOUND));
    }
    let org_text = org.to_string();
    let binding = Binding {
        list: List::Search,
        query: &[&org_text, needle],
    };
    let after = match query.get("cursor") {
        None => None,
        Some(cursor) => {
            let after = binding.decode_scope(cursor)?;
            // A cursor names the last row of a page this caller was shown: a row of this
            // organization it may view. Any other id is refused, never used as a position.
            match state.app.scope(after).await? {
                Some(row)
                    if row.scope.org_id == org
                        && caller.holds(Permission::EncryptionView, &row.scope.path) =>
                {
                    Some(after)
                }
                _ => return Err(crate::cursor::invalid()),
            }
        }
    };
    // Only rows the caller may view are read, so the page's last row (the next cursor) is
    // one of them. Without the permission anywhere, the answer is empty.
    let within = caller.subtrees(Permission::EncryptionView);
    let page = state
        .app
        .search_names(org, needle, within.as_deref(), after, limit)
        .await?;
    let mut items = vec![];
    for record in page.items {
        // Checked again: the SQL filter is not the only guard. A row dropped here would
        // be a bug in that filter (and its id could end up in the cursor), so say so.
        if !caller.holds(Permission::EncryptionView, &record.path) {
            tracing::error!(scope_id = %record.id, "the name search read a row outside the caller's view");
            continue;
        }
        // The cascade needs the rows on the path; a scope is never deleted, so it is there.
        if let Some(snapshot) = state.app.scope(record.id).await? {
            items.push(ScopeJson::from(&snapshot));
        }
    }
    Ok(Json(ListJson {
        items,
        next_cursor: page.next_after.map(|last| binding.encode_scope(last)),
    }))
}
