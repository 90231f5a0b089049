//! `ekm doctor`: checks a deployment and says what to fix (issue 19 §5). Read only: it
//! opens the database without migrating or registering anything, reads the key files
//! without creating them, and only connects to KMS endpoints (no key is used).

use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use serde::Serialize;

use crate::cli::DoctorArgs;

/// How far this machine's clock may be from the database's (or behind the newest event).
const MAX_SKEW: Duration = Duration::from_secs(5);
/// How long a KMS endpoint has to accept a connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a projection behind the head is watched for progress.
const PROGRESS_WINDOW: Duration = Duration::from_secs(2);

#[derive(Serialize)]
struct Check {
    check: &'static str,
    /// `ok`, `warn` (works, but look) or `fail` (fix this).
    status: &'static str,
    detail: String,
    /// What to do, when something is wrong.
    #[serde(skip_serializing_if = "Option::is_none")]
    fix: Option<String>,
}

fn ok(check: &'static str, detail: impl Into<String>) -> Check {
    Check {
        check,
        status: "ok",
        detail: detail.into(),
        fix: None,
    }
}

fn bad(
    check: &'static str,
    status: &'static str,
    detail: impl Into<String>,
    fix: impl Into<String>,
) -> Check {
    Check {
        check,
        status,
        detail: detail.into(),
        fix: Some(fix.into()),
    }
}

pub async fn doctor(args: DoctorArgs) -> anyhow::Result<ExitCode> {
    let mut checks = vec![];
    let db = database(&args, &mut checks).await;
    if let Some(db) = &db {
        checks.push(master_key(&args, db).await);
        checks.push(audit_key(&args, db).await);
        checks.push(clock(db).await);
        checks.extend(kms_endpoints(&args, db).await);
        checks.push(projections(db).await);
    }
    let healthy = checks.iter().all(|c| c.status != "fail");
    let mut out = std::io::stdout().lock();
    if args.json {
        writeln!(
            out,
            "{}",
            serde_json::json!({"healthy": healthy, "checks": checks})
        )?;
    } else {
        for c in &checks {
            writeln!(out, "{:<5} {:<13} {}", c.status, c.check, c.detail)?;
            if let Some(fix) = &c.fix {
                writeln!(out, "      {:<13} fix: {fix}", "")?;
            }
        }
        writeln!(out, "{}", if healthy { "healthy" } else { "not healthy" })?;
    }
    if let Some(db) = db {
        db.close().await;
    }
    Ok(if healthy {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

async fn database(args: &DoctorArgs, checks: &mut Vec<Check>) -> Option<ekm_store::Db> {
    let config = match &args.db.database_url {
        Some(url) => ekm_store::DbConfig::Postgres { url: url.clone() },
        None => {
            let config = ekm_store::DbConfig::sqlite_in(&args.db.data_dir);
            if let ekm_store::DbConfig::Sqlite { path } = &config {
                if !path.exists() {
                    checks.push(bad(
                        "database",
                        "fail",
                        format!("no EKM database at {}", path.display()),
                        "give --data-dir (or --database-url), or start `ekm serve` once to create it",
                    ));
                    return None;
                }
            }
            config
        }
    };
    let db = match tokio::time::timeout(Duration::from_secs(15), ekm_store::Db::connect(&config))
        .await
    {
        Ok(Ok(db)) => db,
        Ok(Err(error)) => {
            checks.push(bad(
                "database",
                "fail",
                format!("cannot connect: {}", ekm_projections::error_chain(&error)),
                "check the URL, the network and the credentials",
            ));
            return None;
        }
        Err(_) => {
            checks.push(bad(
                "database",
                "fail",
                "no answer within 15 s",
                "check that the database runs and is reachable from here",
            ));
            return None;
        }
    };
    match db.pending_migrations().await {
        Ok(pending) if pending.is_empty() => {
            checks.push(ok("database", format!("{}, migrated", db.backend_name())));
            Some(db)
        }
        Ok(pending) => {
            checks.push(bad(
                "database",
                "fail",
                format!("{} migration(s) pending: {pending:?}", pending.len()),
                "run `ekm migrate` (on PostgreSQL as the owner role, then re-run part 2 of docs/ops/postgres-roles.sql)",
            ));
            Some(db)
        }
        Err(error) => {
            checks.push(bad(
                "database",
                "fail",
                format!("migrations: {}", ekm_projections::error_chain(&error)),
                "this binary and the database disagree on migrations: use the release that migrated it",
            ));
            Some(db)
        }
    }
}

async fn master_key(args: &DoctorArgs, db: &ekm_store::Db) -> Check {
    const NAME: &str = "master key";
    let known = match db.master_keys("local").await {
        Ok(known) => known,
        Err(error) => {
            return bad(
                NAME,
                "fail",
                ekm_projections::error_chain(&error),
                "the database must be migrated first",
            )
        }
    };
    if let Some(first) = known.first() {
        if let Ok(Some(row)) = db.platform_key(first).await {
            return ok(
                NAME,
                format!(
                    "held by {} (the KMS key serve's --master-key names)",
                    row.wrapped_by
                ),
            );
        }
    }
    let path = args
        .master_key_file
        .clone()
        .unwrap_or_else(|| args.db.data_dir.join(ekm_keys::MASTER_KEY_FILE));
    match ekm_keys::LocalMasterKey::load(&path, false) {
        Ok(Some(key)) if known.iter().any(|k| *k == key.fingerprint()) => {
            ok(NAME, format!("{} matches the database ({})", path.display(), key.fingerprint()))
        }
        Ok(Some(key)) if known.is_empty() => bad(
            NAME,
            "warn",
            format!("{} ({}) is not registered yet", path.display(), key.fingerprint()),
            "the first `ekm serve` registers it",
        ),
        Ok(Some(key)) => bad(
            NAME,
            "fail",
            format!(
                "{} holds {}, the database knows {}",
                path.display(),
                key.fingerprint(),
                known.join(", ")
            ),
            "copy the master.key every instance shares (restore it from your backup); never start with a new one",
        ),
        Ok(None) if known.is_empty() => bad(
            NAME,
            "warn",
            format!("no {} yet", path.display()),
            "the first `ekm serve` creates it: back it up",
        ),
        Ok(None) => bad(
            NAME,
            "fail",
            format!("{} is missing; the database knows {}", path.display(), known.join(", ")),
            "restore master.key from your backup (without it no key can be unwrapped)",
        ),
        Err(error) => bad(
            NAME,
            "fail",
            format!("{}: {error}", path.display()),
            "the file must be the server's own: mode 0600, not a link",
        ),
    }
}

async fn audit_key(args: &DoctorArgs, db: &ekm_store::Db) -> Check {
    const NAME: &str = "audit key";
    let path = args
        .audit_key_file
        .clone()
        .unwrap_or_else(|| args.db.data_dir.join(ekm_keys::AUDIT_KEY_FILE));
    match ekm_keys::SealKey::load(&path, false) {
        Ok(Some(key)) => match ekm_projections::check_seal_key(db, &key).await {
            Ok(()) => ok(NAME, format!("{} ({})", path.display(), key.fingerprint())),
            Err(error) => bad(
                NAME,
                "fail",
                ekm_projections::error_chain(&error),
                "use the audit.key the database was sealed with (every instance shares one)",
            ),
        },
        Ok(None) => bad(
            NAME,
            "warn",
            format!("no {}", path.display()),
            "the first `ekm serve` creates it; other instances need a copy (--audit-key-file)",
        ),
        Err(error) => bad(
            NAME,
            "fail",
            format!("{}: {error}", path.display()),
            "the file must be mode 0600 and not a link",
        ),
    }
}

async fn clock(db: &ekm_store::Db) -> Check {
    const NAME: &str = "clock";
    let here = ekm_store::time::from_micros(ekm_store::time::now_micros());
    let (theirs, what) = match db.reference_time().await {
        Ok(Some((at, true))) => (Some(at), "the database server's clock"),
        Ok(Some((at, false))) => (Some(at), "the newest event"),
        Ok(None) => (None, ""),
        Err(error) => {
            return bad(
                NAME,
                "fail",
                ekm_projections::error_chain(&error),
                "the database must be reachable",
            )
        }
    };
    let Some(theirs) = theirs else {
        return ok(NAME, "nothing to compare with yet");
    };
    let skew = (theirs - here).num_milliseconds();
    let limit = i64::try_from(MAX_SKEW.as_millis()).unwrap_or(i64::MAX);
    let behind = match db {
        ekm_store::Db::Postgres(_) => skew.abs() > limit,
        // An event's time is when it was written: only a clock behind it is wrong.
        ekm_store::Db::Sqlite(_) => skew > limit,
    };
    if behind {
        bad(
            NAME,
            "fail",
            format!("{} ms from {what}", -skew),
            "synchronise the clock (NTP): times in events, tokens' expiry and audit queries depend on it",
        )
    } else {
        ok(NAME, format!("within {} s of {what}", MAX_SKEW.as_secs()))
    }
}

async fn kms_endpoints(args: &DoctorArgs, db: &ekm_store::Db) -> Vec<Check> {
    const NAME: &str = "kms endpoint";
    let read = ekm_projections::ReadModels::new(db.clone());
    let orgs = match read.customer_key_orgs().await {
        Ok(orgs) => orgs,
        Err(error) => {
            return vec![bad(
                NAME,
                "fail",
                ekm_projections::error_chain(&error),
                "the read models must be readable: run `ekm projections status`",
            )]
        }
    };
    let patterns: Vec<ekm_kms::EndpointPattern> = args
        .kms_allowed_endpoints
        .iter()
        .filter_map(|p| ekm_kms::EndpointPattern::parse(p).ok())
        .collect();
    let mut checks = vec![];
    for org in orgs {
        let Ok(Some(snapshot)) = read.scope(org).await else {
            continue;
        };
        let Some(key) = snapshot.scope.master_key else {
            continue;
        };
        let target = match &key.endpoint_url {
            Some(url) => match ekm_kms::Endpoint::parse(url) {
                Ok(endpoint) if patterns.iter().any(|p| p.matches(&endpoint)) => {
                    Ok(endpoint.host_port())
                }
                Ok(_) => Err(bad(
                    NAME,
                    "fail",
                    format!("organization {org}: {url} is not allowed"),
                    "add it to --kms-allowed-endpoints (the servers refuse to call it)",
                )),
                Err(error) => Err(bad(
                    NAME,
                    "fail",
                    format!("organization {org}: {url}: {error}"),
                    "the organization's admin connects the key again with a valid endpoint",
                )),
            },
            None => Ok(default_endpoint(&key)),
        };
        let (host, port) = match target {
            Ok(target) => target,
            Err(check) => {
                checks.push(check);
                continue;
            }
        };
        let reached = tokio::time::timeout(
            CONNECT_TIMEOUT,
            tokio::net::TcpStream::connect((host.as_str(), port)),
        )
        .await;
        checks.push(match reached {
            Ok(Ok(_)) => ok(NAME, format!("organization {org}: {host}:{port} reachable")),
            Ok(Err(error)) => bad(
                NAME,
                "fail",
                format!("organization {org}: {host}:{port}: {error}"),
                "open the network path from the servers to the customer's KMS (DNS, firewall, private link)",
            ),
            Err(_) => bad(
                NAME,
                "fail",
                format!("organization {org}: {host}:{port}: no answer within {} s", CONNECT_TIMEOUT.as_secs()),
                "open the network path from the servers to the customer's KMS (DNS, firewall, private link)",
            ),
        });
    }
    if checks.is_empty() {
        checks.push(ok(NAME, "no customer master key is connected"));
    }
    checks
}

/// The public endpoint a key without `endpoint_url` is called at.
fn default_endpoint(key: &ekm_domain::MasterKeyRef) -> (String, u16) {
    let host = match key.provider {
        ekm_domain::Provider::AwsKms => {
            let region = key
                .region
                .clone()
                .or_else(|| key.key_id.split(':').nth(3).map(ToOwned::to_owned))
                .unwrap_or_else(|| "us-east-1".into());
            format!("kms.{region}.amazonaws.com")
        }
        ekm_domain::Provider::GcpKms => "cloudkms.googleapis.com".into(),
        ekm_domain::Provider::AzureKeyVault => key
            .key_id
            .trim_start_matches("https://")
            .split('/')
            .next()
            .unwrap_or_default()
            .to_owned(),
        ekm_domain::Provider::Local => "localhost".into(),
    };
    (host, 443)
}

async fn projections(db: &ekm_store::Db) -> Check {
    const NAME: &str = "projections";
    let first = match ekm_projections::status(db).await {
        Ok(statuses) => statuses,
        Err(error) => {
            return bad(
                NAME,
                "fail",
                ekm_projections::error_chain(&error),
                "the database must be migrated and readable",
            )
        }
    };
    if first.iter().all(|s| s.lag == 0) {
        return ok(
            NAME,
            format!("{} read models at the head of the log", first.len()),
        );
    }
    // Behind is normal while commands arrive: stuck is not.
    tokio::time::sleep(PROGRESS_WINDOW).await;
    let second = ekm_projections::status(db).await.unwrap_or_default();
    let stuck: Vec<String> = second
        .iter()
        .filter(|s| {
            s.lag > 0
                && first
                    .iter()
                    .any(|f| f.name == s.name && f.position == s.position)
        })
        .map(|s| format!("{} at {} (head {})", s.name, s.position, s.head))
        .collect();
    if stuck.is_empty() {
        ok(NAME, "behind the log, and catching up")
    } else {
        bad(
            NAME,
            "fail",
            format!(
                "no progress in {} s: {}",
                PROGRESS_WINDOW.as_secs(),
                stuck.join(", ")
            ),
            "is an `ekm serve` running? If one is, its log names the event it is stuck on; \
             the data plane fails closed meanwhile (--max-projection-lag)",
        )
    }
}
