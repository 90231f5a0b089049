//! The database: embedded SQLite (the default) or PostgreSQL, connected and migrated.

use std::path::{Path, PathBuf};
use std::time::Duration;

use sqlx::postgres::PgPoolOptions;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{PgPool, SqlitePool};

use std::sync::Arc;

use crate::error::StoreError;
use crate::failover::{Fence, Hosts, TargetSession};

/// Where the data lives.
#[derive(Clone)]
pub enum DbConfig {
    /// A SQLite file (created if missing).
    Sqlite { path: PathBuf },
    /// A PostgreSQL connection URL.
    Postgres { url: String },
}

impl std::fmt::Debug for DbConfig {
    // The URL may hold a password: never print it.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DbConfig::Sqlite { path } => f.debug_struct("Sqlite").field("path", path).finish(),
            DbConfig::Postgres { .. } => f.write_str("Postgres { url: <redacted> }"),
        }
    }
}

impl DbConfig {
    /// The embedded default: `ekm.db` in the data directory.
    pub fn sqlite_in(data_dir: &Path) -> Self {
        DbConfig::Sqlite {
            path: data_dir.join("ekm.db"),
        }
    }
}

/// SQLite with one writer connection (so that commands never meet `database is locked`)
/// and a small pool of readers (WAL lets them read while the writer writes).
#[derive(Clone, Debug)]
pub struct SqliteDb {
    pub write: SqlitePool,
    pub read: SqlitePool,
    /// Appends waiting to share a transaction of the writer (group commit).
    pub(crate) group: std::sync::Arc<crate::append::GroupCommit>,
}

#[derive(Clone, Debug)]
pub struct PostgresDb {
    pub pool: PgPool,
    /// Connections on which no transaction is ever opened: each statement sent on them is a
    /// transaction of its own (autocommit). The hot single-statement paths (an events-only
    /// append, the notification after it) use them. Without a `BEGIN` they cannot meet
    /// sqlx's cancelled-`BEGIN` bug, so they skip the check on acquire that `pool` pays:
    /// one round trip less per command (`pg_pool_options`).
    statements: PgPool,
    /// Notifies other instances after this one commits events (`Db::notify_committed`).
    pub notifier: std::sync::Arc<crate::notify::Notifier>,
    /// Events-only appends waiting to share one `INSERT` (group commit).
    pub(crate) group: std::sync::Arc<crate::append::GroupCommit>,
}

/// Group-commit flushes in flight at once on PostgreSQL. One: the next batch fills while
/// the current one's commit waits for its WAL flush (measured against 2, 3, 4 and 8 in
/// BENCHMARKS.md, "Group commit": more flushes in flight made smaller batches and more
/// statements, and fewer commands per second).
const PG_FLUSHERS: usize = 1;

impl PostgresDb {
    /// A database reached through `pool` alone (no separate autocommit connections).
    pub fn new(pool: PgPool) -> Self {
        Self {
            statements: pool.clone(),
            pool,
            notifier: Default::default(),
            group: std::sync::Arc::new(crate::append::GroupCommit::new(PG_FLUSHERS, false)),
        }
    }

    /// The autocommit connections: never `begin` a transaction on them, and never send
    /// more than one statement per query (a multi-statement string may hold a `BEGIN`).
    pub(crate) fn statements(&self) -> &PgPool {
        &self.statements
    }
}

/// The options of the autocommit pool (`PostgresDb::statements`): no transaction check on
/// acquire, since no transaction is ever opened on these connections. sqlx still syncs a connection
/// on its return to the pool, so a statement cancelled in flight is drained, committed or
/// not, before the connection is lent again.
fn pg_statement_pool_options(fence: Arc<Fence>) -> PgPoolOptions {
    PgPoolOptions::new()
        .test_before_acquire(false)
        // A connection idle for a while may have died (a restart, a failover, a reaped
        // idle connection): a ping (a sync, no statement) finds out before a batch of
        // commands is sent on it; sqlx then opens another. A busy one goes without. One
        // opened before the pool moved to another host is closed (`failover`).
        .before_acquire(move |conn, meta| {
            let fence = fence.clone();
            Box::pin(async move {
                if fence.stale(meta.age) {
                    return Ok(false);
                }
                if meta.idle_for >= Duration::from_secs(1) {
                    sqlx::Connection::ping(conn).await?;
                }
                Ok(true)
            })
        })
}

/// The options of every PostgreSQL pool EKM opens.
///
/// sqlx 0.8.6 (and 0.9.0) is not cancel-safe in `begin` on PostgreSQL: a future dropped
/// while its `BEGIN` is in flight (a client that went away mid-command, a timeout) returns
/// the connection to the pool inside a transaction sqlx does not know about, and queues no
/// `ROLLBACK` (transact-rs/sqlx#4393). The next borrower's statements would run in it: an
/// append "committed" there stays uncommitted, an error poisons the connection (`25P02`).
/// So a connection is checked when it is handed out, and closed if it is inside a
/// transaction. The check replaces sqlx's ping on acquire: no extra round trip.
pub fn pg_pool_options() -> PgPoolOptions {
    pg_pool_options_fenced(Arc::default())
}

/// `pg_pool_options`, closing connections opened before the pools last moved to another
/// host (`failover`).
fn pg_pool_options_fenced(fence: Arc<Fence>) -> PgPoolOptions {
    PgPoolOptions::new()
        .test_before_acquire(false)
        .before_acquire(move |conn, meta| {
            let fence = fence.clone();
            Box::pin(async move {
                if fence.stale(meta.age) {
                    return Ok(false);
                }
                // Simple protocol: outside a transaction block the statement is its own
                // transaction, which starts at the statement's own timestamp.
                let row = sqlx::Executor::fetch_one(
                    conn,
                    sqlx::raw_sql("SELECT now() = statement_timestamp()"),
                )
                .await?;
                let outside: bool = sqlx::Row::try_get(&row, 0)?;
                if !outside {
                    tracing::warn!("a pooled PostgreSQL connection was left inside a transaction (a cancelled BEGIN); closing it");
                }
                Ok(outside)
            })
        })
}

impl Db {
    /// This process's connection to the database, as named in its notifications: a random
    /// id per `Db::connect` (empty on SQLite).
    pub fn instance_id(&self) -> &str {
        match self {
            Db::Sqlite(_) => "",
            Db::Postgres(db) => db.notifier.instance(),
        }
    }
}

/// A connected, migrated database.
#[derive(Clone, Debug)]
pub enum Db {
    Sqlite(SqliteDb),
    Postgres(PostgresDb),
}

/// Runs `$body` with `$pool` bound to the backend's pool for writes (and for reads that
/// must see the latest writes). The body is compiled once per backend, so it may use the
/// concrete pool type; SQL that differs between backends branches on `Db::is_postgres`.
#[macro_export]
macro_rules! with_write_pool {
    ($db:expr, $pool:ident => $body:expr) => {
        match $db {
            $crate::Db::Sqlite(db) => {
                let $pool = &db.write;
                $body
            }
            $crate::Db::Postgres(db) => {
                let $pool = &db.pool;
                $body
            }
        }
    };
}

/// Like `with_write_pool!`, with SQLite's reader pool.
#[macro_export]
macro_rules! with_read_pool {
    ($db:expr, $pool:ident => $body:expr) => {
        match $db {
            $crate::Db::Sqlite(db) => {
                let $pool = &db.read;
                $body
            }
            $crate::Db::Postgres(db) => {
                let $pool = &db.pool;
                $body
            }
        }
    };
}

/// The pool of SQLite's one writer connection. A connection that comes back inside a
/// transaction is closed rather than handed to the next writer: after a full disk or an I/O
/// error SQLite may end or keep a transaction on its own, and sqlx then loses count of it
/// (found by the full-disk test: every later batch of the runner failed with "Safety level
/// may not be changed inside a transaction" until a restart). `synchronous` cannot be set
/// inside a transaction, so setting it to the value it must have anyway tells, in one
/// statement without I/O.
pub(crate) fn sqlite_writer_pool() -> SqlitePoolOptions {
    SqlitePoolOptions::new()
        .max_connections(1)
        .min_connections(1)
        .after_release(|connection, _| {
            Box::pin(async move {
                let clean = sqlx::query("PRAGMA synchronous = FULL")
                    .execute(&mut *connection)
                    .await
                    .is_ok();
                if !clean {
                    tracing::warn!("the SQLite writer connection came back inside a transaction; it is closed and a new one opened");
                }
                Ok(clean)
            })
        })
}

/// Installs ring as the process's default TLS crypto provider, once. sqlx builds its TLS
/// client with an explicit provider, except on the `sslmode=verify-ca` path, which asks
/// rustls for the process default; with both ring and aws-lc-rs in the binary (the AWS SDK
/// brings the latter) there is no default, and the connection attempt panicked
/// (`postgres_tls::postgres_is_reached_over_verified_tls_and_refused_when_the_certificate_is_wrong`).
pub fn install_tls_provider() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // Fails only if a default is installed already, which is as good.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

impl Db {
    /// Connects without migrating.
    pub async fn connect(config: &DbConfig) -> Result<Db, StoreError> {
        install_tls_provider();
        match config {
            DbConfig::Sqlite { path } => {
                if let Some(dir) = path.parent() {
                    std::fs::create_dir_all(dir).map_err(|source| StoreError::DataDir {
                        path: dir.display().to_string(),
                        source,
                    })?;
                }
                // 0600 before SQLite opens it; its WAL and shared memory follow its mode.
                crate::private_files::prepare_sqlite_files(path).map_err(|source| {
                    StoreError::DataDir {
                        path: path.display().to_string(),
                        source,
                    }
                })?;
                let options = SqliteConnectOptions::new()
                    .filename(path)
                    .create_if_missing(true)
                    .journal_mode(SqliteJournalMode::Wal)
                    // FULL: an acknowledged pause or revoke survives a power cut.
                    .synchronous(SqliteSynchronous::Full)
                    .busy_timeout(Duration::from_secs(10))
                    .foreign_keys(true)
                    // Freed cells are zeroed, so a deleted key leaves no bytes in the main
                    // file (the WAL is emptied by `destroy_at_rest`; ADR 0013).
                    .pragma("secure_delete", "ON");
                let write = sqlite_writer_pool()
                    .connect_with(options.clone())
                    .await
                    .map_err(StoreError::Connect)?;
                let read = SqlitePoolOptions::new()
                    .max_connections(4)
                    .connect_with(options.read_only(true))
                    .await
                    .map_err(StoreError::Connect)?;
                Ok(Db::Sqlite(SqliteDb {
                    write,
                    read,
                    // One flush at a time: there is one writer connection.
                    group: std::sync::Arc::new(crate::append::GroupCommit::new(1, true)),
                }))
            }
            DbConfig::Postgres { url } => {
                // One host, or several in libpq's form with the primary followed
                // (`failover`, issue 19 §4).
                let hosts = Hosts::parse(url)?;
                let current = match hosts.needs_watch() {
                    false => 0,
                    true => hosts.find().await.ok_or_else(|| {
                        StoreError::Connect(sqlx::Error::Configuration(
                            format!(
                                "none of the {} database hosts answers{}",
                                hosts.options.len(),
                                match hosts.target {
                                    TargetSession::ReadWrite => " and accepts writes",
                                    TargetSession::Any => "",
                                }
                            )
                            .into(),
                        ))
                    })?,
                };
                let options = hosts.options[current].clone();
                let fence = Arc::new(Fence::default());
                let writable = hosts.target == TargetSession::ReadWrite;
                let checked = |options: PgPoolOptions| match writable {
                    true => options.after_connect(|connection, _| {
                        Box::pin(crate::failover::check_writable(connection))
                    }),
                    false => options,
                };
                let pool = checked(pg_pool_options_fenced(fence.clone()))
                    .max_connections(16)
                    .acquire_timeout(Duration::from_secs(10))
                    .connect_with(options.clone())
                    .await
                    .map_err(StoreError::Connect)?;
                let statements = checked(pg_statement_pool_options(fence.clone()))
                    .max_connections(8)
                    .acquire_timeout(Duration::from_secs(10))
                    .connect_with(options)
                    .await
                    .map_err(StoreError::Connect)?;
                if hosts.needs_watch() {
                    tokio::spawn(crate::failover::watch(
                        hosts,
                        current,
                        vec![statements.clone(), pool.clone()],
                        fence,
                    ));
                }
                Ok(Db::Postgres(PostgresDb {
                    pool,
                    statements,
                    notifier: Default::default(),
                    group: std::sync::Arc::new(crate::append::GroupCommit::new(PG_FLUSHERS, false)),
                }))
            }
        }
    }

    /// Connects and applies pending migrations. A database whose migrations are all applied
    /// is left alone, so a role without DDL rights can open it (docs/ops/postgres-roles.sql).
    pub async fn open(config: &DbConfig) -> Result<Db, StoreError> {
        let db = Db::connect(config).await?;
        if !db.pending_migrations().await?.is_empty() {
            db.migrate().await?;
        }
        Ok(db)
    }

    /// The versions of the migrations embedded in this binary that the database has not
    /// applied. Fails if an applied migration differs from the embedded one, is unknown to
    /// this binary (a newer one applied it), or failed half-way, as `migrate` would.
    pub async fn pending_migrations(&self) -> Result<Vec<i64>, StoreError> {
        let migrator = match self {
            Db::Sqlite(_) => sqlx::migrate!("../migrations/sqlite"),
            Db::Postgres(_) => sqlx::migrate!("../migrations/postgres"),
        };
        let sql = "SELECT version, checksum, success FROM _sqlx_migrations";
        let applied: Vec<(i64, Vec<u8>, bool)> = with_read_pool!(self, pool => {
            match sqlx::query_as(sql).fetch_all(pool).await {
                Ok(rows) => rows,
                // No bookkeeping table yet: nothing applied.
                Err(sqlx::Error::Database(e))
                    if e.code().as_deref() == Some("42P01")
                        || e.message().starts_with("no such table") =>
                {
                    vec![]
                }
                Err(e) => return Err(e.into()),
            }
        });
        // Applied by a newer binary: this one does not know the schema it left.
        if let Some((version, ..)) = applied
            .iter()
            .find(|(version, ..)| !migrator.version_exists(*version))
        {
            return Err(StoreError::MigrationDiffers { version: *version });
        }
        let mut pending = vec![];
        for migration in migrator.iter() {
            match applied
                .iter()
                .find(|(version, ..)| *version == migration.version)
            {
                None => pending.push(migration.version),
                Some((version, checksum, success)) => {
                    if !success || checksum.as_slice() != migration.checksum.as_ref() {
                        return Err(StoreError::MigrationDiffers { version: *version });
                    }
                }
            }
        }
        Ok(pending)
    }

    /// Refuses a database that lacks migrations this binary needs, for a server that must not
    /// run DDL (`ekm serve --no-migrate`: migrations are the owner role's, `ekm migrate`).
    pub async fn require_migrated(&self) -> Result<(), StoreError> {
        let pending = self.pending_migrations().await?;
        match pending.first() {
            None => Ok(()),
            Some(first) => Err(StoreError::MigrationsPending {
                first: *first,
                count: pending.len(),
            }),
        }
    }

    /// Applies the migrations embedded in the binary (`migrations/<backend>/`). Safe to run
    /// from several instances at once: sqlx serialises them with a lock.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        match self {
            Db::Sqlite(db) => {
                sqlx::migrate!("../migrations/sqlite")
                    .run(&db.write)
                    .await?
            }
            Db::Postgres(db) => {
                sqlx::migrate!("../migrations/postgres")
                    .run(&db.pool)
                    .await?
            }
        }
        Ok(())
    }

    /// Tells other instances that events committed (PostgreSQL: a coalesced NOTIFY after
    /// the commit; SQLite has one process per database).
    pub fn notify_committed(&self) {
        if let Db::Postgres(db) = self {
            db.notifier.committed(db.statements());
        }
    }

    /// What a clock here is compared with (`ekm doctor`): PostgreSQL's own clock (`true`),
    /// or on SQLite the newest event's time (`false`); none on an empty SQLite database.
    pub async fn reference_time(
        &self,
    ) -> Result<Option<(chrono::DateTime<chrono::Utc>, bool)>, StoreError> {
        match self {
            Db::Postgres(pg) => {
                let now: chrono::DateTime<chrono::Utc> = sqlx::query_scalar("SELECT now()")
                    .fetch_one(&pg.pool)
                    .await?;
                Ok(Some((now, true)))
            }
            Db::Sqlite(sqlite) => {
                let newest: Option<String> =
                    sqlx::query_scalar("SELECT MAX(recorded_at) FROM events")
                        .fetch_one(&sqlite.read)
                        .await?;
                Ok(newest.map(|t| (crate::time::from_sqlite_event_time(&t), false)))
            }
        }
    }

    pub fn is_postgres(&self) -> bool {
        matches!(self, Db::Postgres(_))
    }

    pub fn backend_name(&self) -> &'static str {
        match self {
            Db::Sqlite(_) => "sqlite",
            Db::Postgres(_) => "postgres",
        }
    }

    /// A cheap liveness probe of the database.
    pub async fn ping(&self) -> Result<(), StoreError> {
        with_read_pool!(self, pool => {
            sqlx::query("SELECT 1").execute(pool).await?;
        });
        Ok(())
    }

    /// Closes every connection; SQLite checkpoints its WAL on the last close.
    pub async fn close(&self) {
        match self {
            Db::Sqlite(db) => {
                db.read.close().await;
                db.write.close().await;
            }
            Db::Postgres(db) => {
                db.statements.close().await;
                db.pool.close().await;
            }
        }
    }
}
