//! `ekm serve` as a PostgreSQL role limited to what the server needs, with migrations run by
//! the owner (docs/ops/postgres-roles.sql, ADR 0019): the script as documented, then a
//! server, then an attacker holding the server's credentials.

use std::process::Command;
use std::time::Duration;

use serde_json::json;
use sqlx::{Connection, Executor};

use crate::harness::{free_port, postgres_admin_url, replace_db_name, Backend, TestDb};
use crate::tamper::{exits_within, serve_until_listening};

const EKM: &str = env!("CARGO_BIN_EXE_ekm");

/// The admin URL with another role (trust authentication, as on the test servers).
fn as_role(admin: &str, role: &str, database: &str) -> String {
    let url = admin.replacen("://postgres@", &format!("://{role}@"), 1);
    assert_ne!(
        url, admin,
        "the test server's admin URL names the postgres role"
    );
    replace_db_name(&url, database)
}

/// Drops the database and both roles, whatever happened.
struct Cleanup {
    admin: String,
    database: String,
    roles: [String; 2],
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let admin = self.admin.clone();
        let database = self.database.clone();
        let roles = self.roles.clone();
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async {
                let mut conn = sqlx::PgConnection::connect(&admin).await.unwrap();
                let _ = conn
                    .execute(
                        format!("DROP DATABASE IF EXISTS \"{database}\" WITH (FORCE)").as_str(),
                    )
                    .await;
                for role in roles {
                    let _ = conn
                        .execute(format!("DROP ROLE IF EXISTS \"{role}\"").as_str())
                        .await;
                }
            });
        })
        .join();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_works_but_history_cannot_be_rewritten_when_run_as_the_app_role() {
    let admin = postgres_admin_url();
    let id = uuid::Uuid::now_v7().simple().to_string();
    let (owner, app, database) = (
        format!("ekm_owner_{id}"),
        format!("ekm_app_{id}"),
        format!("ekm_roles_{id}"),
    );
    let _cleanup = Cleanup {
        admin: admin.clone(),
        database: database.clone(),
        roles: [app.clone(), owner.clone()],
    };
    let script = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/docs/ops/postgres-roles.sql"
    ))
    .unwrap()
    .replace(":\"owner\"", &format!("\"{owner}\""))
    .replace(":\"app\"", &format!("\"{app}\""))
    .replace(":\"database\"", &format!("\"{database}\""));
    let (roles_part, grants_part) = script.split_once("-- Part 2").unwrap();
    // The section header's own line is a comment.
    let grants_part = grants_part.split_once('\n').unwrap().1;

    // Part 1 as the superuser, a statement at a time (CREATE DATABASE refuses a transaction).
    let mut superuser = sqlx::PgConnection::connect(&admin).await.unwrap();
    for statement in roles_part
        .lines()
        .filter(|l| !l.starts_with("--"))
        .collect::<Vec<_>>()
        .join("\n")
        .split(';')
        .filter(|s| !s.trim().is_empty())
    {
        superuser.execute(statement).await.unwrap();
    }

    // Migrations as the owner.
    let owner_url = as_role(&admin, &owner, &database);
    let app_url = as_role(&admin, &app, &database);
    let data_dir = tempfile::tempdir().unwrap();
    let migrated = Command::new(EKM)
        .args(["migrate", "--database-url", &owner_url, "--data-dir"])
        .arg(data_dir.path())
        .output()
        .unwrap();
    assert!(
        migrated.status.success(),
        "{}",
        String::from_utf8_lossy(&migrated.stderr)
    );
    let mut owner_conn = sqlx::PgConnection::connect(&owner_url).await.unwrap();
    sqlx::raw_sql(grants_part)
        .execute(&mut owner_conn)
        .await
        .unwrap();

    // The server as the limited role.
    let port = free_port();
    let mut command = Command::new(EKM);
    command
        .args(["--log-format", "json", "serve", "--no-migrate"])
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .args(["--database-url", &app_url, "--data-dir"])
        .arg(data_dir.path());
    let _served = serve_until_listening(command);

    // Commands work: an organization, a team, a pause.
    let base = format!("http://127.0.0.1:{port}");
    let operator = std::fs::read_to_string(data_dir.path().join("operator.token")).unwrap();
    let client = reqwest::Client::new();
    let post = |path: &str, token: &str, body: serde_json::Value| {
        client
            .post(format!("{base}{path}"))
            .bearer_auth(token.trim())
            .json(&body)
            .send()
    };
    let created: serde_json::Value = post(
        "/v1/orgs",
        &operator,
        json!({"name": "Acme", "plan": "enterprise"}),
    )
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    let (org, admin_token) = (
        created["id"].as_str().unwrap().to_owned(),
        created["admin_token"].as_str().unwrap().to_owned(),
    );
    let team: serde_json::Value = post(
        "/v1/scopes",
        &admin_token,
        json!({"kind": "team", "name": "research", "parent_id": org}),
    )
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    let team = team["id"].as_str().unwrap().to_owned();
    let paused = post(
        &format!("/v1/scopes/{team}/pause"),
        &admin_token,
        json!({"reason": "investigation"}),
    )
    .await
    .unwrap();
    assert_eq!(paused.status(), 200);
    let verified = Command::new(EKM)
        .args(["audit", "verify", "--database-url", &app_url, "--data-dir"])
        .arg(data_dir.path())
        .output()
        .unwrap();
    assert!(
        verified.status.success(),
        "{}",
        String::from_utf8_lossy(&verified.stdout)
    );

    // With the server's credentials, history cannot be rewritten.
    let mut attacker = sqlx::PgConnection::connect(&app_url).await.unwrap();
    for sql in [
        "UPDATE events SET metadata = '{}'",
        "DELETE FROM events",
        "TRUNCATE events",
        "UPDATE audit_chain SET hash = prev_hash",
        "DELETE FROM audit_chain",
        "TRUNCATE audit_chain",
        "DROP TRIGGER events_no_update_or_delete ON events",
        "ALTER TABLE events DISABLE TRIGGER USER",
        "DROP TABLE events",
    ] {
        let refused = attacker.execute(sql).await.unwrap_err().to_string();
        assert!(
            refused.contains("permission denied") || refused.contains("must be owner"),
            "{sql}: {refused}"
        );
    }
    let events: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM events")
        .fetch_one(&mut attacker)
        .await
        .unwrap();
    assert_eq!(events, 3, "organization, team, pause: all kept");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_no_migrate_refuses_when_migrations_are_pending() {
    let test_db = TestDb::new(Backend::Postgres).await;
    let mut command = Command::new(EKM);
    command
        .args(["serve", "--no-migrate", "--listen", "127.0.0.1:0"])
        .args([
            "--database-url",
            test_db.url.as_deref().unwrap(),
            "--data-dir",
        ])
        .arg(test_db.data_dir());
    let refused = exits_within(command, Duration::from_secs(60));
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("ekm migrate"), "{stderr}");
    // Nothing was created: the database is as empty as it was.
    let db = ekm_store::Db::connect(&test_db.config).await.unwrap();
    assert!(!db.pending_migrations().await.unwrap().is_empty());
    db.close().await;
}
