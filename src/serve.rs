//! Wiring: open the database, make sure the operator token exists, start the projection
//! runner and the HTTP server, and stop all of it cleanly on SIGTERM or SIGINT.

use std::fs::File;
use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context};
use ekm_api::limits::Limits;
use ekm_api::{router_with_limits, AppState};
use ekm_keys::{SealKey, SigningKey, AUDIT_KEY_FILE, AUDIT_SIGNING_KEY_FILE, MASTER_KEY_FILE};
use ekm_kms::KmsSettings;
use ekm_projections::{Projector, ProjectorConfig};
use ekm_service::health::HealthMonitor;
use ekm_service::keys::{platform_master_key, KeyService, KmsOptions, PlatformKeySource};
use ekm_service::rekey::Rekeyer;
use ekm_service::App;
use ekm_store::{Db, DbConfig, Tokens, OPERATOR_TOKEN_FILE};
use tokio::sync::watch;

use crate::cli::{DbArgs, ServeArgs};
use crate::listener::ListenerConfig;

/// Creates the data directory, makes it 0700 even if it existed (it holds the database,
/// the master key and the operator token) and, for SQLite, takes its lock: one process at
/// a time may write an embedded database.
pub fn prepare_data_dir(args: &DbArgs) -> anyhow::Result<(DbConfig, Option<File>)> {
    let dir = &args.data_dir;
    ekm_store::private_files::private_dir(dir).with_context(|| {
        format!(
            "cannot create the data directory {} or make it private (0700)",
            dir.display()
        )
    })?;
    match &args.database_url {
        Some(url) => Ok((DbConfig::Postgres { url: url.clone() }, None)),
        None => Ok((DbConfig::sqlite_in(dir), Some(lock_data_dir(dir)?))),
    }
}

fn lock_data_dir(dir: &Path) -> anyhow::Result<File> {
    let path = dir.join("ekm.lock");
    let file = ekm_store::private_files::open_private(&path)
        .with_context(|| format!("cannot create {}", path.display()))?;
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

/// The audit signing key: `--audit-signing-key-file`, else `DATA_DIR/audit-signing.key`;
/// created (0600) only by the server.
pub fn audit_signing_key(
    data_dir: &Path,
    file: Option<&Path>,
    create: bool,
) -> anyhow::Result<SigningKey> {
    let path = file.map_or_else(|| data_dir.join(AUDIT_SIGNING_KEY_FILE), Path::to_path_buf);
    match SigningKey::load(&path, create) {
        Ok(Some(key)) => {
            tracing::info!(path = %path.display(), key_id = %key.key_id(), "audit signing key ready");
            Ok(key)
        }
        Ok(None) => bail!(
            "no audit signing key at {} (the server creates it; give --audit-signing-key-file)",
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
    // Before anything records one.
    ekm_service::metrics::install();
    let kms_settings = KmsSettings {
        timeout: args.kms_timeout,
        allowed_endpoints: args.kms_allowed_endpoints.clone(),
        ..KmsSettings::default()
    };
    // A pattern that cannot be parsed would silently allow nothing: refuse to start instead.
    if let Err((pattern, error)) = kms_settings.validate_allowed_endpoints() {
        bail!("--kms-allowed-endpoints: `{pattern}` {error}");
    }
    // The platform's own scope kinds: a file that does not validate stops start-up.
    if let Some(path) = &args.scope_kinds {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("--scope-kinds {}: {e}", path.display()))?;
        let registry = ekm_domain::KindRegistry::parse(&text)
            .map_err(|e| anyhow::anyhow!("--scope-kinds {}: {e}", path.display()))?;
        let listed: Vec<String> = registry
            .entries()
            .iter()
            .map(|(kind, parents)| {
                let parents: Vec<&str> = parents.iter().map(|p| p.as_str()).collect();
                format!("{kind} under {}", parents.join("|"))
            })
            .collect();
        registry
            .install()
            .map_err(|e| anyhow::anyhow!("--scope-kinds: {e}"))?;
        tracing::info!(kinds = %listed.join(", "), "scope kinds registered");
    }
    // A bad certificate or key stops start-up before anything else happens.
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => Some(crate::listener::tls_acceptor(cert, key)?),
        (None, None) => None,
        _ => bail!("--tls-cert and --tls-key go together"),
    };
    let listener_config = ListenerConfig {
        header_read_timeout: args.header_read_timeout,
        max_connections: args.max_connections as usize,
        shutdown_timeout: args.shutdown_timeout,
        tls,
    };
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
    let signing = Arc::new(audit_signing_key(
        &args.db.data_dir,
        args.audit_signing_key_file.as_deref(),
        true,
    )?);
    ekm_projections::register_signing_key(&db, &signing)
        .await
        .map_err(|e| anyhow::anyhow!(ekm_projections::error_chain(&e)))?;
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
            // The events are the durable commit of a command; the read models follow
            // without a WAL flush of their own (ADR 0020).
            async_commit: true,
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
    let platform_key = args.platform_key.kms_key()?;
    let source = match &platform_key {
        Some(kms) => PlatformKeySource::Kms(kms.clone()),
        None => PlatformKeySource::File(master_path.clone()),
    };
    let master = platform_master_key(&db, &source, &kms_settings)
        .await
        .map_err(|e| anyhow::anyhow!(ekm_projections::error_chain(&e)))?;
    match &platform_key {
        Some(kms) => {
            tracing::info!(held_by = %kms.wrapping_id(), fingerprint = %master.fingerprint(), "master key ready")
        }
        None => {
            tracing::info!(path = %master_path.display(), fingerprint = %master.fingerprint(), "master key ready")
        }
    }
    let kms = KmsOptions {
        settings: kms_settings,
        platform_key,
        grace: args.kms_grace_period,
        breaker: ekm_service::breaker::BreakerSettings {
            failures: match args.kms_breaker_failures {
                0 => u32::MAX,
                n => n,
            },
            // At most an hour: past that the breaker would outlast any outage it spares.
            cooldown: args
                .kms_breaker_cooldown
                .min(std::time::Duration::from_secs(3600)),
            max_cooldown: args.kms_breaker_cooldown.clamp(
                std::time::Duration::from_secs(30),
                std::time::Duration::from_secs(3600),
            ),
        },
    };
    let keys = KeyService::with_kms(db.clone(), master, args.key_cache_ttl, kms);
    let app = App::new(db.clone(), projector, keys, seal, signing);
    if args.scope_reads == "memory" {
        let started = std::time::Instant::now();
        let load = app
            .load_memory()
            .await
            .map_err(|e| anyhow::anyhow!(ekm_projections::error_chain(&e)))?;
        tracing::info!(
            scopes = load.scopes,
            key_versions = load.key_versions,
            grants = load.grants,
            checkpoint = load.checkpoint,
            events_after = load.events_after,
            heap_bytes = app.memory().heap_bytes(),
            seconds = started.elapsed().as_secs_f64(),
            "scope tree loaded into memory"
        );
    }
    let events_path = match &config {
        DbConfig::Sqlite { path } => Some(path.as_path()),
        DbConfig::Postgres { .. } => None,
    };
    let mode: ekm_store::AccessLogMode = args.access_log.parse().map_err(anyhow::Error::msg)?;
    let access = ekm_store::AccessLog::open(&db, events_path, mode, app.access_sealer())
        .await
        .map_err(|e| anyhow::anyhow!(ekm_projections::error_chain(&e)))
        .context("cannot open the access log")?;
    app.set_access_log(access.clone())
        .map_err(|e| anyhow::anyhow!(e.to_string()))?;
    tracing::info!(
        mode = args.access_log,
        retention_days = args.access_log_retention,
        "access log ready"
    );
    let retention = tokio::spawn(access_log_retention(
        access.clone(),
        args.access_log_retention,
        shutdown_rx.clone(),
        ekm_store::idempotency::Idempotency::new(app.db().clone()),
    ));
    let monitor = tokio::spawn(
        HealthMonitor::new(app.clone(), args.key_health_interval).run(shutdown_rx.clone()),
    );
    let rekeyer = tokio::spawn(Rekeyer::new(app.clone()).run(shutdown_rx.clone()));
    let scheduler =
        tokio::spawn(ekm_service::scheduler::Scheduler::new(app.clone()).run(shutdown_rx.clone()));
    let watch = tokio::spawn(
        app.clone()
            .watch_projections(args.max_projection_lag, shutdown_rx.clone()),
    );
    // Without a scrape, the recorder's histogram samples wait in memory: its upkeep folds
    // them in every few seconds.
    if let Some(handle) = ekm_service::metrics::install() {
        let mut stop = shutdown_rx.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    () = tokio::time::sleep(std::time::Duration::from_secs(5)) => handle.run_upkeep(),
                    changed = stop.changed() => if changed.is_err() || *stop.borrow() { return },
                }
            }
        });
    }
    let metrics = match args.metrics_listen {
        Some(address) => {
            let listener = tokio::net::TcpListener::bind(address)
                .await
                .with_context(|| format!("cannot listen on {address} (--metrics-listen)"))?;
            if !address.ip().is_loopback() {
                tracing::warn!(%address, "metrics are served without a token over plain HTTP: keep the address private");
            }
            tracing::info!(%address, "serving metrics");
            // The main listener's protections: a connection cap, a header-read timeout,
            // and a bounded shutdown.
            let config = ListenerConfig {
                header_read_timeout: args.header_read_timeout,
                max_connections: 16,
                shutdown_timeout: args.shutdown_timeout,
                tls: None,
            };
            let mut stop = shutdown_rx.clone();
            Some(tokio::spawn(async move {
                let stopped = async move {
                    while !*stop.borrow() {
                        if stop.changed().await.is_err() {
                            return;
                        }
                    }
                };
                crate::listener::serve(listener, ekm_api::metrics_router(), config, stopped).await;
            }))
        }
        None => None,
    };
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let address = listener.local_addr().unwrap_or(args.listen);
    tracing::info!(
        %address,
        tls = listener_config.tls.is_some(),
        key_health_interval = ?args.key_health_interval,
        "listening"
    );

    let limits = Limits {
        request_timeout: args.request_timeout,
        max_concurrent_requests: args.max_concurrent_requests as usize,
        max_expensive_requests: args.max_expensive_requests as usize,
        rate: ekm_api::rate_limit::RateDefaults(ekm_domain::RateLimits {
            data_plane_principal: args.rate_limit_data_plane_principal.0,
            data_plane_organization: args.rate_limit_data_plane_organization.0,
            commands_principal: args.rate_limit_commands_principal.0,
            commands_organization: args.rate_limit_commands_organization.0,
        }),
    };
    let router = router_with_limits(AppState::new(app), limits);
    crate::listener::serve(listener, router, listener_config, shutdown_signal()).await;

    let _ = shutdown_tx.send(true);
    let _ = runner.await;
    let _ = monitor.await;
    let _ = watch.await;
    let _ = rekeyer.await;
    // Bounded: a look stops between pages, but the commands of the page in flight finish.
    let _ = tokio::time::timeout(args.shutdown_timeout, scheduler).await;
    if let Some(metrics) = metrics {
        let _ = metrics.await;
    }
    let _ = retention.await;
    // Records of async mode still queued are written before the database closes.
    access.drain(std::time::Duration::from_secs(5)).await;
    db.close().await;
    tracing::info!("stopped");
    Ok(())
}

/// Applies the access log's retention (and, on PostgreSQL, creates the coming months'
/// partitions) at start and every hour.
async fn access_log_retention(
    access: ekm_store::AccessLog,
    keep_days: u32,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
    idempotency: ekm_store::idempotency::Idempotency,
) {
    loop {
        match access.maintain(keep_days).await {
            Ok(removed) => tracing::info!(removed, keep_days, "access log retention applied"),
            Err(error) => tracing::error!(
                error = %ekm_projections::error_chain(&error),
                "access log retention failed; tried again in an hour"
            ),
        }
        // Idempotency keys older than 24 hours, on the same hourly beat (ADR 0035).
        match idempotency.expire().await {
            Ok(removed) => tracing::debug!(removed, "idempotency keys expired"),
            Err(error) => tracing::error!(
                error = %ekm_projections::error_chain(&error),
                "idempotency keys could not be expired; tried again in an hour"
            ),
        }
        tokio::select! {
            _ = tokio::time::sleep(std::time::Duration::from_secs(3600)) => {}
            _ = shutdown.changed() => return,
        }
    }
}

/// Resolves on SIGTERM or SIGINT. New connections are refused; requests in progress get
/// `--shutdown-timeout` to finish.
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

impl crate::cli::PlatformKeyArgs {
    /// The KMS key named by `--master-key`, if any.
    pub fn kms_key(&self) -> anyhow::Result<Option<ekm_domain::MasterKeyRef>> {
        self.master_key
            .as_deref()
            .map(|spec| self.parse(spec))
            .transpose()
    }

    /// `provider:key_id` with this endpoint.
    pub fn parse(&self, spec: &str) -> anyhow::Result<ekm_domain::MasterKeyRef> {
        let Some((provider, key_id)) = spec.split_once(':') else {
            bail!("--master-key {spec}: expected provider:key_id (aws-kms:arn:aws:kms:…)");
        };
        let provider: ekm_domain::Provider = provider
            .parse()
            .map_err(|e: ekm_domain::ValueError| anyhow::anyhow!("--master-key: {e}"))?;
        if provider == ekm_domain::Provider::Local {
            bail!("--master-key names a KMS key; the local key is the default (master.key)");
        }
        ekm_domain::MasterKeyRef::parse(provider, key_id, None, self.master_key_endpoint.as_deref())
            .map_err(|e| anyhow::anyhow!("--master-key: {e}"))
    }
}
