//! The projection runner: tails the event log by global position and applies events to the
//! read models, with each projection's checkpoint in the same transaction as its rows.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use ekm_keys::SealKey;
use ekm_store::time::now_micros;
use ekm_store::{Db, StoredEvent, EVENTS_CHANNEL};
use sqlx::postgres::PgListener;
use tokio::sync::{watch, Mutex, Notify};

use crate::audit::AuditChain;
use crate::error::ProjectionError;
use crate::scope_tree::{KeyShredder, ScopeTree};
use crate::sql::{
    execute_prepared_postgres, execute_prepared_sqlite, merge, Dialect, Prepared, Statement,
};

/// A read model fed from events. `statements` must depend only on the event and the
/// projection's own state, so that a rebuild from the log yields exactly the live rows, and
/// must keep the merging contract of `sql::Statement` (inserts only create rows; updates
/// set values on rows inserted earlier in the history).
pub trait Projection: Send + Sync {
    fn name(&self) -> &'static str;
    /// The tables this projection owns (emptied by a rebuild).
    fn tables(&self) -> &'static [&'static str];
    /// Whether `ekm projections rebuild` resets it. Seals (the audit chain) are not rebuilt.
    fn rebuildable(&self) -> bool {
        true
    }
    /// The state keys `statements` will read for this event; the runner loads them first.
    fn state_keys(&self, _event: &StoredEvent) -> Vec<String> {
        vec![]
    }
    fn statements(
        &self,
        event: &StoredEvent,
        state: &mut ProjectionState,
    ) -> Result<Vec<Statement>, ProjectionError>;
}

/// A projection's key/value state, loaded and saved in the batch's transaction.
#[derive(Debug, Default)]
pub struct ProjectionState {
    values: HashMap<String, String>,
    changed: HashSet<String>,
}

impl ProjectionState {
    pub fn get(&self, key: &str) -> Option<&str> {
        self.values.get(key).map(String::as_str)
    }

    pub fn set(&mut self, key: &str, value: String) {
        self.values.insert(key.to_owned(), value);
        self.changed.insert(key.to_owned());
    }

    fn is_loaded(&self, key: &str) -> bool {
        self.values.contains_key(key)
    }
}

#[derive(Clone, Copy, Debug)]
pub struct ProjectorConfig {
    /// Events applied per transaction.
    pub batch_size: i64,
    /// How often to look for events committed by other instances when no notification
    /// arrives (PostgreSQL's LISTEN/NOTIFY is the fast path; this is the fallback).
    pub poll_interval: Duration,
    /// PostgreSQL: load inserts with `COPY … FROM STDIN`. Only for runs nothing cancels
    /// half-way (the aside rebuild, whose tables are thrown away if it stops): a COPY whose
    /// future is dropped mid-way leaves the pooled connection out of step with the server
    /// (seen in `interrupted_catch_up_resumes_without_loss_or_duplicates`: rows committed
    /// without their checkpoint), so the live runner keeps to plain statements.
    pub bulk_copy: bool,
    /// Commit the runner's transactions without waiting for the disk (PostgreSQL:
    /// `synchronous_commit = off`; SQLite: `synchronous = NORMAL` for the batch). The events
    /// are durable already; a batch lost in a crash, rows and checkpoint together, is
    /// applied again (ADR 0020).
    pub async_commit: bool,
    /// After a commit of this instance wakes the background loop, how long it lets further
    /// commits arrive before it applies them in one batch (`COMMIT_WINDOW`).
    pub commit_window: Duration,
}

/// Under a stream of commands the background loop would otherwise run one batch of about
/// ten statements per two or three commands; waiting this long after a wake makes it one
/// batch per window (BENCHMARKS.md, "Group commit"). The answers never wait for it.
pub const COMMIT_WINDOW: Duration = Duration::from_millis(20);

impl Default for ProjectorConfig {
    fn default() -> Self {
        Self {
            batch_size: 500,
            poll_interval: Duration::from_millis(500),
            bulk_copy: false,
            async_commit: false,
            commit_window: COMMIT_WINDOW,
        }
    }
}

/// SQLite's writer connection while it commits without an fsync (`synchronous = NORMAL`):
/// dropped before it is taken back out, it closes the connection (the pool opens a new one,
/// at FULL), so no command is ever acknowledged on a connection left at NORMAL.
struct Unsynced(Option<sqlx::pool::PoolConnection<sqlx::Sqlite>>);

impl Drop for Unsynced {
    fn drop(&mut self) {
        if let Some(conn) = self.0.take() {
            drop(conn.detach());
        }
    }
}

/// Told about every event once this process has seen it applied, by itself or by another
/// instance (for example to evict cached keys). Called outside any transaction.
/// How long `catch_up_to` waits for older transactions to end before it gives up.
const FENCE_WAIT: Duration = Duration::from_secs(10);

/// How soon the background loop looks again while committed events wait behind the fence.
const FENCE_RETRY: Duration = Duration::from_millis(5);

/// How soon the background loop tries again after a failed catch-up (a lost connection, a
/// busy pool): not at the poll interval, which may be long, and which a notification that
/// arrived meanwhile would not shorten (it was consumed by the failed pass).
const ERROR_RETRY: Duration = Duration::from_millis(100);

pub type EventListener = Arc<dyn Fn(&[StoredEvent]) + Send + Sync>;

pub struct Projector {
    db: Db,
    /// Shared with `catch_up_prefetching`'s reader task, which turns events into statements.
    projections: Arc<[Box<dyn Projection>]>,
    config: ProjectorConfig,
    /// One catch-up at a time in this process; other instances are excluded by row locks.
    running: Mutex<()>,
    /// The highest position known to be applied to every read model.
    applied: watch::Sender<i64>,
    wake: Notify,
    /// Signalled when this process commits events: `catch_up_to` waiting behind the fence
    /// for a local command's transaction tries again at once.
    commits: Notify,
    /// PostgreSQL with `async_commit`: the highest applied position known to be flushed
    /// (confirmed by a synchronous commit made after it, `confirm_durable`).
    durable: std::sync::atomic::AtomicI64,
    /// PostgreSQL with `async_commit`: the server's start time seen by this process's last
    /// batch, and the highest position this process committed while that server ran. An
    /// unflushed commit is lost only if the server stops: while it runs, what this process
    /// applied stays, and a checkpoint below it was moved back by someone.
    server_run: std::sync::Mutex<(Option<String>, i64)>,
    /// The server start time read by the batch in flight (set in its transaction).
    batch_server_run: std::sync::Mutex<Option<String>>,
    listening: std::sync::atomic::AtomicBool,
    listeners: std::sync::Mutex<Vec<EventListener>>,
    /// The last batch this process applied: every event after `from` up to its last.
    recent: std::sync::Mutex<Applied>,
    /// Up to where listeners have been told (None until the first catch-up).
    observed: Mutex<Option<i64>>,
}

impl Projector {
    pub fn new(db: Db, projections: Vec<Box<dyn Projection>>, config: ProjectorConfig) -> Self {
        Self {
            db,
            projections: projections.into(),
            config,
            running: Mutex::new(()),
            applied: watch::Sender::new(0),
            wake: Notify::new(),
            commits: Notify::new(),
            durable: std::sync::atomic::AtomicI64::new(0),
            server_run: std::sync::Mutex::new((None, 0)),
            batch_server_run: std::sync::Mutex::new(None),
            listening: std::sync::atomic::AtomicBool::new(false),
            listeners: std::sync::Mutex::new(vec![]),
            observed: Mutex::new(None),
            recent: std::sync::Mutex::new(Applied::default()),
        }
    }

    /// The read models EKM serves, and the audit seals (made with `seal`).
    pub fn standard(db: Db, config: ProjectorConfig, seal: SealKey) -> Self {
        Self::new(db, standard_projections(Some(seal)), config)
    }

    /// Creates the checkpoint rows that do not exist yet.
    pub async fn init(&self) -> Result<(), ProjectionError> {
        let sql = "INSERT INTO projection_checkpoints (name, position, updated_at) \
                   VALUES ($1, 0, $2) ON CONFLICT (name) DO NOTHING";
        for projection in self.projections.iter() {
            ekm_store::with_write_pool!(&self.db, pool => {
                sqlx::query(sql).bind(projection.name()).bind(now_micros()).execute(pool).await?;
            });
        }
        Ok(())
    }

    /// The highest position this process knows to be applied.
    pub fn applied(&self) -> i64 {
        *self.applied.borrow()
    }

    /// Whether the background loop currently receives PostgreSQL notifications.
    pub fn listening(&self) -> bool {
        self.listening.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Follows the applied position as it moves.
    pub fn subscribe(&self) -> watch::Receiver<i64> {
        self.applied.subscribe()
    }

    /// Asks the background loop to catch up now (after a local commit).
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// This process committed events: whoever waits behind the fence looks again.
    pub fn committed(&self) {
        self.commits.notify_waiters();
    }

    /// A synchronous commit that began after the runner had applied `position` succeeded:
    /// everything up to `position` is flushed (PostgreSQL's WAL is one sequence).
    pub fn confirm_durable(&self, position: i64) {
        self.durable
            .fetch_max(position, std::sync::atomic::Ordering::AcqRel);
    }

    /// Below what a never-rebuilt projection's checkpoint may not go: what this process
    /// applied, or with `async_commit` what it knows to be flushed (a database crash may
    /// take back the rest, which is then applied again, not a reset).
    ///
    /// On PostgreSQL with `async_commit`, what this process committed while the server it
    /// reads now has been running counts as well (`started`: `pg_postmaster_start_time()`
    /// read in the batch's transaction): only a stop of the server loses unflushed commits.
    fn floor(&self, started: Option<&str>) -> i64 {
        if !(self.config.async_commit && self.db.is_postgres()) {
            return self.applied();
        }
        let durable = self.durable.load(std::sync::atomic::Ordering::Acquire);
        match (started, self.server_run.lock()) {
            (Some(started), Ok(run)) if run.0.as_deref() == Some(started) => durable.max(run.1),
            _ => durable,
        }
    }

    /// After a batch committed on PostgreSQL: what it reached counts for the server run it
    /// was committed in (`floor`).
    fn record_server_run(&self, reached: i64) {
        let started = self.batch_server_run.lock().ok().and_then(|mut s| s.take());
        let (Some(started), Ok(mut run)) = (started, self.server_run.lock()) else {
            return;
        };
        if run.0.as_deref() == Some(started.as_str()) {
            run.1 = run.1.max(reached);
        } else {
            *run = (Some(started), reached);
        }
    }

    /// Adds a listener for events applied from now on.
    pub fn add_listener(&self, listener: EventListener) {
        if let Ok(mut listeners) = self.listeners.lock() {
            listeners.push(listener);
        }
    }

    /// Applies every committed event not yet applied, then tells the listeners about every
    /// event between what they last heard and the position reached. Returns that position.
    pub async fn catch_up(&self) -> Result<i64, ProjectionError> {
        {
            let _running = self.running.lock().await;
            self.drain().await?;
        }
        self.tell_listeners().await?;
        Ok(self.applied())
    }

    /// Applies batches until one comes back short: a batch with fewer events than it asked
    /// for has read everything committed when it read, so no empty transaction is spent on
    /// finding that out (events committed later wake the runner again).
    async fn drain(&self) -> Result<(), ProjectionError> {
        self.drain_reporting(0, &mut |_, _| {}).await
    }

    /// `drain`, calling `progress(applied, head)` after every batch that applied events.
    async fn drain_reporting(
        &self,
        head: i64,
        progress: &mut (dyn FnMut(i64, i64) + Send),
    ) -> Result<(), ProjectionError> {
        let full = usize::try_from(self.config.batch_size).unwrap_or(usize::MAX);
        loop {
            let read = self.step().await?;
            if read > 0 {
                progress(self.applied(), head.max(self.applied()));
            }
            if read < full {
                return Ok(());
            }
        }
    }

    async fn tell_listeners(&self) -> Result<(), ProjectionError> {
        let mut observed = self.observed.lock().await;
        let applied = self.applied();
        let Some(mut from) = *observed else {
            // Nothing was cached before the first catch-up: start from here.
            *observed = Some(applied);
            return Ok(());
        };
        let listeners: Vec<EventListener> = match self.listeners.lock() {
            Ok(listeners) => listeners.clone(),
            Err(_) => vec![],
        };
        while from < applied {
            // Everything up to `applied` is final: read past the fence, which may stand
            // lower for a moment (`Db::events_through`). A fenced read here could return
            // nothing and end the loop with events untold.
            let events = match self.recent_after(from) {
                Some(events) => events,
                None => {
                    self.db
                        .events_through(from, applied, self.config.batch_size)
                        .await?
                }
            };
            let events: Vec<StoredEvent> = events
                .into_iter()
                .filter(|e| e.position <= applied)
                .collect();
            let Some(last) = events.last().map(|e| e.position) else {
                break;
            };
            for listener in &listeners {
                listener(&events);
            }
            from = last;
        }
        *observed = Some(applied.max(from));
        Ok(())
    }

    /// Like `catch_up`, calling `progress(applied, head)` after every batch.
    pub async fn catch_up_reporting(
        &self,
        progress: &mut (dyn FnMut(i64, i64) + Send),
    ) -> Result<i64, ProjectionError> {
        let _running = self.running.lock().await;
        let head = self.db.head_position().await?;
        progress(self.applied(), head);
        self.drain_reporting(head, progress).await?;
        Ok(self.applied())
    }

    /// Like `catch_up_reporting`, with the log read one batch ahead by a task of its own that
    /// also turns each batch into its merged statements, so that reading, decoding and
    /// preparing the next batch overlaps writing this one. Only for a projector that nothing
    /// else advances meanwhile (the aside rebuild, under its lock; the in-place rebuild, under
    /// the data directory's lock): the batches are read from the checkpoints it starts at, and
    /// a batch whose checkpoints turn out different is refused (`CheckpointsMoved`).
    pub async fn catch_up_prefetching(
        &self,
        progress: &mut (dyn FnMut(i64, i64) + Send),
    ) -> Result<i64, ProjectionError> {
        let _running = self.running.lock().await;
        let head = self.db.head_position().await?;
        let mut checkpoints: Vec<i64> = self
            .checkpoints()
            .await?
            .into_iter()
            .map(|(_, position)| position)
            .collect();
        let start = checkpoints.iter().copied().min().unwrap_or(0);
        progress(start, head);
        let (batches, mut next) = tokio::sync::mpsc::channel::<Batch>(2);
        let db = self.db.clone();
        let projections = self.projections.clone();
        let dialect = match &self.db {
            Db::Sqlite(_) => Dialect::Sqlite,
            Db::Postgres(_) => postgres_dialect(&self.config),
        };
        let size = self.config.batch_size;
        let reader = tokio::spawn(async move {
            let mut after = start;
            while after < head {
                let events = db.events_after(after, size).await?;
                let Some(last) = events.last().map(|e| e.position) else {
                    break;
                };
                after = last;
                let batch = Batch {
                    prepared: prepare(&projections, &checkpoints, &events, dialect),
                    checkpoints: checkpoints.clone(),
                    events,
                };
                for checkpoint in &mut checkpoints {
                    *checkpoint = (*checkpoint).max(last);
                }
                if batches.send(batch).await.is_err() {
                    break;
                }
            }
            Ok::<(), ProjectionError>(())
        });
        // Which side is the bottleneck: the writer waiting for the reader, or writing.
        let (mut waiting, mut writing) = (Duration::ZERO, Duration::ZERO);
        loop {
            let started = std::time::Instant::now();
            let Some(batch) = next.recv().await else {
                break;
            };
            waiting += started.elapsed();
            let started = std::time::Instant::now();
            self.step_with(Some(batch)).await?;
            writing += started.elapsed();
            progress(self.applied(), head.max(self.applied()));
        }
        tracing::info!(
            waiting_for_reader_seconds = waiting.as_secs_f64(),
            writing_seconds = writing.as_secs_f64(),
            "catch-up: batches read ahead and written"
        );
        reader.await.map_err(|_| ProjectionError::ReaderStopped)??;
        // Whatever committed after `head`, the ordinary way.
        self.drain_reporting(head, progress).await?;
        Ok(self.applied())
    }

    /// Returns once the read models include the event at `position` (read-your-writes).
    /// Listeners have been told too: a command answered after this has evicted what it
    /// had to, even if the background loop applied its event.
    ///
    /// On PostgreSQL an event is read only once every older transaction of the database has
    /// ended (the fence, migration 0013): until then this waits, for a new commit or a
    /// short pause, at most `FENCE_WAIT`.
    pub async fn catch_up_to(&self, position: i64) -> Result<(), ProjectionError> {
        let started = std::time::Instant::now();
        let mut pause = Duration::from_micros(200);
        let mut applied = self.subscribe();
        while self.applied() < position {
            // Registered before looking, so a commit in between is not missed.
            let commit = self.commits.notified();
            tokio::pin!(commit);
            commit.as_mut().enable();
            {
                let _running = self.running.lock().await;
                // Whoever held the lock meanwhile may have applied it already (concurrent
                // commands share one catch-up instead of queueing a transaction each).
                if self.applied() < position {
                    self.drain().await?;
                }
            }
            if self.applied() >= position {
                break;
            }
            if started.elapsed() >= FENCE_WAIT {
                return Err(ProjectionError::FenceHeld {
                    position,
                    waited_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
                });
            }
            // Held below the fence by a transaction still open: try again when another
            // catch-up moves (it may have passed us), or after a pause that grows to 20 ms.
            tokio::select! {
                _ = applied.changed() => {}
                _ = &mut commit => {}
                _ = tokio::time::sleep(pause) => {}
            }
            pause = (pause * 2).min(Duration::from_millis(20));
        }
        self.tell_listeners().await
    }

    /// Applies one batch in one transaction; returns how many events it read.
    async fn step(&self) -> Result<usize, ProjectionError> {
        self.step_with(None).await
    }

    /// `step`, with the batch already read, and perhaps prepared (`catch_up_prefetching`), or not.
    async fn step_with(&self, events: Option<Batch>) -> Result<usize, ProjectionError> {
        match &self.db {
            Db::Sqlite(db) => {
                // SQLite: this process holds the only writer connection; no row lock needed.
                let mut conn = db.write.acquire().await?;
                if !self.config.async_commit {
                    let mut tx = sqlx::Connection::begin(&mut *conn).await?;
                    let (batch, reached) = sqlite_batch(self, &mut tx, events).await?;
                    tx.commit().await?;
                    return Ok(self.record(batch, reached));
                }
                // The batch without an fsync of its own (`synchronous = NORMAL`: a power cut
                // may take back the last batches, rows and checkpoint together, never a
                // command's events), then FULL again before the connection serves anyone.
                // Until then the connection is held by `Unsynced`: if this future is dropped
                // half-way (a `catch_up_to` whose request went away), the connection is
                // closed, not handed back to commit commands without an fsync.
                let mut held = Unsynced(None);
                let writer = held.0.insert(conn);
                sqlx::query("PRAGMA synchronous = NORMAL")
                    .execute(&mut **writer)
                    .await?;
                let applied = async {
                    let mut tx = sqlx::Connection::begin(&mut **writer).await?;
                    let (batch, reached) = sqlite_batch(self, &mut tx, events).await?;
                    tx.commit().await?;
                    Ok::<_, ProjectionError>((batch, reached))
                }
                .await;
                sqlx::query("PRAGMA synchronous = FULL")
                    .execute(&mut **writer)
                    .await?;
                // FULL again: the connection may go back to the pool.
                drop(held.0.take());
                let (batch, reached) = applied?;
                Ok(self.record(batch, reached))
            }
            Db::Postgres(db) => {
                // Without a flush of its own (ADR 0020), set in the same round trip as BEGIN.
                let mut tx = match self.config.async_commit {
                    true => {
                        db.pool
                            .begin_with("BEGIN; SET LOCAL synchronous_commit = off")
                            .await?
                    }
                    false => db.pool.begin().await?,
                };
                let (batch, reached) = postgres_batch(self, &mut tx, events).await?;
                tx.commit().await?;
                self.record_server_run(reached);
                Ok(self.record(batch, reached))
            }
        }
    }

    /// After a batch committed: the applied position, and the batch kept for the listeners
    /// (`tell_listeners` then need not read the same events again). Returns its size.
    fn record(&self, batch: Applied, reached: i64) -> usize {
        let count = batch.events.len();
        if count > 0 {
            if let Ok(mut recent) = self.recent.lock() {
                *recent = batch;
            }
        }
        self.applied.send_if_modified(|a| raise(a, reached));
        count
    }

    /// Catches up whenever woken: by a local commit, by a PostgreSQL notification of a commit
    /// on another instance, or by the poll interval. Ends when `shutdown` turns true.
    pub async fn run(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let mut listener = self.listen().await;
        loop {
            self.listening
                .store(listener.is_some(), std::sync::atomic::Ordering::Release);
            let failed = match self.catch_up().await {
                Ok(_) => false,
                Err(error) => {
                    tracing::error!(error = %crate::error::chain(&error), "projection catch-up failed; will retry");
                    true
                }
            };
            // Events committed but held behind the fence by an older open transaction (which
            // may never notify: it need not append events): look again soon, not at the poll.
            let fenced = match &self.db {
                Db::Postgres(_) => self
                    .db
                    .committed_head()
                    .await
                    .is_ok_and(|head| head > self.applied()),
                Db::Sqlite(_) => false,
            };
            let pause = if fenced {
                FENCE_RETRY
            } else if failed {
                ERROR_RETRY.min(self.config.poll_interval)
            } else {
                self.config.poll_interval
            };
            tokio::select! {
                _ = self.wake.notified() => {
                    // Woken by this instance's own commit: let the commits arriving with it
                    // land first, so that one batch (about ten statements) covers them all.
                    // No answer waits on this loop (commands answer from memory or catch up
                    // themselves, and so do the reads served from SQL), so the window costs
                    // no request any time; it only delays the background work.
                    if !self.config.commit_window.is_zero() {
                        tokio::time::sleep(self.config.commit_window).await;
                    }
                }
                _ = tokio::time::sleep(pause) => {
                    if listener.is_none() {
                        listener = self.listen().await;
                    }
                }
                notified = next_notification(&mut listener, self.db.instance_id()) => {
                    if !notified {
                        listener = None;
                    }
                }
                _ = shutdown.changed() => break,
            }
        }
    }

    async fn listen(&self) -> Option<PgListener> {
        let Db::Postgres(db) = &self.db else {
            return None;
        };
        let mut listener = match PgListener::connect_with(&db.pool).await {
            Ok(listener) => listener,
            Err(error) => {
                tracing::warn!(error = %error, "LISTEN unavailable; polling for other instances' events");
                return None;
            }
        };
        match listener.listen(EVENTS_CHANNEL).await {
            Ok(()) => Some(listener),
            Err(error) => {
                tracing::warn!(error = %error, "LISTEN failed; polling for other instances' events");
                None
            }
        }
    }

    /// Each projection's checkpoint, as stored.
    pub async fn checkpoints(&self) -> Result<Vec<(String, i64)>, ProjectionError> {
        let mut out = Vec::new();
        for projection in self.projections.iter() {
            let sql = "SELECT position FROM projection_checkpoints WHERE name = $1";
            let position: Option<i64> = ekm_store::with_read_pool!(&self.db, pool => {
                sqlx::query_scalar(sql).bind(projection.name()).fetch_optional(pool).await?
            });
            out.push((projection.name().to_owned(), position.unwrap_or(0)));
        }
        Ok(out)
    }
}

/// Every projection, in the order they apply each event. Without the audit key the audit
/// chain is listed but refuses to seal (enough for status and rebuild, which never apply it).
pub fn standard_projections(seal: Option<SealKey>) -> Vec<Box<dyn Projection>> {
    let chain = match seal {
        Some(key) => AuditChain::new(key),
        None => AuditChain::unkeyed(),
    };
    vec![Box::new(ScopeTree), Box::new(chain), Box::new(KeyShredder)]
}

fn raise(applied: &mut i64, reached: i64) -> bool {
    if reached > *applied {
        *applied = reached;
        true
    } else {
        false
    }
}

/// Waits for the next notification; `false` when the listener broke (or there is none,
/// in which case it never returns).
/// Waits for another instance's notification: this process's own commits are applied by
/// the commands that made them (`catch_up_to`), so its own notifications (their payload is
/// its instance id, `ekm_store::notify`) would only cost an empty catch-up.
async fn next_notification(listener: &mut Option<PgListener>, own: &str) -> bool {
    let Some(listener) = listener else {
        return std::future::pending().await;
    };
    loop {
        match listener.recv().await {
            Ok(notification) if notification.payload() == own => continue,
            Ok(_) => return true,
            Err(_) => return false,
        }
    }
}

/// The projections' names as a SQL list (they are our own constants, never input).
fn checkpoint_names(projections: &[Box<dyn Projection>]) -> String {
    projections
        .iter()
        .map(|p| format!("'{}'", p.name()))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Moves each projection's checkpoint to `$last`, inside the batch's transaction, in one
/// statement. A checkpoint only moves forward: a projection already past this batch (the
/// never-rebuilt audit seals, during a rebuild) keeps its own position.
macro_rules! move_checkpoints {
    ($projector:expr, $tx:expr, $checkpoints:expr, $last:expr) => {
        if $checkpoints.iter().any(|checkpoint| $last > *checkpoint) {
            let sql = format!(
                "UPDATE projection_checkpoints SET position = $1, updated_at = $2 \
                 WHERE name IN ({}) AND position < $1",
                checkpoint_names(&$projector.projections)
            );
            sqlx::query(&sql)
                .bind($last)
                .bind(now_micros())
                .execute(&mut **$tx)
                .await?;
        }
    };
}

/// The events one batch applied: all of those after `from`, up to its last.
#[derive(Default)]
struct Applied {
    from: i64,
    events: Vec<StoredEvent>,
}

impl Projector {
    /// The events after `from` from the last batch, if it holds all of them up to its end.
    fn recent_after(&self, from: i64) -> Option<Vec<StoredEvent>> {
        let recent = self.recent.lock().ok()?;
        let last = recent.events.last()?.position;
        (recent.from <= from && from < last).then(|| {
            recent
                .events
                .iter()
                .filter(|e| e.position > from)
                .cloned()
                .collect()
        })
    }
}

/// A batch read ahead of its transaction: the events after the checkpoints the reader
/// expects the projections to be at, and the batch's merged statements when they could be
/// prepared ahead (`prepare`).
struct Batch {
    events: Vec<StoredEvent>,
    checkpoints: Vec<i64>,
    prepared: Option<Vec<Prepared>>,
}

/// The merged statements of a batch, decided outside its transaction. Only where no
/// projection reads state for these events (state lives in the database and is loaded in the
/// transaction); `None` also when a projection fails, so that the transaction reports it.
fn prepare(
    projections: &[Box<dyn Projection>],
    checkpoints: &[i64],
    events: &[StoredEvent],
    dialect: Dialect,
) -> Option<Vec<Prepared>> {
    let needs_state = events.iter().any(|event| {
        projections
            .iter()
            .zip(checkpoints)
            .any(|(p, checkpoint)| event.position > *checkpoint && !p.state_keys(event).is_empty())
    });
    if needs_state {
        return None;
    }
    let mut states: Vec<ProjectionState> = projections.iter().map(|_| Default::default()).collect();
    let rows = statements_for(projections, checkpoints, events, &mut states).ok()?;
    // A projection that set state without declaring keys would lose it here.
    states
        .iter()
        .all(|state| state.changed.is_empty())
        .then(|| merge(rows, dialect))
}

/// Every projection's row operations for the events past its checkpoint, in history order.
fn statements_for(
    projections: &[Box<dyn Projection>],
    checkpoints: &[i64],
    events: &[StoredEvent],
    states: &mut [ProjectionState],
) -> Result<Vec<Statement>, ProjectionError> {
    let mut rows = Vec::with_capacity(events.len() * 3);
    for event in events {
        for ((projection, checkpoint), state) in
            projections.iter().zip(checkpoints).zip(states.iter_mut())
        {
            if event.position > *checkpoint {
                rows.extend(projection.statements(event, state)?);
            }
        }
    }
    Ok(rows)
}

/// The body of `step`: reads the checkpoints (locking their rows where several instances
/// may run), applies the next batch, moves the checkpoints. Written once, compiled per
/// backend, as concrete functions (generic async code trips rustc's `Send` inference
/// inside axum handlers).
macro_rules! batch_fn {
    ($name:ident, $db:ty, $lock:literal, $dialect:expr, $execute:ident) => {
        async fn $name(
            projector: &Projector,
            tx: &mut sqlx::Transaction<'_, $db>,
            prefetched: Option<Batch>,
        ) -> Result<(Applied, i64), ProjectionError> {
            // Every projection's checkpoint in one statement (locked for the batch on
            // PostgreSQL, so that instances take turns).
            let names = checkpoint_names(&projector.projections);
            // On PostgreSQL, with the server's start time (`Projector::floor`).
            let select = format!(
                "SELECT name, position, {} FROM projection_checkpoints WHERE name IN ({names}){}",
                if $lock { "pg_postmaster_start_time()::text" } else { "NULL" },
                if $lock { " FOR UPDATE" } else { "" }
            );
            let stored: Vec<(String, i64, Option<String>)> =
                sqlx::query_as(&select).fetch_all(&mut **tx).await?;
            let started = stored.first().and_then(|(_, _, started)| started.clone());
            if let Ok(mut batch) = projector.batch_server_run.lock() {
                *batch = started.clone();
            }
            let stored: Vec<(String, i64)> = stored
                .into_iter()
                .map(|(name, position, _)| (name, position))
                .collect();
            let checkpoints: Vec<i64> = projector
                .projections
                .iter()
                .map(|p| {
                    stored
                        .iter()
                        .find(|(name, _)| name == p.name())
                        .map_or(0, |(_, position)| *position)
                })
                .collect();
            // A projection that is never rebuilt (the seals, the key shredder) never moves
            // back: below what this process has applied, someone reset it, and applying
            // again would seal altered history with the real key (ADR 0018).
            let floor = projector.floor(started.as_deref());
            for (projection, checkpoint) in projector.projections.iter().zip(&checkpoints) {
                if !projection.rebuildable() && *checkpoint < floor {
                    return Err(ProjectionError::ResealRefused {
                        checkpoint: *checkpoint,
                        expected: floor,
                    });
                }
            }
            let from = checkpoints.iter().copied().min().unwrap_or(0);
            let (events, prepared) = match prefetched {
                // Read ahead from where the projections were expected to be. Anywhere else
                // (only if something else advanced them, which the callers' locks rule
                // out), the batch could skip or repeat events: refuse it.
                Some(batch) if batch.checkpoints != checkpoints => {
                    return Err(ProjectionError::CheckpointsMoved);
                }
                Some(Batch {
                    events, prepared, ..
                }) => (events, prepared),
                None => {
                    let events = projector
                        .db
                        .events_after(from, projector.config.batch_size)
                        .await?;
                    (events, None)
                }
            };
            let Some(last) = events.last().map(|e| e.position) else {
                return Ok((Applied { from, events }, from));
            };
            // Prepared ahead from the same checkpoints: nothing to load, decide or save here.
            if let Some(prepared) = prepared {
                let conn = &mut **tx;
                $execute!(conn, prepared);
                move_checkpoints!(projector, tx, checkpoints, last);
                return Ok((Applied { from, events }, last));
            }
            let mut states: Vec<ProjectionState> = Vec::with_capacity(checkpoints.len());
            for (projection, checkpoint) in projector.projections.iter().zip(&checkpoints) {
                let mut state = ProjectionState::default();
                for event in events.iter().filter(|e| e.position > *checkpoint) {
                    for key in projection.state_keys(event) {
                        if state.is_loaded(&key) || state.changed.contains(&key) {
                            continue;
                        }
                        let value: Option<String> = sqlx::query_scalar(
                            "SELECT value FROM projection_state WHERE projection = $1 AND key = $2",
                        )
                        .bind(projection.name())
                        .bind(&key)
                        .fetch_optional(&mut **tx)
                        .await?;
                        if let Some(value) = value {
                            state.values.insert(key, value);
                        }
                    }
                }
                states.push(state);
            }
            let rows = statements_for(&projector.projections, &checkpoints, &events, &mut states)?;
            let conn = &mut **tx;
            $execute!(conn, merge(rows, $dialect(&projector.config)));
            for (projection, state) in projector.projections.iter().zip(&states) {
                for key in &state.changed {
                    sqlx::query(
                        "INSERT INTO projection_state (projection, key, value) VALUES ($1, $2, $3) \
                         ON CONFLICT (projection, key) DO UPDATE SET value = excluded.value",
                    )
                    .bind(projection.name())
                    .bind(key)
                    .bind(state.get(key).unwrap_or_default())
                    .execute(&mut **tx)
                    .await?;
                }
            }
            move_checkpoints!(projector, tx, checkpoints, last);
            Ok((Applied { from, events }, last))
        }
    };
}

fn postgres_dialect(config: &ProjectorConfig) -> Dialect {
    if config.bulk_copy {
        Dialect::PostgresCopy
    } else {
        Dialect::Postgres
    }
}

// SQLite: this process holds the only writer connection, so no row lock is needed.
batch_fn!(
    sqlite_batch,
    sqlx::Sqlite,
    false,
    |_: &ProjectorConfig| Dialect::Sqlite,
    execute_prepared_sqlite
);
batch_fn!(
    postgres_batch,
    sqlx::Postgres,
    true,
    postgres_dialect,
    execute_prepared_postgres
);

#[cfg(test)]
mod tests {
    use cqrs_es::DomainEvent;
    use ekm_domain::metadata::{Actor, ActorKind, EventMetadata};
    use ekm_domain::{KeyVersion, OrgId, ScopeEvent, ScopeId, ScopeKind, ScopeName};

    use super::*;

    fn stored(position: i64, id: ScopeId, sequence: i64, event: &ScopeEvent) -> StoredEvent {
        let metadata = EventMetadata {
            actor: Actor {
                kind: ActorKind::User,
                id: "admin".into(),
            },
            request_id: "req".into(),
            reason: None,
            source_address: None,
            recorded_at: "2026-11-28T00:00:00Z".into(),
            location: None,
        };
        StoredEvent {
            position,
            recorded_at: chrono::Utc::now(),
            aggregate_type: "scope".into(),
            aggregate_id: id.to_string(),
            sequence,
            event_type: event.event_type(),
            event_version: "1".into(),
            payload: serde_json::to_string(event).unwrap(),
            metadata: serde_json::to_string(&metadata.to_map()).unwrap(),
        }
    }

    /// A team created, paused and resumed, as one batch of the log.
    fn created_paused_resumed() -> Vec<StoredEvent> {
        let org = OrgId::generate();
        let team = ScopeId::generate();
        let created = ScopeEvent::ScopeCreated {
            scope_id: team,
            kind: ScopeKind::Team,
            name: ScopeName::parse("research").unwrap(),
            parent_id: org.scope_id(),
            org_id: org,
            path: vec![org.scope_id(), team],
            key_version: KeyVersion::FIRST,
            key_fingerprint: None,
        };
        vec![
            stored(1, team, 1, &created),
            stored(2, team, 2, &ScopeEvent::ScopePaused {}),
            stored(3, team, 3, &ScopeEvent::ScopeResumed {}),
        ]
    }

    #[test]
    fn a_scope_created_and_paused_in_one_batch_is_written_by_inserts_alone() {
        // Given a batch in which a scope is created and then paused and resumed
        let events = created_paused_resumed();
        let projections: Vec<Box<dyn Projection>> = vec![Box::new(ScopeTree)];
        // When it is prepared for PostgreSQL
        let prepared = prepare(&projections, &[0], &events, Dialect::PostgresCopy).unwrap();
        // Then the state changes are folded into the inserted rows: no UPDATE of a row the
        // batch has just written (each one cost a full pass over the new rows' index pages)
        assert!(
            prepared.iter().all(|p| !p.sql.starts_with("UPDATE")),
            "{:?}",
            prepared.iter().map(|p| &p.sql).collect::<Vec<_>>()
        );
        let scope_rows = prepared
            .iter()
            .find(|p| p.sql.starts_with("COPY scope_view"))
            .and_then(|p| p.copy.clone())
            .unwrap();
        let row = String::from_utf8(scope_rows).unwrap();
        assert_eq!(row.lines().count(), 1);
        assert!(row.contains("\tScopeResumed\t3\t"), "{row}");
    }

    #[test]
    fn a_resume_time_that_cannot_be_read_is_skipped_and_the_scope_stays_paused() {
        // Given a pause whose scheduled resume carries a time that is not RFC 3339 (a row
        // written around the aggregate)
        let mut events = created_paused_resumed();
        events.truncate(2);
        let team = ScopeId::parse(&events[0].aggregate_id).unwrap();
        events.push(stored(
            3,
            team,
            3,
            &ScopeEvent::ScopeResumeScheduled {
                at: Some("tomorrow".into()),
            },
        ));
        let tree: Vec<Box<dyn Projection>> = vec![Box::new(ScopeTree)];
        // When it is prepared
        let prepared = prepare(&tree, &[0], &events, Dialect::Postgres).unwrap();
        // Then the projection goes on (it does not halt on the row), nothing is scheduled,
        // and the scope stays paused
        let sql: Vec<&str> = prepared.iter().map(|p| p.sql.as_str()).collect();
        assert!(sql.iter().all(|s| !s.contains("INTO schedule")), "{sql:?}");
        assert!(
            sql.iter().any(|s| s.starts_with("DELETE FROM schedule")),
            "{sql:?}"
        );
    }

    #[test]
    fn only_batches_past_their_checkpoint_and_free_of_state_are_prepared_ahead() {
        let events = created_paused_resumed();
        // Given the audit chain, which reads each organization's chain head from the database
        let chain: Vec<Box<dyn Projection>> = vec![Box::new(AuditChain::new(SealKey::generate()))];
        // Then its batches are not prepared ahead: that happens in their transaction
        assert!(prepare(&chain, &[0], &events, Dialect::Postgres).is_none());
        // Given the scope tree, with a checkpoint past the creation
        let tree: Vec<Box<dyn Projection>> = vec![Box::new(ScopeTree)];
        let prepared = prepare(&tree, &[1], &events, Dialect::Postgres).unwrap();
        // Then only the pause and resume are prepared: one update of the scope, and the
        // resume's removal of any scheduled resume it makes moot; no insert
        let sql: Vec<&str> = prepared.iter().map(|p| p.sql.as_str()).collect();
        assert_eq!(sql.len(), 2, "{sql:?}");
        assert!(sql[0].starts_with("UPDATE scope_view"), "{sql:?}");
        assert!(sql[1].starts_with("DELETE FROM schedule"), "{sql:?}");
        assert!(sql
            .iter()
            .all(|s| !s.starts_with("INSERT") && !s.starts_with("COPY")));
    }
}
