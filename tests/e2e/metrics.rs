//! Prometheus metrics (issue 19 §1): `GET /metrics` with the operator token, and
//! `ekm serve --metrics-listen` on an address of its own; parsed by a real exposition-format
//! parser (Python's `prometheus_client`).

use std::collections::BTreeMap;
use std::io::Write;
use std::process::{Command, Stdio};

use crate::harness::{encrypt, Backend, TestApp};
use crate::on_both_backends;

/// One parsed sample: its labels and value.
pub(crate) type Samples = Vec<(BTreeMap<String, String>, f64)>;

/// Parses exposition text with `prometheus_client.parser`: sample name → samples. Fails
/// the test if the parser refuses the text.
pub(crate) fn parse(text: &str) -> BTreeMap<String, Samples> {
    let script = r#"
import json, sys
from prometheus_client.parser import text_string_to_metric_families
out = {}
for family in text_string_to_metric_families(sys.stdin.read()):
    for sample in family.samples:
        out.setdefault(sample.name, []).append([sample.labels, sample.value])
print(json.dumps(out))
"#;
    let mut child = Command::new("python3")
        .args(["-c", script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 runs");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "prometheus_client refused the text: {}\n{text}",
        String::from_utf8_lossy(&output.stderr)
    );
    let parsed: BTreeMap<String, Samples> = serde_json::from_slice(&output.stdout).unwrap();
    parsed
}

/// The value of the sample `name` whose labels include `labels`, summed over the others.
fn value(metrics: &BTreeMap<String, Samples>, name: &str, labels: &[(&str, &str)]) -> f64 {
    metrics
        .get(name)
        .map(|samples| {
            samples
                .iter()
                .filter(|(have, _)| {
                    labels
                        .iter()
                        .all(|(k, v)| have.get(*k).map(String::as_str) == Some(*v))
                })
                .map(|(_, value)| value)
                .sum()
        })
        .unwrap_or(0.0)
}

async fn metrics_count_requests_commands_keys_and_the_log_when_scraped(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let (org, admin) = app.data_org("enterprise", "managed").await;
    let team = app.scope(&admin, "team", "metrics", &org).await;
    // Given a command, data-plane requests and a path no route serves
    let before = app
        .call("GET", "/metrics", Some(&app.operator_token), None)
        .await;
    let before = parse(before.body.as_str().unwrap());
    assert_eq!(app.pause(&admin, &team).await.status, 200);
    for _ in 0..3 {
        let sealed = encrypt(&app, &admin, &org, b"hello", "messages").await;
        assert_eq!(sealed.status, 200, "{}", sealed.body);
    }
    assert_eq!(app.get("/v1/no-such-thing/12345", &admin).await.status, 404);

    // When the operator scrapes the metrics (once the projection watch, which ticks every
    // second here, has set its gauges)
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let scraped = loop {
        let scraped = app
            .call("GET", "/metrics", Some(&app.operator_token), None)
            .await;
        let text = scraped.body.as_str().unwrap_or_default();
        if text.contains("ekm_projection_head_position") || std::time::Instant::now() > deadline {
            break scraped;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    assert_eq!(scraped.status, 200);
    assert!(
        scraped
            .content_type
            .starts_with("text/plain; version=0.0.4"),
        "{}",
        scraped.content_type
    );
    let text = scraped.body.as_str().unwrap();
    let after = parse(text);
    let grew = |name: &str, labels: &[(&str, &str)]| {
        value(&after, name, labels) - value(&before, name, labels)
    };

    // Then requests are counted by route template (never by id) and status, and timed
    let pause = [
        ("route", "/v1/scopes/{id}/pause"),
        ("method", "POST"),
        ("status", "200"),
    ];
    assert!(grew("ekm_http_requests_total", &pause) >= 1.0, "{after:?}");
    assert!(
        grew(
            "ekm_http_request_duration_seconds_count",
            &[("route", "/v1/scopes/{id}/pause")]
        ) >= 1.0
    );
    assert!(after["ekm_http_request_duration_seconds_bucket"]
        .iter()
        .any(|(labels, _)| labels.get("le").map(String::as_str) == Some("+Inf")));
    assert!(
        grew(
            "ekm_http_requests_total",
            &[("route", "unmatched"), ("status", "404")]
        ) >= 1.0
    );
    assert!(!text.contains(&team), "a scope id in a label");
    // Commands by outcome
    assert!(grew("ekm_commands_total", &[("outcome", "recorded")]) >= 1.0);
    // The key cache: the first encrypt misses, the others hit
    assert!(grew("ekm_key_cache_lookups_total", &[("result", "hit")]) >= 2.0);
    assert!(value(&after, "ekm_key_cache_lookups_total", &[("result", "miss")]) >= 1.0);
    // The access log's writer (durable by default) and the projections
    assert!(grew("ekm_access_log_flush_duration_seconds_count", &[]) >= 1.0);
    assert!(after.contains_key("ekm_access_log_queue_depth"));
    assert!(
        value(&after, "ekm_projection_head_position", &[]) >= 1.0,
        "{}",
        text
    );
    assert!(after.contains_key("ekm_projection_lag_seconds"));
    assert!(after.contains_key("ekm_projection_lag_positions"));
    // The scheduler looks every second at most
    assert!(after.contains_key("ekm_scheduled_actions_due"));

    // Only the operator reads them
    app.call("GET", "/metrics", Some(&admin), None)
        .await
        .assert_problem(403, "forbidden");
    app.call("GET", "/metrics", None, None)
        .await
        .assert_problem(401, "unauthorized");
    app.stop().await;
}
on_both_backends!(metrics_count_requests_commands_keys_and_the_log_when_scraped);

/// `ekm serve --metrics-listen ADDR` answers `GET /metrics` there without a token, and only
/// that; the main address still wants the operator token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_listen_serves_the_text_on_its_own_address() {
    let dir = tempfile::tempdir().unwrap();
    let port = crate::harness::free_port();
    let server = crate::process::serve_configured(
        dir.path(),
        None,
        &["--metrics-listen", &format!("127.0.0.1:{port}")],
        &[],
    );
    let client = reqwest::Client::new();
    let _ = client
        .get(format!("{}/healthz", server.base))
        .send()
        .await
        .unwrap();
    let metrics = client
        .get(format!("http://127.0.0.1:{port}/metrics"))
        .send()
        .await
        .unwrap();
    assert_eq!(metrics.status(), 200);
    let parsed = parse(&metrics.text().await.unwrap());
    assert!(
        value(&parsed, "ekm_http_requests_total", &[("route", "/healthz")]) >= 1.0,
        "{parsed:?}"
    );
    let other = client
        .get(format!("http://127.0.0.1:{port}/v1/me"))
        .send()
        .await
        .unwrap();
    assert_eq!(other.status(), 404);
    let main = client
        .get(format!("{}/metrics", server.base))
        .send()
        .await
        .unwrap();
    assert_eq!(main.status(), 401);
    drop(server);
}

/// The Grafana dashboard in docs/ops/ queries only names the server exports (as listed in
/// `service/src/metrics.rs`).
#[test]
fn the_dashboard_queries_only_metrics_the_server_exports() {
    let dashboard = include_str!("../../docs/ops/grafana-dashboard.json");
    let names = include_str!("../../service/src/metrics.rs");
    let used: Vec<&str> = dashboard
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|word| word.starts_with("ekm_"))
        .collect();
    assert!(used.len() >= 10, "{used:?}");
    for word in used {
        let name = word.trim_end_matches("_bucket");
        assert!(
            names.contains(&format!("`{name}")),
            "{name} is not exported"
        );
    }
}
