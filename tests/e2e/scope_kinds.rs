//! Scope kinds (issue 17 §5): teams nest, so a tree is as deep as the platform needs (up
//! to `MAX_DEPTH`), and the platform registers kinds of its own with `--scope-kinds FILE`,
//! validated at start-up.

use std::time::Duration;

use serde_json::json;

use crate::harness::{Backend, TestApp};
use crate::on_both_backends;
use crate::process::{call, read_token, serve_configured, EKM};

async fn teams_nest_and_the_cascade_reaches_the_deepest_scope(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let (org, admin) = app.org("enterprise").await;
    // organization → team → team → team → thread: depth 5.
    let top = app.scope(&admin, "team", "emea", &org).await;
    let middle = app.scope(&admin, "team", "germany", &top).await;
    let bottom = app.scope(&admin, "team", "berlin", &middle).await;
    let thread = app.scope(&admin, "thread", "t", &bottom).await;
    let shown = app.get(&format!("/v1/scopes/{thread}"), &admin).await;
    assert_eq!(shown.body["path"].as_array().map(Vec::len), Some(5));
    app.pause(&admin, &middle).await;
    let paused = app.get(&format!("/v1/scopes/{thread}"), &admin).await;
    assert_eq!(paused.body["effective_state"], "paused");
    assert_eq!(paused.body["cause"]["scope_id"], middle.as_str());
    // Nothing under a thread, and no kind a client makes up.
    for (kind, parent) in [("team", &thread), ("galaxy", &org), ("organization", &org)] {
        app.post(
            "/v1/scopes",
            &admin,
            json!({"kind": kind, "name": "x", "parent_id": parent}),
        )
        .await
        .assert_problem(400, "invalid_request");
    }
    // At most MAX_DEPTH levels.
    let mut parent = org.clone();
    for level in 2..=ekm_domain::scope::MAX_DEPTH {
        parent = app
            .scope(&admin, "team", &format!("level {level}"), &parent)
            .await;
    }
    let refused = app
        .post(
            "/v1/scopes",
            &admin,
            json!({"kind": "thread", "name": "too deep", "parent_id": parent}),
        )
        .await;
    refused.assert_problem(400, "invalid_request");
    assert!(
        refused.body["detail"]
            .as_str()
            .unwrap()
            .contains("16 levels"),
        "{}",
        refused.body
    );
    app.stop().await;
}
on_both_backends!(teams_nest_and_the_cascade_reaches_the_deepest_scope);

#[test]
fn serve_registers_the_platforms_kinds_and_refuses_a_bad_file() {
    let dir = tempfile::tempdir().unwrap();
    let kinds = dir.path().join("kinds.json");
    std::fs::write(
        &kinds,
        r#"{"kinds": [
            {"name": "project", "parents": ["organization", "team"]},
            {"name": "thread", "parents": ["project"]}
        ]}"#,
    )
    .unwrap();
    let data = dir.path().join("data");
    let server = serve_configured(
        &data,
        None,
        &["--scope-kinds", kinds.to_str().unwrap()],
        &[],
    );
    assert!(
        server
            .log_text()
            .contains("project under organization|team"),
        "{}",
        server.log_text()
    );
    let operator = read_token(&data);
    let url = |path: &str| format!("{}{path}", server.base);
    let (status, org) = call(
        "POST",
        &url("/v1/orgs"),
        &operator,
        Some(json!({"name": "Acme", "plan": "enterprise"})),
    );
    assert_eq!(status, 201, "{org}");
    let (org_id, admin) = (
        org["id"].as_str().unwrap().to_owned(),
        org["admin_token"].as_str().unwrap().to_owned(),
    );
    let create = |kind: &str, parent: &str| {
        call(
            "POST",
            &url("/v1/scopes"),
            &admin,
            Some(json!({"kind": kind, "name": kind, "parent_id": parent})),
        )
    };
    let (status, project) = create("project", &org_id);
    assert_eq!(status, 201, "{project}");
    assert_eq!(project["kind"], "project");
    let project_id = project["id"].as_str().unwrap().to_owned();
    // A built-in kind gains the parents the file lists.
    let (status, thread) = create("thread", &project_id);
    assert_eq!(status, 201, "{thread}");
    let thread_id = thread["id"].as_str().unwrap().to_owned();
    // Only where the file allows.
    let (status, refused) = create("project", &thread_id);
    assert_eq!(
        (status, refused["code"].as_str()),
        (400, Some("invalid_request"))
    );
    let (status, refused) = create("ticket", &org_id);
    assert_eq!(
        (status, refused["code"].as_str()),
        (400, Some("invalid_request"))
    );
    assert!(
        refused["detail"].as_str().unwrap().contains("project"),
        "{refused}"
    );
    // The cascade goes through it, and the kind reads back.
    let (status, _) = call(
        "POST",
        &url(&format!("/v1/scopes/{project_id}/pause")),
        &admin,
        Some(json!({"reason": "audit"})),
    );
    assert_eq!(status, 200);
    let (_, shown) = call(
        "GET",
        &url(&format!("/v1/scopes/{thread_id}")),
        &admin,
        None,
    );
    assert_eq!(shown["effective_state"], "paused");
    assert_eq!(shown["cause"]["scope_kind"], "project");
    let (code, _) = server.terminate();
    assert_eq!(code, 0);

    // A file that does not validate stops `ekm serve`, naming the problem.
    for (text, problem) in [
        (
            r#"{"kinds": [{"name": "project", "parents": ["galaxy"]}]}"#,
            "galaxy",
        ),
        (
            r#"{"kinds": [{"name": "organization", "parents": ["team"]}]}"#,
            "root",
        ),
        ("{", "scope_kinds"),
    ] {
        std::fs::write(&kinds, text).unwrap();
        let mut child = std::process::Command::new(EKM)
            .args(["serve", "--listen", "127.0.0.1:0", "--scope-kinds"])
            .arg(&kinds)
            .arg("--data-dir")
            .arg(&data)
            .env_remove("EKM_DATABASE_URL")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break Some(status);
            }
            if std::time::Instant::now() > deadline {
                break None;
            }
            // Polling a child process: there is no event to await from std.
            std::thread::sleep(Duration::from_millis(20));
        };
        let _ = child.kill();
        let output = child.wait_with_output().unwrap();
        assert!(status.is_some_and(|s| !s.success()), "{text} was accepted");
        let log = String::from_utf8_lossy(&output.stderr);
        assert!(log.contains(problem), "{text}: {log}");
    }
}
