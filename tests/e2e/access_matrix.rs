//! Every endpoint × every kind of caller, with the exact status and problem code. The rows
//! are checked against the API's own endpoint list: an endpoint added without a row fails
//! this test.

use std::collections::BTreeSet;

use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::harness::{Backend, TestApp};
use crate::on_both_backends;

/// The callers, in the order of every row's expectations.
const CALLERS: [&str; 6] = [
    "no token",
    "expired token",
    "other organization's admin",
    "member without the grant",
    "member with the grant",
    "admin",
];

/// What a caller gets: a status and, for refusals, the problem code.
type Expected = (u16, Option<&'static str>);

const UNAUTHORIZED: Expected = (401, Some("unauthorized"));
const NOT_FOUND: Expected = (404, Some("not_found"));
const FORBIDDEN: Expected = (403, Some("forbidden"));

fn ok(status: u16) -> Expected {
    (status, None)
}

/// The usual row: authentication, isolation, then the permission.
fn guarded(success: u16, admin: Expected) -> [Expected; 6] {
    [
        UNAUTHORIZED,
        UNAUTHORIZED,
        NOT_FOUND,
        FORBIDDEN,
        ok(success),
        admin,
    ]
}

/// Tokens and grants: org admins only, whatever is granted.
fn admin_only(success: u16) -> [Expected; 6] {
    [
        UNAUTHORIZED,
        UNAUTHORIZED,
        NOT_FOUND,
        FORBIDDEN,
        FORBIDDEN,
        ok(success),
    ]
}

/// One row: the endpoint, the permission the "member with the grant" holds, and what each
/// caller gets.
struct Row {
    method: &'static str,
    path: &'static str,
    permission: Option<&'static str>,
    expected: [Expected; 6],
}

fn rows() -> Vec<Row> {
    let row = |method, path, permission, expected| Row {
        method,
        path,
        permission,
        expected,
    };
    let manage = Some("encryption:manage");
    let view = Some("encryption:view");
    let audit = Some("audit:read");
    let data = Some("data:use");
    let public = [ok(200); 6];
    vec![
        row("GET", "/healthz", None, public),
        row("GET", "/readyz", None, public),
        row("GET", "/v1/openapi.json", None, public),
        row(
            "GET",
            "/metrics",
            None,
            [
                UNAUTHORIZED,
                UNAUTHORIZED,
                FORBIDDEN,
                FORBIDDEN,
                FORBIDDEN,
                FORBIDDEN,
            ],
        ),
        row(
            "POST",
            "/v1/orgs",
            manage,
            [
                UNAUTHORIZED,
                UNAUTHORIZED,
                FORBIDDEN,
                FORBIDDEN,
                FORBIDDEN,
                FORBIDDEN,
            ],
        ),
        row("GET", "/v1/orgs/{org}", view, guarded(200, ok(200))),
        row("PUT", "/v1/orgs/{org}/tier", manage, guarded(200, ok(200))),
        row("GET", "/v1/orgs/{org}/policy", view, guarded(200, ok(200))),
        row(
            "PUT",
            "/v1/orgs/{org}/policy",
            manage,
            guarded(200, ok(200)),
        ),
        row(
            "PUT",
            "/v1/orgs/{org}/master-key",
            manage,
            guarded(200, ok(200)),
        ),
        row(
            "GET",
            "/v1/orgs/{org}/master-key",
            view,
            guarded(200, ok(200)),
        ),
        row("POST", "/v1/orgs/{org}/tokens", manage, admin_only(201)),
        row("GET", "/v1/orgs/{org}/tokens", manage, admin_only(200)),
        row(
            "DELETE",
            "/v1/orgs/{org}/tokens/{id}",
            manage,
            admin_only(200),
        ),
        row("POST", "/v1/orgs/{org}/grants", manage, admin_only(201)),
        row("GET", "/v1/orgs/{org}/grants", manage, admin_only(200)),
        row(
            "DELETE",
            "/v1/orgs/{org}/grants/{principal}/{permission}",
            manage,
            admin_only(200),
        ),
        row("POST", "/v1/scopes", manage, guarded(201, ok(201))),
        row("GET", "/v1/scopes/{id}", view, guarded(200, ok(200))),
        row(
            "GET",
            "/v1/scopes/{id}/children",
            view,
            guarded(200, ok(200)),
        ),
        row(
            "POST",
            "/v1/scopes/{id}/pause",
            manage,
            guarded(200, ok(200)),
        ),
        row(
            "POST",
            "/v1/scopes/{id}/resume",
            manage,
            guarded(200, ok(200)),
        ),
        row(
            "POST",
            "/v1/scopes/{id}/revoke",
            manage,
            guarded(200, ok(200)),
        ),
        row(
            "POST",
            "/v1/scopes/{id}/cancel-revocation",
            manage,
            guarded(200, ok(200)),
        ),
        row(
            "PUT",
            "/v1/scopes/{id}/rotation-period",
            manage,
            guarded(200, ok(200)),
        ),
        row(
            "POST",
            "/v1/scopes/{id}/rotate",
            manage,
            guarded(200, ok(200)),
        ),
        row(
            "POST",
            "/v1/scopes/{id}/retire",
            manage,
            guarded(200, ok(200)),
        ),
        row("GET", "/v1/scopes/{id}/state", view, guarded(200, ok(200))),
        row(
            "PUT",
            "/v1/scopes/{id}/justification-policy",
            manage,
            guarded(200, ok(200)),
        ),
        row(
            "GET",
            "/v1/scopes/{id}/justification-policy",
            view,
            guarded(200, ok(200)),
        ),
        row(
            "PUT",
            "/v1/scopes/{id}/min-decryption-version",
            manage,
            guarded(200, ok(200)),
        ),
        row(
            "GET",
            "/v1/scopes/{id}/key-versions",
            view,
            guarded(200, ok(200)),
        ),
        row(
            "GET",
            "/v1/scopes/{id}/access-at",
            audit,
            guarded(200, ok(200)),
        ),
        row(
            "GET",
            "/v1/orgs/{org}/schedule",
            view,
            guarded(200, ok(200)),
        ),
        row("GET", "/v1/audit", audit, guarded(200, ok(200))),
        row("GET", "/v1/audit/access", audit, guarded(200, ok(200))),
        row(
            "GET",
            "/v1/audit/access/export",
            audit,
            guarded(200, ok(200)),
        ),
        row(
            "GET",
            "/v1/scopes/{id}/access-summary",
            audit,
            guarded(200, ok(200)),
        ),
        row("GET", "/v1/audit/export", audit, guarded(200, ok(200))),
        row("GET", "/v1/audit/verify", audit, guarded(200, ok(200))),
        // The public half of the audit signing key: any valid token.
        row(
            "GET",
            "/v1/audit/signing-key",
            None,
            [
                UNAUTHORIZED,
                UNAUTHORIZED,
                ok(200),
                ok(200),
                ok(200),
                ok(200),
            ],
        ),
        // Who the token is: any valid token, of any organization.
        row(
            "GET",
            "/v1/me",
            None,
            [
                UNAUTHORIZED,
                UNAUTHORIZED,
                ok(200),
                ok(200),
                ok(200),
                ok(200),
            ],
        ),
        // The name search lists only what the caller may view: without the grant, nothing.
        row(
            "GET",
            "/v1/orgs/{org}/scopes",
            view,
            [
                UNAUTHORIZED,
                UNAUTHORIZED,
                NOT_FOUND,
                ok(200),
                ok(200),
                ok(200),
            ],
        ),
        // The operator's break-glass admin token: no organization token issues it, not
        // even its own admin's (the operator's success is tested in hardening.rs).
        row(
            "POST",
            "/v1/orgs/{org}/admin-tokens",
            manage,
            [
                UNAUTHORIZED,
                UNAUTHORIZED,
                FORBIDDEN,
                FORBIDDEN,
                FORBIDDEN,
                FORBIDDEN,
            ],
        ),
        // The operator's plan change: no organization token changes a plan (the operator's
        // success is tested in plans.rs).
        row(
            "PUT",
            "/v1/orgs/{org}/plan",
            manage,
            [
                UNAUTHORIZED,
                UNAUTHORIZED,
                FORBIDDEN,
                FORBIDDEN,
                FORBIDDEN,
                FORBIDDEN,
            ],
        ),
        // Rate limits: read with encryption:view like the policy; set by the operator only
        // (the operator's success is tested in rate_limits.rs).
        row("GET", "/v1/orgs/{org}/limits", view, guarded(200, ok(200))),
        row(
            "PUT",
            "/v1/orgs/{org}/limits",
            manage,
            [
                UNAUTHORIZED,
                UNAUTHORIZED,
                FORBIDDEN,
                FORBIDDEN,
                FORBIDDEN,
                FORBIDDEN,
            ],
        ),
        // The console's files: public, they hold no data.
        row("GET", "/console", None, public),
        row("GET", "/console/", None, public),
        row("GET", "/console/{asset}", None, public),
        // Admins manage encryption; using keys needs data:use, granted like any other.
        row(
            "POST",
            "/v1/scopes/{id}/encrypt",
            data,
            guarded(200, FORBIDDEN),
        ),
        row(
            "POST",
            "/v1/scopes/{id}/decrypt",
            data,
            guarded(200, FORBIDDEN),
        ),
        row(
            "POST",
            "/v1/scopes/{id}/datakey",
            data,
            guarded(200, FORBIDDEN),
        ),
        row(
            "POST",
            "/v1/scopes/{id}/rewrap",
            data,
            guarded(200, FORBIDDEN),
        ),
    ]
}

#[test]
fn matrix_fails_when_an_endpoint_has_no_row() {
    let served: BTreeSet<(String, String)> = ekm_api::endpoints::list()
        .into_iter()
        .map(|(m, p)| (m.to_owned(), p.to_owned()))
        .collect();
    let covered: BTreeSet<(String, String)> = rows()
        .iter()
        .map(|r| (r.method.to_owned(), r.path.to_owned()))
        .collect();
    assert_eq!(
        served.difference(&covered).collect::<Vec<_>>(),
        Vec::<&(String, String)>::new(),
        "endpoints without a row in the access matrix"
    );
    assert_eq!(
        covered.difference(&served).collect::<Vec<_>>(),
        Vec::<&(String, String)>::new(),
        "rows for endpoints that are not served"
    );
}

/// An organization with the scopes, tokens and callers a row needs.
struct World {
    org: String,
    admin: String,
    thread: String,
    ciphertext: String,
    callers: [Option<String>; 6],
}

async fn world(app: &TestApp, permission: Option<&str>) -> World {
    let (org, admin) = app.data_org("enterprise", "managed").await;
    let thread = app.scope(&admin, "thread", "t", &org).await;
    let sealed = app
        .post(
            &format!("/v1/scopes/{thread}/encrypt"),
            &admin,
            json!({"plaintext": "aGVsbG8=", "class": "messages"}),
        )
        .await;
    assert_eq!(sealed.status, StatusCode::OK, "{}", sealed.body);
    // The admin's data:use is taken back: the matrix's admin has only what its role gives.
    let removed = app
        .call(
            "DELETE",
            &format!("/v1/orgs/{org}/grants/admin/data:use"),
            Some(&admin),
            None,
        )
        .await;
    assert_eq!(removed.status, StatusCode::OK, "{}", removed.body);

    let (_, other_admin) = app.org_with("enterprise", "managed").await;
    let without = app.token(&admin, &org, "member-without", "member").await;
    let with = app.token(&admin, &org, "member-with", "member").await;
    if let Some(permission) = permission {
        app.grant(&admin, &org, "member-with", permission, None)
            .await;
    }
    // An expired token: stored as issued an hour ago, for an hour... that ended.
    let expired = ekm_store::Tokens::new_token();
    let org_id = ekm_domain::OrgId::parse(&org).unwrap();
    app.app
        .tokens()
        .issue(
            &expired,
            org_id,
            "expired",
            ekm_domain::PrincipalKind::Service,
            ekm_domain::OrgRole::OrgAdmin,
            Some(ekm_store::time::now_micros() - 1_000_000),
        )
        .await
        .unwrap();
    World {
        org,
        admin: admin.clone(),
        thread,
        ciphertext: sealed.str("ciphertext"),
        callers: [
            None,
            Some(expired.secret),
            Some(other_admin),
            Some(without),
            Some(with),
            Some(admin),
        ],
    }
}

/// The concrete request for `row` and caller `index`, with fresh targets where a success
/// would change what the next caller sees.
async fn request(app: &TestApp, world: &World, row: &Row, index: usize) -> (String, Option<Value>) {
    let org = &world.org;
    let thread = &world.thread;
    let fresh_thread = || async {
        app.scope(&world.admin, "thread", &format!("t{index}"), org)
            .await
    };
    match (row.method, row.path) {
        ("GET", "/healthz") => ("/healthz".into(), None),
        ("GET", "/readyz") => ("/readyz".into(), None),
        ("GET", "/v1/openapi.json") => ("/v1/openapi.json".into(), None),
        ("GET", "/metrics") => ("/metrics".into(), None),
        ("POST", "/v1/orgs") => (
            "/v1/orgs".into(),
            Some(json!({"name": "New", "plan": "enterprise"})),
        ),
        ("GET", "/v1/orgs/{org}") => (format!("/v1/orgs/{org}"), None),
        ("GET", "/v1/orgs/{org}/policy") => (format!("/v1/orgs/{org}/policy"), None),
        ("PUT", "/v1/orgs/{org}/policy") => (
            format!("/v1/orgs/{org}/policy"),
            Some(json!({"revoke_window": "P14D"})),
        ),
        ("PUT", "/v1/scopes/{id}/rotation-period") => (
            format!("/v1/scopes/{thread}/rotation-period"),
            Some(json!({"rotation_period": "P30D"})),
        ),
        ("POST", "/v1/scopes/{id}/cancel-revocation") => (
            format!("/v1/scopes/{thread}/cancel-revocation"),
            Some(json!({"reason": "matrix"})),
        ),
        ("PUT", "/v1/orgs/{org}/tier") => (
            format!("/v1/orgs/{org}/tier"),
            Some(json!({"tier": "managed"})),
        ),
        ("PUT", "/v1/orgs/{org}/master-key") => (
            format!("/v1/orgs/{org}/master-key"),
            Some(json!({"provider": "local"})),
        ),
        ("GET", "/v1/orgs/{org}/master-key") => (format!("/v1/orgs/{org}/master-key"), None),
        ("POST", "/v1/orgs/{org}/tokens") => (
            format!("/v1/orgs/{org}/tokens"),
            Some(json!({"principal": format!("new-{index}"), "kind": "service"})),
        ),
        ("GET", "/v1/orgs/{org}/tokens") => (format!("/v1/orgs/{org}/tokens"), None),
        ("DELETE", "/v1/orgs/{org}/tokens/{id}") => {
            let issued = app
                .post(
                    &format!("/v1/orgs/{org}/tokens"),
                    &world.admin,
                    json!({"principal": format!("doomed-{index}")}),
                )
                .await;
            (format!("/v1/orgs/{org}/tokens/{}", issued.str("id")), None)
        }
        ("POST", "/v1/orgs/{org}/grants") => (
            format!("/v1/orgs/{org}/grants"),
            Some(json!({"principal": format!("grantee-{index}"), "permission": "encryption:view"})),
        ),
        ("GET", "/v1/orgs/{org}/grants") => (format!("/v1/orgs/{org}/grants"), None),
        ("DELETE", "/v1/orgs/{org}/grants/{principal}/{permission}") => {
            let principal = format!("grantee-{index}");
            app.grant(&world.admin, org, &principal, "audit:read", None)
                .await;
            (
                format!("/v1/orgs/{org}/grants/{principal}/audit:read"),
                None,
            )
        }
        ("POST", "/v1/scopes") => (
            "/v1/scopes".into(),
            Some(json!({"kind": "team", "name": format!("team {index}"), "parent_id": org})),
        ),
        ("GET", "/v1/scopes/{id}") => (format!("/v1/scopes/{thread}"), None),
        ("GET", "/v1/scopes/{id}/children") => (format!("/v1/scopes/{org}/children"), None),
        ("POST", "/v1/scopes/{id}/pause") => (
            format!("/v1/scopes/{}/pause", fresh_thread().await),
            Some(json!({"reason": "matrix"})),
        ),
        ("POST", "/v1/scopes/{id}/resume") => {
            (format!("/v1/scopes/{thread}/resume"), Some(json!({})))
        }
        ("POST", "/v1/scopes/{id}/revoke") => {
            let id = fresh_thread().await;
            (
                format!("/v1/scopes/{id}/revoke"),
                Some(json!({"reason": "matrix", "confirm": id})),
            )
        }
        ("POST", "/v1/scopes/{id}/rotate") => {
            (format!("/v1/scopes/{thread}/rotate"), Some(json!({})))
        }
        ("POST", "/v1/scopes/{id}/retire") => {
            let id = fresh_thread().await;
            let rotated = app
                .post(&format!("/v1/scopes/{id}/rotate"), &world.admin, json!({}))
                .await;
            assert_eq!(rotated.status, StatusCode::OK);
            app.floor(&world.admin, &id, 2).await;
            (format!("/v1/scopes/{id}/retire"), Some(json!({"below": 2})))
        }
        ("GET", "/v1/scopes/{id}/access-at") => (
            format!(
                "/v1/scopes/{thread}/access-at?at={}",
                chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
            ),
            None,
        ),
        ("PUT", "/v1/scopes/{id}/justification-policy") => (
            format!("/v1/scopes/{}/justification-policy", fresh_thread().await),
            Some(json!({"required": true, "allowed": ["agent_run"]})),
        ),
        ("PUT", "/v1/scopes/{id}/min-decryption-version") => (
            format!("/v1/scopes/{}/min-decryption-version", fresh_thread().await),
            Some(json!({"version": 1})),
        ),
        ("GET", "/v1/scopes/{id}/key-versions") => {
            (format!("/v1/scopes/{thread}/key-versions"), None)
        }
        ("GET", "/v1/scopes/{id}/justification-policy") => {
            (format!("/v1/scopes/{thread}/justification-policy"), None)
        }
        ("GET", "/v1/scopes/{id}/state") => (
            format!("/v1/scopes/{thread}/state?position=9000000000000000"),
            None,
        ),
        ("GET", "/v1/orgs/{org}/schedule") => (format!("/v1/orgs/{org}/schedule"), None),
        ("GET", "/v1/audit") => (format!("/v1/audit?org={org}"), None),
        ("GET", "/v1/audit/access") => (format!("/v1/audit/access?org={org}"), None),
        ("GET", "/v1/audit/access/export") => (format!("/v1/audit/access/export?org={org}"), None),
        ("GET", "/v1/scopes/{id}/access-summary") => {
            (format!("/v1/scopes/{thread}/access-summary"), None)
        }
        ("GET", "/v1/audit/export") => (format!("/v1/audit/export?org={org}"), None),
        ("GET", "/v1/audit/verify") => (format!("/v1/audit/verify?org={org}"), None),
        ("GET", "/v1/me") => ("/v1/me".into(), None),
        ("GET", "/v1/audit/signing-key") => ("/v1/audit/signing-key".into(), None),
        ("GET", "/v1/orgs/{org}/scopes") => (format!("/v1/orgs/{org}/scopes?q=t"), None),
        ("GET", "/v1/orgs/{org}/limits") => (format!("/v1/orgs/{org}/limits"), None),
        ("PUT", "/v1/orgs/{org}/limits") => (format!("/v1/orgs/{org}/limits"), Some(json!({}))),
        ("PUT", "/v1/orgs/{org}/plan") => (
            format!("/v1/orgs/{org}/plan"),
            Some(json!({"plan": "standard"})),
        ),
        ("POST", "/v1/orgs/{org}/admin-tokens") => (
            format!("/v1/orgs/{org}/admin-tokens"),
            Some(json!({"reason": "matrix"})),
        ),
        ("GET", "/console") => ("/console".into(), None),
        ("GET", "/console/") => ("/console/".into(), None),
        ("GET", "/console/{asset}") => ("/console/app.js".into(), None),
        ("POST", "/v1/scopes/{id}/encrypt") => (
            format!("/v1/scopes/{thread}/encrypt"),
            Some(json!({"plaintext": "aGVsbG8=", "class": "messages"})),
        ),
        ("POST", "/v1/scopes/{id}/decrypt") => (
            format!("/v1/scopes/{thread}/decrypt"),
            Some(json!({"ciphertext": world.ciphertext, "class": "messages"})),
        ),
        ("POST", "/v1/scopes/{id}/datakey") => (
            format!("/v1/scopes/{thread}/datakey"),
            Some(json!({"class": "messages"})),
        ),
        ("POST", "/v1/scopes/{id}/rewrap") => (
            format!("/v1/scopes/{thread}/rewrap"),
            Some(json!({"ciphertext": world.ciphertext, "class": "messages"})),
        ),
        (method, path) => panic!("no request for {method} {path}"),
    }
}

async fn every_endpoint_answers_as_the_matrix_says_when_any_caller_calls(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let mut failures = vec![];
    for row in rows() {
        let world = world(&app, row.permission).await;
        for (index, caller) in world.callers.iter().enumerate() {
            let (path, body) = request(&app, &world, &row, index).await;
            let response = app.call(row.method, &path, caller.as_deref(), body).await;
            let (status, code) = row.expected[index];
            let got_code = response.body.get("code").and_then(Value::as_str);
            let matches = response.status.as_u16() == status
                && (code.is_none() || got_code == code)
                && (code.is_none() || response.content_type == "application/problem+json");
            if !matches {
                failures.push(format!(
                    "{} {} as {}: expected {status} {code:?}, got {} {}",
                    row.method, row.path, CALLERS[index], response.status, response.body
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
on_both_backends!(every_endpoint_answers_as_the_matrix_says_when_any_caller_calls);
