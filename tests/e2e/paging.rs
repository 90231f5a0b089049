//! Token and grant lists page with `limit` and `cursor` (issue 18): every item once, in the
//! list's order, and a cursor works only for the list and organization that issued it.

use serde_json::Value;

use crate::harness::{Backend, TestApp};
use crate::on_both_backends;

/// Every page of `path` with `limit`, followed to the end: (items, pages).
async fn all_pages(app: &TestApp, token: &str, path: &str, limit: u32) -> (Vec<Value>, usize) {
    let mut items = vec![];
    let mut pages = 0;
    let mut cursor: Option<String> = None;
    loop {
        let query = match &cursor {
            Some(c) => format!("{path}?limit={limit}&cursor={c}"),
            None => format!("{path}?limit={limit}"),
        };
        let page = app.get(&query, token).await;
        assert_eq!(page.status, 200, "{}", page.body);
        let got = page.body["items"].as_array().unwrap();
        assert!(got.len() <= limit as usize);
        items.extend(got.iter().cloned());
        pages += 1;
        match page.body["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => return (items, pages),
        }
    }
}

async fn token_and_grant_lists_page_through_every_item_once(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let (org, admin) = app.org("enterprise").await;
    let (other_org, other_admin) = app.org("enterprise").await;
    let team = app.scope(&admin, "team", "research", &org).await;
    for i in 0..6 {
        app.token(&admin, &org, &format!("svc-{i}"), "member").await;
        app.grant(&admin, &org, &format!("svc-{i}"), "data:use", Some(&team))
            .await;
        app.grant(&admin, &org, &format!("svc-{i}"), "encryption:view", None)
            .await;
    }
    for (path, count) in [
        (format!("/v1/orgs/{org}/tokens"), 7),
        (format!("/v1/orgs/{org}/grants"), 12),
    ] {
        let whole = app.get(&format!("{path}?limit=500"), &admin).await;
        assert_eq!(whole.body["next_cursor"], Value::Null);
        let whole = whole.body["items"].as_array().unwrap().clone();
        assert_eq!(whole.len(), count, "{path}");
        for limit in [1, 2, 5, count as u32, 500] {
            let (items, pages) = all_pages(&app, &admin, &path, limit).await;
            assert_eq!(items, whole, "{path} in pages of {limit}");
            assert_eq!(pages, count.div_ceil(limit as usize).max(1), "{path}");
        }
    }

    // A cursor belongs to its list and organization.
    let first = app
        .get(&format!("/v1/orgs/{org}/tokens?limit=1"), &admin)
        .await;
    let cursor = first.str("next_cursor");
    app.get(
        &format!("/v1/orgs/{org}/grants?limit=1&cursor={cursor}"),
        &admin,
    )
    .await
    .assert_problem(400, "invalid_request");
    app.get(
        &format!("/v1/orgs/{other_org}/tokens?limit=1&cursor={cursor}"),
        &other_admin,
    )
    .await
    .assert_problem(400, "invalid_request");
    // A forged cursor (they carry no MAC) is refused as any bad input, never a 500: here a
    // NUL, which PostgreSQL would refuse in a text parameter.
    let forged = |list: &str, key: &str| {
        use base64::Engine;
        let real = String::from_utf8(
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(&cursor)
                .unwrap(),
        )
        .unwrap();
        let prefix: Vec<&str> = real.splitn(4, '.').take(3).collect();
        let text = format!("{}.{list}.{}.{key}", prefix[0], prefix[2]);
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(text)
    };
    for (list, key) in [
        ("tokens", r#"[1,"a\u0000b"]"#),
        ("grants", r#"["a\u0000","b",1]"#),
        ("tokens", r#"{"a":1}"#),
    ] {
        let path = format!("/v1/orgs/{org}/{list}?cursor={}", forged(list, key));
        app.get(&path, &admin)
            .await
            .assert_problem(400, "invalid_request");
    }
    for bad in ["limit=0", "limit=501", "cursor=nope", "page=2"] {
        app.get(&format!("/v1/orgs/{org}/tokens?{bad}"), &admin)
            .await
            .assert_problem(400, "invalid_request");
    }
    app.stop().await;
}
on_both_backends!(token_and_grant_lists_page_through_every_item_once);
