//! Organization commands against the organization's history (issue 20, item 6):
//! `ekm-bench history --tokens N`.
//!
//! Every token issued is an event of the organization's aggregate, so an organization with
//! many tokens has a long history. Two organizations on one server, one with 10 tokens and
//! one with `N`: one client pauses and resumes each organization in turn, and the latencies
//! of the two are compared in the same run. Then the server restarts (nothing cached) and
//! the first command on each is timed: the one that loads the aggregate.

use std::io::Write as _;
use std::time::Instant;

use serde_json::json;

use crate::all::{call, create_org, lifecycle, progress, Org};
use crate::report::quantile;
use crate::server::{self, Server};
use crate::BenchDb;

async fn issue_tokens(
    client: &reqwest::Client,
    base: &str,
    org: &Org,
    count: usize,
) -> anyhow::Result<usize> {
    let mut tasks = tokio::task::JoinSet::new();
    for worker in 0..8 {
        let (client, base, id, admin) = (
            client.clone(),
            base.to_owned(),
            org.id.clone(),
            org.admin.clone(),
        );
        tasks.spawn(async move {
            // 8 writers on one organization's aggregate: a command that loses the race
            // 20 times answers 409 `conflict` (retryable), and is sent again.
            let mut refused = 0usize;
            for i in (worker..count).step_by(8) {
                loop {
                    let sent = call(
                        &client,
                        format!("{base}/v1/orgs/{id}/tokens"),
                        &admin,
                        json!({"principal": format!("svc-{i}"), "kind": "service"}),
                    )
                    .await;
                    match sent {
                        Ok(_) => break,
                        Err(error) if error.to_string().contains("409") => refused += 1,
                        Err(error) => return Err(error),
                    }
                }
            }
            Ok::<_, anyhow::Error>(refused)
        });
    }
    let mut refused = 0;
    while let Some(done) = tasks.join_next().await {
        refused += done??;
    }
    Ok(refused)
}

async fn backend(
    name: &str,
    database_url: Option<&str>,
    tokens: usize,
    rounds: usize,
) -> anyhow::Result<()> {
    let client = reqwest::Client::new();
    let dir = server::temp_path(&format!("ekm-bench-history-{name}"));
    let _ = std::fs::remove_dir_all(&dir);
    let (s, _) = Server::start(&dir, database_url).await?;
    let operator = s.operator_token()?;
    let small = create_org(&client, &s.base, &operator).await?;
    let big = create_org(&client, &s.base, &operator).await?;
    progress(format!("{name}: issuing 10 and {tokens} tokens"));
    let issuing = Instant::now();
    issue_tokens(&client, &s.base, &small, 10).await?;
    let refused = issue_tokens(&client, &s.base, &big, tokens).await?;
    progress(format!(
        "{name}: {tokens} tokens issued by 8 clients in {:.1} s; {refused} requests answered 409 (20 conflicts in a row) and were sent again",
        issuing.elapsed().as_secs_f64()
    ));
    progress(format!(
        "{name}: {rounds} pause/resume rounds on each, alternating"
    ));
    let (mut few, mut many) = (vec![], vec![]);
    for _ in 0..rounds {
        for verb in ["pause", "resume"] {
            few.push(lifecycle(&client, &s.base, &small.admin, &small.id, verb).await?);
            many.push(lifecycle(&client, &s.base, &big.admin, &big.id, verb).await?);
        }
    }
    s.stop();
    // Cold: a new process, nothing cached; the first command loads the aggregate.
    let (s, _) = Server::start(&dir, database_url).await?;
    let cold_many = lifecycle(&client, &s.base, &big.admin, &big.id, "pause").await?;
    let cold_few = lifecycle(&client, &s.base, &small.admin, &small.id, "pause").await?;
    s.stop();
    let _ = std::fs::remove_dir_all(&dir);
    let (few50, many50) = (quantile(&few, 0.5), quantile(&many, 0.5));
    let (few99, many99) = (quantile(&few, 0.99), quantile(&many, 0.99));
    let _ = writeln!(
        std::io::stdout().lock(),
        "| {name} | {many50:.2} ms (p99 {many99:.2}) | {few50:.2} ms (p99 {few99:.2}) | {:.2} | {cold_many:.2} ms | {cold_few:.2} ms |",
        many50 / few50
    );
    Ok(())
}

pub async fn run(tokens: usize, rounds: usize) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(
        out,
        "| backend | organization with {tokens} tokens: pause/resume p50 | with 10 tokens | ratio | first command after a restart, {tokens} tokens | with 10 tokens |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|");
    drop(out);
    backend("SQLite", None, tokens, rounds).await?;
    let pg = BenchDb::create().await?;
    let result = backend("PostgreSQL", Some(&pg.url), tokens, rounds).await;
    let _ = pg.drop_db().await;
    result
}
