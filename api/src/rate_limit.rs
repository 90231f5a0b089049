//! Rate limits (issue 18 §4, ADR 0036): token buckets per principal and per organization,
//! on the data plane (encrypt, decrypt, datakey, rewrap) and on commands (every other POST,
//! PUT and DELETE). An organization's own limits come from its events (the memory tree);
//! the rest are the server's defaults (`ekm serve --rate-limit-*`).
//!
//! A request takes one token from its principal's bucket and one from its organization's,
//! only if both have one (nothing is taken from either when one refuses); a batch takes one
//! per item, at most a bucket's burst. Over a limit the answer is `429 rate_limited` with
//! `Retry-After` (whole seconds until both buckets could serve the request) and
//! `RateLimit-Limit`, `RateLimit-Remaining`, `RateLimit-Reset` (of the tighter bucket),
//! which every limited answer carries. Buckets live in each instance's memory: with N
//! instances behind a balancer, a principal gets up to N times its limit (ADR 0036).
//! The operator token (the platform itself) and unauthenticated requests (answered 401 by
//! the handler) are not limited.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hash};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{FromRequestParts, MatchedPath, Request, State};
use axum::http::{HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use ekm_domain::{OrgId, RateBucket, RateClass, RateHolder, RateLimits};

use crate::context::Caller;
use crate::error::{ApiError, Code};
use crate::state::AppState;

/// The server's limits for organizations that set none of their own: the same four
/// buckets as an organization's `RateLimits`, where `None` means no limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RateDefaults(pub RateLimits);

impl Default for RateDefaults {
    /// Generous for one well-behaved service, tight enough that one client cannot take the
    /// whole server (ADR 0036 gives the reasoning).
    fn default() -> Self {
        let bucket = |per_second, burst| RateBucket::new("default", per_second, burst).ok();
        RateDefaults(RateLimits {
            data_plane_principal: bucket(5_000, 10_000),
            data_plane_organization: bucket(20_000, 40_000),
            commands_principal: bucket(100, 1_000),
            commands_organization: bucket(500, 5_000),
        })
    }
}

impl RateDefaults {
    /// No limits at all (tests of everything else, benchmarks of the unlimited path).
    pub const OFF: RateDefaults = RateDefaults(RateLimits {
        data_plane_principal: None,
        data_plane_organization: None,
        commands_principal: None,
        commands_organization: None,
    });

    /// The limit in force: the organization's own, else the default.
    pub fn effective(
        &self,
        own: &RateLimits,
        class: RateClass,
        holder: RateHolder,
    ) -> (Option<RateBucket>, &'static str) {
        match own.get(class, holder) {
            Some(bucket) => (Some(bucket), "organization"),
            None => (self.0.get(class, holder), "default"),
        }
    }
}

/// One token bucket: `tokens` at `at`, refilled at its rate up to its burst.
#[derive(Debug)]
struct Tokens {
    tokens: f64,
    at: Instant,
}

#[derive(Debug)]
struct Bucket {
    limit: RateBucket,
    state: Mutex<Tokens>,
}

impl Bucket {
    /// Its tokens, whatever a panic elsewhere left in them (they stay numbers).
    fn lock(&self) -> std::sync::MutexGuard<'_, Tokens> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn new(limit: RateBucket, now: Instant) -> Self {
        Bucket {
            limit,
            state: Mutex::new(Tokens {
                tokens: f64::from(limit.burst()),
                at: now,
            }),
        }
    }

    fn refill(&self, tokens: &mut Tokens, now: Instant) {
        let elapsed = now.saturating_duration_since(tokens.at).as_secs_f64();
        let per_second = f64::from(self.limit.per_second());
        tokens.tokens = (tokens.tokens + elapsed * per_second).min(f64::from(self.limit.burst()));
        tokens.at = now;
    }

    /// What must be in this bucket to serve `n` items of which `already` were taken: never
    /// more than it can ever hold, so that a batch larger than the burst can pass once the
    /// bucket is full (it then takes all `n`, into debt that later requests wait out).
    fn need(&self, n: u32, already: u32) -> f64 {
        f64::from(n.min(self.limit.burst())) - f64::from(already)
    }

    /// How long until `cost` tokens are there (zero: now).
    fn wait(&self, tokens: &Tokens, cost: f64) -> Duration {
        let missing = cost - tokens.tokens;
        if missing <= 0.0 {
            return Duration::ZERO;
        }
        Duration::from_secs_f64(missing / f64::from(self.limit.per_second()))
    }

    /// What the `RateLimit-*` headers say of this bucket.
    fn report(&self, tokens: &Tokens) -> Report {
        let burst = f64::from(self.limit.burst());
        let to_full = (burst - tokens.tokens).max(0.0) / f64::from(self.limit.per_second());
        Report {
            limit: self.limit.burst(),
            remaining: tokens.tokens.max(0.0).floor() as u64,
            reset: to_full.ceil() as u64,
        }
    }
}

/// A bucket's state for the headers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Report {
    pub limit: u32,
    pub remaining: u64,
    /// Seconds until the bucket is full again.
    pub reset: u64,
}

/// The outcome of taking from the buckets of one request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Taken {
    /// Taken; the tighter bucket's state after it (none when nothing is limited).
    Allowed(Option<Report>),
    /// Refused: nothing taken; retry after this long.
    Refused {
        retry_after: Duration,
        report: Report,
    },
}

/// Serves `n` items, of which `already` tokens were taken before (a batch's first, with its
/// request), from every bucket of `buckets` if all hold what they need, else from none.
/// Serving takes the `n - already` tokens even past zero: a batch larger than the burst
/// leaves a debt, so the long-run rate holds whatever the batch size. Locks are taken in
/// the order given, always principal then organization.
fn take_all(buckets: &[Arc<Bucket>], n: u32, already: u32, now: Instant) -> Taken {
    let mut guards: Vec<_> = buckets.iter().map(|b| b.lock()).collect();
    for (bucket, tokens) in buckets.iter().zip(guards.iter_mut()) {
        bucket.refill(tokens, now);
    }
    let refusing = buckets
        .iter()
        .zip(guards.iter())
        .map(|(bucket, tokens)| (bucket, tokens, bucket.wait(tokens, bucket.need(n, already))))
        .max_by_key(|(_, _, wait)| *wait);
    if let Some((bucket, tokens, wait)) = refusing {
        if wait > Duration::ZERO {
            return Taken::Refused {
                retry_after: wait,
                report: bucket.report(tokens),
            };
        }
    }
    let taken = f64::from(n.saturating_sub(already));
    for tokens in guards.iter_mut() {
        tokens.tokens -= taken;
    }
    Taken::Allowed(
        buckets
            .iter()
            .zip(guards.iter())
            .map(|(bucket, tokens)| bucket.report(tokens))
            .min_by_key(|report| report.remaining),
    )
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Key {
    Organization(OrgId, RateClass),
    Principal(OrgId, Box<str>, RateClass),
}

/// Buckets are sharded by key so that concurrent requests rarely wait on one lock.
const SHARDS: usize = 16;
/// A shard holding this many buckets forgets the full ones (idle holders); it sweeps again
/// when it has doubled since.
const SHARD_SOFT_CAP: usize = 4_096;

struct Buckets {
    buckets: HashMap<Key, Arc<Bucket>>,
    /// The size at which the next sweep runs.
    sweep_at: usize,
}

type Shard = Mutex<Buckets>;

/// Every bucket of this instance, and the defaults.
#[derive(Clone)]
pub struct RateLimiter {
    defaults: RateDefaults,
    shards: Arc<[Shard; SHARDS]>,
    hasher: std::hash::RandomState,
}

impl std::fmt::Debug for RateLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimiter")
            .field("defaults", &self.defaults)
            .finish_non_exhaustive()
    }
}

impl RateLimiter {
    pub fn new(defaults: RateDefaults) -> Self {
        RateLimiter {
            defaults,
            shards: Arc::new(std::array::from_fn(|_| {
                Mutex::new(Buckets {
                    buckets: HashMap::new(),
                    sweep_at: SHARD_SOFT_CAP,
                })
            })),
            hasher: std::hash::RandomState::new(),
        }
    }

    pub fn defaults(&self) -> &RateDefaults {
        &self.defaults
    }

    /// The bucket of `key` for `limit`. When the limit changed, the new bucket keeps what
    /// the old one held (no fresh burst for a tenant whose limit was lowered), plus what a
    /// larger burst adds, never more than its burst.
    fn bucket(&self, key: Key, limit: RateBucket, now: Instant) -> Arc<Bucket> {
        let shard = &self.shards[self.hasher.hash_one(&key) as usize % SHARDS];
        let mut shard = shard
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let bucket = match shard.buckets.get(&key) {
            Some(bucket) if bucket.limit == limit => return bucket.clone(),
            Some(old) => {
                let mut tokens = old.lock();
                old.refill(&mut tokens, now);
                let grown = f64::from(limit.burst()) - f64::from(old.limit.burst());
                let carried = (tokens.tokens + grown.max(0.0)).min(f64::from(limit.burst()));
                let bucket = Bucket::new(limit, now);
                bucket.lock().tokens = carried;
                bucket
            }
            None => Bucket::new(limit, now),
        };
        if shard.buckets.len() >= shard.sweep_at {
            // Forget the full buckets (idle holders: a new one would be the same), then wait
            // until the shard doubles before sweeping again, so a shard of many active
            // holders is not scanned on every new one.
            shard.buckets.retain(|_, bucket| {
                let mut tokens = bucket.lock();
                bucket.refill(&mut tokens, now);
                tokens.tokens < f64::from(bucket.limit.burst())
            });
            shard.sweep_at = (shard.buckets.len() * 2).max(SHARD_SOFT_CAP);
        }
        let bucket = Arc::new(bucket);
        shard.buckets.insert(key, bucket.clone());
        bucket
    }

    /// The buckets a request of `principal` in `org` draws from, for `class`.
    fn buckets(
        &self,
        own: &RateLimits,
        org: OrgId,
        principal: &str,
        class: RateClass,
        now: Instant,
    ) -> Vec<Arc<Bucket>> {
        let mut buckets = Vec::with_capacity(2);
        if let (Some(limit), _) = self.defaults.effective(own, class, RateHolder::Principal) {
            let key = Key::Principal(org, principal.into(), class);
            buckets.push(self.bucket(key, limit, now));
        }
        if let (Some(limit), _) = self
            .defaults
            .effective(own, class, RateHolder::Organization)
        {
            buckets.push(self.bucket(Key::Organization(org, class), limit, now));
        }
        buckets
    }
}

/// What a limited request drew from, for a batch to take its other items
/// (`Charge::batch`). In the request's extensions.
#[derive(Clone)]
pub struct Charge {
    buckets: Vec<Arc<Bucket>>,
    /// Set when `batch` refused: the seconds of its `Retry-After`, for the layer.
    refused: Arc<std::sync::OnceLock<u64>>,
}

impl Charge {
    /// Serves a batch of `items` whose request took one token already, or refuses it with
    /// 429 and gives that token back: a refused batch takes nothing.
    pub fn batch(&self, items: u32) -> Result<(), ApiError> {
        if items <= 1 || self.buckets.is_empty() {
            return Ok(());
        }
        match take_all(&self.buckets, items, 1, Instant::now()) {
            Taken::Allowed(_) => Ok(()),
            Taken::Refused {
                retry_after,
                report,
            } => {
                for bucket in &self.buckets {
                    let mut tokens = bucket.lock();
                    tokens.tokens = (tokens.tokens + 1.0).min(f64::from(bucket.limit.burst()));
                }
                let _ = self.refused.set(seconds(retry_after));
                Err(refusal(retry_after, report))
            }
        }
    }
}

/// `Retry-After` of a wait: whole seconds, at least one.
fn seconds(wait: Duration) -> u64 {
    wait.as_secs_f64().ceil().max(1.0) as u64
}

fn refusal(retry_after: Duration, report: Report) -> ApiError {
    let seconds = seconds(retry_after);
    ApiError::new(
        StatusCode::TOO_MANY_REQUESTS,
        Code::RateLimited,
        format!(
            "over the rate limit ({} requests, refilled over time): retry after {seconds} s",
            report.limit
        ),
    )
    .with("retry_after", serde_json::json!(seconds))
}

fn class_of(method: &Method, route: &str) -> Option<RateClass> {
    let data_plane = ["encrypt", "decrypt", "datakey", "rewrap"]
        .iter()
        .any(|op| route.strip_prefix("/v1/scopes/{id}/") == Some(op));
    match (data_plane, method) {
        (true, _) => Some(RateClass::DataPlane),
        (false, &Method::POST | &Method::PUT | &Method::DELETE) => Some(RateClass::Commands),
        _ => None,
    }
}

fn set_headers(response: &mut Response, report: Report, retry_after: Option<u64>) {
    let headers = response.headers_mut();
    let mut put = |name: &'static str, value: u64| {
        if let Ok(value) = HeaderValue::from_str(&value.to_string()) {
            headers.insert(name, value);
        }
    };
    put("ratelimit-limit", u64::from(report.limit));
    put("ratelimit-remaining", report.remaining);
    put("ratelimit-reset", report.reset);
    if let Some(seconds) = retry_after {
        put("retry-after", seconds);
    }
}

/// The route layer: classifies the request, authenticates it (the handler reuses the
/// caller), takes from the buckets, and answers 429 or passes it on with the headers.
pub async fn limit_rate(
    State((state, limiter)): State<(AppState, RateLimiter)>,
    request: Request,
    next: Next,
) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|m| m.as_str().to_owned())
        .unwrap_or_default();
    let Some(class) = class_of(request.method(), &route) else {
        return next.run(request).await;
    };
    let (mut parts, body) = request.into_parts();
    // Answered here when it fails (401, or 503 when the tokens cannot be read): the handler
    // would answer the same, after looking the token up a second time.
    let caller = match Caller::from_request_parts(&mut parts, &state).await {
        Ok(caller) => caller,
        Err(error) => return error.into_response(),
    };
    let Some(org) = caller.principal.org_id else {
        parts.extensions.insert(caller);
        return next.run(Request::from_parts(parts, body)).await;
    };
    let now = Instant::now();
    let own = state.app.memory().rate_limits(org.scope_id());
    let buckets = limiter.buckets(&own, org, &caller.principal.principal, class, now);
    if buckets.is_empty() {
        parts.extensions.insert(caller);
        return next.run(Request::from_parts(parts, body)).await;
    }
    let refused = |class: RateClass| {
        metrics::counter!("ekm_rate_limited_total", "class" => match class {
            RateClass::DataPlane => "data_plane",
            RateClass::Commands => "commands",
        })
        .increment(1);
    };
    match take_all(&buckets, 1, 0, now) {
        Taken::Refused {
            retry_after,
            report,
        } => {
            refused(class);
            let mut response = refusal(retry_after, report).into_response();
            set_headers(&mut response, report, Some(seconds(retry_after)));
            response
        }
        Taken::Allowed(report) => {
            let charge = Charge {
                buckets: buckets.clone(),
                refused: Arc::default(),
            };
            parts.extensions.insert(caller);
            parts.extensions.insert(charge.clone());
            let mut response = next.run(Request::from_parts(parts, body)).await;
            // After the handler: a batch may have taken more, or been refused for it.
            let report = take_report(&buckets).or(report);
            let retry_after = charge.refused.get().copied();
            if retry_after.is_some() {
                refused(class);
            }
            if let Some(report) = report {
                set_headers(&mut response, report, retry_after);
            }
            response
        }
    }
}

/// The tighter bucket's state now.
fn take_report(buckets: &[Arc<Bucket>]) -> Option<Report> {
    let now = Instant::now();
    buckets
        .iter()
        .map(|bucket| {
            let mut tokens = bucket.lock();
            bucket.refill(&mut tokens, now);
            bucket.report(&tokens)
        })
        .min_by_key(|report| report.remaining)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn bucket(per_second: u32, burst: u32, now: Instant) -> Arc<Bucket> {
        Arc::new(Bucket::new(
            RateBucket::new("t", per_second, burst).unwrap(),
            now,
        ))
    }

    #[test]
    fn a_bucket_serves_its_burst_then_refuses_until_it_refills() {
        let start = Instant::now();
        let b = bucket(10, 3, start);
        for _ in 0..3 {
            assert!(matches!(
                take_all(std::slice::from_ref(&b), 1, 0, start),
                Taken::Allowed(_)
            ));
        }
        let Taken::Refused {
            retry_after,
            report,
        } = take_all(std::slice::from_ref(&b), 1, 0, start)
        else {
            panic!("a fourth request in the same instant is refused");
        };
        assert_eq!(retry_after, Duration::from_millis(100));
        assert_eq!((report.limit, report.remaining), (3, 0));
        // A tenth of a second later, one token is back
        let later = start + Duration::from_millis(100);
        assert!(matches!(
            take_all(std::slice::from_ref(&b), 1, 0, later),
            Taken::Allowed(_)
        ));
        assert!(matches!(take_all(&[b], 1, 0, later), Taken::Refused { .. }));
    }

    #[test]
    fn a_refusal_by_one_bucket_takes_nothing_from_the_other() {
        let now = Instant::now();
        let principal = bucket(1, 5, now);
        let org = bucket(1, 1, now);
        assert!(matches!(
            take_all(&[principal.clone(), org.clone()], 1, 0, now),
            Taken::Allowed(_)
        ));
        // The organization's bucket is empty: refused, and the principal keeps its 4
        assert!(matches!(
            take_all(&[principal.clone(), org], 1, 0, now),
            Taken::Refused { .. }
        ));
        let Taken::Allowed(Some(report)) = take_all(&[principal], 1, 0, now) else {
            panic!("the principal's own bucket still serves");
        };
        assert_eq!(report.remaining, 3);
    }

    #[test]
    fn a_batch_larger_than_the_burst_passes_when_full_and_leaves_a_debt() {
        let now = Instant::now();
        let b = bucket(10, 10, now);
        // The request's first token, then the batch's other 999
        assert!(matches!(
            take_all(std::slice::from_ref(&b), 1, 0, now),
            Taken::Allowed(_)
        ));
        assert!(matches!(
            take_all(std::slice::from_ref(&b), 1000, 1, now),
            Taken::Allowed(_)
        ));
        // The debt is 990 tokens: 99.1 s at 10 a second before one more request
        let Taken::Refused { retry_after, .. } = take_all(std::slice::from_ref(&b), 1, 0, now)
        else {
            panic!("refused while in debt");
        };
        assert_eq!(retry_after, Duration::from_millis(99_100));
        let later = now + Duration::from_millis(99_100);
        assert!(matches!(
            take_all(std::slice::from_ref(&b), 1, 0, later),
            Taken::Allowed(_)
        ));
    }

    #[test]
    fn a_refused_batch_gives_back_its_first_token() {
        let now = Instant::now();
        let b = bucket(1, 3, now);
        assert!(matches!(
            take_all(std::slice::from_ref(&b), 1, 0, now),
            Taken::Allowed(_)
        ));
        let charge = Charge {
            buckets: vec![b.clone()],
            refused: Arc::default(),
        };
        assert!(charge.batch(3).is_ok());
        // Empty now: the next batch's request takes nothing net
        let charge = Charge {
            buckets: vec![b.clone()],
            refused: Arc::default(),
        };
        assert!(matches!(
            take_all(std::slice::from_ref(&b), 1, 0, now),
            Taken::Refused { .. }
        ));
        b.state.lock().unwrap().tokens = 1.0;
        assert!(matches!(
            take_all(std::slice::from_ref(&b), 1, 0, now),
            Taken::Allowed(_)
        ));
        assert_eq!(
            charge.batch(2).unwrap_err().status(),
            StatusCode::TOO_MANY_REQUESTS
        );
        assert_eq!(charge.refused.get(), Some(&1));
        // Its token back (and what a few microseconds refilled)
        assert!((b.state.lock().unwrap().tokens - 1.0).abs() < 0.01);
    }

    #[test]
    fn a_changed_limit_keeps_what_the_bucket_held() {
        let limiter = RateLimiter::new(RateDefaults::OFF);
        let now = Instant::now();
        let org = OrgId::parse("0190c7a2-8a1e-7c3b-9d4e-2f1a3b5c6d7e").unwrap();
        let key = Key::Organization(org, RateClass::Commands);
        let limit = |burst| RateBucket::new("t", 1, burst).unwrap();
        let first = limiter.bucket(key.clone(), limit(100), now);
        assert!(matches!(take_all(&[first], 95, 0, now), Taken::Allowed(_)));
        // Lowered to 10: the 5 left stay 5, not a fresh 10
        let lowered = limiter.bucket(key.clone(), limit(10), now);
        assert!((lowered.state.lock().unwrap().tokens - 5.0).abs() < 1e-9);
        // Raised to 30: the 20 more it may hold are added
        let raised = limiter.bucket(key, limit(30), now);
        assert!((raised.state.lock().unwrap().tokens - 25.0).abs() < 1e-9);
    }

    #[test]
    fn requests_are_classified_by_route_and_method() {
        let data = "/v1/scopes/{id}/decrypt";
        assert_eq!(class_of(&Method::POST, data), Some(RateClass::DataPlane));
        assert_eq!(
            class_of(&Method::POST, "/v1/scopes/{id}/pause"),
            Some(RateClass::Commands)
        );
        assert_eq!(
            class_of(&Method::DELETE, "/v1/orgs/{org}/tokens/{id}"),
            Some(RateClass::Commands)
        );
        assert_eq!(class_of(&Method::GET, "/v1/scopes/{id}"), None);
        assert_eq!(class_of(&Method::GET, "/healthz"), None);
    }

    proptest! {
        /// Over any sequence of requests, a bucket never serves more than its burst plus
        /// what its rate refilled (and one batch's debt), and never refuses while it holds
        /// what a request needs.
        #[test]
        fn a_bucket_serves_at_most_burst_plus_refill(
            per_second in 1u32..50,
            burst in 1u32..50,
            steps in proptest::collection::vec((0u64..200, 1u32..80), 1..200),
        ) {
            let start = Instant::now();
            let b = bucket(per_second, burst, start);
            let mut now = start;
            let mut served = 0u64;
            let mut excess = 0u32;
            for (advance_ms, n) in steps {
                now += Duration::from_millis(advance_ms);
                let before = {
                    let mut t = b.state.lock().unwrap();
                    b.refill(&mut t, now);
                    t.tokens
                };
                match take_all(std::slice::from_ref(&b), n, 0, now) {
                    Taken::Allowed(_) => {
                        served += u64::from(n);
                        excess = excess.max(n.saturating_sub(burst));
                    }
                    Taken::Refused { retry_after, .. } => {
                        prop_assert!(before < f64::from(n.min(burst)));
                        prop_assert!(retry_after > Duration::ZERO);
                    }
                }
            }
            // At most the burst and the refill, plus the one debt a batch may leave.
            let elapsed = now.duration_since(start).as_secs_f64();
            let bound =
                f64::from(burst) + elapsed * f64::from(per_second) + f64::from(excess) + 1e-6;
            prop_assert!(served as f64 <= bound, "served {served} > {bound}");
        }
    }
}
