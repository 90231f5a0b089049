//! Audit endpoints: list with filters, streamed export (JSON Lines, CSV), chain verification;
//! and the renderers the `ekm audit export` command shares.

use std::collections::{BTreeMap, HashMap};

use axum::body::{Body, Bytes};
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::Json;
use chrono::{DateTime, Utc};
use ekm_domain::{OrgId, Permission, ScopeId};
use ekm_projections::{AuditEntry, AuditFilter};
use ekm_store::time::rfc3339;
use serde::Serialize;
use serde_json::{json, Value};

use crate::audit_export::{ExportHeader, ExportWriter};
use crate::context::Caller;
use crate::cursor::{Binding, List};
use crate::error::ApiError;
use crate::routes::check_keys;
use crate::routes::page_limit;
use crate::state::AppState;

#[derive(Serialize)]
struct EntryHead<'a> {
    position: i64,
    recorded_at: String,
    org_id: &'a str,
    scope_id: &'a str,
    path: &'a [String],
    action: &'a str,
    event_type: &'a str,
    event_version: &'a str,
    actor: &'a str,
    actor_kind: &'a str,
    reason: Option<&'a str>,
    request_id: &'a str,
    source_address: Option<&'a str>,
    summary: &'a str,
}

/// The JSON text of one entry, as exported in JSON Lines (and listed). `details` is the
/// stored payload, spliced in as it is: it was written as JSON by the event store.
pub fn entry_json_text(entry: &AuditEntry) -> String {
    let head = EntryHead {
        position: entry.position,
        recorded_at: rfc3339(entry.recorded_at),
        org_id: &entry.org_id,
        scope_id: &entry.scope_id,
        path: &entry.scope_path,
        action: &entry.action,
        event_type: &entry.event_type,
        event_version: &entry.event_version,
        actor: &entry.actor,
        actor_kind: &entry.actor_kind,
        reason: entry.reason.as_deref(),
        request_id: &entry.request_id,
        source_address: entry.source_address.as_deref(),
        summary: &entry.summary,
    };
    let mut text = serde_json::to_string(&head).unwrap_or_else(|_| "{}".to_owned());
    text.pop();
    text.push_str(",\"details\":");
    text.push_str(&details_json(&entry.details));
    text.push('}');
    text
}

/// The stored payload as JSON text for an entry, on one line. Payloads are written by the
/// event store, so the fast path passes them through; anything a verifier of the export
/// (docs/audit-format.md) would not read back the same way (a line break, deep nesting, an
/// escaped surrogate) is parsed and written again, and what does not parse becomes a string.
fn details_json(details: &str) -> String {
    let plain = !details.contains(['\n', '\r'])
        && !details.contains("\\ud")
        && !details.contains("\\uD")
        && details.bytes().filter(|b| matches!(b, b'[' | b'{')).count()
            <= crate::audit_export::MAX_NESTING;
    if plain && serde_json::from_str::<serde::de::IgnoredAny>(details).is_ok() {
        return details.to_owned();
    }
    match serde_json::from_str::<Value>(details) {
        Ok(value)
            if crate::audit_export::nesting(details.as_bytes())
                <= crate::audit_export::MAX_NESTING =>
        {
            value.to_string()
        }
        _ => Value::String(details.to_owned()).to_string(),
    }
}

/// The JSON of one entry, as listed.
pub fn entry_json(entry: &AuditEntry) -> Value {
    serde_json::from_str(&entry_json_text(entry)).unwrap_or(Value::Null)
}

pub const CSV_HEADER: &str = "position,recorded_at,org_id,scope_id,path,action,event_type,event_version,actor,actor_kind,reason,request_id,source_address,summary,details\n";

/// One CSV field: quoted when needed, and defused against formula injection (a cell that
/// starts with = + - @ is prefixed with an apostrophe, as OWASP recommends).
pub(crate) fn csv_field(value: &str) -> String {
    let defused = if value.starts_with(['=', '+', '-', '@', '\t', '\r']) {
        format!("'{value}")
    } else {
        value.to_owned()
    };
    if defused.contains([',', '"', '\n', '\r']) || defused != value {
        format!("\"{}\"", defused.replace('"', "\"\""))
    } else {
        defused
    }
}

/// One CSV line (with its newline) for an entry.
pub fn entry_csv(entry: &AuditEntry) -> String {
    let fields = [
        entry.position.to_string(),
        rfc3339(entry.recorded_at),
        entry.org_id.clone(),
        entry.scope_id.clone(),
        entry.scope_path.join("/"),
        entry.action.clone(),
        entry.event_type.clone(),
        entry.event_version.clone(),
        entry.actor.clone(),
        entry.actor_kind.clone(),
        entry.reason.clone().unwrap_or_default(),
        entry.request_id.clone(),
        entry.source_address.clone().unwrap_or_default(),
        entry.summary.clone(),
        entry.details.clone(),
    ];
    let mut line = fields
        .iter()
        .map(|f| csv_field(f))
        .collect::<Vec<_>>()
        .join(",");
    line.push('\n');
    line
}

/// Export formats.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    JsonLines,
    Csv,
}

impl Format {
    pub fn parse(text: &str) -> Result<Format, String> {
        match text {
            "jsonl" => Ok(Format::JsonLines),
            "csv" => Ok(Format::Csv),
            other => Err(format!(
                "format: `{}` is not one of jsonl, csv",
                other.chars().take(32).collect::<String>()
            )),
        }
    }

    pub fn header(self) -> &'static str {
        match self {
            Format::JsonLines => "",
            Format::Csv => CSV_HEADER,
        }
    }

    pub fn render(self, entry: &AuditEntry) -> String {
        match self {
            Format::JsonLines => {
                let mut line = entry_json_text(entry);
                line.push('\n');
                line
            }
            Format::Csv => entry_csv(entry),
        }
    }
}

fn parse_time(name: &str, value: &str) -> Result<DateTime<Utc>, ApiError> {
    DateTime::parse_from_rfc3339(value)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|_| {
            ApiError::invalid(format!(
                "{name}: expected an RFC 3339 time such as 2026-11-28T14:02:00Z"
            ))
        })
}

/// The organization an audit request is about: the caller's own (404 for any other).
pub(crate) fn audited_org(caller: &Caller, org: Option<&String>) -> Result<OrgId, ApiError> {
    if caller.is_operator() {
        return Err(ApiError::forbidden(
            "the operator token manages organizations only; use an organization's token",
        ));
    }
    let own = caller
        .org()
        .ok_or_else(|| ApiError::forbidden("this token belongs to no organization"))?;
    if let Some(text) = org {
        let wanted = OrgId::parse(text).map_err(|e| ApiError::invalid(format!("org: {e}")))?;
        if wanted != own {
            return Err(ApiError::not_found(crate::routes::ORG_NOT_FOUND));
        }
    }
    Ok(own)
}

/// `audited_org`, for a caller that must hold `audit:read` on the whole organization
/// (verifying the hash chain covers every entry of the organization).
fn audited_org_whole(caller: &Caller, org: Option<&String>) -> Result<OrgId, ApiError> {
    let own = audited_org(caller, org)?;
    caller.require(Permission::AuditRead, &[own.scope_id()])?;
    Ok(own)
}

/// The subtree an audit request may read: `audit:read` on the organization reads all of it
/// (`None` without `scope=`); on a subtree, only that subtree's entries (`scope` naming it or
/// a scope below it): the organization's own events (grants, tokens, tier) and other
/// subtrees stay out of reach. The subtree is the scope's path of ids joined by `/`.
pub(crate) async fn audited_subtree(
    state: &AppState,
    caller: &Caller,
    org: &OrgId,
    scope: Option<&String>,
) -> Result<Option<String>, ApiError> {
    let whole_org = caller.holds(Permission::AuditRead, &[org.scope_id()]);
    let subtree = match scope {
        None => {
            if !whole_org {
                return Err(ApiError::forbidden(
                    "audit:read on the organization is needed to read all of its audit log; \
                     with audit:read on a subtree, ask for it with scope=",
                ));
            }
            None
        }
        Some(text) => {
            let id = ScopeId::parse(text).map_err(|e| ApiError::invalid(format!("scope: {e}")))?;
            match state.app.scope(id).await? {
                Some(snapshot) if snapshot.scope.org_id == *org => {
                    if !whole_org {
                        caller.require(Permission::AuditRead, &snapshot.scope.path)?;
                    }
                    Some(super::joined_path(&snapshot.scope.path))
                }
                _ => {
                    return Err(ApiError::not_found(
                        "scope: no scope with this id is visible to this token",
                    ))
                }
            }
        }
    };
    Ok(subtree)
}

/// A query's `from` and `to`, either open.
pub(crate) type TimeRange = (Option<DateTime<Utc>>, Option<DateTime<Utc>>);

/// Parses `from` and `to` (RFC 3339), `from` before `to`.
pub(crate) fn time_range(query: &HashMap<String, String>) -> Result<TimeRange, ApiError> {
    let from = query
        .get("from")
        .map(|v| parse_time("from", v))
        .transpose()?;
    let to = query.get("to").map(|v| parse_time("to", v)).transpose()?;
    if let (Some(from), Some(to)) = (from, to) {
        if from >= to {
            return Err(ApiError::invalid("from must be before to"));
        }
    }
    Ok((from, to))
}

const FILTER_KEYS: [&str; 6] = ["org", "scope", "actor", "action", "from", "to"];

/// Builds the filter shared by list and export.
async fn filter(
    state: &AppState,
    caller: &Caller,
    query: &HashMap<String, String>,
) -> Result<AuditFilter, ApiError> {
    let org = audited_org(caller, query.get("org"))?;
    let subtree = audited_subtree(state, caller, &org, query.get("scope")).await?;
    let (from, to) = time_range(query)?;
    Ok(AuditFilter {
        org_id: org.to_string(),
        subtree,
        actor: query.get("actor").cloned(),
        action: query.get("action").cloned(),
        from,
        to,
        after: None,
        through: None,
        limit: 0,
    })
}

#[derive(Serialize)]
struct AuditPage {
    items: Vec<Value>,
    next_cursor: Option<String>,
}

#[utoipa::path(
    get,
    operation_id = "list_audit",
    path = "/v1/audit",
    tag = "audit",
    summary = "The audit log, in position order",
    params(
        crate::openapi::AuditFilterParams,
        crate::openapi::PageParams
    ),
    responses(
        (status = 200, description = "A page", body = crate::openapi::AuditPageDoc)
    )
)]
pub async fn list(
    State(state): State<AppState>,
    caller: Caller,
    query: Result<Query<HashMap<String, String>>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let Query(query) = query.map_err(|_| ApiError::invalid("the query string is not valid"))?;
    let mut allowed = FILTER_KEYS.to_vec();
    allowed.extend(["cursor", "limit"]);
    check_keys(&query, &allowed)?;
    let mut filter = filter(&state, &caller, &query).await?;
    let limit = page_limit(query.get("limit"))?;
    // A cursor continues only the query that issued it (its subtree included), so a
    // position reveals nothing that the list would not.
    let from = filter.from.map(rfc3339).unwrap_or_default();
    let to = filter.to.map(rfc3339).unwrap_or_default();
    let bound = [
        filter.org_id.as_str(),
        filter.subtree.as_deref().unwrap_or(""),
        filter.actor.as_deref().unwrap_or(""),
        filter.action.as_deref().unwrap_or(""),
        from.as_str(),
        to.as_str(),
    ];
    let binding = Binding {
        list: List::Audit,
        query: &bound,
    };
    filter.after = query
        .get("cursor")
        .map(|c| binding.decode_position(c))
        .transpose()?;
    filter.limit = i64::from(limit) + 1;
    let mut entries = state.app.audit(&filter).await?;
    let more = entries.len() > limit as usize;
    entries.truncate(limit as usize);
    let next_cursor = if more {
        entries.last().map(|e| binding.encode_position(e.position))
    } else {
        None
    };
    Ok(Json(json!(AuditPage {
        items: entries.iter().map(entry_json).collect(),
        next_cursor,
    })))
}

const EXPORT_PAGE: i64 = 1_000;

/// Streams every matching entry, a page at a time: memory stays flat whatever the history.
/// JSON Lines is signed (docs/audit-format.md): a header, each entry with its seal, and a
/// signed checkpoint every `CHECKPOINT_EVERY` lines and at the end; it stops at the position
/// the audit chain had sealed when it began, so every entry carries its seal.
#[utoipa::path(
    get,
    operation_id = "export_audit",
    path = "/v1/audit/export",
    tag = "audit",
    summary = "Export the audit log (signed JSON Lines, or CSV)",
    params(
        crate::openapi::AuditFilterParams,
        crate::openapi::ExportParams
    ),
    responses(
        (status = 200, description = "The export, streamed", content((String = "application/jsonl"), (String = "text/csv")))
    )
)]
pub async fn export(
    State(state): State<AppState>,
    caller: Caller,
    query: Result<Query<HashMap<String, String>>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(query) = query.map_err(|_| ApiError::invalid("the query string is not valid"))?;
    let mut allowed = FILTER_KEYS.to_vec();
    allowed.push("format");
    check_keys(&query, &allowed)?;
    let format = Format::parse(query.get("format").map(String::as_str).unwrap_or("jsonl"))
        .map_err(ApiError::invalid)?;
    let mut filter = filter(&state, &caller, &query).await?;
    filter.limit = EXPORT_PAGE;
    let org = filter.org_id.clone();
    let through = state.app.sealed_through().await?;
    filter.through = Some(through);
    let mut writer = None;
    let mut first = Bytes::from(format.header());
    if format == Format::JsonLines {
        let mut given: BTreeMap<String, String> = query
            .iter()
            .filter(|(k, _)| FILTER_KEYS.contains(&k.as_str()))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        given.insert("org".to_owned(), org.clone());
        let header = ExportHeader {
            org_id: org.clone(),
            exported_at: rfc3339(Utc::now()),
            through_position: through,
            filter: given,
        };
        let (started, line) = ExportWriter::start(state.app.signing_key().clone(), &header);
        writer = Some(started);
        first = Bytes::from(line);
    }
    let pages = state.app.audit_pages(filter);
    let stream = futures_util::stream::unfold(
        (pages, writer, Some(first), false),
        move |(mut pages, mut writer, first, done)| async move {
            if done {
                return None;
            }
            if let Some(first) = first.filter(|f| !f.is_empty()) {
                return Some((Ok(first), (pages, writer, None, false)));
            }
            match pages.next().await {
                Some(Ok(entries)) => {
                    let chunk: String = entries
                        .iter()
                        .map(|e| match &mut writer {
                            Some(w) => w.entry("event", &entry_json_text(e), e.seal.as_deref()),
                            None => format.render(e),
                        })
                        .collect();
                    Some((Ok(Bytes::from(chunk)), (pages, writer, None, false)))
                }
                // The end: the final signed checkpoint, if any.
                None => writer
                    .take()
                    .map(|w| (Ok(Bytes::from(w.finish())), (pages, None, None, true))),
                Some(Err(error)) => {
                    // The status line is already sent: end the body with an error so the
                    // client sees a truncated transfer, never a silently short export
                    // (a signed export also lacks its final checkpoint).
                    tracing::error!(error = %ekm_projections::error_chain(&error), "audit export failed");
                    Some((
                        Err(std::io::Error::other("audit export failed")),
                        (pages, None, None, true),
                    ))
                }
            }
        },
    );
    Ok(download(
        Body::from_stream(stream),
        format,
        &format!("ekm-audit-{org}"),
    ))
}

/// A streamed export as a download: its content type, and `NAME.jsonl` or `NAME.csv`.
pub(crate) fn download(body: Body, format: Format, name: &str) -> Response {
    let (content_type, extension) = match format {
        Format::JsonLines => ("application/jsonl", "jsonl"),
        Format::Csv => ("text/csv; charset=utf-8", "csv"),
    };
    let mut response = body.into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    if let Ok(value) =
        HeaderValue::from_str(&format!("attachment; filename=\"{name}.{extension}\""))
    {
        headers.insert(header::CONTENT_DISPOSITION, value);
    }
    response
}

/// `GET /v1/audit/signing-key`: the platform's public audit signing key, for verifying
/// exports offline (`ekm audit verify --file --public-key`), and the keys rotations retired,
/// for older exports. Public information; any token.
#[utoipa::path(
    get,
    path = "/v1/audit/signing-key",
    tag = "audit",
    summary = "The public key that signs exports",
    responses(
        (status = 200, description = "The key and the retired ones", body = crate::openapi::SigningKeyDoc)
    )
)]
pub async fn signing_key(
    State(state): State<AppState>,
    _caller: Caller,
) -> Result<Json<Value>, ApiError> {
    let key = state.app.signing_key();
    let previous: Vec<Value> = state
        .app
        .signing_keys()
        .await?
        .into_iter()
        .filter(|r| r.retired_at.is_some() && r.key_id != key.key_id())
        .map(|r| {
            json!({
                "algorithm": "ed25519",
                "public_key": r.public_key,
                "key_id": r.key_id,
                "retired_at": r.retired_at.map(|t| rfc3339(ekm_store::time::from_micros(t))),
            })
        })
        .collect();
    Ok(Json(json!({
        "algorithm": "ed25519",
        "public_key": key.public_key_base64(),
        "key_id": key.key_id(),
        "previous": previous,
    })))
}

#[utoipa::path(
    get,
    operation_id = "verify_audit",
    path = "/v1/audit/verify",
    tag = "audit",
    summary = "Verify the hash chain and the access log's seals",
    params(
        ("org" = Option<String>, Query, description = "Organization id (default: the token's).")
    ),
    responses(
        (status = 200, description = "The report", body = crate::openapi::VerifyDoc)
    )
)]
pub async fn verify(
    State(state): State<AppState>,
    caller: Caller,
    query: Result<Query<HashMap<String, String>>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let Query(query) = query.map_err(|_| ApiError::invalid("the query string is not valid"))?;
    check_keys(&query, &["org"])?;
    let org = audited_org_whole(&caller, query.get("org"))?;
    let chain = state.app.verify(org).await?;
    let access = state.app.verify_access(org).await?;
    let mut answer = serde_json::to_value(&chain).map_err(|e| crate::error::internal(&e))?;
    if let Some(access) = access {
        answer["ok"] = json!(chain.ok && access.ok());
        answer["access_log"] = access_report_json(&access);
    }
    Ok(Json(answer))
}

/// An access-log verification as JSON (`/v1/audit/verify`, `ekm audit verify --json`).
pub fn access_report_json(report: &ekm_store::access_log::AccessReport) -> Value {
    json!({
        "ok": report.ok(),
        "records": report.records,
        "streams": report.streams,
        "first_failure": report.first_failure.as_ref().map(|f| json!({
            "id": f.id,
            "stream": f.stream,
            "seq": f.seq,
            "problem": f.problem,
        })),
    })
}
