//! The data plane: encrypt, decrypt, generate data keys and rewrap, per scope.
//!
//! Every request is refused unless the scope is effectively active (read from the in-memory
//! scope tree, which the projector feeds before the key cache evicts): a request is served
//! from cached keys only if the cache entry survived every pause, revoke and rotation this
//! process has seen on the scope's path; otherwise the scope is read afresh.

use std::sync::Arc;

use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use ekm_domain::{DataClass, JustificationCode, JustificationRefusal, KeyVersion, ScopeId};
use ekm_keys::Ciphertext;
use rand::RngCore;
use serde::Deserialize;
use serde_json::{json, Value};
use zeroize::Zeroizing;

use crate::context::Caller;
use crate::dto::JsonBody;
use crate::endpoints::{Endpoints, Verb};
use crate::error::{ApiError, Code};
use crate::state::AppState;
use ekm_service::keys::ScopeKeys;
use ekm_service::AppError;

/// The largest plaintext accepted (1 MiB), and the body limit that fits it in base64.
pub const MAX_PLAINTEXT_BYTES: usize = 1024 * 1024;
const MAX_DATA_BODY_BYTES: usize = 2 * 1024 * 1024;

pub(crate) fn register(endpoints: &mut Endpoints) {
    use Verb::Post;
    let limit = Some(MAX_DATA_BODY_BYTES);
    endpoints.add_limited(Post, "/v1/scopes/{id}/encrypt", encrypt, limit);
    endpoints.add_limited(Post, "/v1/scopes/{id}/decrypt", decrypt, limit);
    endpoints.add_limited(Post, "/v1/scopes/{id}/datakey", datakey, limit);
    endpoints.add_limited(Post, "/v1/scopes/{id}/rewrap", rewrap, limit);
}

// No Debug on these: they carry plaintext and ciphertext.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EncryptRequest {
    plaintext: String,
    class: String,
    justification: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CiphertextRequest {
    ciphertext: String,
    class: String,
    justification: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ClassRequest {
    class: String,
    justification: Option<String>,
}

fn invalid_ciphertext(detail: &str) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, Code::InvalidCiphertext, detail)
}

/// The keys of scope `id` if the caller may use it and it is active right now.
async fn active_scope(
    state: &AppState,
    caller: &Caller,
    id: Result<Path<String>, PathRejection>,
) -> Result<Arc<ScopeKeys>, ApiError> {
    if caller.is_operator() {
        return Err(AppError::OperatorHasNoScopes.into());
    }
    let Path(id) = id.map_err(|_| ApiError::invalid("the path is not valid"))?;
    let id = ScopeId::parse(&id).map_err(|e| ApiError::invalid(e.to_string()))?;
    Ok(state.app.usable_keys(caller, id).await?)
}

/// Whether the request's reason (or none) passes the justification policies on the scope's
/// path (ADR 0027). Checked once the scope is found usable, so a scope the caller cannot use
/// reveals nothing of its policy.
fn justified(scope: &ScopeKeys, justification: Option<&String>) -> Result<(), ApiError> {
    let code = justification
        .map(|text| JustificationCode::parse(text))
        .transpose()
        .map_err(|e| ApiError::invalid(e.to_string()))?;
    scope.justification.check(code.as_ref()).map_err(|refusal| {
        let code = match refusal {
            JustificationRefusal::Required { .. } => Code::JustificationRequired,
            JustificationRefusal::NotAllowed { .. } => Code::JustificationNotAllowed,
        };
        let by = match &refusal {
            JustificationRefusal::Required { by } | JustificationRefusal::NotAllowed { by, .. } => {
                *by
            }
        };
        ApiError::new(StatusCode::FORBIDDEN, code, refusal.to_string())
            .with("policy_scope_id", json!(by.to_string()))
    })
}

/// The class named by the body (400 if it names none), checked with the rest of the body's
/// form before the scope is looked at.
fn parse_class(text: &str) -> Result<DataClass, ApiError> {
    text.parse()
        .map_err(|e: ekm_domain::ValueError| ApiError::invalid(e.to_string()))
}

/// `class` if the organization's tier covers it.
fn covered(class: DataClass, scope: &ScopeKeys) -> Result<DataClass, ApiError> {
    if !scope.tier.covers(class) {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            Code::ClassNotCovered,
            format!(
                "the {} tier does not cover {}; the managed or byok tier does",
                scope.tier.as_str(),
                class.as_str()
            ),
        ));
    }
    Ok(class)
}

fn seal(scope: &ScopeKeys, class: DataClass, plaintext: &[u8]) -> Result<Value, ApiError> {
    let key = scope.current_key().ok_or_else(|| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            Code::KeyUnavailable,
            "the scope has no usable key version",
        )
    })?;
    let ciphertext = Ciphertext::seal(
        key,
        &scope.scope_id.to_string(),
        scope.current.get(),
        class.as_str(),
        plaintext,
    )
    .map_err(|e| crate::error::internal(&e))?;
    Ok(json!({ "ciphertext": ciphertext.encode(), "key_version": scope.current }))
}

fn open(
    scope: &ScopeKeys,
    class: DataClass,
    text: &str,
    used: &mut Use,
) -> Result<Zeroizing<Vec<u8>>, ApiError> {
    let ciphertext = Ciphertext::parse(text).map_err(|e| invalid_ciphertext(&e.to_string()))?;
    if ciphertext.scope_id != scope.scope_id.to_string() || ciphertext.class != class.as_str() {
        return Err(invalid_ciphertext(
            "the ciphertext was not made for this scope and class",
        ));
    }
    used.key_version = Some(i64::from(ciphertext.key_version));
    let version = KeyVersion::new(ciphertext.key_version);
    let key = scope.key(version).ok_or_else(|| {
        invalid_ciphertext("the ciphertext names a key version this scope does not have")
    })?;
    // Authenticated first, then refused: a refusal below the floor (recorded in the access
    // log, and counted as the re-encryption debt an admin checks before retiring) is always
    // a real ciphertext of this scope, never one a caller made up.
    let plaintext = ciphertext.open(key).map_err(|_| {
        invalid_ciphertext("the ciphertext does not authenticate: it was altered or not made here")
    })?;
    if version < scope.min_decryption {
        drop(plaintext);
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            Code::KeyVersionDisabled,
            format!(
                "key version {version} no longer decrypts here: the scope's decryption floor is {}; an admin can lower it again with PUT /v1/scopes/{{id}}/min-decryption-version",
                scope.min_decryption
            ),
        )
        .with("min_decryption_version", json!(scope.min_decryption.get())));
    }
    Ok(plaintext)
}

/// One use of the data plane, filled in as the request is served and recorded in the
/// access log when it ends, allowed or refused (ADR 0026).
struct Use {
    operation: &'static str,
    scope_id: Option<ScopeId>,
    /// The scope's keys once it was found usable (its path and organization).
    scope: Option<Arc<ScopeKeys>>,
    class: Option<String>,
    key_version: Option<i64>,
    justification: Option<String>,
}

impl Use {
    fn new(
        operation: &'static str,
        id: &Result<Path<String>, PathRejection>,
        class: &str,
        justification: Option<&String>,
    ) -> Self {
        Self {
            operation,
            scope_id: id
                .as_ref()
                .ok()
                .and_then(|Path(id)| ScopeId::parse(id).ok()),
            scope: None,
            // Only a class there is (the client's text, whatever it holds, stays out of the
            // log: a value the database cannot store would refuse the record).
            class: class
                .parse::<DataClass>()
                .ok()
                .map(|c| c.as_str().to_owned()),
            key_version: None,
            // Only a well-formed code is kept (a malformed one is refused, and its text,
            // whatever its size, stays out of the log).
            justification: justification
                .filter(|code| check_justification(Some(code)).is_ok())
                .cloned(),
        }
    }
}

/// A justification is a short code (Key Access Justifications): lower-case letters, digits
/// and `_`, at most 64 characters.
fn check_justification(justification: Option<&String>) -> Result<(), ApiError> {
    if let Some(code) = justification {
        JustificationCode::parse(code).map_err(|e| ApiError::invalid(e.to_string()))?;
    }
    Ok(())
}

/// Records `used` with the answer's outcome. In durable mode a served request whose record
/// cannot be committed is refused instead (503): no use goes unrecorded.
async fn recorded(
    state: &AppState,
    caller: &Caller,
    used: Use,
    answer: Result<Json<Value>, ApiError>,
) -> Result<Json<Value>, ApiError> {
    let (Some(log), Some(org)) = (state.app.access_log(), caller.org()) else {
        return answer;
    };
    let outcome = match &answer {
        Ok(_) => "ok".to_owned(),
        Err(error) => error.code().as_str().to_owned(),
    };
    let Some(scope_id) = used.scope_id else {
        // A path that names no scope: nothing was used.
        return answer;
    };
    // The scope's path, only when it is the caller's organization's (another organization's
    // structure never reaches this one's log).
    let scope_path = match &used.scope {
        Some(keys) => Some(keys.path.clone()),
        None => match state.app.scope(scope_id).await {
            Ok(Some(snapshot)) if snapshot.scope.org_id == org => Some(snapshot.scope.path),
            _ => None,
        },
    };
    let record = ekm_store::AccessRecord {
        at: chrono::Utc::now(),
        org_id: org.to_string(),
        scope_id: scope_id.to_string(),
        scope_path: scope_path
            .map(|path| {
                path.iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join("/")
            })
            .unwrap_or_default(),
        principal: caller.principal.principal.clone(),
        token_id: caller.principal.token_id.clone(),
        operation: used.operation.to_owned(),
        class: used.class,
        key_version: used.key_version,
        outcome,
        request_id: caller.request_id.clone(),
        source_address: caller.source_address.clone(),
        justification: used.justification,
    };
    match log.record(record).await {
        Ok(()) => answer,
        Err(error) if answer.is_ok() => {
            tracing::error!(error = %error, "a served use could not be recorded; refused");
            Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                Code::Unavailable,
                "the access log cannot be written; nothing was served",
            ))
        }
        Err(error) => {
            tracing::error!(error = %error, "a refused use could not be recorded");
            answer
        }
    }
}

async fn encrypt(
    State(state): State<AppState>,
    caller: Caller,
    id: Result<Path<String>, PathRejection>,
    JsonBody(body): JsonBody<EncryptRequest>,
) -> Result<Json<Value>, ApiError> {
    let mut used = Use::new("encrypt", &id, &body.class, body.justification.as_ref());
    let answer = async {
        check_justification(body.justification.as_ref())?;
        let class = parse_class(&body.class)?;
        let scope = active_scope(&state, &caller, id).await?;
        used.scope = Some(scope.clone());
        justified(&scope, body.justification.as_ref())?;
        let class = covered(class, &scope)?;
        let plaintext = Zeroizing::new(
            STANDARD
                .decode(body.plaintext.as_bytes())
                .map_err(|_| ApiError::invalid("plaintext: must be base64"))?,
        );
        if plaintext.len() > MAX_PLAINTEXT_BYTES {
            return Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                Code::InvalidRequest,
                "plaintext: at most 1 MiB; encrypt larger data with a data key",
            ));
        }
        used.key_version = Some(i64::from(scope.current.get()));
        Ok(Json(seal(&scope, class, &plaintext)?))
    }
    .await;
    recorded(&state, &caller, used, answer).await
}

/// What decrypt and rewrap share: the active scope, the class, the opened plaintext.
/// `encrypts`: the request also seals (rewrap), so the class must be one the tier covers. A
/// decrypt opens any class: after a tier downgrade the platform must still read what it
/// sealed before, to migrate it (issue 17 §4).
async fn open_request(
    state: &AppState,
    caller: &Caller,
    id: Result<Path<String>, PathRejection>,
    body: &CiphertextRequest,
    used: &mut Use,
    encrypts: bool,
) -> Result<(Arc<ScopeKeys>, DataClass, Zeroizing<Vec<u8>>), ApiError> {
    check_justification(body.justification.as_ref())?;
    let class = parse_class(&body.class)?;
    let scope = active_scope(state, caller, id).await?;
    used.scope = Some(scope.clone());
    justified(&scope, body.justification.as_ref())?;
    let class = match encrypts {
        true => covered(class, &scope)?,
        false => class,
    };
    let plaintext = open(&scope, class, &body.ciphertext, used)?;
    Ok((scope, class, plaintext))
}

async fn decrypt(
    State(state): State<AppState>,
    caller: Caller,
    id: Result<Path<String>, PathRejection>,
    JsonBody(body): JsonBody<CiphertextRequest>,
) -> Result<Json<Value>, ApiError> {
    let mut used = Use::new("decrypt", &id, &body.class, body.justification.as_ref());
    let answer = async {
        let (_, _, plaintext) = open_request(&state, &caller, id, &body, &mut used, false).await?;
        Ok(Json(
            json!({ "plaintext": STANDARD.encode(plaintext.as_slice()) }),
        ))
    }
    .await;
    recorded(&state, &caller, used, answer).await
}

async fn datakey(
    State(state): State<AppState>,
    caller: Caller,
    id: Result<Path<String>, PathRejection>,
    JsonBody(body): JsonBody<ClassRequest>,
) -> Result<Json<Value>, ApiError> {
    let mut used = Use::new("datakey", &id, &body.class, body.justification.as_ref());
    let answer = async {
        check_justification(body.justification.as_ref())?;
        let class = parse_class(&body.class)?;
        let scope = active_scope(&state, &caller, id).await?;
        used.scope = Some(scope.clone());
        justified(&scope, body.justification.as_ref())?;
        let class = covered(class, &scope)?;
        let mut key = Zeroizing::new([0u8; 32]);
        rand::rng().fill_bytes(key.as_mut());
        used.key_version = Some(i64::from(scope.current.get()));
        let mut answer = seal(&scope, class, key.as_ref())?;
        if let Some(object) = answer.as_object_mut() {
            object.insert(
                "plaintext".into(),
                Value::String(STANDARD.encode(key.as_ref())),
            );
        }
        Ok(Json(answer))
    }
    .await;
    recorded(&state, &caller, used, answer).await
}

/// Rewrap records the version it opened (the one whose use an admin tracks before retiring
/// it); the answer names the version it sealed with.
async fn rewrap(
    State(state): State<AppState>,
    caller: Caller,
    id: Result<Path<String>, PathRejection>,
    JsonBody(body): JsonBody<CiphertextRequest>,
) -> Result<Json<Value>, ApiError> {
    let mut used = Use::new("rewrap", &id, &body.class, body.justification.as_ref());
    let answer = async {
        let (scope, class, plaintext) =
            open_request(&state, &caller, id, &body, &mut used, true).await?;
        Ok(Json(seal(&scope, class, &plaintext)?))
    }
    .await;
    recorded(&state, &caller, used, answer).await
}
