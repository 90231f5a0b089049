//! The command line against a running server: organizations, tokens, grants, and a
//! customer master key in AWS.

use super::*;

/// `ekm org master-key set|show` as a client of a real `ekm serve`, which finds AWS
/// credentials through the default chain (here: the standard environment variables) and
/// reaches a moto_server.
fn cli_master_key_set_shows_the_key_when_it_is_in_aws(backend: Backend) {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let moto = runtime.block_on(crate::kms_servers::Moto::start());
    let arn = runtime.block_on(moto.create_key());
    let test_db = runtime.block_on(TestDb::new(backend));
    let dir = test_db.data_dir();
    let server = serve_configured(
        dir,
        test_db.url.as_deref(),
        &[
            "--key-health-interval",
            "1s",
            "--kms-allowed-endpoints",
            "http://127.0.0.1:*",
        ],
        &[
            ("AWS_ACCESS_KEY_ID", "testing"),
            ("AWS_SECRET_ACCESS_KEY", "testing"),
            ("AWS_EC2_METADATA_DISABLED", "true"),
        ],
    );
    let operator = read_token(dir);
    let (status, org) = call(
        "POST",
        &format!("{}/v1/orgs", server.base),
        &operator,
        Some(json!({"name": "Acme", "plan": "enterprise", "tier": "managed"})),
    );
    assert_eq!(status, 201, "{org}");
    let org_id = org["id"].as_str().unwrap().to_owned();
    let admin = org["admin_token"].as_str().unwrap().to_owned();
    let client = |args: &[&str]| {
        Command::new(EKM)
            .args(["org", "master-key"])
            .args(args)
            .env("EKM_URL", &server.base)
            .env("EKM_TOKEN", &admin)
            .output()
            .unwrap()
    };

    let set = client(&[
        "set",
        &org_id,
        "--provider",
        "aws-kms",
        "--key-id",
        &arn,
        "--endpoint-url",
        &moto.url,
        "--reason",
        "BYOK go-live",
    ]);
    let stdout = String::from_utf8_lossy(&set.stdout);
    assert!(
        set.status.success(),
        "{stdout} {}",
        String::from_utf8_lossy(&set.stderr)
    );
    assert!(
        stdout.contains("aws-kms") && stdout.contains("byok"),
        "{stdout}"
    );

    let show = client(&["show", &org_id, "--json"]);
    assert!(show.status.success());
    let shown: Value = serde_json::from_slice(&show.stdout).unwrap();
    assert_eq!(shown["key_id"], arn.as_str());
    assert_eq!(shown["status"], "available");

    // A refusal: the problem goes to standard error and the exit code is 1.
    let refused = client(&[
        "set",
        &org_id,
        "--provider",
        "aws-kms",
        "--key-id",
        "not an arn",
    ]);
    assert_eq!(refused.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("invalid_request"));
    // The token never appears in the server's log.
    assert!(!server.log_text().contains(&admin));
    drop(server);
    drop(test_db);
    drop(runtime);
}

#[test]
fn cli_master_key_set_shows_the_key_when_it_is_in_aws_on_sqlite() {
    cli_master_key_set_shows_the_key_when_it_is_in_aws(Backend::Sqlite);
}

#[test]
fn cli_master_key_set_shows_the_key_when_it_is_in_aws_on_postgres() {
    cli_master_key_set_shows_the_key_when_it_is_in_aws(Backend::Postgres);
}

/// `ekm org create`, `ekm token create|list|revoke` and `ekm grant add|list|remove` as
/// clients of a real server, ending with the service token encrypting.
fn cli_org_token_and_grant_commands_succeed_when_run_in_order(backend: Backend) {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let test_db = runtime.block_on(TestDb::new(backend));
    let server = serve(test_db.data_dir(), test_db.url.as_deref());
    let operator = read_token(test_db.data_dir());
    let ekm = |token: &str, args: &[&str]| {
        let output = Command::new(EKM)
            .args(args)
            .env("EKM_URL", &server.base)
            .env("EKM_TOKEN", token)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
        (output.status.code(), stdout, stderr)
    };
    let json = |text: &str| -> Value { serde_json::from_str(text).unwrap() };

    let (code, out, err) = ekm(
        &operator,
        &[
            "org",
            "create",
            "--name",
            "Acme",
            "--plan",
            "enterprise",
            "--tier",
            "managed",
        ],
    );
    assert_eq!(code, Some(0), "{err}");
    let org = json(&out);
    let org_id = org["id"].as_str().unwrap().to_owned();
    let admin = org["admin_token"].as_str().unwrap().to_owned();

    let (code, out, err) = ekm(
        &admin,
        &["token", "create", &org_id, "--principal", "chat-service"],
    );
    assert_eq!(code, Some(0), "{err}");
    let issued = json(&out);
    let service = issued["token"].as_str().unwrap().to_owned();
    let token_id = issued["id"].as_str().unwrap().to_owned();

    let (status, scope) = call(
        "POST",
        &format!("{}/v1/scopes", server.base),
        &admin,
        Some(json!({"kind": "thread", "name": "t", "parent_id": org_id})),
    );
    assert_eq!(status, 201);
    let thread = scope["id"].as_str().unwrap().to_owned();
    let encrypt = |token: &str| {
        call(
            "POST",
            &format!("{}/v1/scopes/{thread}/encrypt", server.base),
            token,
            Some(json!({"plaintext": "aGk=", "class": "messages"})),
        )
    };
    assert_eq!(encrypt(&service).0, 403, "no grant yet");

    let (code, _, err) = ekm(
        &admin,
        &[
            "grant",
            "add",
            &org_id,
            "--principal",
            "chat-service",
            "--permission",
            "data:use",
        ],
    );
    assert_eq!(code, Some(0), "{err}");
    let (_, out, _) = ekm(&admin, &["grant", "list", &org_id]);
    assert_eq!(json(&out)["items"][0]["permission"], "data:use");
    assert_eq!(encrypt(&service).0, 200);

    let (code, _, err) = ekm(
        &admin,
        &[
            "grant",
            "remove",
            &org_id,
            "--principal",
            "chat-service",
            "--permission",
            "data:use",
        ],
    );
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(encrypt(&service).0, 403, "the grant is gone");

    let (_, out, _) = ekm(&admin, &["token", "list", &org_id]);
    let listed = json(&out);
    assert!(listed["items"]
        .as_array()
        .unwrap()
        .iter()
        .any(|t| t["id"] == token_id.as_str()));
    assert!(!out.contains(&service), "a list never shows a secret");
    let (code, _, err) = ekm(&admin, &["token", "revoke", &org_id, &token_id]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(
        encrypt(&service).0,
        401,
        "a revoked token stops working at once"
    );

    // Refusals exit 1 with the problem on standard error.
    let (code, _, err) = ekm(&service, &["grant", "list", &org_id]);
    assert_eq!(code, Some(1));
    assert!(err.contains("unauthorized"));
    // No token appears in the server's log.
    let log = server.log_text();
    for secret in [&operator, &admin, &service] {
        assert!(!log.contains(secret.as_str()));
    }
    drop(server);
    drop(test_db);
    drop(runtime);
}

#[test]
fn cli_org_token_and_grant_commands_succeed_when_run_in_order_on_sqlite() {
    cli_org_token_and_grant_commands_succeed_when_run_in_order(Backend::Sqlite);
}

#[test]
fn cli_org_token_and_grant_commands_succeed_when_run_in_order_on_postgres() {
    cli_org_token_and_grant_commands_succeed_when_run_in_order(Backend::Postgres);
}
