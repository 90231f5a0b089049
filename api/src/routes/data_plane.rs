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
use ekm_domain::{DataClass, KeyVersion, ScopeId};
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
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CiphertextRequest {
    ciphertext: String,
    class: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ClassRequest {
    class: String,
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

fn class(text: &str, scope: &ScopeKeys) -> Result<DataClass, ApiError> {
    let class: DataClass = text
        .parse()
        .map_err(|e: ekm_domain::ValueError| ApiError::invalid(e.to_string()))?;
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

fn open(scope: &ScopeKeys, class: DataClass, text: &str) -> Result<Zeroizing<Vec<u8>>, ApiError> {
    let ciphertext = Ciphertext::parse(text).map_err(|e| invalid_ciphertext(&e.to_string()))?;
    if ciphertext.scope_id != scope.scope_id.to_string() || ciphertext.class != class.as_str() {
        return Err(invalid_ciphertext(
            "the ciphertext was not made for this scope and class",
        ));
    }
    let key = scope
        .key(KeyVersion::new(ciphertext.key_version))
        .ok_or_else(|| {
            invalid_ciphertext("the ciphertext names a key version this scope does not have")
        })?;
    ciphertext.open(key).map_err(|_| {
        invalid_ciphertext("the ciphertext does not authenticate: it was altered or not made here")
    })
}

async fn encrypt(
    State(state): State<AppState>,
    caller: Caller,
    id: Result<Path<String>, PathRejection>,
    JsonBody(body): JsonBody<EncryptRequest>,
) -> Result<Json<Value>, ApiError> {
    let scope = active_scope(&state, &caller, id).await?;
    let class = class(&body.class, &scope)?;
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
    Ok(Json(seal(&scope, class, &plaintext)?))
}

/// What decrypt and rewrap share: the active scope, the class, the opened plaintext.
async fn open_request(
    state: &AppState,
    caller: &Caller,
    id: Result<Path<String>, PathRejection>,
    body: &CiphertextRequest,
) -> Result<(Arc<ScopeKeys>, DataClass, Zeroizing<Vec<u8>>), ApiError> {
    let scope = active_scope(state, caller, id).await?;
    let class = class(&body.class, &scope)?;
    let plaintext = open(&scope, class, &body.ciphertext)?;
    Ok((scope, class, plaintext))
}

async fn decrypt(
    State(state): State<AppState>,
    caller: Caller,
    id: Result<Path<String>, PathRejection>,
    JsonBody(body): JsonBody<CiphertextRequest>,
) -> Result<Json<Value>, ApiError> {
    let (_, _, plaintext) = open_request(&state, &caller, id, &body).await?;
    Ok(Json(
        json!({ "plaintext": STANDARD.encode(plaintext.as_slice()) }),
    ))
}

async fn datakey(
    State(state): State<AppState>,
    caller: Caller,
    id: Result<Path<String>, PathRejection>,
    JsonBody(body): JsonBody<ClassRequest>,
) -> Result<Json<Value>, ApiError> {
    let scope = active_scope(&state, &caller, id).await?;
    let class = class(&body.class, &scope)?;
    let mut key = Zeroizing::new([0u8; 32]);
    rand::rng().fill_bytes(key.as_mut());
    let mut answer = seal(&scope, class, key.as_ref())?;
    if let Some(object) = answer.as_object_mut() {
        object.insert(
            "plaintext".into(),
            Value::String(STANDARD.encode(key.as_ref())),
        );
    }
    Ok(Json(answer))
}

async fn rewrap(
    State(state): State<AppState>,
    caller: Caller,
    id: Result<Path<String>, PathRejection>,
    JsonBody(body): JsonBody<CiphertextRequest>,
) -> Result<Json<Value>, ApiError> {
    let (scope, class, plaintext) = open_request(&state, &caller, id, &body).await?;
    Ok(Json(seal(&scope, class, &plaintext)?))
}
