//! Liveness (`/healthz`), readiness (`/readyz`) and who a token is (`/v1/me`).

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use ekm_domain::Permission;
use serde_json::json;

use crate::context::Caller;
use crate::error::{ApiError, Code};
use crate::state::AppState;

#[utoipa::path(
    get,
    path = "/healthz",
    tag = "system",
    summary = "Liveness",
    responses(
        (status = 200, description = "Alive", body = crate::openapi::HealthDoc)
    ),
    security(())
)]
pub(crate) async fn healthz() -> Json<serde_json::Value> {
    Json(json!({ "status": "ok" }))
}

#[utoipa::path(
    get,
    path = "/readyz",
    tag = "system",
    summary = "Readiness: the database answers and the read models keep up",
    responses(
        (status = 200, description = "Ready", body = crate::openapi::ReadyDoc)
    ),
    security(())
)]
pub(crate) async fn readyz(
    State(state): State<AppState>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let unavailable = |what: &str| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            Code::Unavailable,
            format!("not ready: {what}"),
        )
    };
    if let Some(stall) = state.app.projections_stall() {
        return Err(unavailable(&format!(
            "the read models are {} ms behind the event log (applied position {}, head {}); the data plane refuses until they catch up",
            stall.behind.as_millis(),
            stall.applied,
            stall.head
        )));
    }
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

/// `GET /v1/me`: who this token is, so that a client (the console) knows its organization,
/// role and grants without being told. Any valid token; the operator has no organization.
#[utoipa::path(
    get,
    path = "/v1/me",
    tag = "system",
    summary = "Who this token is",
    responses(
        (status = 200, description = "The token's principal, role and grants", body = crate::openapi::MeDoc)
    )
)]
pub(crate) async fn me(caller: Caller) -> Json<serde_json::Value> {
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

/// `GET /metrics` (the operator token): the process's metrics in Prometheus's text
/// exposition format (issue 19 §1; names in `ekm_service::metrics`). `--metrics-listen`
/// serves the same text on an address of its own, without a token.
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "system",
    summary = "Prometheus metrics (operator token)",
    responses(
        (status = 200, description = "Text exposition format", body = String, content_type = "text/plain")
    )
)]
pub(crate) async fn metrics(caller: Caller) -> Result<axum::response::Response, ApiError> {
    if !caller.is_operator() {
        return Err(ApiError::forbidden(
            "only the platform operator token reads metrics",
        ));
    }
    Ok(metrics_text())
}

/// The metrics as a `text/plain; version=0.0.4` answer.
pub fn metrics_text() -> axum::response::Response {
    use axum::response::IntoResponse;
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        ekm_service::metrics::render(),
    )
        .into_response()
}
