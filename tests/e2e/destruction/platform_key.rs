//! The platform master key as an operator handles it: `ekm master-key rotate` with the real
//! binary, and the key kept in a KMS (`--master-key`).

use crate::harness::Backend;

use super::*;

/// `ekm master-key rotate` as an operator runs it: refused beside a running server on
/// SQLite, beside running servers on PostgreSQL (which then load the new key from the file,
/// even to create an organization, whose key they would otherwise wrap with the old one).
fn cli_rotates_the_platform_master_key(backend: Backend) {
    use crate::process::{call, mode, read_token, serve};
    use std::process::Command;
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let test_db = runtime.block_on(crate::harness::TestDb::new(backend));
    let url = test_db.url.clone();
    let dir = test_db.data_dir().join("rotate");
    let rotate = || {
        let mut command = Command::new(env!("CARGO_BIN_EXE_ekm"));
        command
            .args(["master-key", "rotate", "--json", "--data-dir"])
            .arg(&dir)
            .env_remove("EKM_DATABASE_URL");
        if let Some(url) = &url {
            command.args(["--database-url", url]);
        }
        command.output().unwrap()
    };
    let server = serve(&dir, url.as_deref());
    let operator = read_token(&dir);
    let (status, org) = call(
        "POST",
        &format!("{}/v1/orgs", server.base),
        &operator,
        Some(serde_json::json!({"name": "Acme", "plan": "enterprise", "tier": "managed"})),
    );
    assert_eq!(status, 201, "{org}");
    let (org_id, admin) = (org.str_of("id"), org.str_of("admin_token"));
    let base = server.base.clone();
    let (status, _) = call(
        "POST",
        &format!("{base}/v1/orgs/{org_id}/grants"),
        &admin,
        Some(serde_json::json!({"principal": "admin", "permission": "data:use"})),
    );
    assert_eq!(status, 201);
    let (status, sealed) = call(
        "POST",
        &format!("{base}/v1/scopes/{org_id}/encrypt"),
        &admin,
        Some(serde_json::json!({"plaintext": "aGVsbG8=", "class": "messages"})),
    );
    assert_eq!(status, 200, "{sealed}");
    let ciphertext = sealed.str_of("ciphertext");
    let before = master_key(&dir).fingerprint();

    let server = if url.is_none() {
        let refused = rotate();
        assert!(!refused.status.success());
        assert!(String::from_utf8_lossy(&refused.stderr).contains("another ekm process"));
        assert_eq!(server.terminate().0, 0);
        None
    } else {
        Some(server)
    };
    let output = rotate();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let report: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(report["old_fingerprint"], before.as_str());
    let after = master_key(&dir).fingerprint();
    assert_eq!(report["new_fingerprint"], after.as_str());
    assert_ne!(before, after);
    assert_eq!(report["rewrapped"], 1);
    assert_eq!(mode(&dir.join("master.key")), 0o600);
    assert!(!dir.join("master.key.new").exists());

    let server = server.unwrap_or_else(|| serve(&dir, url.as_deref()));
    let base = server.base.clone();
    let (status, opened) = call(
        "POST",
        &format!("{base}/v1/scopes/{org_id}/decrypt"),
        &admin,
        Some(serde_json::json!({"ciphertext": ciphertext, "class": "messages"})),
    );
    assert_eq!(
        (status, opened.str_of("plaintext")),
        (200, "aGVsbG8=".into())
    );
    // A new organization's key is wrapped with the new key.
    let (status, second) = call(
        "POST",
        &format!("{base}/v1/orgs"),
        &operator,
        Some(serde_json::json!({"name": "Beta", "plan": "enterprise", "tier": "managed"})),
    );
    assert_eq!(status, 201, "{second}");
    let config = match &url {
        Some(_) => test_db.config.clone(),
        None => ekm_store::DbConfig::sqlite_in(&dir),
    };
    let db = runtime.block_on(ekm_store::Db::connect(&config)).unwrap();
    let rows = runtime
        .block_on(db.wrapping_keys(&second.str_of("id")))
        .unwrap();
    assert_eq!(rows[0].master_fingerprint.as_deref(), Some(after.as_str()));
    runtime.block_on(db.close());
    assert_eq!(server.terminate().0, 0);
}

#[test]
fn master_key_rotate_succeeds_when_the_sqlite_server_is_stopped() {
    cli_rotates_the_platform_master_key(Backend::Sqlite);
}

#[test]
fn master_key_rotate_succeeds_when_a_postgres_server_runs() {
    cli_rotates_the_platform_master_key(Backend::Postgres);
}

/// The platform master key kept in a KMS (`--master-key aws-kms:ARN`, a real moto_server):
/// moved there from the file by a rotation, after which the data directory holds no key
/// file, a server without the flag is refused clearly, and rotations keep it in the KMS.
fn platform_master_key_lives_in_a_kms(backend: Backend) {
    use crate::process::{call, read_token, serve, serve_configured};
    use std::process::Command;
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let moto = runtime.block_on(crate::kms_servers::Moto::start());
    let arn = runtime.block_on(moto.create_key());
    let test_db = runtime.block_on(crate::harness::TestDb::new(backend));
    let url = test_db.url.clone();
    let dir = test_db.data_dir().join("kms");
    let spec = format!("aws-kms:{arn}");
    let creds = [
        ("AWS_ACCESS_KEY_ID", "testing"),
        ("AWS_SECRET_ACCESS_KEY", "testing"),
    ];
    let kms_flags = ["--master-key", &spec, "--master-key-endpoint", &moto.url];
    let ekm = |args: &[&str]| {
        let mut command = Command::new(env!("CARGO_BIN_EXE_ekm"));
        command
            .args(args)
            .arg("--data-dir")
            .arg(&dir)
            .env_remove("EKM_DATABASE_URL")
            .envs(creds);
        if let Some(url) = &url {
            command.args(["--database-url", url]);
        }
        command.output().unwrap()
    };
    let server = serve(&dir, url.as_deref());
    let operator = read_token(&dir);
    let (status, org) = call(
        "POST",
        &format!("{}/v1/orgs", server.base),
        &operator,
        Some(serde_json::json!({"name": "Acme", "plan": "enterprise", "tier": "managed"})),
    );
    assert_eq!(status, 201, "{org}");
    let (org_id, admin) = (org.str_of("id"), org.str_of("admin_token"));
    let base = server.base.clone();
    call(
        "POST",
        &format!("{base}/v1/orgs/{org_id}/grants"),
        &admin,
        Some(serde_json::json!({"principal": "admin", "permission": "data:use"})),
    );
    let (_, sealed) = call(
        "POST",
        &format!("{base}/v1/scopes/{org_id}/encrypt"),
        &admin,
        Some(serde_json::json!({"plaintext": "aGk=", "class": "messages"})),
    );
    let ciphertext = sealed.str_of("ciphertext");
    assert_eq!(server.terminate().0, 0);

    // Into the KMS.
    let to = [
        "master-key",
        "rotate",
        "--json",
        "--to",
        &spec,
        "--master-key-endpoint",
        &moto.url,
    ];
    let moved = ekm(&to);
    assert!(
        moved.status.success(),
        "{}",
        String::from_utf8_lossy(&moved.stderr)
    );
    assert!(
        !dir.join("master.key").exists(),
        "the key file is destroyed: the KMS holds the key"
    );
    // Without the KMS key, a server cannot start, and says why.
    let refused = Command::new(env!("CARGO_BIN_EXE_ekm"))
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(&dir)
        .args(url.iter().flat_map(|u| ["--database-url", u.as_str()]))
        .env_remove("EKM_DATABASE_URL")
        .output()
        .unwrap();
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains(&spec),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );

    let decrypts = |base: &str| {
        let (status, opened) = call(
            "POST",
            &format!("{base}/v1/scopes/{org_id}/decrypt"),
            &admin,
            Some(serde_json::json!({"ciphertext": ciphertext, "class": "messages"})),
        );
        assert_eq!(
            (status, opened.str_of("plaintext")),
            (200, "aGk=".into()),
            "{opened}"
        );
    };
    let server = serve_configured(&dir, url.as_deref(), &kms_flags, &creds);
    decrypts(&server.base);
    // A rotation that stays in the KMS: beside the server on PostgreSQL.
    let server = if url.is_some() {
        Some(server)
    } else {
        assert_eq!(server.terminate().0, 0);
        None
    };
    let mut again = vec!["master-key", "rotate", "--json"];
    again.extend(kms_flags);
    let rotated = ekm(&again);
    assert!(
        rotated.status.success(),
        "{}",
        String::from_utf8_lossy(&rotated.stderr)
    );
    let report: Value = serde_json::from_slice(&rotated.stdout).unwrap();
    assert!(!dir.join("master.key").exists());
    let server =
        server.unwrap_or_else(|| serve_configured(&dir, url.as_deref(), &kms_flags, &creds));
    // A new organization is wrapped with the rotated key (the running server loads it
    // from the database through the KMS), and the old data still decrypts.
    let (status, _) = call(
        "POST",
        &format!("{}/v1/orgs", server.base),
        &operator,
        Some(serde_json::json!({"name": "Beta", "plan": "enterprise", "tier": "managed"})),
    );
    assert_eq!(status, 201);
    decrypts(&server.base);
    let config = match &url {
        Some(_) => test_db.config.clone(),
        None => ekm_store::DbConfig::sqlite_in(&dir),
    };
    let db = runtime.block_on(ekm_store::Db::connect(&config)).unwrap();
    let held: Vec<(String, String)> = runtime.block_on(async {
        ekm_store::with_write_pool!(&db, pool => {
            sqlx::query_as("SELECT fingerprint, wrapped_by FROM platform_keys")
                .fetch_all(pool)
                .await
                .unwrap()
        })
    });
    assert_eq!(
        held,
        [(report.str_of("new_fingerprint"), spec.clone())],
        "one platform key, the new one, held by the KMS key"
    );
    runtime.block_on(db.close());
    assert_eq!(server.terminate().0, 0);
}

#[test]
fn serve_keeps_the_platform_key_in_a_kms_when_asked_on_sqlite() {
    platform_master_key_lives_in_a_kms(Backend::Sqlite);
}

#[test]
fn serve_keeps_the_platform_key_in_a_kms_when_asked_on_postgres() {
    platform_master_key_lives_in_a_kms(Backend::Postgres);
}
