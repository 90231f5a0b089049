//! `ekm-bench`: measures EKM and prints a Markdown table, each figure beside a baseline
//! measured in the same run, so ratios survive a noisy machine.
//!
//! `bench/run [--quick]` builds and runs `ekm-bench all`, which rewrites the figures table
//! of BENCHMARKS.md; `cargo run --release -p ekm-bench -- projections --events 1000000`
//! (PostgreSQL from `EKM_BENCH_DATABASE_URL`, default the local server; a fresh database is
//! created and dropped).

use std::collections::HashMap;
use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Parser, Subcommand};
use ekm_domain::{
    Actor, ActorKind, EventMetadata, Location, OrgId, Reason, ScopeEvent, ScopeId, ScopeKind,
    ScopeName,
};
use ekm_projections::{audit_pages, rebuild, AuditFilter, Projector, ProjectorConfig};
use ekm_store::{Db, DbConfig};

use crate::seed::EventBatch;

mod access_log;
mod all;
mod batch;
mod commands;
mod data_plane;
mod history;
mod kms;
mod rate_limits;
mod reads;
mod rekey;
mod report;
mod rotation;
mod schedule;
mod seed;
mod server;
mod soak;

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    command: Bench,
}

#[derive(Subcommand)]
enum Bench {
    /// Every figure of BENCHMARKS.md beside its baseline, in one run (PostgreSQL from
    /// `EKM_BENCH_DATABASE_URL` or the local server; SQLite in a temporary directory).
    All {
        /// Smaller sizes and shorter runs (within 3 minutes).
        #[arg(long)]
        quick: bool,
        /// Rewrite the figures table of this file (between its bench:figures markers).
        #[arg(long)]
        write: Option<std::path::PathBuf>,
    },
    /// Rebuild rate, audit export rate and live catch-up lag on PostgreSQL.
    Projections {
        /// Events in the seeded history.
        #[arg(long, default_value_t = 1_000_000)]
        events: usize,
    },
    /// In-process encrypt/decrypt against raw AES-SIV, and the HTTP data plane of a real
    /// `ekm serve` (release, SQLite) under wrk against its /healthz.
    DataPlane {
        /// Seconds per HTTP run.
        #[arg(long, default_value_t = 10)]
        seconds: u64,
    },
    /// Cold unwrap latency through AWS KMS (a moto_server it starts) against a bare call.
    Kms {
        #[arg(long, default_value_t = 300)]
        unwraps: usize,
    },
    /// `GET /v1/scopes/{leaf}` on a big tree, answered from the in-memory scope tree and
    /// from SQL (`--scope-reads sql`), with start-up time and server RSS of each (PostgreSQL).
    Reads {
        /// Teams under one organization, each with a nested team of 999 threads (1,000: 1M scopes).
        #[arg(long, default_value_t = 1_000)]
        teams: usize,
        /// Seconds per wrk run.
        #[arg(long, default_value_t = 5)]
        seconds: u64,
        /// wrk runs per mode.
        #[arg(long, default_value_t = 3)]
        repeats: usize,
    },
    /// The re-key after a revoke: a parent's children re-wrapped per second, SQLite and
    /// PostgreSQL, against raw AES-SIV unwrap+wrap in the same run.
    Rekey {
        #[arg(long, default_value_t = 100_000)]
        children: usize,
    },
    /// Durable lifecycle commands (8 clients, pause/resume) against raw single-row INSERTs,
    /// on PostgreSQL and SQLite, with PostgreSQL's WAL flushes per commit (`pg_stat_wal`).
    Commands {
        /// Seconds per run.
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        /// Runs of each, alternating.
        #[arg(long, default_value_t = 3)]
        repeats: usize,
    },
    /// Organization commands against the organization's history: pause/resume latency of an
    /// organization with `tokens` tokens against one with 10, in the same run, warm and
    /// after a restart; SQLite and PostgreSQL.
    History {
        #[arg(long, default_value_t = 10_000)]
        tokens: usize,
        /// Pause/resume rounds on each organization.
        #[arg(long, default_value_t = 200)]
        rounds: usize,
    },
    /// The scheduler's lateness: pauses given `until` and when their resumes were recorded,
    /// spread and all at once, on SQLite (one instance) and PostgreSQL (two), against a bare
    /// timer for the same instants.
    Schedule {
        #[arg(long, default_value_t = 1_000)]
        actions: usize,
        /// Milliseconds between the first and the last due time of the spread shape.
        #[arg(long, default_value_t = 5_000)]
        spread_ms: i64,
    },
    /// The scan for keys due for rotation on a big in-memory tree, against one plain pass
    /// over the same tree (in process, no server).
    Rotation {
        /// Teams of 999 threads each under one organization (1,000: 1M scopes).
        #[arg(long, default_value_t = 1_000)]
        teams: usize,
        #[arg(long, default_value_t = 5)]
        repeats: usize,
    },
    /// HTTP decrypt of 1 KiB items: batches of `items` against one item per request, the
    /// same server (SQLite, its defaults), alternating runs.
    Batch {
        #[arg(long, default_value_t = 100)]
        items: usize,
        #[arg(long, default_value_t = 5)]
        seconds: u64,
        #[arg(long, default_value_t = 3)]
        repeats: usize,
        #[arg(long, default_value_t = 16)]
        connections: u32,
    },
    /// HTTP decrypt of 1 KiB with the access log durable and async against off (the same
    /// binary, alternating runs), on SQLite and PostgreSQL.
    AccessLog {
        /// Seconds per run.
        #[arg(long, default_value_t = 5)]
        seconds: u64,
        /// Runs of each mode, alternating.
        #[arg(long, default_value_t = 3)]
        repeats: usize,
        /// wrk's connections (clients waiting for their answers).
        #[arg(long, default_value_t = 16)]
        connections: u32,
    },
    /// The rate limits' cost: HTTP decrypt through the buckets against the same binary with
    /// every limit off, alternating, on SQLite with the access log off.
    RateLimits {
        /// Seconds per run.
        #[arg(long, default_value_t = 5)]
        seconds: u64,
        /// Runs of each, alternating.
        #[arg(long, default_value_t = 5)]
        repeats: usize,
        /// wrk's connections.
        #[arg(long, default_value_t = 16)]
        connections: u32,
    },
    /// A mixed load for MINUTES (commands, reads, data plane, audit exports, one rebuild
    /// beside the server on PostgreSQL): RSS, open file descriptors and p99 each minute.
    Soak {
        #[arg(long, default_value_t = 30)]
        minutes: u64,
        /// postgres (with the rebuild) or sqlite.
        #[arg(long, default_value = "postgres")]
        backend: String,
    },
    /// kill -9 under load (8 command clients, 4 data-plane clients), then every
    /// acknowledged operation checked: on SQLite and PostgreSQL (ekm_bench::chaos).
    Kill9 {
        /// SIGKILLs on SQLite.
        #[arg(long, default_value_t = 100)]
        sqlite_kills: usize,
        /// SIGKILLs on PostgreSQL.
        #[arg(long, default_value_t = 50)]
        postgres_kills: usize,
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // Phase timings of the jobs measured (RUST_LOG=info) go to standard error.
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        match cli.command {
            Bench::All { quick, write } => all::run(quick, write).await,
            Bench::Projections { events } => projections(events).await,
            Bench::DataPlane { seconds } => data_plane::run(seconds).await,
            Bench::Kms { unwraps } => kms::run(unwraps).await,
            Bench::Reads {
                teams,
                seconds,
                repeats,
            } => reads::run(teams, seconds, repeats).await,
            Bench::Rekey { children } => rekey::run(children).await.map(|_| ()),
            Bench::Commands { seconds, repeats } => commands::run(seconds, repeats).await,
            Bench::History { tokens, rounds } => history::run(tokens, rounds).await,
            Bench::AccessLog {
                seconds,
                repeats,
                connections,
            } => access_log::run(seconds, repeats, connections).await,
            Bench::Batch {
                items,
                seconds,
                repeats,
                connections,
            } => batch::run(items, seconds, repeats, connections).await,
            Bench::Schedule { actions, spread_ms } => schedule::run(actions, spread_ms).await,
            Bench::Rotation { teams, repeats } => rotation::run(teams, repeats).await,
            Bench::RateLimits {
                seconds,
                repeats,
                connections,
            } => rate_limits::run(seconds, repeats, connections).await,
            Bench::Soak { minutes, backend } => soak::run(minutes, &backend).await,
            Bench::Kill9 {
                sqlite_kills,
                postgres_kills,
                seed,
            } => kill9(sqlite_kills, postgres_kills, seed).await,
        }
    })
}

/// `ekm_bench::chaos` on SQLite, then on PostgreSQL; a summary line for each, and the first
/// violations if any.
async fn kill9(sqlite_kills: usize, postgres_kills: usize, seed: u64) -> anyhow::Result<()> {
    let ekm = std::env::current_exe()?.with_file_name("ekm");
    if !ekm.exists() {
        anyhow::bail!("build the server first: cargo build --release -p ekm");
    }
    let mut out = std::io::stdout().lock();
    let mut failed = false;
    for (backend, kills) in [("SQLite", sqlite_kills), ("PostgreSQL", postgres_kills)] {
        if kills == 0 {
            continue;
        }
        let dir = std::env::temp_dir().join(format!("ekm-kill9-{}", uuid::Uuid::now_v7().simple()));
        std::fs::create_dir_all(&dir)?;
        let pg = match backend {
            "PostgreSQL" => Some(BenchDb::create().await?),
            _ => None,
        };
        let mut config = ekm_bench::chaos::Config::new(
            ekm.clone(),
            dir.clone(),
            pg.as_ref().map(|db| db.url.clone()),
            kills,
        );
        config.seed = seed;
        let report = ekm_bench::chaos::run(&config).await;
        if let Some(pg) = pg {
            pg.drop_db().await?;
        }
        let report = report?;
        writeln!(out, "{}", ekm_bench::chaos::describe(&report, backend))?;
        for violation in report.violations.iter().take(20) {
            writeln!(out, "  violation: {violation}")?;
        }
        failed |= !report.violations.is_empty();
        if report.violations.is_empty() {
            std::fs::remove_dir_all(&dir)?;
        } else {
            writeln!(out, "  kept for inspection: {}", dir.display())?;
        }
    }
    if failed {
        anyhow::bail!("violations found");
    }
    Ok(())
}

/// A fresh PostgreSQL database for this run, dropped at the end.
pub(crate) struct BenchDb {
    admin: String,
    pub(crate) name: String,
    pub(crate) url: String,
}

impl BenchDb {
    pub(crate) async fn create() -> anyhow::Result<BenchDb> {
        let admin = std::env::var("EKM_BENCH_DATABASE_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
        let name = format!("ekm_bench_{}", uuid::Uuid::now_v7().simple());
        let mut conn: sqlx::PgConnection = sqlx::Connection::connect(&admin)
            .await
            .context("connect to PostgreSQL")?;
        sqlx::Executor::execute(&mut conn, format!("CREATE DATABASE {name}").as_str()).await?;
        let url = match admin.rfind('/') {
            Some(i) => format!("{}/{name}", &admin[..i]),
            None => format!("{admin}/{name}"),
        };
        Ok(BenchDb { admin, name, url })
    }

    pub(crate) async fn drop_db(&self) -> anyhow::Result<()> {
        let mut conn: sqlx::PgConnection = sqlx::Connection::connect(&self.admin).await?;
        sqlx::Executor::execute(
            &mut conn,
            format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name).as_str(),
        )
        .await?;
        Ok(())
    }
}

fn metadata(org: OrgId, path: &str, reason: Option<&str>) -> HashMap<String, String> {
    EventMetadata {
        actor: Actor {
            kind: ActorKind::User,
            id: "tok_bench".into(),
        },
        request_id: "bench".into(),
        reason: reason.and_then(|r| Reason::parse(r).ok()),
        source_address: Some("127.0.0.1".into()),
        recorded_at: "2026-11-28T00:00:00Z".into(),
        location: Some(Location {
            org_id: org.to_string(),
            scope_path: path.to_owned(),
        }),
    }
    .to_map()
}

/// Appends a realistic history: organizations, teams, threads, then pauses and resumes of
/// threads (`seed::EventBatch`).
async fn seed(db: &Db, events: usize) -> anyhow::Result<String> {
    let Db::Postgres(pg) = db else {
        anyhow::bail!("PostgreSQL only")
    };
    let mut batch = EventBatch::default();
    let mut written = 0usize;
    let mut big_org = String::new();
    let name = ScopeName::parse("bench").map_err(anyhow::Error::msg)?;
    let paused = ScopeEvent::ScopePaused {};
    let resumed = ScopeEvent::ScopeResumed {};
    'orgs: loop {
        let org = OrgId::generate();
        if big_org.is_empty() {
            big_org = org.to_string();
        }
        batch.push(
            org.to_string(),
            1,
            "OrganizationCreated",
            &seed::org_created(org, &name),
            metadata(org, &org.to_string(), None),
        )?;
        written += 1;
        for _team in 0..50 {
            let team = ScopeId::generate();
            let team_path = format!("{org}/{team}");
            let event =
                seed::scope_created(ScopeKind::Team, org, vec![org.scope_id(), team], &name)?;
            batch.push(
                team.to_string(),
                1,
                "ScopeCreated",
                &event,
                metadata(org, &team_path, None),
            )?;
            written += 1;
            for _thread in 0..40 {
                let thread = ScopeId::generate();
                let path = format!("{team_path}/{thread}");
                let event = seed::scope_created(
                    ScopeKind::Thread,
                    org,
                    vec![org.scope_id(), team, thread],
                    &name,
                )?;
                batch.push(
                    thread.to_string(),
                    1,
                    "ScopeCreated",
                    &event,
                    metadata(org, &path, None),
                )?;
                let meta = metadata(org, &path, Some("bench"));
                batch.push(thread.to_string(), 2, "ScopePaused", &paused, meta.clone())?;
                batch.push(thread.to_string(), 3, "ScopeResumed", &resumed, meta)?;
                written += 3;
                if batch.len() >= 1_500 {
                    batch.flush(&pg.pool).await?;
                }
                if written >= events {
                    break 'orgs;
                }
            }
        }
    }
    batch.flush(&pg.pool).await?;
    Ok(big_org)
}

/// The rebuild's baseline: events per second reading the whole log in position order,
/// decoded, through the code path the rebuild reads it with.
pub(crate) async fn read_log_rate(db: &Db) -> anyhow::Result<f64> {
    let started = Instant::now();
    let mut after = 0;
    let mut read = 0usize;
    loop {
        let batch = db
            .events_after(after, 2_000)
            .await
            .map_err(|e| anyhow::anyhow!(e))?;
        let Some(last) = batch.last() else { break };
        after = last.position;
        read += batch.len();
    }
    Ok(read as f64 / started.elapsed().as_secs_f64())
}

fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .map(|l| l.to_owned())
        })
        .and_then(|l| {
            l.split_whitespace()
                .nth(1)
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(|a, b| a.total_cmp(b));
    values.get(values.len() / 2).copied().unwrap_or(0.0)
}

/// Entries per second of one export of `org`'s audit log into a sink: signed JSON Lines (as
/// the export endpoint writes it), or the entry JSON alone.
async fn export_rate(db: &Db, org: &str, signed: bool) -> anyhow::Result<(f64, usize)> {
    let err =
        |e: ekm_projections::ProjectionError| anyhow::anyhow!(ekm_projections::error_chain(&e));
    let filter = AuditFilter {
        org_id: org.to_owned(),
        limit: 1_000,
        ..AuditFilter::default()
    };
    let started = Instant::now();
    let mut exported = 0usize;
    let mut sink = std::io::sink();
    let mut pages = audit_pages(db.clone(), filter);
    let (mut writer, header) = all::signed_export_writer(org);
    if signed {
        sink.write_all(header.as_bytes())?;
    }
    while let Some(entries) = pages.next().await {
        let entries = entries.map_err(err)?;
        for entry in &entries {
            let text = ekm_api::audit::entry_json_text(entry);
            if signed {
                sink.write_all(
                    writer
                        .entry("event", &text, entry.seal.as_deref())
                        .as_bytes(),
                )?;
            } else {
                sink.write_all(text.as_bytes())?;
                sink.write_all(b"\n")?;
            }
        }
        exported += entries.len();
    }
    if signed {
        sink.write_all(writer.finish().as_bytes())?;
    }
    Ok((exported as f64 / started.elapsed().as_secs_f64(), exported))
}

async fn projections(events: usize) -> anyhow::Result<()> {
    let bench_db = BenchDb::create().await?;
    let result = projections_on(&bench_db.url, events).await;
    bench_db.drop_db().await?;
    result
}

async fn projections_on(url: &str, events: usize) -> anyhow::Result<()> {
    let db = Db::open(&DbConfig::Postgres {
        url: url.to_owned(),
    })
    .await
    .map_err(|e| anyhow::anyhow!(ekm_projections::error_chain(&e)))?;
    let mut out = std::io::stdout().lock();
    let err =
        |e: ekm_projections::ProjectionError| anyhow::anyhow!(ekm_projections::error_chain(&e));

    // Memory flat in history length: rebuild a quarter of the history first, then all of it.
    let started = Instant::now();
    let big_org = seed(&db, events / 4).await?;
    let projector = Projector::standard(
        db.clone(),
        ProjectorConfig::default(),
        ekm_keys::SealKey::generate(),
    );
    projector.init().await.map_err(err)?;
    rebuild(&db, &mut |_, _| {}).await.map_err(err)?;
    let rss_quarter = peak_rss_mib();
    seed(&db, events - events / 4).await?;
    let total = db.event_count().await.map_err(|e| anyhow::anyhow!(e))?;
    writeln!(
        out,
        "seeded {total} events in {:.1}s",
        started.elapsed().as_secs_f64()
    )?;

    let scan_rate = read_log_rate(&db).await?;

    let started = Instant::now();
    let report = rebuild(&db, &mut |_, _| {}).await.map_err(err)?;
    let rebuild_secs = started.elapsed().as_secs_f64();
    let rebuild_rate = report.events as f64 / rebuild_secs;
    let rss_full = peak_rss_mib();

    // Export: every entry of the largest organization, rendered as signed JSON Lines into a
    // sink, alternating with the same pages as entry JSON without the lines' hashes and
    // signatures (what signing costs); five rounds each, medians.
    let mut signed_rates = vec![];
    let mut unsigned_rates = vec![];
    let mut exported = 0usize;
    for _ in 0..5 {
        for signed in [true, false] {
            let (rate, count) = export_rate(&db, &big_org, signed).await?;
            exported = count;
            if signed {
                signed_rates.push(rate);
            } else {
                unsigned_rates.push(rate);
            }
        }
    }
    let export_rate = median(&mut signed_rates);
    let unsigned_rate = median(&mut unsigned_rates);
    // Baseline: the same rows, raw, no decoding or rendering.
    let Db::Postgres(pg) = &db else {
        anyhow::bail!("PostgreSQL only")
    };
    let started = Instant::now();
    let mut after = 0i64;
    let mut raw = 0usize;
    loop {
        let rows: Vec<(i64, String)> = sqlx::query_as("SELECT position, CAST(payload AS TEXT) FROM events WHERE audit_org = $1 AND position > $2 ORDER BY position LIMIT 1000")
            .bind(&big_org).bind(after).fetch_all(&pg.pool).await?;
        let Some(last) = rows.last() else { break };
        after = last.0;
        raw += rows.len();
    }
    let raw_rate = raw as f64 / started.elapsed().as_secs_f64();

    // Live catch-up lag: commits from the event store with no synchronous catch-up (as from
    // another instance), at a steady 100/s; the live runner wakes through NOTIFY.
    let live = Arc::new(Projector::standard(
        db.clone(),
        ProjectorConfig::default(),
        ekm_keys::SealKey::generate(),
    ));
    live.catch_up().await.map_err(err)?;
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let runner = tokio::spawn(live.clone().run(stopped));
    while !live.listening() {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // The commits come from another instance (its own pool and notifier): a runner passes
    // over the notifications of its own instance, whose commands tell it directly.
    let elsewhere = Db::open(&DbConfig::Postgres {
        url: url.to_owned(),
    })
    .await
    .map_err(|e| anyhow::anyhow!(ekm_projections::error_chain(&e)))?;
    let org = OrgId::generate();
    let org_path = org.to_string();
    let mut lags = vec![];
    let mut applied = live.subscribe();
    let first = seed::org_created(org, &ScopeName::parse("lag").map_err(anyhow::Error::msg)?);
    let none = ekm_store::KeyWrites::default();
    elsewhere
        .append(
            &org_path,
            0,
            &[first],
            &metadata(org, &org_path, None),
            &none,
        )
        .await
        .map_err(|e| anyhow::anyhow!(ekm_projections::error_chain(&e)))?;
    let mut ticker = tokio::time::interval(Duration::from_millis(10));
    for i in 0..500 {
        ticker.tick().await;
        let event = if i % 2 == 0 {
            ScopeEvent::ScopePaused {}
        } else {
            ScopeEvent::ScopeResumed {}
        };
        let committed = Instant::now();
        elsewhere
            .append(
                &org_path,
                i + 1,
                &[event],
                &metadata(org, &org_path, Some("lag")),
                &none,
            )
            .await
            .map_err(|e| anyhow::anyhow!(ekm_projections::error_chain(&e)))?;
        let position = db.head_position().await.map_err(|e| anyhow::anyhow!(e))?;
        applied.wait_for(|p| *p >= position).await?;
        lags.push(committed.elapsed().as_secs_f64() * 1_000.0);
    }
    let _ = stop.send(true);
    let _ = runner.await;
    let lag_median = median(&mut lags);
    let lag_p99 = lags[(lags.len() * 99 / 100).min(lags.len() - 1)];

    writeln!(out)?;
    writeln!(
        out,
        "| figure | measured | baseline (same run) | ratio | target |"
    )?;
    writeln!(out, "|---|---|---|---|---|")?;
    writeln!(out, "| projection rebuild from PostgreSQL, {total} events | {rebuild_rate:.0} events/s ({rebuild_secs:.1} s) | reading the log, decoded: {scan_rate:.0} events/s | {:.2} | ≥ 50,000 events/s |", rebuild_rate / scan_rate)?;
    writeln!(out, "| peak memory of the rebuild, {} → {total} events | {rss_quarter:.0} MiB → {rss_full:.0} MiB | | {:.2} | flat |", events / 4, rss_full / rss_quarter.max(1.0))?;
    writeln!(out, "| audit export (signed JSON Lines), {exported} entries of one organization | {export_rate:.0} entries/s | raw SELECT of the same rows: {raw_rate:.0} rows/s | {:.2} | ≥ 100,000 entries/s |", export_rate / raw_rate)?;
    writeln!(out, "| the same export unsigned (entry JSON only) | {unsigned_rate:.0} entries/s | signed: {export_rate:.0} entries/s | {:.2} | |", export_rate / unsigned_rate)?;
    writeln!(out, "| live catch-up lag at 100 commits/s (NOTIFY) | median {lag_median:.2} ms, p99 {lag_p99:.2} ms | | | < 50 ms median |")?;
    db.close().await;
    Ok(())
}
