//! `ekm-bench all`: every figure of BENCHMARKS.md beside its baseline, measured in one run
//! against real `ekm serve` processes on PostgreSQL and SQLite, then written into the
//! figures table of BENCHMARKS.md.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use ekm_domain::{OrgId, ScopeEvent, ScopeId, ScopeKind, ScopeName};
use ekm_projections::{audit_entries, AuditFilter};
use ekm_store::{Db, DbConfig, Role, Tokens};
use serde_json::{json, Value};

use crate::report::{count, ms, quantile, CpuRow, Figure, Stats};
use crate::seed::{self, EventBatch};
use crate::server::{self, Server, Usage};
use crate::{metadata, BenchDb};

/// Sizes and durations of one run.
pub struct Sizes {
    /// Teams under the big organization, each with `threads_per_team` threads.
    pub teams: usize,
    pub threads_per_team: usize,
    /// Seconds of each timed load run, and how many runs per figure.
    pub seconds: u64,
    pub repeats: usize,
    pub cascade_rounds: usize,
    pub revocation_cycles: usize,
    pub export_cap: usize,
    /// Pauses given `until` whose resumes the scheduler's lateness is measured on.
    pub scheduled_actions: usize,
}

impl Sizes {
    pub fn new(quick: bool) -> Sizes {
        if quick {
            Sizes {
                teams: 100,
                threads_per_team: 999,
                seconds: 2,
                repeats: 3,
                cascade_rounds: 5,
                revocation_cycles: 3,
                export_cap: 50_000,
                scheduled_actions: 200,
            }
        } else {
            Sizes {
                teams: 1_000,
                threads_per_team: 999,
                seconds: 5,
                repeats: 3,
                cascade_rounds: 9,
                revocation_cycles: 5,
                export_cap: 100_000,
                scheduled_actions: 1_000,
            }
        }
    }

    /// Each team holds a nested team (depth 4 at the threads: issue 17 §5).
    fn descendants(&self) -> usize {
        self.teams * (2 + self.threads_per_team)
    }
}

pub(crate) fn progress(message: impl AsRef<str>) {
    eprintln!(
        "[{}] {}",
        chrono::Utc::now().format("%H:%M:%S"),
        message.as_ref()
    );
}

pub async fn run(quick: bool, write: Option<PathBuf>) -> anyhow::Result<()> {
    let started = Instant::now();
    let plan = Sizes::new(quick);
    server::ensure_wrk()?;
    let machine = crate::report::machine(quick);
    progress(format!(
        "{} run: {} descendant scopes, {} s × {} per load figure",
        if quick { "quick" } else { "full" },
        plan.descendants(),
        plan.seconds,
        plan.repeats
    ));
    let mut figures = vec![];
    let mut cpu = vec![];

    // PostgreSQL: the big tree, its rebuild, and every figure served from it.
    let big = BenchDb::create().await?;
    let empty = BenchDb::create().await?;
    let result = postgres_figures(&plan, &big, &empty, &mut figures, &mut cpu).await;
    let _ = big.drop_db().await;
    let _ = empty.drop_db().await;
    result?;

    // SQLite: durable commands and the data plane of the embedded default.
    sqlite_figures(&plan, &mut figures, &mut cpu).await?;

    progress("in-process data plane against raw AES-SIV");
    figures.extend(crate::data_plane::in_process());

    let table = crate::report::render(&figures, &cpu, &machine, started.elapsed().as_secs_f64());
    {
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        writeln!(out, "{table}")?;
    }
    if let Some(path) = write {
        crate::report::write_into(&path, &table)?;
        progress(format!("figures written into {}", path.display()));
    }
    progress(format!("done in {:.0} s", started.elapsed().as_secs_f64()));
    Ok(())
}

async fn postgres_figures(
    plan: &Sizes,
    big: &BenchDb,
    empty: &BenchDb,
    figures: &mut Vec<Figure>,
    cpu: &mut Vec<CpuRow>,
) -> anyhow::Result<()> {
    let db = Db::open(&DbConfig::Postgres {
        url: big.url.clone(),
    })
    .await
    .map_err(|e| anyhow::anyhow!(ekm_projections::error_chain(&e)))?;

    // The tree: organization → teams → nested teams → threads (depth 4), seeded as events
    // with SQL; a quarter first, rebuilt, to show memory flat in history length.
    let org = OrgId::generate();
    let mut leaves = vec![];
    let quarter = plan.teams / 4;
    progress(format!(
        "seeding {} scopes (a quarter first)",
        quarter * (2 + plan.threads_per_team) + 1
    ));
    let seeding = Instant::now();
    seed_tree(
        &db,
        org,
        true,
        0..quarter,
        plan.threads_per_team,
        &mut leaves,
    )
    .await?;
    let dir = server::temp_path("ekm-bench-pg");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    // Checkpoint rows first: `ekm projections rebuild` on a database that no server has
    // started on leaves the projections it skips at no checkpoint, and the first server
    // then replays the rebuilt ones from 0 into their filled tables (duplicate keys).
    ekm_projections::Projector::standard(
        db.clone(),
        ekm_projections::ProjectorConfig::default(),
        ekm_keys::SealKey::generate(),
    )
    .init()
    .await
    .map_err(|e| anyhow::anyhow!(ekm_projections::error_chain(&e)))?;
    progress("rebuilding the read models of the quarter (ekm projections rebuild)");
    let quarter_events = db.event_count().await.map_err(|e| anyhow::anyhow!(e))?;
    let (_, rss_quarter) = server::rebuild_process(&big.url, &dir).await?;
    progress(format!("seeding the other {} teams", plan.teams - quarter));
    seed_tree(
        &db,
        org,
        false,
        quarter..plan.teams,
        plan.threads_per_team,
        &mut leaves,
    )
    .await?;
    let total = db.event_count().await.map_err(|e| anyhow::anyhow!(e))?;
    progress(format!(
        "seeded {total} events in {:.1} s",
        seeding.elapsed().as_secs_f64()
    ));

    // Planner statistics, as a live database would have them (autovacuum may not have
    // analysed the freshly seeded rows yet, and a plan chosen without them varies by run).
    analyze(&db).await?;

    progress("reading the log (baseline of the rebuild)");
    let scan_rate = crate::read_log_rate(&db).await?;
    progress(format!(
        "rebuilding the read models of {total} events (ekm projections rebuild)"
    ));
    let (rebuild_secs, rss_full) = server::rebuild_process(&big.url, &dir).await?;
    let rebuild_rate = total as f64 / rebuild_secs;
    figures.push(
        Figure::new(format!(
            "projection rebuild from PostgreSQL, {} events",
            count(total as f64)
        ))
        .median(format!(
            "{} events/s ({rebuild_secs:.1} s)",
            count(rebuild_rate)
        ))
        .spread("one run")
        .baseline(format!(
            "reading the log, decoded: {} events/s",
            count(scan_rate)
        ))
        .ratio(rebuild_rate / scan_rate)
        .target("≥ 50,000 events/s", rebuild_rate >= 50_000.0),
    );
    let memory_ratio = rss_full / rss_quarter.max(1.0);
    figures.push(
        Figure::new(format!(
            "peak RSS of `ekm projections rebuild`, {} → {} events",
            count(quarter_events as f64),
            count(total as f64)
        ))
        .median(format!("{rss_quarter:.0} MiB → {rss_full:.0} MiB"))
        .spread("one run")
        .ratio(memory_ratio)
        .target("flat (≤ 1.25×)", memory_ratio <= 1.25),
    );

    // Export: entries of the big organization, rendered as JSON Lines into a sink.
    analyze(&db).await?;
    progress("audit export");
    let (export_rate, raw_rate, decode_rate, exported) = export(&db, org, plan.export_cap).await?;
    figures.push(
        Figure::new(format!(
            "audit export (JSON Lines) from PostgreSQL, {} entries",
            count(exported as f64)
        ))
        .median(format!("{} entries/s", count(export_rate)))
        .spread("one run")
        .baseline(format!(
            "raw SELECT of the same rows: {} rows/s (the entries, not rendered: {}/s)",
            count(raw_rate),
            count(decode_rate)
        ))
        .ratio(export_rate / raw_rate)
        .target("≥ 100,000 entries/s", export_rate >= 100_000.0),
    );

    // A token for the seeded organization (it was created by SQL, with no admin token).
    let big_admin = Tokens::new(db.clone())
        .create(Role::ORG_ADMIN, Some(org), "bench")
        .await
        .map_err(|e| anyhow::anyhow!(e))?
        .secret;
    db.close().await;

    // Start-up: an empty store against the seeded one.
    progress("start-up on an empty store (3 starts, the first one migrates)");
    let empty_dir = server::temp_path("ekm-bench-empty");
    let _ = std::fs::remove_dir_all(&empty_dir);
    let mut empty_starts = vec![];
    for _ in 0..3 {
        let (started, took) = Server::start(&empty_dir, Some(&empty.url)).await?;
        empty_starts.push(took.as_secs_f64() * 1_000.0);
        started.stop();
    }
    let _ = std::fs::remove_dir_all(&empty_dir);
    progress(format!(
        "first start on the {total}-event store (catches up the audit chain and key shredder)"
    ));
    let (first, first_took) = Server::start(&dir, Some(&big.url)).await?;
    first.stop();
    let first_secs = first_took.as_secs_f64();
    figures.push(
        Figure::new(format!(
            "first start after the rebuild, {} events: the projections a rebuild leaves alone (audit chain, key shredder) catch up",
            count(total as f64)
        ))
        .median(format!(
            "{first_secs:.1} s ({} events/s)",
            count(total as f64 / first_secs)
        ))
        .spread("one run")
        .baseline(format!("rebuild of the read models: {rebuild_secs:.1} s"))
        .ratio(first_secs / rebuild_secs),
    );
    progress(format!("start-up on the {total}-event store (3 restarts)"));
    let mut starts = vec![];
    let mut a = None;
    for i in 0..3 {
        let (started, took) = Server::start(&dir, Some(&big.url)).await?;
        starts.push(took.as_secs_f64() * 1_000.0);
        if i == 2 {
            a = Some(started);
        } else {
            started.stop();
        }
    }
    let Some(a) = a else { bail!("no server") };
    let start_stats = Stats::of(&starts);
    let empty_stats = Stats::of(&empty_starts);
    figures.push(
        Figure::new(format!(
            "start-up of `ekm serve` on PostgreSQL with {} events, caught up (spawn → /readyz 200, applied = head)",
            count(total as f64)
        ))
        .median(ms(start_stats.median))
        .spread(start_stats.range(ms))
        .baseline(format!("empty store: {}", ms(empty_stats.median)))
        .ratio(start_stats.median / empty_stats.median.max(0.001)),
    );

    let result = serve_postgres(
        plan, &a, &dir, &big.url, &big.name, &big_admin, &leaves, figures, cpu,
    )
    .await;
    a.stop();
    let _ = std::fs::remove_dir_all(&dir);
    result
}

// The servers, databases and outputs of the PostgreSQL part, passed down as they are.
#[allow(clippy::too_many_arguments)]
async fn serve_postgres(
    plan: &Sizes,
    a: &Server,
    dir: &Path,
    url: &str,
    database: &str,
    big_admin: &str,
    leaves: &[String],
    figures: &mut Vec<Figure>,
    cpu: &mut Vec<CpuRow>,
) -> anyhow::Result<()> {
    let client = reqwest::Client::new();
    let descendants = plan.descendants();

    // The HTTP stack's limit on this server.
    progress("GET /healthz (PostgreSQL server)");
    let before = Usage::sample(a.pid(), Some(database));
    let hello = wrk_repeated(
        &format!("{}/healthz", a.base),
        &server::lua(big_admin, None),
        plan,
    )?;
    cpu.push(cpu_row(
        "GET /healthz (PostgreSQL server)",
        &hello,
        &before,
        a.pid(),
        Some(database),
    ));

    // Effective-state reads of random leaves.
    progress("GET /v1/scopes/{random leaf}");
    let ids_path = server::temp_path("ekm-bench-leaves.txt");
    std::fs::write(&ids_path, leaves.join("\n"))?;
    let script = format!(
        "{}local counter = 0\n\
         function setup(thread) counter = counter + 1; thread:set(\"seed\", counter) end\n\
         function init(args)\n  math.randomseed(os.time() * 100 + seed)\n  ids = {{}}\n  \
         for line in io.lines(\"{}\") do ids[#ids + 1] = line end\nend\n\
         function request() return wrk.format(\"GET\", \"/v1/scopes/\" .. ids[math.random(#ids)]) end\n",
        server::lua(big_admin, None),
        ids_path.display()
    );
    let before = Usage::sample(a.pid(), Some(database));
    let reads = wrk_repeated(&format!("{}/", a.base), &script, plan)?;
    cpu.push(cpu_row(
        "GET /v1/scopes/{leaf}",
        &reads,
        &before,
        a.pid(),
        Some(database),
    ));
    let _ = std::fs::remove_file(&ids_path);
    figures.push(load_figure(
        format!(
            "effective-state reads `GET /v1/scopes/{{leaf}}`, {} scopes, random leaves, wrk -t2 -c16",
            count(descendants as f64 + 1.0)
        ),
        &reads,
        "GET /healthz, same server",
        &hello,
    ));
    let rss = a.peak_rss_mib();
    figures.push(
        Figure::new(format!(
            "server peak RSS (VmHWM) with {} scopes, after the reads",
            count(descendants as f64 + 1.0)
        ))
        .median(format!("{rss:.0} MiB"))
        .spread("one server")
        .target("≤ 500 MiB", rss <= 500.0),
    );

    // Cascade: the big organization against one with 10 descendants.
    progress("cascade: pausing the big organization against a small one");
    let operator = a.operator_token()?;
    let small = create_org(&client, &a.base, &operator).await?;
    // organization → team → team → thread: depth 4, as the big one.
    let mut teams: Vec<String> = vec![];
    for i in 0..2 {
        let parent = teams.last().cloned().unwrap_or_else(|| small.id.clone());
        teams.push(
            create_scope(
                &client,
                &a.base,
                &small.admin,
                "team",
                &format!("t{i}"),
                &parent,
            )
            .await?,
        );
    }
    let mut threads = vec![];
    for i in 0..8 {
        let team = &teams[i % 2];
        threads.push(
            create_scope(
                &client,
                &a.base,
                &small.admin,
                "thread",
                &format!("c{i}"),
                team,
            )
            .await?,
        );
    }
    let big_org_id = org_of_leaf(&client, &a.base, big_admin, leaves).await?;
    let mut small_ms = vec![];
    let mut big_ms = vec![];
    let mut first_read_ms = vec![];
    let mut paused_reads = 0usize;
    for round in 0..plan.cascade_rounds {
        small_ms.push(lifecycle(&client, &a.base, &small.admin, &small.id, "pause").await?);
        lifecycle(&client, &a.base, &small.admin, &small.id, "resume").await?;
        big_ms.push(lifecycle(&client, &a.base, big_admin, &big_org_id, "pause").await?);
        let leaf = &leaves[(round * 7919 + 13) % leaves.len()];
        let read_started = Instant::now();
        let scope: Value = client
            .get(format!("{}/v1/scopes/{leaf}", a.base))
            .bearer_auth(big_admin)
            .send()
            .await?
            .json()
            .await?;
        first_read_ms.push(read_started.elapsed().as_secs_f64() * 1_000.0);
        if scope["effective_state"] == "paused" {
            paused_reads += 1;
        }
        lifecycle(&client, &a.base, big_admin, &big_org_id, "resume").await?;
    }
    let big_stats = Stats::of(&big_ms);
    let small_stats = Stats::of(&small_ms);
    let cascade_ratio = big_stats.median / small_stats.median.max(0.001);
    figures.push(
        Figure::new(format!(
            "cascade: pause an organization with {} descendants (HTTP round trip, {} rounds)",
            count(descendants as f64),
            plan.cascade_rounds
        ))
        .median(ms(big_stats.median))
        .spread(big_stats.range(ms))
        .baseline(format!(
            "organization with 10 descendants: {}",
            ms(small_stats.median)
        ))
        .ratio(cascade_ratio)
        .target("ratio ≤ 2", cascade_ratio <= 2.0),
    );
    let first_read = Stats::of(&first_read_ms);
    figures.push(
        Figure::new("cascade: first read of a leaf right after the pause answered")
            .median(format!(
                "paused in {paused_reads} of {} reads; {}",
                plan.cascade_rounds,
                ms(first_read.median)
            ))
            .spread(first_read.range(ms))
            .target(
                "every read answers paused",
                paused_reads == plan.cascade_rounds,
            ),
    );

    // Durable commands: 8 clients, each pausing and resuming its own thread.
    progress("durable lifecycle commands (PostgreSQL) against raw INSERTs");
    let mut commands = vec![];
    let mut inserts = vec![];
    let mut usage = Usage::default();
    for _ in 0..plan.repeats {
        inserts.push(raw_inserts_postgres(url, plan.seconds).await?);
        let before = Usage::sample(a.pid(), Some(database));
        commands.push(command_load(&client, &a.base, &small.admin, &threads, plan.seconds).await?);
        usage.add(&Usage::sample(a.pid(), Some(database)).since(&before));
    }
    cpu.push(CpuRow {
        load: "pause/resume, 8 clients (PostgreSQL)".into(),
        requests: commands.iter().map(|c| c.latencies_ms.len() as u64).sum(),
        usage,
        postgres: true,
    });
    figures.push(command_figure(
        "durable lifecycle commands over HTTP, PostgreSQL, 8 clients (pause/resume own thread)",
        &commands,
        &inserts,
        "raw single-row INSERT, 8 connections, autocommit",
    ));

    // Revocation: a decrypt loop on the same instance, then on a second one.
    progress("revocation latency (same instance, then a second instance)");
    let (b, _) = Server::start(dir, Some(url)).await?;
    let data = data_org(&client, &a.base, &operator).await?;
    let same = revocation(
        &client,
        &a.base,
        &a.base,
        &data,
        plan.revocation_cycles,
        Duration::from_millis(300),
    )
    .await?;
    let other = revocation(
        &client,
        &a.base,
        &b.base,
        &data,
        plan.revocation_cycles,
        Duration::from_millis(1_500),
    )
    .await?;
    b.stop();
    let same_after: usize = same.iter().map(|c| c.successes_started_after_ack).sum();
    let same_attempts: usize = same.iter().map(|c| c.attempts_after_ack).sum();
    figures.push(
        Figure::new(format!(
            "revocation, same instance: decrypts started after the pause was answered that succeeded ({} cycles, 4 clients)",
            same.len()
        ))
        .median(format!("{same_after} of {same_attempts}"))
        .spread(format!("{} cycles", same.len()))
        .target("0", same_after == 0),
    );
    let last: Vec<f64> = other.iter().map(|c| c.last_success_after_ack_ms).collect();
    let first_refusal: Vec<f64> = other
        .iter()
        .filter_map(|c| c.first_refusal_after_ack_ms)
        .collect();
    let last_stats = Stats::of(&last);
    let other_after: usize = other.iter().map(|c| c.successes_started_after_ack).sum();
    figures.push(
        Figure::new(format!(
            "revocation, second instance on the same PostgreSQL: last successful decrypt after the pause was answered ({} cycles)",
            other.len()
        ))
        .median(if last_stats.max > 0.0 {
            format!(
                "{} ({other_after} decrypts started after the answer succeeded)",
                ms(last_stats.median)
            )
        } else {
            format!("0 ms: no success ended after the answer ({other_after} started after it)")
        })
        .spread(format!("max {}", ms(last_stats.max)))
        .baseline(format!(
            "first refusal on the second instance: {}",
            ms(Stats::of(&first_refusal).median)
        ))
        .target("< 1 s", last_stats.max < 1_000.0 && first_refusal.len() == other.len()),
    );
    Ok(())
}

async fn sqlite_figures(
    plan: &Sizes,
    figures: &mut Vec<Figure>,
    cpu: &mut Vec<CpuRow>,
) -> anyhow::Result<()> {
    let dir = server::temp_path("ekm-bench-sqlite");
    let _ = std::fs::remove_dir_all(&dir);
    let (s, _) = Server::start(&dir, None).await?;
    let result = serve_sqlite(plan, &s, &dir, figures, cpu).await;
    s.stop();
    let _ = std::fs::remove_dir_all(&dir);
    result
}

async fn serve_sqlite(
    plan: &Sizes,
    s: &Server,
    dir: &Path,
    figures: &mut Vec<Figure>,
    cpu: &mut Vec<CpuRow>,
) -> anyhow::Result<()> {
    let client = reqwest::Client::new();
    let operator = s.operator_token()?;
    let org = create_org(&client, &s.base, &operator).await?;
    let team = create_scope(&client, &s.base, &org.admin, "team", "t", &org.id).await?;
    let mut threads = vec![];
    for i in 0..8 {
        threads.push(
            create_scope(
                &client,
                &s.base,
                &org.admin,
                "thread",
                &format!("c{i}"),
                &team,
            )
            .await?,
        );
    }
    progress("durable lifecycle commands (SQLite) against raw INSERTs");
    let db_path = dir.join("ekm.db");
    let mut commands = vec![];
    let mut inserts = vec![];
    let mut usage = Usage::default();
    for _ in 0..plan.repeats {
        inserts.push(raw_inserts_sqlite(&db_path, plan.seconds).await?);
        let before = Usage::sample(s.pid(), None);
        commands.push(command_load(&client, &s.base, &org.admin, &threads, plan.seconds).await?);
        usage.add(&Usage::sample(s.pid(), None).since(&before));
    }
    cpu.push(CpuRow {
        load: "pause/resume, 8 clients (SQLite)".into(),
        requests: commands.iter().map(|c| c.latencies_ms.len() as u64).sum(),
        usage,
        postgres: false,
    });
    figures.push(command_figure(
        "durable lifecycle commands over HTTP, SQLite, 8 clients (pause/resume own thread)",
        &commands,
        &inserts,
        "raw single-row INSERT, 8 clients on one writer connection (as EKM), same pragmas",
    ));

    progress("data plane over HTTP (SQLite server): /healthz, encrypt, decrypt");
    let data = data_org(&client, &s.base, &operator).await?;
    let hello = wrk_repeated(
        &format!("{}/healthz", s.base),
        &server::lua(&data.token, None),
        plan,
    )?;
    let before = Usage::sample(s.pid(), None);
    let encrypt = wrk_repeated(
        &format!("{}/v1/scopes/{}/encrypt", s.base, data.scope),
        &server::lua(&data.token, Some(&data.encrypt_body)),
        plan,
    )?;
    cpu.push(cpu_row(
        "POST encrypt 1 KiB (SQLite server)",
        &encrypt,
        &before,
        s.pid(),
        None,
    ));
    let before = Usage::sample(s.pid(), None);
    let decrypt = wrk_repeated(
        &format!("{}/v1/scopes/{}/decrypt", s.base, data.scope),
        &server::lua(&data.token, Some(&data.decrypt_body)),
        plan,
    )?;
    cpu.push(cpu_row(
        "POST decrypt 1 KiB (SQLite server)",
        &decrypt,
        &before,
        s.pid(),
        None,
    ));
    figures.push(load_figure(
        "HTTP encrypt 1 KiB, cached key, service token with data:use, wrk -t2 -c16".into(),
        &encrypt,
        "GET /healthz, same server",
        &hello,
    ));
    figures.push(load_figure(
        "HTTP decrypt 1 KiB, same load".into(),
        &decrypt,
        "GET /healthz, same server",
        &hello,
    ));

    progress("the scheduler's lateness (SQLite)");
    let shape = crate::schedule::Shape {
        name: "spread",
        spread_ms: 5_000,
    };
    let (late, bare) =
        crate::schedule::measure(std::slice::from_ref(s), plan.scheduled_actions, &shape).await?;
    figures.push(
        Figure::new(format!(
            "scheduler lateness, {} pauses with `until` due over 5 s, SQLite: p50 / p99 after the due time",
            plan.scheduled_actions
        ))
        .median(format!("{:.1} / {:.1} ms", late.p50, late.p99))
        .spread(format!("max {:.1} ms", late.max))
        .baseline(format!(
            "a bare tokio timer for the same instants: {:.2} / {:.2} ms",
            bare.p50, bare.p99
        ))
        .target("p99 ≤ 1,000 ms", late.p99 <= 1_000.0),
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Seeding, export

/// Appends the organization (if `with_org`) and `teams` teams, each with a nested team of
/// `threads` threads (organization → team → team → thread: depth 4), with the metadata keys
/// EKM writes, in batches through `UNNEST` (the position trigger numbers every row). Every
/// tenth thread's id goes to `leaves`.
pub(crate) async fn seed_tree(
    db: &Db,
    org: OrgId,
    with_org: bool,
    teams: std::ops::Range<usize>,
    threads: usize,
    leaves: &mut Vec<String>,
) -> anyhow::Result<()> {
    let Db::Postgres(pg) = db else {
        bail!("PostgreSQL only")
    };
    let name = ScopeName::parse("bench").map_err(anyhow::Error::msg)?;
    let mut batch = EventBatch::default();
    if with_org {
        batch.push(
            org.to_string(),
            1,
            "OrganizationCreated",
            &seed::org_created(org, &name),
            metadata(org, &org.to_string(), None),
        )?;
    }
    for _ in teams {
        let team = ScopeId::generate();
        let team_path = format!("{org}/{team}");
        let event = seed::scope_created(ScopeKind::Team, org, vec![org.scope_id(), team], &name)?;
        batch.push(
            team.to_string(),
            1,
            "ScopeCreated",
            &event,
            metadata(org, &team_path, None),
        )?;
        let squad = ScopeId::generate();
        let squad_path = format!("{team_path}/{squad}");
        let event = seed::scope_created(
            ScopeKind::Team,
            org,
            vec![org.scope_id(), team, squad],
            &name,
        )?;
        batch.push(
            squad.to_string(),
            1,
            "ScopeCreated",
            &event,
            metadata(org, &squad_path, None),
        )?;
        for i in 0..threads {
            let thread = ScopeId::generate();
            let event = seed::scope_created(
                ScopeKind::Thread,
                org,
                vec![org.scope_id(), team, squad, thread],
                &name,
            )?;
            let path = format!("{squad_path}/{thread}");
            batch.push(
                thread.to_string(),
                1,
                "ScopeCreated",
                &event,
                metadata(org, &path, None),
            )?;
            if i % 10 == 0 {
                leaves.push(thread.to_string());
            }
            if batch.len() >= 5_000 {
                batch.flush(&pg.pool).await?;
            }
        }
    }
    batch.flush(&pg.pool).await
}

pub(crate) async fn analyze(db: &Db) -> anyhow::Result<()> {
    let Db::Postgres(pg) = db else {
        bail!("PostgreSQL only")
    };
    sqlx::query("ANALYZE")
        .execute(&pg.pool)
        .await
        .context("ANALYZE")?;
    Ok(())
}

/// A signed export's writer with a fresh signing key, and its header line.
pub fn signed_export_writer(org: &str) -> (ekm_api::audit_export::ExportWriter, String) {
    let header = ekm_api::audit_export::ExportHeader {
        org_id: org.to_owned(),
        exported_at: String::new(),
        through_position: 0,
        filter: std::collections::BTreeMap::new(),
    };
    ekm_api::audit_export::ExportWriter::start(
        std::sync::Arc::new(ekm_keys::SigningKey::generate()),
        &header,
    )
}

/// Export rate (signed JSON Lines into a sink) and the raw SELECT rate of the same rows, up to
/// `cap` entries of the organization.
async fn export(db: &Db, org: OrgId, cap: usize) -> anyhow::Result<(f64, f64, f64, usize)> {
    use std::io::Write;
    let err =
        |e: ekm_projections::ProjectionError| anyhow::anyhow!(ekm_projections::error_chain(&e));
    let mut filter = AuditFilter {
        org_id: org.to_string(),
        limit: 1_000,
        ..AuditFilter::default()
    };
    // The export's own path: pages read one ahead (`audit_pages`), rendered as signed JSON
    // Lines (each line hashed, a signed checkpoint every 100 lines).
    let started = Instant::now();
    let mut exported = 0usize;
    let mut sink = std::io::sink();
    let mut pages = ekm_projections::audit_pages(db.clone(), filter.clone());
    let (mut writer, header) = signed_export_writer(&org.to_string());
    sink.write_all(header.as_bytes())?;
    while exported < cap {
        let Some(entries) = pages.next().await else {
            break;
        };
        let entries = entries.map_err(err)?;
        for entry in &entries {
            let line = writer.entry(
                "event",
                &ekm_api::audit::entry_json_text(entry),
                entry.seal.as_deref(),
            );
            sink.write_all(line.as_bytes())?;
        }
        exported += entries.len();
    }
    sink.write_all(writer.finish().as_bytes())?;
    drop(pages);
    let export_rate = exported as f64 / started.elapsed().as_secs_f64();
    // The same pages without rendering: separates the query and decoding from JSON Lines.
    filter.after = None;
    let started = Instant::now();
    let mut decoded = 0usize;
    while decoded < exported {
        let entries = audit_entries(db, &filter).await.map_err(err)?;
        let Some(last) = entries.last() else { break };
        filter.after = Some(last.position);
        decoded += entries.len();
    }
    let decode_rate = decoded as f64 / started.elapsed().as_secs_f64();
    let Db::Postgres(pg) = db else {
        bail!("PostgreSQL only")
    };
    let started = Instant::now();
    let mut after = 0i64;
    let mut raw = 0usize;
    while raw < exported {
        let rows: Vec<(i64, String)> = sqlx::query_as(
            "SELECT position, CAST(payload AS TEXT) FROM events WHERE audit_org = $1 AND position > $2 ORDER BY position LIMIT 1000",
        )
        .bind(org.to_string())
        .bind(after)
        .fetch_all(&pg.pool)
        .await?;
        let Some(last) = rows.last() else { break };
        after = last.0;
        raw += rows.len();
    }
    let raw_rate = raw as f64 / started.elapsed().as_secs_f64();
    Ok((export_rate, raw_rate, decode_rate, exported))
}

// ---------------------------------------------------------------------------------------
// HTTP set-up

pub(crate) struct Org {
    pub(crate) id: String,
    pub(crate) admin: String,
}

pub(crate) async fn call(
    client: &reqwest::Client,
    url: String,
    token: &str,
    body: Value,
) -> anyhow::Result<Value> {
    let response = client
        .post(&url)
        .bearer_auth(token)
        .json(&body)
        .send()
        .await?;
    let status = response.status();
    let value: Value = response.json().await.unwrap_or_default();
    if !status.is_success() {
        bail!("POST {url} answered {status}: {value}");
    }
    Ok(value)
}

pub(crate) async fn create_org(
    client: &reqwest::Client,
    base: &str,
    operator: &str,
) -> anyhow::Result<Org> {
    let org = call(
        client,
        format!("{base}/v1/orgs"),
        operator,
        json!({"name": "bench", "plan": "enterprise", "tier": "managed"}),
    )
    .await?;
    Ok(Org {
        id: org["id"].as_str().unwrap_or_default().to_owned(),
        admin: org["admin_token"].as_str().unwrap_or_default().to_owned(),
    })
}

pub(crate) async fn create_scope(
    client: &reqwest::Client,
    base: &str,
    admin: &str,
    kind: &str,
    name: &str,
    parent: &str,
) -> anyhow::Result<String> {
    let scope = call(
        client,
        format!("{base}/v1/scopes"),
        admin,
        json!({"kind": kind, "name": name, "parent_id": parent}),
    )
    .await?;
    Ok(scope["id"].as_str().unwrap_or_default().to_owned())
}

async fn org_of_leaf(
    client: &reqwest::Client,
    base: &str,
    token: &str,
    leaves: &[String],
) -> anyhow::Result<String> {
    let Some(leaf) = leaves.first() else {
        bail!("no leaves")
    };
    let scope: Value = client
        .get(format!("{base}/v1/scopes/{leaf}"))
        .bearer_auth(token)
        .send()
        .await?
        .json()
        .await?;
    match scope["org_id"].as_str() {
        Some(org) => Ok(org.to_owned()),
        None => bail!("GET a seeded leaf answered {scope}"),
    }
}

/// One pause or resume; its round trip in milliseconds.
pub(crate) async fn lifecycle(
    client: &reqwest::Client,
    base: &str,
    token: &str,
    scope: &str,
    action: &str,
) -> anyhow::Result<f64> {
    let started = Instant::now();
    call(
        client,
        format!("{base}/v1/scopes/{scope}/{action}"),
        token,
        json!({"reason": "bench"}),
    )
    .await?;
    Ok(started.elapsed().as_secs_f64() * 1_000.0)
}

/// An organization with a team, a service principal holding `data:use`, and the bodies of
/// a 1 KiB encrypt and of the decrypt of its result.
pub(crate) struct DataOrg {
    pub(crate) admin: String,
    pub(crate) scope: String,
    pub(crate) token: String,
    pub(crate) encrypt_body: String,
    pub(crate) decrypt_body: String,
}

pub(crate) async fn data_org(
    client: &reqwest::Client,
    base: &str,
    operator: &str,
) -> anyhow::Result<DataOrg> {
    use base64::Engine;
    let org = create_org(client, base, operator).await?;
    let scope = create_scope(client, base, &org.admin, "team", "data", &org.id).await?;
    let issued = call(
        client,
        format!("{base}/v1/orgs/{}/tokens", org.id),
        &org.admin,
        json!({"principal": "bench", "kind": "service", "role": "member"}),
    )
    .await?;
    let token = issued["token"].as_str().unwrap_or_default().to_owned();
    call(
        client,
        format!("{base}/v1/orgs/{}/grants", org.id),
        &org.admin,
        json!({"principal": "bench", "permission": "data:use"}),
    )
    .await?;
    let plaintext = vec![0x5au8; 1024];
    let encrypt_body = json!({
        "plaintext": base64::engine::general_purpose::STANDARD.encode(&plaintext),
        "class": "messages"
    });
    let sealed = call(
        client,
        format!("{base}/v1/scopes/{scope}/encrypt"),
        &token,
        encrypt_body.clone(),
    )
    .await?;
    let decrypt_body = json!({"ciphertext": sealed["ciphertext"], "class": "messages"});
    // Warm the key cache for decrypts too.
    call(
        client,
        format!("{base}/v1/scopes/{scope}/decrypt"),
        &token,
        decrypt_body.clone(),
    )
    .await?;
    Ok(DataOrg {
        admin: org.admin,
        scope,
        token,
        encrypt_body: encrypt_body.to_string(),
        decrypt_body: decrypt_body.to_string(),
    })
}

// ---------------------------------------------------------------------------------------
// Load

fn cpu_row(
    load: &str,
    runs: &[server::WrkRun],
    before: &Usage,
    pid: u32,
    database: Option<&str>,
) -> CpuRow {
    CpuRow {
        load: load.into(),
        requests: runs.iter().map(|r| r.requests).sum(),
        usage: Usage::sample(pid, database).since(before),
        postgres: database.is_some(),
    }
}

fn wrk_repeated(url: &str, script: &str, plan: &Sizes) -> anyhow::Result<Vec<server::WrkRun>> {
    let mut runs = vec![];
    for _ in 0..plan.repeats {
        runs.push(server::wrk(url, script, plan.seconds)?);
    }
    Ok(runs)
}

pub(crate) fn load_figure(
    name: String,
    runs: &[server::WrkRun],
    baseline_name: &str,
    baseline: &[server::WrkRun],
) -> Figure {
    let rps = Stats::of(&runs.iter().map(|r| r.rps).collect::<Vec<_>>());
    let p50 = Stats::of(&runs.iter().map(|r| r.p50_ms).collect::<Vec<_>>()).median;
    let p99 = Stats::of(&runs.iter().map(|r| r.p99_ms).collect::<Vec<_>>()).median;
    let errors: u64 = runs.iter().map(|r| r.errors).sum();
    let requests: u64 = runs.iter().map(|r| r.requests).sum();
    let hello = Stats::of(&baseline.iter().map(|r| r.rps).collect::<Vec<_>>());
    let mut median = format!(
        "{} req/s, p50 {}, p99 {}",
        count(rps.median),
        ms(p50),
        ms(p99)
    );
    if errors > 0 {
        median.push_str(&format!(" — {errors} of {requests} answers not 2xx"));
    }
    Figure::new(name)
        .median(median)
        .spread(rps.range(count))
        .baseline(format!("{baseline_name}: {} req/s", count(hello.median)))
        .ratio(rps.median / hello.median.max(1.0))
        .target(
            "≥ 20,000 req/s, p99 ≤ 5 ms, only 2xx",
            rps.median >= 20_000.0 && p99 <= 5.0 && errors == 0,
        )
}

/// One run of 8 clients, each pausing and resuming its own scope for `seconds`.
pub(crate) struct CommandRun {
    pub(crate) rate: f64,
    pub(crate) latencies_ms: Vec<f64>,
    pub(crate) errors: usize,
}

pub(crate) async fn command_load(
    client: &reqwest::Client,
    base: &str,
    token: &str,
    scopes: &[String],
    seconds: u64,
) -> anyhow::Result<CommandRun> {
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let started = Instant::now();
    let mut tasks = vec![];
    for scope in scopes {
        let client = client.clone();
        let url = format!("{base}/v1/scopes/{scope}");
        let token = token.to_owned();
        tasks.push(tokio::spawn(async move {
            let mut latencies = vec![];
            let mut errors = 0usize;
            let mut action = "pause";
            while Instant::now() < deadline {
                let sent = Instant::now();
                let ok = client
                    .post(format!("{url}/{action}"))
                    .bearer_auth(&token)
                    .json(&json!({"reason": "bench"}))
                    .send()
                    .await
                    .map(|r| r.status().is_success())
                    .unwrap_or(false);
                if ok {
                    latencies.push(sent.elapsed().as_secs_f64() * 1_000.0);
                    action = if action == "pause" { "resume" } else { "pause" };
                } else {
                    errors += 1;
                }
            }
            (latencies, errors)
        }));
    }
    let mut latencies_ms = vec![];
    let mut errors = 0;
    for task in tasks {
        let (latencies, failed) = task.await?;
        latencies_ms.extend(latencies);
        errors += failed;
    }
    let elapsed = started.elapsed().as_secs_f64();
    Ok(CommandRun {
        rate: latencies_ms.len() as f64 / elapsed,
        latencies_ms,
        errors,
    })
}

fn command_figure(name: &str, runs: &[CommandRun], inserts: &[f64], baseline: &str) -> Figure {
    let rates = Stats::of(&runs.iter().map(|r| r.rate).collect::<Vec<_>>());
    let all: Vec<f64> = runs
        .iter()
        .flat_map(|r| r.latencies_ms.iter().copied())
        .collect();
    let errors: usize = runs.iter().map(|r| r.errors).sum();
    let raw = Stats::of(inserts);
    let ratio = rates.median / raw.median.max(1.0);
    let mut median = format!(
        "{} commands/s, p50 {}, p99 {}",
        count(rates.median),
        ms(quantile(&all, 0.5)),
        ms(quantile(&all, 0.99))
    );
    if errors > 0 {
        median.push_str(&format!(" — {errors} refused"));
    }
    Figure::new(name)
        .median(median)
        .spread(rates.range(count))
        .baseline(format!(
            "{baseline}: {} rows/s ({})",
            count(raw.median),
            raw.range(count)
        ))
        .ratio(ratio)
        .target("≥ 0.50 of raw INSERT", ratio >= 0.5 && errors == 0)
}

fn raw_row() -> anyhow::Result<(Arc<str>, Arc<str>)> {
    let org = OrgId::generate();
    let payload = serde_json::to_string(&ScopeEvent::ScopePaused {})?;
    let meta = serde_json::to_string(&metadata(
        org,
        &format!("{org}/{}", ScopeId::generate()),
        Some("bench"),
    ))?;
    Ok((payload.into(), meta.into()))
}

/// Single-row INSERTs, each its own transaction, from 8 connections for `seconds`.
pub(crate) async fn raw_inserts_postgres(url: &str, seconds: u64) -> anyhow::Result<f64> {
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(8)
        .connect(url)
        .await?;
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS bench_raw_events (aggregate_id text NOT NULL, sequence bigint NOT NULL, \
         event_type text NOT NULL, payload json NOT NULL, metadata json NOT NULL, \
         recorded_at timestamptz NOT NULL DEFAULT clock_timestamp(), PRIMARY KEY (aggregate_id, sequence))",
    )
    .execute(&pool)
    .await?;
    let (payload, meta) = raw_row()?;
    let clients = pool.clone();
    let rate = eight_clients(seconds, move |id, n| {
        let (pool, payload, meta) = (clients.clone(), payload.clone(), meta.clone());
        async move {
            sqlx::query("INSERT INTO bench_raw_events (aggregate_id, sequence, event_type, payload, metadata) VALUES ($1, $2, 'ScopePaused', CAST($3 AS json), CAST($4 AS json))")
                .bind(&*id)
                .bind(n)
                .bind(&*payload)
                .bind(&*meta)
                .execute(&pool)
                .await
                .map(|_| ())
        }
    })
    .await?;
    pool.close().await;
    Ok(rate)
}

/// The same on SQLite, in the server's own database file, with EKM's pragmas and, as in
/// EKM, one writer connection that the 8 clients share.
pub(crate) async fn raw_inserts_sqlite(path: &Path, seconds: u64) -> anyhow::Result<f64> {
    use sqlx::sqlite::{
        SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous,
    };
    let options = SqliteConnectOptions::new()
        .filename(path)
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Full)
        .busy_timeout(Duration::from_secs(10))
        .foreign_keys(true);
    let pool = SqlitePoolOptions::new()
        .max_connections(1)
        .connect_with(options)
        .await?;
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS bench_raw_events (aggregate_id text NOT NULL, sequence integer NOT NULL, \
         event_type text NOT NULL, payload text NOT NULL, metadata text NOT NULL, recorded_at text, \
         PRIMARY KEY (aggregate_id, sequence)) STRICT",
    )
    .execute(&pool)
    .await?;
    let (payload, meta) = raw_row()?;
    let clients = pool.clone();
    let rate = eight_clients(seconds, move |id, n| {
        let (pool, payload, meta) = (clients.clone(), payload.clone(), meta.clone());
        async move {
            sqlx::query("INSERT INTO bench_raw_events (aggregate_id, sequence, event_type, payload, metadata, recorded_at) VALUES ($1, $2, 'ScopePaused', $3, $4, strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))")
                .bind(&*id)
                .bind(n)
                .bind(&*payload)
                .bind(&*meta)
                .execute(&pool)
                .await
                .map(|_| ())
        }
    })
    .await?;
    pool.close().await;
    Ok(rate)
}

/// Rows per second that 8 concurrent clients write for `seconds`, each calling
/// `insert(its aggregate id, sequence)` one row at a time.
async fn eight_clients<F, Fut>(seconds: u64, insert: F) -> anyhow::Result<f64>
where
    F: Fn(Arc<str>, i64) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = Result<(), sqlx::Error>> + Send,
{
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let started = Instant::now();
    let mut tasks = vec![];
    for _ in 0..8 {
        let insert = insert.clone();
        tasks.push(tokio::spawn(async move {
            let id: Arc<str> = uuid::Uuid::now_v7().to_string().into();
            let mut n = 0i64;
            while Instant::now() < deadline {
                insert(Arc::clone(&id), n).await?;
                n += 1;
            }
            Ok::<i64, sqlx::Error>(n)
        }));
    }
    let mut rows = 0i64;
    for task in tasks {
        rows += task.await??;
    }
    Ok(rows as f64 / started.elapsed().as_secs_f64())
}

/// One pause during a decrypt loop.
struct Cycle {
    /// Decrypts whose request started after the pause was answered, and how many of them
    /// succeeded.
    attempts_after_ack: usize,
    successes_started_after_ack: usize,
    /// The end of the last successful decrypt, in ms after the answer (0 if none ended
    /// after it).
    last_success_after_ack_ms: f64,
    first_refusal_after_ack_ms: Option<f64>,
}

/// `cycles` times: 4 clients decrypt in a loop on `data_base`; the scope is paused through
/// `control_base`; the loop runs `watch` longer; then the scope is resumed and the loop on
/// `data_base` waited for until it succeeds again.
async fn revocation(
    client: &reqwest::Client,
    control_base: &str,
    data_base: &str,
    data: &DataOrg,
    cycles: usize,
    watch: Duration,
) -> anyhow::Result<Vec<Cycle>> {
    let decrypt_url = format!("{data_base}/v1/scopes/{}/decrypt", data.scope);
    let mut results = vec![];
    for _ in 0..cycles {
        // Warm: the data instance decrypts again (after the previous resume).
        let warm = Instant::now();
        loop {
            let ok = client
                .post(&decrypt_url)
                .bearer_auth(&data.token)
                .header("content-type", "application/json")
                .body(data.decrypt_body.clone())
                .send()
                .await
                .map(|r| r.status().is_success())
                .unwrap_or(false);
            if ok {
                break;
            }
            if warm.elapsed() > Duration::from_secs(10) {
                bail!("decrypts did not resume within 10 s");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let stop = Arc::new(AtomicBool::new(false));
        let mut tasks = vec![];
        for _ in 0..4 {
            let client = client.clone();
            let url = decrypt_url.clone();
            let token = data.token.clone();
            let body = data.decrypt_body.clone();
            let stop = stop.clone();
            tasks.push(tokio::spawn(async move {
                let mut samples = vec![];
                while !stop.load(Ordering::Relaxed) {
                    let sent = Instant::now();
                    let ok = client
                        .post(&url)
                        .bearer_auth(&token)
                        .header("content-type", "application/json")
                        .body(body.clone())
                        .send()
                        .await
                        .map(|r| r.status().is_success())
                        .unwrap_or(false);
                    samples.push((sent, Instant::now(), ok));
                }
                samples
            }));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        lifecycle(client, control_base, &data.admin, &data.scope, "pause").await?;
        let ack = Instant::now();
        tokio::time::sleep(watch).await;
        stop.store(true, Ordering::Relaxed);
        let mut samples = vec![];
        for task in tasks {
            samples.extend(task.await?);
        }
        let after: Vec<_> = samples.iter().filter(|(sent, _, _)| *sent > ack).collect();
        let last_success = samples
            .iter()
            .filter(|(_, done, ok)| *ok && *done > ack)
            .map(|(_, done, _)| done.duration_since(ack).as_secs_f64() * 1_000.0)
            .fold(0.0, f64::max);
        let first_refusal = samples
            .iter()
            .filter(|(_, done, ok)| !*ok && *done > ack)
            .map(|(_, done, _)| done.duration_since(ack).as_secs_f64() * 1_000.0)
            .reduce(f64::min);
        results.push(Cycle {
            attempts_after_ack: after.len(),
            successes_started_after_ack: after.iter().filter(|(_, _, ok)| *ok).count(),
            last_success_after_ack_ms: last_success,
            first_refusal_after_ack_ms: first_refusal,
        });
        lifecycle(client, control_base, &data.admin, &data.scope, "resume").await?;
    }
    Ok(results)
}
