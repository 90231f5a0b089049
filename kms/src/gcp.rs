//! Google Cloud KMS over its documented REST API (v1): `cryptoKeys.encrypt` and `decrypt`
//! with additional authenticated data naming the organization, and `cryptoKeys.get` (the
//! primary version's state) for health.
//!
//! Credentials, in the order Application Default Credentials uses them:
//! `GOOGLE_OAUTH_ACCESS_TOKEN` (a token from `gcloud auth print-access-token`), the JSON file
//! at `GOOGLE_APPLICATION_CREDENTIALS` (or gcloud's default path): a service account key
//! (a JWT signed with its key, exchanged at its `token_uri`) or an authorized user (a refresh
//! token); then the metadata server of GCE, GKE workload identity and Cloud Run
//! (`GCE_METADATA_HOST` overrides its address).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use ekm_domain::MasterKeyRef;
use serde::{Deserialize, Serialize};
use serde_json::json;
use zeroize::Zeroizing;

use crate::rest::{self, b64, AccessToken, TokenCache};
use crate::{
    Environment, FailureKind, KeyState, KmsSettings, MasterKeyProvider, Operation, ProviderError,
    WrapContext,
};

const DEFAULT_ENDPOINT: &str = "https://cloudkms.googleapis.com";
const SCOPE: &str = "https://www.googleapis.com/auth/cloudkms";
const GOOGLE_TOKEN_URI: &str = "https://oauth2.googleapis.com/token";

pub struct GcpKms {
    http: reqwest::Client,
    name: String,
    endpoint: String,
    environment: Environment,
    tokens: TokenCache,
}

impl std::fmt::Debug for GcpKms {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GcpKms")
            .field("name", &self.name)
            .field("endpoint", &self.endpoint)
            .finish_non_exhaustive()
    }
}

/// `{"error": {"code", "message", "status"}}` (google.rpc.Status in JSON).
#[derive(Deserialize)]
struct ErrorBody {
    error: ErrorDetail,
}

#[derive(Deserialize)]
struct ErrorDetail {
    #[serde(default)]
    message: String,
    #[serde(default)]
    status: String,
}

#[derive(Deserialize)]
struct CredentialsFile {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    client_email: Option<String>,
    #[serde(default)]
    private_key: Option<String>,
    #[serde(default)]
    token_uri: Option<String>,
    #[serde(default)]
    client_id: Option<String>,
    #[serde(default)]
    client_secret: Option<String>,
    #[serde(default)]
    refresh_token: Option<String>,
}

impl GcpKms {
    pub fn new(key: &MasterKeyRef, settings: &KmsSettings) -> Result<GcpKms, ProviderError> {
        Ok(GcpKms {
            http: rest::client(settings)?,
            name: key.key_id.clone(),
            endpoint: key
                .endpoint_url
                .clone()
                .unwrap_or_else(|| DEFAULT_ENDPOINT.to_owned()),
            environment: settings.environment.clone(),
            tokens: TokenCache::default(),
        })
    }

    async fn token(&self) -> Result<Zeroizing<String>, ProviderError> {
        self.tokens.get(|| self.fetch_token()).await
    }

    async fn fetch_token(&self) -> Result<AccessToken, ProviderError> {
        let env = &self.environment;
        if let Some(token) = env.get("GOOGLE_OAUTH_ACCESS_TOKEN") {
            return Ok(AccessToken::new(token, Duration::from_secs(300)));
        }
        let file = env.get("GOOGLE_APPLICATION_CREDENTIALS").or_else(|| {
            let path = format!(
                "{}/.config/gcloud/application_default_credentials.json",
                env.get("HOME")?
            );
            std::path::Path::new(&path).exists().then_some(path)
        });
        if let Some(path) = file {
            return self.token_from_file(&path).await;
        }
        let host = env
            .get("GCE_METADATA_HOST")
            .unwrap_or_else(|| "metadata.google.internal".to_owned());
        let url = format!(
            "http://{host}/computeMetadata/v1/instance/service-accounts/default/token?scopes={SCOPE}"
        );
        rest::fetch_token(self.http.get(url).header("Metadata-Flavor", "Google"))
            .await
            .map_err(|mut e| {
                if e.kind == FailureKind::Unreachable {
                    e.kind = FailureKind::Unauthenticated;
                    e.message = "no GOOGLE_OAUTH_ACCESS_TOKEN, no GOOGLE_APPLICATION_CREDENTIALS and the metadata server is not reachable".to_owned();
                }
                e
            })
    }

    async fn token_from_file(&self, path: &str) -> Result<AccessToken, ProviderError> {
        let unreadable = |why: &str| {
            ProviderError::new(
                Operation::Credentials,
                FailureKind::Unauthenticated,
                "CredentialsFile",
                format!("the credentials file {path} {why}"),
            )
        };
        let text = Zeroizing::new(
            tokio::fs::read_to_string(path)
                .await
                .map_err(|_| unreadable("cannot be read"))?,
        );
        let file: CredentialsFile = serde_json::from_str(&text)
            .map_err(|_| unreadable("is not a credentials JSON file"))?;
        match file.kind.as_str() {
            "service_account" => {
                let (Some(email), Some(pem)) = (file.client_email, file.private_key) else {
                    return Err(unreadable("lacks client_email or private_key"));
                };
                let pem = Zeroizing::new(pem);
                let token_uri = file
                    .token_uri
                    .unwrap_or_else(|| GOOGLE_TOKEN_URI.to_owned());
                let now = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0);
                let claims = json!({
                    "iss": email, "scope": SCOPE, "aud": token_uri,
                    "iat": now, "exp": now + 3600,
                });
                let key = jsonwebtoken::EncodingKey::from_rsa_pem(pem.as_bytes())
                    .map_err(|_| unreadable("has a private_key that is not an RSA PEM key"))?;
                let assertion = jsonwebtoken::encode(
                    &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256),
                    &claims,
                    &key,
                )
                .map_err(|_| unreadable("has a key that cannot sign"))?;
                rest::fetch_token(self.http.post(token_uri).form(&[
                    ("grant_type", "urn:ietf:params:oauth:grant-type:jwt-bearer"),
                    ("assertion", assertion.as_str()),
                ]))
                .await
            }
            "authorized_user" => {
                let (Some(id), Some(secret), Some(refresh)) =
                    (file.client_id, file.client_secret, file.refresh_token)
                else {
                    return Err(unreadable(
                        "lacks client_id, client_secret or refresh_token",
                    ));
                };
                let (secret, refresh) = (Zeroizing::new(secret), Zeroizing::new(refresh));
                let token_uri = file
                    .token_uri
                    .unwrap_or_else(|| GOOGLE_TOKEN_URI.to_owned());
                rest::fetch_token(self.http.post(token_uri).form(&[
                    ("grant_type", "refresh_token"),
                    ("client_id", id.as_str()),
                    ("client_secret", secret.as_str()),
                    ("refresh_token", refresh.as_str()),
                ]))
                .await
            }
            other => Err(unreadable(&format!(
                "has type `{}`; service_account and authorized_user are supported",
                other.chars().take(40).collect::<String>()
            ))),
        }
    }

    /// Sends an authenticated request and returns the answer's body, or the classified
    /// error. The body is wiped when dropped: a decrypt answer holds a key.
    async fn call(
        &self,
        operation: Operation,
        request: impl Fn(&reqwest::Client) -> reqwest::RequestBuilder,
    ) -> Result<Zeroizing<String>, ProviderError> {
        let token = self.token().await?;
        let (status, body) =
            rest::send(operation, request(&self.http), &token, &self.tokens).await?;
        if status.is_success() {
            return Ok(body);
        }
        let (code, message) = match serde_json::from_str::<ErrorBody>(&body) {
            Ok(body) => (body.error.status, body.error.message),
            Err(_) => (format!("HTTP{}", status.as_u16()), format!("HTTP {status}")),
        };
        Err(ProviderError::new(
            operation,
            kind_of(operation, status.as_u16(), &code, &message),
            code,
            message,
        ))
    }

    fn url(&self, suffix: &str) -> String {
        format!("{}/v1/{}{suffix}", self.endpoint, self.name)
    }
}

/// google.rpc.Code names as Cloud KMS uses them.
fn kind_of(operation: Operation, status: u16, code: &str, message: &str) -> FailureKind {
    let upper = message.to_ascii_uppercase();
    match code {
        "PERMISSION_DENIED" => FailureKind::AccessDenied,
        "NOT_FOUND" => FailureKind::NotFound,
        "UNAUTHENTICATED" => FailureKind::Unauthenticated,
        "RESOURCE_EXHAUSTED" => FailureKind::Throttled,
        "UNAVAILABLE" | "INTERNAL" | "DEADLINE_EXCEEDED" | "UNKNOWN" => FailureKind::ProviderFault,
        "FAILED_PRECONDITION" if upper.contains("DESTROY") => FailureKind::PendingDeletion,
        "FAILED_PRECONDITION" if upper.contains("DISABLED") => FailureKind::Disabled,
        "INVALID_ARGUMENT" if operation == Operation::Decrypt => FailureKind::InvalidCiphertext,
        _ if status == 429 => FailureKind::Throttled,
        _ if status >= 500 => FailureKind::ProviderFault,
        _ => FailureKind::Invalid,
    }
}

fn malformed(operation: Operation, what: &str) -> ProviderError {
    ProviderError::new(
        operation,
        FailureKind::ProviderFault,
        "MalformedResponse",
        format!("the answer has no valid {what}"),
    )
}

#[derive(Deserialize)]
struct Encrypted {
    ciphertext: String,
}

#[derive(Deserialize)]
struct Decrypted {
    plaintext: String,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct EncryptRequest<'a> {
    plaintext: &'a str,
    additional_authenticated_data: &'a str,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct DecryptRequest<'a> {
    ciphertext: &'a str,
    additional_authenticated_data: &'a str,
}

#[async_trait::async_trait]
impl MasterKeyProvider for GcpKms {
    async fn wrap(
        &self,
        plaintext: &[u8],
        context: WrapContext<'_>,
    ) -> Result<Vec<u8>, ProviderError> {
        let plaintext = Zeroizing::new(b64().encode(plaintext));
        let aad = b64().encode(context.binding());
        let body = Zeroizing::new(
            serde_json::to_string(&EncryptRequest {
                plaintext: &plaintext,
                additional_authenticated_data: &aad,
            })
            .unwrap_or_default(),
        );
        let answer = self
            .call(Operation::Encrypt, |http| {
                http.post(self.url(":encrypt"))
                    .header("content-type", "application/json")
                    .body(body.to_string())
            })
            .await?;
        let Encrypted { ciphertext } = serde_json::from_str(&answer)
            .map_err(|_| malformed(Operation::Encrypt, "ciphertext"))?;
        b64()
            .decode(ciphertext)
            .map_err(|_| malformed(Operation::Encrypt, "ciphertext"))
    }

    async fn unwrap(
        &self,
        wrapped: &[u8],
        context: WrapContext<'_>,
    ) -> Result<Zeroizing<Vec<u8>>, ProviderError> {
        let ciphertext = b64().encode(wrapped);
        let aad = b64().encode(context.binding());
        let request = DecryptRequest {
            ciphertext: &ciphertext,
            additional_authenticated_data: &aad,
        };
        let answer = self
            .call(Operation::Decrypt, |http| {
                http.post(self.url(":decrypt")).json(&request)
            })
            .await?;
        let Decrypted { plaintext } = serde_json::from_str(&answer)
            .map_err(|_| malformed(Operation::Decrypt, "plaintext"))?;
        let plaintext = Zeroizing::new(plaintext);
        b64()
            .decode(plaintext.as_bytes())
            .map(Zeroizing::new)
            .map_err(|_| malformed(Operation::Decrypt, "plaintext"))
    }

    async fn describe(&self) -> Result<KeyState, ProviderError> {
        let body = self
            .call(Operation::Describe, |http| http.get(self.url("")))
            .await?;
        let answer: serde_json::Value =
            serde_json::from_str(&body).map_err(|_| malformed(Operation::Describe, "CryptoKey"))?;
        let state = answer
            .get("primary")
            .and_then(|p| p.get("state"))
            .and_then(|s| s.as_str())
            .unwrap_or("NO_PRIMARY_VERSION");
        Ok(match state {
            "ENABLED" => KeyState::Enabled,
            "DISABLED" => KeyState::Disabled,
            "DESTROYED" | "DESTROY_SCHEDULED" => KeyState::PendingDeletion,
            other => KeyState::Unusable(other.chars().take(40).collect()),
        })
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    use axum::http::{header, StatusCode};
    use axum::response::IntoResponse;

    use super::*;

    const KEY: &str = "projects/p/locations/global/keyRings/r/cryptoKeys/k";

    /// Serves `router` on a free loopback port; returns its base URL.
    async fn serve(router: axum::Router) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, router).await });
        format!("http://{address}")
    }

    fn provider(endpoint: &str) -> GcpKms {
        let key =
            MasterKeyRef::parse(ekm_domain::Provider::GcpKms, KEY, None, Some(endpoint)).unwrap();
        let settings = KmsSettings {
            environment: Environment::from_map(HashMap::from([(
                "GOOGLE_OAUTH_ACCESS_TOKEN".to_owned(),
                "platform-token".to_owned(),
            )])),
            ..KmsSettings::default()
        };
        GcpKms::new(&key, &settings).unwrap()
    }

    #[tokio::test]
    async fn describe_fails_without_following_a_redirect() {
        let hits = Arc::new(AtomicUsize::new(0));
        let counted = hits.clone();
        let elsewhere = serve(axum::Router::new().fallback(move || {
            counted.fetch_add(1, Ordering::SeqCst);
            async { axum::Json(serde_json::json!({"primary": {"state": "ENABLED"}})) }
        }))
        .await;
        let target = format!("{elsewhere}/v1/{KEY}");
        let redirecting = serve(axum::Router::new().fallback(move || async move {
            (
                StatusCode::TEMPORARY_REDIRECT,
                [(header::LOCATION, target.clone())],
            )
                .into_response()
        }))
        .await;

        let error = provider(&redirecting).describe().await.unwrap_err();
        assert_eq!(error.code, "HTTP307");
        assert_eq!(hits.load(Ordering::SeqCst), 0, "the redirect was followed");
    }

    #[tokio::test]
    async fn describe_fails_when_the_answer_is_larger_than_the_cap() {
        // One with Content-Length, one streamed without it.
        let big = serve(
            axum::Router::new()
                .fallback(|| async { format!("{{\"pad\": \"{}\"}}", "x".repeat(2 << 20)) }),
        )
        .await;
        let streamed = serve(axum::Router::new().fallback(|| async {
            let chunks = (0..40).map(|_| Ok::<_, std::io::Error>(vec![b' '; 64 << 10]));
            axum::body::Body::from_stream(futures_util::stream::iter(chunks))
        }))
        .await;
        for endpoint in [big, streamed] {
            let error = provider(&endpoint).describe().await.unwrap_err();
            assert_eq!(
                (error.kind, error.code.as_str()),
                (FailureKind::ProviderFault, "ResponseTooLarge")
            );
        }
    }

    #[tokio::test]
    async fn an_unreachable_endpoint_is_reported_without_network_detail() {
        let closed = {
            let socket = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            socket.local_addr().unwrap().port()
        };
        let error = provider(&format!("http://127.0.0.1:{closed}"))
            .describe()
            .await
            .unwrap_err();
        assert_eq!(error.kind, FailureKind::Unreachable);
        let shown = format!("{error} {}", error.message);
        assert!(!shown.contains("127.0.0.1"), "{shown}");
        assert!(!shown.contains(&closed.to_string()), "{shown}");
        assert!(!shown.to_lowercase().contains("connect"), "{shown}");
    }
}
