//! What the REST providers (Google Cloud KMS, Azure Key Vault) share: one HTTP client with
//! time limits, transport errors classified, and an OAuth access token cached until shortly
//! before it expires. Tokens are secrets: they are never logged and are wiped when dropped.

use std::time::{Duration, Instant};

use serde::Deserialize;
use zeroize::Zeroizing;

use crate::{FailureKind, KmsSettings, Operation, ProviderError};

/// The most a provider answer may hold; a KMS answer is a few KiB at most, so a bigger one
/// is a fault (or an endpoint that is not a KMS), never buffered whole.
pub(crate) const MAX_RESPONSE_BYTES: usize = 1 << 20;

/// The HTTP client of the REST providers. Redirects are never followed: the bearer token
/// must reach only the allowed endpoint, not wherever that endpoint points.
pub(crate) fn client(settings: &KmsSettings) -> Result<reqwest::Client, ProviderError> {
    reqwest::Client::builder()
        .timeout(settings.timeout)
        .connect_timeout(settings.timeout)
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .map_err(|e| {
            ProviderError::new(
                Operation::Credentials,
                FailureKind::Unreachable,
                "HttpClient",
                format!("cannot build the HTTP client: {e}"),
            )
        })
}

/// A request that got no HTTP answer. The detail (URL, DNS or connection error) goes to
/// the log only: a client learns that the endpoint was unreachable, not what the platform's
/// network looks like from inside.
pub(crate) fn transport(operation: Operation, error: &reqwest::Error) -> ProviderError {
    let (kind, message) = if error.is_timeout() {
        (FailureKind::Timeout, "the endpoint did not answer in time")
    } else {
        (
            FailureKind::Unreachable,
            "the endpoint could not be reached",
        )
    };
    // reqwest's Display names the URL, never headers or bodies.
    tracing::warn!(
        operation = operation.as_str(),
        kind = kind.as_str(),
        detail = %crate::error_detail(error),
        "master key provider request failed"
    );
    ProviderError::new(operation, kind, "Transport", message)
}

/// Reads an answer's body, at most `MAX_RESPONSE_BYTES`, into memory that is wiped when
/// dropped (a decrypt answer holds a key), including the buffers outgrown on the way.
pub(crate) async fn read_body(
    operation: Operation,
    mut response: reqwest::Response,
) -> Result<Zeroizing<String>, ProviderError> {
    let too_large = || {
        ProviderError::new(
            operation,
            FailureKind::ProviderFault,
            "ResponseTooLarge",
            format!("the answer is larger than {MAX_RESPONSE_BYTES} bytes"),
        )
    };
    let announced = response.content_length().unwrap_or(0);
    if announced > MAX_RESPONSE_BYTES as u64 {
        return Err(too_large());
    }
    let mut body = Zeroizing::new(Vec::with_capacity(announced.max(4096) as usize));
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|e| transport(operation, &e))?
    {
        let needed = body.len() + chunk.len();
        if needed > MAX_RESPONSE_BYTES {
            return Err(too_large());
        }
        if needed > body.capacity() {
            // Grow by hand: `Vec` would leave the old buffer behind unwiped.
            let mut grown =
                Zeroizing::new(Vec::with_capacity((needed * 2).min(MAX_RESPONSE_BYTES)));
            grown.extend_from_slice(&body);
            body = grown;
        }
        body.extend_from_slice(&chunk);
    }
    match String::from_utf8(std::mem::take(&mut *body)) {
        Ok(text) => Ok(Zeroizing::new(text)),
        Err(error) => {
            drop(Zeroizing::new(error.into_bytes()));
            Err(ProviderError::new(
                operation,
                FailureKind::ProviderFault,
                "MalformedResponse",
                "the answer is not UTF-8 text",
            ))
        }
    }
}

/// Sends `request` with the bearer `token` and reads the whole answer, which is wiped when
/// dropped (a decrypt answer holds a key). A 401 forgets the cached token, so the next call
/// fetches another. The caller reads the provider's error body from a refusal.
pub(crate) async fn send(
    operation: Operation,
    request: reqwest::RequestBuilder,
    token: &str,
    tokens: &TokenCache,
) -> Result<(reqwest::StatusCode, Zeroizing<String>), ProviderError> {
    let response = request
        .bearer_auth(token)
        .send()
        .await
        .map_err(|e| transport(operation, &e))?;
    let status = response.status();
    let body = read_body(operation, response).await?;
    if status.as_u16() == 401 {
        tokens.clear().await;
    }
    Ok((status, body))
}

/// An access token and when to stop using it.
pub(crate) struct AccessToken {
    pub secret: Zeroizing<String>,
    pub refresh_at: Instant,
}

impl AccessToken {
    /// A token that expires in `expires_in`, used until a minute before (or half its life,
    /// for short ones).
    pub fn new(secret: String, expires_in: Duration) -> Self {
        let margin = Duration::from_secs(60).min(expires_in / 2);
        AccessToken {
            secret: Zeroizing::new(secret),
            refresh_at: Instant::now() + expires_in.saturating_sub(margin),
        }
    }
}

/// One cached access token per provider instance.
#[derive(Default)]
pub(crate) struct TokenCache {
    token: tokio::sync::Mutex<Option<AccessToken>>,
}

impl TokenCache {
    /// The cached token, or a new one from `fetch`.
    pub async fn get<F, Fut>(&self, fetch: F) -> Result<Zeroizing<String>, ProviderError>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<AccessToken, ProviderError>>,
    {
        let mut token = self.token.lock().await;
        if let Some(current) = token.as_ref() {
            if Instant::now() < current.refresh_at {
                return Ok(current.secret.clone());
            }
        }
        let fresh = fetch().await?;
        let secret = fresh.secret.clone();
        *token = Some(fresh);
        Ok(secret)
    }

    /// Forgets the token (after a 401, so the next call fetches another).
    pub async fn clear(&self) {
        *self.token.lock().await = None;
    }
}

/// The token endpoint's answer (OAuth 2.0, RFC 6749 §5.1). `expires_in` is a number in
/// the standard, a string from Azure managed identity.
#[derive(Deserialize)]
pub(crate) struct TokenResponse {
    pub access_token: String,
    #[serde(default)]
    pub expires_in: Option<serde_json::Value>,
}

impl TokenResponse {
    pub fn into_token(self) -> AccessToken {
        let seconds = match &self.expires_in {
            Some(serde_json::Value::Number(n)) => n.as_u64(),
            Some(serde_json::Value::String(s)) => s.parse().ok(),
            _ => None,
        }
        .unwrap_or(300);
        AccessToken::new(self.access_token, Duration::from_secs(seconds))
    }
}

/// Sends a token request and reads the answer; every failure is `Unauthenticated` (or a
/// transport failure), with the endpoint's own error text.
pub(crate) async fn fetch_token(
    request: reqwest::RequestBuilder,
) -> Result<AccessToken, ProviderError> {
    let response = request
        .send()
        .await
        .map_err(|e| transport(Operation::Credentials, &e))?;
    let status = response.status();
    let body = read_body(Operation::Credentials, response).await?;
    if !status.is_success() {
        let kind = if status.is_server_error() {
            FailureKind::ProviderFault
        } else if status.as_u16() == 429 {
            FailureKind::Throttled
        } else {
            FailureKind::Unauthenticated
        };
        // OAuth errors carry `error` and `error_description`, never the credential.
        let detail = serde_json::from_str::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| {
                let error = v.get("error")?.as_str()?.to_owned();
                let description = v
                    .get("error_description")
                    .and_then(|d| d.as_str())
                    .unwrap_or("");
                Some(format!("{error}: {description}"))
            })
            .unwrap_or_else(|| format!("HTTP {status}"));
        return Err(ProviderError::new(
            Operation::Credentials,
            kind,
            format!("Token{}", status.as_u16()),
            detail,
        ));
    }
    let parsed: TokenResponse = serde_json::from_str(&body).map_err(|_| {
        ProviderError::new(
            Operation::Credentials,
            FailureKind::Unauthenticated,
            "TokenResponse",
            "the token endpoint's answer has no access_token",
        )
    })?;
    Ok(parsed.into_token())
}

/// No credential source was found.
pub(crate) fn no_credentials(what: &str) -> ProviderError {
    ProviderError::new(
        Operation::Credentials,
        FailureKind::Unauthenticated,
        "NoCredentials",
        format!("no credentials found: {what}"),
    )
}

pub(crate) fn b64() -> base64::engine::GeneralPurpose {
    base64::engine::general_purpose::STANDARD
}

pub(crate) fn b64url() -> base64::engine::GeneralPurpose {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
}
