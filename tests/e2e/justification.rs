//! Access-justification policies (issue 16 §2, ADR 0027): set on a scope as an event,
//! inherited by the subtree where they only tighten, enforced on every data-plane operation,
//! each refusal recorded in the access log.

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use serde_json::{json, Value};

use crate::harness::{Backend, Response, TestApp};
use crate::on_both_backends;

async fn set_policy(app: &TestApp, token: &str, scope: &str, body: Value) -> Response {
    app.call(
        "PUT",
        &format!("/v1/scopes/{scope}/justification-policy"),
        Some(token),
        Some(body),
    )
    .await
}

/// An encrypt, decrypt, datakey or rewrap on `scope` with `justification` (or none).
async fn use_key(
    app: &TestApp,
    token: &str,
    scope: &str,
    operation: &str,
    ciphertext: &str,
    justification: Option<&str>,
) -> Response {
    let mut body = match operation {
        "encrypt" => json!({"plaintext": STANDARD.encode(b"minutes"), "class": "messages"}),
        "datakey" => json!({"class": "messages"}),
        _ => json!({"ciphertext": ciphertext, "class": "messages"}),
    };
    if let Some(code) = justification {
        body["justification"] = json!(code);
    }
    app.post(&format!("/v1/scopes/{scope}/{operation}"), token, body)
        .await
}

async fn data_plane_obeys_the_policies_on_the_path_when_they_tighten(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let (org, admin) = app.data_org("enterprise", "managed").await;
    let team = app.scope(&admin, "team", "support", &org).await;
    let thread = app.scope(&admin, "thread", "ticket-4711", &team).await;
    let sealed = use_key(&app, &admin, &thread, "encrypt", "", None).await;
    assert_eq!(sealed.status, 200, "{}", sealed.body);
    let ciphertext = sealed.str("ciphertext");

    // Given: the organization requires a reason, one of two.
    let set = set_policy(
        &app,
        &admin,
        &org,
        json!({"required": true, "allowed": ["customer_support", "agent_run", "agent_run"],
               "reason": "KAJ for agents"}),
    )
    .await;
    assert_eq!(set.status, 200, "{}", set.body);
    assert_eq!(set.body["changed"], true);
    assert_eq!(
        set.body["allowed"],
        json!(["agent_run", "customer_support"])
    );
    assert!(set.headers.contains_key("etag"));

    // Then every operation without a reason is refused, naming the policy's scope...
    for operation in ["encrypt", "decrypt", "datakey", "rewrap"] {
        let refused = use_key(&app, &admin, &thread, operation, &ciphertext, None).await;
        refused.assert_problem(403, "justification_required");
        assert_eq!(refused.body["policy_scope_id"], org, "{operation}");
        let wrong = use_key(
            &app,
            &admin,
            &thread,
            operation,
            &ciphertext,
            Some("legal_hold"),
        )
        .await;
        wrong.assert_problem(403, "justification_not_allowed");
        let right = use_key(
            &app,
            &admin,
            &thread,
            operation,
            &ciphertext,
            Some("agent_run"),
        )
        .await;
        assert_eq!(right.status, 200, "{operation}: {}", right.body);
    }

    // A list without `required` would let a request without a reason pass what the list
    // refuses: refused.
    set_policy(
        &app,
        &admin,
        &team,
        json!({"required": false, "allowed": ["agent_run"]}),
    )
    .await
    .assert_problem(400, "invalid_request");
    // A team tightens the list; it cannot loosen what the organization requires.
    let tightened = set_policy(
        &app,
        &admin,
        &team,
        json!({"required": true, "allowed": ["agent_run"]}),
    )
    .await;
    assert_eq!(tightened.status, 200, "{}", tightened.body);
    let effective = &tightened.body["effective"];
    assert_eq!(effective["required"], true, "{effective}");
    assert_eq!(effective["required_by"], org);
    assert_eq!(effective["allowed"], json!(["agent_run"]));
    assert_eq!(effective["allowed_by"], json!([org, team]));
    let support = use_key(
        &app,
        &admin,
        &thread,
        "decrypt",
        &ciphertext,
        Some("customer_support"),
    )
    .await;
    support.assert_problem(403, "justification_not_allowed");
    assert_eq!(support.body["policy_scope_id"], team);
    use_key(&app, &admin, &thread, "decrypt", &ciphertext, None)
        .await
        .assert_problem(403, "justification_required");
    // Elsewhere in the organization the team's list does not apply.
    let other = app.scope(&admin, "team", "sales", &org).await;
    let elsewhere = use_key(
        &app,
        &admin,
        &other,
        "encrypt",
        "",
        Some("customer_support"),
    )
    .await;
    assert_eq!(elsewhere.status, 200, "{}", elsewhere.body);

    // A list with nothing in common with the organization's, while a reason is required,
    // would admit nothing: refused, and nothing recorded.
    let conflict = set_policy(
        &app,
        &admin,
        &thread,
        json!({"required": true, "allowed": ["legal_hold"]}),
    )
    .await;
    conflict.assert_problem(409, "justification_policy_conflict");
    let read = app
        .get(&format!("/v1/scopes/{thread}/justification-policy"), &admin)
        .await;
    assert_eq!(read.status, 200, "{}", read.body);
    assert_eq!(read.body["required"], false);
    assert_eq!(read.body["allowed"], json!([]));
    assert_eq!(read.body["effective"]["allowed"], json!(["agent_run"]));

    // Setting the same policy again records nothing.
    let again = set_policy(
        &app,
        &admin,
        &team,
        json!({"required": true, "allowed": ["agent_run"]}),
    )
    .await;
    assert_eq!(again.body["changed"], false, "{}", again.body);

    // Lifting the organization's policy: the team's own policy still holds below it.
    let lifted = set_policy(
        &app,
        &admin,
        &org,
        json!({"required": false, "allowed": []}),
    )
    .await;
    assert_eq!(lifted.status, 200, "{}", lifted.body);
    // The thread's own version did not move, but what its path imposes did: so did its tag.
    let reread = app
        .get(&format!("/v1/scopes/{thread}/justification-policy"), &admin)
        .await;
    assert_eq!(
        reread.body["effective"]["required_by"], team,
        "{}",
        reread.body
    );
    assert_ne!(reread.headers["etag"], read.headers["etag"]);
    let plain = use_key(&app, &admin, &thread, "decrypt", &ciphertext, None).await;
    plain.assert_problem(403, "justification_required");
    assert_eq!(plain.body["policy_scope_id"], team);
    let legal = use_key(
        &app,
        &admin,
        &thread,
        "decrypt",
        &ciphertext,
        Some("legal_hold"),
    )
    .await;
    legal.assert_problem(403, "justification_not_allowed");
    // Elsewhere in the organization nothing is required any more.
    let free = use_key(&app, &admin, &other, "encrypt", "", None).await;
    assert_eq!(free.status, 200, "{}", free.body);

    // The access log holds each refusal with its code, and the reason given.
    let log = app
        .get(&format!("/v1/audit/access?scope={thread}"), &admin)
        .await;
    assert_eq!(log.status, 200, "{}", log.body);
    let items = log.body["items"].as_array().cloned().unwrap_or_default();
    let outcomes: Vec<(String, String)> = items
        .iter()
        .map(|r| {
            (
                r["outcome"].as_str().unwrap_or_default().to_owned(),
                r["justification"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    assert!(outcomes.contains(&("justification_required".into(), String::new())));
    assert!(outcomes.contains(&("justification_not_allowed".into(), "legal_hold".into())));
    assert!(outcomes.contains(&("ok".into(), "agent_run".into())));

    // Each change is an event in the audit log, with its actor and reason.
    let audit = app
        .get(&format!("/v1/audit?org={org}&limit=200"), &admin)
        .await;
    assert_eq!(audit.status, 200, "{}", audit.body);
    let changes: Vec<&Value> = audit.body["items"]
        .as_array()
        .map(|items| {
            items
                .iter()
                .filter(|e| e["action"] == "scope.justification_policy")
                .collect()
        })
        .unwrap_or_default();
    assert_eq!(changes.len(), 3, "{}", audit.body);
    assert_eq!(changes[0]["reason"], "KAJ for agents", "{}", changes[0]);
    app.stop().await;
}
on_both_backends!(data_plane_obeys_the_policies_on_the_path_when_they_tighten);

async fn policy_is_refused_when_the_caller_or_the_body_may_not_set_it(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let (org, admin) = app.data_org("enterprise", "managed").await;
    let team = app.scope(&admin, "team", "support", &org).await;
    let path = format!("/v1/scopes/{team}/justification-policy");

    // Malformed bodies: a clear 400, nothing recorded.
    for body in [
        json!({"required": true, "allowed": ["Customer Support"]}),
        json!({"required": true, "allowed": [""]}),
        json!({"allowed": ["agent_run"]}),
        json!({"required": "yes"}),
        json!({"required": true, "colour": "red"}),
        json!({"required": true, "allowed": (0..65).map(|i| format!("c{i}")).collect::<Vec<_>>()}),
    ] {
        set_policy(&app, &admin, &team, body.clone())
            .await
            .assert_problem(400, "invalid_request");
    }
    // A malformed reason on a request is refused before the policy is looked at.
    use_key(&app, &admin, &team, "encrypt", "", Some("Not A Code"))
        .await
        .assert_problem(400, "invalid_request");

    // A member without encryption:manage may read it, not set it.
    let member = app.token(&admin, &org, "svc", "member").await;
    app.grant(&admin, &org, "svc", "encryption:view", None)
        .await;
    set_policy(&app, &member, &team, json!({"required": true}))
        .await
        .assert_problem(403, "forbidden");
    assert_eq!(app.get(&path, &member).await.status, 200);

    // Another organization's admin learns nothing: not found.
    let (_, stranger) = app.data_org("enterprise", "managed").await;
    set_policy(&app, &stranger, &team, json!({"required": true}))
        .await
        .assert_problem(404, "not_found");
    app.get(&path, &stranger)
        .await
        .assert_problem(404, "not_found");

    // A stale If-Match is refused.
    let stale = app
        .client
        .put(format!("{}{path}", app.base))
        .bearer_auth(&admin)
        .header("if-match", "\"7\"")
        .json(&json!({"required": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(stale.status(), 412);

    // A revoked scope takes no policy; the standard plan has no scope controls.
    let revoked = app.revoke(&admin, &team).await;
    assert_eq!(revoked.status, 200, "{}", revoked.body);
    set_policy(&app, &admin, &team, json!({"required": true}))
        .await
        .assert_problem(409, "scope_revoked");
    let (standard, standard_admin) = app.data_org("standard", "default").await;
    set_policy(&app, &standard_admin, &standard, json!({"required": true}))
        .await
        .assert_problem(403, "plan_required");
    app.stop().await;
}
on_both_backends!(policy_is_refused_when_the_caller_or_the_body_may_not_set_it);
