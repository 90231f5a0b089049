//! In-test fakes of Google Cloud KMS and Azure Key Vault: real encryption (AES-SIV under a
//! key of their own, the associated data checked), key state, the tokens they issued, faults.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use aes_siv::aead::Aead;
use aes_siv::{Aes256SivAead, KeyInit, Nonce};
use axum::body::Bytes;
use axum::extract::Request;
use axum::http::{HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Router;
use base64::Engine;
use serde_json::{json, Value};

use super::{serve, Fault, Faults};

// ---------------------------------------------------------------------------------------
// A fake cloud KMS: real encryption (AES-SIV under a key of its own, the associated data
// checked), key state, tokens it issued, faults.

#[derive(Clone)]
pub struct FakeKms {
    inner: Arc<FakeState>,
}

struct FakeState {
    cipher: Mutex<Aes256SivAead>,
    /// `ENABLED`, `DISABLED`, `DESTROY_SCHEDULED` (GCP) / enabled flag (Azure).
    state: Mutex<String>,
    tokens: Mutex<Vec<String>>,
    pub faults: Faults,
    /// Token requests seen: (path, form or query fields).
    token_requests: Mutex<Vec<(String, HashMap<String, String>)>>,
}

impl FakeKms {
    fn new() -> FakeKms {
        FakeKms {
            inner: Arc::new(FakeState {
                cipher: Mutex::new(Aes256SivAead::new_from_slice(&[7u8; 64]).unwrap()),
                state: Mutex::new("ENABLED".into()),
                tokens: Mutex::new(vec![]),
                faults: Faults::default(),
                token_requests: Mutex::new(vec![]),
            }),
        }
    }

    pub fn faults(&self) -> &Faults {
        &self.inner.faults
    }

    pub fn set_state(&self, state: &str) {
        *self.inner.state.lock().unwrap() = state.to_owned();
    }

    fn state(&self) -> String {
        self.inner.state.lock().unwrap().clone()
    }

    pub fn token_requests(&self) -> Vec<(String, HashMap<String, String>)> {
        self.inner.token_requests.lock().unwrap().clone()
    }

    fn issue_token(&self, path: &str, fields: HashMap<String, String>) -> Value {
        self.inner
            .token_requests
            .lock()
            .unwrap()
            .push((path.to_owned(), fields));
        let token = format!("fake-token-{}", uuid::Uuid::now_v7().simple());
        self.inner.tokens.lock().unwrap().push(token.clone());
        json!({"access_token": token, "expires_in": 3600, "token_type": "Bearer"})
    }

    fn authorized(&self, headers: &HeaderMap) -> bool {
        let Some(token) = headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
        else {
            return false;
        };
        self.inner.tokens.lock().unwrap().iter().any(|t| t == token)
    }

    fn seal(&self, plaintext: &[u8], aad: &[u8]) -> Vec<u8> {
        let cipher = self.inner.cipher.lock().unwrap();
        cipher
            .encrypt(
                &Nonce::default(),
                aes_siv::aead::Payload {
                    msg: plaintext,
                    aad,
                },
            )
            .unwrap()
    }

    fn open(&self, ciphertext: &[u8], aad: &[u8]) -> Option<Vec<u8>> {
        let cipher = self.inner.cipher.lock().unwrap();
        cipher
            .decrypt(
                &Nonce::default(),
                aes_siv::aead::Payload {
                    msg: ciphertext,
                    aad,
                },
            )
            .ok()
    }
}

fn b64() -> base64::engine::GeneralPurpose {
    base64::engine::general_purpose::STANDARD
}

fn b64url() -> base64::engine::GeneralPurpose {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
}

fn form_fields(body: &[u8]) -> HashMap<String, String> {
    url_decode_pairs(std::str::from_utf8(body).unwrap_or(""))
}

fn url_decode_pairs(text: &str) -> HashMap<String, String> {
    text.split('&')
        .filter_map(|pair| pair.split_once('='))
        .map(|(k, v)| {
            let decode = |s: &str| {
                let s = s.replace('+', " ");
                let mut out = vec![];
                let bytes = s.as_bytes();
                let mut i = 0;
                while i < bytes.len() {
                    if bytes[i] == b'%' && i + 2 < bytes.len() {
                        if let Ok(b) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                            out.push(b);
                            i += 3;
                            continue;
                        }
                    }
                    out.push(bytes[i]);
                    i += 1;
                }
                String::from_utf8_lossy(&out).into_owned()
            };
            (decode(k), decode(v))
        })
        .collect()
}

fn gcp_error(status: u16, code: &str, message: &str) -> Response {
    (
        StatusCode::from_u16(status).unwrap(),
        [("content-type", "application/json")],
        json!({"error": {"code": status, "message": message, "status": code}}).to_string(),
    )
        .into_response()
}

/// A Google Cloud KMS error as a fault.
pub fn gcp_fault(status: u16, code: &str, message: &str) -> Fault {
    Fault::Answer(
        status,
        json!({"error": {"code": status, "message": message, "status": code}}),
    )
}

/// A fake Google Cloud KMS (v1 REST) with its OAuth token endpoint and metadata server:
/// `POST /v1/{name}:encrypt|:decrypt`, `GET /v1/{name}`, `POST /token`,
/// `GET /computeMetadata/v1/instance/service-accounts/default/token`. Operations for
/// faults: `encrypt`, `decrypt`, `get`.
pub async fn fake_gcp(key_name: &str) -> (String, FakeKms) {
    let fake = FakeKms::new();
    let name = key_name.to_owned();
    let handler_fake = fake.clone();
    let handler = move |method: Method, headers: HeaderMap, request: Request| {
        let fake = handler_fake.clone();
        let name = name.clone();
        async move {
            let path = request.uri().path().to_owned();
            let query = request.uri().query().unwrap_or("").to_owned();
            let body: Bytes = axum::body::to_bytes(request.into_body(), 1 << 20)
                .await
                .unwrap_or_default();
            if path == "/token" && method == Method::POST {
                return axum::Json(fake.issue_token(&path, form_fields(&body))).into_response();
            }
            if path.starts_with("/computeMetadata/") {
                if headers.get("metadata-flavor").and_then(|v| v.to_str().ok()) != Some("Google") {
                    return StatusCode::FORBIDDEN.into_response();
                }
                return axum::Json(fake.issue_token(&path, url_decode_pairs(&query)))
                    .into_response();
            }
            let Some(rest) = path.strip_prefix("/v1/") else {
                return StatusCode::NOT_FOUND.into_response();
            };
            let (resource, operation) = match rest.split_once(':') {
                Some((resource, op)) => (resource.to_owned(), op.to_owned()),
                None => (rest.to_owned(), "get".to_owned()),
            };
            if let Some(response) = fake.faults().apply(&operation).await {
                return response;
            }
            if !fake.authorized(&headers) {
                return gcp_error(
                    401,
                    "UNAUTHENTICATED",
                    "Request had invalid authentication credentials.",
                );
            }
            if resource != name {
                return gcp_error(404, "NOT_FOUND", &format!("{resource} not found."));
            }
            let state = fake.state();
            if operation == "get" {
                return axum::Json(json!({
                    "name": name,
                    "purpose": "ENCRYPT_DECRYPT",
                    "primary": {"name": format!("{name}/cryptoKeyVersions/1"), "state": state},
                }))
                .into_response();
            }
            if state != "ENABLED" {
                return gcp_error(
                    400,
                    "FAILED_PRECONDITION",
                    &format!(
                        "{name}/cryptoKeyVersions/1 is not enabled, current state is: {state}."
                    ),
                );
            }
            let request: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
            let field = |f: &str| {
                request[f]
                    .as_str()
                    .and_then(|v| b64().decode(v).ok())
                    .unwrap_or_default()
            };
            let aad = field("additionalAuthenticatedData");
            match operation.as_str() {
                "encrypt" => {
                    let ciphertext = fake.seal(&field("plaintext"), &aad);
                    axum::Json(json!({
                        "name": format!("{name}/cryptoKeyVersions/1"),
                        "ciphertext": b64().encode(ciphertext),
                    }))
                    .into_response()
                }
                "decrypt" => match fake.open(&field("ciphertext"), &aad) {
                    Some(plaintext) => {
                        axum::Json(json!({"plaintext": b64().encode(plaintext)})).into_response()
                    }
                    None => gcp_error(
                        400,
                        "INVALID_ARGUMENT",
                        "Decryption failed: the ciphertext is invalid.",
                    ),
                },
                _ => gcp_error(404, "NOT_FOUND", "unknown method"),
            }
        }
    };
    let url = serve(Router::new().fallback(handler)).await;
    (url, fake)
}

fn azure_error(status: u16, code: &str, inner: Option<&str>, message: &str) -> Value {
    let _ = status;
    match inner {
        Some(inner) => {
            json!({"error": {"code": code, "message": message, "innererror": {"code": inner}}})
        }
        None => json!({"error": {"code": code, "message": message}}),
    }
}

/// An Azure Key Vault error as a fault.
pub fn azure_fault(status: u16, code: &str, inner: Option<&str>, message: &str) -> Fault {
    Fault::Answer(status, azure_error(status, code, inner, message))
}

/// A fake Azure Key Vault (REST 7.4) with its Entra ID token endpoint and a managed
/// identity endpoint: `POST /keys/{name}[/{version}]/wrapkey|unwrapkey`,
/// `GET /keys/{name}[/{version}]`, `POST /{tenant}/oauth2/v2.0/token`, `GET /msi/token`.
/// The key has one version, `v1`. Operations for faults: `wrapkey`, `unwrapkey`, `get`.
pub async fn fake_azure(key_name: &str) -> (String, FakeKms) {
    let fake = FakeKms::new();
    let name = key_name.to_owned();
    let handler_fake = fake.clone();
    let handler = move |method: Method, headers: HeaderMap, request: Request| {
        let fake = handler_fake.clone();
        let name = name.clone();
        async move {
            let path = request.uri().path().to_owned();
            let query = request.uri().query().unwrap_or("").to_owned();
            let host = headers
                .get("host")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_owned();
            let body: Bytes = axum::body::to_bytes(request.into_body(), 1 << 20)
                .await
                .unwrap_or_default();
            if path.ends_with("/oauth2/v2.0/token") && method == Method::POST {
                return axum::Json(fake.issue_token(&path, form_fields(&body))).into_response();
            }
            if path == "/msi/token" {
                if headers.get("x-identity-header").is_none() {
                    return StatusCode::UNAUTHORIZED.into_response();
                }
                let mut token = fake.issue_token(&path, url_decode_pairs(&query));
                // Managed identity answers expires_in as a string.
                token["expires_in"] = json!("3600");
                return axum::Json(token).into_response();
            }
            if !query.contains("api-version=7.4") {
                return (
                    StatusCode::BAD_REQUEST,
                    axum::Json(azure_error(
                        400,
                        "BadParameter",
                        None,
                        "api-version is required",
                    )),
                )
                    .into_response();
            }
            let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
            let (key, version, operation) = match parts[..] {
                ["keys", key] => (key, None, "get"),
                ["keys", key, op @ ("wrapkey" | "unwrapkey")] => (key, None, op),
                ["keys", key, version] => (key, Some(version), "get"),
                ["keys", key, version, op] => (key, Some(version), op),
                _ => return StatusCode::NOT_FOUND.into_response(),
            };
            let operation = operation.to_owned();
            if let Some(response) = fake.faults().apply(&operation).await {
                return response;
            }
            if !fake.authorized(&headers) {
                return (
                    StatusCode::UNAUTHORIZED,
                    axum::Json(azure_error(
                        401,
                        "Unauthorized",
                        None,
                        "AKV10000: Request is missing a Bearer or PoP token.",
                    )),
                )
                    .into_response();
            }
            if key != name || version.is_some_and(|v| v != "v1") {
                return (
                    StatusCode::NOT_FOUND,
                    axum::Json(azure_error(
                        404,
                        "KeyNotFound",
                        None,
                        &format!("A key with (name/id) {key} was not found in this key vault."),
                    )),
                )
                    .into_response();
            }
            let enabled = fake.state() == "ENABLED";
            let kid = format!("https://{host}/keys/{name}/v1");
            if operation == "get" {
                return axum::Json(json!({
                    "key": {"kid": kid, "kty": "RSA", "key_ops": ["wrapKey", "unwrapKey"]},
                    "attributes": {"enabled": enabled, "recoveryLevel": "Recoverable+Purgeable"},
                }))
                .into_response();
            }
            if !enabled {
                return (
                    StatusCode::FORBIDDEN,
                    axum::Json(azure_error(
                        403,
                        "Forbidden",
                        Some("KeyDisabled"),
                        &format!("Operation {operation} is not allowed on a disabled key."),
                    )),
                )
                    .into_response();
            }
            let request: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
            if request["alg"] != "RSA-OAEP-256" {
                return (
                    StatusCode::BAD_REQUEST,
                    axum::Json(azure_error(400, "BadParameter", None, "Invalid algorithm")),
                )
                    .into_response();
            }
            let value = request["value"]
                .as_str()
                .and_then(|v| b64url().decode(v).ok())
                .unwrap_or_default();
            match operation.as_str() {
                "wrapkey" => axum::Json(
                    json!({"kid": kid, "value": b64url().encode(fake.seal(&value, b""))}),
                )
                .into_response(),
                "unwrapkey" => match fake.open(&value, b"") {
                    Some(plaintext) => {
                        axum::Json(json!({"kid": kid, "value": b64url().encode(plaintext)}))
                            .into_response()
                    }
                    None => (
                        StatusCode::BAD_REQUEST,
                        axum::Json(azure_error(
                            400,
                            "BadParameter",
                            None,
                            "Unable to unwrap: the value is invalid.",
                        )),
                    )
                        .into_response(),
                },
                _ => StatusCode::NOT_FOUND.into_response(),
            }
        }
    };
    let url = serve(Router::new().fallback(handler)).await;
    (url, fake)
}
