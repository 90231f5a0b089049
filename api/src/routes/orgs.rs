//! Organizations: creation (operator), reading, the tier, and the name search of their
//! scopes.

use std::collections::HashMap;

use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use ekm_domain::{Permission, Plan, RevokeWindow, ScopeKind, ScopeName, Tier};
use ekm_service::app::Action;
use serde_json::json;

use super::*;
use crate::context::Caller;
use crate::cursor::{Binding, List};
use crate::dto::{
    CreateOrgRequest, CreatedOrgJson, JsonBody, ListJson, OrgJson, ScopeJson, TierRequest,
};
use crate::error::ApiError;
use crate::state::AppState;

#[utoipa::path(
    post,
    path = "/v1/orgs",
    tag = "organizations",
    summary = "Create an organization (operator token)",
    request_body = crate::dto::CreateOrgRequest,
    responses(
        (status = 201, description = "Created, with its first org_admin token (shown once)", body = crate::dto::CreatedOrgJson, headers(("ETag" = String, description = "Entity tag")))
    )
)]
pub(crate) async fn create_org(
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

#[utoipa::path(
    get,
    path = "/v1/orgs/{org}",
    tag = "organizations",
    summary = "An organization",
    params(
        crate::openapi::OrgPath,
        crate::openapi::IfNoneMatch
    ),
    responses(
        (status = 200, description = "The organization", body = crate::dto::OrgJson, headers(("ETag" = String, description = "Entity tag"))),
        (status = 304, description = "Not modified (If-None-Match).")
    )
)]
pub(crate) async fn get_org(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
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
    conditional_json(
        &headers,
        Some(snapshot.scope.version),
        &OrgJson::from(&snapshot),
    )
}

/// `PUT /v1/orgs/{org}/tier {"tier": "default"|"managed"}`: what is encrypted. Existing
/// ciphertexts keep working; `byok` is reached by connecting a master key.
/// `PUT /v1/orgs/{org}/tier`; with `?dry_run=true` the rules are checked and the classes
/// that would lose or gain coverage are listed, nothing is recorded. After a downgrade the
/// classes it no longer covers are refused for encrypt, datakey and rewrap, but still
/// decrypt, so that the platform can migrate its data (issue 17 §4).
#[utoipa::path(
    put,
    path = "/v1/orgs/{org}/tier",
    tag = "organizations",
    summary = "Change what is encrypted (tier)",
    params(
        crate::openapi::OrgPath,
        ("dry_run" = Option<bool>, Query, description = "`true`: check the rules and count what would change; record nothing."),
        crate::openapi::IfMatch
    ),
    request_body = crate::dto::TierRequest,
    responses(
        (status = 200, description = "The organization and `changed`, or a dry run", body = crate::openapi::OrgOrDryRunDoc)
    )
)]
pub(crate) async fn change_tier(
    State(state): State<AppState>,
    caller: Caller,
    path: Result<Path<String>, PathRejection>,
    query: Result<Query<HashMap<String, String>>, QueryRejection>,
    headers: HeaderMap,
    JsonBody(body): JsonBody<TierRequest>,
) -> Result<Response, ApiError> {
    let Query(query) = query.map_err(|_| ApiError::invalid("the query string is not valid"))?;
    check_keys(&query, &["dry_run"])?;
    let dry_run = match query.get("dry_run").map(String::as_str) {
        None | Some("false") => false,
        Some("true") => true,
        Some(_) => return Err(ApiError::invalid("dry_run: expected true or false")),
    };
    let tier: Tier = body
        .tier
        .parse()
        .map_err(|e: ekm_domain::ValueError| ApiError::invalid(e.to_string()))?;
    let reason = reason(body.reason.as_deref(), false)?;
    let org = visible_org(&state, &caller, path, Permission::EncryptionManage).await?;
    if dry_run {
        let (scope, would_change, _) = state
            .app
            .dry_run(org.scope.id, Action::ChangeTier(tier))
            .await?;
        let from = scope.org_tier;
        let classes = |keep: &dyn Fn(ekm_domain::DataClass) -> bool| {
            ekm_domain::DataClass::ALL
                .into_iter()
                .filter(|c| keep(*c))
                .map(|c| c.as_str())
                .collect::<Vec<_>>()
        };
        return Ok(Json(json!({
            "dry_run": true,
            "action": "tier",
            "from": from.as_str(),
            "to": tier.as_str(),
            "would_change": would_change,
            // No new encryptions of these; what was sealed still decrypts.
            "classes_losing_coverage": classes(&|c| from.covers(c) && !tier.covers(c)),
            "classes_gaining_coverage": classes(&|c| !from.covers(c) && tier.covers(c)),
        }))
        .into_response());
    }
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
    let body = serde_json::to_value(OrgJson::from(&outcome.scope)).unwrap_or_default();
    Ok(changed_answer(body, &outcome))
}

#[derive(Debug, serde::Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct PlanRequest {
    plan: String,
    reason: Option<String>,
}

/// `PUT /v1/orgs/{org}/plan {"plan", "reason"?}` (the operator token only): an event. Leaving
/// enterprise needs tier `default` and no scope control in force in the tree (paused scopes,
/// justification policies, decryption floors): 409 `conflict` names what to clear first,
/// since the standard plan could no longer change them (issue 17 §4).
#[utoipa::path(
    put,
    path = "/v1/orgs/{org}/plan",
    tag = "organizations",
    summary = "Change the plan (operator token)",
    params(
        crate::openapi::OrgPath,
        crate::openapi::IfMatch
    ),
    request_body = PlanRequest,
    responses(
        (status = 200, description = "The organization and `changed`", body = crate::openapi::ChangedOrgDoc)
    )
)]
pub(crate) async fn change_plan(
    State(state): State<AppState>,
    caller: Caller,
    path: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    JsonBody(body): JsonBody<PlanRequest>,
) -> Result<Response, ApiError> {
    if !caller.is_operator() {
        return Err(ApiError::forbidden(
            "only the platform operator token changes an organization's plan",
        ));
    }
    let plan: Plan = body
        .plan
        .parse()
        .map_err(|e: ekm_domain::ValueError| ApiError::invalid(e.to_string()))?;
    let reason = reason(body.reason.as_deref(), false)?;
    let id = parse_scope_id(&path_text(path)?)?;
    match state.app.scope(id).await? {
        Some(found) if found.scope.kind == ScopeKind::Organization => {}
        _ => return Err(ApiError::not_found(ORG_NOT_FOUND)),
    }
    let expected = expected_version(&headers)?;
    let outcome = state
        .app
        .act(
            id,
            Action::ChangePlan(plan),
            &caller.metadata(reason),
            expected,
        )
        .await?;
    let body = serde_json::to_value(OrgJson::from(&outcome.scope)).unwrap_or_default();
    Ok(changed_answer(body, &outcome))
}

/// `GET /v1/orgs/{org}/schedule?limit=&cursor=`: what the scheduler will fire in the
/// organization, soonest first (`encryption:view` on the organization): `{"items":
/// [{"scope_id", "action": "resume"|"grant_expiry"|"revoke"|"rotation", "due_at", "grant"?,
/// "key_version"?}], "next_cursor"}`. Grant expiries name grants, which only org admins may
/// list: others are not shown them. Key rotations come from the memory tree (ADR 0033): the
/// next one of every key with a period in force, merged in due order.
#[utoipa::path(
    get,
    path = "/v1/orgs/{org}/schedule",
    tag = "organizations",
    summary = "What the scheduler will fire, soonest first",
    params(
        crate::openapi::OrgPath,
        crate::openapi::PageParams
    ),
    responses(
        (status = 200, description = "A page", body = crate::openapi::SchedulePageDoc)
    )
)]
pub(crate) async fn schedule(
    State(state): State<AppState>,
    caller: Caller,
    path: Result<Path<String>, PathRejection>,
    query: Result<Query<HashMap<String, String>>, QueryRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let Query(query) = query.map_err(|_| ApiError::invalid("the query string is not valid"))?;
    check_keys(&query, &["cursor", "limit"])?;
    let org = visible_org(&state, &caller, path, Permission::EncryptionView).await?;
    // The list is a read model: brought up to every committed event first, so a pause just
    // answered is listed (read-your-writes).
    state.app.refresh().await?;
    let org_id = org.scope.id.to_string();
    let binding = Binding {
        list: List::Schedule,
        query: &[&org_id],
    };
    let after: Option<(i64, String, String, String)> = query
        .get("cursor")
        .map(|cursor| binding.decode_json(cursor))
        .transpose()?;
    let limit = page_limit(query.get("limit"))?;
    let rows = state
        .app
        .read()
        .org_schedule(
            org.scope.id,
            caller.require_org_admin().is_ok(),
            after.clone(),
            i64::from(limit) + 1,
        )
        .await
        .map_err(ekm_service::AppError::from)?;
    let memory = state.app.memory().clone();
    let org_id = org.scope.id;
    // One pass over the tree (for an organization that sets a period): off the async
    // workers.
    let rotations = match memory.is_ready() {
        true => tokio::task::spawn_blocking(move || {
            memory.org_rotations(org_id, after, limit as usize + 1)
        })
        .await
        .unwrap_or_default(),
        false => vec![],
    };
    // The rows keep the database's order (its collation decides the ties within an
    // instant, and the cursor is compared the same way there); rotations are merged in by
    // due time, after the rows of the same microsecond.
    let rows: Vec<((i64, String, String, String), serde_json::Value)> = rows
        .iter()
        .map(|a| {
            let mut item = json!({
                "scope_id": a.scope_id.to_string(),
                "action": a.kind,
                "due_at": a.at,
            });
            if let Some(grant) = a.grant() {
                item["grant"] = json!({
                    "principal": grant.principal.as_str(),
                    "permission": grant.permission.as_str(),
                    "scope_id": grant.scope.map(|s| s.to_string()),
                });
            }
            let key = (
                a.due_at,
                a.scope_id.to_string(),
                a.kind.clone(),
                a.subject.clone(),
            );
            (key, item)
        })
        .collect();
    let rotations: Vec<((i64, String, String, String), serde_json::Value)> = rotations
        .iter()
        .map(|r| {
            let due = chrono::DateTime::from_timestamp_micros(r.due_at)
                .map(ekm_store::time::rfc3339)
                .unwrap_or_default();
            let key = (
                r.due_at,
                r.scope_id.to_string(),
                ekm_projections::ROTATION.to_owned(),
                r.from.get().to_string(),
            );
            let item = json!({
                "scope_id": r.scope_id.to_string(),
                "action": ekm_projections::ROTATION,
                "due_at": due,
                "key_version": r.from.get(),
                "rotation_period": r.period,
            });
            (key, item)
        })
        .collect();
    let mut items = Vec::with_capacity(rows.len() + rotations.len());
    let (mut rows, mut rotations) = (
        rows.into_iter().peekable(),
        rotations.into_iter().peekable(),
    );
    loop {
        let take_row = match (rows.peek(), rotations.peek()) {
            (Some(row), Some(rotation)) => row.0 .0 <= rotation.0 .0,
            (Some(_), None) => true,
            (None, Some(_)) => false,
            (None, None) => break,
        };
        let next = match take_row {
            true => rows.next(),
            false => rotations.next(),
        };
        items.extend(next);
    }
    let more = items.len() > limit as usize;
    items.truncate(limit as usize);
    let next_cursor = match (more, items.last()) {
        (true, Some((last, _))) => {
            Some(binding.encode_json(&json!([last.0, last.1, last.2, last.3])))
        }
        _ => None,
    };
    Ok(Json(json!({
        "items": items.into_iter().map(|(_, item)| item).collect::<Vec<_>>(),
        "next_cursor": next_cursor,
    })))
}

const MAX_QUERY_CHARS: usize = 200;

/// `GET /v1/orgs/{org}/scopes?q=&limit=&cursor=`: the organization's scopes whose name
/// contains `q` (case-insensitive), in id order, only those the caller may view. A page can
/// hold fewer than `limit` items (even none) while `next_cursor` says there is more.
#[utoipa::path(
    get,
    path = "/v1/orgs/{org}/scopes",
    tag = "scopes",
    summary = "Search scopes by name",
    params(
        crate::openapi::OrgPath,
        ("q" = Option<String>, Query, description = "Part of the name, case-insensitive."),
        crate::openapi::PageParams
    ),
    responses(
        (status = 200, description = "A page (possibly empty while `next_cursor` says there is more)", body = crate::openapi::ScopePageDoc)
    )
)]
pub(crate) async fn search_scopes(
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

/// A field that may be absent (`None`: left as it is) or `null` (`Some(None)`: its default).
pub(crate) fn present<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<Option<String>>, D::Error> {
    <Option<String> as serde::Deserialize>::deserialize(deserializer).map(Some)
}

#[derive(Debug, serde::Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = OrgPolicyRequest)]
pub(crate) struct PolicyRequest {
    /// Absent: unchanged; `null`: back to the default (P7D).
    #[serde(default, deserialize_with = "present")]
    revoke_window: Option<Option<String>>,
    /// Absent: unchanged; `null`: the organization's keys do not rotate on their own.
    #[serde(default, deserialize_with = "present")]
    rotation_period: Option<Option<String>>,
    reason: Option<String>,
}

fn policy_json(org: &ekm_projections::ScopeSnapshot) -> serde_json::Value {
    let set = org.scope.revoke_window.clone();
    json!({
        "org_id": org.scope.id.to_string(),
        "revoke_window": set.clone().unwrap_or_else(|| RevokeWindow::DEFAULT.to_string()),
        "revoke_window_is_default": set.is_none(),
        "rotation_period": org.scope.rotation_period,
    })
}

/// `GET /v1/orgs/{org}/policy`: the organization's lifecycle policy (issue 17):
/// `revoke_window`, the waiting period of a revoke that names none.
#[utoipa::path(
    get,
    operation_id = "get_org_policy",
    path = "/v1/orgs/{org}/policy",
    tag = "organizations",
    summary = "The lifecycle policy",
    params(
        crate::openapi::OrgPath,
        crate::openapi::IfNoneMatch
    ),
    responses(
        (status = 200, description = "The policy", body = crate::openapi::OrgPolicyDoc, headers(("ETag" = String, description = "Entity tag"))),
        (status = 304, description = "Not modified (If-None-Match).")
    )
)]
pub(crate) async fn policy(
    State(state): State<AppState>,
    caller: Caller,
    path: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let org = visible_org(&state, &caller, path, Permission::EncryptionView).await?;
    let mut response = Json(policy_json(&org)).into_response();
    etag(&mut response, org.scope.version);
    Ok(response)
}

/// `PUT /v1/orgs/{org}/policy {"revoke_window"?: "P14D" | null, "rotation_period"?: "P90D" |
/// null, "reason"?}`: a field left out stays as it is, `null` is its default (P7D, no
/// rotation), so a client that knows one field cannot lift the other by accident; one
/// event per field that changed. The rotation period is the organization scope's own:
/// its subtree inherits it unless a scope sets its own.
#[utoipa::path(
    put,
    operation_id = "set_org_policy",
    path = "/v1/orgs/{org}/policy",
    tag = "organizations",
    summary = "Set the lifecycle policy",
    params(
        crate::openapi::OrgPath,
        crate::openapi::IfMatch
    ),
    request_body = PolicyRequest,
    responses(
        (status = 200, description = "The policy and `changed`", body = crate::openapi::OrgPolicyDoc)
    )
)]
pub(crate) async fn set_policy(
    State(state): State<AppState>,
    caller: Caller,
    path: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    JsonBody(body): JsonBody<PolicyRequest>,
) -> Result<Response, ApiError> {
    let rotation_period = body
        .rotation_period
        .map(|p| {
            duration_field(p.as_deref(), |t| {
                ekm_domain::RotationPeriod::parse("rotation_period", t)
            })
        })
        .transpose()?;
    let revoke_window = body
        .revoke_window
        .map(|w| duration_field(w.as_deref(), |t| RevokeWindow::parse("revoke_window", t)))
        .transpose()?;
    let reason = reason(body.reason.as_deref(), false)?;
    let org = visible_org(&state, &caller, path, Permission::EncryptionManage).await?;
    // Fields left out keep what the organization has (the aggregate records only changes;
    // `If-Match` makes the whole request apply to the version read).
    let revoke_window = revoke_window.unwrap_or_else(|| org.scope.revoke_window.clone());
    let rotation_period = rotation_period.unwrap_or_else(|| org.scope.rotation_period.clone());
    let expected = expected_version(&headers)?;
    let outcome = state
        .app
        .act(
            org.scope.id,
            Action::SetOrgPolicy {
                revoke_window,
                rotation_period,
            },
            &caller.metadata(reason),
            expected,
        )
        .await?;
    Ok(changed_answer(policy_json(&outcome.scope), &outcome))
}
