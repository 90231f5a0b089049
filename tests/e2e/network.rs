//! The network edge (issue 14): customer key endpoints are matched on parsed URLs and
//! refusals never echo URLs or network detail; connection limits, timeouts and the shutdown
//! deadline of the real binary; TLS on the listener.

use std::time::Duration;

use ekm_kms::KmsSettings;
use reqwest::StatusCode;
use serde_json::json;

use crate::harness::{Backend, Options, TestApp};
use crate::on_both_backends;

const GCP_KEY: &str = "projects/p/locations/global/keyRings/r/cryptoKeys/k";

/// What no answer to a client may contain: addresses, ports, host names and the words
/// resolvers and sockets use in their errors.
fn assert_no_network_detail(text: &str, secrets: &[&str]) {
    let lower = text.to_lowercase();
    for word in secrets.iter().copied().chain([
        "dns", "lookup", "resolve", "refused", "tcp", "os error", "http://",
    ]) {
        assert!(
            !lower.contains(&word.to_lowercase()),
            "`{word}` in the answer: {text}"
        );
    }
}

async fn a_key_naming_a_refused_or_unreachable_endpoint_gets_a_safe_problem(backend: Backend) {
    let app = TestApp::spawn_with(
        backend,
        Options {
            kms: ekm_api::keys::KmsOptions {
                settings: KmsSettings {
                    timeout: Duration::from_secs(2),
                    attempts: 1,
                    environment: crate::kms_servers::aws_environment(),
                    allowed_endpoints: vec![
                        "https://*.p.googleapis.com".into(),
                        "http://127.0.0.1:*".into(),
                        "http://*.nowhere.invalid".into(),
                    ],
                    ..KmsSettings::default()
                },
                ..Default::default()
            },
            ..Options::default()
        },
    )
    .await;
    let (org, token) = app.data_org("enterprise", "managed").await;
    let connect = |body: serde_json::Value| {
        let app = &app;
        let path = format!("/v1/orgs/{org}/master-key");
        let token = token.clone();
        async move { app.call("PUT", &path, Some(&token), Some(body)).await }
    };

    // The reported bypass: the allowed suffix in a path, the host elsewhere.
    let refused = connect(json!({
        "provider": "gcp-kms", "key_id": GCP_KEY,
        "endpoint_url": "https://127.0.0.1:9443/.p.googleapis.com",
    }))
    .await;
    refused.assert_problem(400, "invalid_request");
    assert!(refused.body["detail"]
        .as_str()
        .is_some_and(|d| d.starts_with("endpoint_url")));
    assert_no_network_detail(
        &refused.body.to_string(),
        &["127.0.0.1", "9443", "googleapis"],
    );

    // Allowed, but nothing listens there.
    let closed = {
        let socket = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        socket.local_addr().unwrap().port()
    };
    let arn = "arn:aws:kms:us-east-1:123456789012:key/11111111-2222-3333-4444-555555555555";
    let unreachable = connect(json!({
        "provider": "aws-kms", "key_id": arn,
        "endpoint_url": format!("http://127.0.0.1:{closed}"),
    }))
    .await;
    unreachable.assert_problem(502, "master_key_unusable");
    assert_eq!(unreachable.body["provider_error"]["kind"], "unreachable");
    assert_no_network_detail(
        &unreachable.body.to_string(),
        &["127.0.0.1", &closed.to_string()],
    );

    // Allowed, but the name does not resolve (`.invalid` never does).
    let unresolved = connect(json!({
        "provider": "aws-kms", "key_id": arn,
        "endpoint_url": "http://kms.nowhere.invalid",
    }))
    .await;
    assert_eq!(
        unresolved.status,
        StatusCode::BAD_GATEWAY,
        "{}",
        unresolved.body
    );
    assert_eq!(unresolved.body["provider_error"]["kind"], "unreachable");
    assert_no_network_detail(&unresolved.body.to_string(), &["nowhere"]);
}
on_both_backends!(a_key_naming_a_refused_or_unreachable_endpoint_gets_a_safe_problem);

const EKM: &str = env!("CARGO_BIN_EXE_ekm");

#[test]
fn serve_refuses_to_start_with_a_bad_endpoint_pattern() {
    let dir = tempfile::tempdir().unwrap();
    for pattern in [
        "https://*",
        "https://kms.example/v1",
        "https://a@kms.example",
    ] {
        let mut child = std::process::Command::new(EKM)
            .args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--kms-allowed-endpoints",
                pattern,
            ])
            .arg("--data-dir")
            .arg(dir.path())
            .env_remove("EKM_DATABASE_URL")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let exited = wait_for_exit(&mut child, Duration::from_secs(30));
        let _ = child.kill();
        let output = child.wait_with_output().unwrap();
        assert!(
            exited.is_some_and(|status| !status.success()),
            "{pattern} was accepted"
        );
        let log = String::from_utf8_lossy(&output.stderr);
        assert!(
            log.contains("--kms-allowed-endpoints") && log.contains(pattern),
            "{log}"
        );
    }
}

/// Waits for the process to exit, up to `limit`; `None` if it is still running.
fn wait_for_exit(
    child: &mut std::process::Child,
    limit: Duration,
) -> Option<std::process::ExitStatus> {
    let deadline = std::time::Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status);
        }
        if std::time::Instant::now() >= deadline {
            return None;
        }
        // Polling a child process: there is no event to await from std.
        std::thread::sleep(Duration::from_millis(20));
    }
}
