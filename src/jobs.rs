//! Operator jobs that work on the database directly, without a server: projection rebuild
//! and status, audit export and verification.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::Path;
use std::process::ExitCode;

use anyhow::{bail, Context};
use ekm_api::audit::{entry_json_text, Format};
use ekm_api::audit_export::{verify_export_from, ExportHeader, ExportWriter};
use ekm_projections::{
    audit_pages, error_chain, rebuild, status, verify_chain, AuditFilter, RecordedHead,
};
use ekm_store::{Db, DbConfig};

use crate::cli::{
    AuditCommand, DbArgs, ExportArgs, JobArgs, PlatformKeyCommand, ProjectionsCommand, RebuildArgs,
    RotateArgs, SigningKeyArgs, VerifyArgs,
};
use crate::serve::{audit_key, audit_signing_key, open, prepare_data_dir};

fn db_error(error: impl std::error::Error) -> anyhow::Error {
    anyhow::anyhow!(error_chain(&error))
}

/// Opens the database for reading only: no migration, no lock, so it works beside a running
/// server. Refuses a data directory that holds no database.
async fn open_for_reading(args: &DbArgs) -> anyhow::Result<Db> {
    let config = match &args.database_url {
        Some(url) => DbConfig::Postgres { url: url.clone() },
        None => {
            let config = DbConfig::sqlite_in(&args.data_dir);
            if let DbConfig::Sqlite { path } = &config {
                if !path.exists() {
                    bail!(
                        "no EKM database in {} (is --data-dir right?)",
                        args.data_dir.display()
                    );
                }
            }
            config
        }
    };
    Db::connect(&config).await.map_err(db_error)
}

pub async fn projections(command: ProjectionsCommand) -> anyhow::Result<ExitCode> {
    match command {
        ProjectionsCommand::Rebuild(args) => rebuild_job(args).await,
        ProjectionsCommand::Status(args) => status_job(args).await,
    }
}

async fn rebuild_job(rebuild_args: RebuildArgs) -> anyhow::Result<ExitCode> {
    let args = &rebuild_args.job;
    let metrics = match rebuild_args.metrics_listen {
        Some(address) => Some(serve_job_metrics(address).await?),
        None => None,
    };
    // SQLite: the data-directory lock makes sure no server writes meanwhile.
    let (config, _lock) = prepare_data_dir(&args.db)?;
    let db = open(&config).await?;
    // A bar on a terminal; elsewhere a line every 10% (a log keeps them).
    let interactive = crate::progress::interactive();
    let bar = crate::progress::bar(0, "rebuilding read models");
    let mut last_percent = -1i64;
    let mut progress = |applied: i64, head: i64| {
        ekm_service::metrics::rebuild_progress(applied, head);
        bar.set_length(u64::try_from(head).unwrap_or(0));
        bar.set_position(u64::try_from(applied).unwrap_or(0));
        let percent = if head > 0 { applied * 100 / head } else { 100 };
        if !interactive && percent / 10 != last_percent / 10 {
            eprintln!("rebuilding read models: position {applied} of {head} ({percent}%)");
        }
        last_percent = percent;
    };
    let report = rebuild(&db, &mut progress).await.map_err(db_error);
    bar.finish_and_clear();
    ekm_service::metrics::rebuild_stopped();
    let report = match report {
        Ok(report) => report,
        Err(error) => {
            linger(metrics, rebuild_args.metrics_linger).await;
            return Err(error);
        }
    };
    let mut out = std::io::stdout().lock();
    if args.json {
        writeln!(out, "{}", serde_json::to_string(&report)?)?;
    } else {
        writeln!(
            out,
            "rebuilt {} from {} events up to position {} in {:.2}s",
            report.projections.join(", "),
            report.events,
            report.position,
            report.seconds
        )?;
    }
    out.flush()?;
    db.close().await;
    linger(metrics, rebuild_args.metrics_linger).await;
    Ok(ExitCode::SUCCESS)
}

/// Serves this process's metrics on `address` (a job's `--metrics-listen`), until the
/// process ends.
async fn serve_job_metrics(address: std::net::SocketAddr) -> anyhow::Result<()> {
    ekm_service::metrics::install();
    let listener = tokio::net::TcpListener::bind(address)
        .await
        .with_context(|| format!("cannot listen on {address} (--metrics-listen)"))?;
    if !address.ip().is_loopback() {
        tracing::warn!(%address, "metrics are served without a token over plain HTTP: keep the address private");
    }
    tracing::info!(%address, "serving the job's metrics");
    tokio::spawn(async move {
        let _ = axum::serve(listener, ekm_api::metrics_router()).await;
    });
    Ok(())
}

/// With `--metrics-listen`, keeps the metrics up `for_how_long` after the job's end.
async fn linger(metrics: Option<()>, for_how_long: Option<std::time::Duration>) {
    if let (Some(()), Some(for_how_long)) = (metrics, for_how_long) {
        tracing::info!(
            seconds = for_how_long.as_secs(),
            "job done; metrics served a while longer (--metrics-linger)"
        );
        tokio::time::sleep(for_how_long).await;
    }
}

async fn status_job(args: JobArgs) -> anyhow::Result<ExitCode> {
    let db = open_for_reading(&args.db).await?;
    let statuses = status(&db).await.map_err(db_error)?;
    let mut out = std::io::stdout().lock();
    if args.json {
        writeln!(out, "{}", serde_json::to_string(&statuses)?)?;
    } else {
        writeln!(
            out,
            "{:<14} {:>10} {:>10} {:>8}  rebuildable",
            "projection", "position", "head", "lag"
        )?;
        for s in &statuses {
            writeln!(
                out,
                "{:<14} {:>10} {:>10} {:>8}  {}",
                s.name,
                s.position,
                s.head,
                s.lag,
                if s.rebuildable { "yes" } else { "no (seals)" }
            )?;
        }
    }
    db.close().await;
    Ok(ExitCode::SUCCESS)
}

pub async fn audit(command: AuditCommand) -> anyhow::Result<ExitCode> {
    match command {
        AuditCommand::Export(args) => export_job(args).await,
        AuditCommand::Verify(args) => match (&args.file, &args.public_key) {
            (Some(file), Some(key)) => verify_file_job(file, key, args.json),
            _ => verify_job(args).await,
        },
        AuditCommand::Access(args) => crate::client::access(args).await,
        AuditCommand::Query(args) => crate::client::audit_query(args).await,
        AuditCommand::SigningKey(args) if args.rotate => rotate_signing_key_job(args).await,
        AuditCommand::SigningKey(args) => {
            let key = audit_signing_key(
                &args.db.data_dir,
                args.audit_signing_key_file.as_deref(),
                false,
            )?;
            writeln!(std::io::stdout().lock(), "{}", key.public_key_base64())?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

async fn export_job(args: ExportArgs) -> anyhow::Result<ExitCode> {
    let format = Format::parse(&args.format).map_err(anyhow::Error::msg)?;
    let org = ekm_domain::OrgId::parse(&args.org).map_err(|e| anyhow::anyhow!("--org: {e}"))?;
    let signing = match format {
        Format::JsonLines => Some(std::sync::Arc::new(audit_signing_key(
            &args.db.data_dir,
            args.audit_signing_key_file.as_deref(),
            false,
        )?)),
        Format::Csv => None,
    };
    let db = open_for_reading(&args.db).await?;
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    let through = ekm_projections::sealed_through(&db)
        .await
        .map_err(db_error)?;
    let filter = AuditFilter {
        org_id: org.to_string(),
        limit: 1_000,
        through: Some(through),
        ..AuditFilter::default()
    };
    let mut writer = match &signing {
        Some(key) => {
            let header = ExportHeader {
                org_id: org.to_string(),
                exported_at: ekm_store::time::rfc3339(ekm_store::time::from_micros(
                    ekm_store::time::now_micros(),
                )),
                through_position: through,
                filter: [("org".to_owned(), org.to_string())].into(),
            };
            let (writer, first) = ExportWriter::start(key.clone(), &header);
            out.write_all(first.as_bytes())?;
            Some(writer)
        }
        None => {
            out.write_all(format.header().as_bytes())?;
            None
        }
    };
    // Positions up to `through`: the bar shows how far through the log the export is.
    let bar = crate::progress::bar(u64::try_from(through).unwrap_or(0), "exporting");
    let mut pages = audit_pages(db.clone(), filter);
    while let Some(entries) = pages.next().await {
        let entries = entries.map_err(db_error)?;
        if let Some(last) = entries.last() {
            bar.set_position(u64::try_from(last.position).unwrap_or(0));
        }
        for entry in &entries {
            let text = match &mut writer {
                Some(writer) => {
                    writer.entry("event", &entry_json_text(entry), entry.seal.as_deref())
                }
                None => format.render(entry),
            };
            out.write_all(text.as_bytes())
                .context("writing the export")?;
        }
    }
    if let Some(writer) = writer {
        out.write_all(writer.finish().as_bytes())?;
    }
    out.flush()?;
    bar.finish_and_clear();
    db.close().await;
    Ok(ExitCode::SUCCESS)
}

/// `ekm audit signing-key --rotate`: a new key file replaces the old one, and the database
/// retires the old public key and makes the new one current, in one transaction. The new
/// file is written aside first; a rotation interrupted after the commit is finished by the
/// next run.
async fn rotate_signing_key_job(args: SigningKeyArgs) -> anyhow::Result<ExitCode> {
    // SQLite: the data-directory lock refuses while a server runs.
    let (config, _lock) = prepare_data_dir(&args.db)?;
    let db = open(&config).await?;
    let path = args
        .audit_signing_key_file
        .clone()
        .unwrap_or_else(|| args.db.data_dir.join(ekm_keys::AUDIT_SIGNING_KEY_FILE));
    let mut aside = path.clone().into_os_string();
    aside.push(".new");
    let aside = std::path::PathBuf::from(aside);
    let result = rotate_signing_key_files(&db, &args, &path, &aside).await;
    db.close().await;
    let new = result?;
    writeln!(std::io::stdout().lock(), "{}", new.public_key_base64())?;
    tracing::info!(key_id = %new.key_id(), path = %path.display(), "audit signing key rotated; copy the file to every instance, then start them");
    Ok(ExitCode::SUCCESS)
}

async fn rotate_signing_key_files(
    db: &Db,
    args: &SigningKeyArgs,
    path: &Path,
    aside: &Path,
) -> anyhow::Result<ekm_keys::SigningKey> {
    let key_error =
        |e: ekm_keys::SigningKeyError| anyhow::anyhow!(ekm_projections::error_chain(&e));
    let current = ekm_projections::signing_keys(db)
        .await
        .map_err(db_error)?
        .into_iter()
        .find(|r| r.retired_at.is_none());
    if let Some(pending) = ekm_keys::SigningKey::load(aside, false).map_err(key_error)? {
        if current
            .as_ref()
            .is_some_and(|c| c.key_id == pending.key_id())
        {
            // The database already moved to it: finish the interrupted rotation.
            std::fs::rename(aside, path)
                .with_context(|| format!("cannot replace {}", path.display()))?;
            return Ok(pending);
        }
        std::fs::remove_file(aside)
            .with_context(|| format!("cannot remove {}", aside.display()))?;
    }
    let old = audit_signing_key(
        &args.db.data_dir,
        args.audit_signing_key_file.as_deref(),
        false,
    )?;
    let new = ekm_keys::SigningKey::load(aside, true)
        .map_err(key_error)?
        .context("the new signing key file")?;
    if let Err(error) = ekm_projections::rotate_signing_key(db, &old, &new).await {
        let _ = std::fs::remove_file(aside);
        return Err(db_error(error));
    }
    std::fs::rename(aside, path).with_context(|| format!("cannot replace {}", path.display()))?;
    Ok(new)
}

/// `ekm audit verify --file F --public-key K`: the export against the public key alone.
fn verify_file_job(file: &Path, key: &Path, json: bool) -> anyhow::Result<ExitCode> {
    let key_text = std::fs::read_to_string(key)
        .with_context(|| format!("cannot read the public key file {}", key.display()))?;
    let public_key = ekm_keys::parse_public_key(&key_text)
        .map_err(|e| anyhow::anyhow!("{}: {e}", key.display()))?;
    let opened = std::fs::File::open(file)
        .with_context(|| format!("cannot read the export {}", file.display()))?;
    // Line by line, in constant memory, however long the export.
    let result = verify_export_from(&mut std::io::BufReader::new(opened), &public_key)
        .with_context(|| format!("cannot read the export {}", file.display()))?;
    let mut out = std::io::stdout().lock();
    match &result {
        Ok(verified) if json => writeln!(
            out,
            "{}",
            serde_json::json!({"ok": true, "export": verified})
        )?,
        Err(failure) if json => writeln!(
            out,
            "{}",
            serde_json::json!({"ok": false, "first_failure": failure})
        )?,
        Ok(verified) => {
            writeln!(
                out,
                "ok        {}  {} entries, {} lines, {} signed checkpoints, through position {}, exported at {}, key {}",
                verified.org_id,
                verified.entries,
                verified.lines,
                verified.checkpoints,
                verified.through_position,
                verified.exported_at,
                verified.key_id
            )?;
            if verified.partial() {
                let filter: Vec<String> = verified
                    .filter
                    .iter()
                    .filter(|(k, _)| k.as_str() != "org")
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect();
                writeln!(
                    out,
                    "          a partial export: only the entries matching {}",
                    filter.join(" ")
                )?;
            }
        }
        Err(failure) => writeln!(
            out,
            "TAMPERED  {}  line {}: {} ({})",
            file.display(),
            failure.line,
            failure.problem,
            failure.detail
        )?,
    }
    Ok(if result.is_ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// The head file: each organization's last verified head, kept by the auditor outside the
/// database (ADR 0018).
#[derive(Default, serde::Serialize, serde::Deserialize)]
struct HeadFile {
    orgs: BTreeMap<String, RecordedHead>,
    /// Each organization's access-log streams, at their last verified record (ADR 0026).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    access: BTreeMap<String, BTreeMap<String, ekm_store::access_log::StreamHead>>,
}

fn read_head_file(path: &Path) -> anyhow::Result<HeadFile> {
    match std::fs::read_to_string(path) {
        Ok(text) => serde_json::from_str(&text)
            .with_context(|| format!("{} is not an EKM head file", path.display())),
        // The first verification starts the file.
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(HeadFile::default()),
        Err(error) => Err(error).with_context(|| format!("cannot read {}", path.display())),
    }
}

/// Replaces the file whole (write aside, then rename), so a crash never leaves half of it.
fn write_head_file(path: &Path, heads: &HeadFile) -> anyhow::Result<()> {
    let aside = path.with_extension("tmp");
    let mut text = serde_json::to_string_pretty(heads)?;
    text.push('\n');
    std::fs::write(&aside, text).with_context(|| format!("cannot write {}", aside.display()))?;
    std::fs::rename(&aside, path).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

async fn verify_job(args: VerifyArgs) -> anyhow::Result<ExitCode> {
    let key = audit_key(&args.db, args.audit_key_file.as_deref(), false)?;
    let mut heads = match &args.head_file {
        Some(path) => read_head_file(path)?,
        None => HeadFile::default(),
    };
    let db = open_for_reading(&args.db).await?;
    // The wrong key would report every entry as altered: say what is wrong instead.
    ekm_projections::check_seal_key(&db, &key)
        .await
        .map_err(db_error)?;
    let orgs: BTreeSet<String> = match &args.org {
        Some(org) => [ekm_domain::OrgId::parse(org)
            .map_err(|e| anyhow::anyhow!("--org: {e}"))?
            .to_string()]
        .into(),
        // Every organization with seals, with events, or with a recorded head: one whose
        // history was emptied still has its recorded head.
        None => {
            let mut orgs: BTreeSet<String> = db
                .chained_orgs()
                .await
                .map_err(db_error)?
                .into_iter()
                .collect();
            orgs.extend(db.event_orgs().await.map_err(db_error)?);
            orgs.extend(heads.orgs.keys().cloned());
            orgs
        }
    };
    // The access log (ADR 0026), read only; on SQLite if its file exists (verify changes
    // nothing in what it examines).
    let events_path = match &args.db.database_url {
        Some(_) => None,
        None => match ekm_store::DbConfig::sqlite_in(&args.db.data_dir) {
            ekm_store::DbConfig::Sqlite { path } => Some(path),
            ekm_store::DbConfig::Postgres { .. } => None,
        },
    };
    let access = match &events_path {
        Some(path) if !ekm_store::access_log::sqlite_path(path).exists() => None,
        path => Some(
            ekm_store::AccessLog::open_read_only(&db, path.as_deref())
                .await
                .map_err(db_error)?,
        ),
    };
    let sealer = ekm_service::AccessSeals(key.clone());
    let mut failed = false;
    let mut reports = vec![];
    let mut access_reports = vec![];
    for org in orgs {
        let report = verify_chain(&db, &key, &org, heads.orgs.get(&org))
            .await
            .map_err(db_error)?;
        failed |= !report.ok;
        let access_report = match &access {
            Some(log) => {
                let pinned = heads.access.get(&org).cloned().unwrap_or_default();
                let report = log
                    .verify(&org, &sealer, &pinned, args.access_log_retention)
                    .await
                    .map_err(db_error)?;
                // An organization that fails keeps its pins: the evidence stays.
                if report.ok() {
                    heads.access.insert(org.clone(), report.heads.clone());
                }
                Some(report)
            }
            // No access log at all, where the head file pinned streams: cut whole.
            None => heads.access.get(&org).and_then(|pins| {
                pins.iter()
                    .next()
                    .map(|(stream, pin)| ekm_store::access_log::AccessReport {
                        first_failure: Some(ekm_store::access_log::AccessFailure {
                            id: 0,
                            stream: stream.clone(),
                            seq: pin.seq,
                            problem: "truncated",
                        }),
                        ..Default::default()
                    })
            }),
        };
        failed |= access_report.as_ref().is_some_and(|r| !r.ok());
        access_reports.push(access_report);
        if let (true, Some(position), Some(seal)) =
            (report.ok, report.head_position, report.head_hash.clone())
        {
            heads.orgs.insert(org, RecordedHead { position, seal });
        }
        reports.push(report);
    }
    let mut out = std::io::stdout().lock();
    if args.json {
        let mut values = vec![];
        for (report, access) in reports.iter().zip(&access_reports) {
            let mut value = serde_json::to_value(report)?;
            if let Some(access) = access {
                value["ok"] = serde_json::json!(report.ok && access.ok());
                value["access_log"] = ekm_api::audit::access_report_json(access);
            }
            values.push(value);
        }
        writeln!(out, "{}", serde_json::to_string(&values)?)?;
    } else {
        for (report, access) in reports.iter().zip(&access_reports) {
            match access.as_ref().and_then(|a| a.first_failure.as_ref()) {
                Some(failure) => writeln!(
                    out,
                    "TAMPERED  {}  access log record {}: {} (stream {}, place {})",
                    report.org_id, failure.id, failure.problem, failure.stream, failure.seq
                )?,
                None => {
                    if let Some(access) = access {
                        writeln!(
                            out,
                            "ok        {}  access log: {} records in {} streams",
                            report.org_id, access.records, access.streams
                        )?;
                    }
                }
            }
            match &report.first_failure {
                None if !report.ok => {}
                None => writeln!(
                    out,
                    "ok        {}  {} entries, head {} at position {}",
                    report.org_id,
                    report.entries,
                    report.head_hash.as_deref().unwrap_or("-"),
                    report.head_position.unwrap_or(0)
                )?,
                Some(failure) => writeln!(
                    out,
                    "TAMPERED  {}  first bad entry at position {}: {} ({}; scope {}, {})",
                    report.org_id,
                    failure.position,
                    failure.problem,
                    failure.detail,
                    failure.scope_id.as_deref().unwrap_or("-"),
                    failure.event_type.as_deref().unwrap_or("-")
                )?,
            }
            for mismatch in &report.access_mismatches {
                writeln!(
                    out,
                    "TAMPERED  {}  {} row {}: {} ({})",
                    report.org_id, mismatch.table, mismatch.id, mismatch.problem, mismatch.detail
                )?;
            }
        }
    }
    db.close().await;
    // Organizations that failed keep the head recorded before: the evidence stays.
    if let Some(path) = &args.head_file {
        write_head_file(path, &heads)?;
    }
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

pub async fn master_key(command: PlatformKeyCommand) -> anyhow::Result<ExitCode> {
    match command {
        PlatformKeyCommand::Rotate(args) => rotate_job(args).await,
    }
}

async fn rotate_job(args: RotateArgs) -> anyhow::Result<ExitCode> {
    // SQLite: the data-directory lock refuses while a server runs.
    let (config, _lock) = prepare_data_dir(&args.db)?;
    let db = open(&config).await?;
    let path = args
        .master_key_file
        .clone()
        .unwrap_or_else(|| args.db.data_dir.join(ekm_keys::MASTER_KEY_FILE));
    let current = args.platform_key.kms_key()?;
    let target = match args.to.as_deref() {
        None => current.clone(),
        Some("file") => None,
        Some(spec) => Some(args.platform_key.parse(spec)?),
    };
    let settings = ekm_kms::KmsSettings {
        allowed_endpoints: args
            .platform_key
            .master_key_endpoint
            .iter()
            .cloned()
            .collect(),
        ..ekm_kms::KmsSettings::default()
    };
    let rewrapped = crate::progress::counter("keys re-wrapped under the new master key");
    let rotation = ekm_service::keys::rotate_platform_master_key_with_progress(
        &db,
        &path,
        current.as_ref(),
        target.as_ref(),
        &settings,
        &|| rewrapped.inc(1),
    )
    .await
    .map_err(db_error);
    rewrapped.finish_and_clear();
    db.close().await;
    let rotation = rotation?;
    let mut out = std::io::stdout().lock();
    if args.json {
        writeln!(
            out,
            "{}",
            serde_json::json!({
                "old_fingerprint": rotation.old,
                "new_fingerprint": rotation.new,
                "rewrapped": rotation.rewrapped,
                "path": path.display().to_string(),
            })
        )?;
    } else {
        writeln!(
            out,
            "master key rotated: {} -> {} ({} organization key(s) re-wrapped); the old key is destroyed",
            rotation.old, rotation.new, rotation.rewrapped
        )?;
    }
    Ok(ExitCode::SUCCESS)
}
