//! Every refusal is `application/problem+json` (RFC 9457) with a stable `code`.
//!
//! Internal and external messages are kept apart: a client sees the rule it broke, never
//! SQL, stack traces or key material; operators see the full error chain in the log, once.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use ekm_domain::{ScopeError, ScopeId};
use ekm_projections::error_chain;
use serde_json::{json, Value};

use ekm_service::keys::KeyError;
use ekm_service::AppError;

/// The stable problem codes. Clients match on these; they never change meaning.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Code {
    InvalidRequest,
    Unauthorized,
    Forbidden,
    NotFound,
    Conflict,
    PlanRequired,
    ScopePaused,
    /// The scope (or an ancestor) waits for its revocation's due time.
    ScopePendingRevocation,
    ScopeRevoked,
    KeyUnavailable,
    ClassNotCovered,
    /// The path's justification policy requires a reason and the request gave none.
    JustificationRequired,
    /// The path's justification policy does not accept the request's reason.
    JustificationNotAllowed,
    /// A justification policy that, with the policies above it, would admit no request.
    JustificationPolicyConflict,
    InvalidCiphertext,
    /// The ciphertext's key version is below the scope's decryption floor.
    KeyVersionDisabled,
    /// A customer master key failed validation when connecting it.
    MasterKeyUnusable,
    Unavailable,
    /// The change was committed, but could not be read back: do not repeat the request.
    CommittedUnconfirmed,
    /// Too many requests in flight (or for one expensive endpoint): retry after `Retry-After`.
    Overloaded,
    /// The request did not complete in time (408: its body did not arrive; 503: no answer).
    RequestTimeout,
    /// An `Idempotency-Key` already used by this principal with another request.
    IdempotencyKeyReused,
    /// Over a rate limit of the principal or the organization: retry after `Retry-After`.
    RateLimited,
    Internal,
}

impl Code {
    /// Every code, in the order of the enum (the OpenAPI document lists them all).
    pub const ALL: [Code; 24] = [
        Code::InvalidRequest,
        Code::Unauthorized,
        Code::Forbidden,
        Code::NotFound,
        Code::Conflict,
        Code::PlanRequired,
        Code::ScopePaused,
        Code::ScopePendingRevocation,
        Code::ScopeRevoked,
        Code::KeyUnavailable,
        Code::ClassNotCovered,
        Code::JustificationRequired,
        Code::JustificationNotAllowed,
        Code::JustificationPolicyConflict,
        Code::InvalidCiphertext,
        Code::KeyVersionDisabled,
        Code::MasterKeyUnusable,
        Code::Unavailable,
        Code::CommittedUnconfirmed,
        Code::Overloaded,
        Code::RequestTimeout,
        Code::IdempotencyKeyReused,
        Code::RateLimited,
        Code::Internal,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Code::InvalidRequest => "invalid_request",
            Code::Unauthorized => "unauthorized",
            Code::Forbidden => "forbidden",
            Code::NotFound => "not_found",
            Code::Conflict => "conflict",
            Code::PlanRequired => "plan_required",
            Code::ScopePaused => "scope_paused",
            Code::ScopePendingRevocation => "scope_pending_revocation",
            Code::ScopeRevoked => "scope_revoked",
            Code::KeyUnavailable => "key_unavailable",
            Code::ClassNotCovered => "class_not_covered",
            Code::JustificationRequired => "justification_required",
            Code::JustificationNotAllowed => "justification_not_allowed",
            Code::JustificationPolicyConflict => "justification_policy_conflict",
            Code::InvalidCiphertext => "invalid_ciphertext",
            Code::KeyVersionDisabled => "key_version_disabled",
            Code::MasterKeyUnusable => "master_key_unusable",
            Code::Unavailable => "unavailable",
            Code::CommittedUnconfirmed => "committed_unconfirmed",
            Code::IdempotencyKeyReused => "idempotency_key_reused",
            Code::RateLimited => "rate_limited",
            Code::Overloaded => "overloaded",
            Code::RequestTimeout => "request_timeout",
            Code::Internal => "internal",
        }
    }

    fn title(self) -> &'static str {
        match self {
            Code::InvalidRequest => "The request is not valid",
            Code::Unauthorized => "A valid bearer token is required",
            Code::Forbidden => "This token may not do that",
            Code::NotFound => "Not found",
            Code::Conflict => "The request conflicts with the current state",
            Code::PlanRequired => "This needs the enterprise plan",
            Code::ScopePaused => "The scope is paused",
            Code::ScopePendingRevocation => "The scope's revocation is pending",
            Code::ScopeRevoked => "The scope is revoked",
            Code::KeyUnavailable => "The key is unavailable",
            Code::ClassNotCovered => {
                "This data class is not encrypted under the organization's tier"
            }
            Code::JustificationRequired => "An access justification is required",
            Code::JustificationNotAllowed => "This access justification is not allowed here",
            Code::JustificationPolicyConflict => {
                "The policy would admit no justification with the policies above it"
            }
            Code::InvalidCiphertext => "The ciphertext cannot be decrypted here",
            Code::KeyVersionDisabled => "This key version no longer decrypts",
            Code::MasterKeyUnusable => "The master key cannot be used",
            Code::Unavailable => "The service is temporarily unavailable",
            Code::CommittedUnconfirmed => "The change was recorded but not confirmed",
            Code::Overloaded => "The server is overloaded",
            Code::RequestTimeout => "The request did not complete in time",
            Code::IdempotencyKeyReused => "The idempotency key was used with another request",
            Code::RateLimited => "Too many requests",
            Code::Internal => "Internal error",
        }
    }
}

/// A problem response.
#[derive(Clone, Debug)]
pub struct ApiError {
    status: StatusCode,
    code: Code,
    detail: String,
    extensions: Vec<(&'static str, Value)>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: Code, detail: impl Into<String>) -> Self {
        Self {
            status,
            code,
            detail: detail.into(),
            extensions: vec![],
        }
    }

    pub fn invalid(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, Code::InvalidRequest, detail)
    }

    pub fn unauthorized() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            Code::Unauthorized,
            "send `Authorization: Bearer <token>` with a valid, unexpired token",
        )
    }

    pub fn forbidden(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, Code::Forbidden, detail)
    }

    pub fn not_found(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, Code::NotFound, detail)
    }

    pub fn with(mut self, key: &'static str, value: Value) -> Self {
        self.extensions.push((key, value));
        self
    }

    pub fn code(&self) -> Code {
        self.code
    }

    pub fn status(&self) -> StatusCode {
        self.status
    }

    pub(crate) fn body(&self) -> Value {
        let mut body = json!({
            "type": format!("urn:ekm:problem:{}", self.code.as_str()),
            "title": self.code.title(),
            "status": self.status.as_u16(),
            "code": self.code.as_str(),
            "detail": self.detail,
        });
        if let Some(object) = body.as_object_mut() {
            for (key, value) in &self.extensions {
                object.insert((*key).to_owned(), value.clone());
            }
        }
        body
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = self.body().to_string();
        let mut response = (self.status, body).into_response();
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        // Every 503 says when to try again (the load shedder sets its own first).
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            response
                .headers_mut()
                .entry(header::RETRY_AFTER)
                .or_insert(HeaderValue::from_static("1"));
        }
        response
    }
}

fn cause(scope: ScopeId) -> Value {
    json!({ "scope_id": scope.to_string() })
}

impl From<ScopeError> for ApiError {
    fn from(error: ScopeError) -> Self {
        let detail = error.to_string();
        let conflict = StatusCode::CONFLICT;
        match error {
            ScopeError::AlreadyExists(_) => ApiError::new(conflict, Code::Conflict, detail),
            ScopeError::NotFound | ScopeError::TokenNotFound | ScopeError::GrantNotFound => {
                ApiError::not_found(detail)
            }
            ScopeError::InvalidParent { .. }
            | ScopeError::TooDeep { .. }
            | ScopeError::NotAnOrganization
            | ScopeError::CannotRetireCurrent { .. }
            | ScopeError::FloorAboveCurrent { .. }
            | ScopeError::ConfirmationMismatch
            | ScopeError::ByokNeedsMasterKey
            | ScopeError::ByokTierMismatch => ApiError::invalid(detail),
            ScopeError::MasterKeyInUse
            | ScopeError::StaleRewrap { .. }
            | ScopeError::NoCustomerMasterKey => ApiError::new(conflict, Code::Conflict, detail),
            ScopeError::ParentPaused { cause: by } => {
                ApiError::new(conflict, Code::ScopePaused, detail).with("cause", cause(by))
            }
            ScopeError::ParentRevoked { cause: by } | ScopeError::AncestorRevoked { cause: by } => {
                ApiError::new(conflict, Code::ScopeRevoked, detail).with("cause", cause(by))
            }
            ScopeError::Revoked => ApiError::new(conflict, Code::ScopeRevoked, detail),
            ScopeError::RevocationDue { ref due_at } => {
                let due_at = due_at.clone();
                ApiError::new(conflict, Code::Conflict, detail).with("due_at", json!(due_at))
            }
            ScopeError::PendingRevocation { ref due_at } => {
                let due_at = due_at.clone();
                ApiError::new(conflict, Code::ScopePendingRevocation, detail)
                    .with("due_at", json!(due_at))
            }
            ScopeError::ControlsNeedEnterprise | ScopeError::TierNeedsEnterprise(_) => {
                ApiError::new(StatusCode::FORBIDDEN, Code::PlanRequired, detail)
            }
            ScopeError::JustificationPolicyConflict => {
                ApiError::new(conflict, Code::JustificationPolicyConflict, detail)
            }
            ScopeError::StaleKeyVersion { .. }
            | ScopeError::RetireAboveFloor { .. }
            | ScopeError::PlanNeedsDefaultTier(_)
            | ScopeError::PlanLeavesControlsInForce { .. }
            | ScopeError::NotRevoked
            | ScopeError::RekeyOutOfOrder(_) => ApiError::new(conflict, Code::Conflict, detail),
        }
    }
}

impl From<AppError> for ApiError {
    fn from(error: AppError) -> Self {
        match error {
            AppError::Rule(rule) => rule.into(),
            AppError::NotFound => ApiError::not_found("no such scope"),
            AppError::VersionMismatch { current, .. } => ApiError::new(
                StatusCode::PRECONDITION_FAILED,
                Code::Conflict,
                error.to_string(),
            )
            .with("current_version", json!(current)),
            AppError::Contended => {
                ApiError::new(StatusCode::CONFLICT, Code::Conflict, error.to_string())
            }
            AppError::NotVisible => ApiError::not_found(error.to_string()),
            AppError::Paused { by } => {
                ApiError::new(StatusCode::CONFLICT, Code::ScopePaused, error.to_string())
                    .with("cause", cause(by))
            }
            AppError::Revoked { by } => {
                ApiError::new(StatusCode::CONFLICT, Code::ScopeRevoked, error.to_string())
                    .with("cause", cause(by))
            }
            AppError::PendingRevocation { by, ref due_at } => {
                let cause = json!({ "scope_id": by.to_string(), "due_at": due_at });
                ApiError::new(
                    StatusCode::CONFLICT,
                    Code::ScopePendingRevocation,
                    error.to_string(),
                )
                .with("cause", cause)
            }
            AppError::MasterKeyUnavailable { by, ref reason } => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                Code::KeyUnavailable,
                error.to_string(),
            )
            .with(
                "cause",
                json!({"scope_id": by.to_string(), "reason": reason}),
            ),
            AppError::ProjectionsBehind { .. } => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                Code::Unavailable,
                error.to_string(),
            ),
            AppError::OperatorHasNoScopes
            | AppError::NotPermitted { .. }
            | AppError::NotOrgAdmin => ApiError::forbidden(error.to_string()),
            AppError::PlatformKeyOffered | AppError::EndpointNotAllowed => {
                ApiError::invalid(error.to_string())
            }
            AppError::MasterKeyUnusable { provider, source } => {
                master_key_unusable(&source, provider)
            }
            AppError::Store(_)
            | AppError::Projection(_)
            | AppError::EventStore(_)
            | AppError::Key(_)
                if database_unreachable(&error) =>
            {
                tracing::error!(error = %error_chain(&error), "database unavailable");
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    Code::Unavailable,
                    "the database cannot be reached or cannot write now (disk full, read-only); nothing was changed unless a later read shows it",
                )
            }
            AppError::Key(KeyError::Missing { .. }) => {
                tracing::error!(error = %error_chain(&error), "key material missing for an active scope");
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    Code::KeyUnavailable,
                    "the scope's key is unavailable",
                )
            }
            AppError::Key(KeyError::Provider(ref failure)) => {
                tracing::warn!(error = %error_chain(&error), "customer master key failed");
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    Code::KeyUnavailable,
                    format!("the organization's master key cannot be used: {failure}"),
                )
                .with("provider_error", provider_error(failure, None))
            }
            AppError::Key(KeyError::Revoked { .. }) => ApiError::new(
                StatusCode::CONFLICT,
                Code::ScopeRevoked,
                "a scope on this path was revoked meanwhile; its keys are destroyed",
            ),
            AppError::Key(KeyError::WrongMaster { .. }) => {
                tracing::error!(error = %error_chain(&error), "organization key wrapped by an unknown master key");
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    Code::KeyUnavailable,
                    "the organization's key is wrapped by a master key it no longer uses; reconnect the master key",
                )
            }
            AppError::Committed { id, position, .. } => {
                tracing::error!(error = %error_chain(&error), scope = %id, "committed change not confirmed");
                ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    Code::CommittedUnconfirmed,
                    format!(
                        "the change to scope {id} was recorded, but the server could not read it back; \
                         do not repeat the request: GET /v1/scopes/{id} shows the change once the server has caught up"
                    ),
                )
                .with("scope_id", json!(id.to_string()))
                .with("position", json!(position))
            }
            AppError::Store(_)
            | AppError::Projection(_)
            | AppError::EventStore(_)
            | AppError::Key(_) => internal(&error),
        }
    }
}

/// What a provider said, as problem fields: the step, the kind of failure, the provider's
/// own code and message, and (when connecting) what the customer must do.
pub fn provider_error(
    failure: &ekm_kms::ProviderError,
    provider: Option<ekm_domain::Provider>,
) -> Value {
    let mut value = json!({
        "step": failure.operation.as_str(),
        "kind": failure.kind.as_str(),
        "code": failure.code,
        "message": failure.message,
    });
    if let Some(provider) = provider {
        value["remedy"] = json!(failure.kind.remedy(provider));
    }
    value
}

/// A customer key refused at connection time (422), naming the step that failed and the fix.
pub fn master_key_unusable(
    failure: &ekm_kms::ProviderError,
    provider: ekm_domain::Provider,
) -> ApiError {
    let status = if failure.kind.is_transient() {
        StatusCode::BAD_GATEWAY
    } else {
        StatusCode::UNPROCESSABLE_ENTITY
    };
    ApiError::new(
        status,
        Code::MasterKeyUnusable,
        format!(
            "the key failed validation at the {} step ({}): {}",
            failure.operation.as_str(),
            failure.kind.as_str(),
            failure.kind.remedy(provider)
        ),
    )
    .with("provider_error", provider_error(failure, Some(provider)))
}

/// Whether `error` comes from the database being out of reach (connections lost, refused or
/// timed out; the server shutting down), whichever layer met it: the store, the projector,
/// the event store or the key service. Not `Committed`, which the caller must not repeat.
fn database_unreachable(error: &AppError) -> bool {
    let mut next: Option<&(dyn std::error::Error + 'static)> = match error {
        // cqrs-es keeps the database's error as a payload, not as a source.
        AppError::EventStore(
            cqrs_es::AggregateError::DatabaseConnectionError(inner)
            | cqrs_es::AggregateError::UnexpectedError(inner),
        ) => Some(inner.as_ref()),
        other => Some(other),
    };
    while let Some(current) = next {
        if let Some(ekm_store::StoreError::Connect(_)) =
            current.downcast_ref::<ekm_store::StoreError>()
        {
            return true;
        }
        if let Some(sqlx_error) = current.downcast_ref::<sqlx::Error>() {
            return match sqlx_error {
                sqlx::Error::PoolTimedOut | sqlx::Error::Io(_) | sqlx::Error::PoolClosed => true,
                // Connection exceptions (class 08) and the server shutting down (57P0x);
                // SQLite's file busy or locked past the busy timeout (another process
                // writing it): retryable, not the server's fault to hide behind a 500.
                sqlx::Error::Database(database)
                    if database
                        .try_downcast_ref::<sqlx::sqlite::SqliteError>()
                        .is_some() =>
                {
                    // And the disk full (13) or failing writes (10, I/O errors): the
                    // transaction was rolled back; it can run again once space returns.
                    database
                        .code()
                        .and_then(|code| code.parse::<i32>().ok())
                        .is_some_and(|code| matches!(code & 0xff, 5 | 6 | 10 | 13))
                }
                // And a write refused by a server that is read-only (25006): a demoted
                // primary, until the instance has moved to the new one (ADR 0037).
                // Insufficient resources (class 53: disk full, out of memory, too many
                // connections) too: nothing was committed.
                sqlx::Error::Database(database) => database.code().is_some_and(|code| {
                    code.starts_with("08")
                        || code.starts_with("57P")
                        || code.starts_with("53")
                        || code == "25006"
                }),
                _ => false,
            };
        }
        next = current.source();
    }
    false
}

/// Logs the whole chain once and answers with a body that reveals nothing.
pub fn internal(error: &dyn std::error::Error) -> ApiError {
    tracing::error!(error = %error_chain(error), "internal error");
    ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        Code::Internal,
        "an internal error occurred; it has been logged",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SQLite's file held by another writer past the busy timeout is a moment's contention
    /// (503, retry), not an internal error.
    #[tokio::test]
    async fn sqlite_busy_answers_unavailable_not_internal() {
        use sqlx::sqlite::{SqliteConnectOptions, SqlitePoolOptions};
        let dir = tempfile::tempdir().unwrap();
        let options = SqliteConnectOptions::new()
            .filename(dir.path().join("busy.db"))
            .create_if_missing(true)
            .busy_timeout(std::time::Duration::ZERO);
        let holder = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(options.clone())
            .await
            .unwrap();
        sqlx::query("CREATE TABLE t (x INTEGER)")
            .execute(&holder)
            .await
            .unwrap();
        let mut writing = holder.begin().await.unwrap();
        sqlx::query("INSERT INTO t VALUES (1)")
            .execute(&mut *writing)
            .await
            .unwrap();
        let other = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(options)
            .await
            .unwrap();
        let busy = sqlx::query("INSERT INTO t VALUES (2)")
            .execute(&other)
            .await
            .unwrap_err();
        let error = AppError::Projection(ekm_projections::ProjectionError::Database(busy));
        let answer = ApiError::from(error);
        assert_eq!(answer.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(answer.code(), Code::Unavailable);
        writing.rollback().await.unwrap();
    }
}
