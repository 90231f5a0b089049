//! The admin console: its files and headers, the endpoints it relies on (`/v1/me`, the
//! name search), and the user stories of issue 8 in a real headless Chromium driven by
//! WebDriver (chromedriver, through `fantoccini`). Screenshots of the main screens go to
//! `target/console-screenshots/`.

mod endpoints;
mod flows;
mod safety;

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
