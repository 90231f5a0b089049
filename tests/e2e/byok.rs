//! BYOK: an enterprise organization connects its own master key (AWS KMS through a real
//! moto_server; Google Cloud KMS and Azure Key Vault through wire-level fakes), keeps
//! encrypting and decrypting, and the health monitor follows the customer's decisions.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use ekm_kms::{
    Environment, FailureKind, KeyState, KmsSettings, MasterKeyProvider, Operation, WrapContext,
};
use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::harness::{Backend, Options, TestApp};
use crate::kms_servers::{
    aws_environment, aws_error, aws_fault_proxy, azure_fault, fake_azure, fake_gcp, gcp_fault,
    Fault, Moto,
};
use crate::on_both_backends;

const HEALTH_INTERVAL: Duration = Duration::from_secs(1);

fn kms_settings(environment: Environment) -> KmsSettings {
    KmsSettings {
        timeout: Duration::from_millis(800),
        attempts: 3,
        backoff: Duration::from_millis(20),
        environment,
        // Every test server here is on loopback.
        allowed_endpoints: vec!["http://127.0.0.1:*".into()],
    }
}

pub(crate) fn options(environment: Environment, grace: Duration, cache_ttl: Duration) -> Options {
    Options {
        key_cache_ttl: cache_ttl,
        kms: ekm_service::keys::KmsOptions {
            settings: kms_settings(environment),
            grace,
            platform_key: None,
        },
        health_interval: Some(HEALTH_INTERVAL),
        ..Options::default()
    }
}

async fn enterprise_org(app: &TestApp) -> (String, String) {
    app.data_org("enterprise", "managed").await
}

pub(crate) async fn connect(
    app: &TestApp,
    token: &str,
    org: &str,
    body: Value,
) -> crate::harness::Response {
    app.call(
        "PUT",
        &format!("/v1/orgs/{org}/master-key"),
        Some(token),
        Some(body),
    )
    .await
}

async fn encrypt(app: &TestApp, token: &str, scope: &str, text: &str) -> crate::harness::Response {
    use base64::Engine;
    app.post(
        &format!("/v1/scopes/{scope}/encrypt"),
        token,
        json!({"plaintext": base64::engine::general_purpose::STANDARD.encode(text), "class": "messages"}),
    )
    .await
}

async fn decrypt(
    app: &TestApp,
    token: &str,
    scope: &str,
    ciphertext: &str,
) -> crate::harness::Response {
    app.post(
        &format!("/v1/scopes/{scope}/decrypt"),
        token,
        json!({"ciphertext": ciphertext, "class": "messages"}),
    )
    .await
}

fn plaintext(response: &crate::harness::Response) -> String {
    use base64::Engine;
    String::from_utf8(
        base64::engine::general_purpose::STANDARD
            .decode(response.str("plaintext"))
            .unwrap(),
    )
    .unwrap()
}

/// How long a test waits for an event before it fails. Only a failure waits this long:
/// every wait below ends on the event itself, so a busy machine is slower, not red.
const NO_EVENT_FOR: Duration = Duration::from_secs(60);

/// Waits until the scope's effective state is `wanted`, looking again each time the
/// projector applies an event (a health verdict is recorded as one, and this instance's
/// memory has it before the projector does).
async fn wait_for_state(app: &TestApp, token: &str, scope: &str, wanted: &str) {
    let mut applied = app.app.projector().subscribe();
    loop {
        applied.borrow_and_update();
        let response = app.get(&format!("/v1/scopes/{scope}"), token).await;
        if response.body["effective_state"] == wanted {
            return;
        }
        assert!(
            tokio::time::timeout(NO_EVENT_FOR, applied.changed())
                .await
                .is_ok_and(|changed| changed.is_ok()),
            "still {} and no event for {NO_EVENT_FOR:?}, wanted {wanted}",
            response.body["effective_state"]
        );
    }
}

/// The story of issue 5: connect a moto-hosted key, encrypt and decrypt (old ciphertexts
/// included), then the customer disables the key (unavailable within two health
/// intervals, data plane fails closed) and enables it again (active again).
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

    // A new scope's key is wrapped under the organization key, unwrapped through KMS.
    let team = app.scope(&token, "team", "research", &org).await;
    assert_eq!(
        encrypt(&app, &token, &team, "x").await.status,
        StatusCode::OK
    );

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

/// An outage is not the customer's decision: cached organization keys keep serving for the
/// grace period, after which the monitor records `unavailable` (unreachable) and requests
/// fail closed; the KMS answering again brings the organization back.
async fn decrypt_fails_closed_after_the_grace_period_when_the_kms_is_out(backend: Backend) {
    let moto = Moto::start().await;
    let arn = moto.create_key().await;
    let (proxy, faults) = aws_fault_proxy(&moto.url).await;
    let grace = Duration::from_secs(2);
    let app = TestApp::spawn_with(
        backend,
        options(aws_environment(), grace, Duration::from_millis(300)),
    )
    .await;
    let (org, token) = enterprise_org(&app).await;
    let thread = app.scope(&token, "thread", "t", &org).await;
    let connected = connect(
        &app,
        &token,
        &org,
        json!({"provider": "aws-kms", "key_id": arn, "endpoint_url": proxy}),
    )
    .await;
    assert_eq!(connected.status, StatusCode::OK, "{}", connected.body);
    let sealed = encrypt(&app, &token, &thread, "during an outage")
        .await
        .str("ciphertext");

    // KMS stops answering.
    let outage = Instant::now();
    faults.arm(
        "*",
        aws_error("ServiceUnavailable", "the service is unavailable"),
        usize::MAX,
    );
    // Past the cache TTL but within the grace period, the cached organization key serves.
    // This sleep is the behaviour under test (the TTL has to pass), not synchronisation.
    tokio::time::sleep(Duration::from_millis(400)).await;
    let opened = decrypt(&app, &token, &thread, &sealed).await;
    assert_eq!(opened.status, StatusCode::OK, "{}", opened.body);
    assert_eq!(
        app.get(&format!("/v1/scopes/{thread}"), &token).await.body["effective_state"],
        "active"
    );

    // After the grace period the monitor records the outage, and requests fail closed.
    wait_for_state(&app, &token, &thread, "unavailable").await;
    // A lower bound (not before the grace period is over): a busy machine cannot break it.
    assert!(
        outage.elapsed() >= grace,
        "recorded after {:?}",
        outage.elapsed()
    );
    let shown = app.get(&format!("/v1/orgs/{org}/master-key"), &token).await;
    assert_eq!(shown.body["reason"], "unreachable");
    assert_eq!(
        decrypt(&app, &token, &thread, &sealed).await.body["code"],
        "key_unavailable"
    );

    // KMS is back.
    faults.clear();
    wait_for_state(&app, &token, &thread, "active").await;
    assert_eq!(
        decrypt(&app, &token, &thread, &sealed).await.status,
        StatusCode::OK
    );
}
on_both_backends!(decrypt_fails_closed_after_the_grace_period_when_the_kms_is_out);

/// A customer who removes the platform's permission to decrypt (DescribeKey still works):
/// the first failed unwrap makes the monitor check at once, and the organization is
/// unavailable with the reason, without waiting for the interval.
async fn decrypt_triggers_a_health_check_at_once_when_the_unwrap_fails(backend: Backend) {
    let moto = Moto::start().await;
    let arn = moto.create_key().await;
    let (proxy, faults) = aws_fault_proxy(&moto.url).await;
    // No key caching at all: the decrypt below must reach KMS. (A 1 ms cache made this test
    // flaky: a decrypt served within a millisecond of the encrypt used the cached key.)
    let mut options = options(aws_environment(), Duration::from_secs(60), Duration::ZERO);
    options.health_interval = Some(Duration::from_secs(3600));
    let app = TestApp::spawn_with(backend, options).await;
    let (org, token) = enterprise_org(&app).await;
    let thread = app.scope(&token, "thread", "t", &org).await;
    assert_eq!(
        connect(
            &app,
            &token,
            &org,
            json!({"provider": "aws-kms", "key_id": arn, "endpoint_url": proxy})
        )
        .await
        .status,
        StatusCode::OK
    );
    let sealed = encrypt(&app, &token, &thread, "x").await.str("ciphertext");
    faults.arm(
        "Decrypt",
        aws_error(
            "AccessDeniedException",
            "not authorized to perform kms:Decrypt",
        ),
        usize::MAX,
    );
    let refused = decrypt(&app, &token, &thread, &sealed).await;
    assert_eq!(
        refused.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{}",
        refused.body
    );
    assert_eq!(refused.body["code"], "key_unavailable");
    assert_eq!(refused.body["provider_error"]["kind"], "access_denied");
    wait_for_state(&app, &token, &thread, "unavailable").await;
    let shown = app.get(&format!("/v1/orgs/{org}/master-key"), &token).await;
    assert_eq!(shown.body["reason"], "access_denied");
}
on_both_backends!(decrypt_triggers_a_health_check_at_once_when_the_unwrap_fails);

/// Warm cache: no KMS call per data-plane request.
async fn decrypt_calls_kms_zero_times_when_the_cache_is_warm(backend: Backend) {
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
    let threads = [
        app.scope(&token, "thread", "a", &org).await,
        app.scope(&token, "thread", "b", &org).await,
    ];
    assert_eq!(
        connect(
            &app,
            &token,
            &org,
            json!({"provider": "aws-kms", "key_id": arn, "endpoint_url": moto.url})
        )
        .await
        .status,
        StatusCode::OK
    );
    // Cold: the first request of each scope; the organization key is unwrapped once.
    let before = app.app.keys().kms_call_count();
    for thread in &threads {
        assert_eq!(
            encrypt(&app, &token, thread, "warm-up").await.status,
            StatusCode::OK
        );
    }
    assert_eq!(
        app.app.keys().kms_call_count() - before,
        1,
        "one unwrap for both scopes"
    );
    let warm = app.app.keys().kms_call_count();
    for i in 0..500 {
        let thread = &threads[i % 2];
        let sealed = encrypt(&app, &token, thread, "hello")
            .await
            .str("ciphertext");
        assert_eq!(
            decrypt(&app, &token, thread, &sealed).await.status,
            StatusCode::OK
        );
    }
    assert_eq!(
        app.app.keys().kms_call_count(),
        warm,
        "0 KMS calls for 1,000 warm requests"
    );
}
on_both_backends!(decrypt_calls_kms_zero_times_when_the_cache_is_warm);

// ---------------------------------------------------------------------------------------
// Google Cloud KMS and Azure Key Vault, over HTTP against fakes of their documented APIs.

const GCP_KEY: &str = "projects/acme/locations/europe-west1/keyRings/ekm/cryptoKeys/org";

fn env(pairs: &[(&str, &str)]) -> Environment {
    Environment::from_map(
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect::<HashMap<_, _>>(),
    )
}

async fn gcp_provider(
    url: &str,
    environment: Environment,
) -> std::sync::Arc<dyn MasterKeyProvider> {
    let key =
        ekm_domain::MasterKeyRef::parse(ekm_domain::Provider::GcpKms, GCP_KEY, None, Some(url))
            .unwrap();
    ekm_kms::provider_for(&key, &kms_settings(environment))
        .await
        .unwrap()
}

#[tokio::test]
async fn gcp_wrap_round_trips_when_credentials_come_from_the_metadata_server() {
    let (url, fake) = fake_gcp(GCP_KEY).await;
    let host = url.trim_start_matches("http://").to_owned();
    let provider = gcp_provider(&url, env(&[("GCE_METADATA_HOST", &host)])).await;
    let context = WrapContext::key_version("org-1", 3);
    let secret = [5u8; 64];
    let wrapped = provider.wrap(&secret, context).await.unwrap();
    assert_ne!(&wrapped[..], &secret[..]);
    assert_eq!(
        provider.unwrap(&wrapped, context).await.unwrap().as_slice(),
        &secret
    );
    assert_eq!(provider.describe().await.unwrap(), KeyState::Enabled);
    // The additional authenticated data binds the organization and version.
    let moved = WrapContext::key_version("org-2", 3);
    assert_eq!(
        provider.unwrap(&wrapped, moved).await.unwrap_err().kind,
        FailureKind::InvalidCiphertext
    );
    // One token, from the metadata server, asked for the Cloud KMS scope, then cached.
    let tokens = fake.token_requests();
    assert_eq!(tokens.len(), 1);
    assert!(tokens[0].0.starts_with("/computeMetadata/"));
    assert_eq!(
        tokens[0].1.get("scopes").map(String::as_str),
        Some("https://www.googleapis.com/auth/cloudkms")
    );
}

#[tokio::test]
async fn gcp_wrap_round_trips_when_credentials_come_from_a_service_account_file() {
    let (url, fake) = fake_gcp(GCP_KEY).await;
    let dir = tempfile::tempdir().unwrap();
    let pem_path = dir.path().join("key.pem");
    let generated = std::process::Command::new("openssl")
        .args([
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
            "-out",
        ])
        .arg(&pem_path)
        .output()
        .expect("openssl");
    assert!(generated.status.success());
    let pem = std::fs::read_to_string(&pem_path).unwrap();
    let file = dir.path().join("sa.json");
    std::fs::write(
        &file,
        json!({
            "type": "service_account",
            "client_email": "ekm@acme.iam.gserviceaccount.com",
            "private_key": pem,
            "token_uri": format!("{url}/token"),
        })
        .to_string(),
    )
    .unwrap();
    let provider = gcp_provider(
        &url,
        env(&[("GOOGLE_APPLICATION_CREDENTIALS", file.to_str().unwrap())]),
    )
    .await;
    assert_eq!(provider.describe().await.unwrap(), KeyState::Enabled);
    let tokens = fake.token_requests();
    assert_eq!(tokens.len(), 1);
    let form = &tokens[0].1;
    assert_eq!(
        form["grant_type"],
        "urn:ietf:params:oauth:grant-type:jwt-bearer"
    );
    // The assertion is an RS256 JWT naming the service account, the scope and the audience.
    let parts: Vec<&str> = form["assertion"].split('.').collect();
    assert_eq!(parts.len(), 3);
    use base64::Engine;
    let header: Value = serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(parts[0])
            .unwrap(),
    )
    .unwrap();
    let claims: Value = serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(parts[1])
            .unwrap(),
    )
    .unwrap();
    assert_eq!(header["alg"], "RS256");
    assert_eq!(claims["iss"], "ekm@acme.iam.gserviceaccount.com");
    assert_eq!(claims["aud"], format!("{url}/token"));
    assert_eq!(claims["scope"], "https://www.googleapis.com/auth/cloudkms");
}

#[tokio::test]
async fn gcp_unwrap_names_the_fault_when_it_fails() {
    let (url, fake) = fake_gcp(GCP_KEY).await;
    let provider = gcp_provider(&url, env(&[("GOOGLE_OAUTH_ACCESS_TOKEN", "not-issued")])).await;
    // A token the server never issued.
    let error = provider.describe().await.unwrap_err();
    assert_eq!(error.kind, FailureKind::Unauthenticated);
    assert_eq!(error.code, "UNAUTHENTICATED");

    let host = url.trim_start_matches("http://").to_owned();
    let provider = gcp_provider(&url, env(&[("GCE_METADATA_HOST", &host)])).await;
    let context = WrapContext::key_version("org-1", 1);
    let wrapped = provider.wrap(&[1u8; 64], context).await.unwrap();

    fake.set_state("DISABLED");
    assert_eq!(provider.describe().await.unwrap(), KeyState::Disabled);
    let error = provider.unwrap(&wrapped, context).await.unwrap_err();
    assert_eq!(
        (error.kind, error.operation),
        (FailureKind::Disabled, Operation::Decrypt)
    );
    fake.set_state("DESTROY_SCHEDULED");
    assert_eq!(
        provider.describe().await.unwrap(),
        KeyState::PendingDeletion
    );
    assert_eq!(
        provider.wrap(&[1u8; 64], context).await.unwrap_err().kind,
        FailureKind::PendingDeletion
    );
    fake.set_state("ENABLED");

    let cases = [
        (
            "decrypt",
            gcp_fault(
                403,
                "PERMISSION_DENIED",
                "Permission 'cloudkms.cryptoKeyVersions.useToDecrypt' denied on resource",
            ),
            FailureKind::AccessDenied,
            1,
        ),
        (
            "get",
            gcp_fault(404, "NOT_FOUND", "CryptoKey not found."),
            FailureKind::NotFound,
            1,
        ),
        (
            "decrypt",
            gcp_fault(429, "RESOURCE_EXHAUSTED", "Quota exceeded"),
            FailureKind::Throttled,
            3,
        ),
        (
            "encrypt",
            gcp_fault(503, "UNAVAILABLE", "The service is currently unavailable."),
            FailureKind::ProviderFault,
            3,
        ),
        (
            "get",
            Fault::Stall(Duration::from_secs(3)),
            FailureKind::Timeout,
            3,
        ),
    ];
    for (operation, fault, expected, attempts) in cases {
        fake.faults().clear();
        fake.faults().arm(operation, fault, usize::MAX);
        let before = fake.faults().seen(operation);
        let error = match operation {
            "encrypt" => provider.wrap(&[1u8; 64], context).await.map(|_| ()),
            "decrypt" => provider.unwrap(&wrapped, context).await.map(|_| ()),
            _ => provider.describe().await.map(|_| ()),
        }
        .unwrap_err();
        assert_eq!(error.kind, expected, "{operation}: {error}");
        assert_eq!(
            fake.faults().seen(operation) - before,
            attempts,
            "{operation} {expected:?}"
        );
    }
    // Throttled once, then answered.
    fake.faults().clear();
    fake.faults().arm(
        "decrypt",
        gcp_fault(429, "RESOURCE_EXHAUSTED", "Quota exceeded"),
        1,
    );
    assert_eq!(
        provider.unwrap(&wrapped, context).await.unwrap().as_slice(),
        &[1u8; 64]
    );
}

fn azure_key(url: &str) -> (ekm_domain::MasterKeyRef, String) {
    let key_url = "https://acme.vault.azure.net/keys/ekm-org".to_owned();
    (
        ekm_domain::MasterKeyRef::parse(
            ekm_domain::Provider::AzureKeyVault,
            &key_url,
            None,
            Some(url),
        )
        .unwrap(),
        key_url,
    )
}

#[tokio::test]
async fn azure_wrap_round_trips_when_signed_in_as_a_service_principal() {
    let (url, fake) = fake_azure("ekm-org").await;
    let (key, _) = azure_key(&url);
    let environment = env(&[
        ("AZURE_TENANT_ID", "tenant-1"),
        ("AZURE_CLIENT_ID", "client-1"),
        ("AZURE_CLIENT_SECRET", "secret-1"),
        ("AZURE_AUTHORITY_HOST", &url),
    ]);
    let provider = ekm_kms::provider_for(&key, &kms_settings(environment))
        .await
        .unwrap();
    let context = WrapContext::key_version("org-1", 2);
    let secret = [3u8; 64];
    let wrapped = provider.wrap(&secret, context).await.unwrap();
    // The blob names the key version that wrapped it.
    assert!(String::from_utf8(wrapped.clone())
        .unwrap()
        .starts_with("azkv1:v1:"));
    assert_eq!(
        provider.unwrap(&wrapped, context).await.unwrap().as_slice(),
        &secret
    );
    // Key Vault has no encryption context: the binding inside the value refuses a move.
    let moved = WrapContext::key_version("org-2", 2);
    assert_eq!(
        provider.unwrap(&wrapped, moved).await.unwrap_err().kind,
        FailureKind::InvalidCiphertext
    );
    let tokens = fake.token_requests();
    assert_eq!(tokens.len(), 1);
    assert_eq!(tokens[0].0, "/tenant-1/oauth2/v2.0/token");
    assert_eq!(tokens[0].1["grant_type"], "client_credentials");
    assert_eq!(tokens[0].1["scope"], "https://vault.azure.net/.default");
    assert_eq!(tokens[0].1["client_secret"], "secret-1");
}

#[tokio::test]
async fn azure_unwrap_names_the_fault_when_it_fails_with_managed_identity() {
    let (url, fake) = fake_azure("ekm-org").await;
    let (key, _) = azure_key(&url);
    let environment = env(&[
        ("IDENTITY_ENDPOINT", &format!("{url}/msi/token")),
        ("IDENTITY_HEADER", "header-1"),
    ]);
    let provider = ekm_kms::provider_for(&key, &kms_settings(environment))
        .await
        .unwrap();
    let context = WrapContext::key_version("org-1", 1);
    let wrapped = provider.wrap(&[4u8; 64], context).await.unwrap();
    assert_eq!(
        fake.token_requests()[0].1["resource"],
        "https://vault.azure.net"
    );

    fake.set_state("DISABLED");
    assert_eq!(provider.describe().await.unwrap(), KeyState::Disabled);
    let error = provider.unwrap(&wrapped, context).await.unwrap_err();
    assert_eq!(error.kind, FailureKind::Disabled);
    assert_eq!(error.code, "Forbidden/KeyDisabled");
    fake.set_state("ENABLED");

    let cases = [
        ("unwrapkey", azure_fault(403, "Forbidden", Some("ForbiddenByPolicy"), "The user, group or application does not have keys unwrapKey permission on key vault"), FailureKind::AccessDenied, 1),
        ("get", azure_fault(404, "KeyNotFound", None, "A key with (name/id) ekm-org was not found in this key vault."), FailureKind::NotFound, 1),
        ("wrapkey", azure_fault(429, "Throttled", None, "Request was not allowed because the rate limit was exceeded."), FailureKind::Throttled, 3),
        ("unwrapkey", azure_fault(500, "InternalServerError", None, "internal"), FailureKind::ProviderFault, 3),
        ("get", Fault::Stall(Duration::from_secs(3)), FailureKind::Timeout, 3),
    ];
    for (operation, fault, expected, attempts) in cases {
        fake.faults().clear();
        fake.faults().arm(operation, fault, usize::MAX);
        let before = fake.faults().seen(operation);
        let error = match operation {
            "wrapkey" => provider.wrap(&[4u8; 64], context).await.map(|_| ()),
            "unwrapkey" => provider.unwrap(&wrapped, context).await.map(|_| ()),
            _ => provider.describe().await.map(|_| ()),
        }
        .unwrap_err();
        assert_eq!(error.kind, expected, "{operation}: {error}");
        assert_eq!(
            fake.faults().seen(operation) - before,
            attempts,
            "{operation} {expected:?}"
        );
    }
}

/// The connect flow is the same for every provider: a GCP key through the API.
async fn set_master_key_serves_the_data_plane_when_the_key_is_in_gcp(backend: Backend) {
    let (url, fake) = fake_gcp(GCP_KEY).await;
    let host = url.trim_start_matches("http://").to_owned();
    let app = TestApp::spawn_with(
        backend,
        options(
            env(&[("GCE_METADATA_HOST", &host)]),
            Duration::from_secs(60),
            Duration::from_secs(300),
        ),
    )
    .await;
    let (org, token) = enterprise_org(&app).await;
    let thread = app.scope(&token, "thread", "t", &org).await;
    let connected = connect(
        &app,
        &token,
        &org,
        json!({"provider": "gcp-kms", "key_id": GCP_KEY, "endpoint_url": url}),
    )
    .await;
    assert_eq!(connected.status, StatusCode::OK, "{}", connected.body);
    assert_eq!(connected.body["provider"], "gcp-kms");
    let sealed = encrypt(&app, &token, &thread, "gcp")
        .await
        .str("ciphertext");
    assert_eq!(
        plaintext(&decrypt(&app, &token, &thread, &sealed).await),
        "gcp"
    );
    fake.set_state("DISABLED");
    wait_for_state(&app, &token, &thread, "unavailable").await;
    fake.set_state("ENABLED");
    wait_for_state(&app, &token, &thread, "active").await;
}
on_both_backends!(set_master_key_serves_the_data_plane_when_the_key_is_in_gcp);
