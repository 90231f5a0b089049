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

async fn set_master_key_gets_a_safe_problem_when_the_endpoint_is_refused_or_unreachable(
    backend: Backend,
) {
    let app = TestApp::spawn_with(
        backend,
        Options {
            kms: ekm_service::keys::KmsOptions {
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
on_both_backends!(set_master_key_gets_a_safe_problem_when_the_endpoint_is_refused_or_unreachable);

const EKM: &str = env!("CARGO_BIN_EXE_ekm");

#[test]
fn serve_refuses_to_start_when_an_endpoint_pattern_is_bad() {
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

// ---------------------------------------------------------------------------------------
// Connection limits, with real sockets against the real binary.

/// A running `ekm serve` on SQLite (the limits are the listener's, not the database's).
struct Ekm {
    child: std::process::Child,
    port: u16,
    log: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    dir: tempfile::TempDir,
}

impl Ekm {
    fn start(args: &[&str]) -> Ekm {
        use std::io::BufRead;
        let dir = tempfile::tempdir().unwrap();
        let port = crate::harness::free_port();
        let mut child = std::process::Command::new(EKM)
            .args(["--log-format", "json", "serve", "--listen"])
            .arg(format!("127.0.0.1:{port}"))
            .arg("--data-dir")
            .arg(dir.path())
            .args(args)
            .env_remove("EKM_DATABASE_URL")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let log = std::sync::Arc::new(std::sync::Mutex::new(vec![]));
        let lines = log.clone();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                let listening = line.contains("\"listening\"");
                // Kept before the signal: a test reads the "listening" line itself.
                lines.lock().unwrap().push(line);
                if listening {
                    let _ = ready_tx.send(true);
                }
            }
            let _ = ready_tx.send(false);
        });
        let ready = ready_rx
            .recv_timeout(Duration::from_secs(60))
            .unwrap_or(false);
        assert!(ready, "ekm serve did not start: {:?}", log.lock().unwrap());
        Ekm {
            child,
            port,
            log,
            dir,
        }
    }

    fn connect(&self) -> std::net::TcpStream {
        let stream = std::net::TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        stream
    }

    fn log_text(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    fn operator_token(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("operator.token"))
            .unwrap()
            .trim()
            .to_owned()
    }

    /// The sockets the server process holds (listener and connections).
    fn sockets(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.child.id()))
            .map(|entries| {
                entries
                    .filter_map(Result::ok)
                    .filter(|e| {
                        std::fs::read_link(e.path())
                            .is_ok_and(|target| target.to_string_lossy().starts_with("socket:"))
                    })
                    .count()
            })
            .unwrap_or(0)
    }

    fn terminate(&self) {
        let status = std::process::Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }
}

impl Drop for Ekm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Reads until the server closes the connection (or the read timeout); returns what came
/// and how long it took.
fn read_until_closed(stream: &mut std::net::TcpStream) -> (String, Duration, bool) {
    use std::io::Read;
    let started = std::time::Instant::now();
    let mut received = vec![];
    let mut buffer = [0u8; 4096];
    let closed = loop {
        match stream.read(&mut buffer) {
            Ok(0) => break true,
            Ok(n) => received.extend_from_slice(&buffer[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break true,
            Err(_) => break false,
        }
    };
    (
        String::from_utf8_lossy(&received).into_owned(),
        started.elapsed(),
        closed,
    )
}

#[test]
fn connection_is_closed_within_the_timeout_when_a_header_is_half_sent_or_idle() {
    use std::io::Write;
    let server = Ekm::start(&["--header-read-timeout", "300ms"]);
    let mut half = server.connect();
    half.write_all(b"GET /healthz HTTP/1.1\r\nHost: ekm\r\n")
        .unwrap();
    let mut idle = server.connect();
    for stream in [&mut half, &mut idle] {
        let (_, took, closed) = read_until_closed(stream);
        assert!(closed, "the connection stayed open");
        // The bound is the behaviour (the timeout closes it), ten times the timeout.
        assert!(took < Duration::from_secs(3), "closed after {took:?}");
    }
    // A complete request is still answered on a fresh connection.
    let mut fresh = server.connect();
    fresh
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: ekm\r\nConnection: close\r\n\r\n")
        .unwrap();
    let (answer, _, _) = read_until_closed(&mut fresh);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
}

#[test]
fn healthz_answers_once_idle_sockets_are_reaped_when_above_the_cap() {
    let server = Ekm::start(&["--max-connections", "4", "--header-read-timeout", "500ms"]);
    let baseline = server.sockets();
    let mut idle: Vec<_> = (0..12).map(|_| server.connect()).collect();
    // The first four are accepted at once. (Polling /proc: the kernel tells another
    // process of no accept, so there is no event to await.)
    while server.sockets() < baseline + 4 {
        std::thread::sleep(Duration::from_millis(5));
    }

    let mut fresh = server.connect();
    let health = std::thread::spawn(move || {
        use std::io::Write;
        fresh
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: ekm\r\nConnection: close\r\n\r\n")
            .unwrap();
        let (answer, _, _) = read_until_closed(&mut fresh);
        answer.get(9..12).and_then(|code| code.parse::<u16>().ok())
    });
    // While the idle sockets are reaped four at a time, the process never holds more than
    // four connections. Sampled while the health request waits: what is measured is the
    // most sockets ever held, so this loop is the measurement, not a synchronisation.
    let mut most = 0;
    while !health.is_finished() {
        most = most.max(server.sockets());
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(health.join().unwrap(), Some(200));
    assert!(
        most <= baseline + 4,
        "{most} sockets with a cap of 4 (baseline {baseline})"
    );
    assert!(server.log_text().contains("connection limit reached"));
    // Every idle socket was accepted in its turn and closed by the server.
    for stream in &mut idle {
        let (_, _, closed) = read_until_closed(stream);
        assert!(closed, "an idle connection stayed open");
    }
}

#[test]
fn request_gets_408_when_its_body_is_late() {
    use std::io::Write;
    let server = Ekm::start(&["--request-timeout", "300ms"]);
    let token = server.operator_token();
    let mut slow = server.connect();
    write!(
        slow,
        "POST /v1/orgs HTTP/1.1\r\nHost: ekm\r\nAuthorization: Bearer {token}\r\n\
         Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"name\""
    )
    .unwrap();
    let (answer, took, closed) = read_until_closed(&mut slow);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("application/problem+json"), "{answer}");
    assert!(answer.contains("\"code\":\"request_timeout\""), "{answer}");
    // Answered inside the request-id layer, like every other response.
    assert!(answer.to_lowercase().contains("x-request-id:"), "{answer}");
    // The bound is the behaviour: the request timeout ends it, not the client.
    assert!(closed && took < Duration::from_secs(5), "{took:?}");
}

#[test]
fn serve_exits_within_the_shutdown_deadline_when_a_slow_client_holds_a_request() {
    use std::io::Write;
    let mut server = Ekm::start(&["--shutdown-timeout", "500ms", "--request-timeout", "60s"]);
    let token = server.operator_token();
    let baseline = server.sockets();
    let mut slow = server.connect();
    write!(
        slow,
        "POST /v1/orgs HTTP/1.1\r\nHost: ekm\r\nAuthorization: Bearer {token}\r\n\
         Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"name\""
    )
    .unwrap();
    // The server has accepted the connection (and reads the request at once). Polling
    // /proc, as above: no event to await from another process's accept.
    while server.sockets() <= baseline {
        std::thread::sleep(Duration::from_millis(5));
    }
    let signalled = std::time::Instant::now();
    server.terminate();
    let status = wait_for_exit(&mut server.child, Duration::from_secs(10));
    let took = signalled.elapsed();
    let status = status.unwrap_or_else(|| panic!("still running {took:?} after SIGTERM"));
    assert!(status.success(), "{}", server.log_text());
    // The bound is the behaviour: the shutdown deadline, not the slow client, ends it.
    assert!(
        took < Duration::from_secs(5),
        "exited {took:?} after SIGTERM"
    );
    let (_, _, closed) = read_until_closed(&mut slow);
    assert!(closed);
}

// ---------------------------------------------------------------------------------------
// TLS on the listener.

/// A self-signed certificate for 127.0.0.1, written as PEM files; returns the cert's PEM.
fn self_signed(
    dir: &std::path::Path,
    name: &str,
) -> (std::path::PathBuf, std::path::PathBuf, String) {
    let certified = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned()]).unwrap();
    let cert_pem = certified.cert.pem();
    let cert = dir.join(format!("{name}.crt"));
    let key = dir.join(format!("{name}.key"));
    std::fs::write(&cert, &cert_pem).unwrap();
    std::fs::write(&key, certified.key_pair.serialize_pem()).unwrap();
    (cert, key, cert_pem)
}

#[test]
fn serve_answers_https_and_refuses_plain_http_when_tls_is_set() {
    let files = tempfile::tempdir().unwrap();
    let (cert, key, cert_pem) = self_signed(files.path(), "server");
    let server = Ekm::start(&[
        "--tls-cert",
        cert.to_str().unwrap(),
        "--tls-key",
        key.to_str().unwrap(),
    ]);
    assert!(
        server.log_text().contains("\"tls\":true"),
        "{}",
        server.log_text()
    );
    let operator = server.operator_token();
    let base = format!("https://127.0.0.1:{}", server.port);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let trusting = reqwest::Client::builder()
            .use_rustls_tls()
            .add_root_certificate(reqwest::Certificate::from_pem(cert_pem.as_bytes()).unwrap())
            .build()
            .unwrap();
        let health = trusting
            .get(format!("{base}/healthz"))
            .send()
            .await
            .unwrap();
        assert_eq!(health.status(), StatusCode::OK);

        let created = trusting
            .post(format!("{base}/v1/orgs"))
            .bearer_auth(&operator)
            .json(&json!({"name": "Acme"}))
            .send()
            .await
            .unwrap();
        assert_eq!(created.status(), StatusCode::CREATED);
        let org: serde_json::Value = created.json().await.unwrap();
        let shown = trusting
            .get(format!("{base}/v1/orgs/{}", org["id"].as_str().unwrap()))
            .bearer_auth(org["admin_token"].as_str().unwrap())
            .send()
            .await
            .unwrap();
        assert_eq!(shown.status(), StatusCode::OK);

        // Plain HTTP to the TLS port gets no answer.
        let plain = reqwest::Client::new()
            .get(format!("http://127.0.0.1:{}/healthz", server.port))
            .send()
            .await;
        assert!(plain.is_err(), "{plain:?}");
        // A client that does not trust the certificate refuses the server.
        let untrusting = reqwest::Client::builder().use_rustls_tls().build().unwrap();
        assert!(untrusting
            .get(format!("{base}/healthz"))
            .send()
            .await
            .is_err());
    });

    // The CLI client reaches the https server with --ca-file.
    let output = std::process::Command::new(EKM)
        .args([
            "org",
            "create",
            "--name",
            "Beta",
            "--url",
            &base,
            "--ca-file",
        ])
        .arg(&cert)
        .env("EKM_TOKEN", &operator)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout} {}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("admin_token"), "{stdout}");
}

#[test]
fn serve_refuses_to_start_when_the_tls_files_are_bad() {
    let files = tempfile::tempdir().unwrap();
    let (cert, key, _) = self_signed(files.path(), "one");
    let (_, other_key, _) = self_signed(files.path(), "two");
    let garbage = files.path().join("garbage.pem");
    std::fs::write(&garbage, "not a certificate").unwrap();
    let missing = files.path().join("missing.pem");
    let path = |p: &std::path::Path| p.to_str().unwrap().to_owned();
    for (args, expected) in [
        (
            vec![
                "--tls-cert".to_owned(),
                path(&garbage),
                "--tls-key".to_owned(),
                path(&key),
            ],
            "--tls-cert",
        ),
        (
            vec![
                "--tls-cert".to_owned(),
                path(&missing),
                "--tls-key".to_owned(),
                path(&key),
            ],
            "--tls-cert",
        ),
        (
            vec![
                "--tls-cert".to_owned(),
                path(&cert),
                "--tls-key".to_owned(),
                path(&garbage),
            ],
            "--tls-key",
        ),
        (
            vec![
                "--tls-cert".to_owned(),
                path(&cert),
                "--tls-key".to_owned(),
                path(&other_key),
            ],
            "do not form a usable pair",
        ),
        (vec!["--tls-cert".to_owned(), path(&cert)], "--tls-key"),
    ] {
        let data = tempfile::tempdir().unwrap();
        let mut child = std::process::Command::new(EKM)
            .args(["serve", "--listen", "127.0.0.1:0"])
            .arg("--data-dir")
            .arg(data.path())
            .args(&args)
            .env_remove("EKM_DATABASE_URL")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let exited = wait_for_exit(&mut child, Duration::from_secs(30));
        let _ = child.kill();
        let output = child.wait_with_output().unwrap();
        let log = String::from_utf8_lossy(&output.stderr);
        assert!(
            exited.is_some_and(|s| !s.success()),
            "{args:?} started: {log}"
        );
        assert!(log.contains(expected), "{args:?}: {log}");
        assert!(!log.contains("PRIVATE KEY"), "{log}");
    }
}
