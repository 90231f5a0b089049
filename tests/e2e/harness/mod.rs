//! Test helpers: a fresh database per test (SQLite file or PostgreSQL database), an
//! in-process server on port 0, and a small HTTP client.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use ekm_store::{Db, DbConfig};
use serde_json::json;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// Runs an async check once per backend, as two tests.
#[macro_export]
macro_rules! on_both_backends {
    ($check:ident) => {
        mod $check {
            use super::*;
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                $check($crate::harness::Backend::Sqlite).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                $check($crate::harness::Backend::Postgres).await;
            }
        }
    };
}

// ---------------------------------------------------------------------------------------
// PostgreSQL: which server, and a database per test.

static POSTGRES: OnceLock<Result<String, String>> = OnceLock::new();

/// The admin URL of a PostgreSQL server for tests: `EKM_TEST_DATABASE_URL`, else the local
/// server at 127.0.0.1:5432 (trust auth as `postgres`), else a throwaway cluster started from
/// the installed binaries. Panics with a clear message when there is none: never skips.
pub fn postgres_admin_url() -> String {
    POSTGRES
        .get_or_init(find_or_start_postgres)
        .clone()
        .unwrap_or_else(|why| panic!("no PostgreSQL for the tests: {why}"))
}

fn can_connect(url: &str) -> bool {
    Command::new("psql")
        .args([url, "-Atqc", "SELECT 1"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

fn find_or_start_postgres() -> Result<String, String> {
    if let Ok(url) = std::env::var("EKM_TEST_DATABASE_URL") {
        return Ok(url);
    }
    let local = "postgres://postgres@127.0.0.1:5432/postgres".to_owned();
    if can_connect(&local) {
        return Ok(local);
    }
    start_throwaway_cluster()
}

pub fn postgres_bin(name: &str) -> Option<PathBuf> {
    let mut candidates: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    if let Ok(entries) = std::fs::read_dir("/usr/lib/postgresql") {
        let mut versions: Vec<PathBuf> = entries.flatten().map(|e| e.path().join("bin")).collect();
        versions.sort();
        candidates.extend(versions.into_iter().rev());
    }
    candidates
        .into_iter()
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

/// Whether the tests run as root: initdb refuses to, so clusters then belong to the
/// `postgres` user.
fn running_as_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout == b"0\n")
        .unwrap_or(false)
}

/// Runs a PostgreSQL tool (initdb, pg_ctl) as the clusters' owner: ourselves, or
/// `postgres` (via runuser) when running as root.
pub fn run_postgres_tool(program: &Path, args: &[&str]) -> Result<(), String> {
    let mut command = if running_as_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(program);
        c
    } else {
        Command::new(program)
    };
    let output = command.args(args).output().map_err(|e| e.to_string())?;
    if output.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{} failed: {}",
            program.display(),
            String::from_utf8_lossy(&output.stderr)
        ))
    }
}

/// Gives `path` (recursively) to the clusters' owner when running as root.
pub fn give_to_postgres(path: &Path) -> Result<(), String> {
    if running_as_root() {
        Command::new("chown")
            .args(["-R", "postgres"])
            .arg(path)
            .status()
            .map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// initdb + pg_ctl in a fixed directory under the temporary directory, on a free port.
/// The cluster is left running when the tests end and reused by the next run, so at most
/// one such cluster ever exists. initdb refuses to run as root, so as root the cluster
/// belongs to the `postgres` user (via runuser).
fn start_throwaway_cluster() -> Result<String, String> {
    let initdb = postgres_bin("initdb")
        .ok_or("no server at 127.0.0.1:5432 and no initdb installed (install PostgreSQL or set EKM_TEST_DATABASE_URL)")?;
    let pg_ctl = postgres_bin("pg_ctl").ok_or("no pg_ctl installed")?;
    let dir = std::env::temp_dir().join("ekm-test-pg");
    let data = dir.join("data");
    let port_file = dir.join("port");
    if let Ok(port) = std::fs::read_to_string(&port_file) {
        let url = format!("postgres://postgres@127.0.0.1:{}/postgres", port.trim());
        if can_connect(&url) {
            return Ok(url);
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    give_to_postgres(&dir)?;
    let data_str = data.to_string_lossy().to_string();
    run_postgres_tool(
        &initdb,
        &[
            "-D",
            &data_str,
            "-U",
            "postgres",
            "--auth=trust",
            "--no-sync",
        ],
    )?;
    let port = free_port();
    let options = format!(
        "-p {port} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=300",
        dir.display()
    );
    let log = format!("{}/log", dir.display());
    run_postgres_tool(
        &pg_ctl,
        &["-D", &data_str, "-o", &options, "-w", "-l", &log, "start"],
    )?;
    std::fs::write(&port_file, port.to_string()).map_err(|e| e.to_string())?;
    Ok(format!("postgres://postgres@127.0.0.1:{port}/postgres"))
}

/// The audit key of a data directory, created like the server creates it.
pub fn seal_key(data_dir: &Path) -> ekm_keys::SealKey {
    ekm_keys::SealKey::load(&data_dir.join(ekm_keys::AUDIT_KEY_FILE), true)
        .expect("audit key")
        .expect("audit key created")
}

/// The data directory's audit signing key, created as `ekm serve` creates it.
pub fn signing_key(data_dir: &Path) -> ekm_keys::SigningKey {
    ekm_keys::SigningKey::load(&data_dir.join(ekm_keys::AUDIT_SIGNING_KEY_FILE), true)
        .expect("audit signing key")
        .expect("audit signing key created")
}

/// `POST /v1/scopes/{scope}/encrypt` of `plaintext` in `class`.
pub async fn encrypt(
    app: &TestApp,
    token: &str,
    scope: &str,
    plaintext: &[u8],
    class: &str,
) -> Response {
    app.post(
        &format!("/v1/scopes/{scope}/encrypt"),
        token,
        json!({"plaintext": base64::Engine::encode(&base64::engine::general_purpose::STANDARD, plaintext), "class": class}),
    )
    .await
}

/// `POST /v1/scopes/{scope}/decrypt`.
pub async fn decrypt(
    app: &TestApp,
    token: &str,
    scope: &str,
    ciphertext: &str,
    class: &str,
) -> Response {
    app.post(
        &format!("/v1/scopes/{scope}/decrypt"),
        token,
        json!({"ciphertext": ciphertext, "class": class}),
    )
    .await
}

/// PostgreSQL: holds every instance's projection runner (a batch locks all checkpoint rows
/// first) until the returned transaction ends, so a test can commit events that no runner
/// applies meanwhile.
pub async fn hold_runners(db: &Db) -> sqlx::Transaction<'static, sqlx::Postgres> {
    let Db::Postgres(pg) = db else {
        panic!("runners are held on PostgreSQL only")
    };
    let mut hold = pg.pool.begin().await.unwrap();
    sqlx::query("SELECT name FROM projection_checkpoints FOR UPDATE")
        .fetch_all(&mut *hold)
        .await
        .unwrap();
    hold
}

/// The metadata of a command a test runs on `App` directly (not through HTTP).
pub fn metadata() -> ekm_domain::EventMetadata {
    ekm_domain::EventMetadata {
        actor: ekm_domain::Actor {
            kind: ekm_domain::ActorKind::User,
            id: "test".into(),
        },
        request_id: "test".into(),
        reason: ekm_domain::Reason::parse("test").ok(),
        source_address: Some("127.0.0.1".into()),
        recorded_at: "2026-11-28T00:00:00Z".into(),
        location: None,
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// A database of its own for one test, dropped at the end.
pub struct TestDb {
    pub config: DbConfig,
    pub url: Option<String>,
    pub dir: tempfile::TempDir,
    pg_name: Option<String>,
}

impl TestDb {
    pub async fn new(backend: Backend) -> TestDb {
        let dir = tempfile::tempdir().expect("temp dir");
        match backend {
            Backend::Sqlite => TestDb {
                config: DbConfig::sqlite_in(dir.path()),
                url: None,
                dir,
                pg_name: None,
            },
            Backend::Postgres => {
                let admin = postgres_admin_url();
                let name = format!("ekm_test_{}", uuid::Uuid::now_v7().simple());
                let mut conn: sqlx::postgres::PgConnection = sqlx::Connection::connect(&admin)
                    .await
                    .expect("connect to PostgreSQL");
                sqlx::Executor::execute(&mut conn, format!("CREATE DATABASE {name}").as_str())
                    .await
                    .expect("create test database");
                let url = replace_db_name(&admin, &name);
                TestDb {
                    config: DbConfig::Postgres { url: url.clone() },
                    url: Some(url),
                    dir,
                    pg_name: Some(name),
                }
            }
        }
    }

    pub fn data_dir(&self) -> &Path {
        self.dir.path()
    }
}

pub fn replace_db_name(url: &str, name: &str) -> String {
    match url.rfind('/') {
        Some(i) if url[..i].contains("://") && !url[i..].contains('@') => {
            let (base, rest) = url.split_at(i);
            let query = rest.find('?').map(|q| &rest[q..]).unwrap_or("");
            format!("{base}/{name}{query}")
        }
        _ => format!("{url}/{name}"),
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let Some(name) = self.pg_name.take() else {
            return;
        };
        let admin = postgres_admin_url();
        // A plain thread with its own runtime: Drop cannot await.
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime.block_on(async {
                let mut conn: sqlx::postgres::PgConnection = sqlx::Connection::connect(&admin)
                    .await
                    .map_err(std::io::Error::other)?;
                sqlx::Executor::execute(
                    &mut conn,
                    format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)").as_str(),
                )
                .await
                .map_err(std::io::Error::other)?;
                Ok::<_, std::io::Error>(())
            })
        })
        .join();
    }
}

mod app;
pub use app::*;

/// Polls the scope until its own state is `state`, for at most `within` (the last answer
/// either way): the scheduler fires on the clock, so there is no event of ours to await.
pub async fn own_state_becomes(
    app: &TestApp,
    token: &str,
    scope: &str,
    state: &str,
    within: std::time::Duration,
) -> Response {
    let deadline = std::time::Instant::now() + within;
    loop {
        let shown = app.get(&format!("/v1/scopes/{scope}"), token).await;
        if shown.body["own_state"] == state || std::time::Instant::now() > deadline {
            return shown;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
}

/// A GET that a client retries while the server answers 503 (`unavailable`, with
/// `Retry-After`), for at most 10 s: two instances on one SQLite file meet each other's
/// writer for a moment. Any other answer is returned as it is.
pub async fn get_when_available(app: &TestApp, path: &str, token: &str) -> Response {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let answer = app.get(path, token).await;
        if answer.status != 503 || std::time::Instant::now() > deadline {
            return answer;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}
