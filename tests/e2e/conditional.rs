//! Conditional GETs (issue 18, item 6): `If-None-Match` answers 304 while the representation
//! is unchanged, and never while it changed, even where the scope's version did not move.

use crate::harness::{Backend, TestApp};
use crate::on_both_backends;

/// GET `path` with `If-None-Match: tag` (if any): (status, ETag, body bytes).
async fn get_if(app: &TestApp, token: &str, path: &str, tag: Option<&str>) -> (u16, String, usize) {
    let mut request = app
        .client
        .get(format!("{}{path}", app.base))
        .bearer_auth(token);
    if let Some(tag) = tag {
        request = request.header("if-none-match", tag);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let etag = response
        .headers()
        .get("etag")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    let body = response.bytes().await.unwrap().len();
    (status, etag, body)
}

async fn scope_get_answers_304_only_while_its_effective_state_is_unchanged(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let (org, admin) = app.org("enterprise").await;
    let team = app.scope(&admin, "team", "research", &org).await;
    let thread = app.scope(&admin, "thread", "t-1", &team).await;
    let path = format!("/v1/scopes/{thread}");

    let (status, tag, _) = get_if(&app, &admin, &path, None).await;
    assert_eq!(status, 200);
    assert!(tag.starts_with("\"1."), "the version, then a digest: {tag}");
    let (status, again, body) = get_if(&app, &admin, &path, Some(&tag)).await;
    assert_eq!((status, body), (304, 0), "unchanged: not modified, no body");
    assert_eq!(again, tag);
    // Weak comparison, lists and `*`.
    for header in [
        format!("W/{tag}"),
        format!("\"other\", {tag}"),
        "*".to_owned(),
    ] {
        assert_eq!(get_if(&app, &admin, &path, Some(&header)).await.0, 304);
    }
    assert_eq!(
        get_if(&app, &admin, &path, Some("\"1\"")).await.0,
        200,
        "the bare version is not the representation's tag"
    );

    // The attack: a pause above the thread changes what it answers (effective state
    // `paused`), though the thread's own version stays 1. A client holding the old tag
    // must get the new state, not a 304 that keeps it believing `active`.
    assert_eq!(app.pause(&admin, &team).await.status, 200);
    let (status, changed, body) = get_if(&app, &admin, &path, Some(&tag)).await;
    assert_eq!(status, 200, "the effective state changed");
    assert!(body > 0);
    assert_ne!(changed, tag);
    assert!(changed.starts_with("\"1."), "same version: {changed}");
    let read = app.get(&path, &admin).await;
    assert_eq!(read.body["effective_state"], "paused", "{}", read.body);

    // The tag a GET gave works as If-Match (its version counts).
    let resumed = app
        .client
        .post(format!("{}/v1/scopes/{thread}/pause", app.base))
        .bearer_auth(&admin)
        .header("if-match", changed.as_str())
        .json(&serde_json::json!({"reason": "r"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resumed.status(), 200);
    app.stop().await;
}
on_both_backends!(scope_get_answers_304_only_while_its_effective_state_is_unchanged);

async fn token_and_grant_lists_answer_304_until_they_change(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let (org, admin) = app.org("enterprise").await;
    for list in ["tokens", "grants"] {
        let path = format!("/v1/orgs/{org}/{list}");
        let (status, tag, _) = get_if(&app, &admin, &path, None).await;
        assert_eq!(status, 200);
        assert!(!tag.is_empty());
        assert_eq!(get_if(&app, &admin, &path, Some(&tag)).await.0, 304);
        match list {
            "tokens" => {
                app.token(&admin, &org, "svc", "member").await;
            }
            _ => {
                app.grant(&admin, &org, "svc", "data:use", None).await;
            }
        }
        let (status, changed, _) = get_if(&app, &admin, &path, Some(&tag)).await;
        assert_eq!(status, 200, "{list}: a new item changes the list");
        assert_ne!(changed, tag);
    }
    app.stop().await;
}
on_both_backends!(token_and_grant_lists_answer_304_until_they_change);

/// The master key's status carries a tag of its body (its last health check changes without
/// an event), and answers 304 only to that tag.
async fn master_key_status_is_tagged_by_its_body(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let (org, admin) = app.org("enterprise").await;
    let path = format!("/v1/orgs/{org}/master-key");
    let (status, tag, _) = get_if(&app, &admin, &path, None).await;
    assert_eq!(status, 200);
    assert!(tag.starts_with("\"1.") && tag.len() > 10, "{tag}");
    assert_eq!(get_if(&app, &admin, &path, Some(&tag)).await.0, 304);
    assert_eq!(
        get_if(&app, &admin, &path, Some("\"1\"")).await.0,
        200,
        "the bare version is not the body's tag"
    );
    app.stop().await;
}
on_both_backends!(master_key_status_is_tagged_by_its_body);
