//! Time travel ("could thread X be decrypted at 14:02, and if not, who stopped it and why")
//! and blast radius before acting.

use serde_json::json;

use crate::harness::{encrypt, Backend, TestApp};
use crate::on_both_backends;

async fn scope_as_of_answers_the_past_state_when_given_a_position_or_instant(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let (org, admin) = app.org("enterprise").await;
    let team = app.scope(&admin, "team", "research", &org).await;
    let thread = app.scope(&admin, "thread", "t", &team).await;
    let created = app.db.committed_head().await.unwrap();
    let before_creation = created - 1;
    app.pause(&admin, &org).await;
    let paused_at = app.db.committed_head().await.unwrap();
    app.resume(&admin, &org).await;
    app.revoke(&admin, &team).await;

    let at = |query: String| {
        let path = format!("/v1/scopes/{thread}/state?{query}");
        let (app, admin) = (&app, admin.clone());
        async move { app.get(&path, &admin).await }
    };
    let then = at(format!("position={paused_at}")).await;
    assert_eq!(then.status, 200, "{}", then.body);
    assert_eq!(then.body["effective_state"], "paused");
    assert_eq!(then.body["own_state"], "active");
    assert_eq!(then.body["cause"]["scope_id"], org.as_str());
    assert_eq!(then.body["cause"]["event"], "ScopePaused");
    assert_eq!(then.body["cause"]["reason"], "investigation 4711");
    assert_eq!(then.body["as_of"]["position"], paused_at);
    assert_eq!(then.body["path"], json!([org, team, thread]));

    let at_creation = at(format!("position={created}")).await;
    assert_eq!(at_creation.body["effective_state"], "active");
    assert!(at_creation.body["cause"].is_null());
    at(format!("position={before_creation}"))
        .await
        .assert_problem(404, "not_found");

    // By instant: the time the pause was recorded.
    let pause_entry = app.get("/v1/audit?action=scope.pause", &admin).await;
    let instant = pause_entry.body["items"][0]["recorded_at"]
        .as_str()
        .unwrap()
        .to_owned();
    let by_time = at(format!("at={instant}")).await;
    assert_eq!(
        by_time.body["effective_state"], "paused",
        "{}",
        by_time.body
    );
    assert_eq!(by_time.body["as_of"]["at"], instant.as_str());
    let long_ago = at("at=2001-01-01T00:00:00Z".into()).await;
    long_ago.assert_problem(404, "not_found");

    // Now: revoked by the team.
    let now = at(format!(
        "position={}",
        app.db.committed_head().await.unwrap()
    ))
    .await;
    assert_eq!(now.body["effective_state"], "revoked");
    assert_eq!(now.body["cause"]["scope_id"], team.as_str());

    at("position=-1".into())
        .await
        .assert_problem(400, "invalid_request");
    at("at=last-tuesday".into())
        .await
        .assert_problem(400, "invalid_request");
    at(format!("at={instant}&position=1"))
        .await
        .assert_problem(400, "invalid_request");
    app.get(&format!("/v1/scopes/{thread}/state"), &admin)
        .await
        .assert_problem(400, "invalid_request");
    app.stop().await;
}
on_both_backends!(scope_as_of_answers_the_past_state_when_given_a_position_or_instant);

async fn dry_run_counts_the_blast_radius_and_writes_nothing_when_asked(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let (org, admin) = app.org("enterprise").await;
    let research = app.scope(&admin, "team", "research", &org).await;
    let sales = app.scope(&admin, "team", "sales", &org).await;
    for i in 0..3 {
        app.scope(&admin, "thread", &format!("r{i}"), &research)
            .await;
    }
    app.scope(&admin, "thread", "s0", &sales).await;
    app.scope(&admin, "mcp_connector", "github", &org).await;
    app.pause(&admin, &sales).await;
    let events = app.db.event_count().await.unwrap();

    let dry = app
        .post(
            &format!("/v1/scopes/{org}/pause?dry_run=true"),
            &admin,
            json!({}),
        )
        .await;
    assert_eq!(dry.status, 200, "{}", dry.body);
    assert_eq!(dry.body["dry_run"], true);
    assert_eq!(dry.body["would_change"], true);
    assert_eq!(dry.body["scopes_in_subtree"], 8);
    assert_eq!(dry.body["would_become_inactive"]["total"], 6);
    assert_eq!(
        dry.body["would_become_inactive"]["by_kind"],
        json!({"organization": 1, "team": 1, "thread": 3, "mcp_connector": 1})
    );
    assert_eq!(
        dry.body["already_inactive"]["by_kind"],
        json!({"team": 1, "thread": 1})
    );

    let revoke = app
        .post(
            &format!("/v1/scopes/{research}/revoke?dry_run=true"),
            &admin,
            json!({}),
        )
        .await;
    assert_eq!(revoke.body["action"], "revoke");
    assert_eq!(revoke.body["would_become_inactive"]["total"], 4);
    // Nothing was written, and nothing changed.
    assert_eq!(app.db.event_count().await.unwrap(), events);
    assert_eq!(
        app.get(&format!("/v1/scopes/{org}"), &admin).await.body["own_state"],
        "active"
    );

    // A dry run is refused for the same reasons as the real thing.
    app.revoke(&admin, &sales).await;
    app.post(
        &format!("/v1/scopes/{sales}/pause?dry_run=true"),
        &admin,
        json!({}),
    )
    .await
    .assert_problem(409, "scope_revoked");
    app.post(
        &format!("/v1/scopes/{org}/pause?dry_run=maybe"),
        &admin,
        json!({}),
    )
    .await
    .assert_problem(400, "invalid_request");
    app.stop().await;
}
on_both_backends!(dry_run_counts_the_blast_radius_and_writes_nothing_when_asked);

/// The instant of the organization's latest audited event (SQLite records milliseconds, so
/// an instant read off the clock could fall between an event and its stored time).
async fn last_recorded(app: &TestApp, admin: &str, org: &str) -> String {
    let audit = app
        .get(&format!("/v1/audit?org={org}&limit=500"), admin)
        .await;
    let items = audit.body["items"].as_array().unwrap();
    items.last().unwrap()["recorded_at"]
        .as_str()
        .unwrap()
        .to_owned()
}

/// "Who could decrypt this thread at T": the `data:use` grants that covered it then, with
/// their principals' valid tokens, from the events only; nobody while it was paused. Each
/// answer is checked against the data plane itself.
async fn access_at_names_who_could_decrypt_when_asked_about_an_instant(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let (org, admin) = app.org_with("enterprise", "managed").await;
    let team = app.scope(&admin, "team", "research", &org).await;
    let other = app.scope(&admin, "team", "sales", &org).await;
    let thread = app.scope(&admin, "thread", "t", &team).await;
    let who = |at: String| {
        let path = format!("/v1/scopes/{thread}/access-at?at={at}");
        let (app, admin) = (&app, admin.clone());
        async move { app.get(&path, &admin).await }
    };
    let created = last_recorded(&app, &admin, &org).await;
    let nobody = who(created.clone()).await;
    assert_eq!(nobody.status, 200, "{}", nobody.body);
    assert_eq!(nobody.body["effective_state"], "active");
    assert_eq!(nobody.body["principals"], json!([]));

    // A service granted data:use on the team, with a token; another on a sibling team.
    app.grant(&admin, &org, "svc", "data:use", Some(&team))
        .await;
    let issued = app
        .post(
            &format!("/v1/orgs/{org}/tokens"),
            &admin,
            json!({"principal": "svc", "kind": "service", "role": "member"}),
        )
        .await;
    assert_eq!(issued.status, 201, "{}", issued.body);
    let (svc_id, svc) = (issued.str("id"), issued.str("token"));
    app.grant(&admin, &org, "elsewhere", "data:use", Some(&other))
        .await;
    let elsewhere = app.token(&admin, &org, "elsewhere", "member").await;
    let granted = last_recorded(&app, &admin, &org).await;
    let then = who(granted.clone()).await;
    assert_eq!(
        then.body["principals"],
        json!([{"principal": "svc", "permission": "data:use", "granted_on": team,
                "grant_expires_at": null,
                "tokens": [{"token_id": svc_id, "expires_at": null}]}]),
        "{}",
        then.body
    );
    assert_eq!(then.body["at"], granted.as_str());
    // The data plane agrees: svc can, the sibling team's service cannot.
    assert_eq!(
        encrypt(&app, &svc, &thread, b"x", "messages").await.status,
        200
    );
    encrypt(&app, &elsewhere, &thread, b"x", "messages")
        .await
        .assert_problem(403, "forbidden");

    // The token revoked: svc's grant still covers the thread, with no token to use it.
    let revoked = app
        .call(
            "DELETE",
            &format!("/v1/orgs/{org}/tokens/{svc_id}"),
            Some(&admin),
            None,
        )
        .await;
    assert_eq!(revoked.status, 200, "{}", revoked.body);
    let after_revoke = who(last_recorded(&app, &admin, &org).await).await;
    assert_eq!(after_revoke.body["principals"][0]["tokens"], json!([]));
    // Asked again about the earlier instant, the answer has not changed.
    assert_eq!(who(granted).await.body, then.body);

    // The team paused: nobody could, and the cause says why.
    assert_eq!(app.pause(&admin, &team).await.status, 200);
    let paused = who(last_recorded(&app, &admin, &org).await).await;
    assert_eq!(paused.body["effective_state"], "paused");
    assert_eq!(paused.body["principals"], json!([]));
    assert_eq!(paused.body["cause"]["scope_id"], team.as_str());

    // Before the thread existed, in the future, or not an instant: refused.
    who("2001-01-01T00:00:00Z".into())
        .await
        .assert_problem(404, "not_found");
    who("2999-01-01T00:00:00Z".into())
        .await
        .assert_problem(400, "invalid_request");
    who("yesterday".into())
        .await
        .assert_problem(400, "invalid_request");
    app.get(&format!("/v1/scopes/{thread}/access-at"), &admin)
        .await
        .assert_problem(400, "invalid_request");
    app.stop().await;
}
on_both_backends!(access_at_names_who_could_decrypt_when_asked_about_an_instant);

/// Time travel tells the whole truth: key versions as they were (fingerprints, retired or
/// not), and the organization's plan, tier and master key then.
async fn state_as_of_shows_key_versions_and_the_organization_when_both_changed_since(
    backend: Backend,
) {
    let app = TestApp::spawn(backend).await;
    let (org, admin) = app.org("enterprise").await;
    let thread = app.scope(&admin, "thread", "t", &org).await;
    let rotated = app
        .post(&format!("/v1/scopes/{thread}/rotate"), &admin, json!({}))
        .await;
    assert_eq!(rotated.status, 200, "{}", rotated.body);
    let before = last_recorded(&app, &admin, &org).await;
    app.floor(&admin, &thread, 2).await;
    let retired = app
        .post(
            &format!("/v1/scopes/{thread}/retire"),
            &admin,
            json!({"below": 2, "reason": "rotation done"}),
        )
        .await;
    assert_eq!(retired.status, 200, "{}", retired.body);
    let tier = app
        .call(
            "PUT",
            &format!("/v1/orgs/{org}/tier"),
            Some(&admin),
            Some(json!({"tier": "managed", "reason": "upgrade"})),
        )
        .await;
    assert_eq!(tier.status, 200, "{}", tier.body);
    let now = app.get(&format!("/v1/scopes/{thread}"), &admin).await;
    let fingerprints: Vec<&serde_json::Value> = now.body["key_versions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| &k["fingerprint"])
        .collect();
    assert!(fingerprints.iter().all(|f| f.is_string()), "{}", now.body);

    let then = app
        .get(&format!("/v1/scopes/{thread}/state?at={before}"), &admin)
        .await;
    assert_eq!(then.status, 200, "{}", then.body);
    assert_eq!(
        then.body["key_versions"],
        json!([
            {"version": 1, "created_at": now.body["key_versions"][0]["created_at"],
             "fingerprint": fingerprints[0], "retired": false},
            {"version": 2, "created_at": now.body["key_versions"][1]["created_at"],
             "fingerprint": fingerprints[1], "retired": false},
        ])
    );
    assert_eq!(then.body["org"]["plan"], "enterprise");
    assert_eq!(then.body["org"]["tier"], "default");
    assert_eq!(
        then.body["org"]["master_key"],
        json!({"provider": "local", "key_id": null})
    );
    assert_eq!(then.body["org"]["master_key_status"], "available");

    let later = app
        .get(
            &format!(
                "/v1/scopes/{thread}/state?position={}",
                app.db.committed_head().await.unwrap()
            ),
            &admin,
        )
        .await;
    assert_eq!(later.body["key_versions"][0]["retired"], true);
    assert_eq!(later.body["key_versions"][1]["retired"], false);
    assert_eq!(later.body["org"]["tier"], "managed");
    assert_eq!(later.body["org"]["id"], org.as_str());
    app.stop().await;
}
on_both_backends!(state_as_of_shows_key_versions_and_the_organization_when_both_changed_since);
