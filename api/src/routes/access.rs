//! The data plane's access log (ADR 0026): list with filters, streamed export (JSON Lines,
//! CSV), and a scope's summary of who used its keys. Read as the audit log is: `audit:read`
//! on the organization reads all of it, on a subtree only that subtree's records.

use std::collections::HashMap;

use axum::body::{Body, Bytes};
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::response::Response;
use axum::Json;
use ekm_domain::ScopeId;
use ekm_store::time::rfc3339;
use ekm_store::{AccessEntry, AccessFilter, AccessLog};
use serde_json::{json, Value};

use crate::context::Caller;
use crate::cursor::{Binding, List};
use crate::error::{ApiError, Code};
use crate::routes::audit::{audited_org, audited_subtree, download, time_range, Format};
use crate::routes::{check_keys, page_limit};
use crate::state::AppState;

const FILTER_KEYS: [&str; 7] = [
    "org",
    "scope",
    "principal",
    "operation",
    "outcome",
    "from",
    "to",
];
const OPERATIONS: [&str; 4] = ["encrypt", "decrypt", "datakey", "rewrap"];
const EXPORT_PAGE: i64 = 1_000;

/// One record as JSON (PRODUCT.md, "Access log").
pub fn record_json(entry: &AccessEntry) -> Value {
    let r = &entry.record;
    json!({
        "at": rfc3339(r.at),
        "org_id": r.org_id,
        "scope_id": r.scope_id,
        "principal": r.principal,
        "token_id": r.token_id,
        "operation": r.operation,
        "class": r.class,
        "key_version": r.key_version,
        "outcome": r.outcome,
        "request_id": r.request_id,
        "source_address": r.source_address,
        "justification": r.justification,
    })
}

pub const CSV_HEADER: &str = "at,org_id,scope_id,principal,token_id,operation,class,key_version,\
outcome,request_id,source_address,justification\n";

/// One record as a CSV line (fields quoted and defused as the audit export's).
pub fn record_csv(entry: &AccessEntry) -> String {
    let r = &entry.record;
    let version = r.key_version.map(|v| v.to_string()).unwrap_or_default();
    let fields = [
        rfc3339(r.at),
        r.org_id.clone(),
        r.scope_id.clone(),
        r.principal.clone(),
        r.token_id.clone(),
        r.operation.clone(),
        r.class.clone().unwrap_or_default(),
        version,
        r.outcome.clone(),
        r.request_id.clone(),
        r.source_address.clone().unwrap_or_default(),
        r.justification.clone().unwrap_or_default(),
    ];
    let mut line = fields
        .iter()
        .map(|f| crate::routes::audit::csv_field(f))
        .collect::<Vec<_>>()
        .join(",");
    line.push('\n');
    line
}

fn log(state: &AppState) -> Result<&AccessLog, ApiError> {
    state.app.access_log().ok_or_else(|| {
        ApiError::new(
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            Code::Unavailable,
            "this instance keeps no access log",
        )
    })
}

async fn filter(
    state: &AppState,
    caller: &Caller,
    query: &HashMap<String, String>,
) -> Result<AccessFilter, ApiError> {
    let org = audited_org(caller, query.get("org"))?;
    let subtree = audited_subtree(state, caller, &org, query.get("scope")).await?;
    let (from, to) = time_range(query)?;
    if let Some(operation) = query.get("operation") {
        if !OPERATIONS.contains(&operation.as_str()) {
            return Err(ApiError::invalid(
                "operation: one of encrypt, decrypt, datakey, rewrap",
            ));
        }
    }
    for key in ["principal", "outcome"] {
        if query
            .get(key)
            .is_some_and(|v| v.is_empty() || v.len() > 200 || v.chars().any(char::is_control))
        {
            return Err(ApiError::invalid(format!(
                "{key}: 1 to 200 characters, none of them control characters"
            )));
        }
    }
    Ok(AccessFilter {
        org_id: org.to_string(),
        subtree,
        principal: query.get("principal").cloned(),
        operation: query.get("operation").cloned(),
        outcome: query.get("outcome").cloned(),
        from,
        to,
        after: None,
        limit: 0,
    })
}

/// `GET /v1/audit/access`: one page of records, oldest first.
#[utoipa::path(
    get,
    operation_id = "list_access",
    path = "/v1/audit/access",
    tag = "audit",
    summary = "The data plane's access log",
    params(
        crate::openapi::AccessFilterParams,
        crate::openapi::PageParams
    ),
    responses(
        (status = 200, description = "A page", body = crate::openapi::AccessPageDoc)
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
    let log = log(&state)?;
    let mut filter = filter(&state, &caller, &query).await?;
    let limit = page_limit(query.get("limit"))?;
    // A cursor continues only the query that issued it.
    let from = filter.from.map(rfc3339).unwrap_or_default();
    let to = filter.to.map(rfc3339).unwrap_or_default();
    let bound = [
        filter.org_id.as_str(),
        filter.subtree.as_deref().unwrap_or(""),
        filter.principal.as_deref().unwrap_or(""),
        filter.operation.as_deref().unwrap_or(""),
        filter.outcome.as_deref().unwrap_or(""),
        from.as_str(),
        to.as_str(),
    ];
    let binding = Binding {
        list: List::Access,
        query: &bound,
    };
    filter.after = query
        .get("cursor")
        .map(|c| binding.decode_position(c))
        .transpose()?;
    filter.limit = i64::from(limit) + 1;
    let mut entries = log
        .query(&filter)
        .await
        .map_err(ekm_service::AppError::from)?;
    let more = entries.len() > limit as usize;
    entries.truncate(limit as usize);
    let next_cursor = if more {
        entries.last().map(|e| binding.encode_position(e.id))
    } else {
        None
    };
    Ok(Json(json!({
        "items": entries.iter().map(record_json).collect::<Vec<_>>(),
        "next_cursor": next_cursor,
    })))
}

/// `GET /v1/audit/access/export?format=jsonl|csv`: every matching record, streamed a page at
/// a time (memory stays flat whatever the log's size).
#[utoipa::path(
    get,
    operation_id = "export_access",
    path = "/v1/audit/access/export",
    tag = "audit",
    summary = "Export the access log",
    params(
        crate::openapi::AccessFilterParams,
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
    let log = log(&state)?.clone();
    let mut filter = filter(&state, &caller, &query).await?;
    filter.limit = EXPORT_PAGE;
    let org = filter.org_id.clone();
    let first = match format {
        Format::JsonLines => Bytes::new(),
        Format::Csv => Bytes::from_static(CSV_HEADER.as_bytes()),
    };
    let stream = futures_util::stream::unfold(
        (log, filter, Some(first), false),
        move |(log, mut filter, first, done)| async move {
            if done {
                return None;
            }
            if let Some(first) = first.filter(|f| !f.is_empty()) {
                return Some((Ok(first), (log, filter, None, false)));
            }
            match log.query(&filter).await {
                Ok(entries) if entries.is_empty() => None,
                Ok(entries) => {
                    filter.after = entries.last().map(|e| e.id);
                    let last = entries.len() < EXPORT_PAGE as usize;
                    let chunk: String = entries
                        .iter()
                        .map(|e| match format {
                            Format::JsonLines => format!("{}\n", record_json(e)),
                            Format::Csv => record_csv(e),
                        })
                        .collect();
                    Some((Ok(Bytes::from(chunk)), (log, filter, None, last)))
                }
                Err(error) => {
                    // The status line is already sent: end the body with an error, never a
                    // silently short export.
                    tracing::error!(error = %ekm_projections::error_chain(&error), "access log export failed");
                    Some((
                        Err(std::io::Error::other("access log export failed")),
                        (log, filter, None, true),
                    ))
                }
            }
        },
    );
    Ok(download(
        Body::from_stream(stream),
        format,
        &format!("ekm-access-{org}"),
    ))
}

/// `GET /v1/scopes/{id}/access-summary?from=&to=`: uses of the scope's subtree counted per
/// principal, operation, outcome and key version.
#[utoipa::path(
    get,
    operation_id = "access_summary",
    path = "/v1/scopes/{id}/access-summary",
    tag = "audit",
    summary = "Uses of a subtree, counted",
    params(
        crate::openapi::ScopePath,
        ("from" = Option<String>, Query, description = "RFC 3339, inclusive."),
        ("to" = Option<String>, Query, description = "RFC 3339, exclusive.")
    ),
    responses(
        (status = 200, description = "The counts", body = crate::openapi::AccessSummaryDoc)
    )
)]
pub async fn summary(
    State(state): State<AppState>,
    caller: Caller,
    id: Result<Path<String>, PathRejection>,
    query: Result<Query<HashMap<String, String>>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let Query(query) = query.map_err(|_| ApiError::invalid("the query string is not valid"))?;
    check_keys(&query, &["from", "to"])?;
    let Path(id) = id.map_err(|_| ApiError::invalid("the path is not valid"))?;
    let id = ScopeId::parse(&id).map_err(|e| ApiError::invalid(e.to_string()))?;
    let log = log(&state)?;
    let org = audited_org(&caller, None)?;
    let scope_text = id.to_string();
    let subtree = audited_subtree(&state, &caller, &org, Some(&scope_text)).await?;
    let (from, to) = time_range(&query)?;
    let filter = AccessFilter {
        org_id: org.to_string(),
        subtree,
        from,
        to,
        ..AccessFilter::default()
    };
    let counts = log
        .summary(&filter)
        .await
        .map_err(ekm_service::AppError::from)?;
    Ok(Json(json!({
        "scope_id": scope_text,
        "from": from.map(rfc3339),
        "to": to.map(rfc3339),
        "items": counts.iter().map(|c| json!({
            "principal": c.principal,
            "operation": c.operation,
            "outcome": c.outcome,
            "key_version": c.key_version,
            "count": c.count,
        })).collect::<Vec<_>>(),
    })))
}
