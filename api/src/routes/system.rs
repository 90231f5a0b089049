//! Liveness (`/healthz`), readiness (`/readyz`) and who a token is (`/v1/me`).

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use ekm_domain::Permission;
use serde_json::json;

use crate::context::Caller;
use crate::error::{ApiError, Code};
use crate::state::AppState;

pub(crate) async fn healthz() -> Json<serde_json::Value> {
    Json(json!({ "status": "ok" }))
}

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
