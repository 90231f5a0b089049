//! Batches on the data plane (issue 18 §5): HTTP decrypt of 1 KiB items, a batch of `items`
//! in one request against one item per request, alternating runs against the same server
//! (SQLite, the server's defaults: the access log durable). Target: ≥ 3× the items per
//! second of single requests.

use std::io::Write;

use serde_json::{json, Value};

use crate::server::{self, Server, WrkRun};

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(0.0)
}

pub async fn run(
    items: usize,
    seconds: u64,
    repeats: usize,
    connections: u32,
) -> anyhow::Result<()> {
    server::ensure_wrk()?;
    let dir = server::temp_path("ekm-bench-batch");
    let _ = std::fs::remove_dir_all(&dir);
    let (server, _) = Server::start(&dir, None).await?;
    let client = reqwest::Client::new();
    let data = crate::all::data_org(&client, &server.base, &server.operator_token()?).await?;
    let url = format!("{}/v1/scopes/{}/decrypt", server.base, data.scope);
    let one: Value = serde_json::from_str(&data.decrypt_body)?;
    let batch = json!({ "items": vec![one; items] }).to_string();
    let scripts = [
        server::lua(&data.token, Some(&data.decrypt_body)),
        server::lua(&data.token, Some(&batch)),
    ];
    // The batch answers 200 even when an item is refused: check that every item is served.
    let answered: Value = client
        .post(&url)
        .bearer_auth(&data.token)
        .header("content-type", "application/json")
        .body(batch.clone())
        .send()
        .await?
        .json()
        .await?;
    let served = answered["items"]
        .as_array()
        .map(|items| {
            items
                .iter()
                .filter(|i| i.get("plaintext").is_some())
                .count()
        })
        .unwrap_or(0);
    anyhow::ensure!(
        served == items,
        "the batch served {served} of {items} items: {answered}"
    );
    let mut runs: [Vec<WrkRun>; 2] = [vec![], vec![]];
    for round in 0..repeats {
        for (i, script) in scripts.iter().enumerate() {
            eprintln!("batch round {}: {}", round + 1, ["single", "batch"][i]);
            runs[i].push(server::wrk_with(&url, script, seconds, connections)?);
        }
    }
    server.stop();
    let _ = std::fs::remove_dir_all(&dir);

    let per_request = [1.0, items as f64];
    let rate = |i: usize| median(runs[i].iter().map(|r| r.rps * per_request[i]).collect());
    let single = rate(0);
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "| decrypt of 1 KiB, wrk -c{connections} (median of {repeats}) | requests/s | items/s | p50 | p99 | not 2xx | items/s against single |"
    )?;
    writeln!(out, "|---|---|---|---|---|---|---|")?;
    for (i, name) in [
        "one item per request",
        &format!("{items} items per request"),
    ]
    .iter()
    .enumerate()
    {
        writeln!(
            out,
            "| {name} | {:.0} | {:.0} | {:.2} ms | {:.2} ms | {} | {:.2} |",
            median(runs[i].iter().map(|r| r.rps).collect()),
            rate(i),
            median(runs[i].iter().map(|r| r.p50_ms).collect()),
            median(runs[i].iter().map(|r| r.p99_ms).collect()),
            runs[i].iter().map(|r| r.errors).sum::<u64>(),
            rate(i) / single.max(1.0)
        )?;
    }
    Ok(())
}
