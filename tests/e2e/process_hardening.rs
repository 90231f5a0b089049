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
fn sqlite_files_are_private_to_the_owner_on_a_fresh_data_dir() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("data");
    assert_private_after_a_write(&dir, None, &SQLITE_FILES);
}

/// A data directory made by an older version (or by hand): 0755, the database 0644.
/// The next start takes both back to the owner.
#[test]
fn sqlite_files_made_readable_before_are_made_private_at_start() {
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
fn postgres_data_dir_is_private_even_when_it_existed() {
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
