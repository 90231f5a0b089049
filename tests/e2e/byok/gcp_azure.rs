//! Google Cloud KMS and Azure Key Vault through wire-level fakes: credentials, round trips,
//! faults, and GCP through the API.

use super::*;

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
