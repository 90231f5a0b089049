//! What the console must never do: run markup found in a name, submit before the dry run
//! answered, or change anything on Cancel.

use super::*;

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
