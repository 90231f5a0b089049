//! `ekm scope …` (issue 19 §2): every scope command through a running server, human lines
//! by default, JSON with --json, exit 1 with the problem on standard error when refused.

use serde_json::Value;

use crate::harness::{Backend, TestApp};
use crate::on_both_backends;

struct Cli<'a> {
    app: &'a TestApp,
    token: String,
}

impl Cli<'_> {
    fn run(&self, args: &[&str]) -> (Option<i32>, String, String) {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_ekm"))
            .arg("scope")
            .args(args)
            .args(["--url", &self.app.base])
            .env("EKM_TOKEN", &self.token)
            .output()
            .unwrap();
        (
            output.status.code(),
            String::from_utf8_lossy(&output.stdout).to_string(),
            String::from_utf8_lossy(&output.stderr).to_string(),
        )
    }

    fn json(&self, args: &[&str]) -> Value {
        let mut args = args.to_vec();
        args.push("--json");
        let (code, out, err) = self.run(&args);
        assert_eq!(code, Some(0), "{out} {err}");
        serde_json::from_str(&out).unwrap()
    }
}

async fn every_scope_command_works_from_the_command_line(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let (org, admin) = app.org_with("enterprise", "managed").await;
    let cli = Cli {
        app: &app,
        token: admin.clone(),
    };
    let team = cli.json(&[
        "create", "--kind", "team", "--name", "research", "--parent", &org,
    ]);
    let team = team["id"].as_str().unwrap().to_owned();
    let thread = cli.json(&[
        "create", "--kind", "thread", "--name", "launch", "--parent", &team,
    ]);
    let thread = thread["id"].as_str().unwrap().to_owned();
    app.token(&admin, &org, "agent-7", "member").await;
    app.grant(&admin, &org, "agent-7", "data:use", Some(&team))
        .await;
    let before = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true);

    let (code, tree, _) = cli.run(&["tree", &org]);
    assert_eq!(code, Some(0));
    let lines: Vec<&str> = tree.lines().collect();
    assert_eq!(lines.len(), 3, "{tree}");
    assert!(lines[1].starts_with(&format!("  {team}")) && lines[1].ends_with("research"));
    assert!(lines[2].starts_with(&format!("    {thread}")) && lines[2].ends_with("launch"));
    let listed = cli.json(&["list", &team]);
    assert_eq!(listed.as_array().unwrap().len(), 1);

    let (code, paused, _) = cli.run(&["pause", &team, "--reason", "investigation 4711"]);
    assert_eq!(code, Some(0), "{paused}");
    assert!(paused.contains("own state        paused"), "{paused}");
    let (_, shown, _) = cli.run(&["show", &thread]);
    assert!(
        shown.contains("effective state  paused (by team"),
        "{shown}"
    );
    assert!(shown.contains("investigation 4711"), "{shown}");
    let (code, resumed, _) = cli.run(&["resume", &team]);
    assert_eq!(code, Some(0));
    assert!(resumed.contains("changed          true"), "{resumed}");

    let rotated = cli.json(&["rotate", &thread]);
    assert_eq!(rotated["key_versions"].as_array().unwrap().len(), 2);
    let (code, refused, _) = cli.run(&["retire", &thread, "--below", "2"]);
    assert_eq!(code, Some(1), "{refused}");
    let (code, floor, _) = cli.run(&["min-decryption-version", &thread, "2"]);
    assert_eq!(code, Some(0), "{floor}");
    assert!(
        floor.contains("key versions     1 (disabled), 2"),
        "{floor}"
    );
    assert!(floor.contains("decryption floor 2"), "{floor}");
    let (code, versions, _) = cli.run(&["key-versions", &thread]);
    assert_eq!(code, Some(0));
    assert!(versions.starts_with("decryption floor 2"), "{versions}");
    assert!(versions.contains("1  disabled  last used"), "{versions}");
    assert!(versions.contains("2  enabled  current"), "{versions}");
    let (code, retired, _) = cli.run(&["retire", &thread, "--below", "2"]);
    assert_eq!(code, Some(0));
    assert!(retired.contains("1 (retired), 2"), "{retired}");

    let past = cli.json(&["state", &thread, "--at", &before]);
    assert_eq!(past["effective_state"], "active");
    let (code, who, _) = cli.run(&["access-at", &thread, "--at", &before]);
    assert_eq!(code, Some(0));
    assert!(who.starts_with("effective state  active"), "{who}");
    assert!(
        who.contains(&format!("agent-7  data:use on {team}  tokens: tok_")),
        "{who}"
    );

    // Refused: exit 1, the problem on standard error; nothing revoked.
    let (code, out, err) = cli.run(&["revoke", &thread, "--reason", "done", "--confirm", "nope"]);
    assert_eq!(code, Some(1), "{out}");
    assert!(err.contains("invalid_request"), "{err}");
    let dry = cli.json(&[
        "revoke",
        &team,
        "--reason",
        "done",
        "--confirm",
        &team,
        "--dry-run",
    ]);
    assert_eq!(dry["dry_run"], true);
    assert_eq!(dry["scopes_in_subtree"], 2);
    // A revoke waits out its window: pending, refused like paused, and cancellable.
    let (code, pending, _) = cli.run(&[
        "revoke",
        &thread,
        "--reason",
        "done",
        "--confirm",
        &thread,
        "--after",
        "P2D",
    ]);
    assert_eq!(code, Some(0), "{pending}");
    assert!(
        pending.contains("own state        pending_revocation"),
        "{pending}"
    );
    assert!(pending.contains("unless cancelled"), "{pending}");
    let cancelled = cli.json(&["cancel-revocation", &thread, "--reason", "wrong thread"]);
    assert_eq!(cancelled["own_state"], "active", "{cancelled}");
    assert_eq!(cancelled["changed"], true);
    let (code, revoked, _) = cli.run(&[
        "revoke",
        &thread,
        "--reason",
        "done",
        "--confirm",
        &thread,
        "--immediately",
    ]);
    assert_eq!(code, Some(0));
    assert!(revoked.contains("own state        revoked"), "{revoked}");
    // The audit log of it all, filtered, from the command line.
    let audit = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_ekm"))
            .args(["audit", "query", "--url", &app.base])
            .args(args)
            .env("EKM_TOKEN", &admin)
            .output()
            .unwrap()
    };
    let pauses = audit(&["--action", "scope.pause", "--scope", &team]);
    let printed = String::from_utf8_lossy(&pauses.stdout);
    assert!(pauses.status.success(), "{printed}");
    assert_eq!(printed.lines().count(), 1, "{printed}");
    assert!(printed.contains("scope.pause") && printed.contains("(investigation 4711)"));
    let everything: Value = serde_json::from_slice(&audit(&["--json"]).stdout).unwrap();
    assert!(everything.as_array().unwrap().len() >= 8, "{everything}");
    assert_eq!(
        audit(&["--action", "scope.pause", "--from", "yesterday"])
            .status
            .code(),
        Some(1)
    );

    // Another organization's token sees nothing of it.
    let (_, stranger) = app.org("enterprise").await;
    let other = Cli {
        app: &app,
        token: stranger,
    };
    let (code, _, err) = other.run(&["show", &thread]);
    assert_eq!(code, Some(1));
    assert!(err.contains("not_found"), "{err}");
    app.stop().await;
}
on_both_backends!(every_scope_command_works_from_the_command_line);
