//! Tokens and tenancy: an organization's token never sees another organization's scopes.

use serde_json::json;

use crate::harness::{Backend, TestApp};
use crate::on_both_backends;

async fn get_scope_is_not_found_when_the_scope_is_another_orgs(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let (org_a, admin_a) = app.org("enterprise").await;
    let (_org_b, admin_b) = app.org("enterprise").await;
    let team_a = app.scope(&admin_a, "team", "research", &org_a).await;
    let nowhere = uuid::Uuid::now_v7().to_string();

    let missing = app.get(&format!("/v1/scopes/{nowhere}"), &admin_b).await;
    missing.assert_problem(404, "not_found");
    for path in [
        format!("/v1/scopes/{team_a}"),
        format!("/v1/scopes/{team_a}/children"),
        format!("/v1/orgs/{org_a}"),
    ] {
        let foreign = app.get(&path, &admin_b).await;
        foreign.assert_problem(404, "not_found");
    }
    let foreign_pause = app.pause(&admin_b, &team_a).await;
    foreign_pause.assert_problem(404, "not_found");
    assert_eq!(foreign_pause.body["detail"], missing.body["detail"]);
    app.post(
        "/v1/scopes",
        &admin_b,
        json!({"kind": "thread", "name": "x", "parent_id": team_a}),
    )
    .await
    .assert_problem(404, "not_found");
    // Nothing happened to organization A.
    assert_eq!(
        app.get(&format!("/v1/scopes/{team_a}"), &admin_a)
            .await
            .body["own_state"],
        "active"
    );
    app.stop().await;
}
on_both_backends!(get_scope_is_not_found_when_the_scope_is_another_orgs);

async fn operator_requests_are_refused_when_they_reach_into_an_org(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let (org, admin) = app.org("enterprise").await;
    let operator = app.operator_token.clone();
    assert_eq!(
        app.get(&format!("/v1/orgs/{org}"), &operator).await.status,
        200
    );
    app.get(&format!("/v1/scopes/{org}"), &operator)
        .await
        .assert_problem(403, "forbidden");
    app.pause(&operator, &org)
        .await
        .assert_problem(403, "forbidden");
    // An org admin cannot create organizations.
    app.post("/v1/orgs", &admin, json!({"name": "Evil"}))
        .await
        .assert_problem(403, "forbidden");
    app.stop().await;
}
on_both_backends!(operator_requests_are_refused_when_they_reach_into_an_org);

async fn requests_are_refused_when_the_token_is_missing_or_unknown(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let (org, _admin) = app.org("enterprise").await;
    let path = format!("/v1/scopes/{org}");
    app.call("GET", &path, None, None)
        .await
        .assert_problem(401, "unauthorized");
    app.call("GET", &path, Some("ekm_not_a_real_token"), None)
        .await
        .assert_problem(401, "unauthorized");
    let wrong_scheme = app
        .client
        .get(format!("{}{path}", app.base))
        .header("authorization", format!("Basic {}", app.operator_token))
        .send()
        .await
        .unwrap();
    assert_eq!(wrong_scheme.status(), 401);
    app.call("POST", "/v1/orgs", None, Some(json!({"name": "x"})))
        .await
        .assert_problem(401, "unauthorized");
    // Tokens are stored as hashes: the secret is not in the token table.
    let stored: Vec<String> = match &app.db {
        ekm_store::Db::Sqlite(db) => sqlx::query_scalar("SELECT token_hash FROM tokens")
            .fetch_all(&db.read)
            .await
            .unwrap(),
        ekm_store::Db::Postgres(db) => sqlx::query_scalar("SELECT token_hash FROM tokens")
            .fetch_all(&db.pool)
            .await
            .unwrap(),
    };
    assert!(!stored.is_empty());
    assert!(stored
        .iter()
        .all(|h| h.len() == 64 && !h.contains(&app.operator_token)));
    app.stop().await;
}
on_both_backends!(requests_are_refused_when_the_token_is_missing_or_unknown);

/// Tokens are cached for at most a second: one revoked elsewhere (here, straight in the
/// database, as another instance would) stops working within that bound.
async fn requests_are_refused_within_a_second_when_the_token_is_revoked_elsewhere(
    backend: Backend,
) {
    let app = TestApp::spawn(backend).await;
    let (org, admin) = app.org("enterprise").await;
    let path = format!("/v1/scopes/{org}");
    assert_eq!(app.get(&path, &admin).await.status, 200, "now cached");
    let hash = ekm_store::token_hash(&admin);
    crate::audit::exec(
        &app.db,
        &format!("UPDATE tokens SET revoked_at = 1 WHERE token_hash = '{hash}'"),
    )
    .await;
    let revoked = std::time::Instant::now();
    loop {
        let response = app.get(&path, &admin).await;
        if response.status == 401 {
            break;
        }
        assert!(
            revoked.elapsed() < std::time::Duration::from_millis(1500),
            "still accepted after {:?}",
            revoked.elapsed()
        );
        tokio::task::yield_now().await;
    }
    app.stop().await;
}
on_both_backends!(requests_are_refused_within_a_second_when_the_token_is_revoked_elsewhere);
