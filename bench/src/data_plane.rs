//! Data-plane benchmarks.

use std::io::Write;
use std::time::Instant;

use aes_siv::siv::Aes256Siv;
use aes_siv::KeyInit;
use ekm_keys::{Ciphertext, Kek};

use crate::report::{count, Figure, Stats};
use crate::server::{self, lua, wrk, Server};

const PAYLOAD: usize = 1024;

/// Operations per second over `iterations` calls, five runs.
fn rate(iterations: u32, mut op: impl FnMut()) -> Stats {
    let runs: Vec<f64> = (0..5)
        .map(|_| {
            let started = Instant::now();
            for _ in 0..iterations {
                op();
            }
            f64::from(iterations) / started.elapsed().as_secs_f64()
        })
        .collect();
    Stats::of(&runs)
}

/// The data plane's own path in process against raw AES-SIV, 1 KiB, cached key.
pub fn in_process() -> Vec<Figure> {
    let plaintext = vec![0x5au8; PAYLOAD];
    let kek = Kek::generate();
    let raw_key = [7u8; 64];
    let raw_encrypt = rate(20_000, || {
        let mut cipher = Aes256Siv::new_from_slice(&raw_key).unwrap_or_else(|_| unreachable!());
        let nonce = [1u8; 16];
        std::hint::black_box(cipher.encrypt([&nonce[..]], &plaintext).ok());
    });
    let raw_sealed = Aes256Siv::new_from_slice(&raw_key)
        .ok()
        .and_then(|mut c| c.encrypt([&[1u8; 16][..]], &plaintext).ok())
        .unwrap_or_default();
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
    let parsed = Ciphertext::seal(&kek, scope, 1, "messages", &plaintext).ok();
    let ekm_open_binary = rate(20_000, || {
        std::hint::black_box(parsed.as_ref().map(|p| p.open(&kek).ok()));
    });
    let text = parsed.as_ref().map(|p| p.to_string()).unwrap_or_default();
    let ekm_decrypt = rate(20_000, || {
        let opened = Ciphertext::parse(&text)
            .ok()
            .and_then(|c| c.open(&kek).ok());
        std::hint::black_box(opened);
    });
    let row = |name: &str, ours: Stats, raw: Stats, raw_name: &str, target: bool| {
        let figure = Figure::new(name)
            .median(format!("{} ops/s", count(ours.median)))
            .spread(ours.range(count))
            .baseline(format!("{raw_name}: {} ops/s", count(raw.median)))
            .ratio(ours.median / raw.median);
        if target {
            figure.target("≥ 0.70 of raw", ours.median / raw.median >= 0.70)
        } else {
            figure
        }
    };
    vec![
        row(
            "in-process seal, 1 KiB, cached key (nonce, associated data, AES-SIV)",
            ekm_seal_binary,
            raw_encrypt,
            "raw AES-256-SIV encrypt, 1 KiB",
            true,
        ),
        row(
            "in-process open, 1 KiB, cached key",
            ekm_open_binary,
            raw_decrypt,
            "raw AES-256-SIV decrypt, 1 KiB",
            true,
        ),
        row(
            "in-process encrypt including the ciphertext string (base64url)",
            ekm_encrypt,
            raw_encrypt,
            "raw AES-256-SIV encrypt",
            false,
        ),
        row(
            "in-process decrypt including parsing the string",
            ekm_decrypt,
            raw_decrypt,
            "raw AES-256-SIV decrypt",
            false,
        ),
    ]
}

/// The data plane alone: in process, then over HTTP on a release `ekm serve` (SQLite).
pub async fn run(seconds: u64) -> anyhow::Result<()> {
    let mut figures = in_process();
    server::ensure_wrk()?;
    let dir = server::temp_path("ekm-bench-data");
    let _ = std::fs::remove_dir_all(&dir);
    let (server, _) = Server::start(&dir, None).await?;
    let result = http(&server, seconds).await;
    server.stop();
    let _ = std::fs::remove_dir_all(&dir);
    figures.extend(result?);
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "{}",
        crate::report::render(&figures, &[], &crate::report::machine(false), 0.0)
    )?;
    Ok(())
}

async fn http(server: &Server, seconds: u64) -> anyhow::Result<Vec<Figure>> {
    let client = reqwest::Client::new();
    let operator = server.operator_token()?;
    let data = crate::all::data_org(&client, &server.base, &operator).await?;
    let base = &server.base;
    let hello = [wrk(
        &format!("{base}/healthz"),
        &lua(&data.token, None),
        seconds,
    )?];
    let encrypt = [wrk(
        &format!("{base}/v1/scopes/{}/encrypt", data.scope),
        &lua(&data.token, Some(&data.encrypt_body)),
        seconds,
    )?];
    let decrypt = [wrk(
        &format!("{base}/v1/scopes/{}/decrypt", data.scope),
        &lua(&data.token, Some(&data.decrypt_body)),
        seconds,
    )?];
    Ok(vec![
        crate::all::load_figure(
            "HTTP encrypt 1 KiB, wrk -t2 -c16".into(),
            &encrypt,
            "GET /healthz",
            &hello,
        ),
        crate::all::load_figure(
            "HTTP decrypt 1 KiB, same load".into(),
            &decrypt,
            "GET /healthz",
            &hello,
        ),
    ])
}
