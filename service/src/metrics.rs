//! Prometheus metrics (issue 19 §1). Every instrumented place records through the `metrics`
//! facade under the names below; this module installs the one process-wide recorder and
//! renders it in the text exposition format for `GET /metrics` (operator token) and
//! `--metrics-listen` (its own address). A process that never installs it (a CLI job)
//! records into the facade's no-op recorder.
//!
//! Names, and their labels:
//! - `ekm_http_requests_total{route, method, status}`,
//!   `ekm_http_request_duration_seconds{route, method}` (route: the matched path template);
//! - `ekm_commands_total{outcome}`: `recorded`, `unchanged`, `conflict`, `refused`,
//!   `unavailable`, `unconfirmed`, `failed`;
//! - `ekm_projection_position{projection}`, `ekm_projection_head_position`,
//!   `ekm_projection_lag_positions{projection}`, `ekm_projection_lag_seconds` (the oldest
//!   committed event this instance has not applied);
//! - `ekm_key_cache_lookups_total{result}` (`hit`, `miss`), `ekm_key_cache_evictions_total`;
//! - `ekm_kms_calls_total{provider, outcome}` (`ok`, `unavailable`, `refused`, and
//!   `circuit_open`: held back by the key's open circuit breaker, no call made),
//!   `ekm_kms_call_duration_seconds{provider}`, `ekm_kms_circuit_opened_total{provider}`;
//! - `ekm_master_keys{health}`: organizations with a customer key, by its last health;
//! - `ekm_access_log_queue_depth`, `ekm_access_log_flush_duration_seconds`,
//!   `ekm_access_log_records_written_total` (records per commit: its rate over the
//!   flush histogram's count);
//! - `ekm_scheduled_actions_due`, `ekm_scheduled_action_lateness_seconds`;
//! - `ekm_rate_limited_total{class}` (`data_plane`, `commands`): requests refused 429 by the
//!   rate limits (`ekm-api`'s `rate_limit`).
//!
//! - `ekm_rebuild_running`, `ekm_rebuild_applied_position`, `ekm_rebuild_head_position`: a
//!   rebuild's progress. `ekm projections rebuild` runs as its own process: it serves them
//!   with `--metrics-listen`, and `--metrics-linger` keeps them up after it finishes, for a
//!   scrape to see the end (the servers' `ekm_projection_*` gauges show the swapped-in
//!   tables' position).

use std::sync::OnceLock;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Latency buckets, in seconds: 100 µs to 30 s.
const SECONDS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0,
];

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Installs the recorder (once per process; later calls return the same handle). `None`
/// when another recorder was installed first.
pub fn install() -> Option<&'static PrometheusHandle> {
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS)
                .ok()?;
            match builder.install_recorder() {
                Ok(handle) => Some(handle),
                Err(error) => {
                    tracing::warn!(%error, "metrics recorder not installed");
                    None
                }
            }
        })
        .as_ref()
}

/// The metrics in the text exposition format (empty without a recorder).
pub fn render() -> String {
    install().map(PrometheusHandle::render).unwrap_or_default()
}

/// A rebuild's progress: `applied` of `head` positions.
pub fn rebuild_progress(applied: i64, head: i64) {
    metrics::gauge!("ekm_rebuild_running").set(1.0);
    metrics::gauge!("ekm_rebuild_applied_position").set(applied as f64);
    metrics::gauge!("ekm_rebuild_head_position").set(head as f64);
}

/// A rebuild has stopped (done or failed).
pub fn rebuild_stopped() {
    metrics::gauge!("ekm_rebuild_running").set(0.0);
}
