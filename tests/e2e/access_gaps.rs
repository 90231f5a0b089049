//! Access at the edges the matrix does not reach: grants on one subtree and its siblings,
//! ids of another organization under one's own path, a revoked organization, and a child
//! born under an ancestor that was being revoked (ADR 0003).

use ekm_domain::{ScopeError, ScopeId, ScopeKind, ScopeName};
use ekm_service::app::Action;
use ekm_service::keys::KeyError;
use ekm_service::AppError;
use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::harness::{metadata, Backend, Response, TestApp};
use crate::on_both_backends;

fn ids(list: &Response) -> Vec<String> {
    let mut ids: Vec<String> = list.body["items"]
        .as_array()
        .unwrap_or_else(|| panic!("a list: {}", list.body))
        .iter()
        .map(|item| item["id"].as_str().unwrap().to_owned())
        .collect();
    ids.sort();
    ids
}

async fn encrypt(app: &TestApp, token: &str, scope: &str) -> Response {
    crate::harness::encrypt(app, token, scope, b"hello", "messages").await
}

/// Every scope-level request a member could try on `scope`, with the body it needs.
fn scope_requests(scope: &str, ciphertext: &str) -> Vec<(&'static str, String, Option<Value>)> {
    vec![
        ("GET", format!("/v1/scopes/{scope}"), None),
        ("GET", format!("/v1/scopes/{scope}/children"), None),
        (
            "GET",
            format!(
                "/v1/scopes/{scope}/state?at={}",
                // Tomorrow: as of now, whatever the clock's resolution.
                (chrono::Utc::now() + chrono::Duration::days(1))
                    .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
            ),
            None,
        ),
        (
            "POST",
            format!("/v1/scopes/{scope}/pause"),
            Some(json!({"reason": "try"})),
        ),
        (
            "POST",
            format!("/v1/scopes/{scope}/resume"),
            Some(json!({"reason": "try"})),
        ),
        (
            "POST",
            format!("/v1/scopes/{scope}/rotate"),
            Some(json!({"reason": "try"})),
        ),
        (
            "POST",
            format!("/v1/scopes/{scope}/retire"),
            Some(json!({"below": 2, "reason": "try"})),
        ),
        (
            "PUT",
            format!("/v1/scopes/{scope}/min-decryption-version"),
            Some(json!({"version": 1})),
        ),
        ("GET", format!("/v1/scopes/{scope}/key-versions"), None),
        (
            "PUT",
            format!("/v1/scopes/{scope}/justification-policy"),
            Some(json!({"required": true})),
        ),
        (
            "GET",
            format!("/v1/scopes/{scope}/justification-policy"),
            None,
        ),
        (
            "POST",
            format!("/v1/scopes/{scope}/revoke"),
            Some(json!({"confirm": scope, "reason": "try"})),
        ),
        (
            "POST",
            "/v1/scopes".to_owned(),
            Some(json!({"kind": "agent", "name": "x", "parent_id": scope})),
        ),
        (
            "POST",
            format!("/v1/scopes/{scope}/encrypt"),
            Some(json!({"plaintext": "aGVsbG8=", "class": "messages"})),
        ),
        (
            "POST",
            format!("/v1/scopes/{scope}/decrypt"),
            Some(json!({"ciphertext": ciphertext, "class": "messages"})),
        ),
        (
            "POST",
            format!("/v1/scopes/{scope}/datakey"),
            Some(json!({"class": "messages"})),
        ),
        (
            "POST",
            format!("/v1/scopes/{scope}/rewrap"),
            Some(json!({"ciphertext": ciphertext, "class": "messages"})),
        ),
    ]
}

/// A member granted everything on team A gets nothing on its sibling team B, nor on B's
/// children: each request is refused as forbidden, and B is unchanged.
async fn scope_request_is_refused_when_the_grant_is_on_a_sibling(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let (org, admin) = app.data_org("enterprise", "managed").await;
    let team_a = app.scope(&admin, "team", "a", &org).await;
    let team_b = app.scope(&admin, "team", "b", &org).await;
    let thread_a = app.scope(&admin, "thread", "a1", &team_a).await;
    let thread_b = app.scope(&admin, "thread", "b1", &team_b).await;
    let sealed_b = encrypt(&app, &admin, &thread_b).await.str("ciphertext");
    let member = app.token(&admin, &org, "member-a", "member").await;
    for permission in ["encryption:manage", "data:use"] {
        app.grant(&admin, &org, "member-a", permission, Some(&team_a))
            .await;
    }

    // On A's subtree the grant works.
    assert_eq!(
        app.get(&format!("/v1/scopes/{thread_a}"), &member)
            .await
            .status,
        StatusCode::OK
    );
    let sealed_a = encrypt(&app, &member, &thread_a).await;
    assert_eq!(sealed_a.status, StatusCode::OK, "{}", sealed_a.body);
    // On B and below it, nothing.
    for scope in [&team_b, &thread_b] {
        for (method, path, body) in scope_requests(scope, &sealed_b) {
            let response = app.call(method, &path, Some(&member), body).await;
            assert_eq!(
                response.status,
                StatusCode::FORBIDDEN,
                "{method} {path}: {}",
                response.body
            );
            response.assert_problem(403, "forbidden");
        }
    }
    // B's ciphertext presented at A's endpoint opens nothing either.
    let moved = app
        .post(
            &format!("/v1/scopes/{thread_a}/decrypt"),
            &member,
            json!({"ciphertext": sealed_b, "class": "messages"}),
        )
        .await;
    assert!(moved.status.is_client_error(), "{}", moved.body);
    assert_eq!(moved.content_type, "application/problem+json");
    // The name search shows A's subtree only.
    let listed = app.get(&format!("/v1/orgs/{org}/scopes"), &member).await;
    assert_eq!(listed.status, StatusCode::OK, "{}", listed.body);
    let mut expected = vec![team_a.clone(), thread_a.clone()];
    expected.sort();
    assert_eq!(ids(&listed), expected);
    // B is as it was: active, one key version, no child.
    let b = app.get(&format!("/v1/scopes/{team_b}"), &admin).await;
    assert_eq!(b.body["own_state"], "active");
    let children = app
        .get(&format!("/v1/scopes/{team_b}/children"), &admin)
        .await;
    assert_eq!(ids(&children), vec![thread_b.clone()]);
    let b1 = app.get(&format!("/v1/scopes/{thread_b}"), &admin).await;
    assert_eq!(b1.body["key_versions"].as_array().unwrap().len(), 1);
    app.stop().await;
}
on_both_backends!(scope_request_is_refused_when_the_grant_is_on_a_sibling);

/// Another organization's token id under one's own organization's path: not found, and the
/// token keeps working.
async fn revoke_token_is_not_found_when_the_token_is_another_orgs(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let (org_a, admin_a) = app.org_with("enterprise", "managed").await;
    let (org_b, admin_b) = app.org_with("enterprise", "managed").await;
    let issued = app
        .post(
            &format!("/v1/orgs/{org_b}/tokens"),
            &admin_b,
            json!({"principal": "svc-b", "role": "it_admin"}),
        )
        .await;
    assert_eq!(issued.status, StatusCode::CREATED, "{}", issued.body);
    let (token_b, secret_b) = (issued.str("id"), issued.str("token"));

    let revoked = app
        .call(
            "DELETE",
            &format!("/v1/orgs/{org_a}/tokens/{token_b}"),
            Some(&admin_a),
            None,
        )
        .await;
    revoked.assert_problem(404, "not_found");
    let listed = app.get(&format!("/v1/orgs/{org_a}/tokens"), &admin_a).await;
    assert!(
        !listed.body.to_string().contains(&token_b),
        "{}",
        listed.body
    );
    // B's token still works, and B's log shows no revoke.
    let me = app.get(&format!("/v1/orgs/{org_b}"), &secret_b).await;
    assert_eq!(me.status, StatusCode::OK, "{}", me.body);
    let events = app.db.events_through(0, i64::MAX, 10_000).await.unwrap();
    assert!(events.iter().all(|e| e.event_type != "TokenRevoked"));
    app.stop().await;
}
on_both_backends!(revoke_token_is_not_found_when_the_token_is_another_orgs);

/// A grant (or its removal) naming another organization's scope is refused, and records
/// nothing.
async fn grant_is_refused_when_it_names_another_orgs_scope(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let (org_a, admin_a) = app.org_with("enterprise", "managed").await;
    let (org_b, admin_b) = app.org_with("enterprise", "managed").await;
    let team_b = app.scope(&admin_b, "team", "b", &org_b).await;
    let before = app.db.event_count().await.unwrap();
    for scope in [&team_b, &org_b] {
        let granted = app
            .post(
                &format!("/v1/orgs/{org_a}/grants"),
                &admin_a,
                json!({"principal": "alice", "permission": "data:use", "scope_id": scope}),
            )
            .await;
        granted.assert_problem(404, "not_found");
        let removed = app
            .call(
                "DELETE",
                &format!("/v1/orgs/{org_a}/grants/alice/data:use?scope_id={scope}"),
                Some(&admin_a),
                None,
            )
            .await;
        removed.assert_problem(404, "not_found");
    }
    assert_eq!(app.db.event_count().await.unwrap(), before);
    let grants = app.get(&format!("/v1/orgs/{org_a}/grants"), &admin_a).await;
    assert!(
        !grants.body.to_string().contains(&team_b),
        "{}",
        grants.body
    );
    app.stop().await;
}
on_both_backends!(grant_is_refused_when_it_names_another_orgs_scope);

/// The name search answers a member without any grant with an empty list, whatever it asks
/// for; a grant on one team opens that team's subtree only.
async fn list_scopes_is_empty_when_the_member_has_no_grant(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let (org, admin) = app.org_with("enterprise", "managed").await;
    let team = app.scope(&admin, "team", "research", &org).await;
    let thread = app.scope(&admin, "thread", "research-notes", &team).await;
    let other = app.scope(&admin, "team", "research-two", &org).await;
    let member = app.token(&admin, &org, "nobody", "member").await;
    for query in ["", "?q=research", "?q=r&limit=500"] {
        let listed = app
            .get(&format!("/v1/orgs/{org}/scopes{query}"), &member)
            .await;
        assert_eq!(listed.status, StatusCode::OK, "{}", listed.body);
        assert_eq!(ids(&listed), Vec::<String>::new(), "{query}");
        assert!(listed.body["next_cursor"].is_null());
    }
    // The admin sees all four.
    assert_eq!(
        ids(&app.get(&format!("/v1/orgs/{org}/scopes"), &admin).await).len(),
        4
    );
    app.grant(&admin, &org, "nobody", "encryption:view", Some(&team))
        .await;
    let listed = app
        .get(&format!("/v1/orgs/{org}/scopes?q=research"), &member)
        .await;
    let mut expected = vec![team, thread];
    expected.sort();
    assert_eq!(ids(&listed), expected);
    assert!(!ids(&listed).contains(&other));
    app.stop().await;
}
on_both_backends!(list_scopes_is_empty_when_the_member_has_no_grant);

/// Once the organization itself is revoked, every command on it or below it is refused and
/// records nothing.
async fn org_commands_are_refused_when_the_org_is_revoked(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let (org, admin) = app.data_org("enterprise", "managed").await;
    let team = app.scope(&admin, "team", "t", &org).await;
    let token_id = app
        .post(
            &format!("/v1/orgs/{org}/tokens"),
            &admin,
            json!({"principal": "svc", "role": "member"}),
        )
        .await
        .str("id");
    app.grant(&admin, &org, "svc", "encryption:view", None)
        .await;
    let sealed = encrypt(&app, &admin, &team).await.str("ciphertext");
    let revoked = app.revoke(&admin, &org).await;
    assert_eq!(revoked.status, StatusCode::OK, "{}", revoked.body);
    app.rekeyer.run_pending().await.unwrap();
    let before = app.db.event_count().await.unwrap();

    let mut requests: Vec<(&str, String, Option<Value>)> = vec![
        (
            "PUT",
            format!("/v1/orgs/{org}/tier"),
            Some(json!({"tier": "default"})),
        ),
        (
            "PUT",
            format!("/v1/orgs/{org}/master-key"),
            Some(json!({"provider": "local"})),
        ),
        (
            "POST",
            format!("/v1/orgs/{org}/tokens"),
            Some(json!({"principal": "late", "role": "member"})),
        ),
        ("DELETE", format!("/v1/orgs/{org}/tokens/{token_id}"), None),
        (
            "POST",
            format!("/v1/orgs/{org}/grants"),
            Some(json!({"principal": "svc", "permission": "audit:read"})),
        ),
        (
            "DELETE",
            format!("/v1/orgs/{org}/grants/svc/encryption:view"),
            None,
        ),
    ];
    requests.extend(scope_requests(&org, &sealed));
    requests.extend(scope_requests(&team, &sealed));
    let mut answers = vec![];
    for (method, path, body) in requests {
        let response = app.call(method, &path, Some(&admin), body).await;
        // Reads may answer (the history stays readable); nothing else may succeed.
        if method == "GET" {
            assert_eq!(response.status, StatusCode::OK, "{method} {path}");
            continue;
        }
        assert!(
            response.status.is_client_error(),
            "{method} {path}: {} {}",
            response.status,
            response.body
        );
        assert_eq!(response.content_type, "application/problem+json");
        answers.push(format!("{method} {path}: {}", response.body["code"]));
    }
    assert_eq!(
        app.db.event_count().await.unwrap(),
        before,
        "something was recorded on a revoked organization: {answers:#?}"
    );
    app.stop().await;
}
on_both_backends!(org_commands_are_refused_when_the_org_is_revoked);

/// ADR 0003: a child whose creation read its parent as active while an ancestor was being
/// revoked lands under a revoked ancestor. Either its creation is refused and records
/// nothing, or it is born revoked: it refuses every command, and once the re-key job is
/// done no key of it is left. `rekey_first`: the creation commits only after the re-key job
/// finished (found a bug: a fresh wrapping key was made for the revoked team, and the
/// child's keys lived under it).
async fn born_revoked(backend: Backend, rekey_first: bool) {
    let app = TestApp::spawn_with(
        backend,
        crate::harness::Options {
            rekey_in_background: false,
            ..Default::default()
        },
    )
    .await;
    let (org, admin) = app.data_org("enterprise", "managed").await;
    let team = app.scope(&admin, "team", "t", &org).await;
    let team_id = ScopeId::parse(&team).unwrap();
    // The creation reads its parent first (active)...
    let parent = app.app.scope(team_id).await.unwrap().unwrap();
    assert_eq!(parent.effective.as_str(), "active");
    // ...the revoke commits meanwhile...
    let revoked = app
        .app
        .act(
            team_id,
            Action::Revoke {
                confirm: team.clone(),
            },
            &metadata(),
            None,
        )
        .await
        .unwrap();
    assert!(revoked.changed);
    if rekey_first {
        // (A slow creation: the re-key job has finished meanwhile.)
        app.rekeyer.run_pending().await.unwrap();
    }
    // ...then the creation commits, with what it read.
    let created = app
        .app
        .create_scope(
            &parent,
            ScopeKind::Thread,
            ScopeName::parse("late").unwrap(),
            &metadata(),
        )
        .await;
    let child = match created {
        Ok(outcome) => outcome.scope.scope.id.to_string(),
        // Refusing the creation outright is as good: nothing was born. (Since the fix, this
        // is what happens: no new wrapping key is made for a revoked subtree.)
        Err(error) => {
            assert!(
                matches!(
                    error,
                    AppError::Key(KeyError::Revoked { .. })
                        | AppError::Rule(
                            ScopeError::ParentRevoked { .. } | ScopeError::AncestorRevoked { .. }
                        )
                ),
                "{error:?}"
            );
            let events = app.db.events_through(0, i64::MAX, 10_000).await.unwrap();
            assert!(
                events
                    .iter()
                    .all(|e| e.event_type != "ScopeCreated" || !e.payload.contains("\"late\"")),
                "refused ({error:?}) but recorded"
            );
            app.stop().await;
            return;
        }
    };
    let shown = app.get(&format!("/v1/scopes/{child}"), &admin).await;
    assert_eq!(shown.status, StatusCode::OK, "{}", shown.body);
    assert_eq!(shown.body["effective_state"], "revoked", "{}", shown.body);
    assert_eq!(shown.body["cause"]["scope_id"], team.as_str());
    app.rekeyer.run_pending().await.unwrap();
    let before = app.db.event_count().await.unwrap();
    for (method, path, body) in scope_requests(&child, "ekm1.x.1.messages.AAAA") {
        if method == "GET" {
            continue;
        }
        let response = app.call(method, &path, Some(&admin), body).await;
        assert!(
            response.status.is_client_error(),
            "{method} {path}: {} {}",
            response.status,
            response.body
        );
        assert_eq!(response.content_type, "application/problem+json");
    }
    assert_eq!(app.db.event_count().await.unwrap(), before);
    // No key of the child is left, live.
    for table in ["key_material", "wrapping_keys"] {
        let left: i64 = ekm_store::with_read_pool!(&app.db, pool => {
            sqlx::query_scalar(&format!("SELECT COUNT(*) FROM {table} WHERE scope_id = $1"))
                .bind(&child)
                .fetch_one(pool)
                .await
                .unwrap()
        });
        assert_eq!(left, 0, "{table} keeps rows of the child born revoked");
    }
    assert!(app
        .app
        .keys()
        .cached(ScopeId::parse(&child).unwrap())
        .is_none());
    app.stop().await;
}

async fn create_is_born_revoked_when_the_ancestor_is_revoked_meanwhile(backend: Backend) {
    born_revoked(backend, false).await;
}
on_both_backends!(create_is_born_revoked_when_the_ancestor_is_revoked_meanwhile);

async fn create_is_born_revoked_when_the_ancestors_rekey_finished_first(backend: Backend) {
    born_revoked(backend, true).await;
}
on_both_backends!(create_is_born_revoked_when_the_ancestors_rekey_finished_first);

/// The other order of the "born revoked" race: the child's creation (decided while its team
/// was active, answered from memory) commits after the team's revoke but before the runner
/// has applied the revoke. The runner must then shred the child too, not stall on the
/// child's wrapping key that still refers to the team's destroyed epoch. PostgreSQL: the
/// test holds the runner back with a lock on its checkpoint rows (on SQLite the one writer
/// orders the creation and the runner's batches, so the window is the same but cannot be
/// held open from outside).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn create_is_shredded_when_it_commits_between_a_revoke_and_its_projection() {
    let app = TestApp::spawn_with(
        Backend::Postgres,
        crate::harness::Options {
            rekey_in_background: false,
            ..Default::default()
        },
    )
    .await;
    let (org, admin) = app.data_org("enterprise", "managed").await;
    let team = app.scope(&admin, "team", "t", &org).await;
    let sibling = app.scope(&admin, "team", "s", &org).await;
    app.app.refresh().await.unwrap();
    let team_id = ScopeId::parse(&team).unwrap();
    let ekm_store::Db::Postgres(pg) = &app.db else {
        unreachable!()
    };
    let hold = crate::harness::hold_runners(&app.db).await;
    let parent = app.app.scope(team_id).await.unwrap().unwrap();
    let revoking = {
        let app = app.app.clone();
        let team = team.clone();
        tokio::spawn(async move {
            app.act(team_id, Action::Revoke { confirm: team }, &metadata(), None)
                .await
        })
    };
    // The revoke's event is committed (its answer waits for the held runner)...
    loop {
        let events = app.db.events_of(&team).await.unwrap();
        if events.iter().any(|e| e.event_type == "ScopeRevoked") {
            break;
        }
        tokio::task::yield_now().await;
    }
    // ...then the creation, decided on what it read before, commits.
    let created = app
        .app
        .create_scope(
            &parent,
            ScopeKind::Thread,
            ScopeName::parse("late").unwrap(),
            &metadata(),
        )
        .await;
    hold.rollback().await.unwrap();
    let revoked = tokio::time::timeout(std::time::Duration::from_secs(30), revoking)
        .await
        .expect("the revoke is answered once the runner may go on")
        .unwrap()
        .unwrap();
    assert!(revoked.changed);
    app.app.refresh().await.unwrap();
    // The runner went on past both events, and other commands still work.
    let paused = app.pause(&admin, &sibling).await;
    assert_eq!(paused.status, StatusCode::OK, "{}", paused.body);
    // Decided on an active parent and committed before the revoke was applied: born.
    let outcome = created.expect("the creation committed");
    {
        let child = outcome.scope.scope.id.to_string();
        let shown = app.get(&format!("/v1/scopes/{child}"), &admin).await;
        assert_eq!(shown.body["effective_state"], "revoked", "{}", shown.body);
        for table in ["key_material", "wrapping_keys"] {
            let left: i64 =
                sqlx::query_scalar(&format!("SELECT COUNT(*) FROM {table} WHERE scope_id = $1"))
                    .bind(&child)
                    .fetch_one(&pg.pool)
                    .await
                    .unwrap();
            assert_eq!(left, 0, "{table} keeps rows of the child born revoked");
        }
    }
    app.stop().await;
}
