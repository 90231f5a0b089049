//! `PUT /v1/orgs/{org}/master-key` connects a customer master key (or goes back to the
//! platform's), `GET` shows which key wraps the organization key and its health. What is
//! checked before a key is connected is the service's (`ekm_service::master_key`).

use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::Json;
use ekm_domain::{MasterKeyRef, Provider, Tier};
use ekm_projections::ScopeSnapshot;
use ekm_store::time::{from_micros, rfc3339};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::context::Caller;
use crate::dto::JsonBody;
use crate::error::ApiError;
use crate::routes::{etag, expected_version, reason, visible_org};
use crate::state::AppState;
use ekm_service::app::Action;

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MasterKeyRequest {
    pub provider: String,
    pub key_id: Option<String>,
    pub region: Option<String>,
    pub endpoint_url: Option<String>,
    pub reason: Option<String>,
}

/// `PUT /v1/orgs/{org}/master-key {"provider", "key_id", "region"?, "endpoint_url"?}`.
/// `{"provider": "local"}` goes back to the platform's key (tier `managed`).
#[utoipa::path(
    put,
    operation_id = "set_master_key",
    path = "/v1/orgs/{org}/master-key",
    tag = "master key",
    summary = "Connect a customer master key (BYOK), or go back to the platform's",
    params(
        crate::openapi::OrgPath,
        crate::openapi::IfMatch
    ),
    request_body = MasterKeyRequest,
    responses(
        (status = 200, description = "The master key and `changed`", body = crate::openapi::MasterKeyDoc)
    )
)]
pub async fn set(
    State(state): State<AppState>,
    caller: Caller,
    path: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    JsonBody(body): JsonBody<MasterKeyRequest>,
) -> Result<Response, ApiError> {
    let provider: Provider = body
        .provider
        .parse()
        .map_err(|e: ekm_domain::ValueError| ApiError::invalid(e.to_string()))?;
    let master = match provider {
        Provider::Local => {
            if body.key_id.is_some() || body.region.is_some() || body.endpoint_url.is_some() {
                return Err(ApiError::invalid(
                    "the local provider is the platform's key: give no key_id, region or endpoint_url",
                ));
            }
            None
        }
        _ => Some(
            MasterKeyRef::parse(
                provider,
                body.key_id.as_deref().unwrap_or(""),
                body.region.as_deref(),
                body.endpoint_url.as_deref(),
            )
            .map_err(|e| ApiError::invalid(e.to_string()))?,
        ),
    };
    if let Some(master) = &master {
        state.app.refuse_platform_key(master)?;
    }
    let reason = reason(body.reason.as_deref(), false)?;
    let org = visible_org(
        &state,
        &caller,
        path,
        ekm_domain::Permission::EncryptionManage,
    )
    .await?;
    if let Some(master) = &master {
        state.app.refuse_endpoint(master)?;
    }
    let expected = expected_version(&headers)?;
    if let Some(master) = &master {
        state.app.validate_master_key(&org, master).await?;
    }
    let tier = if master.is_some() {
        Tier::Byok
    } else {
        Tier::Managed
    };
    let outcome = state
        .app
        .act(
            org.scope.id,
            Action::SetMasterKey { master, tier },
            &caller.metadata(reason),
            expected,
        )
        .await?;
    let mut body = describe(&state, &outcome.scope).await?;
    body["changed"] = json!(outcome.changed);
    let mut response = Json(body).into_response();
    etag(&mut response, outcome.scope.scope.version);
    Ok(response)
}

/// `GET /v1/orgs/{org}/master-key`: provider, key, status and the last health check.
#[utoipa::path(
    get,
    operation_id = "get_master_key",
    path = "/v1/orgs/{org}/master-key",
    tag = "master key",
    summary = "The master key and its health",
    params(
        crate::openapi::OrgPath,
        crate::openapi::IfNoneMatch
    ),
    responses(
        (status = 200, description = "The master key", body = crate::openapi::MasterKeyDoc, headers(("ETag" = String, description = "Entity tag"))),
        (status = 304, description = "Not modified (If-None-Match).")
    )
)]
pub async fn show(
    State(state): State<AppState>,
    caller: Caller,
    headers: axum::http::HeaderMap,
    path: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let org = visible_org(
        &state,
        &caller,
        path,
        ekm_domain::Permission::EncryptionView,
    )
    .await?;
    let body = describe(&state, &org).await?;
    // A validator of this body (its last health check changes without an event), with
    // If-None-Match answered 304, as every GET of a resource (ADR 0025).
    crate::routes::conditional_json(&headers, Some(org.scope.version), &body)
}

async fn describe(state: &AppState, org: &ScopeSnapshot) -> Result<Value, ApiError> {
    let record = &org.scope;
    let tier = org.org_tier.as_str();
    let Some(master) = &record.master_key else {
        return Ok(json!({
            "org_id": record.id.to_string(),
            "provider": "local",
            "key_id": null,
            "tier": tier,
            "status": "available",
            "reason": null,
            "last_check": null,
        }));
    };
    let check = state.app.master_key_check(org).await?;
    let change = record.master_change.as_ref();
    Ok(json!({
        "org_id": record.id.to_string(),
        "provider": master.provider.as_str(),
        "key_id": master.key_id,
        "region": master.region,
        "endpoint_url": master.endpoint_url,
        "tier": tier,
        "status": record.master_health.as_str(),
        "reason": change.and_then(|c| c.reason.clone()),
        "detail": record.master_detail,
        "status_since": change.map(|c| rfc3339(c.at)),
        "last_check": check.map(|c| json!({
            "at": rfc3339(from_micros(c.checked_at)),
            "ok": c.ok,
            "detail": c.detail,
        })),
    }))
}
