//! Bad input per endpoint beyond scopes: tokens, grants (POST and DELETE), data keys,
//! rewrap, audit verify, the tier with every value; and the database going away. Every
//! refusal is problem+json with its code, and records nothing.

use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::harness::{Backend, TestApp};
use crate::on_both_backends;

async fn every_endpoint_answers_a_problem_when_its_input_is_bad(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let (org, admin) = app.data_org("enterprise", "managed").await;
    let thread = app.scope(&admin, "thread", "t", &org).await;
    let sealed = app
        .post(
            &format!("/v1/scopes/{thread}/encrypt"),
            &admin,
            json!({"plaintext": "aGVsbG8=", "class": "messages"}),
        )
        .await
        .str("ciphertext");
    let unknown = uuid::Uuid::now_v7().to_string();
    let events_before = app.db.event_count().await.unwrap();

    let bad = "invalid_request";
    let cases: Vec<(&str, String, Option<Value>, u16, &str)> = vec![
        // Tokens.
        (
            "POST",
            format!("/v1/orgs/{org}/tokens"),
            Some(json!({})),
            400,
            bad,
        ),
        (
            "POST",
            format!("/v1/orgs/{org}/tokens"),
            Some(json!({"principal": "a b"})),
            400,
            bad,
        ),
        (
            "POST",
            format!("/v1/orgs/{org}/tokens"),
            Some(json!({"principal": ""})),
            400,
            bad,
        ),
        (
            "POST",
            format!("/v1/orgs/{org}/tokens"),
            Some(json!({"principal": "x".repeat(65)})),
            400,
            bad,
        ),
        (
            "POST",
            format!("/v1/orgs/{org}/tokens"),
            Some(json!({"principal": "svc", "role": "operator"})),
            400,
            bad,
        ),
        (
            "POST",
            format!("/v1/orgs/{org}/tokens"),
            Some(json!({"principal": "svc", "role": "ORG_ADMIN"})),
            400,
            bad,
        ),
        (
            "POST",
            format!("/v1/orgs/{org}/tokens"),
            Some(json!({"principal": "svc", "kind": "robot"})),
            400,
            bad,
        ),
        (
            "POST",
            format!("/v1/orgs/{org}/tokens"),
            Some(json!({"principal": "svc", "expires_at": "tomorrow"})),
            400,
            bad,
        ),
        (
            "POST",
            format!("/v1/orgs/{org}/tokens"),
            Some(json!({"principal": "svc", "expires_at": "2001-01-01T00:00:00Z"})),
            400,
            bad,
        ),
        (
            "POST",
            format!("/v1/orgs/{org}/tokens"),
            Some(json!({"principal": "svc", "extra": true})),
            400,
            bad,
        ),
        (
            "POST",
            format!("/v1/orgs/{org}/tokens"),
            Some(json!({"principal": 7})),
            400,
            bad,
        ),
        (
            "DELETE",
            format!("/v1/orgs/{org}/tokens/tok_nothing"),
            None,
            404,
            "not_found",
        ),
        (
            "DELETE",
            format!("/v1/orgs/{org}/tokens/%FF"),
            None,
            400,
            bad,
        ),
        // Grants.
        (
            "POST",
            format!("/v1/orgs/{org}/grants"),
            Some(json!({"principal": "svc"})),
            400,
            bad,
        ),
        (
            "POST",
            format!("/v1/orgs/{org}/grants"),
            Some(json!({"principal": "svc", "permission": "data:abuse"})),
            400,
            bad,
        ),
        (
            "POST",
            format!("/v1/orgs/{org}/grants"),
            Some(json!({"principal": "s v c", "permission": "data:use"})),
            400,
            bad,
        ),
        (
            "POST",
            format!("/v1/orgs/{org}/grants"),
            Some(json!({"principal": "svc", "permission": "data:use", "scope_id": "nope"})),
            400,
            bad,
        ),
        (
            "POST",
            format!("/v1/orgs/{org}/grants"),
            Some(json!({"principal": "svc", "permission": "data:use", "scope_id": unknown})),
            404,
            "not_found",
        ),
        (
            "POST",
            format!("/v1/orgs/{org}/grants"),
            Some(json!({"principal": "svc", "permission": "data:use", "until": 1})),
            400,
            bad,
        ),
        (
            "DELETE",
            format!("/v1/orgs/{org}/grants/svc/data:abuse"),
            None,
            400,
            bad,
        ),
        (
            "DELETE",
            format!("/v1/orgs/{org}/grants/s%20v/data:use"),
            None,
            400,
            bad,
        ),
        (
            "DELETE",
            format!("/v1/orgs/{org}/grants/svc/data:use?scope_id=nope"),
            None,
            400,
            bad,
        ),
        (
            "DELETE",
            format!("/v1/orgs/{org}/grants/svc/data:use?colour=red"),
            None,
            400,
            bad,
        ),
        // Data keys.
        (
            "POST",
            format!("/v1/scopes/{thread}/datakey"),
            Some(json!({})),
            400,
            bad,
        ),
        (
            "POST",
            format!("/v1/scopes/{thread}/datakey"),
            Some(json!({"class": "gossip"})),
            400,
            bad,
        ),
        (
            "POST",
            format!("/v1/scopes/{thread}/datakey"),
            Some(json!({"class": "messages", "bits": 1})),
            400,
            bad,
        ),
        (
            "POST",
            "/v1/scopes/not-a-uuid/datakey".to_owned(),
            Some(json!({"class": "messages"})),
            400,
            bad,
        ),
        (
            "POST",
            format!("/v1/scopes/{unknown}/datakey"),
            Some(json!({"class": "messages"})),
            404,
            "not_found",
        ),
        // Rewrap.
        (
            "POST",
            format!("/v1/scopes/{thread}/rewrap"),
            Some(json!({"class": "messages"})),
            400,
            bad,
        ),
        (
            "POST",
            format!("/v1/scopes/{thread}/rewrap"),
            Some(json!({"ciphertext": "ekm1.x", "class": "messages"})),
            400,
            "invalid_ciphertext",
        ),
        (
            "POST",
            format!("/v1/scopes/{thread}/rewrap"),
            Some(json!({"ciphertext": sealed.replacen("ekm1", "ekm2", 1), "class": "messages"})),
            400,
            "invalid_ciphertext",
        ),
        (
            "POST",
            format!("/v1/scopes/{thread}/rewrap"),
            Some(json!({"ciphertext": sealed, "class": "gossip"})),
            400,
            bad,
        ),
        // Audit verify.
        (
            "GET",
            "/v1/audit/verify?org=nope".to_owned(),
            None,
            400,
            bad,
        ),
        (
            "GET",
            "/v1/audit/verify?colour=red".to_owned(),
            None,
            400,
            bad,
        ),
        (
            "GET",
            format!("/v1/audit/verify?org={unknown}"),
            None,
            404,
            "not_found",
        ),
        // The tier: only default and managed are set this way.
        (
            "PUT",
            format!("/v1/orgs/{org}/tier"),
            Some(json!({})),
            400,
            bad,
        ),
        (
            "PUT",
            format!("/v1/orgs/{org}/tier"),
            Some(json!({"tier": "gold"})),
            400,
            bad,
        ),
        (
            "PUT",
            format!("/v1/orgs/{org}/tier"),
            Some(json!({"tier": "Managed"})),
            400,
            bad,
        ),
        (
            "PUT",
            format!("/v1/orgs/{org}/tier"),
            Some(json!({"tier": 2})),
            400,
            bad,
        ),
        (
            "PUT",
            format!("/v1/orgs/{org}/tier"),
            Some(json!({"tier": null})),
            400,
            bad,
        ),
        (
            "PUT",
            format!("/v1/orgs/{org}/tier"),
            Some(json!({"tier": "managed", "extra": 1})),
            400,
            bad,
        ),
    ];
    let mut wrong = vec![];
    for (method, path, body, status, code) in cases {
        let response = app.call(method, &path, Some(&admin), body).await;
        let got = (
            response.status.as_u16(),
            response.body["code"].as_str().unwrap_or(""),
        );
        if got != (status, code) || response.content_type != "application/problem+json" {
            wrong.push(format!("{method} {path}: {got:?} {}", response.body));
        }
    }
    assert!(wrong.is_empty(), "{wrong:#?}");
    assert_eq!(app.db.event_count().await.unwrap(), events_before);
    // Positions are not counts (on PostgreSQL they derive from transaction ids).
    let head_before = app.db.committed_head().await.unwrap();

    // The tier with every value it can take.
    let tier = |value: &'static str| {
        let app = &app;
        let path = format!("/v1/orgs/{org}/tier");
        let admin = admin.clone();
        async move {
            app.call(
                "PUT",
                &path,
                Some(&admin),
                Some(json!({"tier": value, "reason": "plan"})),
            )
            .await
        }
    };
    let to_default = tier("default").await;
    assert_eq!(to_default.status, StatusCode::OK, "{}", to_default.body);
    assert_eq!(to_default.body["tier"], "default");
    let again = tier("default").await;
    assert_eq!(again.status, StatusCode::OK, "{}", again.body);
    let to_managed = tier("managed").await;
    assert_eq!(to_managed.status, StatusCode::OK, "{}", to_managed.body);
    assert_eq!(to_managed.body["tier"], "managed");
    // byok comes with a master key (PUT /master-key), never alone.
    let byok = tier("byok").await;
    assert!(byok.status.is_client_error(), "{}", byok.body);
    assert_eq!(byok.content_type, "application/problem+json");
    let events = app.db.events_after(head_before, 100).await.unwrap();
    let changes: Vec<&str> = events.iter().map(|e| e.event_type.as_str()).collect();
    assert_eq!(
        changes,
        ["OrganizationTierChanged", "OrganizationTierChanged"]
    );
    app.stop().await;
}
on_both_backends!(every_endpoint_answers_a_problem_when_its_input_is_bad);

/// A TCP proxy in front of PostgreSQL that the test can cut: every connection through it
/// dropped, new ones refused (as when the database host goes down), and restored.
struct Cable {
    port: u16,
    upstream: String,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Cable {
    async fn start(upstream: &str) -> Cable {
        let mut cable = Cable {
            port: crate::harness::free_port(),
            upstream: upstream.to_owned(),
            task: None,
        };
        cable.connect().await;
        cable
    }

    async fn connect(&mut self) {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", self.port))
            .await
            .unwrap();
        let upstream = self.upstream.clone();
        self.task = Some(tokio::spawn(async move {
            let mut links = tokio::task::JoinSet::new();
            while let Ok((mut client, _)) = listener.accept().await {
                let upstream = upstream.clone();
                links.spawn(async move {
                    if let Ok(mut server) = tokio::net::TcpStream::connect(&upstream).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    }
                });
            }
        }));
    }

    /// Drops every connection (the JoinSet goes with the task) and the listener, and returns
    /// once they are gone.
    async fn cut(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
            let _ = task.await;
        }
    }
}

/// The database goes away (the connection to PostgreSQL is cut): commands and reads
/// answer 503 `unavailable` as problem+json, never a 500; once it is back, the server
/// works again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_answer_503_when_the_database_is_down() {
    let mut test_db = crate::harness::TestDb::new(Backend::Postgres).await;
    let url = test_db.url.clone().unwrap();
    let host = url
        .split('@')
        .nth(1)
        .unwrap()
        .split('/')
        .next()
        .unwrap()
        .to_owned();
    let mut cable = Cable::start(&host).await;
    let proxied = url.replacen(&host, &format!("127.0.0.1:{}", cable.port), 1);
    test_db.url = Some(proxied.clone());
    test_db.config = ekm_store::DbConfig::Postgres { url: proxied };
    let app = TestApp::spawn_on(test_db).await;
    let (org, admin) = app.org_with("enterprise", "managed").await;
    let team = app.scope(&admin, "team", "t", &org).await;

    cable.cut().await;
    let requests: Vec<(&str, String, Option<Value>)> = vec![
        (
            "POST",
            format!("/v1/scopes/{team}/pause"),
            Some(json!({"reason": "down"})),
        ),
        (
            "POST",
            "/v1/scopes".to_owned(),
            Some(json!({"kind": "thread", "name": "x", "parent_id": team})),
        ),
        ("GET", format!("/v1/orgs/{org}/scopes"), None),
    ];
    // The pool tries to reconnect until its acquire timeout (10 s): the requests wait for
    // it together.
    let call = |i: usize| {
        let (method, path, body) = &requests[i];
        app.call(method, path, Some(&admin), body.clone())
    };
    // A scope's own state is answered from memory (ADR 0020), as last known: nothing can
    // change it while nobody can commit.
    let team_path = format!("/v1/scopes/{team}");
    let from_memory = app.get(&team_path, &admin);
    let (a, b, c, d) = tokio::join!(call(0), call(1), call(2), from_memory);
    assert_eq!(d.status, StatusCode::OK, "{}", d.body);
    assert_eq!(d.body["effective_state"], "active");
    for ((method, path, _), response) in requests.iter().zip([a, b, c]) {
        assert_eq!(
            response.status,
            StatusCode::SERVICE_UNAVAILABLE,
            "{method} {path}: {}",
            response.body
        );
        response.assert_problem(503, "unavailable");
    }

    cable.connect().await;
    let paused = app
        .post(
            &format!("/v1/scopes/{team}/pause"),
            &admin,
            json!({"reason": "back"}),
        )
        .await;
    assert_eq!(paused.status, StatusCode::OK, "{}", paused.body);
    app.stop().await;
}
