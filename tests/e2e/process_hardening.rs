//! Issue 14's smaller findings that need the real binary: private files in the data
//! directory, rotating the operator token, and keeping tokens off the command line.

use std::path::Path;
use std::process::Command;

use serde_json::json;

use crate::harness::{Backend, TestDb};
use crate::process::{call, mode, read_token, serve, EKM};

/// The files a running SQLite server keeps in its data directory.
const SQLITE_FILES: [&str; 6] = [
    "ekm.db",
    "ekm.db-wal",
    "ekm.db-shm",
    "ekm.lock",
    "operator.token",
    "master.key",
];

/// Starts a server on `dir`, makes it write (an organization), and checks the modes of
/// the directory and of `files` while it runs.
fn assert_private_after_a_write(dir: &Path, database_url: Option<&str>, files: &[&str]) {
    let server = serve(dir, database_url);
    let operator = read_token(dir);
    let (status, org) = call(
        "POST",
        &format!("{}/v1/orgs", server.base),
        &operator,
        Some(json!({"name": "Acme", "plan": "enterprise"})),
    );
    assert_eq!(status, 201, "{org}");
    assert_eq!(mode(dir), 0o700, "{}", dir.display());
    for file in files {
        let path = dir.join(file);
        assert!(path.exists(), "{} is missing", path.display());
        assert_eq!(mode(&path), 0o600, "{}", path.display());
    }
    assert_eq!(server.terminate().0, 0);
}

fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(mode)).unwrap();
}

/// The attack: another account on the machine read `ekm.db` and its WAL (0644), with
/// every wrapped key and the token hashes in them.
#[test]
fn serve_makes_the_sqlite_files_private_when_the_data_dir_is_fresh() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("data");
    assert_private_after_a_write(&dir, None, &SQLITE_FILES);
}

/// A data directory made by an older version (or by hand): 0755, the database 0644.
/// The next start takes both back to the owner.
#[test]
fn serve_makes_the_sqlite_files_private_when_they_were_readable() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("data");
    std::fs::create_dir_all(&dir).unwrap();
    chmod(&dir, 0o755);
    let migrated = Command::new(EKM)
        .arg("migrate")
        .arg("--data-dir")
        .arg(&dir)
        .env_remove("EKM_DATABASE_URL")
        .output()
        .unwrap();
    assert!(migrated.status.success());
    chmod(&dir, 0o755);
    for file in ["ekm.db", "ekm.lock"] {
        chmod(&dir.join(file), 0o644);
    }
    std::fs::write(dir.join("operator.token"), "ekm_leftover\n").unwrap();
    chmod(&dir.join("operator.token"), 0o644);
    assert_private_after_a_write(&dir, None, &SQLITE_FILES);
}

#[test]
fn serve_makes_the_data_dir_private_when_it_existed_on_postgres() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let test_db = runtime.block_on(TestDb::new(Backend::Postgres));
    let dir = test_db.data_dir().join("data");
    std::fs::create_dir_all(&dir).unwrap();
    chmod(&dir, 0o755);
    assert_private_after_a_write(
        &dir,
        test_db.url.as_deref(),
        &["operator.token", "master.key"],
    );
    drop(runtime);
}

/// The attack: `ekm token list ORG --token SECRET` put the secret in every other user's
/// `ps`. The token now comes from `EKM_TOKEN` or `--token-file`; `--token` still works but
/// warns on standard error (without repeating the token).
fn cli_takes_the_token_from_env_or_file_and_warns_when_given_the_flag(backend: Backend) {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let test_db = runtime.block_on(TestDb::new(backend));
    let dir = test_db.data_dir();
    let server = serve(dir, test_db.url.as_deref());
    let operator = read_token(dir);
    let (_, org) = call(
        "POST",
        &format!("{}/v1/orgs", server.base),
        &operator,
        Some(json!({"name": "Acme", "plan": "enterprise"})),
    );
    let org_id = org["id"].as_str().unwrap().to_owned();
    let admin = org["admin_token"].as_str().unwrap().to_owned();
    let ekm = |args: &[&str], token_env: Option<&str>| {
        let mut command = Command::new(EKM);
        command
            .args(["token", "list", &org_id])
            .args(args)
            .env("EKM_URL", &server.base)
            .env_remove("EKM_TOKEN")
            .env_remove("EKM_TOKEN_FILE");
        if let Some(token) = token_env {
            command.env("EKM_TOKEN", token);
        }
        let output = command.output().unwrap();
        (
            output.status.code(),
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    };
    let warning = "--token is visible to other users";

    let (code, out, err) = ekm(&["--token", &admin], None);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("\"items\""), "{out}");
    assert!(err.contains(warning), "{err}");
    assert!(!err.contains(&admin), "the warning never repeats the token");

    let (code, _, err) = ekm(&[], Some(&admin));
    assert_eq!(code, Some(0), "{err}");
    assert!(!err.contains(warning), "{err}");

    let file = dir.join("admin.token");
    std::fs::write(&file, format!("{admin}\n")).unwrap();
    let (code, _, err) = ekm(&["--token-file", file.to_str().unwrap()], None);
    assert_eq!(code, Some(0), "{err}");
    assert!(!err.contains(warning), "{err}");

    // Refusals say what to do, and never echo a token.
    let (code, _, err) = ekm(&[], None);
    assert_ne!(code, Some(0));
    assert!(
        err.contains("EKM_TOKEN") && err.contains("--token-file"),
        "{err}"
    );
    let missing = dir.join("missing.token");
    let (code, _, err) = ekm(&["--token-file", missing.to_str().unwrap()], None);
    assert_ne!(code, Some(0));
    assert!(err.contains("missing.token"), "{err}");
    let (code, _, err) = ekm(
        &["--token", &admin, "--token-file", file.to_str().unwrap()],
        None,
    );
    assert_ne!(code, Some(0), "{err}");
    assert!(!server.log_text().contains(&admin));
    assert_eq!(server.terminate().0, 0);
}

#[test]
fn cli_takes_the_token_from_env_or_file_and_warns_when_given_the_flag_on_sqlite() {
    cli_takes_the_token_from_env_or_file_and_warns_when_given_the_flag(Backend::Sqlite);
}

#[test]
fn cli_takes_the_token_from_env_or_file_and_warns_when_given_the_flag_on_postgres() {
    cli_takes_the_token_from_env_or_file_and_warns_when_given_the_flag(Backend::Postgres);
}

/// `ekm operator-token rotate`, beside the servers or not as the backend requires.
fn rotate(dir: &Path, database_url: Option<&str>, print: bool) -> (Option<i32>, String, String) {
    let mut command = Command::new(EKM);
    command
        .args(["operator-token", "rotate", "--data-dir"])
        .arg(dir)
        .env_remove("EKM_DATABASE_URL");
    if let Some(url) = database_url {
        command.args(["--database-url", url]);
    }
    if print {
        command.arg("--print");
    }
    let output = command.output().unwrap();
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

fn create_org_status(base: &str, token: &str) -> u16 {
    call(
        "POST",
        &format!("{base}/v1/orgs"),
        token,
        Some(json!({"name": "Acme"})),
    )
    .0
}

/// The attack: a leaked operator token stayed valid for ever. On PostgreSQL the rotation
/// runs beside a live server, which refuses the old token within its one-second token
/// cache bound (ADR 0007) and accepts the new one from the file at once.
#[test]
fn operator_token_rotate_succeeds_when_a_postgres_server_runs() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let test_db = runtime.block_on(TestDb::new(Backend::Postgres));
    let url = test_db.url.clone().unwrap();
    let dir = test_db.data_dir().join("a");
    let server = serve(&dir, Some(&url));
    let old = read_token(&dir);
    // Used once, so the server holds it in its cache.
    assert_eq!(create_org_status(&server.base, &old), 201);

    let (code, out, err) = rotate(&dir, Some(&url), false);
    assert_eq!(code, Some(0), "{err}");
    let new = read_token(&dir);
    assert_ne!(new, old);
    assert_eq!(mode(&dir.join("operator.token")), 0o600);
    assert!(
        !out.contains(&new) && !err.contains(&new),
        "not printed without --print"
    );
    assert!(!err.contains(&old));
    assert_eq!(create_org_status(&server.base, &new), 201);
    // The bound is the behaviour (ADR 0007: tokens are cached for at most a second; 2.5 s
    // allows for the request itself). The server is another process, which tells no event
    // when its cache entry expires, so the old token is tried every 50 ms.
    let rotated_at = std::time::Instant::now();
    loop {
        match create_org_status(&server.base, &old) {
            401 => break,
            201 => assert!(
                rotated_at.elapsed() < std::time::Duration::from_millis(2500),
                "the old token still works after the cache bound"
            ),
            other => panic!("old token: {other}"),
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }

    // --print: the new token on standard output too, the same as in the file.
    let (code, out, err) = rotate(&dir, Some(&url), true);
    assert_eq!(code, Some(0), "{err}");
    let printed: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(printed["token"].as_str(), Some(read_token(&dir).as_str()));
    assert!(!server.log_text().contains(&new));
    assert_eq!(server.terminate().0, 0);
    drop(runtime);
}

/// On SQLite the data-directory lock keeps the rotation away from a running server; with
/// the server stopped it works, and the next start accepts only the new token.
#[test]
fn operator_token_rotate_succeeds_when_the_sqlite_server_is_stopped() {
    let dir = tempfile::tempdir().unwrap();
    let server = serve(dir.path(), None);
    let old = read_token(dir.path());
    let (code, _, err) = rotate(dir.path(), None, false);
    assert_ne!(code, Some(0));
    assert!(err.contains("another ekm process"), "{err}");
    assert_eq!(
        read_token(dir.path()),
        old,
        "a refused rotation changes nothing"
    );
    assert_eq!(create_org_status(&server.base, &old), 201);
    assert_eq!(server.terminate().0, 0);

    let (code, _, err) = rotate(dir.path(), None, false);
    assert_eq!(code, Some(0), "{err}");
    let new = read_token(dir.path());
    assert_ne!(new, old);
    let again = serve(dir.path(), None);
    assert_eq!(create_org_status(&again.base, &old), 401);
    assert_eq!(create_org_status(&again.base, &new), 201);
    assert!(!again.log_text().contains("operator token created"));
    assert_eq!(again.terminate().0, 0);
}

/// `ekm org admin-token ORG --reason R` with the operator token from the environment: the
/// break-glass token, printed once, administers the organization.
fn cli_break_glass_issues_an_admin_token_when_the_operator_asks(backend: Backend) {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let test_db = runtime.block_on(TestDb::new(backend));
    let dir = test_db.data_dir();
    let server = serve(dir, test_db.url.as_deref());
    let operator = read_token(dir);
    let (_, org) = call(
        "POST",
        &format!("{}/v1/orgs", server.base),
        &operator,
        Some(json!({"name": "Acme", "plan": "enterprise"})),
    );
    let org_id = org["id"].as_str().unwrap().to_owned();
    let ekm = |args: &[&str]| {
        Command::new(EKM)
            .args(["org", "admin-token", &org_id])
            .args(args)
            .env("EKM_URL", &server.base)
            .env("EKM_TOKEN", &operator)
            .output()
            .unwrap()
    };
    let issued = ekm(&["--reason", "admin token lost, ticket 99"]);
    assert!(
        issued.status.success(),
        "{}",
        String::from_utf8_lossy(&issued.stderr)
    );
    let answer: serde_json::Value = serde_json::from_slice(&issued.stdout).unwrap();
    let token = answer["token"].as_str().unwrap().to_owned();
    assert_eq!(answer["role"], "org_admin");
    let (status, _) = call(
        "GET",
        &format!("{}/v1/orgs/{org_id}/tokens", server.base),
        &token,
        None,
    );
    assert_eq!(status, 200);
    // Without a reason clap refuses before any request.
    assert!(!ekm(&[]).status.success());
    assert!(!server.log_text().contains(&token));
    assert_eq!(server.terminate().0, 0);
}

#[test]
fn cli_break_glass_issues_an_admin_token_when_the_operator_asks_on_sqlite() {
    cli_break_glass_issues_an_admin_token_when_the_operator_asks(Backend::Sqlite);
}

#[test]
fn cli_break_glass_issues_an_admin_token_when_the_operator_asks_on_postgres() {
    cli_break_glass_issues_an_admin_token_when_the_operator_asks(Backend::Postgres);
}
