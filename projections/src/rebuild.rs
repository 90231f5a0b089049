//! Rebuilding read models from the event log, and reporting each projection's progress.
//!
//! SQLite (server stopped; the CLI holds the data-directory lock): the read models are
//! emptied and replayed in place. PostgreSQL (server running or not): the read models are
//! built aside in the `ekm_rebuild` schema (unlogged, secondary indexes built once at the
//! end), then swapped in by moving tables between schemas in one transaction that holds the
//! live checkpoints: readers wait for the commit and then see the new rows, never a mix. The
//! audit chain (seals) and key material are never rebuilt.

use std::time::Instant;

use ekm_store::time::now_micros;
use ekm_store::{Db, PostgresDb};

use crate::error::ProjectionError;
use crate::runner::{standard_projections, Projection, Projector, ProjectorConfig};

/// What a rebuild did.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct RebuildReport {
    pub projections: Vec<String>,
    pub events: i64,
    pub position: i64,
    pub seconds: f64,
}

/// Where a projection stands.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct ProjectionStatus {
    pub name: String,
    pub position: i64,
    pub head: i64,
    pub lag: i64,
    pub rebuildable: bool,
}

const ASIDE: &str = "ekm_rebuild";
/// The advisory lock key that lets one rebuild run at a time on a PostgreSQL database.
const REBUILD_LOCK: i64 = 7_431_000_002;
/// Where the replaced live tables go for the moment of the swap, then dropped.
const RETIRED: &str = "ekm_retired";

fn rebuildable() -> Vec<Box<dyn Projection>> {
    standard_projections(None)
        .into_iter()
        .filter(|p| p.rebuildable())
        .collect()
}

/// Each projection's checkpoint and how far it is behind the log.
pub async fn status(db: &Db) -> Result<Vec<ProjectionStatus>, ProjectionError> {
    let head = db.head_position().await?;
    let projector = Projector::new(
        db.clone(),
        standard_projections(None),
        ProjectorConfig::default(),
    );
    let checkpoints = projector.checkpoints().await?;
    Ok(standard_projections(None)
        .iter()
        .zip(checkpoints)
        .map(|(projection, (name, position))| ProjectionStatus {
            name,
            position,
            head,
            lag: head - position,
            rebuildable: projection.rebuildable(),
        })
        .collect())
}

/// Rebuilds every rebuildable read model from the events. `progress(applied, head)` is
/// called after each batch.
pub async fn rebuild(
    db: &Db,
    progress: &mut (dyn FnMut(i64, i64) + Send),
) -> Result<RebuildReport, ProjectionError> {
    let started = Instant::now();
    let projections: Vec<String> = rebuildable().iter().map(|p| p.name().to_owned()).collect();
    let events = db.event_count().await?;
    // Larger batches mean fewer round trips and commits; memory holds at most three batches
    // (the one written, two read ahead), whatever the history's length.
    let config = ProjectorConfig {
        batch_size: 10_000,
        ..ProjectorConfig::default()
    };
    // PostgreSQL builds aside, where nothing cancels a batch half-way and an interrupted
    // rebuild's tables are thrown away: COPY is safe there (`ProjectorConfig::bulk_copy`).
    let aside_config = ProjectorConfig {
        bulk_copy: true,
        ..config
    };
    let position = match db {
        Db::Sqlite(_) => {
            reset_in_place(db).await?;
            let projector = Projector::new(db.clone(), rebuildable(), config);
            projector.init().await?;
            // The CLI holds the data directory's lock: nothing else advances the projector.
            projector.catch_up_prefetching(progress).await?
        }
        Db::Postgres(live) => rebuild_aside(live, aside_config, progress).await?,
    };
    Ok(RebuildReport {
        projections,
        events,
        position,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// Catches every projector up at once; reports the slowest one's progress. Returns the
/// position each reached (events may commit meanwhile, so they can differ).
async fn catch_up_all(
    projectors: &[Projector],
    prefetch: bool,
    progress: &mut (dyn FnMut(i64, i64) + Send),
) -> Result<Vec<i64>, ProjectionError> {
    let reached: Vec<std::sync::atomic::AtomicI64> = projectors
        .iter()
        .map(|_| std::sync::atomic::AtomicI64::new(0))
        .collect();
    let progress = std::sync::Mutex::new(progress);
    let runs = projectors.iter().enumerate().map(|(i, projector)| {
        let reached = &reached;
        let progress = &progress;
        async move {
            let mut report = |applied: i64, head: i64| {
                reached[i].store(applied, std::sync::atomic::Ordering::Relaxed);
                let slowest = reached
                    .iter()
                    .map(|r| r.load(std::sync::atomic::Ordering::Relaxed))
                    .min()
                    .unwrap_or(applied);
                if let Ok(mut progress) = progress.lock() {
                    (*progress)(slowest, head);
                }
            };
            if prefetch {
                projector.catch_up_prefetching(&mut report).await
            } else {
                projector.catch_up_reporting(&mut report).await
            }
        }
    });
    futures_util::future::try_join_all(runs).await
}

async fn reset_in_place(db: &Db) -> Result<(), ProjectionError> {
    let Db::Sqlite(sqlite) = db else {
        return Ok(());
    };
    let mut tx = sqlite.write.begin().await?;
    for projection in rebuildable() {
        for table in projection.tables() {
            sqlx::query(&format!("DELETE FROM {table}"))
                .execute(&mut *tx)
                .await?;
        }
        sqlx::query("DELETE FROM projection_state WHERE projection = $1")
            .bind(projection.name())
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "UPDATE projection_checkpoints SET position = 0, updated_at = $2 WHERE name = $1",
        )
        .bind(projection.name())
        .bind(now_micros())
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    Ok(())
}

async fn rebuild_aside(
    live: &PostgresDb,
    config: ProjectorConfig,
    progress: &mut (dyn FnMut(i64, i64) + Send),
) -> Result<i64, ProjectionError> {
    let pool = &live.pool;
    // One rebuild at a time per database: a session lock, held until this returns.
    let mut guard = pool.acquire().await?;
    let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
        .bind(REBUILD_LOCK)
        .fetch_one(&mut *guard)
        .await?;
    if !locked {
        return Err(ProjectionError::RebuildRunning);
    }
    let result = rebuild_aside_locked(live, config, progress).await;
    let _ = sqlx::query("SELECT pg_advisory_unlock($1)")
        .bind(REBUILD_LOCK)
        .execute(&mut *guard)
        .await;
    result
}

async fn rebuild_aside_locked(
    live: &PostgresDb,
    config: ProjectorConfig,
    progress: &mut (dyn FnMut(i64, i64) + Send),
) -> Result<i64, ProjectionError> {
    let pool = &live.pool;
    let read_models: Vec<&'static str> = rebuildable()
        .iter()
        .flat_map(|p| p.tables().iter().copied())
        .collect();
    for schema in [ASIDE, RETIRED] {
        sqlx::query(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))
            .execute(pool)
            .await?;
    }
    sqlx::query(&format!("CREATE SCHEMA {ASIDE}"))
        .execute(pool)
        .await?;
    // Bookkeeping tables: small, copied whole.
    for table in ["projection_checkpoints", "projection_state"] {
        sqlx::query(&format!(
            "CREATE TABLE {ASIDE}.{table} (LIKE public.{table} INCLUDING ALL)"
        ))
        .execute(pool)
        .await?;
    }
    // Read models: unlogged and with only their primary key while they load (the key serves
    // the merged UPDATEs); secondary indexes are built once at the end, under their own names.
    for table in &read_models {
        sqlx::query(&format!(
            "CREATE UNLOGGED TABLE {ASIDE}.{table} (LIKE public.{table} INCLUDING DEFAULTS)"
        ))
        .execute(pool)
        .await?;
        let keys: Vec<(String, String)> = sqlx::query_as(
            "SELECT conname::text, pg_get_constraintdef(oid) FROM pg_constraint \
             WHERE conrelid = ('public.' || $1)::regclass AND contype = 'p'",
        )
        .bind(table)
        .fetch_all(pool)
        .await?;
        for (name, definition) in keys {
            sqlx::query(&format!(
                "ALTER TABLE {ASIDE}.{table} ADD CONSTRAINT {name} {definition}"
            ))
            .execute(pool)
            .await?;
        }
    }
    // A pool whose unqualified names find the aside tables first, and `events` in public.
    // Its commits need not wait for the disk: an interrupted rebuild's tables are thrown
    // away, and the swap (on the live pool) is an ordinary durable commit.
    let options = (*pool.connect_options()).clone().options([
        ("search_path", format!("{ASIDE},public")),
        ("synchronous_commit", "off".to_owned()),
    ]);
    let aside_pool = ekm_store::pg_pool_options()
        .max_connections(4)
        .connect_with(options)
        .await?;
    // One projector per read model, running concurrently: they are independent (their own
    // checkpoints and state), so PostgreSQL writes them on separate backends while this
    // process decodes.
    let aside_db = Db::Postgres(PostgresDb::new(aside_pool.clone()));
    let asides: Vec<Projector> = rebuildable()
        .into_iter()
        .map(|projection| Projector::new(aside_db.clone(), vec![projection], config))
        .collect();
    for aside in &asides {
        aside.init().await?;
    }
    let phase = Instant::now();
    catch_up_all(&asides, true, progress).await?;
    tracing::info!(
        seconds = phase.elapsed().as_secs_f64(),
        "rebuild: read models replayed aside"
    );
    let phase = Instant::now();

    // Each table on its own connection, concurrently: one table's WAL-writing `SET LOGGED`
    // rewrite overlaps with another's index builds. `SET LOGGED` first: it rewrites the table
    // and rebuilds every index the table has, so secondary indexes built before it would be
    // built twice (measured: 5 s of a 1M-scope rebuild).
    let finish = read_models.iter().map(|table| async move {
        let started = Instant::now();
        sqlx::query(&format!("ALTER TABLE {ASIDE}.{table} SET LOGGED"))
            .execute(pool)
            .await?;
        let logged = started.elapsed();
        let indexes: Vec<String> = sqlx::query_scalar(
            "SELECT indexdef FROM pg_indexes i WHERE schemaname = 'public' AND tablename = $1 \
             AND NOT EXISTS (SELECT 1 FROM pg_constraint c WHERE c.conname = i.indexname \
                             AND c.conrelid = ('public.' || $1)::regclass)",
        )
        .bind(table)
        .fetch_all(pool)
        .await?;
        // The indexes of one table concurrently too (CREATE INDEX locks allow one another).
        let builds = indexes.into_iter().map(|definition| async move {
            let aside_definition = definition.replace(
                &format!(" ON public.{table} "),
                &format!(" ON {ASIDE}.{table} "),
            );
            sqlx::query(&aside_definition).execute(pool).await
        });
        futures_util::future::try_join_all(builds).await?;
        tracing::info!(
            table = *table,
            set_logged_seconds = logged.as_secs_f64(),
            indexes_seconds = (started.elapsed() - logged).as_secs_f64(),
            "rebuild: table finished"
        );
        Ok::<(), ProjectionError>(())
    });
    futures_util::future::try_join_all(finish).await?;

    tracing::info!(
        seconds = phase.elapsed().as_secs_f64(),
        "rebuild: indexes built, tables logged"
    );
    let phase = Instant::now();
    // Swap: hold the live checkpoints (the live runner waits), finish the aside catch-up,
    // move the live tables out and the rebuilt ones in, move the checkpoints, commit. Readers
    // wait for the commit (the tables are locked) and then see the new rows: never a mix.
    sqlx::query(&format!("CREATE SCHEMA {RETIRED}"))
        .execute(pool)
        .await?;
    let mut tx = pool.begin().await?;
    for projection in standard_projections(None)
        .iter()
        .filter(|p| p.rebuildable())
    {
        sqlx::query(
            "SELECT position FROM public.projection_checkpoints WHERE name = $1 FOR UPDATE",
        )
        .bind(projection.name())
        .execute(&mut *tx)
        .await?;
    }
    let positions = catch_up_all(&asides, false, progress).await?;
    for table in &read_models {
        sqlx::query(&format!("ALTER TABLE public.{table} SET SCHEMA {RETIRED}"))
            .execute(&mut *tx)
            .await?;
        sqlx::query(&format!("ALTER TABLE {ASIDE}.{table} SET SCHEMA public"))
            .execute(&mut *tx)
            .await?;
    }
    for (projection, position) in rebuildable().into_iter().zip(&positions) {
        sqlx::query("DELETE FROM public.projection_state WHERE projection = $1")
            .bind(projection.name())
            .execute(&mut *tx)
            .await?;
        sqlx::query(&format!(
            "INSERT INTO public.projection_state SELECT * FROM {ASIDE}.projection_state WHERE projection = $1"
        ))
        .bind(projection.name())
        .execute(&mut *tx)
        .await?;
        // An upsert: on a database no server has started on yet, the live checkpoint row
        // does not exist, and the next start must not replay what was just rebuilt.
        sqlx::query(
            "INSERT INTO public.projection_checkpoints (name, position, updated_at) \
             VALUES ($1, $2, $3) \
             ON CONFLICT (name) DO UPDATE SET position = excluded.position, updated_at = excluded.updated_at",
        )
        .bind(projection.name())
        .bind(*position)
        .bind(now_micros())
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    tracing::info!(
        seconds = phase.elapsed().as_secs_f64(),
        "rebuild: swapped in"
    );
    aside_pool.close().await;
    for schema in [ASIDE, RETIRED] {
        sqlx::query(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))
            .execute(pool)
            .await?;
    }
    Ok(positions.into_iter().min().unwrap_or(0))
}
