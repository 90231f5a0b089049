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
use crate::dto::{JsonBody, OneOrBatch};
use crate::endpoints::{Endpoints, Verb};
use crate::error::{ApiError, Code};
use crate::rate_limit::Charge;
use crate::state::AppState;
use axum::Extension;
use ekm_service::keys::ScopeKeys;
use ekm_service::AppError;

/// The largest plaintext accepted (1 MiB), and the body limit that fits it in base64.
pub const MAX_PLAINTEXT_BYTES: usize = 1024 * 1024;
pub(crate) const MAX_DATA_BODY_BYTES: usize = 2 * 1024 * 1024;

pub(crate) fn register(endpoints: &mut Endpoints) {
    use Verb::Post;
    let limit = Some(MAX_DATA_BODY_BYTES);
    endpoints.add_limited(Post, "/v1/scopes/{id}/encrypt", encrypt, limit);
    endpoints.add_limited(Post, "/v1/scopes/{id}/decrypt", decrypt, limit);
    endpoints.add_limited(Post, "/v1/scopes/{id}/datakey", datakey, limit);
    endpoints.add_limited(Post, "/v1/scopes/{id}/rewrap", rewrap, limit);
}

// No Debug on these: they carry plaintext and ciphertext.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct EncryptRequest {
    plaintext: String,
    class: String,
    justification: Option<String>,
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct CiphertextRequest {
    ciphertext: String,
    class: String,
    justification: Option<String>,
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct ClassRequest {
    class: String,
    justification: Option<String>,
}

/// An encrypt body: one item, or a batch (documentation only).
#[allow(dead_code)]
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(untagged)]
enum EncryptBodyDoc {
    One(EncryptRequest),
    Batch {
        #[schema(min_items = 1, max_items = 1000)]
        items: Vec<EncryptRequest>,
    },
}

/// A decrypt or rewrap body: one item, or a batch (documentation only).
#[allow(dead_code)]
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(untagged)]
enum CiphertextBodyDoc {
    One(CiphertextRequest),
    Batch {
        #[schema(min_items = 1, max_items = 1000)]
        items: Vec<CiphertextRequest>,
    },
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
async fn recorded<T>(
    state: &AppState,
    caller: &Caller,
    used: Use,
    answer: Result<T, ApiError>,
) -> Result<T, ApiError> {
    if state.app.access_log().is_none() {
        return answer;
    }
    let path = match &used.scope {
        Some(_) => None,
        None => scope_path(state, caller, &used).await,
    };
    recorded_at(state, caller, used, path, answer).await
}

/// The path of the scope `used` names, only when it is the caller's organization's (another
/// organization's structure never reaches this one's log); for a use that did not find its
/// scope usable.
async fn scope_path(state: &AppState, caller: &Caller, used: &Use) -> Option<String> {
    let (org, scope_id) = (caller.org()?, used.scope_id?);
    match state.app.scope(scope_id).await {
        Ok(Some(snapshot)) if snapshot.scope.org_id == org => {
            Some(super::joined_path(&snapshot.scope.path))
        }
        _ => None,
    }
}

/// `recorded`, with the scope's path already looked up when `used` has no usable scope.
async fn recorded_at<T>(
    state: &AppState,
    caller: &Caller,
    used: Use,
    looked_up: Option<String>,
    answer: Result<T, ApiError>,
) -> Result<T, ApiError> {
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
    let scope_path = match &used.scope {
        Some(keys) => Some(super::joined_path(&keys.path)),
        None => looked_up,
    };
    let record = ekm_store::AccessRecord {
        at: chrono::Utc::now(),
        org_id: org.to_string(),
        scope_id: scope_id.to_string(),
        scope_path: scope_path.unwrap_or_default(),
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

/// What the three batchable requests tell the access log before they are served.
trait Item {
    fn class(&self) -> &str;
    fn justification(&self) -> Option<&String>;
}

impl Item for EncryptRequest {
    fn class(&self) -> &str {
        &self.class
    }
    fn justification(&self) -> Option<&String> {
        self.justification.as_ref()
    }
}

impl Item for CiphertextRequest {
    fn class(&self) -> &str {
        &self.class
    }
    fn justification(&self) -> Option<&String> {
        self.justification.as_ref()
    }
}

/// An item served, with its use to record.
type Served = (Use, Result<Value, ApiError>);

/// A batch (issue 18 §5, after Vault's `batch_input`): the scope is looked up once, and
/// refuses the whole batch if the caller cannot use it now (each item is recorded with that
/// refusal); then each item is served by `serve` or refused on its own, and recorded on its
/// own. The answer is `{"items": [...]}` in the request's order, each the single request's
/// answer or `{"problem": {...}}`. An item that did not parse is not recorded, as a body that
/// does not parse is not.
async fn batch<T: Item>(
    state: &AppState,
    caller: &Caller,
    operation: &'static str,
    id: Result<Path<String>, PathRejection>,
    items: Vec<Result<T, ApiError>>,
    serve: impl Fn(&Arc<ScopeKeys>, &T, &mut Use) -> Result<Value, ApiError>,
) -> Result<Json<Value>, ApiError> {
    let items: Vec<Result<(T, Use), ApiError>> = items
        .into_iter()
        .map(|item| {
            item.map(|item| {
                let used = Use::new(operation, &id, item.class(), item.justification());
                (item, used)
            })
        })
        .collect();
    let scope = match active_scope(state, caller, id).await {
        Ok(scope) => scope,
        Err(refusal) => {
            // One lookup of the scope's path for all (a refused batch of 1,000 must not
            // cost 1,000 reads).
            let uses: Vec<Use> = items.into_iter().flatten().map(|(_, used)| used).collect();
            let path = match uses.first() {
                Some(used) => scope_path(state, caller, used).await,
                None => None,
            };
            let records = uses.into_iter().map(|used| {
                let answer = Err::<(), _>(refusal.clone());
                recorded_at(state, caller, used, path.clone(), answer)
            });
            futures_util::future::join_all(records).await;
            return Err(refusal);
        }
    };
    // Every item is served now, with the keys just found usable, before anything waits:
    // a pause answered while the records are written stops no item half-way, and none is
    // served after it.
    let served: Vec<Result<Served, ApiError>> = items
        .into_iter()
        .map(|item| {
            let (item, mut used) = item?;
            used.scope = Some(scope.clone());
            let answer = serve(&scope, &item, &mut used);
            Ok((used, answer))
        })
        .collect();
    let answers = served.into_iter().map(|served| async move {
        let (used, answer) = served?;
        recorded(state, caller, used, answer).await
    });
    let items: Vec<Value> = futures_util::future::join_all(answers)
        .await
        .into_iter()
        .map(|answer| answer.unwrap_or_else(|problem| json!({ "problem": problem.body() })))
        .collect();
    Ok(Json(json!({ "items": items })))
}

/// Encrypts one request's plaintext with the scope's current version.
fn encrypt_one(
    scope: &Arc<ScopeKeys>,
    body: &EncryptRequest,
    used: &mut Use,
) -> Result<Value, ApiError> {
    check_justification(body.justification.as_ref())?;
    let class = parse_class(&body.class)?;
    justified(scope, body.justification.as_ref())?;
    let class = covered(class, scope)?;
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
    seal(scope, class, &plaintext)
}

#[utoipa::path(
    post,
    path = "/v1/scopes/{id}/encrypt",
    tag = "data plane",
    summary = "Encrypt (one item, or a batch of up to 1,000)",
    params(
        crate::openapi::ScopePath
    ),
    request_body = EncryptBodyDoc,
    responses(
        (status = 200, description = "The ciphertext, or one result or problem per item", body = crate::openapi::SealedAnswerDoc)
    )
)]
pub(crate) async fn encrypt(
    State(state): State<AppState>,
    caller: Caller,
    id: Result<Path<String>, PathRejection>,
    charge: Option<Extension<Charge>>,
    body: OneOrBatch<EncryptRequest>,
) -> Result<Json<Value>, ApiError> {
    one_or_batch(state, caller, id, charge, body, "encrypt", encrypt_one).await
}

/// Opens one request's ciphertext. `encrypts`: the request also seals (rewrap), so the class
/// must be one the tier covers. A decrypt opens any class: after a tier downgrade the
/// platform must still read what it sealed before, to migrate it (issue 17 §4).
fn open_one(
    scope: &ScopeKeys,
    body: &CiphertextRequest,
    used: &mut Use,
    encrypts: bool,
) -> Result<(DataClass, Zeroizing<Vec<u8>>), ApiError> {
    check_justification(body.justification.as_ref())?;
    let class = parse_class(&body.class)?;
    justified(scope, body.justification.as_ref())?;
    let class = match encrypts {
        true => covered(class, scope)?,
        false => class,
    };
    let plaintext = open(scope, class, &body.ciphertext, used)?;
    Ok((class, plaintext))
}

fn decrypt_one(
    scope: &Arc<ScopeKeys>,
    body: &CiphertextRequest,
    used: &mut Use,
) -> Result<Value, ApiError> {
    let (_, plaintext) = open_one(scope, body, used, false)?;
    Ok(json!({ "plaintext": STANDARD.encode(plaintext.as_slice()) }))
}

/// Rewrap records the version it opened (the one whose use an admin tracks before retiring
/// it); the answer names the version it sealed with.
fn rewrap_one(
    scope: &Arc<ScopeKeys>,
    body: &CiphertextRequest,
    used: &mut Use,
) -> Result<Value, ApiError> {
    let (class, plaintext) = open_one(scope, body, used, true)?;
    seal(scope, class, &plaintext)
}

/// Encrypt, decrypt and rewrap: one request, or a batch of them (`batch`). A single
/// request's form (justification, class) is checked before the scope is looked at.
async fn one_or_batch<T: Item>(
    state: AppState,
    caller: Caller,
    id: Result<Path<String>, PathRejection>,
    charge: Option<Extension<Charge>>,
    body: OneOrBatch<T>,
    operation: &'static str,
    serve: fn(&Arc<ScopeKeys>, &T, &mut Use) -> Result<Value, ApiError>,
) -> Result<Json<Value>, ApiError> {
    let body = match body {
        OneOrBatch::One(body) => body,
        OneOrBatch::Batch(items) => {
            // A batch takes one token per item (the first was taken with its request).
            if let Some(Extension(charge)) = charge {
                charge.batch(u32::try_from(items.len()).unwrap_or(u32::MAX))?;
            }
            return batch(&state, &caller, operation, id, items, serve).await;
        }
    };
    let mut used = Use::new(operation, &id, body.class(), body.justification());
    let answer = async {
        check_justification(body.justification())?;
        parse_class(body.class())?;
        let scope = active_scope(&state, &caller, id).await?;
        used.scope = Some(scope.clone());
        serve(&scope, &body, &mut used).map(Json)
    }
    .await;
    recorded(&state, &caller, used, answer).await
}

#[utoipa::path(
    post,
    path = "/v1/scopes/{id}/decrypt",
    tag = "data plane",
    summary = "Decrypt (one item, or a batch of up to 1,000)",
    params(
        crate::openapi::ScopePath
    ),
    request_body = CiphertextBodyDoc,
    responses(
        (status = 200, description = "The plaintext, or one result or problem per item", body = crate::openapi::OpenedAnswerDoc)
    )
)]
pub(crate) async fn decrypt(
    State(state): State<AppState>,
    caller: Caller,
    id: Result<Path<String>, PathRejection>,
    charge: Option<Extension<Charge>>,
    body: OneOrBatch<CiphertextRequest>,
) -> Result<Json<Value>, ApiError> {
    one_or_batch(state, caller, id, charge, body, "decrypt", decrypt_one).await
}

#[utoipa::path(
    post,
    path = "/v1/scopes/{id}/rewrap",
    tag = "data plane",
    summary = "Re-seal under the current key version (one item, or a batch)",
    params(
        crate::openapi::ScopePath
    ),
    request_body = CiphertextBodyDoc,
    responses(
        (status = 200, description = "The new ciphertext, or one result or problem per item", body = crate::openapi::SealedAnswerDoc)
    )
)]
pub(crate) async fn rewrap(
    State(state): State<AppState>,
    caller: Caller,
    id: Result<Path<String>, PathRejection>,
    charge: Option<Extension<Charge>>,
    body: OneOrBatch<CiphertextRequest>,
) -> Result<Json<Value>, ApiError> {
    one_or_batch(state, caller, id, charge, body, "rewrap", rewrap_one).await
}

#[utoipa::path(
    post,
    path = "/v1/scopes/{id}/datakey",
    tag = "data plane",
    summary = "A fresh data key, in plaintext and sealed",
    params(
        crate::openapi::ScopePath
    ),
    request_body = ClassRequest,
    responses(
        (status = 200, description = "The data key", body = crate::openapi::SealedDoc)
    )
)]
pub(crate) async fn datakey(
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
