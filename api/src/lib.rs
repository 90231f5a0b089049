//! EKM's HTTP API: the axum router, extractors, JSON DTOs and problem+json errors, over the
//! application service of `ekm-service`.
//!
//! Architecture invariant: only this crate knows JSON shapes and HTTP. Requests become
//! service calls and domain commands by hand in `routes`/`dto`; read models become
//! responses the same way.

pub mod audit_export;
pub mod console;
pub mod context;
mod cursor;
pub mod dto;
pub mod endpoints;
pub mod error;
pub mod limits;
mod routes;
pub mod state;

pub use routes::audit;

use std::time::Duration;

use axum::extract::DefaultBodyLimit;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Router;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::trace::TraceLayer;

// The service's modules, under their old names (tests and the binary import them from here).
pub use ekm_service::{app, health, keys, rekey};
pub use ekm_service::{App, AppError};
pub use error::{ApiError, Code};
pub use state::AppState;

/// The whole API, ready to serve, with the default request limits.
pub fn router(state: AppState) -> Router {
    router_with_limits(state, limits::Limits::default())
}

/// The whole API with the given request limits (`ekm serve`'s flags).
pub fn router_with_limits(state: AppState, limits: limits::Limits) -> Router {
    let routes = endpoints::all()
        .into_router()
        // Route layers see the matched path: the expensive endpoints' own budgets.
        .route_layer(axum::middleware::from_fn_with_state(
            limits::Limiter::new(limits),
            limits::limit_expensive,
        ))
        .with_state(state);
    guard(routes, limits)
}

/// What surrounds the routes: 404 and 405 as problems, the body limit, tracing, the request
/// cap and deadline (`limits`), the request id, and the panic guard outermost. Public so a
/// test can wrap routes of its own (a handler that panics) exactly as the API's are.
pub fn guard(routes: Router, limits: limits::Limits) -> Router {
    routes
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(dto::MAX_BODY_BYTES))
        .layer(
            TraceLayer::new_for_http()
                .make_span_with(|request: &axum::http::Request<_>| {
                    let request_id = request
                        .extensions()
                        .get::<context::RequestId>()
                        .map(|r| r.0.clone())
                        .unwrap_or_default();
                    tracing::info_span!(
                        "request",
                        method = %request.method(),
                        path = %request.uri().path(),
                        request_id = %request_id,
                    )
                })
                .on_response(
                    |response: &Response, latency: Duration, _span: &tracing::Span| {
                        tracing::info!(
                            status = response.status().as_u16(),
                            latency_ms = latency.as_millis() as u64,
                            "served"
                        );
                    },
                ),
        )
        // Outside the handlers and the trace layer: shedding load costs almost nothing, and
        // the deadline covers everything a request does. Inside the request id, so even a
        // shed or timed-out request is answered with its X-Request-Id.
        .layer(axum::middleware::from_fn_with_state(
            limits::Limiter::new(limits),
            limits::limit_requests,
        ))
        // Outside the trace layer, so the request id exists when the span is made.
        .layer(axum::middleware::from_fn(context::request_id))
        .layer(CatchPanicLayer::custom(panic_response))
}

async fn not_found() -> ApiError {
    ApiError::not_found("no such endpoint; see /v1/openapi.json")
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        Code::InvalidRequest,
        "this endpoint does not accept this method",
    )
}

fn panic_response(_panic: Box<dyn std::any::Any + Send + 'static>) -> Response {
    // A panic is a bug; the client gets a problem, not a dropped connection. The payload
    // is not echoed: it could hold anything.
    tracing::error!("a request handler panicked");
    ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        Code::Internal,
        "an internal error occurred; it has been logged",
    )
    .into_response()
}
