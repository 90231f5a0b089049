//! `ekm-bench reads`: `GET /v1/scopes/{leaf}` on a big tree (1M scopes by default) answered
//! from the in-memory scope tree, beside the same reads answered from SQL
//! (`--scope-reads sql`) on the same store in the same run, with each server's start-up
//! time and resident memory (the difference is what the tree costs, per scope).

use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use ekm_domain::OrgId;
use ekm_store::{Db, DbConfig, Role, Tokens};

use crate::report::{count, ms, Stats};
use crate::server::{self, Server, WrkRun};
use crate::BenchDb;

/// What one mode of the server measured.
struct Mode {
    name: &'static str,
    starts_ms: Vec<f64>,
    rss_started_mib: f64,
    reads: Vec<WrkRun>,
    /// `GET /healthz` on the same server just before: the HTTP stack and the machine.
    hello: WrkRun,
    rss_peak_mib: f64,
    loaded: Option<String>,
}

pub async fn run(teams: usize, seconds: u64, repeats: usize) -> anyhow::Result<()> {
    server::ensure_wrk()?;
    let big = BenchDb::create().await?;
    let dir = server::temp_path("ekm-bench-reads");
    let result = measure(&big, &dir, teams, seconds, repeats).await;
    let _ = big.drop_db().await;
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn progress(message: impl AsRef<str>) {
    eprintln!(
        "[{}] {}",
        chrono::Utc::now().format("%H:%M:%S"),
        message.as_ref()
    );
}

async fn measure(
    big: &BenchDb,
    dir: &Path,
    teams: usize,
    seconds: u64,
    repeats: usize,
) -> anyhow::Result<()> {
    let err =
        |e: ekm_projections::ProjectionError| anyhow::anyhow!(ekm_projections::error_chain(&e));
    let db = Db::open(&DbConfig::Postgres {
        url: big.url.clone(),
    })
    .await
    .map_err(|e| anyhow::anyhow!(e))?;
    let org = OrgId::generate();
    let mut leaves = vec![];
    let scopes = teams * 1_001 + 1;
    progress(format!("seeding {scopes} scopes"));
    crate::all::seed_tree(&db, org, true, 0..teams, 999, &mut leaves).await?;
    ekm_projections::Projector::standard(
        db.clone(),
        ekm_projections::ProjectorConfig::default(),
        ekm_keys::SealKey::generate(),
    )
    .init()
    .await
    .map_err(err)?;
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir)?;
    progress("rebuilding the read models (ekm projections rebuild)");
    let (rebuild_secs, _) = server::rebuild_process(&big.url, dir).await?;
    progress(format!("rebuilt in {rebuild_secs:.1} s"));
    crate::all::analyze(&db).await?;
    let token = Tokens::new(db.clone())
        .create(Role::ORG_ADMIN, Some(org), "bench")
        .await
        .map_err(|e| anyhow::anyhow!(e))?
        .secret;
    db.close().await;

    progress("first start (the audit chain and key shredder catch up; not measured)");
    let (first, _) = Server::start_with(dir, Some(&big.url), &[("EKM_SCOPE_READS", "sql")]).await?;
    first.stop();

    let ids_path = server::temp_path("ekm-bench-read-leaves.txt");
    std::fs::write(&ids_path, leaves.join("\n"))?;
    let script = format!(
        "{}local counter = 0\n\
         function setup(thread) counter = counter + 1; thread:set(\"seed\", counter) end\n\
         function init(args)\n  math.randomseed(os.time() * 100 + seed)\n  ids = {{}}\n  \
         for line in io.lines(\"{}\") do ids[#ids + 1] = line end\nend\n\
         function request() return wrk.format(\"GET\", \"/v1/scopes/\" .. ids[math.random(#ids)]) end\n",
        server::lua(&token, None),
        ids_path.display()
    );
    let mut modes = vec![];
    for name in ["sql", "memory"] {
        progress(format!("scope reads from {name}: 3 starts, then wrk"));
        let mut starts_ms = vec![];
        let mut last = None;
        for _ in 0..3 {
            let (started, took) = Server::start_with(
                dir,
                Some(&big.url),
                &[
                    ("EKM_SCOPE_READS", name),
                    ("RUST_LOG", "warn,ekm::serve=info"),
                ],
            )
            .await?;
            starts_ms.push(took.as_secs_f64() * 1_000.0);
            if let Some(previous) = last.replace(started) {
                previous.stop();
            }
        }
        let server = last.context("no server")?;
        // Let the allocator settle after the load before reading its resident memory.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let rss_started_mib = server.rss_mib();
        let loaded = std::fs::read_to_string(server.log_path())
            .ok()
            .and_then(|log| {
                log.lines()
                    .find(|l| l.contains("scope tree loaded into memory"))
                    .map(str::to_owned)
            });
        let hello = server::wrk(
            &format!("{}/healthz", server.base),
            &server::lua(&token, None),
            seconds,
        )?;
        let mut reads = vec![];
        for _ in 0..repeats {
            reads.push(server::wrk(&format!("{}/", server.base), &script, seconds)?);
        }
        let rss_peak_mib = server.peak_rss_mib();
        server.stop();
        modes.push(Mode {
            name,
            starts_ms,
            rss_started_mib,
            reads,
            hello,
            rss_peak_mib,
            loaded,
        });
    }
    let _ = std::fs::remove_file(&ids_path);
    report(scopes, &modes);
    Ok(())
}

fn report(scopes: usize, modes: &[Mode]) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(
        out,
        "| `GET /v1/scopes/{{leaf}}`, {} scopes, wrk -t2 -c16 | req/s (median, range) | p50 | p99 | non-2xx | `GET /healthz` same server: req/s, p99 | start-up (median of 3) | RSS after start | peak RSS |",
        count(scopes as f64)
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|---|---|---|");
    for mode in modes {
        let rps = Stats::of(&mode.reads.iter().map(|r| r.rps).collect::<Vec<_>>());
        let p50 = Stats::of(&mode.reads.iter().map(|r| r.p50_ms).collect::<Vec<_>>()).median;
        let p99 = Stats::of(&mode.reads.iter().map(|r| r.p99_ms).collect::<Vec<_>>()).median;
        let errors: u64 = mode.reads.iter().map(|r| r.errors).sum();
        let starts = Stats::of(&mode.starts_ms);
        let _ = writeln!(
            out,
            "| from {} | {} ({}) | {} | {} | {errors} | {}, {} | {} | {:.0} MiB | {:.0} MiB |",
            mode.name,
            count(rps.median),
            rps.range(count),
            ms(p50),
            ms(p99),
            count(mode.hello.rps),
            ms(mode.hello.p99_ms),
            ms(starts.median),
            mode.rss_started_mib,
            mode.rss_peak_mib,
        );
    }
    if let [sql, memory] = modes {
        let per_scope =
            (memory.rss_started_mib - sql.rss_started_mib) * 1024.0 * 1024.0 / scopes as f64;
        let _ = writeln!(
            out,
            "\nThe tree's resident cost: {per_scope:.0} bytes per scope (RSS after start, memory − sql)."
        );
        if let Some(line) = &memory.loaded {
            let _ = writeln!(out, "Server log: {line}");
        }
    }
}
