//! Anything a client can send gets a 4xx problem with a stable code, never a 500, and loses
//! nothing.

use proptest::prelude::*;
use serde_json::{json, Value};

use crate::harness::{Backend, TestApp};
use crate::on_both_backends;

async fn any_request_gets_a_problem_when_malformed(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let (org, admin) = app.org("enterprise").await;
    let team = app.scope(&admin, "team", "research", &org).await;
    let unknown = uuid::Uuid::now_v7().to_string();
    let events_before = app.db.event_count().await.unwrap();

    let raw = |method: &str, path: String, body: &'static str| {
        let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        app.client
            .request(method, format!("{}{path}", app.base))
            .bearer_auth(&admin)
            .header("content-type", "application/json")
            .body(body)
    };
    let cases: Vec<(reqwest::RequestBuilder, u16, &str)> = vec![
        (
            raw("POST", "/v1/scopes".into(), "{not json"),
            400,
            "invalid_request",
        ),
        (raw("POST", "/v1/scopes".into(), ""), 400, "invalid_request"),
        (
            raw("POST", "/v1/scopes".into(), "[]"),
            400,
            "invalid_request",
        ),
        (
            raw(
                "POST",
                "/v1/scopes".into(),
                r#"{"kind": 7, "name": "x", "parent_id": "y"}"#,
            ),
            400,
            "invalid_request",
        ),
        (
            raw(
                "POST",
                "/v1/scopes".into(),
                r#"{"kind": "galaxy", "name": "x", "parent_id": "y"}"#,
            ),
            400,
            "invalid_request",
        ),
        (
            raw(
                "POST",
                "/v1/scopes".into(),
                r#"{"kind": "organization", "name": "x", "parent_id": "y"}"#,
            ),
            400,
            "invalid_request",
        ),
        (
            raw(
                "POST",
                "/v1/scopes".into(),
                r#"{"kind": "team", "name": "", "parent_id": "y"}"#,
            ),
            400,
            "invalid_request",
        ),
        (
            raw(
                "POST",
                "/v1/scopes".into(),
                r#"{"kind": "team", "name": "x", "parent_id": "not-a-uuid"}"#,
            ),
            400,
            "invalid_request",
        ),
        (
            raw(
                "POST",
                "/v1/scopes".into(),
                r#"{"kind": "team", "name": "x", "parent_id": "00000000-0000-7000-8000-000000000000"}"#,
            ),
            404,
            "not_found",
        ),
        (
            raw(
                "POST",
                "/v1/scopes".into(),
                r#"{"kind": "team", "name": "x", "parent_id": "x", "extra": 1}"#,
            ),
            400,
            "invalid_request",
        ),
        (
            raw("POST", format!("/v1/scopes/{team}/pause"), "{}"),
            400,
            "invalid_request",
        ),
        (
            raw(
                "POST",
                format!("/v1/scopes/{team}/pause"),
                r#"{"reason": 5}"#,
            ),
            400,
            "invalid_request",
        ),
        (
            raw(
                "POST",
                format!("/v1/scopes/{team}/pause"),
                r#"{"reason": "   "}"#,
            ),
            400,
            "invalid_request",
        ),
        (
            raw(
                "POST",
                format!("/v1/scopes/{team}/revoke"),
                r#"{"reason": "r", "confirm": 1}"#,
            ),
            400,
            "invalid_request",
        ),
        (
            raw(
                "POST",
                "/v1/scopes/not-a-uuid/pause".into(),
                r#"{"reason": "r"}"#,
            ),
            400,
            "invalid_request",
        ),
        (
            raw(
                "POST",
                format!("/v1/scopes/{unknown}/pause"),
                r#"{"reason": "r"}"#,
            ),
            404,
            "not_found",
        ),
        (
            raw("GET", format!("/v1/scopes/{unknown}"), ""),
            404,
            "not_found",
        ),
        (
            raw("GET", "/v1/scopes/%FF%FE".into(), ""),
            400,
            "invalid_request",
        ),
        (
            raw("GET", format!("/v1/scopes/{team}/children?limit=0"), ""),
            400,
            "invalid_request",
        ),
        (
            raw("GET", format!("/v1/scopes/{team}/children?limit=abc"), ""),
            400,
            "invalid_request",
        ),
        (
            raw("GET", format!("/v1/scopes/{team}/children?cursor=%%%"), ""),
            400,
            "invalid_request",
        ),
        (
            raw("GET", format!("/v1/scopes/{team}/children?cursor=Zm9v"), ""),
            400,
            "invalid_request",
        ),
        (
            raw("GET", format!("/v1/scopes/{team}/children?colour=red"), ""),
            400,
            "invalid_request",
        ),
        (
            raw("GET", "/v1/orgs/123".into(), ""),
            400,
            "invalid_request",
        ),
        (raw("GET", format!("/v1/orgs/{team}"), ""), 404, "not_found"),
        (
            raw("DELETE", format!("/v1/scopes/{team}"), ""),
            405,
            "invalid_request",
        ),
        (raw("GET", "/v1/nothing-here".into(), ""), 404, "not_found"),
        (
            raw("POST", format!("/v1/scopes/{team}/pause"), "{}").header("if-match", "yesterday"),
            400,
            "invalid_request",
        ),
    ];
    for (request, status, code) in cases {
        let response = request.send().await.unwrap();
        let got_status = response.status().as_u16();
        let content_type = response.headers()["content-type"]
            .to_str()
            .unwrap()
            .to_owned();
        let body: Value = response.json().await.unwrap();
        assert_eq!(
            (got_status, body["code"].as_str().unwrap()),
            (status, code),
            "{body}"
        );
        assert_eq!(content_type, "application/problem+json");
    }

    // A body over the limit.
    let huge = json!({"kind": "team", "name": "x".repeat(100_000), "parent_id": org});
    let too_big = app.post("/v1/scopes", &admin, huge).await;
    too_big.assert_problem(413, "invalid_request");
    // An over-long name within the limit.
    let long = json!({"kind": "team", "name": "x".repeat(201), "parent_id": org});
    app.post("/v1/scopes", &admin, long)
        .await
        .assert_problem(400, "invalid_request");

    // Nothing was recorded by any of it.
    assert_eq!(app.db.event_count().await.unwrap(), events_before);
    app.stop().await;
}
on_both_backends!(any_request_gets_a_problem_when_malformed);

/// Arbitrary JSON to every write endpoint: never a 5xx, always problem+json when refused.
fn any_request_gets_no_server_error_when_its_body_is_arbitrary(backend: Backend) {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let (app, org, admin) = runtime.block_on(async {
        let app = TestApp::spawn(backend).await;
        let (org, admin) = app.org("enterprise").await;
        (app, org, admin)
    });
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        "\\PC{0,40}".prop_map(Value::from),
        Just(Value::from(org.clone())),
    ];
    let value = leaf.prop_recursive(3, 16, 4, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
            proptest::collection::btree_map(
                prop_oneof![
                    Just("kind".to_owned()),
                    Just("name".to_owned()),
                    Just("parent_id".to_owned()),
                    Just("reason".to_owned()),
                    Just("confirm".to_owned()),
                    "[a-z]{1,6}"
                ],
                inner,
                0..5
            )
            .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    });
    let paths = [
        "/v1/orgs",
        "/v1/scopes",
        "pause",
        "resume",
        "revoke",
        "rotate",
    ];
    // Control characters, NUL among them (PostgreSQL's text cannot hold one), in every
    // string field of every command, each once: the random bodies below rarely get there.
    for control in ["a\u{0}b", "a\u{7}b", "\u{1b}[31m"] {
        let scoped = |action: &str| format!("/v1/scopes/{org}/{action}");
        for (path, body) in [
            ("/v1/orgs".to_owned(), json!({"name": control})),
            (
                "/v1/scopes".to_owned(),
                json!({"kind": "team", "name": control, "parent_id": org}),
            ),
            (scoped("pause"), json!({"reason": control})),
            (scoped("resume"), json!({"reason": control})),
            (scoped("rotate"), json!({"reason": control})),
            (scoped("revoke"), json!({"reason": control, "confirm": org})),
        ] {
            let token = if path == "/v1/orgs" {
                &app.operator_token
            } else {
                &admin
            };
            let response = runtime.block_on(app.post(&path, token, body));
            assert!(
                response.status.as_u16() < 500,
                "{path} with {control:?} -> {}",
                response.body
            );
            if !response.status.is_success() {
                assert_eq!(response.content_type, "application/problem+json");
            }
        }
    }
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig::with_cases(64));
    runner
        .run(&(value, 0..paths.len()), |(body, which)| {
            let path = match paths[which] {
                p if p.starts_with('/') => p.to_owned(),
                action => format!("/v1/scopes/{org}/{action}"),
            };
            let token = if path == "/v1/orgs" {
                app.operator_token.clone()
            } else {
                admin.clone()
            };
            let response = runtime.block_on(app.post(&path, &token, body));
            prop_assert!(
                response.status.as_u16() < 500,
                "{} -> {}",
                path,
                response.body
            );
            if !response.status.is_success() {
                prop_assert_eq!(&response.content_type, "application/problem+json");
            }
            Ok(())
        })
        .unwrap();
    runtime.block_on(app.stop());
}

#[test]
fn any_request_gets_no_server_error_when_its_body_is_arbitrary_on_sqlite() {
    any_request_gets_no_server_error_when_its_body_is_arbitrary(Backend::Sqlite);
}

#[test]
fn any_request_gets_no_server_error_when_its_body_is_arbitrary_on_postgres() {
    any_request_gets_no_server_error_when_its_body_is_arbitrary(Backend::Postgres);
}
