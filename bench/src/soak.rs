//! The soak (issue 20 §5): a mixed load on one `ekm serve` for N minutes, with the
//! server's resident memory, open file descriptors and each class's p99 every minute.
//!
//! Load, all at once, each client as fast as its answers come:
//! - commands: 4 clients, each pausing and resuming its own threads, and rotating one every
//!   500th command;
//! - reads: 2 clients, `GET /v1/scopes/{id}` and a page of children;
//! - data plane: 4 clients, encrypt 1 KiB and decrypt it;
//! - audit: one export of the organization's audit log (JSON Lines, signed) every 30 s;
//! - one rebuild of the read models beside the server, halfway (PostgreSQL: it runs beside
//!   live servers; SQLite needs the server stopped, so there it is left out).
//!
//! The working set is fixed (no scope is created once the load starts), so memory should
//! be flat: the figure is the last minute's RSS over the first's (target ≤ 1.1), with no
//! error (any answer but 2xx).

use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::{json, Value};

use crate::server::{self, Server};
use crate::BenchDb;

/// What happened in one minute.
#[derive(Default)]
struct Minute {
    /// Latencies per class, in microseconds.
    latencies: [Vec<u64>; CLASSES.len()],
    errors: u64,
    first_error: Option<String>,
}

const CLASSES: [&str; 4] = ["command", "read", "data plane", "audit export"];

struct Load {
    http: reqwest::Client,
    base: String,
    admin: String,
    service: String,
    org: String,
    threads: Vec<String>,
    started: Instant,
    minutes: Mutex<Vec<Minute>>,
    stop: AtomicBool,
    requests: AtomicU64,
}

impl Load {
    fn record(&self, class: usize, took: Duration, error: Option<String>) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        let minute = (self.started.elapsed().as_secs() / 60) as usize;
        let Ok(mut minutes) = self.minutes.lock() else {
            return;
        };
        while minutes.len() <= minute {
            minutes.push(Minute::default());
        }
        let entry = &mut minutes[minute];
        entry.latencies[class].push(took.as_micros() as u64);
        if let Some(error) = error {
            entry.errors += 1;
            entry.first_error.get_or_insert(error);
        }
    }

    /// One request; a non-2xx answer or a transport error is an error.
    async fn call(
        &self,
        class: usize,
        method: reqwest::Method,
        path: &str,
        token: &str,
        body: Option<Value>,
    ) -> Option<Value> {
        let started = Instant::now();
        let mut request = self
            .http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(token);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let outcome = match request.send().await {
            Ok(response) => {
                let status = response.status();
                let text = response.text().await.unwrap_or_default();
                match status.is_success() {
                    true => Ok(text),
                    false => Err(format!(
                        "{path}: {status} {}",
                        text.chars().take(200).collect::<String>()
                    )),
                }
            }
            Err(error) => Err(format!("{path}: {error}")),
        };
        match outcome {
            Ok(text) => {
                self.record(class, started.elapsed(), None);
                Some(serde_json::from_str(&text).unwrap_or(Value::Null))
            }
            Err(error) => {
                self.record(class, started.elapsed(), Some(error));
                None
            }
        }
    }
}

fn p99_ms(values: &mut [u64]) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    values.sort_unstable();
    let index = ((values.len() as f64) * 0.99).ceil() as usize;
    values[index.clamp(1, values.len()) - 1] as f64 / 1000.0
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|entries| entries.count())
        .unwrap_or(0)
}

/// Runs the soak for `minutes` and prints a Markdown table, one row per minute.
pub async fn run(minutes: u64, backend: &str) -> anyhow::Result<()> {
    let dir = server::temp_path("ekm-bench-soak");
    let _ = std::fs::remove_dir_all(&dir);
    let pg = match backend {
        "postgres" => Some(BenchDb::create().await?),
        "sqlite" => None,
        other => anyhow::bail!("--backend is sqlite or postgres, not {other}"),
    };
    let result = soak(minutes, &dir, pg.as_ref().map(|db| db.url.as_str())).await;
    if let Some(pg) = pg {
        pg.drop_db().await?;
    }
    let _ = std::fs::remove_dir_all(&dir);
    result
}

async fn soak(minutes: u64, dir: &std::path::Path, url: Option<&str>) -> anyhow::Result<()> {
    let (server, _) = Server::start(dir, url).await?;
    let load = Arc::new(setup(&server).await?);
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "Soak: {minutes} min on {}, release build; the server's RSS and open file descriptors \
         sampled at the end of each minute, p99 per class over the minute.\n",
        if url.is_some() {
            "PostgreSQL"
        } else {
            "SQLite"
        }
    )?;
    writeln!(out, "| minute | requests | errors | RSS MiB | fds | p99 command ms | p99 read ms | p99 data plane ms | p99 audit export ms |")?;
    writeln!(out, "|---|---|---|---|---|---|---|---|---|")?;
    out.flush()?;

    let mut tasks = vec![];
    // The first 12 threads are the command clients' (3 each); the last 4 the data plane's.
    let per_client = 3;
    for c in 0..4 {
        let load = load.clone();
        tasks.push(tokio::spawn(async move {
            let mine: Vec<String> = load.threads[c * per_client..(c + 1) * per_client].to_vec();
            let mut n = 0usize;
            while !load.stop.load(Ordering::Relaxed) {
                let thread = &mine[n % mine.len()];
                let post = reqwest::Method::POST;
                if n % 500 == 499 {
                    load.call(
                        0,
                        post.clone(),
                        &format!("/v1/scopes/{thread}/rotate"),
                        &load.admin,
                        Some(json!({"reason": "soak"})),
                    )
                    .await;
                }
                load.call(
                    0,
                    post.clone(),
                    &format!("/v1/scopes/{thread}/pause"),
                    &load.admin,
                    Some(json!({"reason": "soak"})),
                )
                .await;
                load.call(
                    0,
                    post,
                    &format!("/v1/scopes/{thread}/resume"),
                    &load.admin,
                    Some(json!({"reason": "soak"})),
                )
                .await;
                n += 1;
            }
        }));
    }
    for c in 0..2 {
        let load = load.clone();
        tasks.push(tokio::spawn(async move {
            let mut n = c;
            while !load.stop.load(Ordering::Relaxed) {
                let thread = load.threads[n % load.threads.len()].clone();
                load.call(
                    1,
                    reqwest::Method::GET,
                    &format!("/v1/scopes/{thread}"),
                    &load.admin,
                    None,
                )
                .await;
                if n % 10 == 0 {
                    let path = format!("/v1/scopes/{}/children?limit=50", load.org);
                    load.call(1, reqwest::Method::GET, &path, &load.admin, None)
                        .await;
                }
                n += 1;
            }
        }));
    }
    for c in 0..4 {
        let load = load.clone();
        tasks.push(tokio::spawn(async move {
            // The data-plane threads are the last four: never paused.
            let thread = load.threads[load.threads.len() - 1 - c].clone();
            let plaintext =
                base64::Engine::encode(&base64::engine::general_purpose::STANDARD, vec![7u8; 1024]);
            while !load.stop.load(Ordering::Relaxed) {
                let sealed = load
                    .call(
                        2,
                        reqwest::Method::POST,
                        &format!("/v1/scopes/{thread}/encrypt"),
                        &load.service,
                        Some(json!({"plaintext": plaintext, "class": "messages"})),
                    )
                    .await;
                if let Some(ciphertext) = sealed.as_ref().and_then(|s| s["ciphertext"].as_str()) {
                    load.call(
                        2,
                        reqwest::Method::POST,
                        &format!("/v1/scopes/{thread}/decrypt"),
                        &load.service,
                        Some(json!({"ciphertext": ciphertext, "class": "messages"})),
                    )
                    .await;
                }
            }
        }));
    }
    {
        let load = load.clone();
        tasks.push(tokio::spawn(async move {
            while !load.stop.load(Ordering::Relaxed) {
                let started = Instant::now();
                let path = format!("/v1/audit/export?format=jsonl&org={}", load.org);
                let answer = load
                    .http
                    .get(format!("{}{path}", load.base))
                    .bearer_auth(&load.admin)
                    .send()
                    .await;
                let error = match answer {
                    Ok(response) if response.status().is_success() => {
                        match response.bytes().await {
                            Ok(_) => None,
                            Err(error) => Some(format!("{path}: body: {error}")),
                        }
                    }
                    Ok(response) => Some(format!("{path}: {}", response.status())),
                    Err(error) => Some(format!("{path}: {error}")),
                };
                load.record(3, started.elapsed(), error);
                // The export's beat, not synchronisation.
                tokio::time::sleep(Duration::from_secs(30)).await;
            }
        }));
    }

    let mut rss = vec![];
    let mut total_errors = 0;
    let mut rebuilt = None;
    for minute in 0..minutes as usize {
        let end = load.started + Duration::from_secs(60 * (minute as u64 + 1));
        if minute as u64 == minutes / 2 {
            if let Some(url) = url {
                let (seconds, peak) = server::rebuild_process(url, dir).await?;
                rebuilt = Some((minute, seconds, peak));
            }
        }
        tokio::time::sleep_until(end.into()).await;
        let mib = server.rss_mib();
        let fds = open_fds(server.pid());
        rss.push(mib);
        let mut minutes_seen = load
            .minutes
            .lock()
            .map_err(|_| anyhow::anyhow!("poisoned"))?;
        while minutes_seen.len() <= minute {
            minutes_seen.push(Minute::default());
        }
        let row = &mut minutes_seen[minute];
        let requests: usize = row.latencies.iter().map(Vec::len).sum();
        total_errors += row.errors;
        let p99: Vec<f64> = row.latencies.iter_mut().map(|l| p99_ms(l)).collect();
        writeln!(
            out,
            "| {} | {requests} | {} | {mib:.0} | {fds} | {:.1} | {:.1} | {:.1} | {:.0} |",
            minute + 1,
            row.errors,
            p99[0],
            p99[1],
            p99[2],
            p99[3]
        )?;
        if let Some(error) = &row.first_error {
            writeln!(out, "  first error of the minute: {error}")?;
        }
        // What was measured is kept; the latencies go (memory of the bench stays flat too).
        row.latencies = Default::default();
        out.flush()?;
    }
    load.stop.store(true, Ordering::Relaxed);
    for task in tasks {
        task.abort();
    }
    let first = rss.first().copied().unwrap_or(0.0);
    let last = rss.last().copied().unwrap_or(0.0);
    writeln!(out)?;
    if let Some((minute, seconds, peak)) = rebuilt {
        writeln!(out, "One rebuild beside the server in minute {}: {seconds:.1} s, its peak RSS {peak:.0} MiB.", minute + 1)?;
    }
    writeln!(
        out,
        "RSS last minute / first minute: {:.2} (target ≤ 1.1); errors: {total_errors}; requests: {}.",
        last / first.max(1.0),
        load.requests.load(Ordering::Relaxed)
    )?;
    server.stop();
    if total_errors > 0 {
        anyhow::bail!("{total_errors} errors during the soak");
    }
    Ok(())
}

/// An organization with 16 threads under 4 teams (12 for the command clients, 4 for the
/// data plane), and a service holding `data:use`.
async fn setup(server: &Server) -> anyhow::Result<Load> {
    let http = reqwest::Client::new();
    let base = server.base.clone();
    let post = |token: String, path: String, body: Value| {
        let (http, base) = (http.clone(), base.clone());
        async move { ekm_bench::chaos::post_ok(&http, &base, &token, &path, body).await }
    };
    let org = post(
        server.operator_token()?,
        "/v1/orgs".into(),
        json!({"name": "Soak", "plan": "enterprise", "tier": "managed"}),
    )
    .await?;
    let org_id = org["id"].as_str().context("org id")?.to_owned();
    let admin = org["admin_token"]
        .as_str()
        .context("admin token")?
        .to_owned();
    let mut threads = vec![];
    for t in 0..4 {
        let team = post(
            admin.clone(),
            "/v1/scopes".into(),
            json!({"kind": "team", "name": format!("team{t}"), "parent_id": org_id}),
        )
        .await?;
        let team = team["id"].as_str().context("team id")?.to_owned();
        for i in 0..4 {
            let thread = post(
                admin.clone(),
                "/v1/scopes".into(),
                json!({"kind": "thread", "name": format!("thread{i}"), "parent_id": team}),
            )
            .await?;
            threads.push(thread["id"].as_str().context("thread id")?.to_owned());
        }
    }
    let token = post(
        admin.clone(),
        format!("/v1/orgs/{org_id}/tokens"),
        json!({"principal": "soak"}),
    )
    .await?;
    post(
        admin.clone(),
        format!("/v1/orgs/{org_id}/grants"),
        json!({"principal": "soak", "permission": "data:use"}),
    )
    .await?;
    Ok(Load {
        http: http.clone(),
        base: server.base.clone(),
        admin,
        service: token["token"].as_str().context("token")?.to_owned(),
        org: org_id,
        threads,
        started: Instant::now(),
        minutes: Mutex::new(vec![]),
        stop: AtomicBool::new(false),
        requests: AtomicU64::new(0),
    })
}
