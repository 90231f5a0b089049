//! Failover on PostgreSQL (issue 19 §4): a primary and a synchronous streaming standby,
//! started from the installed binaries; two `ekm serve` instances with both hosts in one
//! URL (`target_session_attrs=read-write`). The primary is killed, the standby promoted:
//! the instances follow it without a restart, nothing acknowledged is lost, and while no
//! primary answers, commands and (past `--max-projection-lag`) the data plane fail closed
//! with 503 and `Retry-After`.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::{read_token, serve_configured, Server};
use crate::harness::{free_port, give_to_postgres, postgres_bin, run_postgres_tool};

/// One PostgreSQL server of the pair; stopped (immediately) when dropped.
struct Node {
    pg_ctl: PathBuf,
    data: PathBuf,
    port: u16,
}

impl Node {
    fn data(&self) -> String {
        self.data.to_string_lossy().into_owned()
    }

    fn start(&self, socket_dir: &Path) {
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1",
            self.port,
            socket_dir.display()
        );
        let log = format!("{}.log", self.data());
        run_postgres_tool(
            &self.pg_ctl,
            &[
                "-D",
                &self.data(),
                "-o",
                &options,
                "-w",
                "-l",
                &log,
                "start",
            ],
        )
        .expect("PostgreSQL starts");
    }

    /// `pg_ctl stop -m immediate`: the server dies as in a crash.
    fn kill(&self) {
        let _ = run_postgres_tool(
            &self.pg_ctl,
            &["-D", &self.data(), "-m", "immediate", "-w", "stop"],
        );
    }

    /// `ALTER SYSTEM SET {setting}` and a reload, as a manager (or an operator) does.
    async fn alter_system(&self, setting: &str) {
        let url = format!("postgres://postgres@127.0.0.1:{}/postgres", self.port);
        let mut connection = <sqlx::PgConnection as sqlx::Connection>::connect(&url)
            .await
            .expect("the server answers");
        for statement in [
            format!("ALTER SYSTEM SET {setting}"),
            "SELECT pg_reload_conf()".into(),
        ] {
            sqlx::query(&statement)
                .execute(&mut connection)
                .await
                .unwrap();
        }
    }

    fn promote(&self) {
        run_postgres_tool(&self.pg_ctl, &["-D", &self.data(), "-w", "promote"])
            .expect("the standby is promoted");
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A primary and a standby that streams from it synchronously: a commit is acknowledged
/// only once the standby has it.
fn primary_and_standby(dir: &Path) -> (Node, Node) {
    let initdb = postgres_bin("initdb").expect("PostgreSQL's initdb installed");
    let pg_ctl = postgres_bin("pg_ctl").expect("pg_ctl installed");
    let basebackup = postgres_bin("pg_basebackup").expect("pg_basebackup installed");
    give_to_postgres(dir).unwrap();
    let primary = Node {
        pg_ctl: pg_ctl.clone(),
        data: dir.join("primary"),
        port: free_port(),
    };
    run_postgres_tool(
        &initdb,
        &[
            "-D",
            &primary.data(),
            "-U",
            "postgres",
            "--auth=trust",
            "--no-sync",
        ],
    )
    .expect("initdb");
    let conf = primary.data.join("postgresql.conf");
    let mut text = std::fs::read_to_string(&conf).unwrap();
    text.push_str(
        "\nwal_level = replica\nmax_wal_senders = 5\nsynchronous_standby_names = '*'\n\
         synchronous_commit = on\nmax_connections = 100\n",
    );
    std::fs::write(&conf, text).unwrap();
    primary.start(dir);
    let standby = Node {
        pg_ctl,
        data: dir.join("standby"),
        port: free_port(),
    };
    run_postgres_tool(
        &basebackup,
        &[
            "-h",
            "127.0.0.1",
            "-p",
            &primary.port.to_string(),
            "-U",
            "postgres",
            "-D",
            &standby.data(),
            "-R",
            "-X",
            "stream",
        ],
    )
    .expect("pg_basebackup");
    standby.start(dir);
    (primary, standby)
}

/// Waits until the primary reports the standby as synchronous.
async fn wait_for_sync(primary: &Node) {
    let url = format!("postgres://postgres@127.0.0.1:{}/postgres", primary.port);
    let started = Instant::now();
    loop {
        if let Ok(mut connection) = <sqlx::PgConnection as sqlx::Connection>::connect(&url).await {
            let state: Option<String> = sqlx::query_scalar(
                "SELECT sync_state FROM pg_stat_replication WHERE state = 'streaming'",
            )
            .fetch_optional(&mut connection)
            .await
            .unwrap_or(None);
            if state.as_deref() == Some("sync") {
                return;
            }
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the standby never became synchronous"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A request's status, `Retry-After` and body.
async fn request(
    method: &str,
    url: &str,
    token: &str,
    body: Option<Value>,
) -> (u16, Option<String>, Value) {
    let client = reqwest::Client::new();
    let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
    let mut builder = client
        .request(method, url)
        .bearer_auth(token)
        .timeout(Duration::from_secs(60));
    if let Some(body) = body {
        builder = builder.json(&body);
    }
    let response = builder.send().await.expect("the server answers");
    let status = response.status().as_u16();
    let retry_after = response
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap_or("").to_owned());
    let text = response.text().await.unwrap_or_default();
    (
        status,
        retry_after,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

/// The last lines of an instance's log, for a failure's message.
fn tail(server: &Server) -> String {
    let log = server.log_text();
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

fn team(name: &str, parent: &str) -> Value {
    json!({"kind": "team", "name": name, "parent_id": parent})
}

/// Creating `body` on `instance` fails closed: 503 with `Retry-After`.
async fn assert_refused(instance: &Server, token: &str, body: Value) {
    let url = format!("{}/v1/scopes", instance.base);
    let (status, retry_after, answer) = request("POST", &url, token, Some(body)).await;
    assert_eq!(status, 503, "{answer}");
    assert!(retry_after.is_some(), "503 without Retry-After: {answer}");
}

/// Creates `body` on `instance` once it serves commands again (503 until then, within 30
/// s); returns the scope's id.
async fn created_once_served(instance: &Server, token: &str, body: Value) -> String {
    let url = format!("{}/v1/scopes", instance.base);
    let since = Instant::now();
    loop {
        let (status, _, answer) = request("POST", &url, token, Some(body.clone())).await;
        if status == 201 {
            return answer["id"].as_str().unwrap().to_owned();
        }
        assert_eq!(status, 503, "{answer}");
        assert!(
            since.elapsed() < Duration::from_secs(30),
            "{} does not serve commands again: {answer}\n{}",
            instance.base,
            tail(instance)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[test]
fn instances_follow_a_promoted_standby_and_lose_nothing_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let (primary, standby) = primary_and_standby(dir.path());
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(wait_for_sync(&primary));
    // Given two instances with both hosts in their URL, the standby's first: the primary
    // is found by asking, not by the order
    let url = format!(
        "postgres://postgres@127.0.0.1:{},127.0.0.1:{}/postgres?target_session_attrs=read-write",
        standby.port, primary.port
    );
    let lag = ["--max-projection-lag", "2s"];
    let dir_a = dir.path().join("a");
    let dir_b = dir.path().join("b");
    let a: Server = serve_configured(&dir_a, Some(&url), &lag, &[]);
    std::fs::create_dir_all(&dir_b).unwrap();
    for file in ["master.key", "audit.key", "audit-signing.key"] {
        std::fs::copy(dir_a.join(file), dir_b.join(file)).unwrap();
        std::fs::set_permissions(
            dir_b.join(file),
            std::os::unix::fs::PermissionsExt::from_mode(0o600),
        )
        .unwrap();
    }
    let b: Server = serve_configured(&dir_b, Some(&url), &lag, &[]);
    let operator = read_token(&dir_a);
    runtime.block_on(async {
        let (status, _, org) = request(
            "POST",
            &format!("{}/v1/orgs", a.base),
            &operator,
            Some(json!({"name": "Failover", "plan": "enterprise", "tier": "managed"})),
        )
        .await;
        assert_eq!(status, 201, "{org}");
        let org_id = org["id"].as_str().unwrap().to_owned();
        let admin = org["admin_token"].as_str().unwrap().to_owned();
        let (status, _, grant) = request(
            "POST",
            &format!("{}/v1/orgs/{org_id}/grants", a.base),
            &admin,
            Some(json!({"principal": "admin", "permission": "data:use"})),
        )
        .await;
        assert_eq!(status, 201, "{grant}");
        // And commands acknowledged by both instances (each on the standby too: sync)
        let mut acknowledged = vec![];
        for i in 0..10 {
            let instance = if i % 2 == 0 { &a } else { &b };
            let (status, _, scope) = request(
                "POST",
                &format!("{}/v1/scopes", instance.base),
                &admin,
                Some(team(&format!("before-{i}"), &org_id)),
            )
            .await;
            assert_eq!(status, 201, "{scope}");
            acknowledged.push(scope["id"].as_str().unwrap().to_owned());
        }
        let (status, _, sealed) = request(
            "POST",
            &format!("{}/v1/scopes/{}/encrypt", a.base, acknowledged[0]),
            &admin,
            Some(json!({"plaintext": "aGVsbG8=", "class": "messages"})),
        )
        .await;
        assert_eq!(status, 200, "{sealed}");
        let ciphertext = sealed["ciphertext"].as_str().unwrap().to_owned();

        // When the primary turns read-only while up (as a demoted primary does, or an
        // operator with default_transaction_read_only), then commands fail closed, 503, not
        // 500; and when it accepts writes again, they succeed on it again
        primary
            .alter_system("default_transaction_read_only = on")
            .await;
        for instance in [&a, &b] {
            assert_refused(instance, &admin, team("read-only", &org_id)).await;
        }
        primary
            .alter_system("default_transaction_read_only = off")
            .await;
        for (i, instance) in [&a, &b].into_iter().enumerate() {
            let body = team(&format!("writable-{i}"), &org_id);
            acknowledged.push(created_once_served(instance, &admin, body).await);
        }

        // When the primary dies
        primary.kill();

        // Then commands on both instances fail closed, 503 with Retry-After
        for instance in [&a, &b] {
            assert_refused(instance, &admin, team("during", &org_id)).await;
        }
        // And the data plane refuses once the head of the log has gone unread past the
        // bound (2 s): it cannot know of a pause it did not hear about
        let cut = Instant::now();
        loop {
            let (status, retry_after, body) = request(
                "POST",
                &format!("{}/v1/scopes/{}/encrypt", b.base, acknowledged[1]),
                &admin,
                Some(json!({"plaintext": "aGVsbG8=", "class": "messages"})),
            )
            .await;
            if status == 503 {
                assert_eq!(body["code"], "unavailable", "{body}");
                assert!(retry_after.is_some());
                break;
            }
            assert_eq!(status, 200, "{body}");
            assert!(
                cut.elapsed() < Duration::from_secs(15),
                "the data plane still served {:?} after the primary died",
                cut.elapsed()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }

        // When the standby is promoted, and (as Patroni does when no standby is left) no
        // longer waits for a synchronous standby of its own
        standby.promote();
        standby.alter_system("synchronous_standby_names = ''").await;

        // Then both instances serve commands again, without a restart
        for (name, instance) in [("a", &a), ("b", &b)] {
            let body = team(&format!("after-{name}"), &org_id);
            acknowledged.push(created_once_served(instance, &admin, body).await);
        }
        // And nothing acknowledged is lost: every scope is there, on both instances
        for instance in [&a, &b] {
            for id in &acknowledged {
                let (status, _, body) = request(
                    "GET",
                    &format!("{}/v1/scopes/{id}", instance.base),
                    &admin,
                    None,
                )
                .await;
                assert_eq!(status, 200, "{id} on {}: {body}", instance.base);
            }
        }
        let (status, _, audit) = request(
            "GET",
            &format!("{}/v1/audit?action=scope.create&limit=100", b.base),
            &admin,
            None,
        )
        .await;
        assert_eq!(status, 200, "{audit}");
        let created: Vec<&str> = audit["items"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|entry| entry["scope_id"].as_str())
            .collect();
        for id in &acknowledged {
            assert!(created.contains(&id.as_str()), "{id} not in the audit log");
        }
        // And the data plane serves again, opening what was sealed before
        let opened = Instant::now();
        loop {
            let (status, _, body) = request(
                "POST",
                &format!("{}/v1/scopes/{}/decrypt", b.base, acknowledged[0]),
                &admin,
                Some(json!({"ciphertext": ciphertext, "class": "messages"})),
            )
            .await;
            if status == 200 {
                assert_eq!(body["plaintext"], "aGVsbG8=");
                break;
            }
            assert!(
                opened.elapsed() < Duration::from_secs(15),
                "the data plane did not come back: {body}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    drop(a);
    drop(b);
    drop(standby);
    drop(primary);
    drop(runtime);
}
