//! Master-key providers behind one trait: the platform's own key (`local`), AWS KMS, Google
//! Cloud KMS and Azure Key Vault. A provider wraps and unwraps an organization's key and
//! says whether the key can be used; nothing else.
//!
//! Architecture invariant: providers never see a scope key other than an organization's,
//! never log key bytes, and classify every failure as the customer's decision (disabled,
//! scheduled for deletion, access removed, not found) or an outage (timeout, throttling,
//! 5xx, unreachable), because the two are handled differently: the first fails closed at
//! once, the second is retried and tolerated for a grace period.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use ekm_domain::{MasterKeyRef, Provider, UnavailableReason};
use zeroize::Zeroizing;

mod aws;
mod azure;
mod endpoint;
mod gcp;
mod local;
mod rest;

pub use aws::AwsKms;
pub use azure::AzureKeyVault;
pub use endpoint::{Endpoint, EndpointError, EndpointPattern};
pub use gcp::GcpKms;
pub use local::LocalProvider;

/// What an organization key's wrapping is bound to: the customer's KMS logs show the
/// organization (AWS encryption context, GCP additional authenticated data), and a wrapped
/// key moved to another organization or version does not unwrap.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WrapContext<'a> {
    pub org_id: &'a str,
    /// The key version, or the wrapping key's epoch.
    pub key_version: u32,
    pub purpose: WrapPurpose,
}

/// What the master key wraps: an organization key version (before wrapping keys existed)
/// or an epoch of the organization's wrapping key (ADR 0013). The two never share a
/// binding, so one cannot be passed off as the other.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum WrapPurpose {
    KeyVersion,
    WrappingKey,
}

impl WrapContext<'_> {
    /// An organization key version.
    pub fn key_version(org_id: &str, key_version: u32) -> WrapContext<'_> {
        WrapContext {
            org_id,
            key_version,
            purpose: WrapPurpose::KeyVersion,
        }
    }

    /// An epoch of an organization's wrapping key.
    pub fn wrapping_key(org_id: &str, epoch: u32) -> WrapContext<'_> {
        WrapContext {
            org_id,
            key_version: epoch,
            purpose: WrapPurpose::WrappingKey,
        }
    }

    /// The version as the binding names it: `7` for a key version, `w7` for a wrapping
    /// key's epoch (the AWS encryption context's `ekm-key-version`).
    pub fn version_label(&self) -> String {
        match self.purpose {
            WrapPurpose::KeyVersion => self.key_version.to_string(),
            WrapPurpose::WrappingKey => format!("w{}", self.key_version),
        }
    }

    /// The associated data the platform's local key binds: label, organization, version.
    pub fn local_binding(&self) -> [Vec<u8>; 3] {
        let label: &[u8] = match self.purpose {
            WrapPurpose::KeyVersion => b"ekm-org-kek-v1",
            WrapPurpose::WrappingKey => b"ekm-org-wrap-v1",
        };
        [
            label.to_vec(),
            self.org_id.as_bytes().to_vec(),
            self.key_version.to_string().into_bytes(),
        ]
    }

    /// The same binding as bytes, for providers without a native context.
    fn binding(&self) -> Vec<u8> {
        match self.purpose {
            WrapPurpose::KeyVersion => {
                format!("ekm-org-kek-v1|{}|{}", self.org_id, self.key_version).into_bytes()
            }
            WrapPurpose::WrappingKey => {
                format!("ekm-org-wrap-v1|{}|{}", self.org_id, self.key_version).into_bytes()
            }
        }
    }
}

/// The state a provider reports for the key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeyState {
    Enabled,
    Disabled,
    PendingDeletion,
    /// Anything else the provider says (`PendingImport`, `DESTROYED`, ...), as it says it.
    Unusable(String),
}

impl KeyState {
    /// Why the key cannot be used, or `None` when it can.
    pub fn unavailable_reason(&self) -> Option<UnavailableReason> {
        match self {
            KeyState::Enabled => None,
            KeyState::Disabled => Some(UnavailableReason::Disabled),
            KeyState::PendingDeletion | KeyState::Unusable(_) => {
                Some(UnavailableReason::PendingDeletion)
            }
        }
    }
}

/// The provider call that failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Operation {
    Credentials,
    Encrypt,
    Decrypt,
    Describe,
}

impl Operation {
    pub fn as_str(self) -> &'static str {
        match self {
            Operation::Credentials => "credentials",
            Operation::Encrypt => "encrypt",
            Operation::Decrypt => "decrypt",
            Operation::Describe => "describe",
        }
    }
}

/// What kind of failure a provider reported.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailureKind {
    Disabled,
    PendingDeletion,
    AccessDenied,
    NotFound,
    /// The wrapped key does not belong to this key or context.
    InvalidCiphertext,
    /// The platform has no usable credentials for the provider.
    Unauthenticated,
    /// The request was malformed for the provider (wrong key type, bad name).
    Invalid,
    Throttled,
    Timeout,
    Unreachable,
    /// The provider answered 5xx or an internal error.
    ProviderFault,
}

impl FailureKind {
    /// Worth retrying after a pause.
    pub fn is_transient(self) -> bool {
        matches!(
            self,
            FailureKind::Throttled
                | FailureKind::Timeout
                | FailureKind::Unreachable
                | FailureKind::ProviderFault
        )
    }

    /// The customer's decision, which makes the organization `unavailable` at once.
    pub fn customer_reason(self) -> Option<UnavailableReason> {
        match self {
            FailureKind::Disabled => Some(UnavailableReason::Disabled),
            FailureKind::PendingDeletion => Some(UnavailableReason::PendingDeletion),
            FailureKind::AccessDenied => Some(UnavailableReason::AccessDenied),
            FailureKind::NotFound => Some(UnavailableReason::NotFound),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            FailureKind::Disabled => "disabled",
            FailureKind::PendingDeletion => "pending_deletion",
            FailureKind::AccessDenied => "access_denied",
            FailureKind::NotFound => "not_found",
            FailureKind::InvalidCiphertext => "invalid_ciphertext",
            FailureKind::Unauthenticated => "unauthenticated",
            FailureKind::Invalid => "invalid_request",
            FailureKind::Throttled => "throttled",
            FailureKind::Timeout => "timeout",
            FailureKind::Unreachable => "unreachable",
            FailureKind::ProviderFault => "provider_fault",
        }
    }

    /// What the customer (or operator) must do about it, in one sentence.
    pub fn remedy(self, provider: Provider) -> &'static str {
        match (self, provider) {
            (FailureKind::Disabled, _) => "enable the key in your KMS",
            (FailureKind::PendingDeletion, _) => {
                "cancel the key's scheduled deletion (a destroyed key cannot come back)"
            }
            (FailureKind::AccessDenied, Provider::AwsKms) => {
                "grant the platform's role kms:Encrypt, kms:Decrypt and kms:DescribeKey in the key policy (docs/byok/aws.md)"
            }
            (FailureKind::AccessDenied, Provider::GcpKms) => {
                "grant the platform's service account roles/cloudkms.cryptoKeyEncrypterDecrypter and roles/cloudkms.viewer on the key (docs/byok/gcp.md)"
            }
            (FailureKind::AccessDenied, _) => {
                "grant the platform's identity wrapKey, unwrapKey and get on the key (docs/byok/azure.md)"
            }
            (FailureKind::NotFound, _) => "check the key id and region: the key does not exist",
            (FailureKind::InvalidCiphertext, _) => {
                "the key cannot decrypt what it encrypted: use a symmetric encryption key (AWS, GCP) or an RSA key (Azure)"
            }
            (FailureKind::Unauthenticated, _) => {
                "the platform has no valid credentials for this provider: the operator must configure them"
            }
            (FailureKind::Invalid, _) => {
                "the provider refused the request: check that the key is a symmetric encryption key (AWS, GCP) or an RSA key (Azure)"
            }
            (FailureKind::Throttled, _) => "the provider is throttling requests: retry later",
            (FailureKind::Timeout | FailureKind::Unreachable, _) => {
                "the endpoint could not be reached: check endpoint_url, region and network access"
            }
            (FailureKind::ProviderFault, _) => "the provider failed: retry later",
        }
    }
}

impl fmt::Display for FailureKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A provider call that failed. The message is the provider's (it names keys, never key
/// material) or ours, and is safe to show to the customer: network detail (URLs, addresses,
/// DNS and connection errors) is logged where it happens and never put here.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{operation} failed ({kind}): {code}: {message}", operation = .operation.as_str())]
pub struct ProviderError {
    pub operation: Operation,
    pub kind: FailureKind,
    /// The provider's own error code (`DisabledException`, `PERMISSION_DENIED`, ...).
    pub code: String,
    pub message: String,
}

impl ProviderError {
    pub fn new(
        operation: Operation,
        kind: FailureKind,
        code: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        let mut message: String = message.into();
        if message.len() > 500 {
            let mut end = 500;
            while !message.is_char_boundary(end) {
                end -= 1;
            }
            message.truncate(end);
        }
        ProviderError {
            operation,
            kind,
            code: code.into(),
            message,
        }
    }
}

/// An error and its sources on one line, for the log (never for clients: it may name
/// URLs, addresses and DNS failures).
pub(crate) fn error_detail(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// A master key provider.
#[async_trait::async_trait]
pub trait MasterKeyProvider: Send + Sync + fmt::Debug {
    /// Encrypts an organization key (64 bytes) under the master key.
    async fn wrap(
        &self,
        plaintext: &[u8],
        context: WrapContext<'_>,
    ) -> Result<Vec<u8>, ProviderError>;
    /// Decrypts what `wrap` returned, for the same context.
    async fn unwrap(
        &self,
        wrapped: &[u8],
        context: WrapContext<'_>,
    ) -> Result<Zeroizing<Vec<u8>>, ProviderError>;
    /// The key's state, as the provider reports it (DescribeKey and its equivalents).
    async fn describe(&self) -> Result<KeyState, ProviderError>;
}

/// Where credentials come from: the process environment, or (in tests) a given map. Every
/// provider reads the variables its platform documents.
#[derive(Clone, Debug, Default)]
pub struct Environment {
    overrides: Option<Arc<HashMap<String, String>>>,
}

impl Environment {
    /// The process environment.
    pub fn process() -> Self {
        Environment { overrides: None }
    }

    /// Exactly these variables and nothing from the process.
    pub fn from_map(vars: HashMap<String, String>) -> Self {
        Environment {
            overrides: Some(Arc::new(vars)),
        }
    }

    pub fn get(&self, name: &str) -> Option<String> {
        match &self.overrides {
            Some(vars) => vars.get(name).cloned(),
            None => std::env::var(name).ok(),
        }
        .filter(|v| !v.is_empty())
    }

    fn is_process(&self) -> bool {
        self.overrides.is_none()
    }
}

/// How providers are called: timeouts, retries and credentials.
#[derive(Clone, Debug)]
pub struct KmsSettings {
    /// Each attempt's time limit.
    pub timeout: Duration,
    /// Attempts per call for transient failures (throttling, timeouts, 5xx).
    pub attempts: u32,
    /// The first pause between attempts; doubled each time, with jitter.
    pub backoff: Duration,
    pub environment: Environment,
    /// The `endpoint_url`s a customer key may name (VPC endpoints, private links, test
    /// servers), as the operator configured them: `scheme://host[:port]`, where one DNS label
    /// may hold one `*` (`https://vpce-*.kms.eu-west-1.vpce.amazonaws.com`) or the port may be
    /// `*` (`endpoint::EndpointPattern`). Any other is refused: a provider sends the
    /// platform's credentials (a bearer token, or SigV4-signed requests) to its endpoint.
    pub allowed_endpoints: Vec<String>,
}

impl KmsSettings {
    /// Whether `endpoint` is allowed: it parses as a canonical origin and one of the
    /// operator's patterns matches its scheme, host and port. A pattern that does not parse
    /// allows nothing (`validate_allowed_endpoints` refuses it at start-up).
    pub fn endpoint_allowed(&self, endpoint: &str) -> bool {
        let Ok(endpoint) = Endpoint::parse(endpoint) else {
            return false;
        };
        self.allowed_endpoints.iter().any(|allowed| {
            EndpointPattern::parse(allowed).is_ok_and(|pattern| pattern.matches(&endpoint))
        })
    }

    /// Checks every allow-list pattern, naming the first bad one (the operator's own
    /// configuration, safe to show them).
    pub fn validate_allowed_endpoints(&self) -> Result<(), (String, EndpointError)> {
        for pattern in &self.allowed_endpoints {
            EndpointPattern::parse(pattern).map_err(|error| (pattern.clone(), error))?;
        }
        Ok(())
    }
}

impl Default for KmsSettings {
    fn default() -> Self {
        KmsSettings {
            timeout: Duration::from_secs(5),
            attempts: 3,
            backoff: Duration::from_millis(200),
            environment: Environment::process(),
            allowed_endpoints: vec![],
        }
    }
}

/// Builds the provider for a customer key.
pub async fn provider_for(
    key: &MasterKeyRef,
    settings: &KmsSettings,
) -> Result<Arc<dyn MasterKeyProvider>, ProviderError> {
    if let Some(endpoint) = &key.endpoint_url {
        if !settings.endpoint_allowed(endpoint) {
            return Err(ProviderError::new(
                Operation::Credentials,
                FailureKind::Invalid,
                "EndpointNotAllowed",
                // Never the URL: errors reach clients, and the URL is theirs to echo or not.
                "endpoint_url is not among the endpoints the operator allows (--kms-allowed-endpoints)",
            ));
        }
    }
    let inner: Arc<dyn MasterKeyProvider> = match key.provider {
        Provider::AwsKms => Arc::new(AwsKms::connect(key, settings).await),
        Provider::GcpKms => Arc::new(GcpKms::new(key, settings)?),
        Provider::AzureKeyVault => Arc::new(AzureKeyVault::new(key, settings)?),
        Provider::Local => {
            return Err(ProviderError::new(
                Operation::Describe,
                FailureKind::Invalid,
                "LocalIsNotACustomerKey",
                "the local provider is the platform's own key",
            ))
        }
    };
    Ok(Arc::new(Retrying {
        inner,
        settings: settings.clone(),
    }))
}

/// Retries transient failures with exponential backoff and bounds every attempt in time.
#[derive(Debug)]
pub struct Retrying {
    inner: Arc<dyn MasterKeyProvider>,
    settings: KmsSettings,
}

impl Retrying {
    pub fn new(inner: Arc<dyn MasterKeyProvider>, settings: KmsSettings) -> Self {
        Retrying { inner, settings }
    }

    async fn call<T, F, Fut>(&self, operation: Operation, attempt: F) -> Result<T, ProviderError>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<T, ProviderError>>,
    {
        let mut pause = self.settings.backoff;
        let attempts = self.settings.attempts.max(1);
        let mut tried = 0;
        loop {
            tried += 1;
            let result = match tokio::time::timeout(self.settings.timeout, attempt()).await {
                Ok(result) => result,
                Err(_) => Err(ProviderError::new(
                    operation,
                    FailureKind::Timeout,
                    "Timeout",
                    format!("no answer within {:?}", self.settings.timeout),
                )),
            };
            match result {
                Err(error) if error.kind.is_transient() && tried < attempts => {
                    tracing::warn!(
                        operation = operation.as_str(),
                        kind = error.kind.as_str(),
                        code = %error.code,
                        attempt = tried,
                        "master key provider call failed; retrying"
                    );
                    let jitter = rand::random_range(0.5..1.5);
                    tokio::time::sleep(pause.mul_f64(jitter)).await;
                    pause = pause.saturating_mul(2);
                }
                other => return other,
            }
        }
    }
}

#[async_trait::async_trait]
impl MasterKeyProvider for Retrying {
    async fn wrap(
        &self,
        plaintext: &[u8],
        context: WrapContext<'_>,
    ) -> Result<Vec<u8>, ProviderError> {
        self.call(Operation::Encrypt, || self.inner.wrap(plaintext, context))
            .await
    }

    async fn unwrap(
        &self,
        wrapped: &[u8],
        context: WrapContext<'_>,
    ) -> Result<Zeroizing<Vec<u8>>, ProviderError> {
        self.call(Operation::Decrypt, || self.inner.unwrap(wrapped, context))
            .await
    }

    async fn describe(&self) -> Result<KeyState, ProviderError> {
        self.call(Operation::Describe, || self.inner.describe())
            .await
    }
}

/// Validates a customer key before it is used: the key is enabled, and what it encrypts
/// (bound to this organization) it decrypts to the same bytes. The error names the step.
pub async fn round_trip(
    provider: &dyn MasterKeyProvider,
    org_id: &str,
) -> Result<(), ProviderError> {
    let state = provider.describe().await?;
    if let Some(reason) = state.unavailable_reason() {
        let kind = match reason {
            UnavailableReason::Disabled => FailureKind::Disabled,
            _ => FailureKind::PendingDeletion,
        };
        return Err(ProviderError::new(
            Operation::Describe,
            kind,
            format!("{state:?}"),
            format!("the key's state is {state:?}"),
        ));
    }
    let probe: Zeroizing<Vec<u8>> = Zeroizing::new((0..64).map(|_| rand::random()).collect());
    // Version 0 is never a real key version: the probe cannot be confused with a key.
    let context = WrapContext::key_version(org_id, 0);
    let wrapped = provider.wrap(&probe, context).await?;
    let unwrapped = provider.unwrap(&wrapped, context).await?;
    if unwrapped.as_slice() != probe.as_slice() {
        return Err(ProviderError::new(
            Operation::Decrypt,
            FailureKind::InvalidCiphertext,
            "RoundTripMismatch",
            "the key decrypted the probe to different bytes",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[derive(Debug)]
    struct Flaky {
        failures: AtomicU32,
        kind: FailureKind,
    }

    #[async_trait::async_trait]
    impl MasterKeyProvider for Flaky {
        async fn wrap(&self, p: &[u8], _: WrapContext<'_>) -> Result<Vec<u8>, ProviderError> {
            if self.failures.fetch_sub(1, Ordering::SeqCst) > 0 {
                return Err(ProviderError::new(Operation::Encrypt, self.kind, "X", "x"));
            }
            Ok(p.to_vec())
        }
        async fn unwrap(
            &self,
            w: &[u8],
            _: WrapContext<'_>,
        ) -> Result<Zeroizing<Vec<u8>>, ProviderError> {
            Ok(Zeroizing::new(w.to_vec()))
        }
        async fn describe(&self) -> Result<KeyState, ProviderError> {
            std::future::pending().await
        }
    }

    fn settings(attempts: u32) -> KmsSettings {
        KmsSettings {
            timeout: Duration::from_millis(200),
            attempts,
            backoff: Duration::from_millis(1),
            environment: Environment::from_map(HashMap::new()),
            allowed_endpoints: vec![],
        }
    }

    const CONTEXT: WrapContext<'static> = WrapContext {
        org_id: "org",
        key_version: 1,
        purpose: WrapPurpose::KeyVersion,
    };

    #[test]
    fn only_allowed_endpoints_are_used() {
        let settings = KmsSettings {
            allowed_endpoints: vec![
                "https://kms.internal.example".into(),
                "https://vpce-*.kms.eu-west-1.vpce.amazonaws.com/".into(),
            ],
            ..KmsSettings::default()
        };
        assert!(settings.endpoint_allowed("https://kms.internal.example"));
        assert!(settings.endpoint_allowed("https://vpce-0abc.kms.eu-west-1.vpce.amazonaws.com"));
        assert!(!settings.endpoint_allowed("https://evil.example"));
        assert!(
            !settings.endpoint_allowed("https://vpce-0abc.kms.eu-west-1.vpce.amazonaws.com.evil")
        );
        assert!(!KmsSettings::default().endpoint_allowed("https://kms.internal.example"));
        // Issue 14: a string suffix match let a path carry the allowed suffix.
        let google = KmsSettings {
            allowed_endpoints: vec!["https://*.p.googleapis.com".into()],
            ..KmsSettings::default()
        };
        assert!(!google.endpoint_allowed("https://127.0.0.1:9443/.p.googleapis.com"));
        assert!(google.endpoint_allowed("https://eu.p.googleapis.com"));
        let bad = KmsSettings {
            allowed_endpoints: vec!["https://ok.example".into(), "https://*".into()],
            ..KmsSettings::default()
        };
        assert_eq!(
            bad.validate_allowed_endpoints(),
            Err(("https://*".to_owned(), EndpointError::Wildcard))
        );
    }

    #[tokio::test]
    async fn transient_failures_are_retried_until_attempts_run_out() {
        let flaky = Arc::new(Flaky {
            failures: AtomicU32::new(2),
            kind: FailureKind::Throttled,
        });
        let retrying = Retrying::new(flaky.clone(), settings(3));
        assert_eq!(retrying.wrap(b"k", CONTEXT).await.unwrap(), b"k");

        flaky.failures.store(3, Ordering::SeqCst);
        let error = retrying.wrap(b"k", CONTEXT).await.unwrap_err();
        assert_eq!(error.kind, FailureKind::Throttled);
    }

    #[tokio::test]
    async fn customer_decisions_are_not_retried() {
        let flaky = Arc::new(Flaky {
            failures: AtomicU32::new(1),
            kind: FailureKind::Disabled,
        });
        let retrying = Retrying::new(flaky.clone(), settings(3));
        let error = retrying.wrap(b"k", CONTEXT).await.unwrap_err();
        assert_eq!(error.kind, FailureKind::Disabled);
        // One attempt only: the next call succeeds on its first try.
        assert!(retrying.wrap(b"k", CONTEXT).await.is_ok());
    }

    #[tokio::test]
    async fn a_call_that_never_answers_times_out() {
        let flaky = Arc::new(Flaky {
            failures: AtomicU32::new(0),
            kind: FailureKind::Throttled,
        });
        let retrying = Retrying::new(flaky, settings(2));
        let error = retrying.describe().await.unwrap_err();
        assert_eq!(error.kind, FailureKind::Timeout);
        assert_eq!(error.operation, Operation::Describe);
    }
}
