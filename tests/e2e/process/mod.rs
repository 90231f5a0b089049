//! The real `ekm` binary: first start, operator token, graceful shutdown, restart, the
//! SQLite data-directory lock, two instances on one PostgreSQL database, `ekm migrate`.

mod cli;
mod crash;
mod failover;
mod full_disk;
mod kill9;
mod schemathesis;

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
    serve_wrapped(data_dir, database_url, args, envs, &[])
}

/// `serve_configured`, the binary started by `wrapper` (a program and its first arguments,
/// the server's command line after them), e.g. a shell that sets a limit and execs.
pub(crate) fn serve_wrapped(
    data_dir: &Path,
    database_url: Option<&str>,
    args: &[&str],
    envs: &[(&str, &str)],
    wrapper: &[&str],
) -> Server {
    let port = free_port();
    let mut command = match wrapper.split_first() {
        Some((program, first)) => {
            let mut command = Command::new(program);
            command.args(first).arg(EKM);
            command
        }
        None => Command::new(EKM),
    };
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
    let (status, body, _) = call_with_retry_after(method, url, token, body);
    (status, body)
}

/// `call`, and whether the answer carried `Retry-After`.
pub(crate) fn call_with_retry_after(
    method: &str,
    url: &str,
    token: &str,
    body: Option<Value>,
) -> (u16, Value, bool) {
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
        let retry_after = response.headers().contains_key("retry-after");
        let text = response.text().await.unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
            retry_after,
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
    for file in ["master.key", "audit.key", "audit-signing.key"] {
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

/// `ekm completions SHELL` prints a script generated from the command line's own
/// definitions: every command and subcommand is in it, and bash reads the bash one.
#[test]
fn completions_name_every_command_when_printed_for_a_shell() {
    for shell in ["bash", "zsh", "fish"] {
        let output = Command::new(env!("CARGO_BIN_EXE_ekm"))
            .args(["completions", shell])
            .output()
            .unwrap();
        assert!(output.status.success(), "{shell}");
        let script = String::from_utf8(output.stdout).unwrap();
        for word in [
            "serve",
            "migrate",
            "projections",
            "audit",
            "signing-key",
            "verify",
            "--public-key",
            "org",
            "token",
            "grant",
            "master-key",
            "operator-token",
        ] {
            assert!(script.contains(word), "{shell} completions lack {word}");
        }
        if shell == "bash" {
            let file = tempfile::NamedTempFile::new().unwrap();
            std::fs::write(file.path(), &script).unwrap();
            let parsed = Command::new("bash")
                .arg("-n")
                .arg(file.path())
                .status()
                .unwrap();
            assert!(parsed.success(), "bash cannot read its completion script");
        }
    }
    let unknown = Command::new(env!("CARGO_BIN_EXE_ekm"))
        .args(["completions", "cmd.exe"])
        .output()
        .unwrap();
    assert_eq!(unknown.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("possible values"));
}
