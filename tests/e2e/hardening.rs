//! Issue 14's smaller findings, each reproduced as an attack first: invisible characters in
//! names, list cursors that leaked ids, and the operator's break-glass admin token.

use serde_json::json;

use crate::harness::{Backend, TestApp};
use crate::on_both_backends;

/// A name with a right-to-left override and a zero-width space shows as something it is
/// not; it is refused for scopes and organizations alike, and nothing is recorded.
async fn create_is_refused_when_the_name_has_invisible_characters(backend: Backend) {
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
on_both_backends!(create_is_refused_when_the_name_has_invisible_characters);

/// Everything a response reveals: its body, and the text inside any cursor in it (a cursor
/// is base64url; what it decodes to is as good as printed).
fn revealed(response: &crate::harness::Response) -> String {
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use base64::Engine;
    let mut text = response.body.to_string();
    if let Some(cursor) = response.body["next_cursor"].as_str() {
        if let Ok(bytes) = URL_SAFE_NO_PAD.decode(cursor) {
            text.push_str(&String::from_utf8_lossy(&bytes));
        }
    }
    text
}

/// Follows `next_cursor` from `path` (which has a query string) for at most 50 pages;
/// returns the ids listed and everything revealed on the way.
async fn walk(app: &TestApp, token: &str, path: &str) -> (Vec<String>, String) {
    let mut ids = vec![];
    let mut seen = String::new();
    let mut cursor: Option<String> = None;
    for _ in 0..50 {
        let url = match &cursor {
            Some(c) => format!("{path}&cursor={c}"),
            None => path.to_owned(),
        };
        let page = app.get(&url, token).await;
        assert_eq!(page.status, 200, "{url}: {}", page.body);
        seen.push_str(&revealed(&page));
        for item in page.body["items"].as_array().unwrap() {
            ids.push(item["id"].as_str().unwrap().to_owned());
        }
        match page.body["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => return (ids, seen),
        }
    }
    panic!("{path}: more than 50 pages");
}

/// The attack: a member with no permission pages through `?q=` one row at a time; each
/// empty page's cursor named the next scope's id, so every id of the organization leaked.
async fn search_reveals_only_visible_rows_when_paged_with_cursors(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let (org, admin) = app.org("enterprise").await;
    let visible_team = app.scope(&admin, "team", "alpha", &org).await;
    let visible_thread = app.scope(&admin, "thread", "alpha-1", &visible_team).await;
    let hidden_team = app.scope(&admin, "team", "bravo", &org).await;
    // The organization's own id is no secret to its members (it is in every path).
    let mut hidden = vec![hidden_team.clone()];
    for i in 0..4 {
        hidden.push(
            app.scope(&admin, "thread", &format!("bravo-{i}"), &hidden_team)
                .await,
        );
    }
    let nobody = app.token(&admin, &org, "nobody", "member").await;
    let viewer = app.token(&admin, &org, "viewer", "member").await;
    app.grant(
        &admin,
        &org,
        "viewer",
        "encryption:view",
        Some(&visible_team),
    )
    .await;
    let search = format!("/v1/orgs/{org}/scopes?limit=1&q=");

    // No permission: nothing listed, and no id of any scope revealed.
    let (ids, seen) = walk(&app, &nobody, &search).await;
    assert!(ids.is_empty(), "{ids:?}");
    for id in hidden.iter().chain([&visible_team, &visible_thread]) {
        assert!(!seen.contains(id.as_str()), "{id} leaked: {seen}");
    }

    // A grant on one team: that subtree, page by page, and nothing else revealed.
    let (ids, seen) = walk(&app, &viewer, &search).await;
    assert_eq!(ids, [visible_team.clone(), visible_thread.clone()]);
    for id in &hidden {
        assert!(!seen.contains(id.as_str()), "{id} leaked: {seen}");
    }

    // The admin's cursors point at rows the viewer may not see: replayed by the viewer
    // they are refused, whichever they are.
    let mut cursor: Option<String> = None;
    let mut replayed = 0;
    loop {
        let url = match &cursor {
            Some(c) => format!("{search}&cursor={c}"),
            None => search.clone(),
        };
        let page = app.get(&url, &admin).await;
        let Some(next) = page.body["next_cursor"].as_str() else {
            break;
        };
        let last = page.body["items"][0]["id"].as_str().unwrap().to_owned();
        let as_viewer = app.get(&format!("{search}&cursor={next}"), &viewer).await;
        if last == visible_team || last == visible_thread {
            assert_eq!(as_viewer.status, 200, "{}", as_viewer.body);
        } else {
            as_viewer.assert_problem(400, "invalid_request");
            replayed += 1;
        }
        cursor = Some(next.to_owned());
    }
    assert!(replayed >= 4, "the admin's walk crossed hidden rows");

    // Forged cursors, old format or new, naming a hidden row: refused.
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use base64::Engine;
    for forged in [
        URL_SAFE_NO_PAD.encode(format!("after:{hidden_team}")),
        URL_SAFE_NO_PAD.encode(format!("after:{}", hidden[1])),
    ] {
        app.get(&format!("{search}&cursor={forged}"), &viewer)
            .await
            .assert_problem(400, "invalid_request");
    }
    // A cursor of one query does not continue another.
    let first = app.get(&search, &admin).await;
    let cursor = first.str("next_cursor");
    app.get(
        &format!("/v1/orgs/{org}/scopes?limit=1&q=bravo&cursor={cursor}"),
        &admin,
    )
    .await
    .assert_problem(400, "invalid_request");
    app.stop().await;
}
on_both_backends!(search_reveals_only_visible_rows_when_paged_with_cursors);

/// Children and audit pages: a cursor continues only the list that issued it.
async fn list_refuses_a_cursor_when_it_belongs_to_another_list(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let (org, admin) = app.org("enterprise").await;
    let a = app.scope(&admin, "team", "a", &org).await;
    let b = app.scope(&admin, "team", "b", &org).await;
    for i in 0..3 {
        app.scope(&admin, "thread", &format!("a{i}"), &a).await;
        app.scope(&admin, "thread", &format!("b{i}"), &b).await;
    }
    // Pages of the children still cover every child, once.
    let (of_a, _) = walk(&app, &admin, &format!("/v1/scopes/{a}/children?limit=1")).await;
    assert_eq!(of_a.len(), 3);
    let page = app
        .get(&format!("/v1/scopes/{b}/children?limit=1"), &admin)
        .await;
    let cursor_of_b = page.str("next_cursor");
    app.get(
        &format!("/v1/scopes/{a}/children?limit=1&cursor={cursor_of_b}"),
        &admin,
    )
    .await
    .assert_problem(400, "invalid_request");

    let (entries, _) = {
        let mut count = 0;
        let mut cursor: Option<String> = None;
        loop {
            let url = match &cursor {
                Some(c) => format!("/v1/audit?limit=2&cursor={c}"),
                None => "/v1/audit?limit=2".to_owned(),
            };
            let page = app.get(&url, &admin).await;
            assert_eq!(page.status, 200, "{}", page.body);
            count += page.body["items"].as_array().unwrap().len();
            match page.body["next_cursor"].as_str() {
                Some(next) => cursor = Some(next.to_owned()),
                None => break,
            }
        }
        (count, ())
    };
    assert!(entries >= 9, "{entries}");
    let page = app.get("/v1/audit?limit=2", &admin).await;
    let cursor = page.str("next_cursor");
    // Used with another filter, or by a list of scopes: refused.
    app.get(
        &format!("/v1/audit?limit=2&action=scope.create&cursor={cursor}"),
        &admin,
    )
    .await
    .assert_problem(400, "invalid_request");
    app.get(
        &format!("/v1/scopes/{a}/children?limit=1&cursor={cursor}"),
        &admin,
    )
    .await
    .assert_problem(400, "invalid_request");
    app.stop().await;
}
on_both_backends!(list_refuses_a_cursor_when_it_belongs_to_another_list);

/// The scenario: `POST /v1/orgs` committed the organization, but its read-back failed and
/// the admin token was revoked (or lost); the organization had no admin left. The operator
/// issues a break-glass org_admin token, with a required reason, recorded in the
/// organization's audit log with the operator as the actor.
async fn break_glass_issues_an_audited_admin_token_when_the_operator_asks(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let (org, admin) = app.org("enterprise").await;
    let team = app.scope(&admin, "team", "research", &org).await;
    // The organization loses its only admin token.
    let me = app.get("/v1/me", &admin).await;
    app.app.tokens().revoke(&me.str("token_id")).await.unwrap();
    app.app.forget_principals();
    app.get(&format!("/v1/orgs/{org}/tokens"), &admin)
        .await
        .assert_problem(401, "unauthorized");

    let path = format!("/v1/orgs/{org}/admin-tokens");
    let reason = "read-back of POST /v1/orgs failed, ticket 4711";
    let issued = app
        .post(&path, &app.operator_token, json!({"reason": reason}))
        .await;
    assert_eq!(issued.status, 201, "{}", issued.body);
    assert_eq!(issued.body["role"], "org_admin");
    assert_eq!(issued.body["org_id"], org.as_str());
    let token = issued.str("token");
    let token_id = issued.str("id");
    let principal = issued.str("principal");

    // It administers the organization.
    let listed = app.get(&format!("/v1/orgs/{org}/tokens"), &token).await;
    assert_eq!(listed.status, 200, "{}", listed.body);
    let member = app.token(&token, &org, "new-admin", "org_admin").await;
    assert_eq!(
        app.get(&format!("/v1/scopes/{team}"), &member).await.status,
        200
    );

    // Audited: the operator's token id is the actor, the reason is kept.
    let operator = app.get("/v1/me", &app.operator_token).await;
    let audit = app.get("/v1/audit?action=token.issue", &token).await;
    assert_eq!(audit.status, 200, "{}", audit.body);
    let entry = audit.body["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["details"]["TokenIssued"]["token_id"] == token_id.as_str())
        .unwrap_or_else(|| panic!("no audit entry for the break-glass token: {}", audit.body))
        .clone();
    assert_eq!(entry["actor_kind"], "operator");
    assert_eq!(
        entry["actor"],
        format!("operator:{}", operator.str("token_id")).as_str()
    );
    assert_eq!(entry["reason"], reason);
    assert_eq!(entry["details"]["TokenIssued"]["role"], "org_admin");
    assert_eq!(
        entry["details"]["TokenIssued"]["principal"],
        principal.as_str()
    );

    // Refusals: no reason, an org admin, a scope that is not an organization, nobody.
    app.post(&path, &app.operator_token, json!({}))
        .await
        .assert_problem(400, "invalid_request");
    app.post(&path, &member, json!({"reason": "r"}))
        .await
        .assert_problem(403, "forbidden");
    app.post(
        &format!("/v1/orgs/{team}/admin-tokens"),
        &app.operator_token,
        json!({"reason": "r"}),
    )
    .await
    .assert_problem(404, "not_found");
    app.post(
        &format!("/v1/orgs/{}/admin-tokens", uuid::Uuid::now_v7()),
        &app.operator_token,
        json!({"reason": "r"}),
    )
    .await
    .assert_problem(404, "not_found");
    app.post(
        "/v1/orgs/not-a-uuid/admin-tokens",
        &app.operator_token,
        json!({"reason": "r"}),
    )
    .await
    .assert_problem(400, "invalid_request");
    app.stop().await;
}
on_both_backends!(break_glass_issues_an_audited_admin_token_when_the_operator_asks);
