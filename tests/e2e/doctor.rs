//! `ekm doctor` (issue 19 §5): a healthy deployment exits 0; a wrong master key or a stuck
//! projection fails, says which check and what to fix, and exits 1.

use serde_json::Value;

use crate::harness::{Backend, TestApp};
use crate::on_both_backends;

fn doctor(app: &TestApp, extra: &[&str]) -> (Option<i32>, Value) {
    let mut args = vec!["doctor", "--json"];
    args.extend_from_slice(extra);
    let output = app.ekm(&args).output().unwrap();
    let text = String::from_utf8_lossy(&output.stdout).to_string();
    let report: Value = serde_json::from_str(&text)
        .unwrap_or_else(|_| panic!("{text} {}", String::from_utf8_lossy(&output.stderr)));
    (output.status.code(), report)
}

fn status_of<'a>(report: &'a Value, check: &str) -> Vec<&'a str> {
    report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["check"] == check)
        .map(|c| c["status"].as_str().unwrap())
        .collect()
}

async fn doctor_finds_a_healthy_deployment_and_what_is_wrong(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let (org, admin) = app.org("enterprise").await;
    app.scope(&admin, "team", "research", &org).await;
    app.app.refresh().await.unwrap();

    let (code, report) = doctor(&app, &[]);
    assert_eq!(code, Some(0), "{report}");
    assert_eq!(report["healthy"], true);
    for check in [
        "database",
        "master key",
        "audit key",
        "clock",
        "projections",
    ] {
        assert_eq!(status_of(&report, check), vec!["ok"], "{check}: {report}");
    }
    assert_eq!(status_of(&report, "kms endpoint"), vec!["ok"]);

    // Another master key than the one the database knows: fail, with the fix.
    let other = app.data_dir().join("other-master.key");
    ekm_keys::LocalMasterKey::load(&other, true).unwrap();
    let (code, report) = doctor(&app, &["--master-key-file", other.to_str().unwrap()]);
    assert_eq!(code, Some(1), "{report}");
    assert_eq!(status_of(&report, "master key"), vec!["fail"]);
    let text = report.to_string();
    assert!(text.contains("restore it from your backup"), "{text}");
    assert!(!text.contains(&admin), "no secret in the report");

    // A projection stuck on an event it cannot decode.
    crate::faults::insert_undecodable_event(&app.db, &org).await;
    let (code, report) = doctor(&app, &[]);
    assert_eq!(code, Some(1), "{report}");
    assert_eq!(status_of(&report, "projections"), vec!["fail"], "{report}");
    app.stop().await;
}
on_both_backends!(doctor_finds_a_healthy_deployment_and_what_is_wrong);

/// No database where it is looked for: one failing check, exit 1, no panic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn doctor_says_where_it_looked_when_there_is_no_database() {
    let dir = tempfile::tempdir().unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_ekm"))
        .args(["doctor", "--data-dir"])
        .arg(dir.path())
        .env_remove("EKM_DATABASE_URL")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(1), "{text}");
    assert!(text.contains("no EKM database at"), "{text}");
    assert!(text.contains("not healthy"), "{text}");
}
