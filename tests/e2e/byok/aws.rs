//! AWS KMS through a real moto_server: connecting, health, refusals naming the failing
//! step, switching back, and every injected fault classified.

use super::*;

/// The story of issue 5: connect a moto-hosted key, encrypt and decrypt (old ciphertexts
/// included), then the customer disables the key (unavailable within two health
/// intervals, data plane fails closed) and enables it again (active again).
/// Successful calls to AWS KMS so far, as `/metrics` counts them (issue 19 §1); once there
/// are any, they are timed too.
async fn kms_ok_calls(app: &TestApp) -> f64 {
    let metrics = app
        .call("GET", "/metrics", Some(&app.operator_token), None)
        .await;
    let text = metrics.body.as_str().unwrap_or_default().to_owned();
    let timed = text.contains("ekm_kms_call_duration_seconds_bucket{provider=\"aws-kms\"");
    let calls = text
        .lines()
        .find_map(|line| {
            line.strip_prefix("ekm_kms_calls_total{provider=\"aws-kms\",outcome=\"ok\"} ")
        })
        .and_then(|value| value.trim().parse::<f64>().ok())
        .unwrap_or(0.0);
    assert!(calls == 0.0 || timed, "{text}");
    calls
}

async fn set_master_key_follows_its_health_when_the_key_is_in_aws(backend: Backend) {
    let moto = Moto::start().await;
    let arn = moto.create_key().await;
    let app = TestApp::spawn_with(
        backend,
        options(
            aws_environment(),
            Duration::from_secs(60),
            Duration::from_secs(300),
        ),
    )
    .await;
    let calls_before = kms_ok_calls(&app).await;
    let (org, token) = enterprise_org(&app).await;
    let thread = app.scope(&token, "thread", "incident", &org).await;
    let before = encrypt(&app, &token, &thread, "written under the platform key").await;
    assert_eq!(before.status, StatusCode::OK, "{}", before.body);
    let before = before.str("ciphertext");

    let connected = connect(
        &app,
        &token,
        &org,
        json!({"provider": "aws-kms", "key_id": arn, "endpoint_url": moto.url, "reason": "BYOK go-live"}),
    )
    .await;
    assert_eq!(connected.status, StatusCode::OK, "{}", connected.body);
    assert_eq!(connected.body["tier"], "byok");
    assert_eq!(connected.body["provider"], "aws-kms");
    assert_eq!(connected.body["region"], "us-east-1");
    assert_eq!(connected.body["status"], "available");
    assert_eq!(connected.body["changed"], true);

    // The organization's wrapping key is now wrapped by the customer's key, and the
    // platform key seals that ciphertext (ADR 0013): neither key alone opens it.
    let local =
        ekm_keys::LocalMasterKey::load(&app.data_dir().join(ekm_keys::MASTER_KEY_FILE), false)
            .unwrap()
            .unwrap();
    let rows = app.db.wrapping_keys(&org).await.unwrap();
    assert!(!rows.is_empty());
    for row in &rows {
        assert_eq!(
            row.master_fingerprint.as_deref(),
            Some(format!("aws-kms:{arn}+local:{}", local.fingerprint()).as_str())
        );
    }
    let context = WrapContext::wrapping_key(&org, rows[0].epoch);
    let binding = context.local_binding();
    assert!(local.unwrap_bound(&rows[0].wrapped, &binding).is_err());
    let customer = ekm_kms::provider_for(
        &ekm_domain::MasterKeyRef::parse(ekm_domain::Provider::AwsKms, &arn, None, Some(&moto.url))
            .unwrap(),
        &kms_settings(aws_environment()),
    )
    .await
    .unwrap();
    assert!(
        customer.unwrap(&rows[0].wrapped, context).await.is_err(),
        "the customer's key alone does not open it"
    );
    let inner = local.open_outer(&rows[0].wrapped, &binding).unwrap();
    assert_eq!(
        customer.unwrap(&inner, context).await.unwrap().len(),
        64,
        "both keys together do"
    );

    // Old ciphertexts keep working; new ones too.
    let opened = decrypt(&app, &token, &thread, &before).await;
    assert_eq!(opened.status, StatusCode::OK, "{}", opened.body);
    assert_eq!(plaintext(&opened), "written under the platform key");
    let after = encrypt(&app, &token, &thread, "written under byok").await;
    assert_eq!(after.status, StatusCode::OK, "{}", after.body);
    let after = after.str("ciphertext");

    // A new scope's key is wrapped under the organization key, unwrapped through KMS; the
    // calls to AWS KMS are counted and timed (issue 19 §1).
    let team = app.scope(&token, "team", "research", &org).await;
    assert_eq!(
        encrypt(&app, &token, &team, "x").await.status,
        StatusCode::OK
    );
    assert!(kms_ok_calls(&app).await > calls_before);

    // The customer disables the key.
    moto.disable(&arn).await;
    let disabled = Instant::now();
    wait_for_state(&app, &token, &thread, "unavailable").await;
    // Within two health intervals, as issue 5 asks: this bound is the behaviour (the
    // monitor's promise), so it is kept; the wait itself ends on the event.
    assert!(
        disabled.elapsed() <= 2 * HEALTH_INTERVAL,
        "unavailable only after {:?}",
        disabled.elapsed()
    );
    let scope = app.get(&format!("/v1/scopes/{thread}"), &token).await;
    assert_eq!(scope.body["cause"]["scope_id"], org);
    assert_eq!(
        scope.body["cause"]["event"],
        "OrganizationMasterKeyHealthChanged"
    );
    let refused = decrypt(&app, &token, &thread, &after).await;
    assert_eq!(
        refused.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{}",
        refused.body
    );
    assert_eq!(refused.body["code"], "key_unavailable");
    assert_eq!(refused.body["cause"]["reason"], "disabled");
    let refused = encrypt(&app, &token, &thread, "no").await;
    assert_eq!(refused.body["code"], "key_unavailable");
    let shown = app.get(&format!("/v1/orgs/{org}/master-key"), &token).await;
    assert_eq!(shown.body["status"], "unavailable");
    assert_eq!(shown.body["reason"], "disabled");
    assert_eq!(shown.body["last_check"]["ok"], false);

    // Auditors see who did what: the connection by the admin, the health change by the
    // system.
    let audit = app.get(&format!("/v1/audit?org={org}"), &token).await;
    let items = audit.body["items"].as_array().unwrap();
    let connected_entry = items
        .iter()
        .find(|e| e["action"] == "org.master_key")
        .unwrap();
    assert_eq!(connected_entry["actor_kind"], "user");
    let health_entry = items
        .iter()
        .find(|e| e["action"] == "org.master_key_health")
        .unwrap();
    assert_eq!(health_entry["actor_kind"], "system");
    assert!(
        health_entry["actor"]
            .as_str()
            .unwrap()
            .contains("key-health-monitor"),
        "{health_entry}"
    );

    // The customer enables it again: recovery is automatic.
    moto.enable(&arn).await;
    wait_for_state(&app, &token, &thread, "active").await;
    let opened = decrypt(&app, &token, &thread, &after).await;
    assert_eq!(opened.status, StatusCode::OK, "{}", opened.body);
    assert_eq!(plaintext(&opened), "written under byok");
    let shown = app.get(&format!("/v1/orgs/{org}/master-key"), &token).await;
    assert_eq!(shown.body["status"], "available");
    assert_eq!(shown.body["last_check"]["ok"], true);
}
on_both_backends!(set_master_key_follows_its_health_when_the_key_is_in_aws);

async fn set_master_key_names_the_failing_step_when_the_key_cannot_be_used(backend: Backend) {
    let moto = Moto::start().await;
    let app = TestApp::spawn_with(
        backend,
        options(
            aws_environment(),
            Duration::from_secs(60),
            Duration::from_secs(300),
        ),
    )
    .await;
    let (org, token) = enterprise_org(&app).await;

    // A key that does not exist.
    let missing = "arn:aws:kms:us-east-1:123456789012:key/00000000-0000-4000-8000-000000000000";
    let refused = connect(
        &app,
        &token,
        &org,
        json!({"provider": "aws-kms", "key_id": missing, "endpoint_url": moto.url}),
    )
    .await;
    assert_eq!(
        refused.status,
        StatusCode::UNPROCESSABLE_ENTITY,
        "{}",
        refused.body
    );
    assert_eq!(refused.body["code"], "master_key_unusable");
    assert_eq!(refused.body["provider_error"]["step"], "describe");
    assert_eq!(refused.body["provider_error"]["kind"], "not_found");
    assert_eq!(refused.body["provider_error"]["code"], "NotFoundException");
    assert!(refused.body["provider_error"]["remedy"]
        .as_str()
        .unwrap()
        .contains("key id"));

    // A disabled key.
    let arn = moto.create_key().await;
    moto.disable(&arn).await;
    let refused = connect(
        &app,
        &token,
        &org,
        json!({"provider": "aws-kms", "key_id": arn, "endpoint_url": moto.url}),
    )
    .await;
    assert_eq!(
        refused.status,
        StatusCode::UNPROCESSABLE_ENTITY,
        "{}",
        refused.body
    );
    assert_eq!(refused.body["provider_error"]["kind"], "disabled");

    // An endpoint nobody answers on.
    let closed = {
        let socket = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        socket.local_addr().unwrap().port()
    };
    let refused = connect(&app, &token, &org, json!({"provider": "aws-kms", "key_id": arn, "endpoint_url": format!("http://127.0.0.1:{closed}")})).await;
    assert_eq!(refused.status, StatusCode::BAD_GATEWAY, "{}", refused.body);
    assert_eq!(refused.body["code"], "master_key_unusable");
    assert_eq!(refused.body["provider_error"]["kind"], "unreachable");

    // An endpoint the operator did not allow is refused before any call: the platform's
    // credentials would go there.
    let refused = connect(
        &app,
        &token,
        &org,
        json!({"provider": "aws-kms", "key_id": arn, "endpoint_url": "https://kms.evil.example"}),
    )
    .await;
    assert_eq!(refused.status, StatusCode::BAD_REQUEST, "{}", refused.body);
    assert_eq!(refused.body["code"], "invalid_request");
    assert!(refused.body["detail"]
        .as_str()
        .unwrap()
        .contains("endpoint_url"));

    // Malformed requests never reach a KMS.
    for body in [
        json!({"provider": "aws-kms", "key_id": "not an arn"}),
        json!({"provider": "aws-kms", "key_id": arn, "region": "eu-west-1"}),
        json!({"provider": "hsm", "key_id": "x"}),
        json!({"provider": "gcp-kms", "key_id": "projects/p"}),
        json!({"provider": "azure-keyvault", "key_id": "https://kms.evil.example/keys/k"}),
        json!({"provider": "local", "key_id": "x"}),
        json!({"provider": "aws-kms", "key_id": arn, "extra": 1}),
    ] {
        let refused = connect(&app, &token, &org, body.clone()).await;
        assert_eq!(
            refused.status,
            StatusCode::BAD_REQUEST,
            "{body}: {}",
            refused.body
        );
        assert_eq!(refused.body["code"], "invalid_request");
        assert_eq!(refused.content_type, "application/problem+json");
    }

    // A standard organization cannot bring its own key.
    let (standard, standard_token) = app.org("standard").await;
    let refused = connect(
        &app,
        &standard_token,
        &standard,
        json!({"provider": "aws-kms", "key_id": arn, "endpoint_url": moto.url}),
    )
    .await;
    assert_eq!(refused.status, StatusCode::FORBIDDEN, "{}", refused.body);
    assert_eq!(refused.body["code"], "plan_required");

    // Another organization's admin sees nothing.
    let refused = connect(&app, &standard_token, &org, json!({"provider": "local"})).await;
    assert_eq!(refused.status, StatusCode::NOT_FOUND);

    // Nothing was recorded.
    let shown = app.get(&format!("/v1/orgs/{org}/master-key"), &token).await;
    assert_eq!(shown.body["provider"], "local");
    assert_eq!(shown.body["tier"], "managed");
}
on_both_backends!(set_master_key_names_the_failing_step_when_the_key_cannot_be_used);

async fn set_master_key_keeps_data_readable_when_switching_back_or_rotating(backend: Backend) {
    let moto = Moto::start().await;
    let arn = moto.create_key().await;
    let app = TestApp::spawn_with(
        backend,
        options(
            aws_environment(),
            Duration::from_secs(60),
            Duration::from_secs(300),
        ),
    )
    .await;
    let (org, token) = enterprise_org(&app).await;
    let thread = app.scope(&token, "thread", "t", &org).await;
    let first = encrypt(&app, &token, &thread, "one")
        .await
        .str("ciphertext");
    let body = json!({"provider": "aws-kms", "key_id": arn, "endpoint_url": moto.url});
    assert_eq!(
        connect(&app, &token, &org, body.clone()).await.status,
        StatusCode::OK
    );
    // Connecting the same key again records nothing.
    let again = connect(&app, &token, &org, body).await;
    assert_eq!(again.body["changed"], false);

    // Rotating the organization key under byok puts the new version under the wrapping key
    // the customer key wraps.
    let rotated = app
        .post(&format!("/v1/scopes/{org}/rotate"), &token, json!({}))
        .await;
    assert_eq!(rotated.status, StatusCode::OK, "{}", rotated.body);
    assert_eq!(rotated.body["key_versions"].as_array().unwrap().len(), 2);
    let rows = app.db.wrapping_keys(&org).await.unwrap();
    assert_eq!(rows.len(), 1);
    assert!(rows.iter().all(|r| r
        .master_fingerprint
        .as_deref()
        .is_some_and(|m| m.starts_with(&format!("aws-kms:{arn}+local:")))));
    let kms_before = app.app.keys().kms_call_count();

    // Back to the platform key, through the tier.
    let back = app
        .call(
            "PUT",
            &format!("/v1/orgs/{org}/tier"),
            Some(&token),
            Some(json!({"tier": "managed"})),
        )
        .await;
    assert_eq!(back.status, StatusCode::OK, "{}", back.body);
    assert_eq!(back.body["tier"], "managed");
    let local =
        ekm_keys::LocalMasterKey::load(&app.data_dir().join(ekm_keys::MASTER_KEY_FILE), false)
            .unwrap()
            .unwrap();
    let rows = app.db.wrapping_keys(&org).await.unwrap();
    assert!(!rows.is_empty());
    for row in &rows {
        assert_eq!(
            row.master_fingerprint.as_deref(),
            Some(local.fingerprint().as_str())
        );
        let binding = ekm_kms::WrapContext::wrapping_key(&org, row.epoch).local_binding();
        assert!(local.unwrap_bound(&row.wrapped, &binding).is_ok());
    }
    assert!(app.app.keys().kms_call_count() > kms_before);
    // The customer's key can go away now: nothing needs it.
    moto.disable(&arn).await;
    let opened = decrypt(&app, &token, &thread, &first).await;
    assert_eq!(opened.status, StatusCode::OK, "{}", opened.body);
    assert_eq!(plaintext(&opened), "one");
    let shown = app.get(&format!("/v1/orgs/{org}/master-key"), &token).await;
    assert_eq!(shown.body["provider"], "local");
}
on_both_backends!(set_master_key_keeps_data_readable_when_switching_back_or_rotating);

/// moto ignores key state for crypto: a proxy answers with the errors AWS documents, and
/// every one is classified as the customer's decision or an outage.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aws_unwrap_names_the_fault_when_one_is_injected() {
    let moto = Moto::start().await;
    let arn = moto.create_key().await;
    let (proxy, faults) = aws_fault_proxy(&moto.url).await;
    let key =
        ekm_domain::MasterKeyRef::parse(ekm_domain::Provider::AwsKms, &arn, None, Some(&proxy))
            .unwrap();
    let provider = ekm_kms::provider_for(&key, &kms_settings(aws_environment()))
        .await
        .unwrap();
    let context = WrapContext::key_version("org-1", 1);
    let secret = [9u8; 64];
    let wrapped = provider.wrap(&secret, context).await.unwrap();
    assert_eq!(
        provider.unwrap(&wrapped, context).await.unwrap().as_slice(),
        &secret
    );
    // The encryption context binds the organization.
    let other = WrapContext::key_version("org-2", 1);
    assert_eq!(
        provider.unwrap(&wrapped, other).await.unwrap_err().kind,
        FailureKind::InvalidCiphertext
    );

    let cases = [
        (
            "Decrypt",
            aws_error("DisabledException", "arn is disabled."),
            FailureKind::Disabled,
        ),
        (
            "Decrypt",
            aws_error("KMSInvalidStateException", "arn is pending deletion."),
            FailureKind::PendingDeletion,
        ),
        (
            "Encrypt",
            aws_error(
                "AccessDeniedException",
                "User is not authorized to perform: kms:Encrypt",
            ),
            FailureKind::AccessDenied,
        ),
        (
            "DescribeKey",
            aws_error("NotFoundException", "Key not found"),
            FailureKind::NotFound,
        ),
        (
            "Decrypt",
            aws_error("ThrottlingException", "Rate exceeded"),
            FailureKind::Throttled,
        ),
        (
            "Decrypt",
            Fault::Answer(500, json!({"__type": "KMSInternalException"})),
            FailureKind::ProviderFault,
        ),
        (
            "Decrypt",
            Fault::Stall(Duration::from_secs(3)),
            FailureKind::Timeout,
        ),
    ];
    for (operation, fault, expected) in cases {
        faults.clear();
        faults.arm(operation, fault, usize::MAX);
        let seen_before = faults.seen(operation);
        let error = match operation {
            "Encrypt" => provider.wrap(&secret, context).await.map(|_| ()),
            "Decrypt" => provider.unwrap(&wrapped, context).await.map(|_| ()),
            _ => provider.describe().await.map(|_| ()),
        }
        .unwrap_err();
        assert_eq!(error.kind, expected, "{operation}: {error}");
        let attempts = faults.seen(operation) - seen_before;
        if expected.is_transient() {
            assert_eq!(attempts, 3, "{expected:?} is retried");
        } else {
            assert_eq!(
                attempts, 1,
                "{expected:?} is the customer's decision: not retried"
            );
            assert!(
                expected.customer_reason().is_some() || expected == FailureKind::InvalidCiphertext
            );
        }
    }

    // Throttled twice, then answered: the caller never notices.
    faults.clear();
    faults.arm(
        "Decrypt",
        aws_error("ThrottlingException", "Rate exceeded"),
        2,
    );
    assert_eq!(
        provider.unwrap(&wrapped, context).await.unwrap().as_slice(),
        &secret
    );

    // moto's own DescribeKey state after DisableKey.
    faults.clear();
    moto.disable(&arn).await;
    assert_eq!(provider.describe().await.unwrap(), KeyState::Disabled);
    moto.kms(
        "ScheduleKeyDeletion",
        json!({"KeyId": Moto::key_id(&arn), "PendingWindowInDays": 7}),
    )
    .await;
    assert_eq!(
        provider.describe().await.unwrap(),
        KeyState::PendingDeletion
    );
}

/// `ekm doctor` checks each connected customer key's endpoint: allowed by the servers'
/// `--kms-allowed-endpoints`, and accepting connections (issue 19 §5).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn doctor_checks_a_customer_keys_endpoint_allowed_and_reachable() {
    let moto = Moto::start().await;
    let arn = moto.create_key().await;
    let app = TestApp::spawn_with(
        Backend::Sqlite,
        options(
            aws_environment(),
            Duration::from_secs(60),
            Duration::from_secs(300),
        ),
    )
    .await;
    let (org, token) = enterprise_org(&app).await;
    let connected = connect(
        &app,
        &token,
        &org,
        json!({"provider": "aws-kms", "key_id": arn, "endpoint_url": moto.url, "reason": "BYOK"}),
    )
    .await;
    assert_eq!(connected.status, StatusCode::OK, "{}", connected.body);
    app.app.refresh().await.unwrap();
    let doctor = |allowed: &[&str]| {
        let mut args = vec!["doctor", "--json"];
        args.extend_from_slice(allowed);
        let output = app.ekm(&args).output().unwrap();
        let report: Value = serde_json::from_slice(&output.stdout).unwrap();
        let kms: Vec<Value> = report["checks"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|c| c["check"] == "kms endpoint")
            .cloned()
            .collect();
        (output.status.code(), kms)
    };
    let allow = ["--kms-allowed-endpoints", "http://127.0.0.1:*"];
    let (code, kms) = doctor(&allow);
    assert_eq!(code, Some(0), "{kms:?}");
    assert_eq!(kms.len(), 1);
    assert_eq!(kms[0]["status"], "ok", "{kms:?}");
    let (code, kms) = doctor(&[]);
    assert_eq!(code, Some(1));
    assert!(
        kms[0]["detail"]
            .as_str()
            .unwrap()
            .contains("is not allowed"),
        "{kms:?}"
    );
    drop(moto);
    let (code, kms) = doctor(&allow);
    assert_eq!(code, Some(1));
    assert_eq!(kms[0]["status"], "fail", "{kms:?}");
    app.stop().await;
}
