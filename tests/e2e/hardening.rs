//! Issue 14's smaller findings, each reproduced as an attack first: invisible characters in
//! names, list cursors that leaked ids, and the operator's break-glass admin token.

use serde_json::json;

use crate::harness::{Backend, TestApp};
use crate::on_both_backends;

/// A name with a right-to-left override and a zero-width space shows as something it is
/// not; it is refused for scopes and organizations alike, and nothing is recorded.
async fn names_with_invisible_characters_are_refused(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let (org, admin) = app.org("enterprise").await;
    let events_before = app.db.event_count().await.unwrap();
    for name in [
        "invoice\u{202E}exe.pdf\u{200B}",
        "team\u{200D}",
        "\u{2067}admin\u{2069}",
        "\u{3164}",
        "ops\u{00A0}team",
    ] {
        app.post(
            "/v1/scopes",
            &admin,
            json!({"kind": "team", "name": name, "parent_id": org}),
        )
        .await
        .assert_problem(400, "invalid_request");
        app.post("/v1/orgs", &app.operator_token, json!({"name": name}))
            .await
            .assert_problem(400, "invalid_request");
    }
    // A reason with a bidi override would read differently in the audit log.
    app.post(
        &format!("/v1/scopes/{org}/pause"),
        &admin,
        json!({"reason": "ticket \u{202E}1174"}),
    )
    .await
    .assert_problem(400, "invalid_request");
    assert_eq!(app.db.event_count().await.unwrap(), events_before);
    // Visible text of any script still works.
    app.scope(&admin, "team", "研究 & Entwicklung ☂", &org)
        .await;
    app.stop().await;
}
on_both_backends!(names_with_invisible_characters_are_refused);
