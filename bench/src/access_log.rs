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

async fn start(dir: &Path, url: Option<&str>, mode: &str, metrics: &str) -> anyhow::Result<Server> {
    let _ = std::fs::remove_dir_all(dir);
    let env = [("EKM_ACCESS_LOG", mode), ("EKM_METRICS_LISTEN", metrics)];
    Ok(Server::start_with(dir, url, &env).await?.0)
}

/// The writer's commits so far, from the server's `/metrics`: (commits, records, seconds
/// spent committing).
async fn commits(metrics: &str) -> (f64, f64, f64) {
    let text = match reqwest::get(format!("http://{metrics}/metrics")).await {
        Ok(response) => response.text().await.unwrap_or_default(),
        Err(_) => String::new(),
    };
    let value = |name: &str| {
        text.lines()
            .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (
        value("ekm_access_log_flush_duration_seconds_count"),
        value("ekm_access_log_records_written_total"),
        value("ekm_access_log_flush_duration_seconds_sum"),
    )
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
    /// Per mode (off, durable, async): records per commit and the mean commit, over all runs.
    commits: Vec<Option<(f64, f64)>>,
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
    let mut metrics = vec![];
    for (mode, url) in names.iter().zip(urls.iter()) {
        let dir = server::temp_path(&format!("ekm-bench-access-{backend}-{mode}"));
        let listen = format!("127.0.0.1:{}", server::free_port()?);
        let server = start(&dir, url.as_deref(), mode, &listen).await?;
        targets.push(decrypt_url_and_script(&server).await?);
        servers.push((server, dir));
        metrics.push(listen);
    }
    let mut before = vec![];
    for listen in &metrics {
        before.push(commits(listen).await);
    }
    let mut runs: Vec<Vec<WrkRun>> = vec![vec![], vec![], vec![]];
    for round in 0..repeats {
        for (i, (url, script)) in targets.iter().enumerate() {
            eprintln!("{backend} round {}: {}", round + 1, names[i]);
            runs[i].push(server::wrk_with(url, script, seconds, connections)?);
        }
    }
    let mut per_commit = vec![];
    for (listen, (count, records, seconds)) in metrics.iter().zip(before) {
        let (count_now, records_now, seconds_now) = commits(listen).await;
        let count = count_now - count;
        per_commit.push((count > 0.0).then(|| {
            (
                (records_now - records) / count,
                (seconds_now - seconds) / count * 1000.0,
            )
        }));
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
        commits: per_commit,
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
        "| backend | access log | decrypt req/s, wrk -c{connections} (median of {repeats}) | p50 | p99 | not 2xx | ratio to off | records per commit | mean commit |"
    )?;
    writeln!(out, "|---|---|---|---|---|---|---|---|---|")?;
    for row in rows {
        let off = median(row.off.iter().map(|r| r.rps).collect());
        let line = |name: &str, runs: &[WrkRun], commits: Option<(f64, f64)>| {
            let rps = median(runs.iter().map(|r| r.rps).collect());
            let (per, ms) = match commits {
                Some((per, ms)) => (format!("{per:.1}"), format!("{ms:.2} ms")),
                None => ("-".to_owned(), "-".to_owned()),
            };
            format!(
                "| {} | {name} | {rps:.0} | {:.2} ms | {:.2} ms | {} | {:.2} | {per} | {ms} |",
                row.backend,
                median(runs.iter().map(|r| r.p50_ms).collect()),
                median(runs.iter().map(|r| r.p99_ms).collect()),
                runs.iter().map(|r| r.errors).sum::<u64>(),
                rps / off.max(1.0)
            )
        };
        let commits = |i: usize| row.commits.get(i).copied().flatten();
        writeln!(out, "{}", line("off", &row.off, commits(0)))?;
        for (i, (name, runs)) in row.modes.iter().enumerate() {
            writeln!(out, "{}", line(name, runs, commits(i + 1)))?;
        }
    }
    Ok(())
}
