//! The rate limits' cost (issue 18 §4, ADR 0036): HTTP decrypt of 1 KiB through the
//! buckets (every limit at 10,000,000 a second: none refuses, every request takes from two
//! buckets) against the same binary with every limit off, alternating runs in the same
//! session, on SQLite with the access log off (the fastest path, where the buckets' cost
//! shows most).

use std::io::Write;

use crate::server::{self, Server, WrkRun};

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(0.0)
}

pub async fn run(seconds: u64, repeats: usize, connections: u32) -> anyhow::Result<()> {
    server::ensure_wrk()?;
    let off = [
        ("EKM_ACCESS_LOG", "off"),
        ("EKM_RATE_LIMIT_DATA_PLANE_PRINCIPAL", "off"),
        ("EKM_RATE_LIMIT_DATA_PLANE_ORGANIZATION", "off"),
        ("EKM_RATE_LIMIT_COMMANDS_PRINCIPAL", "off"),
        ("EKM_RATE_LIMIT_COMMANDS_ORGANIZATION", "off"),
    ];
    let on = [("EKM_ACCESS_LOG", "off")];
    let mut servers = vec![];
    let mut targets = vec![];
    for (name, env) in [("off", &off[..]), ("on", &on[..])] {
        let dir = server::temp_path(&format!("ekm-bench-rate-{name}"));
        let _ = std::fs::remove_dir_all(&dir);
        let (server, _) = Server::start_with(&dir, None, env).await?;
        let client = reqwest::Client::new();
        let data = crate::all::data_org(&client, &server.base, &server.operator_token()?).await?;
        targets.push((
            format!("{}/v1/scopes/{}/decrypt", server.base, data.scope),
            server::lua(&data.token, Some(&data.decrypt_body)),
        ));
        servers.push((server, dir));
    }
    let mut runs: Vec<Vec<WrkRun>> = vec![vec![], vec![]];
    for round in 0..repeats {
        for (i, (url, script)) in targets.iter().enumerate() {
            eprintln!("round {}: limits {}", round + 1, ["off", "on"][i]);
            runs[i].push(server::wrk_with(url, script, seconds, connections)?);
        }
    }
    for (server, dir) in servers {
        server.stop();
        let _ = std::fs::remove_dir_all(dir);
    }
    let baseline = median(runs[0].iter().map(|r| r.rps).collect());
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "| rate limits | decrypt req/s, wrk -c{connections} (median of {repeats}) | p50 | p99 | not 2xx | ratio to off |"
    )?;
    writeln!(out, "|---|---|---|---|---|---|")?;
    for (name, runs) in ["off", "on (two buckets per request)"].iter().zip(&runs) {
        let rps = median(runs.iter().map(|r| r.rps).collect());
        writeln!(
            out,
            "| {name} | {rps:.0} | {:.2} ms | {:.2} ms | {} | {:.3} |",
            median(runs.iter().map(|r| r.p50_ms).collect()),
            median(runs.iter().map(|r| r.p99_ms).collect()),
            runs.iter().map(|r| r.errors).sum::<u64>(),
            rps / baseline.max(1.0)
        )?;
    }
    Ok(())
}
