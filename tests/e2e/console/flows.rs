//! The user stories in a real browser: pause and revoke with their blast radius, a master
//! key connected step by step, and a team viewer's read-only view.

use super::*;

/// Sign in, pause a team and see its threads paused with the cause, resume, fail to revoke
/// without the name, revoke with it, filter the audit log and verify it; all through the
/// page, with only the API creating the organization and its scopes.
async fn console_pauses_and_revokes_when_driven_in_a_real_browser(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let (org, admin) = app.org_with("enterprise", "managed").await;
    let team = app.scope(&admin, "team", "research", &org).await;
    let launch = app.scope(&admin, "thread", "launch plans", &team).await;
    app.scope(&admin, "thread", "hiring", &team).await;
    app.scope(&admin, "team", "sales", &org).await;

    let driver = Driver::start();
    let page = Page {
        client: driver.browser().await,
        name: match backend {
            Backend::Sqlite => "sqlite",
            Backend::Postgres => "postgres",
        },
    };
    let c = &page.client;

    // Sign in with the keyboard: the token typed, Enter submits.
    c.goto(&format!("{}/console", app.base)).await.unwrap();
    page.wait_true("the script ran", "document.body.dataset.ready === 'true'")
        .await;
    page.screenshot("01-sign-in").await;
    page.type_into("#token", "not-a-token\u{E007}").await;
    page.wait_text("#signin-form .form-error", &["not accepted"])
        .await;
    page.type_into("#token", &format!("{admin}\u{E007}")).await;
    page.wait_text(&format!("{} > .row .select", node(&team)), &["research"])
        .await;
    page.wait_text("#who", &["Acme", "admin", "org_admin"])
        .await;
    // The token is in this tab's session storage, never in the address.
    assert_eq!(
        page.eval("sessionStorage.getItem('ekm.token')").await,
        json!(admin)
    );
    let url = c.current_url().await.unwrap();
    assert!(!url.as_str().contains(&admin), "{url}");

    // Open the team: its threads appear, active.
    page.click(&format!("{} > .row .toggle", node(&team))).await;
    page.wait_text(
        &format!("{} > .row", node(&launch)),
        &["launch plans", "effective: active"],
    )
    .await;
    page.screenshot("02-tree").await;

    // Find by name, then back to the tree.
    page.type_into("#search-q", "PLAN").await;
    page.click("#search-button").await;
    page.wait_text("#search-list", &["launch plans"]).await;
    let found = page
        .eval("document.querySelectorAll('#search-list > li').length")
        .await;
    assert_eq!(found, json!(1));
    page.click("#search-clear").await;

    // Pause the team: the blast radius first, then the reason.
    page.click(&format!("{} > .row .select", node(&team))).await;
    page.wait_text("#detail-title", &["team research"]).await;
    page.click("#detail-actions [data-action=pause]").await;
    page.wait_text("#action-impact", &["3 (1 team, 2 threads)"])
        .await;
    page.screenshot("03-pause-blast-radius").await;
    page.type_into("#action-reason", "investigation 4711").await;
    page.click("#action-submit").await;
    let cause = page
        .wait_text(
            &format!("{} > .cause", node(&launch)),
            &["paused by team research", "by admin", "investigation 4711"],
        )
        .await;
    assert!(cause.contains("UTC"), "{cause}");
    page.wait_text(
        &format!("{} > .row", node(&launch)),
        &["own: active", "effective: paused"],
    )
    .await;
    page.screenshot("04-team-paused").await;
    let thread = app.get(&format!("/v1/scopes/{launch}"), &admin).await;
    assert_eq!(thread.body["effective_state"], "paused");

    // Resume: the threads are active again, with no cause.
    page.click("#detail-actions [data-action=resume]").await;
    page.type_into("#action-reason", "investigation closed")
        .await;
    page.click("#action-submit").await;
    page.wait_text(&format!("{} > .row", node(&launch)), &["effective: active"])
        .await;
    page.wait_true(
        "the cause is gone",
        &format!(
            "!document.querySelector('{} > .cause')",
            node(&launch).replace('\'', "\\'")
        ),
    )
    .await;

    // Revoke without typing the name: refused, nothing revoked.
    page.click("#detail-actions [data-action=revoke]").await;
    page.wait_text("#revoke-warning", &["irreversible", "pause instead"])
        .await;
    page.wait_text("#action-impact", &["Would become inactive: 3"])
        .await;
    page.type_into("#action-reason", "project closed").await;
    page.click("#action-submit").await;
    page.wait_text(
        "#action-form .form-error",
        &["does not match", "Nothing was revoked"],
    )
    .await;
    page.screenshot("05-revoke-refused").await;
    let still = app.get(&format!("/v1/scopes/{team}"), &admin).await;
    assert_eq!(still.body["own_state"], "active", "{}", still.body);

    // With the name typed: pending for the organization's window, with a countdown and a
    // way back; the threads say why and until when.
    page.wait_text("#revoke-window", &["pending until", "can be cancelled"])
        .await;
    page.type_into("#action-confirm", "research").await;
    page.click("#action-submit").await;
    page.wait_text(
        &format!("{} > .cause", node(&launch)),
        &["pending_revocation by team research", "unless cancelled"],
    )
    .await;
    page.wait_text(
        "#revocation-countdown",
        &["Revoked for good in 6 d 23 h", "unless"],
    )
    .await;
    page.screenshot("06a-revocation-pending").await;
    let pending = app.get(&format!("/v1/scopes/{team}"), &admin).await;
    assert_eq!(
        pending.body["own_state"], "pending_revocation",
        "{}",
        pending.body
    );
    // Revoking it again can only be immediate; closed without submitting.
    page.click("#detail-actions [data-action=revoke]").await;
    page.wait_text("#revoke-window", &["already pending", "without waiting"])
        .await;
    page.wait_true(
        "only an immediate revoke is offered",
        "document.querySelector('#revoke-immediately').checked && document.querySelector('#revoke-immediately').disabled",
    )
    .await;
    page.wait_text("#action-impact", &["Would become inactive"])
        .await;
    page.click("#action-cancel").await;
    page.click("#detail-actions [data-action=cancel-revocation]")
        .await;
    page.type_into("#action-reason", "wrong team").await;
    page.click("#action-submit").await;
    page.wait_true(
        "the countdown is gone",
        "document.querySelector('#revocation-countdown').hidden",
    )
    .await;
    let back = app.get(&format!("/v1/scopes/{team}"), &admin).await;
    assert_eq!(back.body["own_state"], "active", "{}", back.body);

    // Revoked immediately, in an emergency: revoked, and the threads say why.
    page.click("#detail-actions [data-action=revoke]").await;
    page.wait_text("#action-impact", &["Would become inactive: 3"])
        .await;
    page.type_into("#action-reason", "project closed").await;
    page.type_into("#action-confirm", "research").await;
    page.click("#revoke-immediately").await;
    page.click("#action-submit").await;
    page.wait_text(
        &format!("{} > .cause", node(&launch)),
        &["revoked by team research", "project closed"],
    )
    .await;
    page.wait_text(&format!("{} > .row", node(&team)), &["own: revoked"])
        .await;
    page.wait_text("#manage-note", &["Revoked for good"]).await;
    page.wait_true(
        "no action on a revoked scope",
        "[...document.querySelectorAll('#detail-actions button')].every(b => b.disabled)",
    )
    .await;
    page.screenshot("06-revoked").await;

    // Time travel: before the organization existed there was no team; now it is revoked.
    page.eval("(document.getElementById('state-at').value = '2020-01-01T00:00:00', true)")
        .await;
    page.click("#state-at-button").await;
    page.wait_text("#state-at-form .form-error", &["did not exist yet"])
        .await;
    page.eval("(document.getElementById('state-at').value = '2099-01-01T00:00:00', true)")
        .await;
    page.click("#state-at-button").await;
    page.wait_text(
        "#state-at-result",
        &[
            "At 2099-01-01 00:00 UTC",
            "own state revoked",
            "project closed",
        ],
    )
    .await;

    // Every control has a label.
    assert_eq!(
        page.eval(
            "[...document.querySelectorAll('input, select, textarea')]\
             .filter(c => c.labels.length === 0).map(c => c.id)"
        )
        .await,
        json!([])
    );
    let revoked = app.get(&format!("/v1/scopes/{team}"), &admin).await;
    assert_eq!(revoked.body["own_state"], "revoked");

    // The audit log, filtered to pauses: exactly the one pause, by admin, with its reason.
    page.click("[data-view=audit]").await;
    page.wait_text("#audit-rows", &["scope.revoke"]).await;
    page.wait_visible("#audit-action")
        .await
        .select_by_value("scope.pause")
        .await
        .unwrap();
    page.click("#audit-apply").await;
    page.wait_true(
        "only pauses are listed",
        "(() => { const rows = [...document.querySelectorAll('#audit-rows tr')]; \
         return rows.length === 1 && rows.every(r => r.dataset.action === 'scope.pause'); })()",
    )
    .await;
    page.wait_text("#audit-rows tr", &["investigation 4711", "admin"])
        .await;
    page.click("#audit-verify").await;
    page.wait_text("#verify-result", &["Hash chain intact"])
        .await;
    page.screenshot("07-audit").await;
    page.click("#audit-export-csv").await;
    page.wait_text("#status", &["Exported CSV"]).await;

    // The master key: tier and the platform key.
    page.click("[data-view=master-key]").await;
    page.wait_text("#mk-facts", &["managed", "platform key", "available"])
        .await;
    page.screenshot("08-master-key").await;
    page.wait_visible("#tier-select")
        .await
        .select_by_value("default")
        .await
        .unwrap();
    page.type_into("#tier-reason", "fewer classes").await;
    page.click("#tier-submit").await;
    page.wait_text("#status", &["Tier changed to default"])
        .await;
    page.wait_text("#mk-facts", &["default"]).await;

    // At 400% zoom (a 1280 px window seen as 320 CSS px) nothing needs sideways scrolling.
    page.click("[data-view=scopes]").await;
    c.set_window_size(320, 900).await.unwrap();
    page.wait_true(
        "no horizontal scrolling in a narrow window",
        "document.documentElement.scrollWidth <= document.documentElement.clientWidth",
    )
    .await;
    page.screenshot("09-narrow").await;

    // Sign out: the token is forgotten.
    page.click("#sign-out").await;
    page.wait_visible("#signin-form").await;
    assert_eq!(
        page.eval("sessionStorage.getItem('ekm.token')").await,
        json!(null)
    );
    let _ = page.client.close().await;
    drop(driver);
    app.stop().await;
}
on_both_backends!(console_pauses_and_revokes_when_driven_in_a_real_browser);

/// Connecting a customer key from the console: a key that does not exist fails at the
/// "key is enabled" step with the provider's words and what to do; a real key (AWS KMS in a
/// real moto_server) passes every step and the organization's tier becomes `byok`.
async fn console_connects_a_master_key_when_walked_step_by_step(backend: Backend) {
    let moto = crate::kms_servers::Moto::start().await;
    let options = crate::harness::Options {
        kms: ekm_service::keys::KmsOptions {
            settings: ekm_kms::KmsSettings {
                timeout: Duration::from_millis(800),
                attempts: 3,
                backoff: Duration::from_millis(20),
                environment: crate::kms_servers::aws_environment(),
                allowed_endpoints: vec!["http://127.0.0.1:*".into()],
            },
            grace: Duration::from_secs(300),
            platform_key: None,
            breaker: Default::default(),
        },
        ..Default::default()
    };
    let app = TestApp::spawn_with(backend, options).await;
    let (_, admin) = app.org_with("enterprise", "managed").await;

    let driver = Driver::start();
    let page = Page {
        client: driver.browser().await,
        name: match backend {
            Backend::Sqlite => "byok-sqlite",
            Backend::Postgres => "byok-postgres",
        },
    };
    page.client
        .goto(&format!("{}/console", app.base))
        .await
        .unwrap();
    page.type_into("#token", &format!("{admin}\u{E007}")).await;
    page.wait_text("#who", &["org_admin"]).await;
    page.click("[data-view=master-key]").await;
    page.wait_text("#mk-facts", &["managed"]).await;

    let missing = "arn:aws:kms:us-east-1:123456789012:key/00000000-0000-4000-8000-000000000000";
    page.type_into("#mk-key-id", missing).await;
    page.type_into("#mk-endpoint", &moto.url).await;
    page.type_into("#mk-reason", "move to our own key").await;
    page.click("#mk-submit").await;
    page.wait_text("#mk-steps [data-step=credentials]", &["passed"])
        .await;
    page.wait_text(
        "#mk-steps [data-step=describe]",
        &["failed", "NotFoundException"],
    )
    .await;
    page.wait_text("#mk-steps [data-step=encrypt]", &["not run"])
        .await;
    page.wait_text("#mk-remedy", &["What to do", "key id"])
        .await;
    page.wait_text("#mk-form .form-error", &["validation"])
        .await;
    page.screenshot("01-master-key-refused").await;

    let arn = moto.create_key().await;
    page.type_into("#mk-key-id", &arn).await;
    page.click("#mk-submit").await;
    page.wait_text("#mk-steps [data-step=decrypt]", &["passed"])
        .await;
    page.wait_text("#mk-facts", &["byok", "aws-kms", &arn])
        .await;
    page.screenshot("02-master-key-connected").await;
    let _ = page.client.close().await;
    drop(driver);
    app.stop().await;
}
on_both_backends!(console_connects_a_master_key_when_walked_step_by_step);

/// A member who may only view one team sees that team as the root of its tree, nothing
/// else, its children a page at a time, and no action it could not take.
async fn console_shows_only_the_team_and_no_actions_when_the_caller_is_a_team_viewer(
    backend: Backend,
) {
    let app = TestApp::spawn(backend).await;
    let (org, admin) = app.org_with("enterprise", "managed").await;
    let team = app.scope(&admin, "team", "research", &org).await;
    let thread = app.scope(&admin, "thread", "launch plans", &team).await;
    let sales = app.scope(&admin, "team", "sales", &org).await;
    // More children than one page holds.
    for i in 0..54 {
        app.scope(&admin, "thread", &format!("thread {i:02}"), &team)
            .await;
    }
    let viewer = app.token(&admin, &org, "auditor", "member").await;
    app.grant(&admin, &org, "auditor", "encryption:view", Some(&team))
        .await;

    let driver = Driver::start();
    let page = Page {
        client: driver.browser().await,
        name: match backend {
            Backend::Sqlite => "viewer-sqlite",
            Backend::Postgres => "viewer-postgres",
        },
    };
    page.client
        .goto(&format!("{}/console", app.base))
        .await
        .unwrap();
    page.type_into("#token", &format!("{viewer}\u{E007}")).await;
    page.wait_text("#who", &["auditor", "member"]).await;
    page.wait_text(&format!("{} > .row", node(&thread)), &["launch plans"])
        .await;
    let roots = page
        .eval("[...document.querySelectorAll('#tree > li')].map(li => li.dataset.scopeId)")
        .await;
    assert_eq!(roots, json!([team]));
    assert_eq!(
        page.eval(&format!(
            "document.querySelector('[data-scope-id=\"{sales}\"]') === null"
        ))
        .await,
        json!(true)
    );
    let children = format!("{} > ul > li.scope", node(&team));
    let count = format!("document.querySelectorAll('{children}').length");
    assert_eq!(page.eval(&count).await, json!(50));
    page.click(&format!("{} > .more", node(&team))).await;
    page.wait_true("the second page is listed", &format!("{count} === 55"))
        .await;
    page.wait_true(
        "no more pages",
        &format!("!document.querySelector('{} > .more')", node(&team)),
    )
    .await;

    page.click(&format!("{} > .row .select", node(&team))).await;
    page.wait_text("#manage-note", &["not manage"]).await;
    page.wait_true(
        "every action is disabled",
        "[...document.querySelectorAll('#detail-actions button')].every(b => b.disabled)",
    )
    .await;
    page.screenshot("01-team-viewer").await;
    let _ = page.client.close().await;
    drop(driver);
    app.stop().await;
}
on_both_backends!(console_shows_only_the_team_and_no_actions_when_the_caller_is_a_team_viewer);

// ---------------------------------------------------------------------------------------
// Issue 23: markup in names, Cancel, and the dry run that gates Submit.

/// The audit page's access log lists who used the keys, filtered, and "who could decrypt"
/// names the principals whose grants covered a scope at a time, or says why nobody could.
async fn console_shows_the_access_log_and_who_could_decrypt(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let (org, admin) = app.org_with("enterprise", "managed").await;
    let team = app.scope(&admin, "team", "research", &org).await;
    let thread = app.scope(&admin, "thread", "launch plans", &team).await;
    let agent = app.token(&admin, &org, "agent-7", "member").await;
    app.grant(&admin, &org, "agent-7", "data:use", Some(&team))
        .await;
    let sealed = crate::harness::encrypt(&app, &agent, &thread, b"x", "messages").await;
    assert_eq!(sealed.status, 200);
    let opened =
        crate::harness::decrypt(&app, &agent, &thread, &sealed.str("ciphertext"), "messages").await;
    assert_eq!(opened.status, 200);
    // A whole second after the grant (the page's time has whole seconds), then the pause a
    // second later.
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    let before_pause = chrono::Utc::now().format("%Y-%m-%dT%H:%M:%S").to_string();
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    assert_eq!(app.pause(&admin, &team).await.status, 200);
    crate::harness::decrypt(&app, &agent, &thread, &sealed.str("ciphertext"), "messages")
        .await
        .assert_problem(409, "scope_paused");

    let driver = Driver::start();
    let page = Page {
        client: driver.browser().await,
        name: match backend {
            Backend::Sqlite => "access-sqlite",
            Backend::Postgres => "access-postgres",
        },
    };
    page.client
        .goto(&format!("{}/console", app.base))
        .await
        .unwrap();
    page.type_into("#token", &format!("{admin}\u{E007}")).await;
    page.wait_text("#who", &["admin"]).await;
    page.click("[data-view=audit]").await;
    page.wait_visible("#access-operation")
        .await
        .select_by_value("decrypt")
        .await
        .unwrap();
    page.type_into("#access-scope", &team).await;
    page.click("#access-apply").await;
    page.wait_true(
        "the two decrypts, allowed then refused",
        "(() => { const rows = [...document.querySelectorAll('#access-rows tr')]; \
         return rows.length === 2 && rows.every(r => r.dataset.operation === 'decrypt') \
         && rows[0].dataset.outcome === 'ok' && rows[1].dataset.outcome === 'scope_paused'; })()",
    )
    .await;
    page.wait_text("#access-rows tr", &["agent-7", "messages"])
        .await;
    page.screenshot("09-access-log").await;
    page.click("#access-export-csv").await;
    page.wait_text("#status", &["Exported CSV"]).await;

    // Before the pause: the agent could, through its grant on the team.
    page.type_into("#who-could-scope", &thread).await;
    page.eval(&format!(
        "(document.getElementById('who-could-at').value = '{before_pause}', true)"
    ))
    .await;
    page.click("#who-could-submit").await;
    page.wait_text("#who-could-list", &["agent-7", "data:use", &team])
        .await;
    // Now: paused, so nobody could, and the page says why.
    let now = chrono::Utc::now().format("%Y-%m-%dT%H:%M:%S").to_string();
    page.eval(&format!(
        "(document.getElementById('who-could-at').value = '{now}', true)"
    ))
    .await;
    page.click("#who-could-submit").await;
    page.wait_text("#who-could-result", &["paused", "Nobody could decrypt"])
        .await;
    page.screenshot("10-who-could").await;
    // Every control has a label.
    assert_eq!(
        page.eval(
            "[...document.querySelectorAll('input, select, textarea')]\
             .filter(c => c.labels.length === 0).map(c => c.id)"
        )
        .await,
        json!([])
    );
    app.stop().await;
}
on_both_backends!(console_shows_the_access_log_and_who_could_decrypt);
