//! What the console relies on without a browser: its files and headers, `/v1/me`, and the
//! name search.

use super::*;

async fn console_files_carry_a_strict_policy_when_served(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    for (path, content_type) in [
        ("/console", "text/html; charset=utf-8"),
        ("/console/", "text/html; charset=utf-8"),
        ("/console/app.js", "text/javascript; charset=utf-8"),
        ("/console/style.css", "text/css; charset=utf-8"),
    ] {
        let response = app
            .client
            .get(format!("{}{path}", app.base))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK, "{path}");
        let header = |name: &str| {
            response
                .headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_owned()
        };
        assert_eq!(header("content-type"), content_type, "{path}");
        assert_eq!(header("x-content-type-options"), "nosniff", "{path}");
        assert_eq!(header("cache-control"), "no-cache", "{path}");
        let csp = header("content-security-policy");
        assert!(csp.contains("default-src 'none'"), "{csp}");
        assert!(csp.contains("script-src 'self'"), "{csp}");
        assert!(!csp.contains("unsafe-inline") && !csp.contains("unsafe-eval"));
        assert!(csp.contains("frame-ancestors 'none'"), "{csp}");
        let body = response.text().await.unwrap();
        // Nothing from elsewhere: the console works offline.
        assert!(
            !body.contains("http://") && !body.contains("https://"),
            "{path}"
        );
        if path.ends_with('/') || path == "/console" {
            assert!(!body.contains("<script>"), "no inline script");
            assert!(!body.contains("style="), "no inline style");
            // Before the script runs (or without it) the sign-in form cannot send the token
            // in a URL: it posts, its field has no name, and its button starts disabled.
            assert!(body.contains(r#"<form id="signin-form" method="post""#));
            assert!(body.contains(r#"<input id="token" type="password""#));
            assert!(!body.contains(r#"name="token""#));
            assert!(body.contains(r#"id="signin-button" disabled"#));
        }
    }
    let missing = app.get("/console/secrets.txt", "").await;
    missing.assert_problem(404, "not_found");
    app.stop().await;
}
on_both_backends!(console_files_carry_a_strict_policy_when_served);

// ---------------------------------------------------------------------------------------
// The endpoints the console relies on.

async fn me_describes_the_token_when_called(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let (org, admin) = app.org_with("enterprise", "managed").await;
    let team = app.scope(&admin, "team", "research", &org).await;
    let me = app.get("/v1/me", &admin).await;
    assert_eq!(me.status, StatusCode::OK, "{}", me.body);
    assert_eq!(me.body["org_id"], org.as_str());
    assert_eq!(me.body["role"], "org_admin");
    assert_eq!(me.body["principal"], "admin");
    assert!(me.body["token_id"].is_string());
    let permissions = me.body["permissions"].as_array().unwrap();
    assert!(permissions.contains(&json!("encryption:manage")));
    assert!(!permissions.contains(&json!("data:use")));

    // A member sees the grants that make it a team admin, and no organization-wide right.
    let member = app.token(&admin, &org, "team-lead", "member").await;
    app.grant(&admin, &org, "team-lead", "encryption:manage", Some(&team))
        .await;
    let me = app.get("/v1/me", &member).await;
    assert_eq!(me.body["role"], "member");
    assert_eq!(me.body["permissions"], json!([]));
    assert_eq!(
        me.body["grants"],
        json!([{"permission": "encryption:manage", "scope_id": team}])
    );

    let operator = app.get("/v1/me", &app.operator_token).await;
    assert_eq!(operator.status, StatusCode::OK);
    assert_eq!(operator.body["role"], "operator");
    assert_eq!(operator.body["org_id"], json!(null));
    app.call("GET", "/v1/me", None, None)
        .await
        .assert_problem(401, "unauthorized");
    app.stop().await;
}
on_both_backends!(me_describes_the_token_when_called);

async fn search_finds_only_visible_names_when_the_caller_is_limited(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let (org, admin) = app.org_with("enterprise", "managed").await;
    let research = app.scope(&admin, "team", "Research", &org).await;
    let sales = app.scope(&admin, "team", "sales", &org).await;
    let plans = app
        .scope(&admin, "thread", "research plans", &research)
        .await;
    app.scope(&admin, "thread", "100%_done", &sales).await;
    app.scope(&admin, "thread", "pipeline", &sales).await;
    let names = |response: &crate::harness::Response| -> Vec<String> {
        response.body["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["name"].as_str().unwrap().to_owned())
            .collect()
    };
    let search = format!("/v1/orgs/{org}/scopes");

    // Case-insensitive substring, with the cascade resolved like any scope JSON.
    app.pause(&admin, &research).await;
    let found = app.get(&format!("{search}?q=RESEARCH"), &admin).await;
    assert_eq!(found.status, StatusCode::OK, "{}", found.body);
    assert_eq!(names(&found), ["Research", "research plans"]);
    assert_eq!(found.body["items"][1]["effective_state"], "paused");
    assert_eq!(
        found.body["items"][1]["cause"]["scope_id"],
        research.as_str()
    );

    // LIKE's wildcards are plain characters.
    let percent = app.get(&format!("{search}?q=%25_"), &admin).await;
    assert_eq!(names(&percent), ["100%_done"]);

    // Pages of one, in id order, until there is no cursor.
    let mut seen = vec![];
    let mut cursor: Option<String> = None;
    loop {
        let mut path = format!("{search}?limit=1");
        if let Some(c) = &cursor {
            path.push_str(&format!("&cursor={c}"));
        }
        let page = app.get(&path, &admin).await;
        assert_eq!(page.status, StatusCode::OK, "{}", page.body);
        seen.extend(names(&page));
        match page.body["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => break,
        }
    }
    assert_eq!(seen.len(), 6, "{seen:?}");

    // A member with a grant on one team finds only that subtree.
    let member = app.token(&admin, &org, "viewer", "member").await;
    app.grant(&admin, &org, "viewer", "encryption:view", Some(&research))
        .await;
    let scoped = app.get(&search, &member).await;
    assert_eq!(names(&scoped), ["Research", "research plans"]);
    assert_eq!(scoped.body["items"][1]["id"], plans.as_str());

    // Refusals.
    let (other_org, other_admin) = app.org_with("enterprise", "managed").await;
    app.get(&search, &other_admin)
        .await
        .assert_problem(404, "not_found");
    app.get(&format!("/v1/orgs/{other_org}/scopes"), &admin)
        .await
        .assert_problem(404, "not_found");
    app.get(&search, &app.operator_token)
        .await
        .assert_problem(403, "forbidden");
    for bad in [
        "?limit=0",
        "?limit=abc",
        "?cursor=nope",
        "?sort=name",
        &format!("?q={}", "a".repeat(201)),
        "?q=%07",
    ] {
        app.get(&format!("{search}{bad}"), &admin)
            .await
            .assert_problem(400, "invalid_request");
    }
    app.get("/v1/orgs/not-a-uuid/scopes", &admin)
        .await
        .assert_problem(400, "invalid_request");
    app.stop().await;
}
on_both_backends!(search_finds_only_visible_names_when_the_caller_is_limited);

// ---------------------------------------------------------------------------------------
// A real browser.
