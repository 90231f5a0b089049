//! Wiring: open the database, make sure the operator token exists, start the projection
//! runner and the HTTP server, and stop all of it cleanly on SIGTERM or SIGINT.

use std::fs::File;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context};
use ekm_api::health::HealthMonitor;
use ekm_api::keys::{local_master_key, KeyService, KmsOptions};
use ekm_api::{router, App, AppState};
use ekm_keys::{SealKey, AUDIT_KEY_FILE, MASTER_KEY_FILE};
use ekm_kms::KmsSettings;
use ekm_projections::{Projector, ProjectorConfig};
use ekm_store::{Db, DbConfig, Tokens, OPERATOR_TOKEN_FILE};
use tokio::sync::watch;

use crate::cli::{DbArgs, ServeArgs};

/// Creates the data directory (0700) and, for SQLite, takes its lock: one process at a
/// time may write an embedded database.
pub fn prepare_data_dir(args: &DbArgs) -> anyhow::Result<(DbConfig, Option<File>)> {
    use std::os::unix::fs::DirBuilderExt;
    let dir = &args.data_dir;
    if !dir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("cannot create the data directory {}", dir.display()))?;
    }
    match &args.database_url {
        Some(url) => Ok((DbConfig::Postgres { url: url.clone() }, None)),
        None => Ok((DbConfig::sqlite_in(dir), Some(lock_data_dir(dir)?))),
    }
}

fn lock_data_dir(dir: &Path) -> anyhow::Result<File> {
    let path = dir.join("ekm.lock");
    let file = File::create(&path).with_context(|| format!("cannot create {}", path.display()))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => bail!(
            "another ekm process is using {}; stop it first (an embedded SQLite database has one writer)",
            dir.display()
        ),
        Err(std::fs::TryLockError::Error(error)) => {
            Err(error).with_context(|| format!("cannot lock {}", path.display()))
        }
    }
}

/// The audit key: `--audit-key-file`, else `DATA_DIR/audit.key`; created (0600) only by
/// the server.
pub fn audit_key(args: &DbArgs, file: Option<&Path>, create: bool) -> anyhow::Result<SealKey> {
    let path = file.map_or_else(|| args.data_dir.join(AUDIT_KEY_FILE), Path::to_path_buf);
    match SealKey::load(&path, create) {
        Ok(Some(key)) => {
            // The path and a fingerprint, never the key.
            tracing::info!(path = %path.display(), fingerprint = %key.fingerprint(), "audit key ready");
            Ok(key)
        }
        Ok(None) => bail!(
            "no audit key at {} (the server creates it; give --audit-key-file)",
            path.display()
        ),
        Err(error) => Err(anyhow::anyhow!(ekm_projections::error_chain(&error))),
    }
}

pub async fn open(config: &DbConfig) -> anyhow::Result<Db> {
    let db = Db::open(config)
        .await
        .map_err(|error| anyhow::anyhow!(ekm_projections::error_chain(&error)))?;
    Ok(db)
}

/// Opens a database that must already be migrated (`--no-migrate`).
async fn open_migrated(config: &DbConfig) -> anyhow::Result<Db> {
    let db = Db::connect(config)
        .await
        .map_err(|error| anyhow::anyhow!(ekm_projections::error_chain(&error)))?;
    if let Err(error) = db.require_migrated().await {
        db.close().await;
        bail!(ekm_projections::error_chain(&error));
    }
    Ok(db)
}

pub async fn migrate(args: DbArgs) -> anyhow::Result<()> {
    let (config, _lock) = prepare_data_dir(&args)?;
    let db = open(&config).await?;
    tracing::info!(backend = db.backend_name(), "migrations applied");
    db.close().await;
    Ok(())
}

pub async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let (config, _lock) = prepare_data_dir(&args.db)?;
    let db = if args.no_migrate {
        open_migrated(&config).await?
    } else {
        open(&config).await?
    };
    tracing::info!(backend = db.backend_name(), data_dir = %args.db.data_dir.display(), "database ready");

    let created = Tokens::new(db.clone())
        .ensure_operator_token(&args.db.data_dir)
        .await
        .map_err(|e| anyhow::anyhow!(ekm_projections::error_chain(&e)))?;
    if created {
        // The path, never the token.
        tracing::info!(
            path = %args.db.data_dir.join(OPERATOR_TOKEN_FILE).display(),
            "operator token created (mode 0600)"
        );
    }

    let seal = audit_key(&args.db, args.audit_key_file.as_deref(), true)?;
    ekm_projections::register_seal_key(&db, &seal)
        .await
        .map_err(|e| anyhow::anyhow!(ekm_projections::error_chain(&e)))?;
    if !args.seal_existing_history {
        ekm_projections::refuse_resealing(&db)
            .await
            .map_err(|e| anyhow::anyhow!(ekm_projections::error_chain(&e)))?;
    }
    let projector = Arc::new(Projector::standard(
        db.clone(),
        ProjectorConfig {
            poll_interval: args.projection_poll_interval,
            ..ProjectorConfig::default()
        },
        seal.clone(),
    ));
    projector
        .init()
        .await
        .map_err(|e| anyhow::anyhow!(ekm_projections::error_chain(&e)))?;
    let position = projector
        .catch_up()
        .await
        .map_err(|e| anyhow::anyhow!(ekm_projections::error_chain(&e)))?;
    tracing::info!(position, "read models caught up");

    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let runner = tokio::spawn(projector.clone().run(shutdown_rx.clone()));

    let master_path = args
        .master_key_file
        .clone()
        .unwrap_or_else(|| args.db.data_dir.join(MASTER_KEY_FILE));
    let master = local_master_key(&db, &master_path)
        .await
        .map_err(|e| anyhow::anyhow!(ekm_projections::error_chain(&e)))?;
    tracing::info!(path = %master_path.display(), fingerprint = %master.fingerprint(), "master key ready");
    let kms = KmsOptions {
        settings: KmsSettings {
            timeout: args.kms_timeout,
            allowed_endpoints: args.kms_allowed_endpoints.clone(),
            ..KmsSettings::default()
        },
        grace: args.kms_grace_period,
    };
    let keys = KeyService::with_kms(db.clone(), master, args.key_cache_ttl, kms);
    let app = App::new(db.clone(), projector, keys, seal);
    let monitor = tokio::spawn(
        HealthMonitor::new(app.clone(), args.key_health_interval).run(shutdown_rx.clone()),
    );
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let address = listener.local_addr().unwrap_or(args.listen);
    tracing::info!(%address, key_health_interval = ?args.key_health_interval, "listening");

    let service = router(AppState { app }).into_make_service_with_connect_info::<SocketAddr>();
    let served = axum::serve(listener, service)
        .with_graceful_shutdown(shutdown_signal())
        .await;

    let _ = shutdown_tx.send(true);
    let _ = runner.await;
    let _ = monitor.await;
    db.close().await;
    served.context("the HTTP server failed")?;
    tracing::info!("stopped");
    Ok(())
}

/// Resolves on SIGTERM or SIGINT. In-flight requests finish; new ones are refused.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut terminate = match signal(SignalKind::terminate()) {
        Ok(stream) => stream,
        Err(error) => {
            tracing::error!(error = %error, "cannot listen for SIGTERM; only Ctrl-C will stop the server");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = terminate.recv() => tracing::info!("SIGTERM received; shutting down"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received; shutting down"),
    }
}
