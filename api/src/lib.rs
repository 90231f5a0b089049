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
pub mod idempotency;
pub mod limits;
pub mod openapi;
pub mod rate_limit;
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

/// A router that answers only `GET /metrics`, without a token: for `--metrics-listen`, an
/// address of its own that the operator keeps private (issue 19 §1).
pub fn metrics_router() -> Router {
    Router::new().route(
        "/metrics",
        axum::routing::get(|| async { routes::system::metrics_text() }),
    )
}

/// The whole API, ready to serve, with the default request limits.
pub fn router(state: AppState) -> Router {
    router_with_limits(state, limits::Limits::default())
}

/// The whole API with the given request limits (`ekm serve`'s flags).
pub fn router_with_limits(mut state: AppState, limits: limits::Limits) -> Router {
    state.set_rate_defaults(limits.rate);
    let routes = endpoints::all()
        .into_router()
        // Route layers see the matched path: the expensive endpoints' own budgets.
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            idempotency::idempotent,
        ))
        .route_layer(axum::middleware::from_fn_with_state(
            limits::Limiter::new(limits),
            limits::limit_expensive,
        ))
        // Outermost of the route layers: a request over its rate claims no idempotency key
        // and takes no expensive slot.
        .route_layer(axum::middleware::from_fn_with_state(
            (state.clone(), rate_limit::RateLimiter::new(limits.rate)),
            rate_limit::limit_rate,
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
        // Counts every answer: shed and timed-out ones, and the 500 of a caught panic.
        .layer(axum::middleware::from_fn(record_request))
}

/// `ekm_http_requests_total` and `ekm_http_request_duration_seconds`, by the matched
/// route's template (never the raw path: ids would make a series each) and method.
/// Unrouted requests and unknown methods share one label each, so no client can grow the
/// number of series.
async fn record_request(request: axum::extract::Request, next: axum::middleware::Next) -> Response {
    use axum::http::Method;
    let method = match *request.method() {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        Method::PATCH => "PATCH",
        _ => "other",
    };
    let route = request
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map(|path| path.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".to_owned());
    let started = std::time::Instant::now();
    let response = next.run(request).await;
    // A wrong method on a route counts once, whatever the method was.
    let method = match response.status() {
        axum::http::StatusCode::METHOD_NOT_ALLOWED => "other",
        _ => method,
    };
    let status = response.status().as_u16().to_string();
    metrics::counter!("ekm_http_requests_total", "route" => route.clone(), "method" => method, "status" => status)
        .increment(1);
    metrics::histogram!("ekm_http_request_duration_seconds", "route" => route, "method" => method)
        .record(started.elapsed().as_secs_f64());
    response
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
