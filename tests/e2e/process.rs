//! The real `ekm` binary: first start, operator token, graceful shutdown, restart, the
//! SQLite data-directory lock, two instances on one PostgreSQL database, `ekm migrate`.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};

use crate::harness::{free_port, Backend, TestDb};

pub(crate) const EKM: &str = env!("CARGO_BIN_EXE_ekm");

/// A running `ekm serve`, with its log lines collected.
pub(crate) struct Server {
    pub(crate) child: Child,
    pub(crate) base: String,
    log: Arc<Mutex<Vec<String>>>,
}

pub(crate) fn serve(data_dir: &Path, database_url: Option<&str>) -> Server {
    serve_configured(data_dir, database_url, &[], &[])
}

pub(crate) fn serve_configured(
    data_dir: &Path,
    database_url: Option<&str>,
    args: &[&str],
    envs: &[(&str, &str)],
) -> Server {
    let port = free_port();
    let mut command = Command::new(EKM);
    command
        .args([
            "--log-format",
            "json",
            "serve",
            "--listen",
            &format!("127.0.0.1:{port}"),
        ])
        .args(args)
        .envs(envs.iter().copied())
        .arg("--data-dir")
        .arg(data_dir)
        .env_remove("EKM_DATABASE_URL")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    if let Some(url) = database_url {
        command.args(["--database-url", url]);
    }
    let mut child = command.spawn().expect("ekm starts");
    let stderr = child.stderr.take().expect("stderr");
    let log = Arc::new(Mutex::new(vec![]));
    let (ready_tx, ready_rx) = mpsc::channel();
    let lines = log.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.contains("\"listening\"") {
                let _ = ready_tx.send(true);
            }
            lines.lock().unwrap().push(line);
        }
        let _ = ready_tx.send(false);
    });
    // Wait for the "listening" log line: the server tells us when it is ready.
    let ready = ready_rx
        .recv_timeout(Duration::from_secs(60))
        .unwrap_or(false);
    assert!(ready, "ekm serve did not start: {:?}", log.lock().unwrap());
    Server {
        child,
        base: format!("http://127.0.0.1:{port}"),
        log,
    }
}

impl Server {
    pub(crate) fn log_text(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    /// SIGTERM, then wait for the exit; returns the exit code.
    pub(crate) fn terminate(mut self) -> (i32, String) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        let code = self.child.wait().unwrap().code().unwrap_or(-1);
        (code, self.log_text())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub(crate) fn call(method: &str, url: &str, token: &str, body: Option<Value>) -> (u16, Value) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let client = reqwest::Client::new();
        let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let mut request = client.request(method, url).bearer_auth(token);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        let text = response.text().await.unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    })
}

pub(crate) fn read_token(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("operator.token"))
        .unwrap()
        .trim()
        .to_owned()
}

pub(crate) fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

fn serve_keeps_its_token_and_state_when_stopped_and_restarted(backend: Backend) {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let test_db = runtime.block_on(TestDb::new(backend));
    let url = test_db.url.clone();
    let data_dir = test_db.data_dir().join("fresh").join("data");

    let server = serve(&data_dir, url.as_deref());
    assert_eq!(mode(&data_dir), 0o700);
    let token_path = data_dir.join("operator.token");
    assert_eq!(mode(&token_path), 0o600);
    let operator = read_token(&data_dir);
    assert!(operator.starts_with("ekm_") && operator.len() > 60);

    let (status, health) = call("GET", &format!("{}/healthz", server.base), "", None);
    assert_eq!((status, health["status"].as_str()), (200, Some("ok")));
    let (status, ready) = call("GET", &format!("{}/readyz", server.base), "", None);
    assert_eq!(status, 200, "{ready}");

    let (status, org) = call(
        "POST",
        &format!("{}/v1/orgs", server.base),
        &operator,
        Some(json!({"name": "Acme", "plan": "enterprise", "tier": "managed"})),
    );
    assert_eq!(status, 201, "{org}");
    let org_id = org["id"].as_str().unwrap().to_owned();
    let admin = org["admin_token"].as_str().unwrap().to_owned();
    let (status, _) = call(
        "POST",
        &format!("{}/v1/scopes/{org_id}/pause", server.base),
        &admin,
        Some(json!({"reason": "before restart"})),
    );
    assert_eq!(status, 200);

    let (code, log) = server.terminate();
    assert_eq!(code, 0, "graceful shutdown exits 0: {log}");
    assert!(log.contains("SIGTERM received"), "{log}");
    // Secrets never reach the log.
    assert!(!log.contains(&operator) && !log.contains(&admin));

    // Restart: same token file, same state, no new operator token.
    let again = serve(&data_dir, url.as_deref());
    assert_eq!(read_token(&data_dir), operator);
    assert!(!again.log_text().contains("operator token created"));
    let (status, scope) = call(
        "GET",
        &format!("{}/v1/scopes/{org_id}", again.base),
        &admin,
        None,
    );
    assert_eq!(status, 200, "{scope}");
    assert_eq!(scope["own_state"], "paused");
    assert_eq!(scope["cause"]["reason"], "before restart");
    let (code, _) = again.terminate();
    assert_eq!(code, 0);
    drop(runtime);
}

#[test]
fn serve_keeps_its_token_and_state_when_stopped_and_restarted_on_sqlite() {
    serve_keeps_its_token_and_state_when_stopped_and_restarted(Backend::Sqlite);
}

#[test]
fn serve_keeps_its_token_and_state_when_stopped_and_restarted_on_postgres() {
    serve_keeps_its_token_and_state_when_stopped_and_restarted(Backend::Postgres);
}

#[test]
fn serve_is_refused_when_another_process_holds_the_sqlite_data_dir() {
    let dir = tempfile::tempdir().unwrap();
    let first = serve(dir.path(), None);
    let output = Command::new(EKM)
        .args(["serve", "--listen", &format!("127.0.0.1:{}", free_port())])
        .arg("--data-dir")
        .arg(dir.path())
        .env_remove("EKM_DATABASE_URL")
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("another ekm process"));
    let (code, _) = first.terminate();
    assert_eq!(code, 0);
}

#[test]
fn get_scope_shows_another_instances_command_within_a_second_when_two_share_postgres() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let test_db = runtime.block_on(TestDb::new(Backend::Postgres));
    let url = test_db.url.clone().unwrap();
    let dir_a = test_db.data_dir().join("a");
    let dir_b = test_db.data_dir().join("b");
    let a = serve(&dir_a, Some(&url));
    // Every instance of one database needs the same master key and audit key files.
    std::fs::create_dir_all(&dir_b).unwrap();
    for file in ["master.key", "audit.key"] {
        std::fs::copy(dir_a.join(file), dir_b.join(file)).unwrap();
        std::fs::set_permissions(
            dir_b.join(file),
            std::os::unix::fs::PermissionsExt::from_mode(0o600),
        )
        .unwrap();
    }
    let b = serve(&dir_b, Some(&url));
    // The database has one operator token; only the instance that created it wrote the file.
    let operator = read_token(&dir_a);
    assert!(!dir_b.join("operator.token").exists());

    let (_, org) = call(
        "POST",
        &format!("{}/v1/orgs", a.base),
        &operator,
        Some(json!({"name": "Acme", "plan": "enterprise"})),
    );
    let org_id = org["id"].as_str().unwrap().to_owned();
    let admin = org["admin_token"].as_str().unwrap().to_owned();
    // Created on A, visible on B as soon as A answered.
    let (status, on_b) = call(
        "GET",
        &format!("{}/v1/scopes/{org_id}", b.base),
        &admin,
        None,
    );
    assert_eq!(status, 200, "{on_b}");
    let (_, team) = call(
        "POST",
        &format!("{}/v1/scopes", b.base),
        &admin,
        Some(json!({"kind": "team", "name": "t", "parent_id": org_id})),
    );
    let team_id = team["id"].as_str().unwrap().to_owned();
    for round in 0..5 {
        let (writer, reader) = if round % 2 == 0 { (&a, &b) } else { (&b, &a) };
        let action = if round % 2 == 0 { "pause" } else { "resume" };
        let (status, _) = call(
            "POST",
            &format!("{}/v1/scopes/{org_id}/{action}", writer.base),
            &admin,
            Some(json!({"reason": "r"})),
        );
        assert_eq!(status, 200);
        // The other instance reads from its memory, which hears of the commit through
        // NOTIFY (ADR 0020): within the bound, never the old state after it.
        let answered = std::time::Instant::now();
        let expected = if round % 2 == 0 { "paused" } else { "active" };
        loop {
            let (_, seen) = call(
                "GET",
                &format!("{}/v1/scopes/{team_id}", reader.base),
                &admin,
                None,
            );
            if seen["effective_state"] == expected {
                break;
            }
            assert!(
                answered.elapsed() < std::time::Duration::from_secs(1),
                "round {round}: still {} a second after the answer",
                seen["effective_state"]
            );
        }
    }
    assert_eq!(a.terminate().0, 0);
    assert_eq!(b.terminate().0, 0);
    drop(runtime);
}

#[test]
fn migrate_prepares_the_database_and_exits_when_it_is_empty() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    for backend in [Backend::Sqlite, Backend::Postgres] {
        let test_db = runtime.block_on(TestDb::new(backend));
        let mut command = Command::new(EKM);
        command
            .arg("migrate")
            .arg("--data-dir")
            .arg(test_db.data_dir())
            .env_remove("EKM_DATABASE_URL");
        if let Some(url) = &test_db.url {
            command.args(["--database-url", url]);
        }
        let output = command.output().unwrap();
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        let db = runtime
            .block_on(ekm_store::Db::connect(&test_db.config))
            .unwrap();
        assert_eq!(runtime.block_on(db.event_count()).unwrap(), 0);
        runtime.block_on(db.close());
    }
}

#[test]
fn serve_refuses_clearly_when_the_database_is_unreachable() {
    let dir = tempfile::tempdir().unwrap();
    let output = Command::new(EKM)
        .args([
            "serve",
            "--database-url",
            &format!("postgres://postgres@127.0.0.1:{}/nothing", free_port()),
        ])
        .arg("--data-dir")
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("cannot connect to the database"));
}

/// kill -9 in the middle of a stream of commands (creations, pauses, resumes, revokes);
/// after a restart the read models equal a rebuild from the events, no revoked scope has
/// key material left, and the audit chain verifies.
fn read_models_equal_a_rebuild_when_the_server_is_killed_mid_workload(backend: Backend) {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let test_db = runtime.block_on(TestDb::new(backend));
    let url = test_db.url.clone();
    let data_dir = test_db.data_dir().to_path_buf();
    let server = serve(&data_dir, url.as_deref());
    let operator = read_token(&data_dir);
    let (_, org) = call(
        "POST",
        &format!("{}/v1/orgs", server.base),
        &operator,
        Some(json!({"name": "Acme", "plan": "enterprise"})),
    );
    let org_id = org["id"].as_str().unwrap().to_owned();
    let admin = org["admin_token"].as_str().unwrap().to_owned();

    let (acked_tx, acked_rx) = mpsc::channel::<&'static str>();
    let base = server.base.clone();
    let worker = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let client = reqwest::Client::new();
            let mut teams: Vec<String> = vec![];
            for i in 0.. {
                let (kind, path, body) = match i % 5 {
                    0 | 1 => (
                        "create",
                        "/v1/scopes".to_owned(),
                        json!({"kind": "team", "name": format!("t{i}"), "parent_id": org_id}),
                    ),
                    2 => (
                        "pause",
                        format!("/v1/scopes/{org_id}/pause"),
                        json!({"reason": "load"}),
                    ),
                    3 => (
                        "resume",
                        format!("/v1/scopes/{org_id}/resume"),
                        json!({"reason": "load"}),
                    ),
                    _ => {
                        let team = teams.remove(0);
                        (
                            "revoke",
                            format!("/v1/scopes/{team}/revoke"),
                            json!({"reason": "load", "confirm": team}),
                        )
                    }
                };
                let sent = client
                    .post(format!("{base}{path}"))
                    .bearer_auth(&admin)
                    .json(&body)
                    .send()
                    .await;
                match sent {
                    Ok(response) if response.status().is_success() => {
                        if kind == "create" {
                            let Ok(created) = response.json::<Value>().await else {
                                eprintln!("workload stopped: {kind}: the answer was cut off");
                                return; // the server went away mid-answer
                            };
                            teams.push(created["id"].as_str().unwrap().to_owned());
                        }
                        if acked_tx.send(kind).is_err() {
                            return;
                        }
                    }
                    Ok(response) => {
                        // A refusal ends the workload too: say which, for the failure report.
                        let status = response.status();
                        let text = response.text().await.unwrap_or_default();
                        eprintln!("workload stopped: {kind} {path} answered {status}: {text}");
                        return;
                    }
                    Err(error) => {
                        // Expected once the server is killed; before that, the reason.
                        eprintln!("workload stopped: {kind} {path}: {error}");
                        return;
                    }
                }
            }
        });
    });
    // Let a few dozen commands through (revokes among them), then kill -9 while requests
    // are in flight.
    let mut revokes = 0;
    for _ in 0..40 {
        let kind = acked_rx
            .recv_timeout(Duration::from_secs(30))
            .expect("commands acknowledged");
        revokes += usize::from(kind == "revoke");
    }
    assert!(revokes >= 5, "{revokes} revokes acknowledged");
    let mut server = server;
    Command::new("kill")
        .args(["-KILL", &server.child.id().to_string()])
        .status()
        .unwrap();
    let _ = server.child.wait();
    drop(acked_rx);
    worker.join().unwrap();

    // Restart: it catches up whatever was committed but not yet projected.
    let again = serve(&data_dir, url.as_deref());
    let (status, _) = call("GET", &format!("{}/readyz", again.base), "", None);
    assert_eq!(status, 200);
    assert_eq!(again.terminate().0, 0);

    let db = runtime
        .block_on(ekm_store::Db::open(&test_db.config))
        .unwrap();
    let live = runtime.block_on(crate::rebuild::dump(&db));
    // Every revoke in the log was applied, its key material destroyed with it.
    let revoked_with_keys: i64 = runtime.block_on(async {
        ekm_store::with_read_pool!(&db, pool => {
            sqlx::query_scalar(
                "SELECT COUNT(*) FROM key_material k JOIN scope_view s ON s.id = k.scope_id \
                 WHERE s.own_state = 'revoked'",
            )
            .fetch_one(pool)
            .await
            .unwrap()
        })
    });
    assert_eq!(
        revoked_with_keys, 0,
        "key material of revoked scopes survived"
    );
    let revoked_events = runtime
        .block_on(db.events_after(0, 100_000))
        .unwrap()
        .iter()
        .filter(|e| e.event_type == "ScopeRevoked")
        .count();
    assert!(revoked_events >= revokes);
    runtime.block_on(db.close());
    let ekm = |args: &[&str]| {
        let mut command = Command::new(EKM);
        command
            .args(args)
            .arg("--data-dir")
            .arg(&data_dir)
            .env_remove("EKM_DATABASE_URL");
        if let Some(url) = url.as_deref() {
            command.args(["--database-url", url]);
        }
        command.output().unwrap()
    };
    let rebuilt = ekm(&["projections", "rebuild"]);
    assert!(
        rebuilt.status.success(),
        "{}",
        String::from_utf8_lossy(&rebuilt.stderr)
    );
    let db = runtime
        .block_on(ekm_store::Db::open(&test_db.config))
        .unwrap();
    crate::rebuild::assert_same_rows(&runtime.block_on(crate::rebuild::dump(&db)), &live);
    runtime.block_on(db.close());
    let verify = ekm(&["audit", "verify"]);
    assert!(
        verify.status.success(),
        "{}",
        String::from_utf8_lossy(&verify.stdout)
    );
}

#[test]
fn read_models_equal_a_rebuild_when_the_server_is_killed_mid_workload_on_sqlite() {
    read_models_equal_a_rebuild_when_the_server_is_killed_mid_workload(Backend::Sqlite);
}

#[test]
fn read_models_equal_a_rebuild_when_the_server_is_killed_mid_workload_on_postgres() {
    read_models_equal_a_rebuild_when_the_server_is_killed_mid_workload(Backend::Postgres);
}

/// `ekm org master-key set|show` as a client of a real `ekm serve`, which finds AWS
/// credentials through the default chain (here: the standard environment variables) and
/// reaches a moto_server.
fn cli_master_key_set_shows_the_key_when_it_is_in_aws(backend: Backend) {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let moto = runtime.block_on(crate::kms_servers::Moto::start());
    let arn = runtime.block_on(moto.create_key());
    let test_db = runtime.block_on(TestDb::new(backend));
    let dir = test_db.data_dir();
    let server = serve_configured(
        dir,
        test_db.url.as_deref(),
        &[
            "--key-health-interval",
            "1s",
            "--kms-allowed-endpoints",
            "http://127.0.0.1:*",
        ],
        &[
            ("AWS_ACCESS_KEY_ID", "testing"),
            ("AWS_SECRET_ACCESS_KEY", "testing"),
            ("AWS_EC2_METADATA_DISABLED", "true"),
        ],
    );
    let operator = read_token(dir);
    let (status, org) = call(
        "POST",
        &format!("{}/v1/orgs", server.base),
        &operator,
        Some(json!({"name": "Acme", "plan": "enterprise", "tier": "managed"})),
    );
    assert_eq!(status, 201, "{org}");
    let org_id = org["id"].as_str().unwrap().to_owned();
    let admin = org["admin_token"].as_str().unwrap().to_owned();
    let client = |args: &[&str]| {
        Command::new(EKM)
            .args(["org", "master-key"])
            .args(args)
            .env("EKM_URL", &server.base)
            .env("EKM_TOKEN", &admin)
            .output()
            .unwrap()
    };

    let set = client(&[
        "set",
        &org_id,
        "--provider",
        "aws-kms",
        "--key-id",
        &arn,
        "--endpoint-url",
        &moto.url,
        "--reason",
        "BYOK go-live",
    ]);
    let stdout = String::from_utf8_lossy(&set.stdout);
    assert!(
        set.status.success(),
        "{stdout} {}",
        String::from_utf8_lossy(&set.stderr)
    );
    assert!(
        stdout.contains("aws-kms") && stdout.contains("byok"),
        "{stdout}"
    );

    let show = client(&["show", &org_id, "--json"]);
    assert!(show.status.success());
    let shown: Value = serde_json::from_slice(&show.stdout).unwrap();
    assert_eq!(shown["key_id"], arn.as_str());
    assert_eq!(shown["status"], "available");

    // A refusal: the problem goes to standard error and the exit code is 1.
    let refused = client(&[
        "set",
        &org_id,
        "--provider",
        "aws-kms",
        "--key-id",
        "not an arn",
    ]);
    assert_eq!(refused.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("invalid_request"));
    // The token never appears in the server's log.
    assert!(!server.log_text().contains(&admin));
    drop(server);
    drop(test_db);
    drop(runtime);
}

#[test]
fn cli_master_key_set_shows_the_key_when_it_is_in_aws_on_sqlite() {
    cli_master_key_set_shows_the_key_when_it_is_in_aws(Backend::Sqlite);
}

#[test]
fn cli_master_key_set_shows_the_key_when_it_is_in_aws_on_postgres() {
    cli_master_key_set_shows_the_key_when_it_is_in_aws(Backend::Postgres);
}

/// `ekm org create`, `ekm token create|list|revoke` and `ekm grant add|list|remove` as
/// clients of a real server, ending with the service token encrypting.
fn cli_org_token_and_grant_commands_succeed_when_run_in_order(backend: Backend) {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let test_db = runtime.block_on(TestDb::new(backend));
    let server = serve(test_db.data_dir(), test_db.url.as_deref());
    let operator = read_token(test_db.data_dir());
    let ekm = |token: &str, args: &[&str]| {
        let output = Command::new(EKM)
            .args(args)
            .env("EKM_URL", &server.base)
            .env("EKM_TOKEN", token)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
        (output.status.code(), stdout, stderr)
    };
    let json = |text: &str| -> Value { serde_json::from_str(text).unwrap() };

    let (code, out, err) = ekm(
        &operator,
        &[
            "org",
            "create",
            "--name",
            "Acme",
            "--plan",
            "enterprise",
            "--tier",
            "managed",
        ],
    );
    assert_eq!(code, Some(0), "{err}");
    let org = json(&out);
    let org_id = org["id"].as_str().unwrap().to_owned();
    let admin = org["admin_token"].as_str().unwrap().to_owned();

    let (code, out, err) = ekm(
        &admin,
        &["token", "create", &org_id, "--principal", "chat-service"],
    );
    assert_eq!(code, Some(0), "{err}");
    let issued = json(&out);
    let service = issued["token"].as_str().unwrap().to_owned();
    let token_id = issued["id"].as_str().unwrap().to_owned();

    let (status, scope) = call(
        "POST",
        &format!("{}/v1/scopes", server.base),
        &admin,
        Some(json!({"kind": "thread", "name": "t", "parent_id": org_id})),
    );
    assert_eq!(status, 201);
    let thread = scope["id"].as_str().unwrap().to_owned();
    let encrypt = |token: &str| {
        call(
            "POST",
            &format!("{}/v1/scopes/{thread}/encrypt", server.base),
            token,
            Some(json!({"plaintext": "aGk=", "class": "messages"})),
        )
    };
    assert_eq!(encrypt(&service).0, 403, "no grant yet");

    let (code, _, err) = ekm(
        &admin,
        &[
            "grant",
            "add",
            &org_id,
            "--principal",
            "chat-service",
            "--permission",
            "data:use",
        ],
    );
    assert_eq!(code, Some(0), "{err}");
    let (_, out, _) = ekm(&admin, &["grant", "list", &org_id]);
    assert_eq!(json(&out)["items"][0]["permission"], "data:use");
    assert_eq!(encrypt(&service).0, 200);

    let (code, _, err) = ekm(
        &admin,
        &[
            "grant",
            "remove",
            &org_id,
            "--principal",
            "chat-service",
            "--permission",
            "data:use",
        ],
    );
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(encrypt(&service).0, 403, "the grant is gone");

    let (_, out, _) = ekm(&admin, &["token", "list", &org_id]);
    let listed = json(&out);
    assert!(listed["items"]
        .as_array()
        .unwrap()
        .iter()
        .any(|t| t["id"] == token_id.as_str()));
    assert!(!out.contains(&service), "a list never shows a secret");
    let (code, _, err) = ekm(&admin, &["token", "revoke", &org_id, &token_id]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(
        encrypt(&service).0,
        401,
        "a revoked token stops working at once"
    );

    // Refusals exit 1 with the problem on standard error.
    let (code, _, err) = ekm(&service, &["grant", "list", &org_id]);
    assert_eq!(code, Some(1));
    assert!(err.contains("unauthorized"));
    // No token appears in the server's log.
    let log = server.log_text();
    for secret in [&operator, &admin, &service] {
        assert!(!log.contains(secret.as_str()));
    }
    drop(server);
    drop(test_db);
    drop(runtime);
}

#[test]
fn cli_org_token_and_grant_commands_succeed_when_run_in_order_on_sqlite() {
    cli_org_token_and_grant_commands_succeed_when_run_in_order(Backend::Sqlite);
}

#[test]
fn cli_org_token_and_grant_commands_succeed_when_run_in_order_on_postgres() {
    cli_org_token_and_grant_commands_succeed_when_run_in_order(Backend::Postgres);
}
