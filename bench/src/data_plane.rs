//! Data-plane benchmarks.

use std::io::Write;
use std::time::Instant;

use aes_siv::siv::Aes256Siv;
use aes_siv::KeyInit;
use ekm_keys::{Ciphertext, Kek};

use crate::report::{count, Figure, Stats};
use crate::server::{self, lua, wrk, Server};

const PAYLOAD: usize = 1024;

/// Operations per second of each op over `iterations` calls, in `rounds` rounds that run
/// the ops in turn, so that a noisy neighbour slows raw and ours alike within a round.
fn interleaved(iterations: u32, rounds: usize, ops: &mut [&mut dyn FnMut()]) -> Vec<Vec<f64>> {
    let mut rates = vec![vec![]; ops.len()];
    for _ in 0..rounds {
        for (i, op) in ops.iter_mut().enumerate() {
            let started = Instant::now();
            for _ in 0..iterations {
                op();
            }
            rates[i].push(f64::from(iterations) / started.elapsed().as_secs_f64());
        }
    }
    rates
}

/// The data plane's own path in process against raw AES-SIV, 1 KiB, cached key.
pub fn in_process() -> Vec<Figure> {
    let plaintext = vec![0x5au8; PAYLOAD];
    let kek = Kek::generate();
    let raw_key = [7u8; 64];
    let raw_sealed = Aes256Siv::new_from_slice(&raw_key)
        .ok()
        .and_then(|mut c| c.encrypt([&[1u8; 16][..]], &plaintext).ok())
        .unwrap_or_default();
    let scope = "0190c7a2-8a1e-7c3b-9d4e-2f1a3b5c6d7e";
    let parsed = Ciphertext::seal(&kek, scope, 1, "messages", &plaintext).ok();
    let text = parsed.as_ref().map(|p| p.to_string()).unwrap_or_default();
    let mut raw_encrypt = || {
        let mut cipher = Aes256Siv::new_from_slice(&raw_key).unwrap_or_else(|_| unreachable!());
        let nonce = [1u8; 16];
        std::hint::black_box(cipher.encrypt([&nonce[..]], &plaintext).ok());
    };
    let mut raw_decrypt = || {
        let mut cipher = Aes256Siv::new_from_slice(&raw_key).unwrap_or_else(|_| unreachable!());
        std::hint::black_box(cipher.decrypt([&[1u8; 16][..]], &raw_sealed).ok());
    };
    let mut ekm_seal_binary = || {
        std::hint::black_box(Ciphertext::seal(&kek, scope, 1, "messages", &plaintext).ok());
    };
    let mut ekm_open_binary = || {
        std::hint::black_box(parsed.as_ref().map(|p| p.open(&kek).ok()));
    };
    let mut ekm_encrypt = || {
        let sealed = Ciphertext::seal(&kek, scope, 1, "messages", &plaintext).ok();
        std::hint::black_box(sealed.map(|c| c.encode()));
    };
    let mut ekm_decrypt = || {
        let opened = Ciphertext::parse(&text)
            .ok()
            .and_then(|c| c.open(&kek).ok());
        std::hint::black_box(opened);
    };
    let rates = interleaved(
        20_000,
        9,
        &mut [
            &mut raw_encrypt,
            &mut raw_decrypt,
            &mut ekm_seal_binary,
            &mut ekm_open_binary,
            &mut ekm_encrypt,
            &mut ekm_decrypt,
        ],
    );
    let row = |name: &str, ours: usize, raw: usize, raw_name: &str, target: bool| {
        let ours_rates = &rates[ours];
        let raw_rates = &rates[raw];
        let stats = Stats::of(ours_rates);
        let raw_stats = Stats::of(raw_rates);
        // Ratio of the same round's rates, median over rounds.
        let ratios: Vec<f64> = ours_rates
            .iter()
            .zip(raw_rates)
            .map(|(o, r)| o / r)
            .collect();
        let ratio = Stats::of(&ratios);
        let figure = Figure::new(name)
            .median(format!("{} ops/s", count(stats.median)))
            .spread(format!(
                "{} ops/s; ratio per round {:.2}–{:.2}",
                stats.range(count),
                ratio.min,
                ratio.max
            ))
            .baseline(format!("{raw_name}: {} ops/s", count(raw_stats.median)))
            .ratio(ratio.median);
        if target {
            figure.target("≥ 0.70 of raw", ratio.median >= 0.70)
        } else {
            figure
        }
    };
    vec![
        row(
            "in-process seal, 1 KiB, cached key (nonce, associated data, AES-SIV)",
            2,
            0,
            "raw AES-256-SIV encrypt, 1 KiB",
            true,
        ),
        row(
            "in-process open, 1 KiB, cached key",
            3,
            1,
            "raw AES-256-SIV decrypt, 1 KiB",
            true,
        ),
        row(
            "in-process encrypt including the ciphertext string (base64url)",
            4,
            0,
            "raw AES-256-SIV encrypt",
            false,
        ),
        row(
            "in-process decrypt including parsing the string",
            5,
            1,
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
