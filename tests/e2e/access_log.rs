//! The data plane's access log (issue 16 §1, ADR 0026): every use recorded, allowed or
//! refused, durable before the answer, read by subtree, never across organizations.

use serde_json::{json, Value};

use crate::harness::{decrypt, encrypt, Backend, Options, TestApp};
use crate::on_both_backends;

async fn access(app: &TestApp, token: &str, query: &str) -> Value {
    let listed = app.get(&format!("/v1/audit/access?{query}"), token).await;
    assert_eq!(listed.status, 200, "{}", listed.body);
    listed.body
}

fn items(page: &Value) -> Vec<Value> {
    page["items"].as_array().cloned().unwrap_or_default()
}

/// The organization's oldest access record, to write variations of it.
async fn first_record(log: &ekm_store::AccessLog, org: &str) -> ekm_store::AccessRecord {
    let filter = ekm_store::AccessFilter {
        org_id: org.to_owned(),
        limit: 1,
        ..Default::default()
    };
    log.query(&filter).await.unwrap()[0].record.clone()
}

/// Raw SQL on the access log's own database (the PostgreSQL one, or `access.db`).
async fn execute(app: &TestApp, sql: &str) -> Result<u64, sqlx::Error> {
    match &app.db {
        ekm_store::Db::Postgres(pg) => {
            Ok(sqlx::query(sql).execute(&pg.pool).await?.rows_affected())
        }
        ekm_store::Db::Sqlite(_) => {
            let ekm_store::DbConfig::Sqlite { path } = &app.config else {
                unreachable!("a SQLite database has a path")
            };
            let path = ekm_store::access_log::sqlite_path(path);
            let mut conn = <sqlx::SqliteConnection as sqlx::Connection>::connect(&format!(
                "sqlite://{}",
                path.display()
            ))
            .await?;
            Ok(sqlx::query(sql).execute(&mut conn).await?.rows_affected())
        }
    }
}

async fn every_use_is_recorded_allowed_or_refused_and_durable_before_the_answer(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let (org, admin) = app.data_org("enterprise", "managed").await;
    let team = app.scope(&admin, "team", "research", &org).await;
    let thread = app.scope(&admin, "thread", "t", &team).await;
    let agent = app.token(&admin, &org, "agent-7", "member").await;
    app.grant(&admin, &org, "agent-7", "data:use", Some(&thread))
        .await;

    let sealed = app
        .post(
            &format!("/v1/scopes/{thread}/encrypt"),
            &agent,
            json!({"plaintext": "aGk=", "class": "messages", "justification": "agent_run"}),
        )
        .await;
    assert_eq!(sealed.status, 200, "{}", sealed.body);
    // Durable: the record is there the moment the answer is, read straight from the log.
    let log = app.app.access_log().expect("an access log");
    let filter = ekm_store::AccessFilter {
        org_id: org.clone(),
        limit: 100,
        ..Default::default()
    };
    let stored = log.query(&filter).await.unwrap();
    assert_eq!(stored.len(), 1, "{stored:?}");
    let record = &stored[0].record;
    assert_eq!(record.operation, "encrypt");
    assert_eq!(record.outcome, "ok");
    assert_eq!(record.principal, "agent-7");
    assert_eq!(record.key_version, Some(1));
    assert_eq!(record.class.as_deref(), Some("messages"));
    assert_eq!(record.justification.as_deref(), Some("agent_run"));
    assert_eq!(record.scope_path, format!("{org}/{team}/{thread}"));
    assert!(!record.token_id.is_empty());
    assert!(!record.request_id.is_empty());

    let ciphertext = sealed.str("ciphertext");
    assert_eq!(
        decrypt(&app, &agent, &thread, &ciphertext, "messages")
            .await
            .status,
        200
    );
    decrypt(&app, &agent, &thread, "not a ciphertext", "messages")
        .await
        .assert_problem(400, "invalid_ciphertext");
    // Not granted on the team: refused, and recorded.
    encrypt(&app, &agent, &team, b"x", "messages")
        .await
        .assert_problem(403, "forbidden");
    app.pause(&admin, &thread).await;
    decrypt(&app, &agent, &thread, &ciphertext, "messages")
        .await
        .assert_problem(409, "scope_paused");
    // A malformed justification is refused; its text is not kept.
    app.post(
        &format!("/v1/scopes/{team}/datakey"),
        &admin,
        json!({"class": "files", "justification": "DROP TABLE"}),
    )
    .await
    .assert_problem(400, "invalid_request");

    let page = access(&app, &admin, "").await;
    let got: Vec<(String, String, String)> = items(&page)
        .iter()
        .map(|i| {
            (
                i["operation"].as_str().unwrap().to_owned(),
                i["outcome"].as_str().unwrap().to_owned(),
                i["scope_id"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let own = |op: &str, outcome: &str, scope: &str| {
        (op.to_owned(), outcome.to_owned(), scope.to_owned())
    };
    assert_eq!(
        got,
        vec![
            own("encrypt", "ok", &thread),
            own("decrypt", "ok", &thread),
            own("decrypt", "invalid_ciphertext", &thread),
            own("encrypt", "forbidden", &team),
            own("decrypt", "scope_paused", &thread),
            own("datakey", "invalid_request", &team),
        ]
    );
    let decrypted = &items(&page)[1];
    assert_eq!(decrypted["key_version"], 1, "the version it opened");
    assert_eq!(decrypted["justification"], Value::Null);
    assert_eq!(items(&page)[5]["justification"], Value::Null);
    for field in [
        "at",
        "org_id",
        "scope_id",
        "principal",
        "token_id",
        "operation",
        "class",
        "key_version",
        "outcome",
        "request_id",
        "source_address",
        "justification",
    ] {
        assert!(
            decrypted.get(field).is_some(),
            "{field} missing: {decrypted}"
        );
    }
    // No key material anywhere in a record.
    assert!(!page.to_string().contains(&ciphertext));

    // Filters.
    let refused = access(&app, &admin, "outcome=scope_paused").await;
    assert_eq!(items(&refused).len(), 1);
    let decrypts = access(&app, &admin, "operation=decrypt&principal=agent-7").await;
    assert_eq!(items(&decrypts).len(), 3);
    app.get("/v1/audit/access?operation=sign", &admin)
        .await
        .assert_problem(400, "invalid_request");
    app.get("/v1/audit/access?colour=red", &admin)
        .await
        .assert_problem(400, "invalid_request");
    app.stop().await;
}
on_both_backends!(every_use_is_recorded_allowed_or_refused_and_durable_before_the_answer);

async fn a_subtree_reads_its_own_records_and_an_organization_never_sees_another(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let (org, admin) = app.data_org("enterprise", "managed").await;
    let research = app.scope(&admin, "team", "research", &org).await;
    let sales = app.scope(&admin, "team", "sales", &org).await;
    let thread = app.scope(&admin, "thread", "t", &research).await;
    let deal = app.scope(&admin, "thread", "d", &sales).await;
    for scope in [&thread, &deal, &research] {
        assert_eq!(
            encrypt(&app, &admin, scope, b"x", "messages").await.status,
            200
        );
    }

    // scope= covers the subtree.
    let page = access(&app, &admin, &format!("scope={research}")).await;
    let scopes: Vec<String> = items(&page)
        .iter()
        .map(|i| i["scope_id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(scopes, vec![thread.clone(), research.clone()]);

    // A subtree auditor reads its subtree only.
    let auditor = app.token(&admin, &org, "auditor", "member").await;
    app.grant(&admin, &org, "auditor", "audit:read", Some(&research))
        .await;
    assert_eq!(
        items(&access(&app, &auditor, &format!("scope={thread}")).await).len(),
        1
    );
    app.get("/v1/audit/access", &auditor)
        .await
        .assert_problem(403, "forbidden");
    app.get(&format!("/v1/audit/access?scope={sales}"), &auditor)
        .await
        .assert_problem(403, "forbidden");
    let summary = app
        .get(&format!("/v1/scopes/{research}/access-summary"), &auditor)
        .await;
    assert_eq!(summary.status, 200, "{}", summary.body);
    assert_eq!(
        summary.body["items"],
        json!([{"principal": items(&page)[0]["principal"], "operation": "encrypt",
                "outcome": "ok", "key_version": 1, "count": 2}])
    );

    // Another organization's admin probing this one's thread: refused, recorded in the
    // prober's own log without this organization's path, and absent from this one's.
    let (other_org, other_admin) = app.data_org("enterprise", "managed").await;
    encrypt(&app, &other_admin, &thread, b"x", "messages")
        .await
        .assert_problem(404, "not_found");
    let theirs = items(&access(&app, &other_admin, "").await);
    assert_eq!(theirs.len(), 1);
    assert_eq!(theirs[0]["org_id"], json!(other_org));
    assert_eq!(theirs[0]["outcome"], "not_found");
    let stored = app
        .app
        .access_log()
        .unwrap()
        .query(&ekm_store::AccessFilter {
            org_id: other_org.clone(),
            limit: 10,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(
        stored[0].record.scope_path, "",
        "no path of another organization"
    );
    assert_eq!(items(&access(&app, &admin, "").await).len(), 3);
    app.get(&format!("/v1/audit/access?org={org}"), &other_admin)
        .await
        .assert_problem(404, "not_found");
    app.get(&format!("/v1/scopes/{thread}/access-summary"), &other_admin)
        .await
        .assert_problem(404, "not_found");
    app.stop().await;
}
on_both_backends!(a_subtree_reads_its_own_records_and_an_organization_never_sees_another);

async fn pages_and_exports_hold_every_record_once(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let (org, admin) = app.data_org("enterprise", "managed").await;
    let thread = app.scope(&admin, "thread", "t", &org).await;
    for _ in 0..7 {
        assert_eq!(
            encrypt(&app, &admin, &thread, b"x", "messages")
                .await
                .status,
            200
        );
    }
    let mut seen = vec![];
    let mut cursor: Option<String> = None;
    loop {
        let query = match &cursor {
            Some(c) => format!("limit=3&cursor={c}"),
            None => "limit=3".to_owned(),
        };
        let page = access(&app, &admin, &query).await;
        seen.extend(items(&page).iter().map(|i| i["request_id"].clone()));
        match page["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => break,
        }
    }
    assert_eq!(seen.len(), 7);
    // A cursor belongs to its query.
    let first = access(&app, &admin, "limit=3").await;
    let next = first["next_cursor"].as_str().unwrap();
    app.get(
        &format!("/v1/audit/access?operation=decrypt&cursor={next}"),
        &admin,
    )
    .await
    .assert_problem(400, "invalid_request");

    // `ekm audit access`, a client of the running server.
    let cli = std::process::Command::new(env!("CARGO_BIN_EXE_ekm"))
        .args(["audit", "access", "--url", &app.base, "--format", "csv"])
        .args(["--scope", &thread, "--operation", "encrypt"])
        .env("EKM_TOKEN", &admin)
        .output()
        .unwrap();
    assert!(
        cli.status.success(),
        "{}",
        String::from_utf8_lossy(&cli.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&cli.stdout).lines().count(), 8);
    let refused = std::process::Command::new(env!("CARGO_BIN_EXE_ekm"))
        .args(["audit", "access", "--url", &app.base, "--operation", "sign"])
        .env("EKM_TOKEN", &admin)
        .output()
        .unwrap();
    assert_eq!(refused.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("invalid_request"));

    let csv = app.get("/v1/audit/access/export?format=csv", &admin).await;
    assert_eq!(csv.status, 200);
    let text = csv.body.as_str().expect("CSV text").to_owned();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 8, "{text}");
    assert!(lines[0].starts_with("at,org_id,scope_id,principal"));
    let jsonl = app.get("/v1/audit/access/export", &admin).await;
    assert_eq!(jsonl.status, 200);
    let parsed: Vec<Value> = jsonl
        .body
        .as_str()
        .expect("JSON Lines text")
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
        .collect();
    assert_eq!(parsed.len(), 7);
    assert!(parsed.iter().all(|r| r["operation"] == "encrypt"));
    app.stop().await;
}
on_both_backends!(pages_and_exports_hold_every_record_once);

async fn a_use_that_cannot_be_recorded_is_not_served(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let (org, admin) = app.data_org("enterprise", "managed").await;
    let thread = app.scope(&admin, "thread", "t", &org).await;
    let sealed = encrypt(&app, &admin, &thread, b"secret", "messages").await;
    assert_eq!(sealed.status, 200);

    // The log refuses writes (a full disk, a lost table): the data plane refuses to serve.
    let refuse = match backend {
        Backend::Postgres => vec![
            "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS \
             $$ BEGIN RAISE EXCEPTION 'no room'; END $$",
            "CREATE TRIGGER refuse BEFORE INSERT ON access_log FOR EACH ROW EXECUTE FUNCTION refuse()",
        ],
        Backend::Sqlite => vec![
            "CREATE TRIGGER refuse BEFORE INSERT ON access_log BEGIN SELECT RAISE(ABORT, 'no room'); END",
        ],
    };
    for sql in &refuse {
        execute(&app, sql).await.unwrap();
    }
    let refused = decrypt(&app, &admin, &thread, &sealed.str("ciphertext"), "messages").await;
    refused.assert_problem(503, "unavailable");
    assert!(refused.body.get("plaintext").is_none(), "{}", refused.body);
    // Back: served and recorded again.
    execute(&app, "DROP TRIGGER refuse ON access_log")
        .await
        .or(execute(&app, "DROP TRIGGER refuse").await)
        .unwrap();
    assert_eq!(
        decrypt(&app, &admin, &thread, &sealed.str("ciphertext"), "messages")
            .await
            .status,
        200
    );
    let outcomes: Vec<Value> = items(&access(&app, &admin, "").await)
        .iter()
        .map(|i| json!([i["operation"], i["outcome"]]))
        .collect();
    assert_eq!(
        outcomes,
        vec![json!(["encrypt", "ok"]), json!(["decrypt", "ok"])]
    );

    // Append-only, on both backends.
    assert!(execute(&app, "UPDATE access_log SET outcome = 'ok'")
        .await
        .is_err());
    if backend == Backend::Postgres {
        assert!(execute(&app, "DELETE FROM access_log").await.is_err());
    }
    app.stop().await;
}
on_both_backends!(a_use_that_cannot_be_recorded_is_not_served);

async fn async_mode_answers_first_and_writes_every_record(backend: Backend) {
    let app = TestApp::spawn_with(
        backend,
        Options {
            access_log: ekm_store::AccessLogMode::Async,
            ..Options::default()
        },
    )
    .await;
    let (org, admin) = app.data_org("enterprise", "managed").await;
    let thread = app.scope(&admin, "thread", "t", &org).await;
    let mut written = app.app.access_log().unwrap().written();
    for _ in 0..20 {
        assert_eq!(
            encrypt(&app, &admin, &thread, b"x", "messages")
                .await
                .status,
            200
        );
    }
    written.wait_for(|n| *n >= 20).await.unwrap();
    assert_eq!(items(&access(&app, &admin, "limit=100").await).len(), 20);
    app.stop().await;
}
on_both_backends!(async_mode_answers_first_and_writes_every_record);

/// Retention on PostgreSQL drops whole months, never fewer than 30 days, and only as the
/// function allows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_retention_drops_whole_old_partitions() {
    let app = TestApp::spawn(Backend::Postgres).await;
    let (org, admin) = app.data_org("enterprise", "managed").await;
    let thread = app.scope(&admin, "thread", "t", &org).await;
    assert_eq!(
        encrypt(&app, &admin, &thread, b"x", "messages")
            .await
            .status,
        200
    );
    // A month two years ago, with one record in it.
    execute(
        &app,
        "CREATE TABLE access_log_2024_01 PARTITION OF access_log \
         FOR VALUES FROM ('2024-01-01 00:00:00+00') TO ('2024-02-01 00:00:00+00')",
    )
    .await
    .unwrap();
    let log = app.app.access_log().unwrap();
    let old = ekm_store::AccessRecord {
        at: "2024-01-15T12:00:00Z".parse().unwrap(),
        org_id: org.clone(),
        scope_id: thread.clone(),
        scope_path: format!("{org}/{thread}"),
        principal: "old".into(),
        token_id: "t".into(),
        operation: "decrypt".into(),
        class: None,
        key_version: Some(1),
        outcome: "ok".into(),
        request_id: "r".into(),
        source_address: None,
        justification: None,
    };
    log.record(old).await.unwrap();
    let before = items(&access(&app, &admin, "").await);
    assert_eq!(before.len(), 2);

    // Fewer than 30 days is refused by the function itself (the server's role runs it).
    let ekm_store::Db::Postgres(pg) = &app.db else {
        unreachable!()
    };
    let short = sqlx::query("SELECT access_log_maintain(1)")
        .execute(&pg.pool)
        .await;
    assert!(short.unwrap_err().to_string().contains("at least 30 days"));
    assert_eq!(log.maintain(400).await.unwrap(), 1, "the 2024-01 partition");
    let left = items(&access(&app, &admin, "").await);
    assert_eq!(left.len(), 1);
    assert_eq!(left[0], before[0], "this month's record stays");
    // The coming months' partitions exist.
    let months: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_inherits WHERE inhparent = 'access_log'::regclass",
    )
    .fetch_one(&pg.pool)
    .await
    .unwrap();
    assert!(months >= 4, "default and three months: {months}");
    app.stop().await;
}

/// The access log has the same columns, in the same order and nullability, on PostgreSQL
/// (migration 0016) and in SQLite's `access.db`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_backends_keep_the_same_access_log_columns() {
    let sqlite = TestApp::spawn(Backend::Sqlite).await;
    let postgres = TestApp::spawn(Backend::Postgres).await;
    let ekm_store::DbConfig::Sqlite { path } = &sqlite.config else {
        unreachable!()
    };
    let mut conn = <sqlx::SqliteConnection as sqlx::Connection>::connect(&format!(
        "sqlite://{}",
        ekm_store::access_log::sqlite_path(path).display()
    ))
    .await
    .unwrap();
    let ours: Vec<(String, bool)> = sqlx::query_as(
        "SELECT name, \"notnull\" = 0 AND pk = 0 FROM pragma_table_info('access_log') ORDER BY cid",
    )
    .fetch_all(&mut conn)
    .await
    .unwrap();
    let ekm_store::Db::Postgres(pg) = &postgres.db else {
        unreachable!()
    };
    let theirs: Vec<(String, bool)> = sqlx::query_as(
        "SELECT column_name::text, is_nullable = 'YES' FROM information_schema.columns \
         WHERE table_schema = 'public' AND table_name = 'access_log' ORDER BY ordinal_position",
    )
    .fetch_all(&pg.pool)
    .await
    .unwrap();
    assert_eq!(ours.len(), 17);
    assert_eq!(ours, theirs);
    sqlite.stop().await;
    postgres.stop().await;
}

/// Records are sealed per organization in their writer's chain: an altered, removed or
/// moved record is found by `GET /v1/audit/verify` and names the record.
async fn verification_finds_an_altered_or_removed_record(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let (org, admin) = app.data_org("enterprise", "managed").await;
    let thread = app.scope(&admin, "thread", "t", &org).await;
    for _ in 0..5 {
        assert_eq!(
            encrypt(&app, &admin, &thread, b"x", "messages")
                .await
                .status,
            200
        );
    }
    let verify = || async {
        let verified = app
            .get(&format!("/v1/audit/verify?org={org}"), &admin)
            .await;
        assert_eq!(verified.status, 200, "{}", verified.body);
        verified.body
    };
    let clean = verify().await;
    assert_eq!(clean["ok"], true, "{clean}");
    assert_eq!(clean["access_log"]["records"], 5);
    let ids: Vec<i64> = app
        .app
        .access_log()
        .unwrap()
        .query(&ekm_store::AccessFilter {
            org_id: org.clone(),
            limit: 10,
            ..Default::default()
        })
        .await
        .unwrap()
        .iter()
        .map(|e| e.id)
        .collect();

    // Someone with write access to the database, past the guards.
    let unguard = match backend {
        Backend::Postgres => "ALTER TABLE access_log DISABLE TRIGGER USER",
        Backend::Sqlite => "DROP TRIGGER access_log_no_update",
    };
    execute(&app, unguard).await.unwrap();
    execute(
        &app,
        &format!(
            "UPDATE access_log SET outcome = 'scope_paused' WHERE id = {}",
            ids[3]
        ),
    )
    .await
    .unwrap();
    let altered = verify().await;
    // The command line, straight on the database, says the same and exits 1.
    let cli = app
        .ekm(&["audit", "verify", "--org", &org])
        .output()
        .unwrap();
    let printed = String::from_utf8_lossy(&cli.stdout);
    assert_eq!(cli.status.code(), Some(1), "{printed}");
    assert!(
        printed.contains(&format!("access log record {}: altered", ids[3])),
        "{printed}"
    );
    assert_eq!(altered["ok"], false);
    assert_eq!(altered["access_log"]["first_failure"]["problem"], "altered");
    assert_eq!(altered["access_log"]["first_failure"]["id"], ids[3]);

    execute(
        &app,
        &format!(
            "DELETE FROM access_log WHERE id IN ({}, {})",
            ids[1], ids[3]
        ),
    )
    .await
    .unwrap();
    let removed = verify().await;
    assert_eq!(removed["access_log"]["first_failure"]["problem"], "missing");
    assert_eq!(removed["access_log"]["first_failure"]["id"], ids[2]);
    assert_eq!(removed["ok"], false);
    app.stop().await;
}
on_both_backends!(verification_finds_an_altered_or_removed_record);

/// Retention on SQLite removes the months that ended before the retention began, whole (so
/// that what remains still verifies), and keeps the rest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_retention_removes_whole_old_months() {
    let app = TestApp::spawn(Backend::Sqlite).await;
    let (org, admin) = app.data_org("enterprise", "managed").await;
    let thread = app.scope(&admin, "thread", "t", &org).await;
    assert_eq!(
        encrypt(&app, &admin, &thread, b"x", "messages")
            .await
            .status,
        200
    );
    let log = app.app.access_log().unwrap();
    for at in ["2024-01-15T12:00:00Z", "2024-01-20T12:00:00Z"] {
        let mut old = first_record(log, &org).await;
        old.at = at.parse().unwrap();
        log.record(old).await.unwrap();
    }
    assert_eq!(items(&access(&app, &admin, "").await).len(), 3);
    assert_eq!(log.maintain(400).await.unwrap(), 2);
    assert_eq!(items(&access(&app, &admin, "").await).len(), 1);
    let verified = app
        .get(&format!("/v1/audit/verify?org={org}"), &admin)
        .await;
    assert_eq!(verified.body["ok"], true, "{}", verified.body);
    app.stop().await;
}

/// A client's bytes that a database cannot store (a NUL) never reach a record, nor a query;
/// and a record the database refuses all the same is dropped alone, never taking its batch
/// (other organizations' uses) down with it, in either mode.
async fn what_the_database_cannot_store_takes_no_use_down(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let (org, admin) = app.data_org("enterprise", "managed").await;
    let thread = app.scope(&admin, "thread", "t", &org).await;
    app.post(
        &format!("/v1/scopes/{thread}/encrypt"),
        &admin,
        json!({"plaintext": "eA==", "class": "\u{0}"}),
    )
    .await
    .assert_problem(400, "invalid_request");
    assert_eq!(
        encrypt(&app, &admin, &thread, b"x", "messages")
            .await
            .status,
        200
    );
    let listed = items(&access(&app, &admin, "").await);
    assert_eq!(listed.len(), 2);
    assert_eq!(listed[0]["class"], Value::Null, "no class that is not one");
    app.get("/v1/audit/access?principal=%00", &admin)
        .await
        .assert_problem(400, "invalid_request");
    app.get("/v1/audit/access?outcome=a%0Ab", &admin)
        .await
        .assert_problem(400, "invalid_request");

    if backend == Backend::Postgres {
        let log = app.app.access_log().unwrap();
        let good = first_record(log, &org).await;
        let mut bad = good.clone();
        bad.principal = "nul\u{0}byte".into();
        // Queued together: the writer takes them in one batch or more; either way the good
        // ones are written and answered, the bad one refused.
        let (bad_answer, good_answers) = tokio::join!(
            log.record(bad),
            futures_util::future::join_all((0..20).map(|_| log.record(good.clone())))
        );
        assert!(bad_answer.is_err());
        assert!(good_answers.iter().all(Result::is_ok), "{good_answers:?}");
        assert_eq!(items(&access(&app, &admin, "limit=100").await).len(), 22);
        let verified = app
            .get(&format!("/v1/audit/verify?org={org}"), &admin)
            .await;
        assert_eq!(verified.body["ok"], true, "{}", verified.body);
        // Nobody, not even the owner's TRUNCATE on a partition by name, empties it.
        for table in ["access_log", "access_log_default"] {
            assert!(execute(&app, &format!("TRUNCATE {table}")).await.is_err());
        }
        let month = chrono::Utc::now().format("access_log_%Y_%m").to_string();
        assert!(execute(&app, &format!("TRUNCATE {month}")).await.is_err());
    }
    app.stop().await;
}
on_both_backends!(what_the_database_cannot_store_takes_no_use_down);

/// In async mode a record the database refuses is dropped (logged), and the ones after it
/// are written: the writer never retries it forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn async_mode_drops_a_refused_record_and_writes_the_rest() {
    let app = TestApp::spawn_with(
        Backend::Postgres,
        Options {
            access_log: ekm_store::AccessLogMode::Async,
            ..Options::default()
        },
    )
    .await;
    let (org, admin) = app.data_org("enterprise", "managed").await;
    let thread = app.scope(&admin, "thread", "t", &org).await;
    assert_eq!(
        encrypt(&app, &admin, &thread, b"x", "messages")
            .await
            .status,
        200
    );
    let log = app.app.access_log().unwrap();
    let mut written = log.written();
    written.wait_for(|n| *n >= 1).await.unwrap();
    let good = first_record(log, &org).await;
    let mut bad = good.clone();
    bad.request_id = "nul\u{0}".into();
    log.record(bad).await.unwrap();
    for _ in 0..5 {
        log.record(good.clone()).await.unwrap();
    }
    // Every record settles (the bad one dropped), and the good ones are in the log.
    written.wait_for(|n| *n >= 7).await.unwrap();
    assert_eq!(items(&access(&app, &admin, "limit=100").await).len(), 6);
    app.stop().await;
}

/// What the seals alone cannot show, the auditor's head file does: the newest records cut
/// off (or a stream removed whole) after a verification pinned them.
async fn a_head_file_finds_records_cut_from_the_end(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let (org, admin) = app.data_org("enterprise", "managed").await;
    let thread = app.scope(&admin, "thread", "t", &org).await;
    for _ in 0..3 {
        assert_eq!(
            encrypt(&app, &admin, &thread, b"x", "messages")
                .await
                .status,
            200
        );
    }
    let heads = app.data_dir().join("auditor-heads.json");
    let heads_arg = heads.to_str().unwrap();
    let first = app
        .ekm(&["audit", "verify", "--org", &org, "--head-file", heads_arg])
        .output()
        .unwrap();
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stdout)
    );
    let pinned = std::fs::read_to_string(&heads).unwrap();
    assert!(pinned.contains("\"access\""), "{pinned}");

    // The newest record removed, past the guards: the chain that is left is whole.
    let unguard = match backend {
        Backend::Postgres => "ALTER TABLE access_log DISABLE TRIGGER USER",
        Backend::Sqlite => "SELECT 1",
    };
    execute(&app, unguard).await.unwrap();
    execute(
        &app,
        "DELETE FROM access_log WHERE id = (SELECT max(id) FROM access_log)",
    )
    .await
    .unwrap();
    let without_pins = app
        .get(&format!("/v1/audit/verify?org={org}"), &admin)
        .await;
    assert_eq!(
        without_pins.body["access_log"]["ok"], true,
        "seals alone cannot tell"
    );
    let second = app
        .ekm(&["audit", "verify", "--org", &org, "--head-file", heads_arg])
        .output()
        .unwrap();
    let printed = String::from_utf8_lossy(&second.stdout);
    assert_eq!(second.status.code(), Some(1), "{printed}");
    assert!(printed.contains("truncated"), "{printed}");
    // The access pins stay as they were: the evidence is kept for the next run. (The event
    // chain's head may move on: it verified.)
    let access_pins = |text: &str| serde_json::from_str::<Value>(text).unwrap()["access"].clone();
    assert_eq!(
        access_pins(&std::fs::read_to_string(&heads).unwrap()),
        access_pins(&pinned)
    );
    app.stop().await;
}
on_both_backends!(a_head_file_finds_records_cut_from_the_end);

/// A fault that is not about a record's content (here a trigger standing for a full disk)
/// loses nothing in async mode: the records wait and are written once it is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn async_mode_keeps_records_through_a_database_fault() {
    let app = TestApp::spawn_with(
        Backend::Postgres,
        Options {
            access_log: ekm_store::AccessLogMode::Async,
            ..Options::default()
        },
    )
    .await;
    let (org, admin) = app.data_org("enterprise", "managed").await;
    let thread = app.scope(&admin, "thread", "t", &org).await;
    let log = app.app.access_log().unwrap();
    let mut written = log.written();
    assert_eq!(
        encrypt(&app, &admin, &thread, b"x", "messages")
            .await
            .status,
        200
    );
    written.wait_for(|n| *n >= 1).await.unwrap();
    execute(
        &app,
        "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS \
         $$ BEGIN RAISE EXCEPTION 'no room'; END $$",
    )
    .await
    .unwrap();
    execute(
        &app,
        "CREATE TRIGGER refuse BEFORE INSERT ON access_log FOR EACH ROW EXECUTE FUNCTION refuse()",
    )
    .await
    .unwrap();
    for _ in 0..5 {
        assert_eq!(
            encrypt(&app, &admin, &thread, b"x", "messages")
                .await
                .status,
            200
        );
    }
    execute(&app, "DROP TRIGGER refuse ON access_log")
        .await
        .unwrap();
    written.wait_for(|n| *n >= 6).await.unwrap();
    assert_eq!(items(&access(&app, &admin, "limit=100").await).len(), 6);
    let verified = app
        .get(&format!("/v1/audit/verify?org={org}"), &admin)
        .await;
    assert_eq!(verified.body["ok"], true, "{}", verified.body);
    app.stop().await;
}

/// Pins of months that retention removed are no cut; a removed access.db is one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_head_file_tells_retention_from_a_cut() {
    let app = TestApp::spawn(Backend::Sqlite).await;
    let (org, admin) = app.data_org("enterprise", "managed").await;
    let thread = app.scope(&admin, "thread", "t", &org).await;
    assert_eq!(
        encrypt(&app, &admin, &thread, b"x", "messages")
            .await
            .status,
        200
    );
    let log = app.app.access_log().unwrap();
    let mut old = first_record(log, &org).await;
    old.at = chrono::Utc::now() - chrono::Duration::days(500);
    log.record(old).await.unwrap();
    let heads = app.data_dir().join("auditor-heads.json");
    let heads_arg = heads.to_str().unwrap();
    let data_dir = app.data_dir().to_owned();
    let verify = || {
        std::process::Command::new(env!("CARGO_BIN_EXE_ekm"))
            .args(["audit", "verify", "--org", &org, "--head-file", heads_arg])
            .arg("--data-dir")
            .arg(&data_dir)
            .env_remove("EKM_DATABASE_URL")
            .output()
            .unwrap()
    };
    let pinned = verify();
    assert!(
        pinned.status.success(),
        "{}",
        String::from_utf8_lossy(&pinned.stdout)
    );
    assert_eq!(log.maintain(400).await.unwrap(), 1);
    let after_retention = verify();
    assert!(
        after_retention.status.success(),
        "{}",
        String::from_utf8_lossy(&after_retention.stdout)
    );

    let ekm_store::DbConfig::Sqlite { path } = &app.config else {
        unreachable!()
    };
    let file = ekm_store::access_log::sqlite_path(path);
    // The data directory stays (the audit key with it) while the server is gone.
    let _kept = app.stop_keeping_database().await;
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", file.display()));
    }
    let gone = verify();
    let printed = String::from_utf8_lossy(&gone.stdout);
    assert_eq!(gone.status.code(), Some(1), "{printed}");
    assert!(
        printed.contains("truncated"),
        "{printed} {}",
        String::from_utf8_lossy(&gone.stderr)
    );
}
