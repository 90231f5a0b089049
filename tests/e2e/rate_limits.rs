//! Rate limits (issue 18 §4, ADR 0036): token buckets per principal and per organization,
//! on the data plane and on commands; the operator sets an organization's own with
//! `PUT /v1/orgs/{org}/limits`, the rest are the server's defaults.
//!
//! The buckets here refill at one token per second and the tests run well within that
//! second's share, so every refusal they expect is certain; none waits for a refill (a
//! raised limit starts a fresh bucket instead).

use serde_json::{json, Value};

use crate::harness::{encrypt, Backend, Options, Response, TestApp};
use crate::on_both_backends;

fn limited() -> Options {
    Options {
        rate_limits: ekm_api::rate_limit::RateDefaults::default(),
        ..Options::default()
    }
}

async fn set_limits(app: &TestApp, org: &str, body: Value) -> Response {
    app.call(
        "PUT",
        &format!("/v1/orgs/{org}/limits"),
        Some(&app.operator_token),
        Some(body),
    )
    .await
}

fn bucket(per_second: u32, burst: u32) -> Value {
    json!({"per_second": per_second, "burst": burst})
}

fn assert_rate_limited(response: &Response, limit: &str) {
    assert_eq!(response.status, 429, "{}", response.body);
    assert_eq!(response.body["code"], "rate_limited");
    assert_eq!(response.content_type, "application/problem+json");
    let retry_after: u64 = response.headers["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(retry_after >= 1, "Retry-After: {retry_after}");
    assert_eq!(response.headers["ratelimit-limit"], limit);
    assert_eq!(response.headers["ratelimit-remaining"], "0");
    assert!(response.headers.contains_key("ratelimit-reset"));
}

async fn principal_and_organization_buckets_refuse_with_429_and_say_when(backend: Backend) {
    let app = TestApp::spawn_with(backend, limited()).await;
    let (org, admin) = app.data_org("enterprise", "managed").await;
    let svc = app.token(&admin, &org, "svc", "member").await;
    app.grant(&admin, &org, "svc", "data:use", None).await;
    // Given a bucket of 2 per principal and 3 for the organization on the data plane
    let set = set_limits(
        &app,
        &org,
        json!({"data_plane_principal": bucket(1, 2), "data_plane_organization": bucket(1, 3),
               "reason": "ticket 7"}),
    )
    .await;
    assert_eq!(set.status, 200, "{}", set.body);
    assert_eq!(set.body["changed"], true);
    assert_eq!(set.body["data_plane_principal"]["source"], "organization");
    assert_eq!(set.body["commands_principal"]["source"], "default");
    // When the admin encrypts three times, then the third is refused by its own bucket
    for remaining in ["1", "0"] {
        let sealed = encrypt(&app, &admin, &org, b"x", "messages").await;
        assert_eq!(sealed.status, 200, "{}", sealed.body);
        assert_eq!(sealed.headers["ratelimit-remaining"], remaining);
    }
    assert_rate_limited(&encrypt(&app, &admin, &org, b"x", "messages").await, "2");
    // And another principal gets the organization's last token, then the organization's
    // bucket refuses it although its own still holds one
    let sealed = encrypt(&app, &svc, &org, b"x", "messages").await;
    assert_eq!(sealed.status, 200, "{}", sealed.body);
    assert_rate_limited(&encrypt(&app, &svc, &org, b"x", "messages").await, "3");
    // Reads are not limited, and the limits are readable by the organization's admin
    let read = app
        .call("GET", &format!("/v1/orgs/{org}/limits"), Some(&admin), None)
        .await;
    assert_eq!(read.status, 200, "{}", read.body);
    assert_eq!(
        read.body["data_plane_organization"],
        json!({"per_second": 1, "burst": 3, "source": "organization"})
    );
    // But only the operator sets them
    let refused = app
        .call(
            "PUT",
            &format!("/v1/orgs/{org}/limits"),
            Some(&admin),
            Some(json!({})),
        )
        .await;
    assert_eq!(refused.status, 403, "{}", refused.body);
    // And the change is in the audit log
    let audit = app
        .call(
            "GET",
            &format!("/v1/audit?org={org}&action=org.rate_limits"),
            Some(&admin),
            None,
        )
        .await;
    assert_eq!(
        audit.body["items"].as_array().unwrap().len(),
        1,
        "{}",
        audit.body
    );
    assert_eq!(audit.body["items"][0]["reason"], "ticket 7");
}
on_both_backends!(principal_and_organization_buckets_refuse_with_429_and_say_when);

async fn a_batch_costs_one_token_per_item(backend: Backend) {
    let app = TestApp::spawn_with(backend, limited()).await;
    let (org, admin) = app.data_org("enterprise", "managed").await;
    let set = set_limits(&app, &org, json!({"data_plane_principal": bucket(1, 5)})).await;
    assert_eq!(set.status, 200, "{}", set.body);
    let item = json!({"plaintext": "eA==", "class": "messages"});
    let path = format!("/v1/scopes/{org}/encrypt");
    // Given a bucket of 5, when a batch of 3 is served, then 2 tokens are left
    let batch = app
        .post(&path, &admin, json!({"items": [item, item, item]}))
        .await;
    assert_eq!(batch.status, 200, "{}", batch.body);
    assert_eq!(batch.headers["ratelimit-remaining"], "2");
    // And a batch of 3 more is refused whole, nothing served
    let refused = app
        .post(&path, &admin, json!({"items": [item, item, item]}))
        .await;
    assert_eq!(refused.status, 429, "{}", refused.body);
    assert_eq!(refused.body["code"], "rate_limited");
    assert!(refused.headers.contains_key("retry-after"));
    // While two single requests still pass
    for _ in 0..2 {
        assert_eq!(app.post(&path, &admin, item.clone()).await.status, 200);
    }
}
on_both_backends!(a_batch_costs_one_token_per_item);

async fn a_command_over_the_limit_claims_no_idempotency_key(backend: Backend) {
    let app = TestApp::spawn_with(backend, limited()).await;
    let (org, admin) = app.data_org("enterprise", "managed").await;
    let set = set_limits(&app, &org, json!({"commands_principal": bucket(1, 1)})).await;
    assert_eq!(set.status, 200, "{}", set.body);
    let create = |name: &str| json!({"kind": "team", "name": name, "parent_id": org});
    let post = |key: &'static str, body: Value| {
        let request = app
            .client
            .post(format!("{}/v1/scopes", app.base))
            .bearer_auth(&admin)
            .header("Idempotency-Key", key)
            .json(&body);
        async move { Response::from_reqwest(request.send().await.unwrap()).await }
    };
    // Given the bucket's one token spent
    assert_eq!(post("first", create("a")).await.status, 201);
    // When a keyed command is over the limit, then 429, and its key is not taken
    assert_rate_limited(&post("second", create("b")).await, "1");
    // So that once the limit allows it (raised: a fresh bucket), the same key runs it
    let raised = set_limits(&app, &org, json!({"commands_principal": bucket(1, 5)})).await;
    assert_eq!(raised.status, 200, "{}", raised.body);
    let retried = post("second", create("b")).await;
    assert_eq!(retried.status, 201, "{}", retried.body);
    assert!(!retried.headers.contains_key("idempotency-replayed"));
    // And back to the defaults, the organization is limited by the server's flags
    let reset = set_limits(&app, &org, json!({})).await;
    assert_eq!(reset.body["commands_principal"]["source"], "default");
    assert_eq!(reset.body["commands_principal"]["burst"], 1000);
}
on_both_backends!(a_command_over_the_limit_claims_no_idempotency_key);

async fn limits_are_refused_clearly_when_malformed(backend: Backend) {
    let app = TestApp::spawn_with(backend, limited()).await;
    let (org, _admin) = app.data_org("enterprise", "managed").await;
    for body in [
        json!({"data_plane_principal": bucket(0, 5)}),
        json!({"data_plane_principal": bucket(5, 0)}),
        json!({"data_plane_principal": {"per_second": 5}}),
        json!({"data_plane_principal": bucket(20_000_000, 5)}),
        json!({"data_plane": bucket(1, 1)}),
        json!({"commands_organization": "fast"}),
    ] {
        let refused = set_limits(&app, &org, body.clone()).await;
        assert_eq!(refused.status, 400, "{body}: {}", refused.body);
        assert_eq!(refused.body["code"], "invalid_request");
    }
    // An organization that does not exist
    let missing = set_limits(&app, "0190c7a2-8a1e-7c3b-9d4e-2f1a3b5c6d7e", json!({})).await;
    assert_eq!(missing.status, 404, "{}", missing.body);
}
on_both_backends!(limits_are_refused_clearly_when_malformed);

#[test]
fn ekm_serve_takes_its_default_limits_from_flags() {
    use crate::process::{call, read_token, serve_configured};
    let dir = tempfile::tempdir().unwrap();
    let server = serve_configured(
        dir.path(),
        None,
        &[
            "--rate-limit-commands-principal",
            "1:2",
            "--rate-limit-data-plane-organization",
            "off",
        ],
        &[],
    );
    let base = &server.base;
    let (status, org) = call(
        "POST",
        &format!("{base}/v1/orgs"),
        &read_token(dir.path()),
        Some(json!({"name": "flags", "plan": "enterprise"})),
    );
    assert_eq!(status, 201, "{org}");
    let id = org["id"].as_str().unwrap();
    let admin = org["admin_token"].as_str().unwrap();
    // Given a burst of 2 commands per principal, when the admin sends three, the third is
    // refused
    let create = |name: &str| json!({"kind": "team", "name": name, "parent_id": id});
    let scopes = format!("{base}/v1/scopes");
    assert_eq!(call("POST", &scopes, admin, Some(create("a"))).0, 201);
    assert_eq!(call("POST", &scopes, admin, Some(create("b"))).0, 201);
    let (status, refused) = call("POST", &scopes, admin, Some(create("c")));
    assert_eq!(status, 429, "{refused}");
    assert_eq!(refused["code"], "rate_limited");
    // And the limits say where each comes from
    let (_, limits) = call("GET", &format!("{base}/v1/orgs/{id}/limits"), admin, None);
    assert_eq!(
        limits["commands_principal"],
        json!({"per_second": 1, "burst": 2, "source": "default"})
    );
    assert_eq!(
        limits["data_plane_organization"],
        json!({"per_second": null, "burst": null, "source": "default"})
    );
    assert_eq!(limits["data_plane_principal"]["burst"], 10_000);
}
