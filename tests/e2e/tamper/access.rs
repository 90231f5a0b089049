//! The access tables carry no seals: `ekm audit verify` checks them against the events.

use super::*;

/// The mismatches `verify` reports for `org`: (table, problem, id).
fn access_mismatches(reports: &[Value], org: &str) -> Vec<(String, String, String)> {
    let report = reports.iter().find(|r| r["org_id"] == org).unwrap();
    report["access_mismatches"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["table"].as_str().unwrap().to_owned(),
                m["problem"].as_str().unwrap().to_owned(),
                m["id"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

/// An organization whose tokens and grants went through their whole life by the API: a
/// token issued and revoked, a grant made and removed, a grant kept.
async fn access_history(app: &TestApp) -> (String, String, String) {
    let (org, admin) = app.org("enterprise").await;
    let team = app.scope(&admin, "team", "research", &org).await;
    let member = app.token(&admin, &org, "ci", "member").await;
    let listed = app.get(&format!("/v1/orgs/{org}/tokens"), &admin).await;
    let ci = listed.body["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["principal"] == "ci")
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    app.token(&admin, &org, "temp", "it_admin").await;
    let expiring = app
        .post(
            &format!("/v1/orgs/{org}/tokens"),
            &admin,
            serde_json::json!({"principal": "contractor", "kind": "user", "role": "member",
                               "expires_at": "2999-01-02T03:04:05.123456789Z"}),
        )
        .await;
    assert_eq!(expiring.status, 201, "{}", expiring.body);
    app.grant(&admin, &org, "ci", "data:use", Some(&team)).await;
    app.grant(&admin, &org, "ci", "audit:read", None).await;
    let removed = app
        .call(
            "DELETE",
            &format!("/v1/orgs/{org}/grants/ci/audit:read"),
            Some(&admin),
            None,
        )
        .await;
    assert!(removed.status.is_success(), "{}", removed.body);
    drop(member);
    (org, admin, ci)
}

async fn verify_reports_a_token_row_added_in_sql(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let (org, _, _) = access_history(&app).await;
    let (ok, reports) = verify(&app, Some(&org), None);
    assert!(ok, "{reports:?}");
    assert_eq!(access_mismatches(&reports, &org), vec![]);

    // A working org_admin token that no event issued.
    let secret = "ekm_forged_secret";
    exec(
        &app.db,
        &format!(
            "INSERT INTO tokens (id, token_hash, role, org_id, name, created_at, principal, principal_kind) \
             VALUES ('tok_forged', '{}', 'org_admin', '{org}', 'mallory', 0, 'mallory', 'user')",
            ekm_store::token_hash(secret)
        ),
    )
    .await;
    assert_eq!(
        app.get(&format!("/v1/orgs/{org}/tokens"), secret)
            .await
            .status,
        200,
        "the forged row is a working token"
    );
    let (ok, reports) = verify(&app, Some(&org), None);
    assert!(!ok);
    // The chain itself is intact; the access table is not.
    assert_eq!(first_failure(&reports, &org), None);
    assert_eq!(
        access_mismatches(&reports, &org),
        vec![(
            "tokens".into(),
            "token_without_event".into(),
            "tok_forged".into()
        )]
    );
    app.stop().await;
}
on_both_backends!(verify_reports_a_token_row_added_in_sql);

async fn verify_reports_revived_raised_and_granted_rows(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let (org, admin, ci) = access_history(&app).await;
    let revoked = app
        .call(
            "DELETE",
            &format!("/v1/orgs/{org}/tokens/{ci}"),
            Some(&admin),
            None,
        )
        .await;
    assert!(revoked.status.is_success(), "{}", revoked.body);
    assert!(verify(&app, Some(&org), None).0);

    let kept: i64 = ekm_store::with_read_pool!(&app.db, pool => {
        sqlx::query_scalar("SELECT granted_position FROM grants_view WHERE org_id = $1")
            .bind(&org)
            .fetch_one(pool)
            .await
            .unwrap()
    });
    exec(
        &app.db,
        &format!(
            "UPDATE tokens SET revoked_at = NULL WHERE id = '{ci}'; \
             UPDATE tokens SET role = 'org_admin' WHERE org_id = '{org}' AND principal = 'temp'; \
             UPDATE tokens SET expires_at = expires_at + 1 WHERE org_id = '{org}' AND principal = 'contractor'; \
             INSERT INTO grants_view (org_id, principal, permission, scope_id, granted_position, granted_at, granted_by) \
             VALUES ('{org}', 'ci', 'encryption:manage', '', 999999, 0, 'user:mallory'); \
             DELETE FROM grants_view WHERE granted_position = {kept}"
        ),
    )
    .await;
    let (ok, reports) = verify(&app, Some(&org), None);
    assert!(!ok);
    let mut found: Vec<(String, String)> = access_mismatches(&reports, &org)
        .into_iter()
        .map(|(table, problem, _)| (table, problem))
        .collect();
    found.sort();
    let expected: Vec<(String, String)> = [
        ("grants_view", "grant_missing"),
        ("grants_view", "grant_without_event"),
        ("tokens", "token_altered"),
        ("tokens", "token_altered"),
        ("tokens", "token_revived"),
    ]
    .iter()
    .map(|(t, p)| (t.to_string(), p.to_string()))
    .collect();
    assert_eq!(found, expected);
    app.stop().await;
}
on_both_backends!(verify_reports_revived_raised_and_granted_rows);

/// A grant's expiry pushed out (or removed) in SQL would keep it counting, and its removal
/// moved or scheduled for no grant would remove one early or keep one listed: verify names
/// each row (ADR 0030).
async fn verify_reports_a_grant_whose_expiry_was_moved_in_sql(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    // Given a grant that expires
    let (org, admin) = app.org("enterprise").await;
    let granted = app
        .post(
            &format!("/v1/orgs/{org}/grants"),
            &admin,
            serde_json::json!({"principal": "contractor", "permission": "data:use",
                               "expires_at": "2999-01-02T03:04:05Z"}),
        )
        .await;
    assert_eq!(granted.status, 201, "{}", granted.body);
    app.app.refresh().await.unwrap();
    assert!(verify(&app, Some(&org), None).0);
    // When its row is made permanent, and its removal moved to the epoch, behind the
    // aggregate's back
    exec(
        &app.db,
        &format!(
            "UPDATE grants_view SET expires_at = NULL WHERE org_id = '{org}'; \
             UPDATE schedule SET due_at = 0 WHERE scope_id = '{org}'"
        ),
    )
    .await;
    // Then verify reports both
    let (ok, reports) = verify(&app, Some(&org), None);
    assert!(!ok);
    let mut found: Vec<(String, String)> = access_mismatches(&reports, &org)
        .into_iter()
        .map(|(table, problem, _)| (table, problem))
        .collect();
    found.sort();
    assert_eq!(
        found,
        [
            ("grants_view".to_owned(), "grant_altered".to_owned()),
            ("schedule".to_owned(), "grant_expiry_missing".to_owned())
        ]
    );
    // And a removal scheduled for no grant is reported too
    exec(
        &app.db,
        &format!(
            "INSERT INTO schedule (scope_id, kind, org_id, due_at, at, scheduled_position, subject) \
             VALUES ('{org}', 'grant_expiry', '{org}', 1, '1970-01-01T00:00:00.000001Z', 1, 'x')"
        ),
    )
    .await;
    let (_, reports) = verify(&app, Some(&org), None);
    assert!(access_mismatches(&reports, &org)
        .iter()
        .any(|(table, problem, _)| table == "schedule" && problem == "grant_expiry_without_grant"));
    app.stop().await;
}
on_both_backends!(verify_reports_a_grant_whose_expiry_was_moved_in_sql);

/// A pending revocation's revoke deleted in SQL would leave the scope pending for ever
/// (refused, never revoked); one scheduled for a scope with nothing pending misleads the
/// schedule: verify names both (ADR 0032).
async fn verify_reports_a_revocation_whose_revoke_was_unscheduled_in_sql(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    // Given a revocation pending for a day, one cancelled, and a revoke
    let (org, admin) = app.org("enterprise").await;
    let team = app.scope(&admin, "team", "research", &org).await;
    let other = app.scope(&admin, "team", "sales", &org).await;
    let gone = app.scope(&admin, "team", "gone", &org).await;
    for (scope, body) in [
        (
            &team,
            serde_json::json!({"reason": "r", "confirm": team, "after": "P1D"}),
        ),
        (
            &other,
            serde_json::json!({"reason": "r", "confirm": other, "after": "P2D"}),
        ),
    ] {
        let pending = app
            .post(&format!("/v1/scopes/{scope}/revoke"), &admin, body)
            .await;
        assert_eq!(pending.status, 200, "{}", pending.body);
    }
    let cancelled = app
        .post(
            &format!("/v1/scopes/{other}/cancel-revocation"),
            &admin,
            serde_json::json!({"reason": "no"}),
        )
        .await;
    assert_eq!(cancelled.status, 200, "{}", cancelled.body);
    assert_eq!(app.revoke(&admin, &gone).await.status, 200);
    app.app.refresh().await.unwrap();
    assert!(verify(&app, Some(&org), None).0);
    // When the pending revoke is deleted, and one added for the cancelled scope
    exec(
        &app.db,
        &format!(
            "DELETE FROM schedule WHERE scope_id = '{team}' AND kind = 'revoke'; \
             INSERT INTO schedule (scope_id, kind, org_id, due_at, at, scheduled_position, subject) \
             VALUES ('{other}', 'revoke', '{org}', 1, '1970-01-01T00:00:00.000001Z', 1, '')"
        ),
    )
    .await;
    // Then verify reports both
    let (ok, reports) = verify(&app, Some(&org), None);
    assert!(!ok);
    let mut found = access_mismatches(&reports, &org);
    found.sort();
    assert_eq!(
        found,
        [
            (
                "schedule".to_owned(),
                "revoke_missing".to_owned(),
                team.clone()
            ),
            (
                "schedule".to_owned(),
                "revoke_without_pending".to_owned(),
                other.clone()
            ),
        ]
    );
    app.stop().await;
}
on_both_backends!(verify_reports_a_revocation_whose_revoke_was_unscheduled_in_sql);
