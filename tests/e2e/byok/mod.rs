//! BYOK: an enterprise organization connects its own master key (AWS KMS through a real
//! moto_server; Google Cloud KMS and Azure Key Vault through wire-level fakes), keeps
//! encrypting and decrypting, and the health monitor follows the customer's decisions.

mod aws;
mod gcp_azure;
mod outage;

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
            breaker: Default::default(),
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
