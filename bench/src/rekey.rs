//! The re-key after a revoke (ADR 0013): a parent with many children gets a new wrapping
//! key and every child's wrapping key is re-wrapped under it, against the raw AES-SIV rate
//! of the same work (one unwrap and one wrap per child, in memory) in the same run.

use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ekm_domain::{
    Actor, ActorKind, EventMetadata, KeyVersion, Plan, ScopeId, ScopeKind, ScopeName, Tier,
};
use ekm_keys::Kek;
use ekm_projections::{Projector, ProjectorConfig};
use ekm_service::keys::{local_master_key, KeyService};
use ekm_service::App;
use ekm_store::{Db, DbConfig};

use crate::BenchDb;

fn user() -> EventMetadata {
    EventMetadata {
        actor: Actor {
            kind: ActorKind::User,
            id: "tok_bench".into(),
        },
        request_id: "bench".into(),
        reason: None,
        source_address: None,
        recorded_at: "2026-11-30T00:00:00Z".into(),
        location: None,
    }
}

/// One backend's figures.
pub struct Figures {
    pub backend: &'static str,
    pub children: usize,
    pub rekey: Duration,
    pub rewrapped: u64,
    pub raw: Duration,
}

impl Figures {
    pub fn rate(&self) -> f64 {
        self.rewrapped as f64 / self.rekey.as_secs_f64()
    }

    pub fn raw_rate(&self) -> f64 {
        self.children as f64 / self.raw.as_secs_f64()
    }
}

async fn measure(
    db: Db,
    config: DbConfig,
    dir: &std::path::Path,
    children: usize,
) -> anyhow::Result<Figures> {
    let backend = db.backend_name();
    let seal = ekm_keys::SealKey::generate();
    let projector = Arc::new(Projector::standard(
        db.clone(),
        ProjectorConfig::default(),
        seal.clone(),
    ));
    projector.init().await?;
    projector.catch_up().await?;
    let master = local_master_key(&db, &dir.join("master.key")).await?;
    let keys = KeyService::new(db.clone(), master, Duration::from_secs(3600));
    let app = App::new(
        db.clone(),
        projector,
        keys.clone(),
        seal,
        std::sync::Arc::new(ekm_keys::SigningKey::generate()),
    );
    let (org, _) = app
        .create_org(
            ScopeName::parse("bench")?,
            Plan::Enterprise,
            Tier::Managed,
            &user(),
        )
        .await?;
    let team = app
        .create_scope(
            &org.scope,
            ScopeKind::Team,
            ScopeName::parse("team")?,
            &user(),
        )
        .await?
        .scope;
    // The children's keys, stored as a command stores them (their scope rows are not
    // needed by the re-key, which walks the key tables). Seeding commits without waiting
    // for the disk; the re-key below is measured with durable commits again.
    set_durable(&db, false).await?;
    let seeding = Instant::now();
    for _ in 0..children {
        keys.create_scope_key(ScopeId::generate(), KeyVersion::FIRST, &team)
            .await?;
    }
    eprintln!(
        "rekey/{backend}: {children} children seeded in {:.1} s",
        seeding.elapsed().as_secs_f64()
    );
    if let Db::Postgres(pg) = &db {
        sqlx::query("ANALYZE").execute(&pg.pool).await?;
    }
    set_durable(&db, true).await?;
    // PostgreSQL: pooled connections keep the setting they started with, so the re-key
    // runs on a fresh pool (and key service) with durable commits.
    let (measured_db, measured_keys) = match &db {
        Db::Sqlite(_) => (db.clone(), keys.clone()),
        Db::Postgres(_) => {
            let fresh = Db::connect(&config).await?;
            let master = local_master_key(&fresh, &dir.join("master.key")).await?;
            let keys = KeyService::new(fresh.clone(), master, Duration::from_secs(3600));
            (fresh, keys)
        }
    };

    let started = Instant::now();
    let rewrapped = measured_keys
        .rekey_scope(&team, ScopeId::generate(), ekm_service::rekey::BATCH)
        .await?;
    let rekey = started.elapsed();
    if let Db::Postgres(_) = &measured_db {
        measured_db.close().await;
    }

    // Baseline: the same cryptographic work in memory.
    let old = Kek::generate();
    let new = Kek::generate();
    let child = Kek::generate();
    let wrapped = old.wrap(&child, &[b"child", b"1", b"parent", b"1"])?;
    let started = Instant::now();
    for _ in 0..children {
        let opened = old.unwrap_key(&wrapped, &[b"child", b"1", b"parent", b"1"])?;
        std::hint::black_box(new.wrap(&opened, &[b"child", b"1", b"parent", b"2"])?);
    }
    let raw = started.elapsed();
    Ok(Figures {
        backend,
        children,
        rekey,
        rewrapped,
        raw,
    })
}

pub async fn run(children: usize) -> anyhow::Result<Vec<Figures>> {
    let mut out = vec![];
    let dir = tempfile_dir()?;
    let sqlite = Db::open(&DbConfig::sqlite_in(&dir)).await?;
    out.push(measure(sqlite.clone(), DbConfig::sqlite_in(&dir), &dir, children).await?);
    sqlite.close().await;

    let bench_db = BenchDb::create().await?;
    let pg_config = DbConfig::Postgres {
        url: bench_db.url.clone(),
    };
    let postgres = Db::open(&pg_config).await?;
    let pg_dir = dir.join("pg");
    std::fs::create_dir_all(&pg_dir)?;
    let figures = measure(postgres.clone(), pg_config, &pg_dir, children).await;
    postgres.close().await;
    bench_db.drop_db().await?;
    out.push(figures?);
    let _ = std::fs::remove_dir_all(&dir);
    let mut stdout = std::io::stdout().lock();
    for f in &out {
        writeln!(
            stdout,
            "rekey {}: {} children, {} keys re-wrapped in {:.2} s = {:.0}/s; raw AES-SIV unwrap+wrap {:.0}/s (ratio {:.3})",
            f.backend,
            f.children,
            f.rewrapped,
            f.rekey.as_secs_f64(),
            f.rate(),
            f.raw_rate(),
            f.rate() / f.raw_rate()
        )?;
    }
    Ok(out)
}

fn tempfile_dir() -> anyhow::Result<std::path::PathBuf> {
    let dir =
        std::env::temp_dir().join(format!("ekm-bench-rekey-{}", uuid::Uuid::now_v7().simple()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// Durable commits (the server's setting) or not (seeding only).
async fn set_durable(db: &Db, durable: bool) -> anyhow::Result<()> {
    match db {
        Db::Sqlite(sqlite) => {
            let mode = if durable { "FULL" } else { "OFF" };
            sqlx::query(&format!("PRAGMA synchronous = {mode}"))
                .execute(&sqlite.write)
                .await?;
        }
        Db::Postgres(pg) => {
            let mode = if durable { "on" } else { "off" };
            let name: String = sqlx::query_scalar("SELECT current_database()")
                .fetch_one(&pg.pool)
                .await?;
            sqlx::query(&format!(
                "ALTER DATABASE {name} SET synchronous_commit = {mode}"
            ))
            .execute(&pg.pool)
            .await?;
            // Pooled connections keep the setting they started with.
            sqlx::query(&format!("SET synchronous_commit = {mode}"))
                .execute(&pg.pool)
                .await?;
        }
    }
    Ok(())
}
