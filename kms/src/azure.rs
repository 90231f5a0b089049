//! Azure Key Vault (and Managed HSM) over its documented REST API (7.4): `wrapkey` and
//! `unwrapkey` with RSA-OAEP-256, and `GET key` (its `enabled` and `exp` attributes) for
//! health.
//!
//! Key Vault has no encryption context, so the organization is bound inside the wrapped
//! value: the plaintext is the key followed by 16 bytes of SHA-256 over the organization and
//! version, checked on unwrap. The wrapped blob records the key version that wrapped it, so a
//! key URL without a version keeps working after the customer rotates the key.
//!
//! Credentials, in the order `DefaultAzureCredential` uses them: a service principal from
//! `AZURE_TENANT_ID`, `AZURE_CLIENT_ID` and `AZURE_CLIENT_SECRET` (or
//! `AZURE_FEDERATED_TOKEN_FILE` for workload identity), at `AZURE_AUTHORITY_HOST`; then
//! managed identity (`IDENTITY_ENDPOINT` and `IDENTITY_HEADER` on App Service and Container
//! Apps, else the instance metadata service).

use base64::Engine;
use ekm_domain::MasterKeyRef;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use crate::rest::{self, b64url, AccessToken, TokenCache};
use crate::{
    Environment, FailureKind, KeyState, KmsSettings, MasterKeyProvider, Operation, ProviderError,
    WrapContext,
};

const API_VERSION: &str = "7.4";
const ALGORITHM: &str = "RSA-OAEP-256";
const BINDING_BYTES: usize = 16;
const BLOB_PREFIX: &str = "azkv1:";

pub struct AzureKeyVault {
    http: reqwest::Client,
    /// `https://host` or the endpoint override.
    base: String,
    name: String,
    version: Option<String>,
    resource: &'static str,
    environment: Environment,
    tokens: TokenCache,
}

impl std::fmt::Debug for AzureKeyVault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AzureKeyVault")
            .field("base", &self.base)
            .field("name", &self.name)
            .field("version", &self.version)
            .finish_non_exhaustive()
    }
}

#[derive(Deserialize)]
struct ErrorBody {
    error: ErrorDetail,
}

#[derive(Deserialize)]
struct ErrorDetail {
    #[serde(default)]
    code: String,
    #[serde(default)]
    message: String,
    #[serde(default)]
    innererror: Option<Box<ErrorDetail>>,
}

#[derive(Serialize)]
struct KeyOperation<'a> {
    alg: &'a str,
    value: &'a str,
}

#[derive(Deserialize)]
struct KeyOperationResult {
    #[serde(default)]
    kid: Option<String>,
    value: String,
}

impl AzureKeyVault {
    pub fn new(key: &MasterKeyRef, settings: &KmsSettings) -> Result<AzureKeyVault, ProviderError> {
        let invalid = || {
            ProviderError::new(
                Operation::Describe,
                FailureKind::Invalid,
                "InvalidKeyUrl",
                "the key URL is not https://VAULT/keys/NAME[/VERSION]",
            )
        };
        let rest = key.key_id.strip_prefix("https://").ok_or_else(invalid)?;
        let parts: Vec<&str> = rest.trim_end_matches('/').split('/').collect();
        let (host, name, version) = match parts[..] {
            [host, "keys", name] => (host, name, None),
            [host, "keys", name, version] => (host, name, Some(version.to_owned())),
            _ => return Err(invalid()),
        };
        let resource = if host.ends_with(".managedhsm.azure.net") {
            "https://managedhsm.azure.net"
        } else {
            "https://vault.azure.net"
        };
        Ok(AzureKeyVault {
            http: rest::client(settings)?,
            base: key
                .endpoint_url
                .clone()
                .unwrap_or_else(|| format!("https://{host}")),
            name: name.to_owned(),
            version,
            resource,
            environment: settings.environment.clone(),
            tokens: TokenCache::default(),
        })
    }

    fn key_url(&self, version: Option<&str>, operation: &str) -> String {
        let mut url = format!("{}/keys/{}", self.base, self.name);
        if let Some(version) = version {
            url.push('/');
            url.push_str(version);
        }
        if !operation.is_empty() {
            url.push('/');
            url.push_str(operation);
        }
        url.push_str("?api-version=");
        url.push_str(API_VERSION);
        url
    }

    async fn token(&self) -> Result<Zeroizing<String>, ProviderError> {
        self.tokens.get(|| self.fetch_token()).await
    }

    async fn fetch_token(&self) -> Result<AccessToken, ProviderError> {
        let env = &self.environment;
        let scope = format!("{}/.default", self.resource);
        let authority = env
            .get("AZURE_AUTHORITY_HOST")
            .unwrap_or_else(|| "https://login.microsoftonline.com".to_owned());
        let authority = authority.trim_end_matches('/');
        if let (Some(tenant), Some(client)) =
            (env.get("AZURE_TENANT_ID"), env.get("AZURE_CLIENT_ID"))
        {
            let url = format!("{authority}/{tenant}/oauth2/v2.0/token");
            if let Some(secret) = env.get("AZURE_CLIENT_SECRET").map(Zeroizing::new) {
                return rest::fetch_token(self.http.post(url).form(&[
                    ("grant_type", "client_credentials"),
                    ("client_id", client.as_str()),
                    ("client_secret", secret.as_str()),
                    ("scope", scope.as_str()),
                ]))
                .await;
            }
            if let Some(file) = env.get("AZURE_FEDERATED_TOKEN_FILE") {
                let assertion = Zeroizing::new(
                    tokio::fs::read_to_string(&file)
                        .await
                        .map_err(|_| rest::no_credentials(&format!("cannot read {file}")))?,
                );
                return rest::fetch_token(self.http.post(url).form(&[
                    ("grant_type", "client_credentials"),
                    ("client_id", client.as_str()),
                    (
                        "client_assertion_type",
                        "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
                    ),
                    ("client_assertion", assertion.trim()),
                    ("scope", scope.as_str()),
                ]))
                .await;
            }
        }
        if let (Some(endpoint), Some(header)) =
            (env.get("IDENTITY_ENDPOINT"), env.get("IDENTITY_HEADER"))
        {
            let mut query = vec![("api-version", "2019-08-01"), ("resource", self.resource)];
            let client = env.get("AZURE_CLIENT_ID");
            if let Some(client) = client.as_deref() {
                query.push(("client_id", client));
            }
            return rest::fetch_token(
                self.http
                    .get(endpoint)
                    .query(&query)
                    .header("X-IDENTITY-HEADER", header),
            )
            .await;
        }
        let mut query = vec![("api-version", "2018-02-01"), ("resource", self.resource)];
        let client = env.get("AZURE_CLIENT_ID");
        if let Some(client) = client.as_deref() {
            query.push(("client_id", client));
        }
        rest::fetch_token(
            self.http
                .get("http://169.254.169.254/metadata/identity/oauth2/token")
                .query(&query)
                .header("Metadata", "true"),
        )
        .await
        .map_err(|mut e| {
            if e.kind == FailureKind::Unreachable || e.kind == FailureKind::Timeout {
                e.kind = FailureKind::Unauthenticated;
                e.message = "no AZURE_CLIENT_SECRET or AZURE_FEDERATED_TOKEN_FILE, and no managed identity endpoint answered".into();
            }
            e
        })
    }

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
        let (code, inner, message) = match serde_json::from_str::<ErrorBody>(&body) {
            Ok(body) => (
                body.error.code,
                body.error.innererror.map(|i| i.code).unwrap_or_default(),
                body.error.message,
            ),
            Err(_) => (
                format!("HTTP{}", status.as_u16()),
                String::new(),
                format!("HTTP {status}"),
            ),
        };
        let kind = kind_of(operation, status.as_u16(), &inner, &message);
        let code = if inner.is_empty() {
            code
        } else {
            format!("{code}/{inner}")
        };
        Err(ProviderError::new(operation, kind, code, message))
    }
}

/// Key Vault answers: 401 no or bad token, 403 with an inner code (a disabled key says so
/// in its message), 404 `KeyNotFound`, 429 throttled, 400 `BadParameter` for a value that
/// does not unwrap.
fn kind_of(operation: Operation, status: u16, inner: &str, message: &str) -> FailureKind {
    let lower = message.to_ascii_lowercase();
    match status {
        401 => FailureKind::Unauthenticated,
        403 if inner == "KeyDisabled" || lower.contains("disabled") => FailureKind::Disabled,
        403 if lower.contains("expired") || lower.contains("not yet valid") => {
            FailureKind::Disabled
        }
        403 => FailureKind::AccessDenied,
        404 => FailureKind::NotFound,
        409 if lower.contains("deleted") => FailureKind::PendingDeletion,
        429 => FailureKind::Throttled,
        400 if operation == Operation::Decrypt => FailureKind::InvalidCiphertext,
        500..=599 => FailureKind::ProviderFault,
        _ => FailureKind::Invalid,
    }
}

fn binding_tag(context: WrapContext<'_>) -> [u8; BINDING_BYTES] {
    let digest = Sha256::digest(context.binding());
    let mut tag = [0u8; BINDING_BYTES];
    tag.copy_from_slice(&digest[..BINDING_BYTES]);
    tag
}

fn malformed(operation: Operation, what: &str) -> ProviderError {
    ProviderError::new(
        operation,
        FailureKind::ProviderFault,
        "MalformedResponse",
        format!("the answer has no valid {what}"),
    )
}

fn not_ours(what: &str) -> ProviderError {
    ProviderError::new(
        Operation::Decrypt,
        FailureKind::InvalidCiphertext,
        "BindingMismatch",
        what.to_owned(),
    )
}

#[async_trait::async_trait]
impl MasterKeyProvider for AzureKeyVault {
    async fn wrap(
        &self,
        plaintext: &[u8],
        context: WrapContext<'_>,
    ) -> Result<Vec<u8>, ProviderError> {
        let mut bound = Zeroizing::new(plaintext.to_vec());
        bound.extend_from_slice(&binding_tag(context));
        let value = Zeroizing::new(b64url().encode(bound.as_slice()));
        let body = Zeroizing::new(
            serde_json::to_string(&KeyOperation {
                alg: ALGORITHM,
                value: &value,
            })
            .unwrap_or_default(),
        );
        let answer = self
            .call(Operation::Encrypt, |http| {
                http.post(self.key_url(self.version.as_deref(), "wrapkey"))
                    .header("content-type", "application/json")
                    .body(body.to_string())
            })
            .await?;
        let result: KeyOperationResult =
            serde_json::from_str(&answer).map_err(|_| malformed(Operation::Encrypt, "value"))?;
        // The version that wrapped it, from the answer's key id (…/keys/NAME/VERSION).
        let version = result
            .kid
            .as_deref()
            .and_then(|kid| kid.rsplit('/').next())
            .filter(|v| !v.is_empty() && *v != self.name)
            .map(str::to_owned)
            .or_else(|| self.version.clone())
            .ok_or_else(|| malformed(Operation::Encrypt, "kid"))?;
        Ok(format!("{BLOB_PREFIX}{version}:{}", result.value).into_bytes())
    }

    async fn unwrap(
        &self,
        wrapped: &[u8],
        context: WrapContext<'_>,
    ) -> Result<Zeroizing<Vec<u8>>, ProviderError> {
        let text = std::str::from_utf8(wrapped)
            .ok()
            .and_then(|t| t.strip_prefix(BLOB_PREFIX))
            .ok_or_else(|| not_ours("not a Key Vault wrapped key"))?;
        let (version, value) = text
            .split_once(':')
            .ok_or_else(|| not_ours("not a Key Vault wrapped key"))?;
        let body = serde_json::to_string(&KeyOperation {
            alg: ALGORITHM,
            value,
        })
        .unwrap_or_default();
        let answer = self
            .call(Operation::Decrypt, |http| {
                http.post(self.key_url(Some(version), "unwrapkey"))
                    .header("content-type", "application/json")
                    .body(body.clone())
            })
            .await?;
        let result: KeyOperationResult =
            serde_json::from_str(&answer).map_err(|_| malformed(Operation::Decrypt, "value"))?;
        let value = Zeroizing::new(result.value);
        let mut bound = Zeroizing::new(
            b64url()
                .decode(value.as_bytes())
                .map_err(|_| malformed(Operation::Decrypt, "value"))?,
        );
        if bound.len() < BINDING_BYTES {
            return Err(not_ours("the unwrapped value is too short"));
        }
        let split = bound.len() - BINDING_BYTES;
        if bound[split..] != binding_tag(context) {
            return Err(not_ours(
                "the wrapped key belongs to another organization or key version",
            ));
        }
        bound.truncate(split);
        Ok(bound)
    }

    async fn describe(&self) -> Result<KeyState, ProviderError> {
        let body = self
            .call(Operation::Describe, |http| {
                http.get(self.key_url(self.version.as_deref(), ""))
            })
            .await?;
        let answer: serde_json::Value =
            serde_json::from_str(&body).map_err(|_| malformed(Operation::Describe, "key"))?;
        let attributes = answer.get("attributes");
        let enabled = attributes
            .and_then(|a| a.get("enabled"))
            .and_then(|e| e.as_bool())
            .unwrap_or(false);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        let expired = attributes
            .and_then(|a| a.get("exp"))
            .and_then(|e| e.as_i64())
            .is_some_and(|exp| exp <= now);
        Ok(if !enabled {
            KeyState::Disabled
        } else if expired {
            KeyState::Unusable("Expired".into())
        } else {
            KeyState::Enabled
        })
    }
}
