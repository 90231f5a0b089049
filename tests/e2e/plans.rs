//! Plans (issue 17 §4): the operator changes an organization's plan with an event, and
//! leaving enterprise clears nothing silently.

use serde_json::json;

use crate::harness::{Backend, TestApp};
use crate::on_both_backends;

/// Issue 17 §4: the operator changes a plan with an event; leaving enterprise clears
/// nothing silently: the tier must be default and no scope control may be left in force.
async fn plan_change_refuses_to_leave_controls_the_standard_plan_cannot_change(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let (org, admin) = app.data_org("enterprise", "managed").await;
    let team = app.scope(&admin, "team", "ops", &org).await;
    let operator = app.operator_token.clone();
    let plan = |plan: &'static str| {
        let app = &app;
        let operator = operator.clone();
        let org = org.clone();
        async move {
            app.call(
                "PUT",
                &format!("/v1/orgs/{org}/plan"),
                Some(&operator),
                Some(json!({"plan": plan, "reason": "contract ended"})),
            )
            .await
        }
    };
    // The organization's own admin cannot change its plan.
    app.call(
        "PUT",
        &format!("/v1/orgs/{org}/plan"),
        Some(&admin),
        Some(json!({"plan": "standard"})),
    )
    .await
    .assert_problem(403, "forbidden");

    // The managed tier first.
    let refused = plan("standard").await;
    refused.assert_problem(409, "conflict");
    assert!(refused.body["detail"]
        .as_str()
        .unwrap()
        .contains("tier default"));
    let tier = app
        .call(
            "PUT",
            &format!("/v1/orgs/{org}/tier"),
            Some(&admin),
            Some(json!({"tier": "default"})),
        )
        .await;
    assert_eq!(tier.status, 200, "{}", tier.body);

    // Then the controls in force: a paused team, a policy, a floor.
    assert_eq!(app.pause(&admin, &team).await.status, 200);
    let policy = app
        .call(
            "PUT",
            &format!("/v1/scopes/{team}/justification-policy"),
            Some(&admin),
            Some(json!({"required": true})),
        )
        .await;
    assert_eq!(policy.status, 200, "{}", policy.body);
    let refused = plan("standard").await;
    refused.assert_problem(409, "conflict");
    let detail = refused.body["detail"].as_str().unwrap().to_owned();
    assert!(
        detail.contains("1 paused or pending-revocation scope(s), 1 justification polic(ies), 0 decryption floor(s)"),
        "{detail}"
    );
    // Controls under a revoked scope hold nothing back: nothing can change them any more.
    let thread = app.scope(&admin, "thread", "t", &org).await;
    app.post(&format!("/v1/scopes/{thread}/rotate"), &admin, json!({}))
        .await;
    app.floor(&admin, &thread, 2).await;
    assert_eq!(app.revoke(&admin, &thread).await.status, 200);
    assert_eq!(app.resume(&admin, &team).await.status, 200);
    let lifted = app
        .call(
            "PUT",
            &format!("/v1/scopes/{team}/justification-policy"),
            Some(&admin),
            Some(json!({"required": false})),
        )
        .await;
    assert_eq!(lifted.status, 200, "{}", lifted.body);

    let changed = plan("standard").await;
    assert_eq!(changed.status, 200, "{}", changed.body);
    assert_eq!(changed.body["plan"], "standard");
    assert_eq!(changed.body["changed"], true);
    // The standard plan has no scope controls; the audit log has the change.
    app.pause(&admin, &team)
        .await
        .assert_problem(403, "plan_required");
    let audit = app.get("/v1/audit?action=org.plan", &admin).await;
    assert_eq!(
        audit.body["items"][0]["reason"], "contract ended",
        "{}",
        audit.body
    );
    // Back to enterprise needs nothing; the same plan again records nothing.
    assert_eq!(plan("enterprise").await.status, 200);
    assert_eq!(plan("enterprise").await.body["changed"], false);
    app.call(
        "PUT",
        &format!("/v1/orgs/{org}/plan"),
        Some(&operator),
        Some(json!({"plan": "platinum"})),
    )
    .await
    .assert_problem(400, "invalid_request");
    app.call(
        "PUT",
        &format!("/v1/orgs/{team}/plan"),
        Some(&operator),
        Some(json!({"plan": "standard"})),
    )
    .await
    .assert_problem(404, "not_found");
    app.stop().await;
}
on_both_backends!(plan_change_refuses_to_leave_controls_the_standard_plan_cannot_change);
