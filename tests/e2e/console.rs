//! The admin console: its files and headers, the endpoints it relies on (`/v1/me`, the
//! name search), and the user stories of issue 8 in a real headless Chromium driven by
//! WebDriver (chromedriver, through `fantoccini`). Screenshots of the main screens go to
//! `target/console-screenshots/`.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder, Locator};
use reqwest::StatusCode;
use serde_json::json;

use crate::harness::{free_port, Backend, TestApp};
use crate::on_both_backends;

// ---------------------------------------------------------------------------------------
// Files and headers.

async fn console_files_carry_a_strict_policy_when_served(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    for (path, content_type) in [
        ("/console", "text/html; charset=utf-8"),
        ("/console/", "text/html; charset=utf-8"),
        ("/console/app.js", "text/javascript; charset=utf-8"),
        ("/console/style.css", "text/css; charset=utf-8"),
    ] {
        let response = app
            .client
            .get(format!("{}{path}", app.base))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK, "{path}");
        let header = |name: &str| {
            response
                .headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_owned()
        };
        assert_eq!(header("content-type"), content_type, "{path}");
        assert_eq!(header("x-content-type-options"), "nosniff", "{path}");
        assert_eq!(header("cache-control"), "no-cache", "{path}");
        let csp = header("content-security-policy");
        assert!(csp.contains("default-src 'none'"), "{csp}");
        assert!(csp.contains("script-src 'self'"), "{csp}");
        assert!(!csp.contains("unsafe-inline") && !csp.contains("unsafe-eval"));
        assert!(csp.contains("frame-ancestors 'none'"), "{csp}");
        let body = response.text().await.unwrap();
        // Nothing from elsewhere: the console works offline.
        assert!(
            !body.contains("http://") && !body.contains("https://"),
            "{path}"
        );
        if path.ends_with('/') || path == "/console" {
            assert!(!body.contains("<script>"), "no inline script");
            assert!(!body.contains("style="), "no inline style");
            // Before the script runs (or without it) the sign-in form cannot send the token
            // in a URL: it posts, its field has no name, and its button starts disabled.
            assert!(body.contains(r#"<form id="signin-form" method="post""#));
            assert!(body.contains(r#"<input id="token" type="password""#));
            assert!(!body.contains(r#"name="token""#));
            assert!(body.contains(r#"id="signin-button" disabled"#));
        }
    }
    let missing = app.get("/console/secrets.txt", "").await;
    missing.assert_problem(404, "not_found");
    app.stop().await;
}
on_both_backends!(console_files_carry_a_strict_policy_when_served);

// ---------------------------------------------------------------------------------------
// The endpoints the console relies on.

async fn me_describes_the_token_when_called(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let (org, admin) = app.org_with("enterprise", "managed").await;
    let team = app.scope(&admin, "team", "research", &org).await;
    let me = app.get("/v1/me", &admin).await;
    assert_eq!(me.status, StatusCode::OK, "{}", me.body);
    assert_eq!(me.body["org_id"], org.as_str());
    assert_eq!(me.body["role"], "org_admin");
    assert_eq!(me.body["principal"], "admin");
    assert!(me.body["token_id"].is_string());
    let permissions = me.body["permissions"].as_array().unwrap();
    assert!(permissions.contains(&json!("encryption:manage")));
    assert!(!permissions.contains(&json!("data:use")));

    // A member sees the grants that make it a team admin, and no organization-wide right.
    let member = app.token(&admin, &org, "team-lead", "member").await;
    app.grant(&admin, &org, "team-lead", "encryption:manage", Some(&team))
        .await;
    let me = app.get("/v1/me", &member).await;
    assert_eq!(me.body["role"], "member");
    assert_eq!(me.body["permissions"], json!([]));
    assert_eq!(
        me.body["grants"],
        json!([{"permission": "encryption:manage", "scope_id": team}])
    );

    let operator = app.get("/v1/me", &app.operator_token).await;
    assert_eq!(operator.status, StatusCode::OK);
    assert_eq!(operator.body["role"], "operator");
    assert_eq!(operator.body["org_id"], json!(null));
    app.call("GET", "/v1/me", None, None)
        .await
        .assert_problem(401, "unauthorized");
    app.stop().await;
}
on_both_backends!(me_describes_the_token_when_called);

async fn search_finds_only_visible_names_when_the_caller_is_limited(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let (org, admin) = app.org_with("enterprise", "managed").await;
    let research = app.scope(&admin, "team", "Research", &org).await;
    let sales = app.scope(&admin, "team", "sales", &org).await;
    let plans = app
        .scope(&admin, "thread", "research plans", &research)
        .await;
    app.scope(&admin, "thread", "100%_done", &sales).await;
    app.scope(&admin, "thread", "pipeline", &sales).await;
    let names = |response: &crate::harness::Response| -> Vec<String> {
        response.body["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["name"].as_str().unwrap().to_owned())
            .collect()
    };
    let search = format!("/v1/orgs/{org}/scopes");

    // Case-insensitive substring, with the cascade resolved like any scope JSON.
    app.pause(&admin, &research).await;
    let found = app.get(&format!("{search}?q=RESEARCH"), &admin).await;
    assert_eq!(found.status, StatusCode::OK, "{}", found.body);
    assert_eq!(names(&found), ["Research", "research plans"]);
    assert_eq!(found.body["items"][1]["effective_state"], "paused");
    assert_eq!(
        found.body["items"][1]["cause"]["scope_id"],
        research.as_str()
    );

    // LIKE's wildcards are plain characters.
    let percent = app.get(&format!("{search}?q=%25_"), &admin).await;
    assert_eq!(names(&percent), ["100%_done"]);

    // Pages of one, in id order, until there is no cursor.
    let mut seen = vec![];
    let mut cursor: Option<String> = None;
    loop {
        let mut path = format!("{search}?limit=1");
        if let Some(c) = &cursor {
            path.push_str(&format!("&cursor={c}"));
        }
        let page = app.get(&path, &admin).await;
        assert_eq!(page.status, StatusCode::OK, "{}", page.body);
        seen.extend(names(&page));
        match page.body["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => break,
        }
    }
    assert_eq!(seen.len(), 6, "{seen:?}");

    // A member with a grant on one team finds only that subtree.
    let member = app.token(&admin, &org, "viewer", "member").await;
    app.grant(&admin, &org, "viewer", "encryption:view", Some(&research))
        .await;
    let scoped = app.get(&search, &member).await;
    assert_eq!(names(&scoped), ["Research", "research plans"]);
    assert_eq!(scoped.body["items"][1]["id"], plans.as_str());

    // Refusals.
    let (other_org, other_admin) = app.org_with("enterprise", "managed").await;
    app.get(&search, &other_admin)
        .await
        .assert_problem(404, "not_found");
    app.get(&format!("/v1/orgs/{other_org}/scopes"), &admin)
        .await
        .assert_problem(404, "not_found");
    app.get(&search, &app.operator_token)
        .await
        .assert_problem(403, "forbidden");
    for bad in [
        "?limit=0",
        "?limit=abc",
        "?cursor=nope",
        "?sort=name",
        &format!("?q={}", "a".repeat(201)),
        "?q=%07",
    ] {
        app.get(&format!("{search}{bad}"), &admin)
            .await
            .assert_problem(400, "invalid_request");
    }
    app.get("/v1/orgs/not-a-uuid/scopes", &admin)
        .await
        .assert_problem(400, "invalid_request");
    app.stop().await;
}
on_both_backends!(search_finds_only_visible_names_when_the_caller_is_limited);

// ---------------------------------------------------------------------------------------
// A real browser.

const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
const CHROMIUM: &str = "/usr/bin/chromium";
const WAIT: Duration = Duration::from_secs(30);

/// chromedriver on a free loopback port, killed on drop, and the browser profile it uses.
struct Driver {
    child: Child,
    port: u16,
    profile: tempfile::TempDir,
}

impl Driver {
    fn start() -> Driver {
        for (path, package) in [(CHROMEDRIVER, "chromium-driver"), (CHROMIUM, "chromium")] {
            assert!(
                std::path::Path::new(path).is_file(),
                "{path} is missing: the console's browser tests need Debian's `chromium` and \
                 `chromium-driver` (`apt-get install -y chromium chromium-driver`; .ci/run \
                 installs them); package {package}"
            );
        }
        let port = free_port();
        let mut child = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {CHROMEDRIVER}: {e}"));
        // Ready when it says so (after binding its port); its output is drained after that.
        let stdout = child.stdout.take().unwrap();
        let (ready_tx, ready) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                if line.contains("started successfully") {
                    let _ = ready_tx.send(());
                }
            }
        });
        let driver = Driver {
            child,
            port,
            profile: tempfile::tempdir().unwrap(),
        };
        ready
            .recv_timeout(WAIT)
            .unwrap_or_else(|_| panic!("chromedriver did not start on port {port}"));
        driver
    }

    async fn browser(&self) -> Client {
        let mut capabilities = serde_json::Map::new();
        capabilities.insert(
            "goog:chromeOptions".into(),
            json!({
                "binary": CHROMIUM,
                "args": [
                    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                    "--no-first-run", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync",
                    "--disable-dev-shm-usage", "--window-size=1280,1000",
                    format!("--user-data-dir={}", self.profile.path().display()),
                ],
            }),
        );
        ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
            .capabilities(capabilities)
            .connect(&format!("http://127.0.0.1:{}", self.port))
            .await
            .unwrap_or_else(|e| panic!("no browser session from chromedriver: {e}"))
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // A test that failed never closed its session, and killing chromedriver orphans the
        // browser: end the processes started with this test's own profile, and only those.
        let marker = format!("--user-data-dir={}", self.profile.path().display());
        let Ok(entries) = std::fs::read_dir("/proc") else {
            return;
        };
        for entry in entries.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|p| p.parse::<u32>().ok())
            else {
                continue;
            };
            let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
                continue;
            };
            let mine = cmdline
                .split(|b| *b == 0)
                .any(|arg| arg == marker.as_bytes());
            if mine {
                let _ = Command::new("kill").arg(pid.to_string()).status();
            }
        }
    }
}

fn screenshot_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target"));
    let dir = target.join("console-screenshots");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The page, as a test sees it.
struct Page {
    client: Client,
    name: &'static str,
}

impl Page {
    async fn screenshot(&self, file: &str) {
        let png = self.client.screenshot().await.unwrap();
        let path = screenshot_dir().join(format!("{}-{file}.png", self.name));
        std::fs::write(&path, png).unwrap();
    }

    async fn click(&self, css: &str) {
        self.wait_visible(css).await.click().await.unwrap();
    }

    async fn type_into(&self, css: &str, text: &str) {
        let field = self.wait_visible(css).await;
        field.clear().await.unwrap();
        field.send_keys(text).await.unwrap();
    }

    // The waits below poll the page: WebDriver tells a client of no change in the DOM, so
    // looking again every 100 ms is the only way to see one. `WAIT` bounds a failure only.

    /// The first element matching `css` that is displayed.
    async fn wait_visible(&self, css: &str) -> fantoccini::elements::Element {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Ok(found) = self.client.find_all(Locator::Css(css)).await {
                for element in found {
                    if element.is_displayed().await.unwrap_or(false) {
                        return element;
                    }
                }
            }
            assert!(Instant::now() < deadline, "`{css}` never became visible");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until an element matching `css` has text containing every one of `needles`.
    async fn wait_text(&self, css: &str, needles: &[&str]) -> String {
        let deadline = Instant::now() + WAIT;
        let mut seen = vec![];
        loop {
            seen.clear();
            if let Ok(found) = self.client.find_all(Locator::Css(css)).await {
                for element in found {
                    if let Ok(text) = element.text().await {
                        if needles.iter().all(|n| text.contains(n)) {
                            return text;
                        }
                        seen.push(text);
                    }
                }
            }
            assert!(
                Instant::now() < deadline,
                "no `{css}` with {needles:?} within {WAIT:?}; saw {seen:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until `script` (a JavaScript expression) is true.
    async fn wait_true(&self, what: &str, script: &str) {
        let deadline = Instant::now() + WAIT;
        loop {
            let value = self
                .client
                .execute(&format!("return Boolean({script});"), vec![])
                .await
                .unwrap();
            if value == json!(true) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: not true within {WAIT:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn eval(&self, script: &str) -> serde_json::Value {
        self.client
            .execute(&format!("return {script};"), vec![])
            .await
            .unwrap()
    }
}

fn node(id: &str) -> String {
    format!("#tree li[data-scope-id=\"{id}\"]")
}

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

    // With the name typed: revoked, and the threads say why.
    page.type_into("#action-confirm", "research").await;
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

/// Signs `token` in through the page at `base`; returns when the tree shows `org`.
async fn sign_in(page: &Page, base: &str, token: &str, org: &str) {
    page.client.goto(&format!("{base}/console")).await.unwrap();
    page.wait_true("the script ran", "document.body.dataset.ready === 'true'")
        .await;
    page.type_into("#token", &format!("{token}\u{E007}")).await;
    page.wait_visible(&format!("{} > .row .select", node(org)))
        .await;
}

async fn assert_no_image(page: &Page) {
    assert_eq!(
        page.eval("[...document.querySelectorAll('img')].map(i => i.outerHTML)")
            .await,
        json!([]),
        "the name became markup"
    );
}

/// A scope named with markup shows as that text wherever the console puts a name (the tree,
/// a child's cause, the details, the revoke confirmation, the search results), and never
/// becomes an element: no image is made and no alert is raised.
async fn console_shows_a_name_as_text_when_it_is_markup(backend: Backend) {
    const HOSTILE: &str = "<img src=x onerror=alert(1)>";
    let app = TestApp::spawn(backend).await;
    let (org, admin) = app.org_with("enterprise", "managed").await;
    let team = app.scope(&admin, "team", HOSTILE, &org).await;
    let thread = app.scope(&admin, "thread", "launch plans", &team).await;
    assert_eq!(app.pause(&admin, &team).await.status, StatusCode::OK);

    let driver = Driver::start();
    let page = Page {
        client: driver.browser().await,
        name: match backend {
            Backend::Sqlite => "markup-sqlite",
            Backend::Postgres => "markup-postgres",
        },
    };
    sign_in(&page, &app.base, &admin, &org).await;
    // After each place a name is shown: no element was made of it.
    let no_image = || assert_no_image(&page);

    let row = format!("{} > .row .select", node(&team));
    page.wait_visible(&row).await;
    no_image().await;
    page.wait_text(&row, &[HOSTILE]).await;
    page.click(&format!("{} > .row .toggle", node(&team))).await;
    page.wait_visible(&format!("{} > .cause", node(&thread)))
        .await;
    no_image().await;
    page.wait_text(
        &format!("{} > .cause", node(&thread)),
        &[&format!("paused by team {HOSTILE}")],
    )
    .await;
    page.click(&row).await;
    page.wait_visible("#detail-panel").await;
    page.wait_true(
        "the details show the team",
        &format!("document.getElementById('detail-facts').textContent.includes('{team}')"),
    )
    .await;
    no_image().await;
    page.wait_text("#detail-title", &[&format!("team {HOSTILE}")])
        .await;
    page.click("#detail-actions [data-action=revoke]").await;
    page.wait_text("#action-impact", &["Would become inactive"])
        .await;
    no_image().await;
    page.wait_text("#confirm-name", &[HOSTILE]).await;
    page.click("#action-cancel").await;
    page.type_into("#search-q", "onerror").await;
    page.click("#search-button").await;
    page.wait_visible(&format!(
        "#search-list {}",
        node(&team).trim_start_matches("#tree ")
    ))
    .await;
    no_image().await;
    page.wait_text("#search-list", &[HOSTILE]).await;
    page.screenshot("01-markup-as-text").await;

    assert!(
        page.client.get_alert_text().await.is_err(),
        "an alert is open"
    );
    let _ = page.client.close().await;
    drop(driver);
    app.stop().await;
}
on_both_backends!(console_shows_a_name_as_text_when_it_is_markup);

/// A proxy between the browser and the server that holds the answer to every dry run
/// (`?dry_run=true`) until the test releases it: to the page, a server that is slow exactly
/// when the test wants, with no clock involved.
struct HoldingProxy {
    base: String,
    /// The path of each dry run whose answer has come back from the server and is held.
    held: tokio::sync::mpsc::UnboundedReceiver<String>,
    release: std::sync::Arc<tokio::sync::Semaphore>,
}

impl HoldingProxy {
    async fn start(upstream: &str) -> HoldingProxy {
        use axum::extract::{Request, State};
        use axum::response::Response;

        #[derive(Clone)]
        struct Proxy {
            upstream: String,
            client: reqwest::Client,
            held: tokio::sync::mpsc::UnboundedSender<String>,
            release: std::sync::Arc<tokio::sync::Semaphore>,
        }
        async fn handle(State(proxy): State<Proxy>, request: Request) -> Response {
            let (parts, body) = request.into_parts();
            let body = axum::body::to_bytes(body, 1 << 20)
                .await
                .unwrap_or_default();
            let path = parts
                .uri
                .path_and_query()
                .map_or("/", |p| p.as_str())
                .to_owned();
            let mut upstream = proxy
                .client
                .request(parts.method.clone(), format!("{}{path}", proxy.upstream));
            for (name, value) in &parts.headers {
                if name != "host" && name != "content-length" {
                    upstream = upstream.header(name, value);
                }
            }
            let answer = upstream.body(body).send().await.unwrap();
            let mut response = Response::builder().status(answer.status());
            for (name, value) in answer.headers() {
                if name != "content-length" && name != "transfer-encoding" && name != "connection" {
                    response = response.header(name, value);
                }
            }
            let bytes = answer.bytes().await.unwrap_or_default();
            if path.contains("dry_run=true") {
                let _ = proxy.held.send(path);
                proxy.release.acquire().await.unwrap().forget();
            }
            response.body(axum::body::Body::from(bytes)).unwrap()
        }
        let (held_tx, held) = tokio::sync::mpsc::unbounded_channel();
        let release = std::sync::Arc::new(tokio::sync::Semaphore::new(0));
        let proxy = Proxy {
            upstream: upstream.to_owned(),
            client: reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .unwrap(),
            held: held_tx,
            release: release.clone(),
        };
        let base =
            crate::kms_servers::serve(axum::Router::new().fallback(handle).with_state(proxy)).await;
        HoldingProxy {
            base,
            held,
            release,
        }
    }

    /// Waits until a dry run's answer is held; returns its path.
    async fn next_held(&mut self) -> String {
        tokio::time::timeout(WAIT, self.held.recv())
            .await
            .unwrap_or_else(|_| panic!("no dry run reached the proxy within {WAIT:?}"))
            .unwrap()
    }
}

/// Records, in the page, every request the console starts (`METHOD path`), as it starts
/// it: the console calls `fetch` synchronously from its event handlers, so once a click or
/// a key press has been dispatched, what it sent is in `window.__sent`.
async fn record_requests(page: &Page) {
    page.eval(
        "(() => { window.__sent = []; const fetch = window.fetch; \
         window.fetch = (url, init) => { \
           window.__sent.push(`${(init && init.method) || 'GET'} ${url}`); \
           return fetch(url, init); }; \
         return true; })()",
    )
    .await;
}

/// The commands (POSTs other than dry runs) the page has sent.
async fn commands_sent(page: &Page) -> serde_json::Value {
    page.eval("window.__sent.filter(s => s.startsWith('POST') && !s.includes('dry_run=true'))")
        .await
}

/// Revoke can be submitted only once its dry run has answered: while the answer is held,
/// Submit is disabled and Enter in the confirmation field sends nothing, even with the
/// reason and the name typed. Cancel then closes the form and changes nothing (no event).
/// A pause through the same proxy, released at once, does go through.
async fn console_submit_waits_and_cancel_changes_nothing_when_the_dry_run_is_slow(
    backend: Backend,
) {
    let app = TestApp::spawn(backend).await;
    let (org, admin) = app.org_with("enterprise", "managed").await;
    let team = app.scope(&admin, "team", "research", &org).await;
    app.scope(&admin, "thread", "launch plans", &team).await;
    let mut proxy = HoldingProxy::start(&app.base).await;

    let driver = Driver::start();
    let page = Page {
        client: driver.browser().await,
        name: match backend {
            Backend::Sqlite => "dry-run-sqlite",
            Backend::Postgres => "dry-run-postgres",
        },
    };
    sign_in(&page, &proxy.base, &admin, &org).await;
    record_requests(&page).await;
    let events = app.db.event_count().await.unwrap();
    let submit_disabled = "document.getElementById('action-submit').disabled";

    // The dry run's answer is held: Submit stays disabled, Enter sends nothing.
    page.click(&format!("{} > .row .select", node(&team))).await;
    page.wait_text("#detail-title", &["team research"]).await;
    page.click("#detail-actions [data-action=revoke]").await;
    let held = proxy.next_held().await;
    assert_eq!(held, format!("/v1/scopes/{team}/revoke?dry_run=true"));
    assert_eq!(page.eval(submit_disabled).await, json!(true));
    page.wait_text("#action-impact", &["Counting what this affects"])
        .await;
    page.type_into("#action-reason", "project closed").await;
    page.type_into("#action-confirm", "research\u{E007}").await;
    assert_eq!(page.eval(submit_disabled).await, json!(true));
    assert_eq!(commands_sent(&page).await, json!([]));
    page.screenshot("01-waiting-for-the-dry-run").await;

    // The answer arrives: the count is shown and Submit becomes usable.
    proxy.release.add_permits(1);
    page.wait_text("#action-impact", &["Would become inactive: 2"])
        .await;
    page.wait_true("Submit is enabled", &format!("!{submit_disabled}"))
        .await;

    // Cancel, with everything typed: the form closes, nothing was sent, nothing changed.
    page.click("#action-cancel").await;
    page.wait_true(
        "the form is closed",
        "document.getElementById('action-form').hidden",
    )
    .await;
    assert_eq!(commands_sent(&page).await, json!([]));
    assert_eq!(app.db.event_count().await.unwrap(), events);
    let scope = app.get(&format!("/v1/scopes/{team}"), &admin).await;
    assert_eq!(scope.body["own_state"], "active", "{}", scope.body);
    page.screenshot("02-cancelled").await;

    // The same path without a hold: a pause goes through, one event.
    proxy.release.add_permits(1);
    page.click("#detail-actions [data-action=pause]").await;
    page.wait_text("#action-impact", &["Would become inactive: 2"])
        .await;
    page.type_into("#action-reason", "investigation 4711").await;
    page.click("#action-submit").await;
    page.wait_text("#status", &["research paused"]).await;
    assert_eq!(
        commands_sent(&page).await,
        json!([format!("POST /v1/scopes/{team}/pause")])
    );
    assert_eq!(app.db.event_count().await.unwrap(), events + 1);
    let _ = page.client.close().await;
    drop(driver);
    app.stop().await;
}
on_both_backends!(console_submit_waits_and_cancel_changes_nothing_when_the_dry_run_is_slow);
