//! Durable lifecycle commands against raw INSERTs (issue 15): `ekm-bench commands`.
//!
//! 8 clients pause and resume a thread each over HTTP on a real `ekm serve` (release), runs
//! alternating with 8 connections inserting one event-shaped row per transaction. On
//! PostgreSQL, `pg_stat_wal` before and after each run gives WAL flushes (`wal_sync`) per
//! commit: fewer than one shows commits sharing flushes (group commit).

use crate::all::{
    command_load, create_org, create_scope, progress, raw_inserts_postgres, raw_inserts_sqlite,
    CommandRun,
};
use crate::server::{self, Server};
use crate::BenchDb;

/// WAL flushes and writes of the cluster so far.
async fn wal(url: &str) -> anyhow::Result<(i64, i64)> {
    let mut conn: sqlx::PgConnection = sqlx::Connection::connect(url).await?;
    let row: (i64, i64) = sqlx::query_as("SELECT wal_sync, wal_write FROM pg_stat_wal")
        .fetch_one(&mut conn)
        .await?;
    Ok(row)
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(0.0)
}

fn p(latencies: &[CommandRun], q: f64) -> f64 {
    let mut all: Vec<f64> = latencies
        .iter()
        .flat_map(|r| r.latencies_ms.iter().copied())
        .collect();
    all.sort_by(f64::total_cmp);
    let i = ((all.len() as f64 - 1.0) * q).round() as usize;
    all.get(i).copied().unwrap_or(0.0)
}

async fn threads(client: &reqwest::Client, s: &Server) -> anyhow::Result<(String, Vec<String>)> {
    let operator = s.operator_token()?;
    let org = create_org(client, &s.base, &operator).await?;
    let team = create_scope(client, &s.base, &org.admin, "team", "t", &org.id).await?;
    let mut threads = vec![];
    for i in 0..8 {
        threads.push(
            create_scope(
                client,
                &s.base,
                &org.admin,
                "thread",
                &format!("c{i}"),
                &team,
            )
            .await?,
        );
    }
    Ok((org.admin, threads))
}

pub async fn run(seconds: u64, repeats: usize) -> anyhow::Result<()> {
    let client = reqwest::Client::new();

    // PostgreSQL.
    let pg = BenchDb::create().await?;
    let dir = server::temp_path("ekm-bench-commands-pg");
    let _ = std::fs::remove_dir_all(&dir);
    let result = async {
        let (s, _) = Server::start(&dir, Some(&pg.url)).await?;
        let (admin, scopes) = threads(&client, &s).await?;
        let (mut commands, mut inserts) = (vec![], vec![]);
        let (mut command_flushes, mut insert_flushes) = (vec![], vec![]);
        for round in 0..repeats {
            progress(format!("PostgreSQL round {}: raw INSERTs", round + 1));
            let before = wal(&pg.url).await?;
            let rate = raw_inserts_postgres(&pg.url, seconds).await?;
            let after = wal(&pg.url).await?;
            insert_flushes.push((after.0 - before.0) as f64 / (rate * seconds as f64));
            inserts.push(rate);
            progress(format!("PostgreSQL round {}: commands", round + 1));
            let before = wal(&pg.url).await?;
            let run = command_load(&client, &s.base, &admin, &scopes, seconds).await?;
            let after = wal(&pg.url).await?;
            command_flushes
                .push((after.0 - before.0) as f64 / run.latencies_ms.len().max(1) as f64);
            commands.push(run);
        }
        s.stop();
        report(
            "PostgreSQL",
            &commands,
            &inserts,
            Some((&command_flushes, &insert_flushes)),
        );
        Ok::<_, anyhow::Error>(())
    }
    .await;
    let _ = pg.drop_db().await;
    let _ = std::fs::remove_dir_all(&dir);
    result?;

    // SQLite.
    let dir = server::temp_path("ekm-bench-commands-sqlite");
    let _ = std::fs::remove_dir_all(&dir);
    let (s, _) = Server::start(&dir, None).await?;
    let (admin, scopes) = threads(&client, &s).await?;
    let (mut commands, mut inserts) = (vec![], vec![]);
    for round in 0..repeats {
        progress(format!("SQLite round {}: raw INSERTs", round + 1));
        // Its own file beside the server's: one writer per file.
        inserts.push(raw_inserts_sqlite(&dir.join("bench-raw.db"), seconds).await?);
        progress(format!("SQLite round {}: commands", round + 1));
        commands.push(command_load(&client, &s.base, &admin, &scopes, seconds).await?);
    }
    s.stop();
    let _ = std::fs::remove_dir_all(&dir);
    report("SQLite", &commands, &inserts, None);
    Ok(())
}

fn report(
    backend: &str,
    commands: &[CommandRun],
    inserts: &[f64],
    flushes: Option<(&[f64], &[f64])>,
) {
    let rate = median(commands.iter().map(|c| c.rate).collect());
    let raw = median(inserts.to_vec());
    let errors: usize = commands.iter().map(|c| c.errors).sum();
    use std::io::Write;
    let _ = writeln!(
        std::io::stdout().lock(),
        "| {backend} | {rate:.0} commands/s (p50 {:.2} ms, p99 {:.2} ms, {errors} refused) | {raw:.0} rows/s | {:.2} |{}",
        p(commands, 0.5),
        p(commands, 0.99),
        rate / raw.max(1.0),
        match flushes {
            Some((c, i)) => format!(
                " {:.2} per command, {:.2} per raw INSERT |",
                median(c.to_vec()),
                median(i.to_vec())
            ),
            None => " (no WAL statistics) |".into(),
        }
    );
}
