//! `Idempotency-Key` (issue 18 §3, ADR 0035): a retry is answered from the first answer,
//! across instances; another request under the same key is refused; an answer lost with
//! its connection is found on the retry; a token's secret is never kept.

use std::io::Write;

use serde_json::{json, Value};

use crate::harness::{Backend, Response, TestApp};
use crate::on_both_backends;

async fn post_with_key(app: &TestApp, path: &str, token: &str, key: &str, body: Value) -> Response {
    let request = app
        .client
        .post(format!("{}{path}", app.base))
        .bearer_auth(token)
        .header("Idempotency-Key", key)
        .json(&body);
    Response::from_reqwest(request.send().await.expect("request sent")).await
}

async fn children(app: &TestApp, token: &str, scope: &str) -> Vec<Value> {
    let listed = app
        .get(&format!("/v1/scopes/{scope}/children"), token)
        .await;
    assert_eq!(listed.status, 200, "{}", listed.body);
    listed.body["items"].as_array().cloned().unwrap_or_default()
}

async fn a_retry_is_answered_from_the_first_answer_and_acts_once(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let (org, admin) = app.org("enterprise").await;
    let create = json!({"kind": "team", "name": "research", "parent_id": org});

    // Given a create that carried a key
    let first = post_with_key(&app, "/v1/scopes", &admin, "k-1", create.clone()).await;
    assert_eq!(first.status, 201, "{}", first.body);
    assert!(!first.headers.contains_key("idempotency-replayed"));
    // When it is retried with the same key and body, here and on another instance
    let mut retries = vec![post_with_key(&app, "/v1/scopes", &admin, "k-1", create.clone()).await];
    // (Two instances on one SQLite file meet its single writer at start-up: PostgreSQL is
    // where instances share a database.)
    if matches!(backend, Backend::Postgres) {
        let peer = app.peer().await;
        retries.push(post_with_key(&peer, "/v1/scopes", &admin, "k-1", create.clone()).await);
    }
    // Then each answers the first result, marked as a replay, and one scope exists
    for retry in &retries {
        assert_eq!(retry.status, 201, "{}", retry.body);
        assert_eq!(retry.body, first.body);
        assert_eq!(retry.headers["idempotency-replayed"], "true");
    }
    assert_eq!(children(&app, &admin, &org).await.len(), 1);

    // The same key with another body is refused, and acts not
    let other = json!({"kind": "team", "name": "other", "parent_id": org});
    post_with_key(&app, "/v1/scopes", &admin, "k-1", other.clone())
        .await
        .assert_problem(422, "idempotency_key_reused");
    // A refusal keeps nothing: the key can carry the corrected request
    let bad = json!({"kind": "no-such-kind", "name": "x", "parent_id": org});
    post_with_key(&app, "/v1/scopes", &admin, "k-2", bad)
        .await
        .assert_problem(400, "invalid_request");
    let fixed = post_with_key(&app, "/v1/scopes", &admin, "k-2", other).await;
    assert_eq!(fixed.status, 201, "{}", fixed.body);
    // Another principal's key of the same text is its own
    let theirs = post_with_key(
        &app,
        "/v1/orgs",
        &app.operator_token,
        "k-1",
        json!({"name": "acme"}),
    )
    .await;
    assert_eq!(theirs.status, 201, "{}", theirs.body);
    assert_eq!(children(&app, &admin, &org).await.len(), 2);
    // A malformed key is refused before anything runs
    post_with_key(&app, "/v1/scopes", &admin, "bad key", create)
        .await
        .assert_problem(400, "invalid_request");
    assert_eq!(children(&app, &admin, &org).await.len(), 2);
}
on_both_backends!(a_retry_is_answered_from_the_first_answer_and_acts_once);

async fn an_answer_lost_with_its_connection_is_found_on_the_retry(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let (org, admin) = app.org("enterprise").await;
    let body = json!({"kind": "team", "name": "research", "parent_id": org}).to_string();

    // Given a create sent on a connection that the client closes without reading the answer
    let address = app.base.trim_start_matches("http://").to_owned();
    let mut stream = std::net::TcpStream::connect(&address).unwrap();
    write!(
        stream,
        "POST /v1/scopes HTTP/1.1\r\nHost: {address}\r\nAuthorization: Bearer {admin}\r\n\
         Content-Type: application/json\r\nIdempotency-Key: lost-1\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    stream.flush().unwrap();
    // ...once the create has committed (seen from another connection), before reading
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while children(&app, &admin, &org).await.is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "the create never committed"
        );
        tokio::task::yield_now().await;
    }
    drop(stream);

    // When the client retries with the same key (409 while the first still runs)
    let retried = loop {
        let retry = post_with_key(
            &app,
            "/v1/scopes",
            &admin,
            "lost-1",
            serde_json::from_str(&body).unwrap(),
        )
        .await;
        if retry.status != 409 {
            break retry;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the key stayed claimed: {}",
            retry.body
        );
        assert_eq!(retry.headers["retry-after"], "1");
        tokio::task::yield_now().await;
    };
    // Then it gets the first answer, and exactly one scope exists
    assert_eq!(retried.status, 201, "{}", retried.body);
    assert_eq!(retried.headers["idempotency-replayed"], "true");
    let listed = children(&app, &admin, &org).await;
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0]["id"], retried.body["id"]);
}
on_both_backends!(an_answer_lost_with_its_connection_is_found_on_the_retry);

async fn a_concurrent_duplicate_is_told_to_retry_and_a_token_secret_is_never_kept(
    backend: Backend,
) {
    let app = TestApp::spawn(backend).await;
    let (org, admin) = app.org("enterprise").await;
    // A first request still running: its key is claimed, the duplicate answers 409
    let keys = ekm_store::idempotency::Idempotency::new(app.db.clone());
    let principal = format!("{org}/admin");
    assert!(matches!(
        keys.begin(&principal, "busy", "fp").await.unwrap(),
        ekm_store::idempotency::Begun::First(_)
    ));
    assert_eq!(
        keys.begin(&principal, "busy", "fp").await.unwrap(),
        ekm_store::idempotency::Begun::Running
    );
    assert_eq!(
        keys.begin(&principal, "busy", "other").await.unwrap(),
        ekm_store::idempotency::Begun::Reused
    );

    // A token issued under a key: the secret is shown once, and the replay lacks it
    let path = format!("/v1/orgs/{org}/tokens");
    let request = json!({"principal": "agent", "kind": "service", "role": "member"});
    let issued = post_with_key(&app, &path, &admin, "t-1", request.clone()).await;
    assert_eq!(issued.status, 201, "{}", issued.body);
    let secret = issued.body["token"].as_str().unwrap().to_owned();
    let replayed = post_with_key(&app, &path, &admin, "t-1", request).await;
    assert_eq!(replayed.status, 201, "{}", replayed.body);
    assert_eq!(replayed.headers["idempotency-replayed"], "true");
    assert!(replayed.body.get("token").is_none(), "{}", replayed.body);
    assert_eq!(replayed.body["id"], issued.body["id"]);
    // Nor an organization's first admin token, issued under a key by the operator
    let created = post_with_key(
        &app,
        "/v1/orgs",
        &app.operator_token,
        "o-1",
        json!({"name": "globex"}),
    )
    .await;
    assert_eq!(created.status, 201, "{}", created.body);
    let admin_secret = created.body["admin_token"].as_str().unwrap().to_owned();
    let replayed = post_with_key(
        &app,
        "/v1/orgs",
        &app.operator_token,
        "o-1",
        json!({"name": "globex"}),
    )
    .await;
    assert_eq!(replayed.headers["idempotency-replayed"], "true");
    assert!(
        replayed.body.get("admin_token").is_none(),
        "{}",
        replayed.body
    );
    assert_eq!(replayed.body["id"], created.body["id"]);
    // Nothing in the table holds either
    let stored: Vec<Vec<u8>> = match &app.db {
        ekm_store::Db::Postgres(pg) => sqlx::query_scalar(
            "SELECT response_body FROM idempotency_keys WHERE response_body IS NOT NULL",
        )
        .fetch_all(&pg.pool)
        .await
        .unwrap(),
        ekm_store::Db::Sqlite(db) => sqlx::query_scalar(
            "SELECT response_body FROM idempotency_keys WHERE response_body IS NOT NULL",
        )
        .fetch_all(&db.write)
        .await
        .unwrap(),
    };
    assert!(!stored.is_empty());
    assert!(stored.iter().all(|body| {
        let text = String::from_utf8_lossy(body);
        !text.contains(&secret) && !text.contains(&admin_secret)
    }));
}
on_both_backends!(a_concurrent_duplicate_is_told_to_retry_and_a_token_secret_is_never_kept);
