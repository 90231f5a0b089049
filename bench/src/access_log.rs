//! The access log's cost (issue 16 §1): HTTP decrypt of 1 KiB with the durable access log
//! against the same server binary with the log off, alternating runs in the same session, on
//! SQLite and PostgreSQL. Target: durable ≥ 0.7 of off, p99 ≤ 5 ms.

use std::io::Write;
use std::path::Path;

use crate::server::{self, Server, WrkRun};
use crate::BenchDb;

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(0.0)
}

async fn start(dir: &Path, url: Option<&str>, mode: &str) -> anyhow::Result<Server> {
    let _ = std::fs::remove_dir_all(dir);
    Ok(Server::start_with(dir, url, &[("EKM_ACCESS_LOG", mode)])
        .await?
        .0)
}

async fn decrypt_url_and_script(server: &Server) -> anyhow::Result<(String, String)> {
    let client = reqwest::Client::new();
    let data = crate::all::data_org(&client, &server.base, &server.operator_token()?).await?;
    Ok((
        format!("{}/v1/scopes/{}/decrypt", server.base, data.scope),
        server::lua(&data.token, Some(&data.decrypt_body)),
    ))
}

struct Row {
    backend: &'static str,
    off: Vec<WrkRun>,
    modes: Vec<(&'static str, Vec<WrkRun>)>,
}

async fn backend(
    backend: &'static str,
    urls: [Option<String>; 3],
    seconds: u64,
    repeats: usize,
    connections: u32,
) -> anyhow::Result<Row> {
    let names = ["off", "durable", "async"];
    let mut servers = vec![];
    let mut targets = vec![];
    for (mode, url) in names.iter().zip(urls.iter()) {
        let dir = server::temp_path(&format!("ekm-bench-access-{backend}-{mode}"));
        let server = start(&dir, url.as_deref(), mode).await?;
        targets.push(decrypt_url_and_script(&server).await?);
        servers.push((server, dir));
    }
    let mut runs: Vec<Vec<WrkRun>> = vec![vec![], vec![], vec![]];
    for round in 0..repeats {
        for (i, (url, script)) in targets.iter().enumerate() {
            eprintln!("{backend} round {}: {}", round + 1, names[i]);
            runs[i].push(server::wrk_with(url, script, seconds, connections)?);
        }
    }
    for (server, dir) in servers {
        server.stop();
        let _ = std::fs::remove_dir_all(dir);
    }
    let mut runs = runs.into_iter();
    let off = runs.next().unwrap_or_default();
    Ok(Row {
        backend,
        off,
        modes: vec![
            ("durable", runs.next().unwrap_or_default()),
            ("async", runs.next().unwrap_or_default()),
        ],
    })
}

pub async fn run(seconds: u64, repeats: usize, connections: u32) -> anyhow::Result<()> {
    server::ensure_wrk()?;
    let mut rows =
        vec![backend("SQLite", [None, None, None], seconds, repeats, connections).await?];
    let dbs = [
        BenchDb::create().await?,
        BenchDb::create().await?,
        BenchDb::create().await?,
    ];
    let urls = [
        Some(dbs[0].url.clone()),
        Some(dbs[1].url.clone()),
        Some(dbs[2].url.clone()),
    ];
    let pg = backend("PostgreSQL", urls, seconds, repeats, connections).await;
    for db in &dbs {
        let _ = db.drop_db().await;
    }
    rows.push(pg?);

    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "| backend | access log | decrypt req/s, wrk -c{connections} (median of {repeats}) | p50 | p99 | not 2xx | ratio to off |"
    )?;
    writeln!(out, "|---|---|---|---|---|---|---|")?;
    for row in rows {
        let off = median(row.off.iter().map(|r| r.rps).collect());
        let line = |name: &str, runs: &[WrkRun]| {
            let rps = median(runs.iter().map(|r| r.rps).collect());
            format!(
                "| {} | {name} | {rps:.0} | {:.2} ms | {:.2} ms | {} | {:.2} |",
                row.backend,
                median(runs.iter().map(|r| r.p50_ms).collect()),
                median(runs.iter().map(|r| r.p99_ms).collect()),
                runs.iter().map(|r| r.errors).sum::<u64>(),
                rps / off.max(1.0)
            )
        };
        writeln!(out, "{}", line("off", &row.off))?;
        for (name, runs) in &row.modes {
            writeln!(out, "{}", line(name, runs))?;
        }
    }
    Ok(())
}
