//! A scope's key versions and the reversible floor before destruction (issue 17 §3):
//! `PUT /v1/scopes/{id}/min-decryption-version` and `GET /v1/scopes/{id}/key-versions`.
//!
//! The order an admin follows: rotate, rewrap what the platform holds, watch `decrypts_30d`
//! of the old versions fall to zero, raise the floor (old versions refuse with
//! `key_version_disabled`; lowering it enables them again), watch `refused_30d` stay at zero
//! (every refusal is of a real ciphertext: it authenticates before it is refused), then
//! retire (which destroys only versions below the floor).

use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::Response;
use chrono::Utc;
use ekm_domain::{KeyVersion, Permission};
use ekm_service::app::Action;
use ekm_store::time::rfc3339;
use serde::Deserialize;
use serde_json::{json, Value};

use super::{conditional_json, path_text, reason, visible_scope};
use crate::context::Caller;
use crate::dto::JsonBody;
use crate::error::ApiError;
use crate::state::AppState;

/// The window of `decrypts_30d`.
const RECENT_DAYS: i64 = 30;

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FloorRequest {
    pub version: u32,
    pub reason: Option<String>,
}

/// `PUT /v1/scopes/{id}/min-decryption-version {"version": N, "reason"?}`: key versions below
/// N no longer decrypt (an event; N from 1 to the current version). Answers the scope JSON
/// and `changed`, like the lifecycle commands.
#[utoipa::path(
    put,
    path = "/v1/scopes/{id}/min-decryption-version",
    tag = "lifecycle",
    summary = "Set the decryption floor (reversible)",
    params(
        crate::openapi::ScopePath,
        crate::openapi::IfMatch
    ),
    request_body = FloorRequest,
    responses(
        (status = 200, description = "The scope and `changed`", body = crate::dto::LifecycleJson)
    )
)]
pub(crate) async fn set_floor(
    State(state): State<AppState>,
    caller: Caller,
    path: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    JsonBody(body): JsonBody<FloorRequest>,
) -> Result<Response, ApiError> {
    if body.version < 1 {
        return Err(ApiError::invalid(
            "version: at least 1 (1: every version decrypts)",
        ));
    }
    let reason = reason(body.reason.as_deref(), false)?;
    let action = Action::SetMinDecryptionVersion(KeyVersion::new(body.version));
    super::scopes::lifecycle(state, caller, path, &headers, action, reason).await
}

/// `GET /v1/scopes/{id}/key-versions`: each version with its state (`enabled`, `disabled`
/// below the floor, `destroyed` once retired), and from the access log (for a caller with
/// `audit:read`; null when the log is off): the last served use, the served decrypts and
/// rewraps of the last 30 days, and the refusals below the floor of the last 30 days (what
/// still needs a disabled version).
#[utoipa::path(
    get,
    operation_id = "list_key_versions",
    path = "/v1/scopes/{id}/key-versions",
    tag = "lifecycle",
    summary = "Key versions, their state and use",
    params(
        crate::openapi::ScopePath,
        crate::openapi::IfNoneMatch
    ),
    responses(
        (status = 200, description = "The versions", body = crate::openapi::KeyVersionsDoc, headers(("ETag" = String, description = "Entity tag"))),
        (status = 304, description = "Not modified (If-None-Match).")
    )
)]
pub(crate) async fn list(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    path: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let scope = visible_scope(
        &state,
        &caller,
        &path_text(path)?,
        Permission::EncryptionView,
    )
    .await?;
    let record = &scope.scope;
    // Usage comes from the access log: shown to a caller that may read it (`audit:read` on
    // the scope), as `access-summary` is; otherwise null, with `usage: "needs_audit_read"`.
    let may_audit = caller.require(Permission::AuditRead, &record.path).is_ok();
    let log = state
        .app
        .access_log()
        .filter(|log| log.mode() != ekm_store::AccessLogMode::Off);
    let usage = match log.filter(|_| may_audit) {
        Some(log) => {
            let scope_path = record
                .path
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("/");
            let since = Utc::now() - chrono::Duration::days(RECENT_DAYS);
            Some(
                log.usage(&record.org_id.to_string(), &scope_path, since)
                    .await
                    .map_err(ekm_service::AppError::from)?,
            )
        }
        None => None,
    };
    let items: Vec<Value> = scope
        .key_versions
        .iter()
        .map(|k| {
            let used = usage
                .as_ref()
                .and_then(|u| u.iter().find(|u| u.key_version == i64::from(k.version)));
            let state = if k.retired {
                "destroyed"
            } else if k.version < record.min_decryption_version {
                "disabled"
            } else {
                "enabled"
            };
            json!({
                "version": k.version,
                "created_at": rfc3339(k.created_at),
                "fingerprint": k.fingerprint,
                "state": state,
                "current": k.version == record.key_version,
                "last_used_at": used.and_then(|u| u.last_used_at).map(rfc3339),
                "last_refused_at": used.and_then(|u| u.last_refused_at).map(rfc3339),
                "decrypts_30d": match (&usage, used) {
                    (None, _) => Value::Null,
                    (Some(_), Some(u)) => json!(u.decrypts_since),
                    (Some(_), None) => json!(0),
                },
                "refused_30d": match (&usage, used) {
                    (None, _) => Value::Null,
                    (Some(_), Some(u)) => json!(u.refused_since),
                    (Some(_), None) => json!(0),
                },
            })
        })
        .collect();
    conditional_json(
        &headers,
        None,
        &json!({
            "scope_id": record.id.to_string(),
            "current": record.key_version,
            "min_decryption_version": record.min_decryption_version,
            "usage": match (&usage, log.is_some()) {
                (Some(_), _) => "access_log",
                (None, true) => "needs_audit_read",
                (None, false) => "access_log_off",
            },
            "items": items,
        }),
    )
}
