//! Driving a real `ekm serve` (the release binary beside this one) and loading it with wrk.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::Value;

/// A running `ekm serve`, killed when dropped.
pub struct Server {
    child: Child,
    pub base: String,
    pub data_dir: PathBuf,
}

impl Server {
    /// Spawns the server and waits until `/readyz` answers 200 with its read models caught
    /// up to the head of the log; returns it with the time that took.
    pub async fn start(
        data_dir: &Path,
        database_url: Option<&str>,
    ) -> anyhow::Result<(Server, Duration)> {
        Self::start_with(data_dir, database_url, &[]).await
    }

    /// `start`, with environment variables of its own (after the defaults, so they win).
    pub async fn start_with(
        data_dir: &Path,
        database_url: Option<&str>,
        env: &[(&str, &str)],
    ) -> anyhow::Result<(Server, Duration)> {
        let exe = std::env::current_exe()?.with_file_name("ekm");
        if !exe.exists() {
            bail!("build the server first: cargo build --release -p ekm");
        }
        let port = free_port()?;
        let log_path = temp_path(&format!("ekm-serve-{port}.log"));
        let log = std::fs::File::create(&log_path)?;
        let mut command = Command::new(&exe);
        command
            .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
            // The bench seeds its histories with SQL: nothing has sealed them yet.
            .arg("--seal-existing-history")
            .arg("--data-dir")
            .arg(data_dir)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(log);
        // The benchmarks measure capacity: rate limits so high that none refuses, but
        // every limited request still goes through the buckets (their cost is measured).
        for limit in [
            "EKM_RATE_LIMIT_DATA_PLANE_PRINCIPAL",
            "EKM_RATE_LIMIT_DATA_PLANE_ORGANIZATION",
            "EKM_RATE_LIMIT_COMMANDS_PRINCIPAL",
            "EKM_RATE_LIMIT_COMMANDS_ORGANIZATION",
        ] {
            command.env(limit, "10000000:10000000");
        }
        command.envs(env.iter().copied());
        if let Some(url) = database_url {
            command.arg("--database-url").arg(url);
        }
        let started = Instant::now();
        let child = command.spawn().context("spawn ekm serve")?;
        let mut server = Server {
            child,
            base: format!("http://127.0.0.1:{port}"),
            data_dir: data_dir.to_owned(),
        };
        let client = reqwest::Client::new();
        loop {
            if let Ok(response) = client.get(format!("{}/readyz", server.base)).send().await {
                if response.status().is_success() {
                    let body: Value = response.json().await.unwrap_or_default();
                    let head = body["head_position"].as_i64().unwrap_or(0);
                    let applied = body["applied_position"].as_i64().unwrap_or(-1);
                    if applied >= head {
                        return Ok((server, started.elapsed()));
                    }
                }
            }
            if let Ok(Some(status)) = server.child.try_wait() {
                let log = std::fs::read_to_string(&log_path).unwrap_or_default();
                bail!("ekm serve exited with {status} before it was ready: {log}");
            }
            if started.elapsed() > Duration::from_secs(300) {
                bail!("ekm serve was not ready within 300 s");
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// The operator token (written to the data directory on the database's first start).
    pub fn operator_token(&self) -> anyhow::Result<String> {
        let path = self.data_dir.join("operator.token");
        Ok(std::fs::read_to_string(&path)
            .with_context(|| format!("read {}", path.display()))?
            .trim()
            .to_owned())
    }

    /// Where the server writes its standard error.
    pub fn log_path(&self) -> PathBuf {
        temp_path(&format!("ekm-serve-{}.log", self.port()))
    }

    fn port(&self) -> &str {
        self.base.rsplit(':').next().unwrap_or_default()
    }

    /// The server's resident memory now (VmRSS), in MiB.
    pub fn rss_mib(&self) -> f64 {
        status_kib(self.child.id(), "VmRSS:") / 1024.0
    }

    /// The server's peak resident memory so far (VmHWM), in MiB.
    pub fn peak_rss_mib(&self) -> f64 {
        status_kib(self.child.id(), "VmHWM:") / 1024.0
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn stop(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A field of /proc/PID/status in KiB (0 if unreadable).
pub fn status_kib(pid: u32, field: &str) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .unwrap_or(0.0)
}

pub fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

pub fn temp_path(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("{}-{name}", std::process::id()))
}

/// One wrk run.
#[derive(Clone, Copy, Debug, Default)]
pub struct WrkRun {
    pub rps: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub requests: u64,
    /// Non-2xx/3xx answers plus socket errors: any of these fails the figure.
    pub errors: u64,
}

pub fn ensure_wrk() -> anyhow::Result<()> {
    if Command::new("wrk").arg("--version").output().is_ok() {
        return Ok(());
    }
    eprintln!("installing wrk from the distribution's packages");
    let status = Command::new("apt-get")
        .args(["install", "-y", "-qq", "wrk"])
        .status()?;
    if !status.success() {
        bail!("wrk is missing and could not be installed");
    }
    Ok(())
}

fn parse_ms(text: &str) -> f64 {
    let text = text.trim();
    if let Some(v) = text.strip_suffix("us") {
        v.parse::<f64>().unwrap_or(0.0) / 1000.0
    } else if let Some(v) = text.strip_suffix("ms") {
        v.parse().unwrap_or(0.0)
    } else if let Some(v) = text.strip_suffix('s') {
        v.parse::<f64>().unwrap_or(0.0) * 1000.0
    } else {
        0.0
    }
}

/// A Lua script for wrk: a bearer token and, for a POST, a JSON body.
pub fn lua(token: &str, body: Option<&str>) -> String {
    let mut lua = format!("wrk.headers[\"Authorization\"] = \"Bearer {token}\"\n");
    if let Some(body) = body {
        lua.push_str(
            "wrk.method = \"POST\"\nwrk.headers[\"Content-Type\"] = \"application/json\"\n",
        );
        lua.push_str(&format!("wrk.body = [[{body}]]\n"));
    }
    lua
}

/// `wrk -t2 -c16 --latency` for `seconds` with the given Lua script.
pub fn wrk(url: &str, script: &str, seconds: u64) -> anyhow::Result<WrkRun> {
    wrk_with(url, script, seconds, 16)
}

/// `wrk` with `connections` connections.
pub fn wrk_with(url: &str, script: &str, seconds: u64, connections: u32) -> anyhow::Result<WrkRun> {
    let path = temp_path("ekm-wrk.lua");
    std::fs::write(&path, script)?;
    let output = Command::new("wrk")
        .args([
            "-t2",
            &format!("-c{connections}"),
            &format!("-d{seconds}s"),
            "--latency",
            "-s",
        ])
        .arg(&path)
        .arg(url)
        .output()
        .context("run wrk")?;
    let _ = std::fs::remove_file(&path);
    let text = String::from_utf8_lossy(&output.stdout).to_string();
    if !output.status.success() {
        bail!(
            "wrk failed: {text}{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let field = |prefix: &str| {
        text.lines()
            .find(|l| l.trim_start().starts_with(prefix))
            .and_then(|l| l.split_whitespace().nth(1).map(str::to_owned))
            .unwrap_or_default()
    };
    let number_after = |line_prefix: &str| -> u64 {
        text.lines()
            .find(|l| l.trim_start().starts_with(line_prefix))
            .and_then(|l| l.rsplit(':').next())
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    };
    let socket_errors: u64 = text
        .lines()
        .find(|l| l.trim_start().starts_with("Socket errors:"))
        .map(|l| {
            l.split(',')
                .filter_map(|part| part.split_whitespace().last())
                .filter_map(|n| n.parse::<u64>().ok())
                .sum()
        })
        .unwrap_or(0);
    let requests = text
        .lines()
        .find(|l| l.contains("requests in"))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    Ok(WrkRun {
        rps: text
            .lines()
            .find(|l| l.starts_with("Requests/sec:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0),
        p50_ms: parse_ms(&field("50%")),
        p99_ms: parse_ms(&field("99%")),
        requests,
        errors: number_after("Non-2xx or 3xx responses") + socket_errors,
    })
}

/// `ekm projections rebuild` as its own process: seconds taken and its peak RSS in MiB
/// (VmHWM, polled until it exits).
pub async fn rebuild_process(database_url: &str, data_dir: &Path) -> anyhow::Result<(f64, f64)> {
    let exe = std::env::current_exe()?.with_file_name("ekm");
    let log_path = temp_path(&format!(
        "ekm-rebuild-{}.log",
        chrono::Utc::now().format("%H%M%S")
    ));
    eprintln!("  (its log: {})", log_path.display());
    let started = Instant::now();
    let mut child = Command::new(&exe)
        .args([
            "projections",
            "rebuild",
            "--json",
            "--database-url",
            database_url,
        ])
        .arg("--data-dir")
        .arg(data_dir)
        // Phase timings of the rebuild, kept for the notes on where its time goes.
        .env("RUST_LOG", "ekm_projections=info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log_path)?)
        .spawn()
        .context("spawn ekm projections rebuild")?;
    let mut peak_kib: f64 = 0.0;
    loop {
        peak_kib = peak_kib.max(status_kib(child.id(), "VmHWM:"));
        if let Some(status) = child.try_wait()? {
            if !status.success() {
                bail!("ekm projections rebuild exited with {status}");
            }
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok((started.elapsed().as_secs_f64(), peak_kib / 1024.0))
}

/// CPU time in clock ticks (USER_HZ, 100 on Linux) of the server, of the PostgreSQL
/// backends serving one database, and of the whole machine (busy and total).
#[derive(Clone, Copy, Debug, Default)]
pub struct Usage {
    pub server: f64,
    pub postgres: f64,
    pub busy: f64,
    pub total: f64,
}

impl Usage {
    pub fn sample(server_pid: u32, database: Option<&str>) -> Usage {
        let ticks = |pid: &str| -> f64 {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|s| {
                    // Fields after the command name, which is in parentheses.
                    let rest = s.rsplit(')').next()?.to_owned();
                    let fields: Vec<&str> = rest.split_whitespace().collect();
                    let utime: f64 = fields.get(11)?.parse().ok()?;
                    let stime: f64 = fields.get(12)?.parse().ok()?;
                    Some(utime + stime)
                })
                .unwrap_or(0.0)
        };
        let mut postgres = 0.0;
        if let Some(database) = database {
            if let Ok(entries) = std::fs::read_dir("/proc") {
                for entry in entries.flatten() {
                    let name = entry.file_name().to_string_lossy().to_string();
                    if !name.bytes().all(|b| b.is_ascii_digit()) {
                        continue;
                    }
                    let cmdline =
                        std::fs::read(format!("/proc/{name}/cmdline")).unwrap_or_default();
                    let cmdline = String::from_utf8_lossy(&cmdline);
                    if cmdline.starts_with("postgres:") && cmdline.contains(database) {
                        postgres += ticks(&name);
                    }
                }
            }
        }
        let (busy, total) = std::fs::read_to_string("/proc/stat")
            .ok()
            .and_then(|s| {
                let line = s.lines().next()?.to_owned();
                let values: Vec<f64> = line
                    .split_whitespace()
                    .skip(1)
                    .filter_map(|v| v.parse().ok())
                    .collect();
                let total: f64 = values.iter().take(8).sum();
                let idle =
                    values.get(3).copied().unwrap_or(0.0) + values.get(4).copied().unwrap_or(0.0);
                Some((total - idle, total))
            })
            .unwrap_or((0.0, 0.0));
        Usage {
            server: ticks(&server_pid.to_string()),
            postgres,
            busy,
            total,
        }
    }

    pub fn since(&self, earlier: &Usage) -> Usage {
        Usage {
            server: self.server - earlier.server,
            postgres: self.postgres - earlier.postgres,
            busy: self.busy - earlier.busy,
            total: self.total - earlier.total,
        }
    }

    pub fn add(&mut self, other: &Usage) {
        self.server += other.server;
        self.postgres += other.postgres;
        self.busy += other.busy;
        self.total += other.total;
    }
}
