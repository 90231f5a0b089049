//! Exports that verify offline (issue 16, section 4): a signed export from the API and from
//! the CLI verifies with the public key alone, in `ekm audit verify --file` and in the
//! independent Python verifier of docs/, and both name the same first bad line for each kind
//! of tampering an auditor must see.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::{json, Value};

use crate::harness::{Backend, TestApp};
use crate::on_both_backends;

/// (exit success, stdout as JSON) of a verifier run with `--json --file F --public-key K`.
fn run_verifier(mut command: Command, file: &Path, key: &Path) -> (bool, Value) {
    let output = command
        .args(["--json", "--file"])
        .arg(file)
        .arg("--public-key")
        .arg(key)
        .output()
        .expect("the verifier runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let report = serde_json::from_str(stdout.trim()).unwrap_or_else(|_| {
        panic!(
            "not JSON: {stdout} {}",
            String::from_utf8_lossy(&output.stderr)
        )
    });
    (output.status.success(), report)
}

/// `ekm audit verify --file F --public-key K --json`.
fn ekm_verify_file(file: &Path, key: &Path) -> (bool, Value) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_ekm"));
    command.args(["audit", "verify"]);
    run_verifier(command, file, key)
}

/// The same through `python3 docs/verify_export.py` (standard library and `cryptography`).
fn python_verify_file(file: &Path, key: &Path) -> (bool, Value) {
    let mut command = Command::new("python3");
    command.arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/verify_export.py"));
    run_verifier(command, file, key)
}

/// The body of `GET /v1/audit/export?QUERY`, answered 200.
async fn export_text(app: &TestApp, token: &str, query: &str) -> String {
    let response = app
        .client
        .get(format!("{}/v1/audit/export{query}", app.base))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    response.text().await.unwrap()
}

/// Both verifiers on one file: they must agree, and the answer is (ok, line, problem).
fn verify_both(file: &Path, key: &Path) -> (bool, u64, String) {
    let (ok, rust) = ekm_verify_file(file, key);
    let (python_ok, python) = python_verify_file(file, key);
    assert_eq!(ok, python_ok, "ekm: {rust}; python: {python}");
    assert_eq!(rust["ok"], ok, "{rust}");
    if ok {
        assert_eq!(
            rust["export"]["entries"], python["export"]["entries"],
            "{rust} {python}"
        );
        return (true, 0, String::new());
    }
    let (line, problem) = (
        &rust["first_failure"]["line"],
        &rust["first_failure"]["problem"],
    );
    assert_eq!(line, &python["first_failure"]["line"], "{rust} {python}");
    assert_eq!(
        problem, &python["first_failure"]["problem"],
        "{rust} {python}"
    );
    (
        false,
        line.as_u64().unwrap(),
        problem.as_str().unwrap().to_owned(),
    )
}

fn write_lines(dir: &Path, name: &str, lines: &[&str]) -> PathBuf {
    let path = dir.join(name);
    let mut text = lines.join("\n");
    text.push('\n');
    std::fs::write(&path, text).unwrap();
    path
}

async fn signed_export_verifies_offline_and_names_the_first_tampered_line(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let (org, admin) = app.org("enterprise").await;
    let team = app.scope(&admin, "team", "research", &org).await;
    for _ in 0..3 {
        app.pause(&admin, &team).await;
        app.resume(&admin, &team).await;
    }
    let dir = tempfile::tempdir().unwrap();

    // The public key, from the API and from the CLI: the same base64 text.
    let published = app.get("/v1/audit/signing-key", &admin).await;
    assert_eq!(published.status, 200, "{}", published.body);
    assert_eq!(published.body["algorithm"], "ed25519");
    let public_key = published.body["public_key"].as_str().unwrap().to_owned();
    let printed = Command::new(env!("CARGO_BIN_EXE_ekm"))
        .args(["audit", "signing-key", "--data-dir"])
        .arg(app.data_dir())
        .output()
        .unwrap();
    assert!(printed.status.success());
    assert_eq!(String::from_utf8_lossy(&printed.stdout).trim(), public_key);
    let key = dir.path().join("key.pub");
    std::fs::write(&key, format!("{public_key}\n")).unwrap();

    // The export: a header, 8 entries (organization, team, 3 pauses, 3 resumes), each with
    // its seal, and the final signed checkpoint.
    app.app.refresh().await.unwrap();
    let text = export_text(&app, &admin, "?format=jsonl").await;
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 10, "{text}");
    let parsed: Vec<Value> = lines
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(parsed[0]["kind"], "header");
    assert_eq!(parsed[0]["org_id"], org.as_str());
    assert_eq!(parsed[9]["kind"], "checkpoint");
    assert_eq!(parsed[9]["final"], true);
    let report = app
        .get(&format!("/v1/audit/verify?org={org}"), &admin)
        .await;
    assert_eq!(report.body["ok"], true);
    for entry in &parsed[1..9] {
        assert_eq!(entry["kind"], "event");
        assert_eq!(entry["seal"].as_str().map(str::len), Some(64), "{entry}");
    }
    // The last entry's seal is the chain's head that the database-side verify reports.
    assert_eq!(parsed[8]["seal"], report.body["head_hash"]);

    let intact = write_lines(dir.path(), "intact.jsonl", &lines);
    assert_eq!(verify_both(&intact, &key), (true, 0, String::new()));

    // Each tampering, named at its line by both verifiers.
    // Line 4 is the first pause, with its reason.
    let altered_reason = lines[3].replace("\"reason\":\"", "\"reason\":\"nothing to see; ");
    assert_ne!(altered_reason, lines[3]);
    let mut cases: Vec<(&str, Vec<&str>, u64, &str)> = vec![];
    let mut altered = lines.clone();
    altered[3] = &altered_reason;
    cases.push(("altered", altered, 4, "altered"));
    let mut removed = lines.clone();
    removed.remove(5);
    cases.push(("removed", removed, 6, "missing"));
    let mut swapped = lines.clone();
    swapped.swap(3, 4);
    cases.push(("swapped", swapped, 4, "reordered"));
    let mut inserted = lines.clone();
    inserted.insert(3, lines[6]);
    cases.push(("inserted", inserted, 4, "inserted"));
    let truncated = lines[..9].to_vec();
    cases.push(("truncated", truncated, 10, "truncated"));
    // No line hashes the last one: its form is fixed, so nothing can be added to it.
    let padded_last = lines[9].replace("{\"n\"", "{\"note\":\"x\",\"n\"");
    let mut padded = lines.clone();
    padded[9] = &padded_last;
    cases.push(("padded", padded, 10, "altered"));
    // Hostile but parseable by some JSON libraries: both verifiers name the same line.
    let with = |line: &str, extra: &str| format!("{},\"zz\":{extra}}}", &line[..line.len() - 1]);
    let nan = with(lines[3], "NaN");
    let deep = with(lines[3], &format!("{}0{}", "[".repeat(70), "]".repeat(70)));
    let negative_zero = lines[3].replacen("{\"n\":4,", "{\"n\":-0,", 1);
    assert_ne!(negative_zero, lines[3]);
    // The final signature with unused bits set: the same 64 bytes to a lax decoder.
    let signature = parsed[9]["signature"].as_str().unwrap();
    let alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let last = signature.as_bytes()[signature.len() - 3] as char;
    let flipped = alphabet.as_bytes()[alphabet.find(last).unwrap() ^ 1] as char;
    let lax = format!("{}{flipped}==", &signature[..signature.len() - 3]);
    let lax_last = lines[9].replace(signature, &lax);
    for (name, changed, at) in [
        ("nan", &nan, 3),
        ("deep", &deep, 3),
        ("negative-zero", &negative_zero, 3),
        ("lax-signature", &lax_last, 9),
    ] {
        let mut tampered = lines.clone();
        tampered[at] = changed;
        cases.push((name, tampered, at as u64 + 1, "altered"));
    }
    for (name, tampered, line, problem) in cases {
        let file = write_lines(dir.path(), &format!("{name}.jsonl"), &tampered);
        assert_eq!(
            verify_both(&file, &key),
            (false, line, problem.to_owned()),
            "{name}"
        );
    }
    // No newline after the last line.
    let unterminated = dir.path().join("unterminated.jsonl");
    std::fs::write(&unterminated, text.trim_end_matches('\n')).unwrap();
    assert_eq!(
        verify_both(&unterminated, &key),
        (false, 10, "altered".to_owned())
    );
    // The human output names the line too, and exits 1.
    let human = Command::new(env!("CARGO_BIN_EXE_ekm"))
        .args(["audit", "verify", "--file"])
        .arg(dir.path().join("altered.jsonl"))
        .arg("--public-key")
        .arg(&key)
        .output()
        .unwrap();
    assert_eq!(human.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&human.stdout).contains("line 4: altered"),
        "{}",
        String::from_utf8_lossy(&human.stdout)
    );

    // Another key: named as such, not as tampering.
    let other = dir.path().join("other.pub");
    std::fs::write(&other, ekm_keys::SigningKey::generate().public_key_base64()).unwrap();
    assert_eq!(verify_both(&intact, &other), (false, 1, "wrong_key".into()));

    // The CLI's export of the same organization verifies with the same key.
    let output = app
        .ekm(&["audit", "export", "--org", &org])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let cli_export = dir.path().join("cli.jsonl");
    std::fs::write(&cli_export, &output.stdout).unwrap();
    let (ok, report) = ekm_verify_file(&cli_export, &key);
    assert!(ok, "{report}");
    assert_eq!(report["export"]["entries"], 8);
    app.stop().await;
}
on_both_backends!(signed_export_verifies_offline_and_names_the_first_tampered_line);

/// A subtree auditor's export is signed the same way and holds only the subtree; a long
/// export carries a checkpoint every 100 lines, and an alteration whose author recomputed
/// every link after it is caught by the next signature.
async fn long_export_is_checkpointed_and_a_recomputed_chain_fails_its_signature(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let (org, admin) = app.org("enterprise").await;
    let team = app.scope(&admin, "team", "research", &org).await;
    for i in 0..130 {
        app.scope(&admin, "thread", &format!("t{i}"), &team).await;
    }
    app.app.refresh().await.unwrap();
    let text = export_text(&app, &admin, &format!("?scope={team}")).await;
    let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
    // Header, the team and its 130 threads, a checkpoint at line 101, the final one.
    assert_eq!(lines.len(), 1 + 131 + 2);
    let header: Value = serde_json::from_str(&lines[0]).unwrap();
    assert_eq!(header["filter"], json!({"org": org, "scope": team}));
    let checkpoint: Value = serde_json::from_str(&lines[100]).unwrap();
    assert_eq!(checkpoint["kind"], "checkpoint");
    assert_eq!(checkpoint["final"], false);

    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("key.pub");
    let published = app.get("/v1/audit/signing-key", &admin).await;
    std::fs::write(&key, published.body["public_key"].as_str().unwrap()).unwrap();
    let refs: Vec<&str> = lines.iter().map(String::as_str).collect();
    let intact = write_lines(dir.path(), "intact.jsonl", &refs);
    assert!(verify_both(&intact, &key).0);
    // It verifies, and says what it is: a part of the organization's log.
    let human = Command::new(env!("CARGO_BIN_EXE_ekm"))
        .args(["audit", "verify", "--file"])
        .arg(&intact)
        .arg("--public-key")
        .arg(&key)
        .output()
        .unwrap();
    assert!(human.status.success());
    let said = String::from_utf8_lossy(&human.stdout);
    assert!(
        said.contains(&format!(
            "a partial export: only the entries matching scope={team}"
        )),
        "{said}"
    );

    // Rename thread t7 in line 10 and recompute every later line's link.
    let renamed = lines[9].replace("\"t7\"", "\"renamed\"");
    assert_ne!(renamed, lines[9]);
    lines[9] = renamed;
    for i in 10..lines.len() {
        let old: Value = serde_json::from_str(&lines[i]).unwrap();
        let new_prev = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(
            lines[i - 1].as_bytes(),
        ));
        lines[i] = lines[i].replace(old["prev"].as_str().unwrap(), &new_prev);
    }
    let refs: Vec<&str> = lines.iter().map(String::as_str).collect();
    let rewritten = write_lines(dir.path(), "rewritten.jsonl", &refs);
    assert_eq!(
        verify_both(&rewritten, &key),
        (false, 101, "altered".to_owned())
    );
    app.stop().await;
}
on_both_backends!(long_export_is_checkpointed_and_a_recomputed_chain_fails_its_signature);

/// Instances of one database must share `audit-signing.key`: one with a key of its own
/// would sign exports with a key other than the one the others publish.
async fn serve_refuses_another_signing_key_when_the_database_has_one(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let other = app.data_dir().join("other-signing.key");
    let command = app.ekm(&[
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--audit-signing-key-file",
        other.to_str().unwrap(),
    ]);
    let refused = crate::tamper::exits_within(command, std::time::Duration::from_secs(60));
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("same audit-signing.key"), "{stderr}");
    app.stop().await;
}
on_both_backends!(serve_refuses_another_signing_key_when_the_database_has_one);

/// After a compromise (or by policy) the operator rotates the signing key: the old seed is
/// gone from the file, the new key is current, older exports still verify with the old
/// public key, which the API lists as retired, and an instance still holding the old file
/// is refused.
async fn rotated_signing_key_keeps_old_exports_verifiable_and_refuses_the_old_file(
    backend: Backend,
) {
    let app = TestApp::spawn(backend).await;
    let (org, admin) = app.org("enterprise").await;
    let team = app.scope(&admin, "team", "research", &org).await;
    app.pause(&admin, &team).await;
    let dir = tempfile::tempdir().unwrap();
    let old_key = crate::harness::signing_key(app.data_dir());
    let old_pub = dir.path().join("old.pub");
    std::fs::write(&old_pub, old_key.public_key_base64()).unwrap();
    let export = export_text(&app, &admin, "").await;
    let old_export = dir.path().join("before.jsonl");
    std::fs::write(&old_export, export).unwrap();
    let key_file = app.data_dir().join(ekm_keys::AUDIT_SIGNING_KEY_FILE);
    let old_seed = std::fs::read_to_string(&key_file).unwrap();

    let ekm = |args: &[&str]| app.ekm(args).output().unwrap();
    let rotated = ekm(&["audit", "signing-key", "--rotate"]);
    assert!(
        rotated.status.success(),
        "{}",
        String::from_utf8_lossy(&rotated.stderr)
    );
    let new_pub_text = String::from_utf8_lossy(&rotated.stdout).trim().to_owned();
    assert_ne!(new_pub_text, old_key.public_key_base64());
    let printed = ekm(&["audit", "signing-key"]);
    assert_eq!(
        String::from_utf8_lossy(&printed.stdout).trim(),
        new_pub_text
    );
    // The old seed is gone from the file; nothing is left aside.
    assert_ne!(std::fs::read_to_string(&key_file).unwrap(), old_seed);
    assert!(!app.data_dir().join("audit-signing.key.new").exists());

    // The export made before verifies with the old public key, not with the new one.
    assert!(ekm_verify_file(&old_export, &old_pub).0);
    let new_pub = dir.path().join("new.pub");
    std::fs::write(&new_pub, &new_pub_text).unwrap();
    let (ok, report) = ekm_verify_file(&old_export, &new_pub);
    assert!(!ok);
    assert_eq!(report["first_failure"]["problem"], "wrong_key");

    // The database: the new key current, the old one retired and listed for auditors.
    let new_key = crate::harness::signing_key(app.data_dir());
    assert_eq!(new_key.public_key_base64(), new_pub_text);
    let records = ekm_projections::signing_keys(&app.db).await.unwrap();
    assert_eq!(records.len(), 2);
    assert_eq!(
        (records[0].key_id.as_str(), records[0].retired_at.is_none()),
        (new_key.key_id().as_str(), true)
    );
    assert_eq!(records[1].key_id, old_key.key_id());
    assert!(records[1].retired_at.is_some());
    // This instance still signs with the old key until it restarts, and says so; the keys a
    // rotation retired are listed beside it.
    let published = app.get("/v1/audit/signing-key", &admin).await;
    assert_eq!(published.body["public_key"], old_key.public_key_base64());
    // An instance started with the old file is refused, the key named as retired; the new
    // file is accepted.
    let refused = ekm_projections::register_signing_key(&app.db, &old_key)
        .await
        .unwrap_err()
        .to_string();
    assert!(refused.contains("retired"), "{refused}");
    ekm_projections::register_signing_key(&app.db, &new_key)
        .await
        .unwrap();
    // Rotating from a file that is not the current key is refused and changes nothing.
    let stale = dir.path().join("stale.key");
    std::fs::write(&stale, &old_seed).unwrap();
    std::fs::set_permissions(&stale, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let again = ekm(&[
        "audit",
        "signing-key",
        "--rotate",
        "--audit-signing-key-file",
        stale.to_str().unwrap(),
    ]);
    assert!(!again.status.success());
    assert_eq!(
        ekm_projections::signing_keys(&app.db).await.unwrap(),
        records
    );
    assert_eq!(std::fs::read_to_string(&stale).unwrap(), old_seed);
    app.stop().await;
}
on_both_backends!(rotated_signing_key_keeps_old_exports_verifiable_and_refuses_the_old_file);
