//! Rebuilding read models from the event log, and reporting each projection's progress.
//!
//! SQLite (server stopped; the CLI holds the data-directory lock): the read models are
//! emptied and replayed in place. PostgreSQL (server running or not): the read models are
//! built aside in the `ekm_rebuild` schema, then copied over the live ones in one
//! transaction that holds the live checkpoints, so readers see the old rows until the
//! commit and the new ones after it: no window of wrong answers. The audit chain (seals) is
//! never rebuilt.

use std::time::Instant;

use ekm_store::time::now_micros;
use ekm_store::{Db, PostgresDb};
use sqlx::postgres::PgPoolOptions;

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

fn rebuildable() -> Vec<Box<dyn Projection>> {
    standard_projections()
        .into_iter()
        .filter(|p| p.rebuildable())
        .collect()
}

/// Each projection's checkpoint and how far it is behind the log.
pub async fn status(db: &Db) -> Result<Vec<ProjectionStatus>, ProjectionError> {
    let head = db.head_position().await?;
    let projector = Projector::standard(db.clone(), ProjectorConfig::default());
    let checkpoints = projector.checkpoints().await?;
    Ok(standard_projections()
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
    let config = ProjectorConfig {
        batch_size: 2_000,
        ..ProjectorConfig::default()
    };
    let position = match db {
        Db::Sqlite(_) => {
            reset_in_place(db).await?;
            let projector = Projector::new(db.clone(), rebuildable(), config);
            projector.init().await?;
            projector.catch_up_reporting(progress).await?
        }
        Db::Postgres(live) => rebuild_aside(live, config, progress).await?,
    };
    Ok(RebuildReport {
        projections,
        events,
        position,
        seconds: started.elapsed().as_secs_f64(),
    })
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
    let mut tables: Vec<&'static str> = vec!["projection_checkpoints", "projection_state"];
    for projection in rebuildable() {
        tables.extend(projection.tables());
    }
    sqlx::query(&format!("DROP SCHEMA IF EXISTS {ASIDE} CASCADE"))
        .execute(pool)
        .await?;
    sqlx::query(&format!("CREATE SCHEMA {ASIDE}"))
        .execute(pool)
        .await?;
    for table in &tables {
        sqlx::query(&format!(
            "CREATE TABLE {ASIDE}.{table} (LIKE public.{table} INCLUDING ALL)"
        ))
        .execute(pool)
        .await?;
    }
    // A pool whose unqualified names find the aside tables first, and `events` in public.
    let options = (*pool.connect_options())
        .clone()
        .options([("search_path", format!("{ASIDE},public"))]);
    let aside_pool = PgPoolOptions::new()
        .max_connections(4)
        .connect_with(options)
        .await?;
    let aside = Projector::new(
        Db::Postgres(PostgresDb {
            pool: aside_pool.clone(),
        }),
        rebuildable(),
        config,
    );
    aside.init().await?;
    aside.catch_up_reporting(progress).await?;

    // Swap: hold the live checkpoints (the live runner waits), finish the aside catch-up,
    // copy the rows over in this one transaction, move the checkpoints, commit.
    let mut tx = pool.begin().await?;
    for projection in standard_projections().iter().filter(|p| p.rebuildable()) {
        sqlx::query(
            "SELECT position FROM public.projection_checkpoints WHERE name = $1 FOR UPDATE",
        )
        .bind(projection.name())
        .execute(&mut *tx)
        .await?;
    }
    let position = aside.catch_up_reporting(progress).await?;
    for projection in rebuildable() {
        for table in projection.tables() {
            sqlx::query(&format!("DELETE FROM public.{table}"))
                .execute(&mut *tx)
                .await?;
            sqlx::query(&format!(
                "INSERT INTO public.{table} SELECT * FROM {ASIDE}.{table}"
            ))
            .execute(&mut *tx)
            .await?;
        }
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
        sqlx::query(
            "UPDATE public.projection_checkpoints SET position = $2, updated_at = $3 WHERE name = $1",
        )
        .bind(projection.name())
        .bind(position)
        .bind(now_micros())
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    aside_pool.close().await;
    sqlx::query(&format!("DROP SCHEMA IF EXISTS {ASIDE} CASCADE"))
        .execute(pool)
        .await?;
    Ok(position)
}
