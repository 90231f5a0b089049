//! AWS KMS through `aws-sdk-kms`: Encrypt/Decrypt with an encryption context naming the
//! organization (so the customer's CloudTrail shows which organization was accessed), and
//! DescribeKey for health. Credentials come from the default AWS chain (environment,
//! profile, web identity, ECS, instance metadata). The SDK's own retries are off: retries
//! are ours (`Retrying`), the same for every provider.

use aws_config::BehaviorVersion;
use aws_sdk_kms::config::retry::RetryConfig;
use aws_sdk_kms::config::timeout::TimeoutConfig;
use aws_sdk_kms::config::{Credentials, Region};
use aws_sdk_kms::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_kms::primitives::Blob;
use aws_sdk_kms::types::KeyState as AwsKeyState;
use aws_sdk_kms::Client;
use zeroize::Zeroizing;

use crate::{
    FailureKind, KeyState, KmsSettings, MasterKeyProvider, Operation, ProviderError, WrapContext,
};
use ekm_domain::MasterKeyRef;

/// Encryption context keys. AWS logs them in CloudTrail beside every call.
const CONTEXT_ORG: &str = "ekm-organization";
const CONTEXT_VERSION: &str = "ekm-key-version";

pub struct AwsKms {
    client: Client,
    key_id: String,
}

impl std::fmt::Debug for AwsKms {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AwsKms")
            .field("key_id", &self.key_id)
            .finish_non_exhaustive()
    }
}

impl AwsKms {
    pub async fn connect(key: &MasterKeyRef, settings: &KmsSettings) -> AwsKms {
        let mut loader = aws_config::defaults(BehaviorVersion::latest())
            .retry_config(RetryConfig::disabled())
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(settings.timeout)
                    .operation_attempt_timeout(settings.timeout)
                    .build(),
            );
        if let Some(region) = &key.region {
            loader = loader.region(Region::new(region.clone()));
        }
        if let Some(url) = &key.endpoint_url {
            loader = loader.endpoint_url(url);
        }
        let env = &settings.environment;
        if !env.is_process() {
            // A given environment stands in for the process's: read the standard variables
            // from it instead of letting the default chain read the real ones.
            loader = match (
                env.get("AWS_ACCESS_KEY_ID"),
                env.get("AWS_SECRET_ACCESS_KEY"),
            ) {
                (Some(id), Some(secret)) => loader.credentials_provider(Credentials::new(
                    id,
                    secret,
                    env.get("AWS_SESSION_TOKEN"),
                    None,
                    "ekm-environment",
                )),
                _ => loader.no_credentials(),
            };
        }
        let config = loader.load().await;
        let config = aws_sdk_kms::config::Builder::from(&config)
            .interceptor(ResponseCap)
            .build();
        AwsKms {
            client: Client::from_conf(config),
            key_id: key.key_id.clone(),
        }
    }
}

/// Refuses answers that announce more than the REST providers' cap before the SDK reads
/// them. The SDK follows no redirects (it has no redirect support), so no policy is needed.
#[derive(Debug)]
struct ResponseCap;

impl aws_sdk_kms::config::Intercept for ResponseCap {
    fn name(&self) -> &'static str {
        "ekm-response-cap"
    }

    fn read_before_deserialization(
        &self,
        context: &aws_sdk_kms::config::interceptors::BeforeDeserializationInterceptorContextRef<'_>,
        _components: &aws_sdk_kms::config::RuntimeComponents,
        _cfg: &mut aws_sdk_kms::config::ConfigBag,
    ) -> Result<(), aws_sdk_kms::error::BoxError> {
        let announced = context
            .response()
            .headers()
            .get("content-length")
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
        if announced > crate::rest::MAX_RESPONSE_BYTES as u64 {
            return Err("the answer is larger than the provider response cap".into());
        }
        Ok(())
    }
}

fn classify<E>(
    operation: Operation,
    error: SdkError<E, aws_sdk_kms::config::http::HttpResponse>,
) -> ProviderError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    // The SDK's text names the endpoint and DNS or connection errors: logged, never shown.
    let detail = DisplayErrorContext(&error).to_string();
    let safe = |kind: FailureKind, code: &str, message: &str| {
        tracing::warn!(
            operation = operation.as_str(),
            kind = kind.as_str(),
            code,
            detail = %detail,
            "AWS KMS request failed"
        );
        ProviderError::new(operation, kind, code, message)
    };
    match &error {
        SdkError::TimeoutError(_) => safe(
            FailureKind::Timeout,
            "Timeout",
            "the endpoint did not answer in time",
        ),
        SdkError::DispatchFailure(failure) => {
            if failure.is_timeout() {
                safe(
                    FailureKind::Timeout,
                    "DispatchFailure",
                    "the endpoint did not answer in time",
                )
            } else if failure.is_user() {
                safe(
                    FailureKind::Unauthenticated,
                    "DispatchFailure",
                    "the request could not be sent: no usable credentials or configuration",
                )
            } else {
                safe(
                    FailureKind::Unreachable,
                    "DispatchFailure",
                    "the endpoint could not be reached",
                )
            }
        }
        // Mostly: no credentials could be found to sign the request.
        SdkError::ConstructionFailure(_) => safe(
            FailureKind::Unauthenticated,
            "ConstructionFailure",
            "the request could not be built: no usable credentials or configuration",
        ),
        SdkError::ServiceError(service) => {
            let status = service.raw().status().as_u16();
            let code = service.err().code().unwrap_or("Unknown").to_owned();
            let message = service
                .err()
                .message()
                .map(str::to_owned)
                .unwrap_or_else(|| format!("HTTP {status}"));
            ProviderError::new(operation, kind_of(&code, status), code, message)
        }
        _ => safe(
            FailureKind::ProviderFault,
            "ResponseError",
            "the answer could not be read",
        ),
    }
}

/// AWS KMS error codes (documented per operation in the KMS API reference).
fn kind_of(code: &str, status: u16) -> FailureKind {
    match code {
        "DisabledException" => FailureKind::Disabled,
        "KMSInvalidStateException" => FailureKind::PendingDeletion,
        "AccessDeniedException" => FailureKind::AccessDenied,
        "NotFoundException" => FailureKind::NotFound,
        "InvalidCiphertextException" | "IncorrectKeyException" => FailureKind::InvalidCiphertext,
        "ThrottlingException" | "LimitExceededException" | "RequestLimitExceeded" => {
            FailureKind::Throttled
        }
        "UnrecognizedClientException"
        | "InvalidSignatureException"
        | "ExpiredTokenException"
        | "IncompleteSignature"
        | "MissingAuthenticationToken" => FailureKind::Unauthenticated,
        "KMSInternalException"
        | "DependencyTimeoutException"
        | "KeyUnavailableException"
        | "InternalFailure"
        | "ServiceUnavailable" => FailureKind::ProviderFault,
        _ if status == 429 => FailureKind::Throttled,
        _ if status >= 500 => FailureKind::ProviderFault,
        _ => FailureKind::Invalid,
    }
}

#[async_trait::async_trait]
impl MasterKeyProvider for AwsKms {
    async fn wrap(
        &self,
        plaintext: &[u8],
        context: WrapContext<'_>,
    ) -> Result<Vec<u8>, ProviderError> {
        let output = self
            .client
            .encrypt()
            .key_id(&self.key_id)
            .plaintext(Blob::new(plaintext))
            .encryption_context(CONTEXT_ORG, context.org_id)
            .encryption_context(CONTEXT_VERSION, context.version_label())
            .send()
            .await
            .map_err(|e| classify(Operation::Encrypt, e))?;
        output
            .ciphertext_blob()
            .map(|blob| blob.as_ref().to_vec())
            .ok_or_else(|| {
                ProviderError::new(
                    Operation::Encrypt,
                    FailureKind::ProviderFault,
                    "EmptyResponse",
                    "Encrypt returned no ciphertext",
                )
            })
    }

    async fn unwrap(
        &self,
        wrapped: &[u8],
        context: WrapContext<'_>,
    ) -> Result<Zeroizing<Vec<u8>>, ProviderError> {
        let mut output = self
            .client
            .decrypt()
            .key_id(&self.key_id)
            .ciphertext_blob(Blob::new(wrapped))
            .encryption_context(CONTEXT_ORG, context.org_id)
            .encryption_context(CONTEXT_VERSION, context.version_label())
            .send()
            .await
            .map_err(|e| classify(Operation::Decrypt, e))?;
        output
            .plaintext
            .take()
            .map(|blob| Zeroizing::new(blob.into_inner()))
            .ok_or_else(|| {
                ProviderError::new(
                    Operation::Decrypt,
                    FailureKind::ProviderFault,
                    "EmptyResponse",
                    "Decrypt returned no plaintext",
                )
            })
    }

    async fn describe(&self) -> Result<KeyState, ProviderError> {
        let output = self
            .client
            .describe_key()
            .key_id(&self.key_id)
            .send()
            .await
            .map_err(|e| classify(Operation::Describe, e))?;
        let state = output
            .key_metadata()
            .and_then(|m| m.key_state())
            .ok_or_else(|| {
                ProviderError::new(
                    Operation::Describe,
                    FailureKind::ProviderFault,
                    "EmptyResponse",
                    "DescribeKey returned no key state",
                )
            })?;
        Ok(match state {
            AwsKeyState::Enabled => KeyState::Enabled,
            AwsKeyState::Disabled => KeyState::Disabled,
            AwsKeyState::PendingDeletion | AwsKeyState::PendingReplicaDeletion => {
                KeyState::PendingDeletion
            }
            other => KeyState::Unusable(other.as_str().to_owned()),
        })
    }
}
