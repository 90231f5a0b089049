//! Limits on every request: a cap on requests in flight, a few at a time for the
//! expensive endpoints, and a deadline for each request. Above a cap the answer is
//! `503 overloaded` with `Retry-After` at once (load is shed, not queued); past the deadline
//! it is `408 request_timeout` when the client was still sending its body, else
//! `503 request_timeout`. Limits on connections (how many, header read time, TLS, the
//! shutdown deadline) belong to the listener in the binary.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, Bytes, HttpBody};
use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::error::{ApiError, Code};

/// The endpoints whose one request can cost seconds of database work: each may run only
/// `Limits::max_expensive_requests` at a time per process.
pub const EXPENSIVE: [&str; 3] = [
    "/v1/audit/verify",
    "/v1/audit/export",
    "/v1/orgs/{org}/scopes",
];

/// Exempt from the request cap: a liveness probe must see an overloaded process as alive.
const EXEMPT: &str = "/healthz";

/// How long a client is told to wait before retrying after `overloaded`.
const RETRY_AFTER_SECONDS: u64 = 1;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Time from the request's head to the response's head (body reading included).
    pub request_timeout: Duration,
    /// Requests in flight in the process (streamed answers count until they end).
    pub max_concurrent_requests: usize,
    /// Requests in flight per expensive endpoint.
    pub max_expensive_requests: usize,
    /// The rate limits of organizations that set none (ADR 0036).
    pub rate: crate::rate_limit::RateDefaults,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            request_timeout: Duration::from_secs(30),
            max_concurrent_requests: 512,
            max_expensive_requests: 2,
            rate: crate::rate_limit::RateDefaults::default(),
        }
    }
}

/// The limits' shared state: one per router.
#[derive(Clone, Debug)]
pub struct Limiter {
    timeout: Duration,
    requests: Arc<Semaphore>,
    expensive: Arc<HashMap<&'static str, Arc<Semaphore>>>,
}

impl Limiter {
    pub fn new(limits: Limits) -> Self {
        let per_endpoint = limits.max_expensive_requests.max(1);
        Limiter {
            timeout: limits.request_timeout,
            requests: Arc::new(Semaphore::new(limits.max_concurrent_requests.max(1))),
            expensive: Arc::new(
                EXPENSIVE
                    .iter()
                    .map(|path| (*path, Arc::new(Semaphore::new(per_endpoint))))
                    .collect(),
            ),
        }
    }
}

/// The outermost layer: the request cap and the deadline.
pub async fn limit_requests(
    State(limiter): State<Limiter>,
    request: Request,
    next: Next,
) -> Response {
    let permit = if request.uri().path() == EXEMPT {
        None
    } else {
        match limiter.requests.clone().try_acquire_owned() {
            Ok(permit) => Some(permit),
            Err(_) => return overloaded("the server has too many requests in flight"),
        }
    };
    let (parts, body) = request.into_parts();
    let received = Arc::new(AtomicBool::new(body.is_end_stream()));
    let body = Body::new(Tracked {
        inner: body,
        received: received.clone(),
    });
    let request = Request::from_parts(parts, body);
    let response = match tokio::time::timeout(limiter.timeout, next.run(request)).await {
        Ok(response) => response,
        Err(_) if !received.load(Ordering::SeqCst) => {
            let mut response = ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                Code::RequestTimeout,
                format!(
                    "the request body did not arrive within {} ms",
                    limiter.timeout.as_millis()
                ),
            )
            .into_response();
            // The rest of the body may still be on its way: the connection cannot be reused.
            response
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
            response
        }
        Err(_) => {
            tracing::warn!(
                timeout_ms = limiter.timeout.as_millis() as u64,
                "request timed out"
            );
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                Code::RequestTimeout,
                format!(
                    "the server did not answer within {} ms; the request may have taken effect: read the resource before repeating it",
                    limiter.timeout.as_millis()
                ),
            )
            .into_response()
        }
    };
    match permit {
        Some(permit) => hold(response, permit),
        None => response,
    }
}

/// A route layer: at most a few requests at a time per expensive endpoint.
pub async fn limit_expensive(
    State(limiter): State<Limiter>,
    request: Request,
    next: Next,
) -> Response {
    let semaphore = match request.extensions().get::<MatchedPath>() {
        Some(path) if request.method() == Method::GET => {
            limiter.expensive.get(path.as_str()).cloned()
        }
        _ => None,
    };
    let Some(semaphore) = semaphore else {
        return next.run(request).await;
    };
    match semaphore.try_acquire_owned() {
        Ok(permit) => hold(next.run(request).await, permit),
        Err(_) => overloaded("this endpoint is already running as often as the server allows"),
    }
}

/// `503 overloaded` with `Retry-After`.
fn overloaded(detail: &str) -> Response {
    let mut response = ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        Code::Overloaded,
        format!("{detail}; retry in {RETRY_AFTER_SECONDS} s"),
    )
    .into_response();
    response
        .headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECONDS));
    response
}

/// Keeps `permit` until the response's body has been sent (or dropped): an export streams
/// for as long as it works.
fn hold(response: Response, permit: OwnedSemaphorePermit) -> Response {
    response.map(|inner| {
        Body::new(Holding {
            inner,
            _permit: permit,
        })
    })
}

/// A request body that records when it has been read to its end.
struct Tracked {
    inner: Body,
    received: Arc<AtomicBool>,
}

impl HttpBody for Tracked {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, axum::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if matches!(polled, Poll::Ready(None)) || self.inner.is_end_stream() {
            self.received.store(true, Ordering::SeqCst);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// A response body that holds a permit while it is alive.
struct Holding {
    inner: Body,
    _permit: OwnedSemaphorePermit,
}

impl HttpBody for Holding {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::middleware::from_fn_with_state;
    use axum::routing::{get, post};
    use axum::Router;
    use tower::ServiceExt;

    /// Lets a test know when a handler is running and decide when it finishes.
    #[derive(Clone)]
    struct Gate {
        entered: Arc<Semaphore>,
        release: Arc<Semaphore>,
    }

    impl Gate {
        fn new() -> Self {
            Gate {
                entered: Arc::new(Semaphore::new(0)),
                release: Arc::new(Semaphore::new(0)),
            }
        }

        fn open(&self) {
            self.release.add_permits(1);
        }
    }

    /// A router whose `/slow` and expensive handlers wait for the gate.
    fn app(limits: Limits, gate: Gate) -> Router {
        let limiter = Limiter::new(limits);
        let wait = move || {
            let gate = gate.clone();
            async move {
                gate.entered.add_permits(1);
                // Dropped at once: every waiting handler passes once the gate is open.
                let _ = gate.release.acquire().await;
                "done"
            }
        };
        Router::new()
            .route("/slow", get(wait.clone()))
            .route("/v1/audit/verify", get(wait.clone()))
            .route("/v1/audit/export", get(wait))
            .route("/v1/me", get(|| async { "me" }))
            .route("/healthz", get(|| async { "ok" }))
            .route(
                "/body",
                post(|body: Bytes| async move { body.len().to_string() }),
            )
            .route_layer(from_fn_with_state(limiter.clone(), limit_expensive))
            .layer(from_fn_with_state(limiter, limit_requests))
    }

    async fn problem(response: Response) -> (StatusCode, serde_json::Value) {
        let status = response.status();
        let bytes = axum::body::to_bytes(response.into_body(), 1 << 16)
            .await
            .unwrap();
        (status, serde_json::from_slice(&bytes).unwrap_or_default())
    }

    fn get_request(path: &str) -> Request {
        Request::get(path).body(Body::empty()).unwrap()
    }

    /// Starts `path` and returns once its handler runs (and so holds its permits).
    async fn hold_open(
        router: &Router,
        gate: &Gate,
        path: &str,
    ) -> tokio::task::JoinHandle<Result<Response, std::convert::Infallible>> {
        let call = tokio::spawn(router.clone().oneshot(get_request(path)));
        gate.entered.acquire().await.unwrap().forget();
        call
    }

    #[tokio::test]
    async fn requests_above_the_cap_are_shed_with_retry_after_but_healthz_answers() {
        let gate = Gate::new();
        let limits = Limits {
            max_concurrent_requests: 1,
            ..Limits::default()
        };
        let router = app(limits, gate.clone());
        let held = hold_open(&router, &gate, "/slow").await;

        let shed = router.clone().oneshot(get_request("/v1/me")).await.unwrap();
        assert_eq!(
            shed.headers().get(header::RETRY_AFTER).unwrap(),
            &HeaderValue::from(1u64)
        );
        let (status, body) = problem(shed).await;
        assert_eq!(
            (status, body["code"].as_str()),
            (StatusCode::SERVICE_UNAVAILABLE, Some("overloaded"))
        );

        let health = router
            .clone()
            .oneshot(get_request("/healthz"))
            .await
            .unwrap();
        assert_eq!(health.status(), StatusCode::OK);

        gate.open();
        assert_eq!(held.await.unwrap().unwrap().status(), StatusCode::OK);
        let again = router.oneshot(get_request("/v1/me")).await.unwrap();
        assert_eq!(again.status(), StatusCode::OK);
    }

    #[tokio::test]
    async fn an_expensive_endpoint_runs_at_most_its_limit_at_once() {
        let gate = Gate::new();
        let limits = Limits {
            max_expensive_requests: 2,
            ..Limits::default()
        };
        let router = app(limits, gate.clone());
        let first = hold_open(&router, &gate, "/v1/audit/verify").await;
        let second = hold_open(&router, &gate, "/v1/audit/verify").await;

        let third = router
            .clone()
            .oneshot(get_request("/v1/audit/verify"))
            .await
            .unwrap();
        assert!(third.headers().contains_key(header::RETRY_AFTER));
        let (status, body) = problem(third).await;
        assert_eq!(
            (status, body["code"].as_str()),
            (StatusCode::SERVICE_UNAVAILABLE, Some("overloaded"))
        );
        // Each expensive endpoint has its own budget, and cheap ones are not affected.
        let other = hold_open(&router, &gate, "/v1/audit/export").await;
        let cheap = router.clone().oneshot(get_request("/v1/me")).await.unwrap();
        assert_eq!(cheap.status(), StatusCode::OK);

        gate.open();
        for call in [first, second, other] {
            assert_eq!(call.await.unwrap().unwrap().status(), StatusCode::OK);
        }
    }

    #[tokio::test]
    async fn a_request_past_its_deadline_gets_a_problem() {
        let limits = Limits {
            request_timeout: Duration::from_millis(50),
            ..Limits::default()
        };
        // The gate is never opened: `/slow` does not answer.
        let router = app(limits, Gate::new());
        // A handler that does not answer in time.
        let (status, body) =
            problem(router.clone().oneshot(get_request("/slow")).await.unwrap()).await;
        assert_eq!(
            (status, body["code"].as_str()),
            (StatusCode::SERVICE_UNAVAILABLE, Some("request_timeout"))
        );

        // A body that never finishes arriving.
        let (sender, receiver) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(1);
        sender.send(Ok(Bytes::from_static(b"part"))).await.unwrap();
        let stream = tokio_stream_from(receiver);
        let request = Request::post("/body")
            .body(Body::from_stream(stream))
            .unwrap();
        let response = router.clone().oneshot(request).await.unwrap();
        assert_eq!(response.headers().get(header::CONNECTION).unwrap(), "close");
        let (status, body) = problem(response).await;
        assert_eq!(
            (status, body["code"].as_str()),
            (StatusCode::REQUEST_TIMEOUT, Some("request_timeout"))
        );
        drop(sender);

        // A complete body is answered.
        let request = Request::post("/body").body(Body::from("12345")).unwrap();
        let response = router.oneshot(request).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
    }

    fn tokio_stream_from(
        mut receiver: tokio::sync::mpsc::Receiver<Result<Bytes, std::io::Error>>,
    ) -> impl futures_util::Stream<Item = Result<Bytes, std::io::Error>> {
        futures_util::stream::poll_fn(move |cx| receiver.poll_recv(cx))
    }

    #[test]
    fn every_expensive_path_is_an_endpoint() {
        let endpoints = crate::endpoints::list();
        for path in EXPENSIVE {
            assert!(endpoints.contains(&("GET", path)), "{path}");
        }
    }
}
