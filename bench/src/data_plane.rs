//! Data-plane benchmarks.

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use aes_siv::siv::Aes256Siv;
use aes_siv::KeyInit;
use anyhow::{bail, Context};
use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use ekm_keys::{Ciphertext, Kek};
use serde_json::{json, Value};

const PAYLOAD: usize = 1024;

/// Operations per second over `iterations` calls, median of five runs.
fn rate(iterations: u32, mut op: impl FnMut()) -> f64 {
    let mut runs: Vec<f64> = (0..5)
        .map(|_| {
            let started = Instant::now();
            for _ in 0..iterations {
                op();
            }
            f64::from(iterations) / started.elapsed().as_secs_f64()
        })
        .collect();
    runs.sort_by(|a, b| a.total_cmp(b));
    runs[2]
}

struct Wrk {
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
}

fn ensure_wrk() -> anyhow::Result<()> {
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

fn wrk(url: &str, token: &str, body: Option<&str>, seconds: u64) -> anyhow::Result<Wrk> {
    let script = tempfile_path("ekm-wrk.lua");
    let mut lua = format!("wrk.headers[\"Authorization\"] = \"Bearer {token}\"\n");
    if let Some(body) = body {
        lua.push_str(
            "wrk.method = \"POST\"\nwrk.headers[\"Content-Type\"] = \"application/json\"\n",
        );
        lua.push_str(&format!("wrk.body = [[{body}]]\n"));
    }
    lua.push_str("response = function(status, headers, body) if status ~= 200 then error(\"status \" .. status) end end\n");
    std::fs::write(&script, lua)?;
    let output = Command::new("wrk")
        .args(["-t2", "-c16", &format!("-d{seconds}s"), "--latency", "-s"])
        .arg(&script)
        .arg(url)
        .output()
        .context("run wrk")?;
    let text = String::from_utf8_lossy(&output.stdout).to_string();
    if text.contains("Non-2xx") || !output.status.success() {
        bail!("wrk saw errors: {text}");
    }
    let field = |prefix: &str| {
        text.lines()
            .find(|l| l.trim_start().starts_with(prefix))
            .and_then(|l| l.split_whitespace().nth(1).map(str::to_owned))
            .unwrap_or_default()
    };
    Ok(Wrk {
        rps: text
            .lines()
            .find(|l| l.starts_with("Requests/sec:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0),
        p50_ms: parse_ms(&field("50%")),
        p99_ms: parse_ms(&field("99%")),
    })
}

fn tempfile_path(name: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("{}-{name}", std::process::id()))
}

pub async fn run(seconds: u64) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    // In process: the data plane's own path against raw AES-SIV, 1 KiB.
    let plaintext = vec![0x5au8; PAYLOAD];
    let kek = Kek::generate();
    let raw_key = [7u8; 64];
    let raw_encrypt = rate(20_000, || {
        let mut cipher = Aes256Siv::new_from_slice(&raw_key).unwrap_or_else(|_| unreachable!());
        let nonce = [1u8; 16];
        std::hint::black_box(cipher.encrypt([&nonce[..]], &plaintext).ok());
    });
    let raw_sealed = Aes256Siv::new_from_slice(&raw_key)
        .map_err(|_| anyhow::anyhow!("key"))?
        .encrypt([&[1u8; 16][..]], &plaintext)
        .map_err(|_| anyhow::anyhow!("seal"))?;
    let raw_decrypt = rate(20_000, || {
        let mut cipher = Aes256Siv::new_from_slice(&raw_key).unwrap_or_else(|_| unreachable!());
        std::hint::black_box(cipher.decrypt([&[1u8; 16][..]], &raw_sealed).ok());
    });
    let scope = "0190c7a2-8a1e-7c3b-9d4e-2f1a3b5c6d7e";
    let ekm_encrypt = rate(20_000, || {
        let sealed = Ciphertext::seal(&kek, scope, 1, "messages", &plaintext).ok();
        std::hint::black_box(sealed.map(|c| c.encode()));
    });
    let ekm_seal_binary = rate(20_000, || {
        std::hint::black_box(Ciphertext::seal(&kek, scope, 1, "messages", &plaintext).ok());
    });
    let parsed =
        Ciphertext::seal(&kek, scope, 1, "messages", &plaintext).map_err(anyhow::Error::msg)?;
    let ekm_open_binary = rate(20_000, || {
        std::hint::black_box(parsed.open(&kek).ok());
    });
    let text = Ciphertext::seal(&kek, scope, 1, "messages", &plaintext)
        .map_err(anyhow::Error::msg)?
        .to_string();
    let ekm_decrypt = rate(20_000, || {
        let opened = Ciphertext::parse(&text)
            .ok()
            .and_then(|c| c.open(&kek).ok());
        std::hint::black_box(opened);
    });

    // Over HTTP: the release server, SQLite, on loopback.
    ensure_wrk()?;
    let exe = std::env::current_exe()?.with_file_name("ekm");
    if !exe.exists() {
        bail!("build the server first: cargo build --release --bin ekm");
    }
    let dir = tempfile_path("ekm-bench-data");
    let _ = std::fs::remove_dir_all(&dir);
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let mut server = Command::new(&exe)
        .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
        .arg("--data-dir")
        .arg(&dir)
        .env("RUST_LOG", "warn")
        .stderr(Stdio::null())
        .spawn()?;
    let base = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::new();
    let started = Instant::now();
    while client.get(format!("{base}/healthz")).send().await.is_err() {
        if started.elapsed() > Duration::from_secs(30) {
            bail!("the server did not start");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let operator = std::fs::read_to_string(dir.join("operator.token"))?
        .trim()
        .to_owned();
    let org: Value = client
        .post(format!("{base}/v1/orgs"))
        .bearer_auth(&operator)
        .json(&json!({"name": "bench", "plan": "enterprise", "tier": "managed"}))
        .send()
        .await?
        .json()
        .await?;
    let admin = org["admin_token"].as_str().unwrap_or_default().to_owned();
    let org_id = org["id"].as_str().unwrap_or_default().to_owned();
    let team: Value = client
        .post(format!("{base}/v1/scopes"))
        .bearer_auth(&admin)
        .json(&json!({"kind": "team", "name": "t", "parent_id": org_id}))
        .send()
        .await?
        .json()
        .await?;
    let team_id = team["id"].as_str().unwrap_or_default().to_owned();
    let encrypt_body =
        json!({"plaintext": STANDARD.encode(&plaintext), "class": "messages"}).to_string();
    let sealed: Value = client
        .post(format!("{base}/v1/scopes/{team_id}/encrypt"))
        .bearer_auth(&admin)
        .body(encrypt_body.clone())
        .send()
        .await?
        .json()
        .await?;
    let decrypt_body = json!({"ciphertext": sealed["ciphertext"], "class": "messages"}).to_string();

    let hello = wrk(&format!("{base}/healthz"), &admin, None, seconds)?;
    let encrypt = wrk(
        &format!("{base}/v1/scopes/{team_id}/encrypt"),
        &admin,
        Some(&encrypt_body),
        seconds,
    )?;
    let decrypt = wrk(
        &format!("{base}/v1/scopes/{team_id}/decrypt"),
        &admin,
        Some(&decrypt_body),
        seconds,
    )?;
    let hello_after = wrk(&format!("{base}/healthz"), &admin, None, seconds)?;
    let _ = server.kill();
    let _ = server.wait();
    let _ = std::fs::remove_dir_all(&dir);
    let hello_rps = (hello.rps + hello_after.rps) / 2.0;

    writeln!(
        out,
        "| figure | measured | baseline (same run) | ratio | target |"
    )?;
    writeln!(out, "|---|---|---|---|---|")?;
    writeln!(out, "| in-process encrypt, 1 KiB, cached key (ciphertext string included) | {ekm_encrypt:.0} ops/s | raw AES-256-SIV encrypt, 1 KiB: {raw_encrypt:.0} ops/s | {:.2} | ≥ 0.70 |", ekm_encrypt / raw_encrypt)?;
    writeln!(out, "| in-process seal, 1 KiB, cached key (binary: nonce, associated data, SIV) | {ekm_seal_binary:.0} ops/s | raw AES-256-SIV encrypt, 1 KiB: {raw_encrypt:.0} ops/s | {:.2} | ≥ 0.70 |", ekm_seal_binary / raw_encrypt)?;
    writeln!(out, "| in-process open, 1 KiB (binary) | {ekm_open_binary:.0} ops/s | raw AES-256-SIV decrypt, 1 KiB: {raw_decrypt:.0} ops/s | {:.2} | ≥ 0.70 |", ekm_open_binary / raw_decrypt)?;
    writeln!(out, "| in-process decrypt, 1 KiB (ciphertext string parsed) | {ekm_decrypt:.0} ops/s | raw AES-256-SIV decrypt, 1 KiB: {raw_decrypt:.0} ops/s | {:.2} | ≥ 0.70 |", ekm_decrypt / raw_decrypt)?;
    writeln!(out, "| HTTP encrypt 1 KiB, 16 keep-alive connections (wrk, same 2 cores) | {:.0} req/s, p50 {:.2} ms, p99 {:.2} ms | GET /healthz: {hello_rps:.0} req/s | {:.2} | ≥ 20,000 req/s, p99 ≤ 5 ms |", encrypt.rps, encrypt.p50_ms, encrypt.p99_ms, encrypt.rps / hello_rps)?;
    writeln!(out, "| HTTP decrypt 1 KiB, same load | {:.0} req/s, p50 {:.2} ms, p99 {:.2} ms | GET /healthz: {hello_rps:.0} req/s | {:.2} | |", decrypt.rps, decrypt.p50_ms, decrypt.p99_ms, decrypt.rps / hello_rps)?;
    Ok(())
}
