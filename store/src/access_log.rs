//! The data plane's access log (issue 16 §1, ADR 0026): one record per encrypt, decrypt,
//! datakey and rewrap, allowed or refused.
//!
//! A writer task per instance takes the records queued by concurrent requests and commits
//! them together (group commit: one multi-row `INSERT`, one WAL flush or fsync for all).
//! In `durable` mode a request waits for the commit that holds its record before it is
//! answered; in `async` mode it does not, and the records reach the database within the
//! writer's next commit (the loss window on a crash is what is queued then).
//!
//! Where the records live:
//! - PostgreSQL: `access_log`, partitioned by month on `at` (migration 0016). Retention
//!   drops whole partitions through `access_log_maintain`, which also creates the next
//!   months' partitions; it runs as the schema's owner and refuses to keep fewer than
//!   `MIN_RETENTION_DAYS`, so the server's role cannot empty the log through it.
//! - SQLite: `access.db` beside `ekm.db`, with its own writer connection, so that a busy
//!   data plane never waits for, or holds, the command writer. Retention deletes rows.
//!
//! Records carry no key material: identifiers, the operation, the class, the key version
//! and the outcome.

use std::path::{Path, PathBuf};
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::postgres::PgPool;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::Row;
use tokio::sync::{mpsc, oneshot};

use crate::db::Db;
use crate::error::StoreError;
use crate::time::{from_micros, to_micros};

/// The fewest days `access_log_maintain` keeps (migration 0016), and so the smallest
/// `--access-log-retention`.
pub const MIN_RETENTION_DAYS: u32 = 30;

/// The most records one commit of the writer holds (16 parameters each on PostgreSQL).
const BATCH: usize = 1000;
/// How many records may wait for the writer before requests wait to queue theirs.
const QUEUE: usize = 65_536;

/// Whether a request waits for its record to be durable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AccessLogMode {
    /// The record is committed before the answer (the default).
    Durable,
    /// The record is queued; the writer commits it within its next batch.
    Async,
    /// Nothing is recorded (benchmarks only: the baseline of the log's cost).
    Off,
}

impl std::str::FromStr for AccessLogMode {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "durable" => Ok(Self::Durable),
            "async" => Ok(Self::Async),
            "off" => Ok(Self::Off),
            other => Err(format!(
                "access log mode {other:?}: expected durable or async"
            )),
        }
    }
}

/// One use of the data plane, as recorded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AccessRecord {
    pub at: DateTime<Utc>,
    pub org_id: String,
    pub scope_id: String,
    /// The scope's path of ids joined by `/` (organization first), or empty when the scope
    /// was not visible to the caller (it does not exist, or it is another organization's).
    pub scope_path: String,
    pub principal: String,
    pub token_id: String,
    /// `encrypt`, `decrypt`, `datakey` or `rewrap`.
    pub operation: String,
    pub class: Option<String>,
    pub key_version: Option<i64>,
    /// `ok`, or the refusal's code.
    pub outcome: String,
    pub request_id: String,
    pub source_address: Option<String>,
    pub justification: Option<String>,
}

/// A record as stored: its id orders the log and is the cursor; `stream`, `seq` and `seal`
/// place it in its writer's chain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AccessEntry {
    pub id: i64,
    pub record: AccessRecord,
    pub stream: String,
    pub seq: i64,
    pub seal: String,
}

/// Seals access records with the audit key (ADR 0018), and checks seals: the service
/// implements it over `ekm_keys::SealKey`, so that this crate holds no key.
pub trait AccessSealer: Send + Sync + 'static {
    fn seal(&self, org_id: &str, prev: &str, entry: &[u8]) -> String;
    fn verify(&self, org_id: &str, prev: &str, entry: &[u8], seal: &str) -> bool;
}

/// The bytes a record's seal covers: a label, its place in its stream, and every field,
/// each length-prefixed (an absent value is distinct from an empty one).
pub fn canonical(stream: &str, seq: i64, r: &AccessRecord) -> Vec<u8> {
    let mut out = Vec::with_capacity(256);
    let mut part = |bytes: &[u8]| {
        out.extend_from_slice(&(bytes.len() as u64).to_be_bytes());
        out.extend_from_slice(bytes);
    };
    part(b"ekm-access-record-v1");
    part(stream.as_bytes());
    part(seq.to_string().as_bytes());
    part(to_micros(r.at).to_string().as_bytes());
    for text in [
        &r.org_id,
        &r.scope_id,
        &r.scope_path,
        &r.principal,
        &r.token_id,
        &r.operation,
        &r.outcome,
        &r.request_id,
    ] {
        part(text.as_bytes());
    }
    let version = r.key_version.map(|v| v.to_string());
    for optional in [&r.class, &version, &r.source_address, &r.justification] {
        match optional {
            None => part(b"-"),
            Some(text) => {
                part(b"+");
                part(text.as_bytes());
            }
        }
    }
    out
}

/// What a verification of an organization's access log found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AccessReport {
    pub records: i64,
    pub streams: i64,
    pub first_failure: Option<AccessFailure>,
    /// Each stream's last record as verified: what an auditor pins outside the database
    /// (`ekm audit verify --head-file`), so that a later cut is found.
    pub heads: std::collections::BTreeMap<String, StreamHead>,
}

/// A stream's last verified place and seal.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StreamHead {
    pub seq: i64,
    pub seal: String,
}

/// The month (`YYYY-MM`) a stream's records were made in: the end of its name.
fn stream_month(stream: &str) -> &str {
    stream.rsplit('.').next().unwrap_or("")
}

impl AccessReport {
    pub fn ok(&self) -> bool {
        self.first_failure.is_none()
    }
}

/// The first record that does not verify: `altered` (its seal does not match its content
/// and the seal before it), `missing` (records before it in its stream are gone),
/// `reordered` (its place in the stream was taken twice, or moved back); or, against heads
/// pinned by an earlier verification, `truncated` (the stream ends before its pinned place,
/// or is gone while later months remain; `id` 0) and `resealed` (the record at the pinned
/// place has another seal).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AccessFailure {
    pub id: i64,
    pub stream: String,
    pub seq: i64,
    pub problem: &'static str,
}

/// What a query asks for. `subtree` is a scope path: the scope and everything below it.
#[derive(Clone, Debug, Default)]
pub struct AccessFilter {
    pub org_id: String,
    pub subtree: Option<String>,
    pub principal: Option<String>,
    pub operation: Option<String>,
    pub outcome: Option<String>,
    pub from: Option<DateTime<Utc>>,
    pub to: Option<DateTime<Utc>>,
    /// Only records after this id (the cursor).
    pub after: Option<i64>,
    pub limit: i64,
}

/// One line of an access summary.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AccessCount {
    pub principal: String,
    pub operation: String,
    pub outcome: String,
    pub key_version: Option<i64>,
    pub count: i64,
}

/// How one key version of a scope was used, from its served requests.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VersionUsage {
    pub key_version: i64,
    /// The last served request that sealed with or opened this version (within the access
    /// log's retention).
    pub last_used_at: Option<DateTime<Utc>>,
    /// Served decrypts and rewraps that opened it since the given instant.
    pub decrypts_since: i64,
    /// Decrypts and rewraps of real ciphertexts of it refused below the decryption floor
    /// since the given instant: what still needs the version while it is disabled.
    pub refused_since: i64,
    /// The last such refusal.
    pub last_refused_at: Option<DateTime<Utc>>,
}

#[derive(Clone, Debug)]
enum Backend {
    Sqlite { write: SqlitePool, read: SqlitePool },
    Postgres { write: PgPool, read: PgPool },
}

struct Queued {
    record: AccessRecord,
    done: Option<oneshot::Sender<Result<(), String>>>,
}

macro_rules! count_from_row {
    ($row:expr) => {{
        let r = $row;
        Ok(AccessCount {
            principal: r.try_get("principal")?,
            operation: r.try_get("operation")?,
            outcome: r.try_get("outcome")?,
            key_version: r.try_get("key_version")?,
            count: r.try_get("count")?,
        })
    }};
}

/// The access log of this instance: its writer and its queries.
#[derive(Clone, Debug)]
pub struct AccessLog {
    backend: Backend,
    mode: AccessLogMode,
    queue: mpsc::Sender<Queued>,
    /// Records settled so far by this instance's writer: committed, or (durable) answered
    /// with the error that refused their request. Tests wait on it in async mode.
    written: tokio::sync::watch::Receiver<u64>,
    /// Records handed to the writer so far.
    queued: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

/// `access.db` beside `ekm.db`.
pub fn sqlite_path(events_db: &Path) -> PathBuf {
    events_db.with_file_name("access.db")
}

/// `access.db` beside the events' SQLite file, which the caller must name.
fn access_file(events_path: Option<&Path>) -> Result<PathBuf, StoreError> {
    events_path.map(sqlite_path).ok_or_else(|| {
        StoreError::Database(sqlx::Error::Configuration(
            "the access log needs the SQLite file's path".into(),
        ))
    })
}

const SQLITE_SCHEMA: &[&str] = &[
    "CREATE TABLE IF NOT EXISTS access_log (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        at INTEGER NOT NULL,
        org_id TEXT NOT NULL,
        scope_id TEXT NOT NULL,
        scope_path TEXT NOT NULL,
        principal TEXT NOT NULL,
        token_id TEXT NOT NULL,
        operation TEXT NOT NULL,
        class TEXT,
        key_version INTEGER,
        outcome TEXT NOT NULL,
        request_id TEXT NOT NULL,
        source_address TEXT,
        justification TEXT,
        stream TEXT NOT NULL,
        seq INTEGER NOT NULL,
        seal TEXT NOT NULL
    )",
    "CREATE INDEX IF NOT EXISTS access_log_org ON access_log (org_id, id)",
    "CREATE INDEX IF NOT EXISTS access_log_path ON access_log (org_id, scope_path, id)",
    "CREATE INDEX IF NOT EXISTS access_log_time ON access_log (org_id, at)",
    "CREATE TRIGGER IF NOT EXISTS access_log_no_update BEFORE UPDATE ON access_log
     BEGIN SELECT RAISE(ABORT, 'ekm: the access log is append-only'); END",
];

const COLUMNS: &str = "(at, org_id, scope_id, scope_path, principal, token_id, operation, \
     class, key_version, outcome, request_id, source_address, justification, stream, seq, seal)";
/// Parameters per record in the writer's `INSERT`.
const PARAMS: usize = 16;
const SELECT: &str = "SELECT id, at, org_id, scope_id, scope_path, principal, token_id, \
     operation, class, key_version, outcome, request_id, source_address, justification, \
     stream, seq, seal FROM access_log WHERE org_id = $1";

impl AccessLog {
    /// Opens the access log of `db` and starts its writer. On SQLite that is `access.db`
    /// beside `events_path` (created if missing); on PostgreSQL the `access_log` table.
    pub async fn open(
        db: &Db,
        events_path: Option<&Path>,
        mode: AccessLogMode,
        sealer: std::sync::Arc<dyn AccessSealer>,
    ) -> Result<Self, StoreError> {
        let backend = match db {
            Db::Postgres(pg) => Backend::Postgres {
                write: pg.statements().clone(),
                read: pg.pool.clone(),
            },
            Db::Sqlite(_) => {
                let path = access_file(events_path)?;
                crate::private_files::prepare_sqlite_files(&path).map_err(|source| {
                    StoreError::DataDir {
                        path: path.display().to_string(),
                        source,
                    }
                })?;
                let options = SqliteConnectOptions::new()
                    .filename(&path)
                    .create_if_missing(true)
                    .journal_mode(SqliteJournalMode::Wal)
                    .synchronous(SqliteSynchronous::Full)
                    .busy_timeout(Duration::from_secs(10));
                let write = crate::db::sqlite_writer_pool()
                    .connect_with(options.clone())
                    .await
                    .map_err(StoreError::Connect)?;
                for statement in SQLITE_SCHEMA {
                    sqlx::query(statement).execute(&write).await?;
                }
                let read = SqlitePoolOptions::new()
                    .max_connections(2)
                    .connect_with(options.read_only(true))
                    .await
                    .map_err(StoreError::Connect)?;
                Backend::Sqlite { write, read }
            }
        };
        let (queue, receiver) = mpsc::channel(QUEUE);
        let (written_tx, written) = tokio::sync::watch::channel(0);
        // One writer, so one stream per organization and month for each run of the instance:
        // two writers on PostgreSQL measured no faster (BENCHMARKS.md), and more streams are
        // more places where a whole stream could go missing unnoticed (ADR 0026).
        let chains = Chains {
            sealer,
            instance: uuid::Uuid::now_v7().simple().to_string(),
            generation: 0,
            heads: Default::default(),
            month: String::new(),
            pruned_before: String::new(),
        };
        tokio::spawn(writer(backend.clone(), chains, receiver, written_tx));
        Ok(Self {
            backend,
            mode,
            queue,
            written,
            queued: Default::default(),
        })
    }

    /// Waits, at most `limit`, until every record handed to the writer is committed (at
    /// shutdown, so that async mode loses nothing on a clean stop).
    pub async fn drain(&self, limit: Duration) {
        let target = self.queued.load(std::sync::atomic::Ordering::SeqCst);
        let mut written = self.written.clone();
        let caught_up = written.wait_for(|done| *done >= target);
        if tokio::time::timeout(limit, caught_up).await.is_err() {
            tracing::error!(
                queued = target,
                written = *self.written.borrow(),
                "access log records still queued at shutdown were not written"
            );
        }
    }

    /// Opens the access log of `db` for reading only (`ekm audit verify`): no writer, no
    /// schema, and on SQLite a read-only connection to `access.db` (it must exist), so that
    /// a copy under examination is left exactly as it was.
    pub async fn open_read_only(db: &Db, events_path: Option<&Path>) -> Result<Self, StoreError> {
        let backend = match db {
            Db::Postgres(pg) => Backend::Postgres {
                write: pg.pool.clone(),
                read: pg.pool.clone(),
            },
            Db::Sqlite(_) => {
                let path = access_file(events_path)?;
                let read = SqlitePoolOptions::new()
                    .max_connections(1)
                    .connect_with(
                        SqliteConnectOptions::new()
                            .filename(&path)
                            .read_only(true)
                            .busy_timeout(Duration::from_secs(10)),
                    )
                    .await
                    .map_err(StoreError::Connect)?;
                Backend::Sqlite {
                    write: read.clone(),
                    read,
                }
            }
        };
        // No writer: a record would be refused.
        let (queue, _) = mpsc::channel(1);
        let (_, written) = tokio::sync::watch::channel(0);
        Ok(Self {
            backend,
            mode: AccessLogMode::Off,
            queue,
            written,
            queued: Default::default(),
        })
    }

    pub fn mode(&self) -> AccessLogMode {
        self.mode
    }

    /// Records one use. In durable mode it returns once the record is committed; an error
    /// means it is not (the request must not be answered as served).
    pub async fn record(&self, record: AccessRecord) -> Result<(), StoreError> {
        let closed = || {
            StoreError::Database(sqlx::Error::Protocol(
                "the access log's writer has stopped".into(),
            ))
        };
        if self.mode == AccessLogMode::Off {
            return Ok(());
        }
        // Counted once it has its place in the queue (a request cancelled while the queue is
        // full never counts), for `drain`.
        let place = self.queue.reserve().await.map_err(|_| closed())?;
        self.queued
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        match self.mode {
            AccessLogMode::Off => Ok(()),
            AccessLogMode::Async => {
                place.send(Queued { record, done: None });
                Ok(())
            }
            AccessLogMode::Durable => {
                let (done, committed) = oneshot::channel();
                place.send(Queued {
                    record,
                    done: Some(done),
                });
                committed
                    .await
                    .map_err(|_| closed())?
                    .map_err(|e| StoreError::Database(sqlx::Error::Protocol(e)))
            }
        }
    }

    /// How many records this instance's writer has committed (changes after each commit).
    pub fn written(&self) -> tokio::sync::watch::Receiver<u64> {
        self.written.clone()
    }

    /// The records that match, oldest first.
    pub async fn query(&self, filter: &AccessFilter) -> Result<Vec<AccessEntry>, StoreError> {
        let (sql, binds) = filter_sql(
            filter,
            SELECT,
            &format!(" ORDER BY id LIMIT {}", filter.limit.max(0)),
        );
        match &self.backend {
            Backend::Postgres { read, .. } => {
                let rows = bind_pg(sqlx::query(&sql), &binds).fetch_all(read).await?;
                rows.iter().map(pg_entry).collect()
            }
            Backend::Sqlite { read, .. } => {
                let rows = bind_sqlite(sqlx::query(&sql), &binds)
                    .fetch_all(read)
                    .await?;
                rows.iter().map(sqlite_entry).collect()
            }
        }
    }

    /// Counts per principal, operation, outcome and key version over the filter (its
    /// subtree and time range; the other fields are ignored).
    pub async fn summary(&self, filter: &AccessFilter) -> Result<Vec<AccessCount>, StoreError> {
        let filter = AccessFilter {
            principal: None,
            operation: None,
            outcome: None,
            after: None,
            ..filter.clone()
        };
        let select = "SELECT principal, operation, outcome, key_version, COUNT(*) AS count \
             FROM access_log WHERE org_id = $1";
        let tail = " GROUP BY principal, operation, outcome, key_version \
             ORDER BY principal, operation, outcome, key_version";
        let (sql, binds) = filter_sql(&filter, select, tail);
        match &self.backend {
            Backend::Postgres { read, .. } => {
                let rows = bind_pg(sqlx::query(&sql), &binds).fetch_all(read).await?;
                rows.iter().map(|r| count_from_row!(r)).collect()
            }
            Backend::Sqlite { read, .. } => {
                let rows = bind_sqlite(sqlx::query(&sql), &binds)
                    .fetch_all(read)
                    .await?;
                rows.iter().map(|r| count_from_row!(r)).collect()
            }
        }
    }

    /// Per key version of the scope at `scope_path` (its own records, not its subtree's):
    /// the last served use and the served decrypts and rewraps since `since`. The
    /// "re-encryption debt" an admin checks before retiring a version (issue 17 §3).
    pub async fn usage(
        &self,
        org_id: &str,
        scope_path: &str,
        since: DateTime<Utc>,
    ) -> Result<Vec<VersionUsage>, StoreError> {
        let sql = "SELECT key_version, \
             MAX(CASE WHEN outcome = 'ok' THEN at END) AS last_used, \
             SUM(CASE WHEN outcome = 'ok' AND at >= $3 AND operation IN ('decrypt', 'rewrap') \
                 THEN 1 ELSE 0 END) AS recent, \
             SUM(CASE WHEN outcome = 'key_version_disabled' AND at >= $3 THEN 1 ELSE 0 END) AS refused, \
             MAX(CASE WHEN outcome = 'key_version_disabled' THEN at END) AS last_refused \
             FROM access_log WHERE org_id = $1 AND scope_path = $2 \
             AND outcome IN ('ok', 'key_version_disabled') \
             AND key_version IS NOT NULL GROUP BY key_version ORDER BY key_version";
        match &self.backend {
            Backend::Postgres { read, .. } => {
                let rows = sqlx::query(sql)
                    .bind(org_id)
                    .bind(scope_path)
                    .bind(since)
                    .fetch_all(read)
                    .await?;
                rows.iter()
                    .map(|r| {
                        Ok(VersionUsage {
                            key_version: r.try_get("key_version")?,
                            last_used_at: r.try_get("last_used")?,
                            decrypts_since: r.try_get("recent")?,
                            refused_since: r.try_get("refused")?,
                            last_refused_at: r.try_get("last_refused")?,
                        })
                    })
                    .collect()
            }
            Backend::Sqlite { read, .. } => {
                let rows = sqlx::query(sql)
                    .bind(org_id)
                    .bind(scope_path)
                    .bind(to_micros(since))
                    .fetch_all(read)
                    .await?;
                rows.iter()
                    .map(|r| {
                        Ok(VersionUsage {
                            key_version: r.try_get("key_version")?,
                            last_used_at: r
                                .try_get::<Option<i64>, _>("last_used")?
                                .map(from_micros),
                            decrypts_since: r.try_get("recent")?,
                            refused_since: r.try_get("refused")?,
                            last_refused_at: r
                                .try_get::<Option<i64>, _>("last_refused")?
                                .map(from_micros),
                        })
                    })
                    .collect()
            }
        }
    }

    /// Checks every record of `org_id` against its seal and the seal before it in its
    /// stream. Not detected here: a stream cut at its end, or removed whole (as the event
    /// log's chain without a recorded head, ADR 0018).
    pub async fn verify(
        &self,
        org_id: &str,
        sealer: &dyn AccessSealer,
        pinned: &std::collections::BTreeMap<String, StreamHead>,
        keep_days: u32,
    ) -> Result<AccessReport, StoreError> {
        // One pass in id order: within a stream, ids grow with places (one writer writes a
        // stream, in order), so each stream's chain is followed without an index of its own.
        let mut report = AccessReport::default();
        let mut filter = AccessFilter {
            org_id: org_id.to_owned(),
            limit: 1_000,
            ..AccessFilter::default()
        };
        let fail = |report: &mut AccessReport, id, stream: String, seq, problem| {
            report.first_failure = Some(AccessFailure {
                id,
                stream,
                seq,
                problem,
            });
        };
        // PostgreSQL: every page from one snapshot. Ids come from a sequence, so between
        // two pages read apart another instance's batch with lower ids could commit, and its
        // stream would seem to jump. (SQLite has one writer: what is visible is in order.)
        let mut snapshot = match &self.backend {
            Backend::Postgres { read, .. } => {
                let mut tx = read.begin().await?;
                sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
                    .execute(&mut *tx)
                    .await?;
                Some(tx)
            }
            Backend::Sqlite { .. } => None,
        };
        loop {
            let entries = match &mut snapshot {
                Some(tx) => {
                    let (sql, binds) = filter_sql(
                        &filter,
                        SELECT,
                        &format!(" ORDER BY id LIMIT {}", filter.limit),
                    );
                    let rows = bind_pg(sqlx::query(&sql), &binds)
                        .fetch_all(&mut **tx)
                        .await?;
                    rows.iter().map(pg_entry).collect::<Result<Vec<_>, _>>()?
                }
                None => self.query(&filter).await?,
            };
            let done = (entries.len() as i64) < filter.limit;
            for entry in entries {
                filter.after = Some(entry.id);
                let (last, prev) = match report.heads.get(&entry.stream) {
                    Some(head) => (head.seq, head.seal.as_str()),
                    None => (0, ""),
                };
                let problem = if entry.seq <= last {
                    Some("reordered")
                } else if entry.seq > last + 1 {
                    Some("missing")
                } else if !sealer.verify(
                    org_id,
                    prev,
                    &canonical(&entry.stream, entry.seq, &entry.record),
                    &entry.seal,
                ) {
                    Some("altered")
                } else if pinned
                    .get(&entry.stream)
                    .is_some_and(|pin| pin.seq == entry.seq && pin.seal != entry.seal)
                {
                    Some("resealed")
                } else {
                    None
                };
                if let Some(problem) = problem {
                    fail(&mut report, entry.id, entry.stream, entry.seq, problem);
                    return Ok(report);
                }
                report.records += 1;
                report.heads.insert(
                    entry.stream,
                    StreamHead {
                        seq: entry.seq,
                        seal: entry.seal,
                    },
                );
            }
            if done {
                break;
            }
        }
        report.streams = report.heads.len() as i64;
        // Pinned streams: each must still reach its pinned place. One may be gone only if
        // retention removed it: its month ended before the retention began.
        let cutoff = Utc::now()
            .checked_sub_signed(chrono::Duration::days(i64::from(keep_days)))
            .map(|at| month_start(at).format("%Y-%m").to_string())
            .unwrap_or_default();
        for (stream, pin) in pinned {
            let cut = match report.heads.get(stream) {
                Some(head) => head.seq < pin.seq,
                None => stream_month(stream) >= cutoff.as_str(),
            };
            if cut {
                fail(&mut report, 0, stream.clone(), pin.seq, "truncated");
                return Ok(report);
            }
        }
        Ok(report)
    }

    /// Removes what is older than `keep_days` (at least `MIN_RETENTION_DAYS`). PostgreSQL
    /// drops whole monthly partitions whose every record is older (and creates the coming
    /// months' partitions); SQLite deletes the rows. Returns partitions dropped (PostgreSQL)
    /// or rows deleted (SQLite).
    pub async fn maintain(&self, keep_days: u32) -> Result<u64, StoreError> {
        let keep_days = keep_days.max(MIN_RETENTION_DAYS);
        match &self.backend {
            Backend::Postgres { read, .. } => {
                let dropped: i32 = sqlx::query_scalar("SELECT access_log_maintain($1)")
                    .bind(i32::try_from(keep_days).unwrap_or(i32::MAX))
                    .fetch_one(read)
                    .await?;
                Ok(u64::try_from(dropped).unwrap_or(0))
            }
            Backend::Sqlite { write, read } => {
                // Whole months, as PostgreSQL drops them: a month's streams go together, so
                // what remains verifies.
                let cutoff = month_start(Utc::now() - chrono::Duration::days(i64::from(keep_days)));
                // Organization by organization, through the (org_id, at) index.
                let orgs: Vec<String> =
                    sqlx::query_scalar("SELECT DISTINCT org_id FROM access_log")
                        .fetch_all(read)
                        .await?;
                let mut removed = 0;
                for org in orgs {
                    // In pieces, so that the writer (on the same connection) gets its turn
                    // between them: a month of a large organization is no single statement.
                    loop {
                        let done = sqlx::query(
                            "DELETE FROM access_log WHERE id IN (SELECT id FROM access_log \
                             WHERE org_id = $1 AND at < $2 LIMIT 10000)",
                        )
                        .bind(&org)
                        .bind(to_micros(cutoff))
                        .execute(write)
                        .await?;
                        removed += done.rows_affected();
                        if done.rows_affected() < 10_000 {
                            break;
                        }
                        tokio::task::yield_now().await;
                    }
                }
                Ok(removed)
            }
        }
    }
}

/// The first instant of `at`'s month (UTC).
fn month_start(at: DateTime<Utc>) -> DateTime<Utc> {
    use chrono::{Datelike, TimeZone};
    Utc.with_ymd_and_hms(at.year(), at.month(), 1, 0, 0, 0)
        .single()
        .unwrap_or(at)
}

enum Bind {
    Text(String),
    Int(i64),
    Time(DateTime<Utc>),
}

fn filter_sql(filter: &AccessFilter, select: &str, tail: &str) -> (String, Vec<Bind>) {
    let mut binds = vec![Bind::Text(filter.org_id.clone())];
    let mut sql = String::from(select);
    let mut push = |clause: &str, bind: Bind, binds: &mut Vec<Bind>| {
        binds.push(bind);
        sql.push_str(&clause.replace('?', &format!("${}", binds.len())));
    };
    if let Some(path) = &filter.subtree {
        // The path and every path below it: after a full path the next character is '/',
        // and '0' is the character after '/' (as the audit log's subtree filter).
        push(" AND scope_path >= ?", Bind::Text(path.clone()), &mut binds);
        push(
            " AND scope_path < ?",
            Bind::Text(format!("{path}0")),
            &mut binds,
        );
    }
    for (column, value) in [
        ("principal", &filter.principal),
        ("operation", &filter.operation),
        ("outcome", &filter.outcome),
    ] {
        if let Some(value) = value {
            push(
                &format!(" AND {column} = ?"),
                Bind::Text(value.clone()),
                &mut binds,
            );
        }
    }
    if let Some(from) = filter.from {
        push(" AND at >= ?", Bind::Time(from), &mut binds);
    }
    if let Some(to) = filter.to {
        push(" AND at < ?", Bind::Time(to), &mut binds);
    }
    if let Some(after) = filter.after {
        push(" AND id > ?", Bind::Int(after), &mut binds);
    }
    sql.push_str(tail);
    (sql, binds)
}

type PgQuery<'q> = sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>;
type SqliteQuery<'q> = sqlx::query::Query<'q, sqlx::Sqlite, sqlx::sqlite::SqliteArguments<'q>>;

fn bind_pg<'q>(mut query: PgQuery<'q>, binds: &'q [Bind]) -> PgQuery<'q> {
    for bind in binds {
        query = match bind {
            Bind::Text(text) => query.bind(text.as_str()),
            Bind::Int(int) => query.bind(*int),
            Bind::Time(at) => query.bind(*at),
        };
    }
    query
}

fn bind_sqlite<'q>(mut query: SqliteQuery<'q>, binds: &'q [Bind]) -> SqliteQuery<'q> {
    for bind in binds {
        query = match bind {
            Bind::Text(text) => query.bind(text.as_str()),
            Bind::Int(int) => query.bind(*int),
            Bind::Time(at) => query.bind(to_micros(*at)),
        };
    }
    query
}

macro_rules! entry_from_row {
    ($row:expr, $at:expr) => {{
        let row = $row;
        Ok(AccessEntry {
            id: row.try_get("id")?,
            record: AccessRecord {
                at: $at,
                org_id: row.try_get("org_id")?,
                scope_id: row.try_get("scope_id")?,
                scope_path: row.try_get("scope_path")?,
                principal: row.try_get("principal")?,
                token_id: row.try_get("token_id")?,
                operation: row.try_get("operation")?,
                class: row.try_get("class")?,
                key_version: row.try_get("key_version")?,
                outcome: row.try_get("outcome")?,
                request_id: row.try_get("request_id")?,
                source_address: row.try_get("source_address")?,
                justification: row.try_get("justification")?,
            },
            stream: row.try_get("stream")?,
            seq: row.try_get("seq")?,
            seal: row.try_get("seal")?,
        })
    }};
}

fn pg_entry(row: &sqlx::postgres::PgRow) -> Result<AccessEntry, StoreError> {
    entry_from_row!(row, row.try_get("at")?)
}

fn sqlite_entry(row: &sqlx::sqlite::SqliteRow) -> Result<AccessEntry, StoreError> {
    entry_from_row!(row, from_micros(row.try_get("at")?))
}

/// `(?, …, ?), (?, …)`: one row of anonymous placeholders per record (SQLite).
///
/// Anonymous, not `$n`: sqlx asks SQLite for each parameter's name while binding, and SQLite
/// finds a name by walking the statement's list of names, so numbered placeholders made
/// binding a 1,024-parameter piece quadratic (16% of the server's time under load, measured
/// with perf; BENCHMARKS.md, "The access log's cost"). Anonymous ones have no list to walk.
fn values_list(records: usize) -> String {
    let row = format!("({})", vec!["?"; PARAMS].join(", "));
    vec![row; records].join(", ")
}

macro_rules! bind_record {
    ($query:expr, $sealed:expr, $at:expr) => {{
        let sealed: &Sealed = $sealed;
        let r = &sealed.record;
        $query
            .bind($at)
            .bind(r.org_id.as_str())
            .bind(r.scope_id.as_str())
            .bind(r.scope_path.as_str())
            .bind(r.principal.as_str())
            .bind(r.token_id.as_str())
            .bind(r.operation.as_str())
            .bind(r.class.as_deref())
            .bind(r.key_version)
            .bind(r.outcome.as_str())
            .bind(r.request_id.as_str())
            .bind(r.source_address.as_deref())
            .bind(r.justification.as_deref())
            .bind(sealed.stream.as_str())
            .bind(sealed.seq)
            .bind(sealed.seal.as_str())
    }};
}

/// The most records in one statement of the SQLite writer (1,024 parameters).
const CHUNK: usize = 64;

/// Splits `n` records into pieces of `CHUNK` and then powers of two: few distinct statements,
/// so that each is prepared once per connection and then taken from sqlx's cache.
fn pieces(mut n: usize) -> Vec<usize> {
    let mut out = vec![CHUNK; n / CHUNK];
    n %= CHUNK;
    let mut size = CHUNK / 2;
    while n > 0 {
        if n >= size {
            out.push(size);
            n -= size;
        }
        size /= 2;
    }
    out
}

/// The writer's statement on PostgreSQL: a batch as one array per column.
const PG_INSERT: &str = "INSERT INTO access_log (at, org_id, scope_id, scope_path, principal, \
     token_id, operation, class, key_version, outcome, request_id, source_address, \
     justification, stream, seq, seal) \
     SELECT at, org_id, scope_id, scope_path, principal, token_id, operation, class, \
     key_version, outcome, request_id, source_address, justification, stream, seq, seal \
     FROM UNNEST($1::timestamptz[], $2::text[], $3::text[], $4::text[], $5::text[], \
     $6::text[], $7::text[], $8::text[], $9::bigint[], $10::text[], $11::text[], \
     $12::text[], $13::text[], $14::text[], $15::bigint[], $16::text[]) WITH ORDINALITY \
     AS r(at, org_id, scope_id, scope_path, principal, token_id, operation, class, \
     key_version, outcome, request_id, source_address, justification, stream, seq, seal, n) \
     ORDER BY n";

async fn insert(backend: &Backend, batch: &[Sealed]) -> Result<(), sqlx::Error> {
    let sql = |n: usize| format!("INSERT INTO access_log {COLUMNS} VALUES {}", values_list(n));
    match backend {
        Backend::Postgres { write, .. } => {
            // One statement (one transaction without a BEGIN on the autocommit connections)
            // of 16 arrays, whatever the batch's size: one prepared statement, and the rows
            // take their ids from the sequence in the arrays' order (`ORDER BY n`), which
            // is their order in the stream.
            let optional = |f: &dyn Fn(&AccessRecord) -> Option<&str>| -> Vec<Option<&str>> {
                batch.iter().map(|s| f(&s.record)).collect()
            };
            let text = |f: &dyn Fn(&AccessRecord) -> &str| -> Vec<&str> {
                batch.iter().map(|s| f(&s.record)).collect()
            };
            sqlx::query(PG_INSERT)
                .bind(batch.iter().map(|s| s.record.at).collect::<Vec<_>>())
                .bind(text(&|r| &r.org_id))
                .bind(text(&|r| &r.scope_id))
                .bind(text(&|r| &r.scope_path))
                .bind(text(&|r| &r.principal))
                .bind(text(&|r| &r.token_id))
                .bind(text(&|r| &r.operation))
                .bind(optional(&|r| r.class.as_deref()))
                .bind(
                    batch
                        .iter()
                        .map(|s| s.record.key_version)
                        .collect::<Vec<_>>(),
                )
                .bind(text(&|r| &r.outcome))
                .bind(text(&|r| &r.request_id))
                .bind(optional(&|r| r.source_address.as_deref()))
                .bind(optional(&|r| r.justification.as_deref()))
                .bind(batch.iter().map(|s| s.stream.as_str()).collect::<Vec<_>>())
                .bind(batch.iter().map(|s| s.seq).collect::<Vec<_>>())
                .bind(batch.iter().map(|s| s.seal.as_str()).collect::<Vec<_>>())
                .execute(write)
                .await?;
        }
        Backend::Sqlite { write, .. } => {
            if batch.len() <= CHUNK {
                // One statement is a transaction of its own: no BEGIN and COMMIT to wait for
                // (each a round trip to sqlx's connection thread). One size per statement
                // up to CHUNK, each prepared once and then taken from sqlx's cache (100).
                let n = batch.len();
                let sql = sql(n);
                let mut query = sqlx::query(&sql);
                for sealed in batch {
                    query = bind_record!(query, sealed, to_micros(sealed.record.at));
                }
                query.execute(write).await?;
                return Ok(());
            }
            // One transaction (one fsync), its rows in pieces of a few cached statements.
            let mut tx = write.begin().await?;
            let mut rest = batch;
            for n in pieces(batch.len()) {
                let (piece, after) = rest.split_at(n);
                rest = after;
                let sql = sql(n);
                let mut query = sqlx::query(&sql);
                for sealed in piece {
                    query = bind_record!(query, sealed, to_micros(sealed.record.at));
                }
                query.execute(&mut *tx).await?;
            }
            tx.commit().await?;
        }
    }
    Ok(())
}

/// A record with its place in its writer's chain.
struct Sealed {
    record: AccessRecord,
    stream: String,
    seq: i64,
    seal: String,
}

/// The writer's chains: one per organization and stream. A stream is this writer's instance,
/// a generation and a UTC month (`<instance>.<generation>.<YYYY-MM>`): retention drops whole
/// months, so it drops whole streams and what remains verifies; a failed write starts a new
/// generation, since its records may have committed all the same (an unknown outcome) and
/// must not share places with the next ones.
struct Chains {
    sealer: std::sync::Arc<dyn AccessSealer>,
    instance: String,
    generation: u64,
    heads: Heads,
    /// The month (`YYYY-MM`) of the newest stream seen.
    month: String,
    /// Streams of months before this one were forgotten.
    pruned_before: String,
}

/// Each (organization, stream)'s last place and seal.
type Heads = std::collections::HashMap<(String, String), (i64, String)>;

impl Chains {
    /// Seals `records` after the committed heads. Returns them with the heads they moved
    /// (only those), which `commit` keeps once they are written.
    fn seal(&self, records: impl Iterator<Item = AccessRecord>) -> (Vec<Sealed>, Heads) {
        let mut moved = Heads::new();
        let sealed = records
            .map(|mut record| {
                // What the database keeps: microseconds.
                record.at = from_micros(to_micros(record.at));
                let month = record.at.format("%Y-%m").to_string();
                // A month whose heads were forgotten starts a stream of its own.
                let late = if month < self.pruned_before {
                    "-late"
                } else {
                    ""
                };
                let stream = format!("{}.{}{late}.{month}", self.instance, self.generation);
                let key = (record.org_id.clone(), stream.clone());
                let (last, prev) = moved
                    .get(&key)
                    .or_else(|| self.heads.get(&key))
                    .cloned()
                    .unwrap_or((0, String::new()));
                let seq = last + 1;
                let seal =
                    self.sealer
                        .seal(&record.org_id, &prev, &canonical(&stream, seq, &record));
                moved.insert(key, (seq, seal.clone()));
                Sealed {
                    record,
                    stream,
                    seq,
                    seal,
                }
            })
            .collect();
        (sealed, moved)
    }

    /// Keeps the heads a written batch moved. When a newer month than any seen appears, the
    /// streams of months before the previous one are forgotten (nothing should be sealed in
    /// them any more; a record that still is, after a clock stepped back, goes to a stream
    /// of its own, `seal`).
    fn commit(&mut self, moved: Heads) {
        let newest = moved
            .keys()
            .map(|(_, stream)| stream_month(stream))
            .max()
            .unwrap_or("")
            .to_owned();
        self.heads.extend(moved);
        if newest > self.month {
            self.month = newest;
            let previous =
                month_start(self.month_start_of(&self.month) - chrono::Duration::days(1))
                    .format("%Y-%m")
                    .to_string();
            self.pruned_before = previous.clone();
            self.heads
                .retain(|(_, stream), _| stream_month(stream) >= previous.as_str());
        }
    }

    fn month_start_of(&self, month: &str) -> DateTime<Utc> {
        chrono::NaiveDate::parse_from_str(&format!("{month}-01"), "%Y-%m-%d")
            .ok()
            .and_then(|d| d.and_hms_opt(0, 0, 0))
            .map(|t| t.and_utc())
            .unwrap_or_else(Utc::now)
    }

    /// A write failed with an unknown outcome: its records may have committed all the same,
    /// so the next ones go to new streams rather than share places with them.
    fn restart(&mut self) {
        self.generation += 1;
        self.heads.clear();
    }
}

/// Whether the database refused these rows for what they hold (a constraint, a value it
/// cannot store): trying them again would fail again, unlike a lost connection.
/// Decided by the error's code: PostgreSQL's classes 22 (data exception) and 23 (integrity
/// constraint) and 54000 (a program limit); SQLite's TOOBIG, CONSTRAINT and MISMATCH. A full
/// disk, a read-only or recovering server, a lock or a lost connection is not about content:
/// those records are tried again.
fn refused_by_content(error: &sqlx::Error) -> bool {
    let sqlx::Error::Database(db) = error else {
        return false;
    };
    let Some(code) = db.code() else {
        return false;
    };
    if db
        .try_downcast_ref::<sqlx::postgres::PgDatabaseError>()
        .is_some()
    {
        code.starts_with("22") || code.starts_with("23") || code == "54000"
    } else {
        // SQLite: the primary result code is the low byte of the extended one.
        code.parse::<i32>()
            .is_ok_and(|c| matches!(c & 0xff, 18..=20))
    }
}

/// Writes `batch` record by record, after the batch as a whole was refused for what one of
/// them holds: the others are written, each refused one is answered with its error (a
/// durable request is refused) or, if async, dropped with an error in the log, since the
/// database would refuse it forever. Returns the records still to write after an error that
/// is not about content (a lost connection), with that error.
async fn write_each(
    backend: &Backend,
    chains: &mut Chains,
    batch: &mut Vec<Queued>,
    written: &tokio::sync::watch::Sender<u64>,
) -> Option<sqlx::Error> {
    let mut queued = std::mem::take(batch).into_iter();
    while let Some(one) = queued.next() {
        let (sealed, moved) = chains.seal(std::iter::once(one.record.clone()));
        match insert(backend, &sealed).await {
            Ok(()) => {
                chains.commit(moved);
                metrics::counter!("ekm_access_log_records_written_total").increment(1);
                if let Some(done) = one.done {
                    let _ = done.send(Ok(()));
                }
            }
            Err(error) if refused_by_content(&error) => {
                tracing::error!(
                    error = %error,
                    org_id = %one.record.org_id,
                    request_id = %one.record.request_id,
                    "the database refused an access record; dropped"
                );
                if let Some(done) = one.done {
                    let _ = done.send(Err(format!("the access log refused the record: {error}")));
                }
            }
            Err(error) => {
                batch.push(one);
                batch.extend(queued);
                return Some(error);
            }
        }
        written.send_modify(|total| *total += 1);
    }
    None
}

/// How many times the writer yields to the ready tasks before a commit, while each yield
/// brings it more records.
const YIELDS: usize = 4;

/// Moves what is queued into `batch`, up to `BATCH`; returns how many.
fn take_queued(receiver: &mut mpsc::Receiver<Queued>, batch: &mut Vec<Queued>) -> usize {
    let before = batch.len();
    while batch.len() < BATCH {
        match receiver.try_recv() {
            Ok(queued) => batch.push(queued),
            Err(_) => break,
        }
    }
    batch.len() - before
}

/// The writer: takes what is queued (at most `BATCH`), seals it, commits it in one
/// statement, answers each durable request. A failed batch is answered with its error
/// (durable requests are then refused); records of async requests are tried again until
/// they are written, so that a database that comes back loses none of them.
async fn writer(
    backend: Backend,
    mut chains: Chains,
    mut receiver: mpsc::Receiver<Queued>,
    written: tokio::sync::watch::Sender<u64>,
) {
    let mut batch: Vec<Queued> = Vec::with_capacity(BATCH);
    let mut pause = Duration::from_millis(50);
    loop {
        if batch.is_empty() {
            match receiver.recv().await {
                Some(queued) => batch.push(queued),
                None => return,
            }
        }
        take_queued(&mut receiver, &mut batch);
        // Let the tasks that are ready to run (requests being decided) queue their records
        // first: a bigger batch for one commit, without a timer. An idle server has no such
        // task and the yield returns at once; a busy one commits fewer, fuller batches
        // (BENCHMARKS.md, "The access log's cost").
        for _ in 0..YIELDS {
            if batch.len() >= BATCH {
                break;
            }
            tokio::task::yield_now().await;
            if take_queued(&mut receiver, &mut batch) == 0 {
                break;
            }
        }
        // What waits to be written (this batch and what queued behind it), and how long the
        // batch's commit takes.
        metrics::gauge!("ekm_access_log_queue_depth").set((receiver.len() + batch.len()) as f64);
        let started = std::time::Instant::now();
        let (sealed, moved) = chains.seal(batch.iter().map(|q| q.record.clone()));
        let inserted = insert(&backend, &sealed).await;
        metrics::histogram!("ekm_access_log_flush_duration_seconds")
            .record(started.elapsed().as_secs_f64());
        let mut failure = match inserted {
            Ok(()) => {
                chains.commit(moved);
                let n = batch.len() as u64;
                for queued in batch.drain(..) {
                    if let Some(done) = queued.done {
                        let _ = done.send(Ok(()));
                    }
                }
                written.send_modify(|total| *total += n);
                metrics::counter!("ekm_access_log_records_written_total").increment(n);
                pause = Duration::from_millis(50);
                None
            }
            // Nothing of the batch was written (one statement, or one transaction): find the
            // record the database refuses and write the others.
            Err(error) if refused_by_content(&error) => {
                write_each(&backend, &mut chains, &mut batch, &written).await
            }
            Err(error) => Some(error),
        };
        if let Some(error) = failure.take() {
            chains.restart();
            let message = format!("the access log could not be written: {error}");
            tracing::error!(error = %error, records = batch.len(), "access log write failed");
            // Durable requests get the error now (their requests are refused, so they count
            // as settled); async records wait for the next try.
            let before = batch.len();
            batch.retain_mut(|queued| match queued.done.take() {
                Some(done) => {
                    let _ = done.send(Err(message.clone()));
                    false
                }
                None => true,
            });
            let refused = (before - batch.len()) as u64;
            written.send_modify(|total| *total += refused);
            if !batch.is_empty() {
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(1));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_are_one_row_per_record() {
        let two = values_list(2);
        assert_eq!(two.matches('?').count(), 2 * PARAMS, "{two}");
        assert_eq!(two.matches("), (").count(), 1, "{two}");
        assert!(!two.contains('$'), "{two}");
    }

    #[test]
    fn pieces_cover_the_batch_with_few_sizes() {
        for n in 0..=1000 {
            let pieces = pieces(n);
            assert_eq!(pieces.iter().sum::<usize>(), n);
            assert!(pieces.iter().all(|p| p.is_power_of_two() && *p <= 64));
        }
        assert_eq!(pieces(130), vec![64, 64, 2]);
    }

    #[test]
    fn retention_starts_at_a_month() {
        let at: DateTime<Utc> = "2026-03-17T05:06:07Z".parse().unwrap();
        assert_eq!(month_start(at).to_rfc3339(), "2026-03-01T00:00:00+00:00");
    }

    struct Plain;
    impl AccessSealer for Plain {
        fn seal(&self, _: &str, prev: &str, entry: &[u8]) -> String {
            format!("{}{}", prev.len(), entry.len())
        }
        fn verify(&self, org: &str, prev: &str, entry: &[u8], seal: &str) -> bool {
            self.seal(org, prev, entry) == seal
        }
    }

    fn record_at(at: &str) -> AccessRecord {
        AccessRecord {
            at: at.parse().unwrap(),
            org_id: "org".into(),
            scope_id: "s".into(),
            scope_path: "org/s".into(),
            principal: "p".into(),
            token_id: "t".into(),
            operation: "decrypt".into(),
            class: None,
            key_version: Some(1),
            outcome: "ok".into(),
            request_id: "r".into(),
            source_address: None,
            justification: None,
        }
    }

    #[test]
    fn the_writer_forgets_old_months_and_a_late_record_starts_its_own_stream() {
        let mut chains = Chains {
            sealer: std::sync::Arc::new(Plain),
            instance: "i".into(),
            generation: 0,
            heads: Heads::new(),
            month: String::new(),
            pruned_before: String::new(),
        };
        for at in ["2026-10-05T00:00:00Z", "2026-11-05T00:00:00Z"] {
            let (_, moved) = chains.seal(std::iter::once(record_at(at)));
            chains.commit(moved);
        }
        assert_eq!(chains.heads.len(), 2, "October is the previous month: kept");
        let (_, moved) = chains.seal(std::iter::once(record_at("2026-12-05T00:00:00Z")));
        chains.commit(moved);
        let months: Vec<&str> = chains.heads.keys().map(|(_, s)| stream_month(s)).collect();
        assert!(!months.contains(&"2026-10"), "{months:?}");
        assert_eq!(months.len(), 2);
        // A record of October after all (a clock stepped back): a stream of its own, place 1.
        let (sealed, _) = chains.seal(std::iter::once(record_at("2026-10-06T00:00:00Z")));
        assert_eq!(sealed[0].stream, "i.0-late.2026-10");
        assert_eq!(sealed[0].seq, 1);
    }

    #[test]
    fn modes_parse() {
        assert_eq!("durable".parse(), Ok(AccessLogMode::Durable));
        assert_eq!("async".parse(), Ok(AccessLogMode::Async));
        assert!("sometimes".parse::<AccessLogMode>().is_err());
    }
}
