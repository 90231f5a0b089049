//! Schemathesis (issue 18 §2) against a live `ekm serve` on SQLite, reading the OpenAPI
//! document the server serves: as an org admin, then as a service holding `data:use` on a
//! team. It generates requests from the document (examples, boundary values, random data,
//! and sequences through the links it infers) and checks every answer: no server error, no
//! status the document does not list for the operation, no body, content type or header
//! that breaks it.
//!
//! Every check of schemathesis runs (the three criteria, and authentication ignored,
//! resources used after deletion, missing headers, unsupported methods) but two, which
//! test input validation rather than the document's promises:
//! - `positive_data_acceptance`: the document types fields as the JSON they are (a name is
//!   a string), and the server refuses strings that are not valid names, ids or reasons
//!   with a documented 400;
//! - `negative_data_rejection`: a batch answers 200 with a problem for each item that does
//!   not parse (`{"items": [null]}`), by design: one bad item does not fail the others.

use std::path::Path;
use std::process::Command;

use serde_json::json;

use super::{call, read_token, serve};

const EXCLUDED_CHECKS: &str = "positive_data_acceptance,negative_data_rejection";

/// Examples per operation and phase: enough to reach every answer, bounded for CI.
const MAX_EXAMPLES: &str = "25";

fn schemathesis(dir: &Path, base: &str, who: &str, token: &str, org: &str, scope: &str) {
    let config = dir.join(format!("schemathesis-{who}.toml"));
    std::fs::write(
        &config,
        "headers = { Authorization = \"Bearer ${EKM_ST_TOKEN}\" }\n\n\
         [parameters]\n\"path.org\" = \"${EKM_ST_ORG}\"\n\"path.id\" = \"${EKM_ST_SCOPE}\"\n",
    )
    .unwrap();
    let output = Command::new("st")
        .current_dir(dir)
        .env("EKM_ST_TOKEN", token)
        .env("EKM_ST_ORG", org)
        .env("EKM_ST_SCOPE", scope)
        .env("NO_COLOR", "1")
        .arg("--config-file")
        .arg(&config)
        .args(["run", &format!("{base}/v1/openapi.json")])
        .args(["--exclude-checks", EXCLUDED_CHECKS])
        .args(["--max-examples", MAX_EXAMPLES])
        .arg("--no-color")
        .output()
        .unwrap_or_else(|e| {
            panic!("schemathesis (`st`) must be installed: pip install schemathesis ({e})")
        });
    let text = String::from_utf8_lossy(&output.stdout);
    let generated = text
        .lines()
        .find(|line| {
            let line = line.trim_start();
            line.contains(" generated") && line.starts_with(|c: char| c.is_ascii_digit())
        })
        .unwrap_or("no count")
        .trim()
        .to_owned();
    let links = text
        .lines()
        .find(|line| line.contains("API Links:"))
        .unwrap_or("")
        .trim()
        .to_owned();
    eprintln!("schemathesis as {who}: {generated}; {links}");
    assert!(
        output.status.success(),
        "schemathesis as {who} found problems:\n{text}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        generated.contains("generated") && !generated.starts_with("0 "),
        "schemathesis as {who} generated nothing:\n{text}"
    );
}

#[test]
fn schemathesis_finds_no_server_error_and_no_answer_outside_the_document() {
    let dir = tempfile::tempdir().unwrap();
    let server = serve(dir.path(), None);
    let base = server.base.clone();
    let operator = read_token(dir.path());
    // Given an enterprise organization, a team, and a service with data:use on the team
    let (status, org) = call(
        "POST",
        &format!("{base}/v1/orgs"),
        &operator,
        Some(json!({"name": "schemathesis", "plan": "enterprise"})),
    );
    assert_eq!(status, 201, "{org}");
    let org_id = org["id"].as_str().unwrap().to_owned();
    let admin = org["admin_token"].as_str().unwrap().to_owned();
    let grants = format!("{base}/v1/orgs/{org_id}/grants");
    let granted = call(
        "POST",
        &grants,
        &admin,
        Some(json!({"principal": "admin", "permission": "data:use"})),
    );
    assert_eq!(granted.0, 201, "{}", granted.1);
    let (status, team) = call(
        "POST",
        &format!("{base}/v1/scopes"),
        &admin,
        Some(json!({"kind": "team", "name": "fuzzed", "parent_id": org_id})),
    );
    assert_eq!(status, 201, "{team}");
    let team_id = team["id"].as_str().unwrap().to_owned();
    // Threads under the team: the links from its children's page lead to real scopes
    for name in ["first", "second"] {
        let (status, thread) = call(
            "POST",
            &format!("{base}/v1/scopes"),
            &admin,
            Some(json!({"kind": "thread", "name": name, "parent_id": team_id})),
        );
        assert_eq!(status, 201, "{thread}");
    }
    let (status, service) = call(
        "POST",
        &format!("{base}/v1/orgs/{org_id}/tokens"),
        &admin,
        Some(json!({"principal": "svc", "kind": "service"})),
    );
    assert_eq!(status, 201, "{service}");
    let granted = call(
        "POST",
        &grants,
        &admin,
        Some(json!({"principal": "svc", "permission": "data:use", "scope_id": team_id})),
    );
    assert_eq!(granted.0, 201, "{}", granted.1);
    // When schemathesis runs as each of them, then it finds nothing
    schemathesis(dir.path(), &base, "admin", &admin, &org_id, &team_id);
    let service = service["token"].as_str().unwrap();
    schemathesis(dir.path(), &base, "service", service, &org_id, &team_id);
    // And the server is still there to answer
    let (status, _) = call("GET", &format!("{base}/readyz"), &admin, None);
    assert_eq!(status, 200);
}
