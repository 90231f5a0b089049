//! Router-level tests: requests through the real router (`tower::ServiceExt::oneshot`), over
//! an application on a temporary SQLite database, with no network.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;

use axum::body::Body;
use axum::http::{header, Method, Request, StatusCode};
use axum::response::Response;
use axum::routing::get;
use axum::Router;
use ekm_api::limits::Limits;
use ekm_api::{router, AppState};
use ekm_projections::{Projector, ProjectorConfig};
use ekm_service::keys::{local_master_key, KeyService};
use ekm_service::App;
use ekm_store::{Db, DbConfig, Tokens};
use serde_json::{json, Value};
use tower::ServiceExt;

struct Fixture {
    router: Router,
    operator: String,
    _dir: tempfile::TempDir,
}

async fn fixture() -> Fixture {
    let dir = tempfile::tempdir().expect("temporary directory");
    let config = DbConfig::Sqlite {
        path: dir.path().join("ekm.db"),
    };
    let db = Db::open(&config).await.expect("open database");
    Tokens::new(db.clone())
        .ensure_operator_token(dir.path())
        .await
        .expect("operator token");
    let operator = std::fs::read_to_string(dir.path().join(ekm_store::OPERATOR_TOKEN_FILE))
        .expect("operator token file")
        .trim()
        .to_owned();
    let seal = ekm_keys::SealKey::load(&dir.path().join(ekm_keys::AUDIT_KEY_FILE), true)
        .expect("audit key")
        .expect("audit key created");
    ekm_projections::register_seal_key(&db, &seal)
        .await
        .expect("register the audit key");
    let projector = Arc::new(Projector::standard(
        db.clone(),
        ProjectorConfig::default(),
        seal.clone(),
    ));
    projector.init().await.expect("projector init");
    let master = local_master_key(&db, &dir.path().join(ekm_keys::MASTER_KEY_FILE))
        .await
        .expect("master key");
    let keys = KeyService::new(db.clone(), master, std::time::Duration::from_secs(300));
    let app = App::new(
        db,
        projector,
        keys,
        seal,
        std::sync::Arc::new(ekm_keys::SigningKey::generate()),
    );
    app.load_memory().await.expect("load the scope tree");
    Fixture {
        router: router(AppState::new(app)),
        operator,
        _dir: dir,
    }
}

async fn send(router: &Router, request: Request<Body>) -> (StatusCode, Option<String>, Value) {
    let response: Response = router
        .clone()
        .oneshot(request)
        .await
        .expect("the router answers");
    let status = response.status();
    let content_type = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let bytes = axum::body::to_bytes(response.into_body(), 1 << 20)
        .await
        .expect("the body");
    let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    (status, content_type, body)
}

fn request(method: Method, uri: &str, token: Option<&str>, body: Option<&str>) -> Request<Body> {
    let mut builder = Request::builder().method(method).uri(uri);
    if let Some(token) = token {
        builder = builder.header(header::AUTHORIZATION, format!("Bearer {token}"));
    }
    if body.is_some() {
        builder = builder.header(header::CONTENT_TYPE, "application/json");
    }
    builder
        .body(body.map(|b| Body::from(b.to_owned())).unwrap_or_default())
        .expect("a request")
}

fn assert_problem(answer: &(StatusCode, Option<String>, Value), status: StatusCode, code: &str) {
    let (got, content_type, body) = answer;
    assert_eq!(*got, status, "{body}");
    assert_eq!(content_type.as_deref(), Some("application/problem+json"));
    assert_eq!(body["code"], code, "{body}");
    assert_eq!(body["status"], status.as_u16());
}

#[tokio::test]
async fn an_unauthenticated_request_is_refused_with_401() {
    let f = fixture().await;
    let answer = send(&f.router, request(Method::GET, "/v1/me", None, None)).await;
    assert_problem(&answer, StatusCode::UNAUTHORIZED, "unauthorized");
    let answer = send(
        &f.router,
        request(Method::GET, "/v1/me", Some("not-a-token"), None),
    )
    .await;
    assert_problem(&answer, StatusCode::UNAUTHORIZED, "unauthorized");
}

#[tokio::test]
async fn a_malformed_json_body_is_refused_with_400() {
    let f = fixture().await;
    let answer = send(
        &f.router,
        request(
            Method::POST,
            "/v1/orgs",
            Some(&f.operator),
            Some("{\"name\": "),
        ),
    )
    .await;
    assert_problem(&answer, StatusCode::BAD_REQUEST, "invalid_request");
    let answer = send(
        &f.router,
        request(
            Method::POST,
            "/v1/orgs",
            Some(&f.operator),
            Some(r#"{"name": "acme", "colour": "red"}"#),
        ),
    )
    .await;
    assert_problem(&answer, StatusCode::BAD_REQUEST, "invalid_request");
}

#[tokio::test]
async fn an_unknown_route_is_a_404_problem_and_a_wrong_method_a_405() {
    let f = fixture().await;
    let answer = send(
        &f.router,
        request(Method::GET, "/v1/nothing-here", Some(&f.operator), None),
    )
    .await;
    assert_problem(&answer, StatusCode::NOT_FOUND, "not_found");
    let answer = send(
        &f.router,
        request(Method::DELETE, "/v1/orgs", Some(&f.operator), None),
    )
    .await;
    assert_problem(&answer, StatusCode::METHOD_NOT_ALLOWED, "invalid_request");
}

#[tokio::test]
async fn an_org_created_is_read_back_as_a_scope() {
    let f = fixture().await;
    let (status, _, created) = send(
        &f.router,
        request(
            Method::POST,
            "/v1/orgs",
            Some(&f.operator),
            Some(r#"{"name": "acme", "plan": "enterprise"}"#),
        ),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let id = created["id"].as_str().expect("the org's id").to_owned();
    let admin = created["admin_token"]
        .as_str()
        .expect("the admin token")
        .to_owned();
    let (status, _, scope) = send(
        &f.router,
        request(Method::GET, &format!("/v1/scopes/{id}"), Some(&admin), None),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{scope}");
    assert_eq!(scope["id"], json!(id));
    assert_eq!(scope["name"], "acme");
    assert_eq!(scope["kind"], "organization");
    assert_eq!(scope["effective_state"], "active");
    // Another organization's token does not see it.
    let (_, _, other) = send(
        &f.router,
        request(
            Method::POST,
            "/v1/orgs",
            Some(&f.operator),
            Some(r#"{"name": "globex"}"#),
        ),
    )
    .await;
    let stranger = other["admin_token"].as_str().expect("the admin token");
    let answer = send(
        &f.router,
        request(
            Method::GET,
            &format!("/v1/scopes/{id}"),
            Some(stranger),
            None,
        ),
    )
    .await;
    assert_problem(&answer, StatusCode::NOT_FOUND, "not_found");
}

async fn panics() -> &'static str {
    panic!("a bug in a handler")
}

#[tokio::test]
async fn a_handler_that_panics_is_answered_with_a_500_problem() {
    let routes = Router::new().route("/boom", get(panics));
    let guarded = ekm_api::guard(routes, Limits::default());
    let answer = send(&guarded, request(Method::GET, "/boom", None, None)).await;
    assert_problem(&answer, StatusCode::INTERNAL_SERVER_ERROR, "internal");
    // The payload is not echoed.
    assert!(!answer.2.to_string().contains("a bug in a handler"));
    // The guard's other layers are there too: unknown routes are problems.
    let answer = send(&guarded, request(Method::GET, "/nothing", None, None)).await;
    assert_problem(&answer, StatusCode::NOT_FOUND, "not_found");
}
