//! kill -9 in the middle of a workload: the restarted server's read models equal a rebuild.

use super::*;

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
                            json!({"reason": "load", "confirm": team, "immediately": true}),
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
