//! The admin console: a few static files (HTML, CSS, one JavaScript module) embedded in the
//! binary and served at `/console`. The page talks to the same HTTP API as every other
//! client, with the bearer token the user signs in with (ADR 0010).

use axum::extract::rejection::PathRejection;
use axum::extract::Path;
use axum::http::{header, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

use crate::endpoints::{Endpoints, Verb};
use crate::error::ApiError;

/// No inline script or style, nothing from elsewhere: the page loads only its own files
/// and talks only to its own origin.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; \
    style-src 'self'; img-src 'self'; connect-src 'self'; base-uri 'none'; \
    form-action 'self'; frame-ancestors 'none'";

struct Asset {
    name: &'static str,
    content_type: &'static str,
    body: &'static str,
}

const INDEX: Asset = Asset {
    name: "index.html",
    content_type: "text/html; charset=utf-8",
    body: include_str!("../console/index.html"),
};

const ASSETS: [Asset; 3] = [
    INDEX,
    Asset {
        name: "app.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_str!("../console/app.js"),
    },
    Asset {
        name: "style.css",
        content_type: "text/css; charset=utf-8",
        body: include_str!("../console/style.css"),
    },
];

pub(crate) fn register(endpoints: &mut Endpoints) {
    endpoints.add(Verb::Get, "/console", index);
    // The same page, for whoever types the trailing slash (its links are absolute).
    endpoints.add(Verb::Get, "/console/", index);
    endpoints.add(Verb::Get, "/console/{asset}", asset);
}

#[utoipa::path(
    get,
    operation_id = "console",
    path = "/console",
    tag = "console",
    summary = "The admin console",
    responses(
        (status = 200, description = "HTML", body = String, content_type = "text/html")
    ),
    security(())
)]
pub(crate) async fn index() -> Response {
    serve(&INDEX)
}

#[utoipa::path(
    get,
    operation_id = "console_asset",
    path = "/console/{asset}",
    tag = "console",
    summary = "A console asset",
    params(
        ("asset" = String, Path, description = "app.js or app.css.")
    ),
    responses(
        (status = 200, description = "The asset", content((String = "text/javascript"), (String = "text/css")))
    ),
    security(())
)]
pub(crate) async fn asset(path: Result<Path<String>, PathRejection>) -> Result<Response, ApiError> {
    let name = path
        .map(|Path(name)| name)
        .map_err(|_| ApiError::invalid("the path is not valid"))?;
    ASSETS
        .iter()
        .find(|a| a.name == name)
        .map(serve)
        .ok_or_else(|| ApiError::not_found("no such console file"))
}

fn serve(asset: &Asset) -> Response {
    let mut response = (StatusCode::OK, asset.body).into_response();
    let headers = response.headers_mut();
    let fixed: [(HeaderName, &'static str); 6] = [
        (header::CONTENT_TYPE, asset.content_type),
        (header::CONTENT_SECURITY_POLICY, CONTENT_SECURITY_POLICY),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        // The files change with the binary: always revalidate, never serve a stale page.
        (header::CACHE_CONTROL, "no-cache"),
        (header::REFERRER_POLICY, "no-referrer"),
        (header::X_FRAME_OPTIONS, "DENY"),
    ];
    for (name, value) in fixed {
        headers.insert(name, HeaderValue::from_static(value));
    }
    response
}
