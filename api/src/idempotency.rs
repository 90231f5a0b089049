//! `Idempotency-Key` on POST, PUT and DELETE (issue 18 §3, ADR 0035).
//!
//! The first request with a key runs in a task of its own, so that it finishes and its
//! answer is kept even if the client's connection dies; a retry with the same key and the
//! same method, path and body is answered from the kept answer with
//! `Idempotency-Replayed: true`; the same key with another request is 422
//! `idempotency_key_reused`; a retry while the first still runs is 409 `conflict`
//! (retryable, `Retry-After: 1`). Keys belong to the principal (all its tokens), in the
//! database: they hold across instances and restarts, for 24 hours.
//!
//! Kept: answers that did something or whose outcome is unknown (2xx, 500 such as
//! `committed_unconfirmed`). Let go, so that a retry runs again: refusals (4xx), which
//! changed nothing, and 502–504 (the database or a KMS was unavailable). Never kept: the
//! data plane (its answers hold plaintext and it changes nothing: a retry runs again) and a
//! secret shown once (`token`, `admin_token`: a replay of an issue answers without it).

use axum::body::{Body, Bytes};
use axum::extract::{FromRequestParts, MatchedPath, Request, State};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use ekm_store::idempotency::{Begun, Idempotency, KeptAnswer};
use sha2::{Digest, Sha256};
use tracing::Instrument;

use crate::context::Caller;
use crate::error::{ApiError, Code};
use crate::state::AppState;

/// The request header.
pub const HEADER: &str = "idempotency-key";
/// The header on a replayed answer.
pub const REPLAYED: &str = "idempotency-replayed";
/// The longest key accepted.
const MAX_KEY: usize = 255;

/// The answer headers worth keeping.
const KEPT_HEADERS: [HeaderName; 3] = [header::CONTENT_TYPE, header::LOCATION, header::ETAG];

/// Fields of an answer that hold a secret shown once (a token issued, an organization's
/// first admin token): removed from every answer before it is kept.
const SECRET_FIELDS: [&str; 3] = ["token", "admin_token", "plaintext"];

/// How long a first request may run before its outcome is taken as unknown (a 500 is kept):
/// well within `ABANDONED_MICROS`, so that no retry runs it again while it still runs.
const FIRST_RUN_LIMIT: std::time::Duration = std::time::Duration::from_secs(120);

fn data_plane(route: &str) -> bool {
    ["encrypt", "decrypt", "datakey", "rewrap"]
        .iter()
        .any(|op| route == format!("/v1/scopes/{{id}}/{op}"))
}

/// A key is 1 to 255 visible ASCII characters.
fn valid(key: &str) -> bool {
    !key.is_empty() && key.len() <= MAX_KEY && key.bytes().all(|b| b.is_ascii_graphic())
}

pub async fn idempotent(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let method = request.method().clone();
    if !matches!(method, Method::POST | Method::PUT | Method::DELETE) {
        return next.run(request).await;
    }
    let Some(value) = request.headers().get(HEADER) else {
        return next.run(request).await;
    };
    let key = match value.to_str() {
        Ok(key) if valid(key) => key.to_owned(),
        _ => {
            return ApiError::invalid(
                "Idempotency-Key: 1 to 255 visible ASCII characters (a UUID is a good one)",
            )
            .into_response()
        }
    };
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|m| m.as_str().to_owned())
        .unwrap_or_default();
    if data_plane(&route) {
        return next.run(request).await;
    }
    let (mut parts, body) = request.into_parts();
    // Without a principal the handler answers 401 as usual; nothing to keep. Any other
    // failure (the database unreachable) is answered now: nothing runs unclaimed.
    let caller = match Caller::from_request_parts(&mut parts, &state).await {
        Ok(caller) => caller,
        Err(error) if error.status() == StatusCode::UNAUTHORIZED => {
            return next.run(Request::from_parts(parts, body)).await
        }
        Err(error) => return error.into_response(),
    };
    let principal = match caller.principal.org_id {
        Some(org) => format!("{org}/{}", caller.principal.principal),
        None => format!("operator/{}", caller.principal.principal),
    };
    let bytes = match axum::body::to_bytes(body, crate::dto::MAX_BODY_BYTES).await {
        Ok(bytes) => bytes,
        Err(_) => return crate::dto::body_too_large().into_response(),
    };
    let mut hash = Sha256::new();
    hash.update(method.as_str());
    hash.update(b" ");
    hash.update(parts.uri.path_and_query().map_or("", |p| p.as_str()));
    hash.update(b"\n");
    hash.update(&bytes);
    let fingerprint = hex::encode(hash.finalize());

    let keys = Idempotency::new(state.app.db().clone());
    let request = Request::from_parts(parts, Body::from(bytes));
    // In a task of its own, from the claim to the kept answer: a client that goes away
    // neither stops the request half-way nor leaves its key claimed with nothing running.
    let first = tokio::spawn(async move {
        match keys.begin(&principal, &key, &fingerprint).await {
            Err(error) => ApiError::from(ekm_service::AppError::Store(error)).into_response(),
            Ok(Begun::Answered(kept)) => replay(kept),
            Ok(Begun::Running) => {
                let mut refused = ApiError::new(
                    StatusCode::CONFLICT,
                    Code::Conflict,
                    "a request with this Idempotency-Key is still running; retry in a moment",
                )
                .into_response();
                refused
                    .headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
                refused
            }
            Ok(Begun::Reused) => ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                Code::IdempotencyKeyReused,
                "this Idempotency-Key was used with another request (method, path or body); use a new key for a new request",
            )
            .into_response(),
            Ok(Begun::First(claim)) => {
                first_run(request, next, keys, &principal, &key, &claim).await
            }
        }
    }
    .instrument(tracing::Span::current()));
    match first.await {
        Ok(response) => response,
        Err(_) => ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            Code::Internal,
            "the request failed",
        )
        .into_response(),
    }
}

/// Runs the first request with a key and keeps its answer, or lets the key go. A request
/// that panics or outlives `FIRST_RUN_LIMIT` may have acted: a 500 is kept for it.
async fn first_run(
    request: Request,
    next: Next,
    keys: Idempotency,
    principal: &str,
    key: &str,
    claim: &str,
) -> Response {
    use futures_util::FutureExt;
    let run = std::panic::AssertUnwindSafe(next.run(request)).catch_unwind();
    let (parts, body) = match tokio::time::timeout(FIRST_RUN_LIMIT, run).await {
        Ok(Ok(response)) => {
            let (parts, body) = response.into_parts();
            let body = axum::body::to_bytes(body, usize::MAX)
                .await
                .unwrap_or_default();
            (parts, body)
        }
        outcome => {
            let detail = match outcome {
                Err(_) => "the request did not finish in time; it may have taken effect",
                Ok(_) => "the request failed; it may have taken effect",
            };
            tracing::error!(detail, "a keyed request ended without its answer");
            let (parts, body) =
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, Code::Internal, detail)
                    .into_response()
                    .into_parts();
            let body = axum::body::to_bytes(body, usize::MAX)
                .await
                .unwrap_or_default();
            (parts, body)
        }
    };
    let status = parts.status;
    let stored = match status.is_success() || status == StatusCode::INTERNAL_SERVER_ERROR {
        true => {
            let kept = KeptAnswer {
                status: status.as_u16(),
                headers: kept_headers(&parts.headers),
                body: kept_body(&body),
            };
            keys.finish(principal, key, claim, &kept).await.map(|kept| {
                if !kept {
                    tracing::error!("a keyed request finished after its key was taken over");
                }
            })
        }
        false => keys.forget(principal, key, claim).await,
    };
    if let Err(error) = stored {
        // The key stays claimed: a retry answers 409 until it is abandoned (ADR 0035).
        tracing::error!(error = %error, "the idempotency key's answer could not be kept");
    }
    Response::from_parts(parts, Body::from(body))
}

fn kept_headers(headers: &HeaderMap) -> Vec<(String, String)> {
    KEPT_HEADERS
        .iter()
        .filter_map(|name| {
            let value = headers.get(name)?.to_str().ok()?;
            Some((name.as_str().to_owned(), value.to_owned()))
        })
        .collect()
}

/// The body as kept: no secret shown once is ever stored.
fn kept_body(body: &Bytes) -> Vec<u8> {
    match serde_json::from_slice::<serde_json::Value>(body) {
        Ok(mut value) => {
            if let Some(object) = value.as_object_mut() {
                for field in SECRET_FIELDS {
                    object.remove(field);
                }
            }
            value.to_string().into_bytes()
        }
        // Answers are JSON; anything else is kept only if empty.
        Err(_) => Vec::new(),
    }
}

fn replay(kept: KeptAnswer) -> Response {
    let mut response = Response::new(Body::from(kept.body));
    *response.status_mut() =
        StatusCode::from_u16(kept.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    for (name, value) in kept.headers {
        if let (Ok(name), Ok(value)) = (
            HeaderName::try_from(name.as_str()),
            HeaderValue::try_from(value.as_str()),
        ) {
            response.headers_mut().insert(name, value);
        }
    }
    response
        .headers_mut()
        .insert(REPLAYED, HeaderValue::from_static("true"));
    response
}
