//! One durable commit per command (ADR 0020): a command's events and the key material it
//! made go into the database in one transaction, the events first.
//!
//! cqrs-es's event stores commit events in a transaction of their own, which left a new key
//! version (and a new scope's first wrapping key) to transactions before it: three commits
//! for one `create scope`. Here the rows are written together, and a race lost on either
//! (another command appended to the aggregate first, or a re-key destroyed the epoch the key
//! was wrapped under) rolls everything back, so the command is simply decided again.
//!
//! The events are the transaction's first write: on PostgreSQL their positions derive from
//! the transaction's id (migration 0013), which must be taken after the aggregate was loaded.
//!
//! Group commit (ADR 0024): concurrent commands share one durable commit. Each append joins
//! a queue; a flush task takes what is queued (at most one command per aggregate, bounded
//! in size) and writes it together: on PostgreSQL the events-only appends as one `INSERT`
//! (one statement, one WAL flush, for all of them), on SQLite every append inside one
//! transaction (one fsync for all of them; an append with key material in a savepoint of
//! its own). Every command
//! still gets its own answer: committed, conflict, keys raced or its error. A command is
//! answered only after the commit that holds it, so an acknowledged command is as durable
//! as before; a batch that fails as a whole is tried again command by command when nothing
//! of it can have committed, so one bad command never fails its neighbours.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use cqrs_es::DomainEvent;
use ekm_domain::ScopeEvent;

use sqlx::Row;
use tokio::sync::oneshot;

use crate::db::{Db, PostgresDb, SqliteDb};
use crate::error::StoreError;
use crate::event_log::{
    decode_event, pg_recorded_at, sqlite_recorded_at, StoredEvent, SELECT_EVENTS,
};
use crate::key_material::{KeyRow, INSERT_KEY};
use crate::time::now_micros;
use crate::wrapping_keys::{WrappingKeyRow, INSERT_WRAPPING};

/// The key material a command made, stored with its events.
#[derive(Clone, Debug, Default)]
pub struct KeyWrites {
    /// A new first epoch of the scope's wrapping key, and the platform key that wraps it
    /// (refused if that key was rotated away meanwhile).
    pub wrapping: Option<(WrappingKeyRow, Option<String>)>,
    /// A new key version, wrapped under an epoch of the scope's wrapping key.
    pub version: Option<KeyRow>,
}

/// What an append did.
#[derive(Debug, PartialEq)]
pub enum Appended {
    /// Committed: the position of each event, in order, the aggregate's new sequence, and
    /// the events as stored (the answering instance applies them to its memory at once).
    Committed {
        positions: Vec<i64>,
        last_sequence: i64,
        events: Vec<StoredEvent>,
    },
    /// Another command appended to the aggregate first: decide again on fresh state.
    Conflict,
    /// The key material could not be stored as prepared (the wrapping key's epoch was
    /// destroyed, its first epoch made by someone else, or the platform key rotated):
    /// nothing was written; prepare again.
    KeysRaced,
}

const INSERT_EVENT: &str =
    "(aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata)";

/// What SQLite's `events_no_replace` trigger answers to an insert whose key is taken.
const EVENT_EXISTS: &str = "ekm: event already exists";

/// `('scope', $1, …, $6), ('scope', $7, …)`: one row of placeholders per event.
fn values_list(events: usize) -> String {
    (0..events)
        .map(|i| {
            let b = i * 6;
            format!(
                "('scope', ${}, ${}, ${}, ${}, ${}, ${})",
                b + 1,
                b + 2,
                b + 3,
                b + 4,
                b + 5,
                b + 6
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// A key row whose parent epoch a re-key destroyed meanwhile (the foreign keys of
/// migration 0010, checked at commit on PostgreSQL).
fn is_gone_parent(error: &sqlx::Error) -> bool {
    matches!(error, sqlx::Error::Database(db) if db.is_foreign_key_violation())
}

/// What a commit that found nothing wrong before it ended as: the deferred foreign keys and
/// the unique keys are checked once more at commit (PostgreSQL).
fn committed(commit: Result<(), sqlx::Error>, appended: Appended) -> Result<Appended, StoreError> {
    match commit {
        Ok(()) => Ok(appended),
        Err(error) if is_gone_parent(&error) => Ok(Appended::KeysRaced),
        Err(error) if is_conflict(&error) => Ok(Appended::Conflict),
        Err(error) => Err(error.into()),
    }
}

fn is_conflict(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Database(db) => {
            db.is_unique_violation()
                || db.message() == EVENT_EXISTS
                || db.message().contains("UNIQUE constraint failed: events")
        }
        _ => false,
    }
}

macro_rules! append_body {
    ($tx:expr, $recorded_at:path, $aggregate_id:expr, $after:expr, $events:expr, $metadata:expr, $keys:expr) => {{
        let tx = $tx;
        let values = values_list($events.len());
        let sql = format!("INSERT INTO events {INSERT_EVENT} VALUES {values}");
        let metadata = serde_json::to_value($metadata).map_err(StoreError::Encode)?;
        let mut query = sqlx::query(&sql);
        for (i, event) in $events.iter().enumerate() {
            let sequence = $after + 1 + i64::try_from(i).unwrap_or(i64::MAX);
            query = query
                .bind($aggregate_id)
                .bind(sequence)
                .bind(event.event_type())
                .bind(event.event_version())
                .bind(serde_json::to_value(event).map_err(StoreError::Encode)?)
                .bind(metadata.clone());
        }
        match query.execute(&mut *tx).await {
            Ok(_) => {}
            Err(error) if is_conflict(&error) => return Ok(Appended::Conflict),
            Err(error) => return Err(error.into()),
        }
        if let Some((row, platform)) = &$keys.wrapping {
            let done = sqlx::query(INSERT_WRAPPING)
                .bind(&row.scope_id)
                .bind(i64::from(row.epoch))
                .bind(&row.fingerprint)
                .bind(STANDARD.encode(&row.wrapped))
                .bind(row.parent.as_ref().map(|(id, _)| id.clone()))
                .bind(row.parent.as_ref().map(|(_, e)| i64::from(*e)))
                .bind(&row.master_fingerprint)
                .bind(&row.rekey_of)
                .bind(now_micros())
                .bind(platform.as_deref().unwrap_or(""))
                .execute(&mut *tx)
                .await;
            let done = match done {
                Ok(done) => done.rows_affected(),
                Err(error) if is_gone_parent(&error) => return Ok(Appended::KeysRaced),
                Err(error) => return Err(error.into()),
            };
            if done != 1 {
                return Ok(Appended::KeysRaced);
            }
        }
        if let Some(row) = &$keys.version {
            let done = sqlx::query(INSERT_KEY)
                .bind(&row.scope_id)
                .bind(i64::from(row.version))
                .bind(&row.fingerprint)
                .bind(STANDARD.encode(&row.wrapped))
                .bind(row.parent.as_ref().map(|(id, _)| id.clone()))
                .bind(row.parent.as_ref().map(|(_, v)| i64::from(*v)))
                .bind(&row.master_fingerprint)
                .bind(now_micros())
                .bind(row.node_epoch.map(i64::from))
                .execute(&mut *tx)
                .await;
            let done = match done {
                Ok(done) => done.rows_affected(),
                Err(error) if is_gone_parent(&error) => return Ok(Appended::KeysRaced),
                Err(error) => return Err(error.into()),
            };
            if done != 1 {
                return Ok(Appended::KeysRaced);
            }
        }
        let last = $after + i64::try_from($events.len()).unwrap_or(i64::MAX);
        let sql = format!(
            "{SELECT_EVENTS} WHERE aggregate_type = 'scope' AND aggregate_id = $1 \
             AND sequence > $2 AND sequence <= $3 ORDER BY sequence"
        );
        let rows = sqlx::query(&sql)
            .bind($aggregate_id)
            .bind($after)
            .bind(last)
            .fetch_all(&mut *tx)
            .await?;
        let events = rows
            .into_iter()
            .map(|row| decode_event!(row, $recorded_at))
            .collect::<Result<Vec<StoredEvent>, StoreError>>()?;
        Ok::<_, StoreError>(Appended::Committed {
            positions: events.iter().map(|e| e.position).collect(),
            last_sequence: last,
            events,
        })
    }};
}

/// One command's append, waiting in the group queue.
struct Pending {
    aggregate_id: String,
    after: i64,
    events: Vec<ScopeEvent>,
    metadata: HashMap<String, String>,
    keys: KeyWrites,
    reply: oneshot::Sender<Result<Appended, StoreError>>,
}

/// The most commands one group commit holds.
const GROUP_COMMANDS: usize = 128;
/// The most events one group commit holds (PostgreSQL: 6 parameters each, below the
/// protocol's 65,535; and below migration 0013's 8,192 events per transaction).
const GROUP_EVENTS: usize = 2048;

/// The queue of appends waiting for a group commit, and its flush tasks.
#[derive(Debug)]
pub struct GroupCommit {
    queue: Mutex<VecDeque<Pending>>,
    /// Flush tasks running.
    flushing: AtomicUsize,
    /// How many may run at once (one on both backends: SQLite has one writer connection,
    /// and on PostgreSQL one measured best, `PG_FLUSHERS`).
    flushers: usize,
    /// Batches taken so far (`Db::group_batches`).
    batches: tokio::sync::watch::Sender<u64>,
    /// Told each time an append joins the queue (a flush gathering a batch waits on it).
    arrived: tokio::sync::Notify,
    /// Whether a flush waits for the commands of its last batch (`gather`): on SQLite,
    /// whose commit is the slow part of a command; not on PostgreSQL, where the wait cost
    /// more than the larger batches gave back (measured, BENCHMARKS.md).
    gathers: bool,
}

/// The longest a flush waits for the commands of its last batch to come back before it
/// takes what is queued (ADR 0024, "gathering").
const GATHER: std::time::Duration = std::time::Duration::from_millis(1);

/// A flush slot: claimed before its task is spawned, given back when the task ends, however
/// it ends. A task that ends by panicking hands what is still queued to a new flush, so
/// that appends queued behind its batch are written all the same.
struct Slot {
    group: Arc<GroupCommit>,
    db: Db,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.group.flushing.fetch_sub(1, Ordering::AcqRel);
        if std::thread::panicking() && !self.group.queue().is_empty() {
            self.db.start_flush(&self.group);
        }
    }
}

impl std::fmt::Debug for Pending {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pending")
            .field("aggregate_id", &self.aggregate_id)
            .field("after", &self.after)
            .field("events", &self.events.len())
            .finish()
    }
}

impl GroupCommit {
    pub(crate) fn new(flushers: usize, gathers: bool) -> Self {
        Self {
            queue: Mutex::new(VecDeque::new()),
            flushing: AtomicUsize::new(0),
            flushers: flushers.max(1),
            batches: tokio::sync::watch::Sender::new(0),
            arrived: tokio::sync::Notify::new(),
            gathers,
        }
    }

    /// Waits, at most `GATHER`, until `target` appends are queued. Without it the clients
    /// of a busy instance split into two cohorts that alternate between batches (one
    /// cohort is queued while the other's batch is in flight, and comes back after the next
    /// batch was taken), so each commit held half of them.
    async fn gather(&self, target: usize) {
        let deadline = tokio::time::Instant::now() + GATHER;
        loop {
            // Taken before looking: an append queued after the look stores a permit in it.
            let arrived = self.arrived.notified();
            if self.queue().len() >= target {
                return;
            }
            if tokio::time::timeout_at(deadline, arrived).await.is_err() {
                return;
            }
        }
    }

    fn queue(&self) -> std::sync::MutexGuard<'_, VecDeque<Pending>> {
        // A panic while the lock was held leaves the queue itself intact.
        self.queue
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Takes a flush slot if one is free.
    fn claim(&self) -> bool {
        let mut running = self.flushing.load(Ordering::Acquire);
        while running < self.flushers {
            match self.flushing.compare_exchange(
                running,
                running + 1,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return true,
                Err(now) => running = now,
            }
        }
        false
    }

    /// The next batch: queued appends in order, at most one per aggregate (a second one
    /// waits for the next batch, where it meets the first as stored), within the bounds.
    fn take(&self) -> Vec<Pending> {
        let mut queue = self.queue();
        let mut batch: Vec<Pending> = Vec::new();
        let mut seen = HashSet::new();
        let mut events = 0;
        let mut rest = VecDeque::new();
        while let Some(pending) = queue.pop_front() {
            let fits = batch.len() < GROUP_COMMANDS
                && (batch.is_empty() || events + pending.events.len() <= GROUP_EVENTS);
            if fits && !seen.contains(&pending.aggregate_id) {
                seen.insert(pending.aggregate_id.clone());
                events += pending.events.len();
                batch.push(pending);
            } else {
                rest.push_back(pending);
            }
        }
        *queue = rest;
        if !batch.is_empty() {
            self.batches.send_modify(|taken| *taken += 1);
        }
        batch
    }
}

impl Db {
    fn group(&self) -> &Arc<GroupCommit> {
        match self {
            Db::Sqlite(db) => &db.group,
            Db::Postgres(db) => &db.group,
        }
    }

    /// Queues an append and makes sure a flush task will take it.
    async fn join_group(
        &self,
        aggregate_id: &str,
        after: i64,
        events: &[ScopeEvent],
        metadata: &HashMap<String, String>,
        keys: &KeyWrites,
    ) -> Result<Appended, StoreError> {
        let (reply, answer) = oneshot::channel();
        let group = self.group().clone();
        group.queue().push_back(Pending {
            aggregate_id: aggregate_id.to_owned(),
            after,
            events: events.to_vec(),
            metadata: metadata.clone(),
            keys: keys.clone(),
            reply,
        });
        group.arrived.notify_one();
        self.start_flush(&group);
        answer.await.unwrap_or_else(|_| {
            // The flush task ended without answering (it panicked): nothing is known of
            // the append, as when a connection is lost mid-commit.
            Err(StoreError::Database(sqlx::Error::Protocol(
                "the group commit holding this append ended without an answer".into(),
            )))
        })
    }

    /// How many batches the group commit has taken so far: for tests and metrics.
    pub fn group_batches(&self) -> tokio::sync::watch::Receiver<u64> {
        self.group().batches.subscribe()
    }

    /// Starts a flush task if a slot is free. It runs on its own: a command whose client
    /// went away does not take the commit of the others (or a `BEGIN` in flight) down with it.
    fn start_flush(&self, group: &Arc<GroupCommit>) {
        if !group.claim() {
            return; // The running flush takes it (it looks again before it stops).
        }
        let slot = Slot {
            group: group.clone(),
            db: self.clone(),
        };
        let db = self.clone();
        tokio::spawn(async move { db.flush(slot).await });
    }

    /// A flush task, holding its slot: writes batches until the queue is empty.
    async fn flush(&self, slot: Slot) {
        let group = slot.group.clone();
        let mut slot = Some(slot);
        // How many appends the next batch waits for: the last batch's and those queued
        // while it was in flight, as long as they keep coming back.
        let mut target = 0;
        loop {
            if group.gathers && target > 1 {
                group.gather(target.min(GROUP_COMMANDS)).await;
            }
            let batch = group.take();
            if batch.is_empty() {
                drop(slot.take());
                // An append queued after the take saw every slot taken and left it to us.
                if group.queue().is_empty() || !group.claim() {
                    return;
                }
                slot = Some(Slot {
                    group: group.clone(),
                    db: self.clone(),
                });
                target = 0;
                continue;
            }
            let taken = batch.len();
            let committed = match self {
                Db::Postgres(db) => postgres_group(db, batch).await,
                Db::Sqlite(db) => sqlite_group(db, batch).await,
            };
            // Here, not in `append`: a command whose caller went away still committed.
            if committed {
                self.notify_committed();
            }
            target = taken + group.queue().len();
        }
    }
}

/// The stored rows of a batch, given back to the command each belongs to: exactly as many
/// as it appended, else an error (never a commit answered with rows missing).
fn committed_rows(
    pending: &Pending,
    stored: &mut HashMap<String, Vec<StoredEvent>>,
) -> Result<Appended, StoreError> {
    let mut events = stored.remove(&pending.aggregate_id).unwrap_or_default();
    if events.len() != pending.events.len() {
        return Err(StoreError::Database(sqlx::Error::Protocol(format!(
            "a group commit read back {} of the {} events of an append",
            events.len(),
            pending.events.len()
        ))));
    }
    events.sort_by_key(|e| e.sequence);
    Ok(Appended::Committed {
        positions: events.iter().map(|e| e.position).collect(),
        last_sequence: pending.after + i64::try_from(pending.events.len()).unwrap_or(i64::MAX),
        events,
    })
}

/// The same failure for each command of a batch whose statement never reached the
/// database or whose outcome is unknown (the commit may have happened): trying again would
/// answer a conflict for a command that may have committed, so each gets the error.
fn replicate(error: &sqlx::Error) -> sqlx::Error {
    match error {
        sqlx::Error::PoolTimedOut => sqlx::Error::PoolTimedOut,
        sqlx::Error::PoolClosed => sqlx::Error::PoolClosed,
        sqlx::Error::WorkerCrashed => sqlx::Error::WorkerCrashed,
        sqlx::Error::Io(io) => sqlx::Error::Io(std::io::Error::new(io.kind(), io.to_string())),
        other => sqlx::Error::Protocol(format!("group commit failed: {other}")),
    }
}

/// Gives a command its answer; tells whether it committed.
fn answer(pending: Pending, answer: Result<Appended, StoreError>) -> bool {
    let committed = matches!(answer, Ok(Appended::Committed { .. }));
    let _ = pending.reply.send(answer);
    committed
}

/// How long a statement on the autocommit connections may take before its commands are
/// answered "unreachable" (a connection whose peer vanished without a reset would otherwise
/// hold every events-only command of this instance behind it for TCP's own timeout). Its
/// outcome is unknown, as with any lost connection.
const STATEMENT_DEADLINE: std::time::Duration = std::time::Duration::from_secs(10);

async fn within_deadline<T>(
    work: impl std::future::Future<Output = Result<T, sqlx::Error>>,
) -> Result<T, sqlx::Error> {
    tokio::time::timeout(STATEMENT_DEADLINE, work)
        .await
        .unwrap_or_else(|_| {
            Err(sqlx::Error::Io(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "PostgreSQL did not answer an append in time",
            )))
        })
}

/// PostgreSQL: the batch's events in one `INSERT` on the autocommit connections. Tells
/// whether any command committed.
async fn postgres_group(db: &PostgresDb, batch: Vec<Pending>) -> bool {
    debug_assert!(
        batch
            .iter()
            .all(|p| p.keys.wrapping.is_none() && p.keys.version.is_none()),
        "appends with key material keep their own transaction on PostgreSQL"
    );
    if batch.len() == 1 {
        return postgres_one_by_one(db, batch).await;
    }
    let rows: usize = batch.iter().map(|p| p.events.len()).sum();
    let sql = format!(
        "INSERT INTO events {INSERT_EVENT} VALUES {} {RETURNING}",
        values_list(rows)
    );
    let mut query = sqlx::query(&sql);
    for pending in &batch {
        query = match bind_events(
            query,
            &pending.aggregate_id,
            pending.after,
            &pending.events,
            &pending.metadata,
        ) {
            Ok(query) => query,
            // An event that cannot be encoded fails its own command only.
            Err(_) => return postgres_one_by_one(db, batch).await,
        };
    }
    match within_deadline(query.fetch_all(db.statements())).await {
        Ok(rows) => {
            let mut stored: HashMap<String, Vec<StoredEvent>> = HashMap::new();
            let mut undecodable = None;
            for row in rows {
                match decode_pg(row) {
                    Ok(event) => stored
                        .entry(event.aggregate_id.clone())
                        .or_default()
                        .push(event),
                    Err(error) => undecodable = Some(error),
                }
            }
            for pending in batch {
                let outcome = match &undecodable {
                    // Committed, but not readable back: as the single append would answer.
                    Some(error) => Err(StoreError::Database(sqlx::Error::Protocol(format!(
                        "a committed event could not be read back: {error}"
                    )))),
                    None => committed_rows(&pending, &mut stored),
                };
                answer(pending, outcome);
            }
            true
        }
        // The statement failed in the database: nothing of it committed. Find out command
        // by command which one conflicted (or failed), and commit the others.
        Err(sqlx::Error::Database(_)) => postgres_one_by_one(db, batch).await,
        Err(error) => {
            for pending in batch {
                answer(pending, Err(StoreError::Database(replicate(&error))));
            }
            // Perhaps committed: telling the other instances costs nothing if not.
            true
        }
    }
}

async fn postgres_one_by_one(db: &PostgresDb, batch: Vec<Pending>) -> bool {
    let answers = futures_util::future::join_all(batch.iter().map(|pending| {
        postgres_events(
            db,
            &pending.aggregate_id,
            pending.after,
            &pending.events,
            &pending.metadata,
        )
    }))
    .await;
    let mut committed = false;
    for (pending, outcome) in batch.into_iter().zip(answers) {
        committed |= answer(pending, outcome);
    }
    committed
}

fn decode_pg(row: sqlx::postgres::PgRow) -> Result<StoredEvent, StoreError> {
    decode_event!(row, pg_recorded_at)
}

/// What an events-only `INSERT` returns: the rows as stored.
const RETURNING: &str = "RETURNING position, recorded_at, aggregate_type, aggregate_id, sequence, \
     event_type, event_version, CAST(payload AS TEXT) AS payload, CAST(metadata AS TEXT) AS metadata";

/// Binds one command's events (6 parameters each) to `query`, on either backend.
fn bind_events<'q, DB>(
    mut query: sqlx::query::Query<'q, DB, <DB as sqlx::Database>::Arguments<'q>>,
    aggregate_id: &str,
    after: i64,
    events: &[ScopeEvent],
    metadata: &HashMap<String, String>,
) -> Result<sqlx::query::Query<'q, DB, <DB as sqlx::Database>::Arguments<'q>>, StoreError>
where
    DB: sqlx::Database,
    String: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    i64: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    serde_json::Value: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
{
    let metadata = serde_json::to_value(metadata).map_err(StoreError::Encode)?;
    for (i, event) in events.iter().enumerate() {
        let sequence = after + 1 + i64::try_from(i).unwrap_or(i64::MAX);
        let payload = serde_json::to_value(event).map_err(StoreError::Encode)?;
        query = query
            .bind(aggregate_id.to_owned())
            .bind(sequence)
            .bind(event.event_type())
            .bind(event.event_version())
            .bind(payload)
            .bind(metadata.clone());
    }
    Ok(query)
}

/// SQLite, inside a group's transaction: the events-only appends `plain` of `batch` in one
/// `INSERT`, and what it stored read back in one `SELECT` (positions come from an `AFTER
/// INSERT` trigger, which `RETURNING` would not see; this transaction is the only writer,
/// so its rows are exactly those above the highest position before it). `None` if the
/// `INSERT` conflicted: SQLite undid the statement whole, and the appends go one by one.
async fn sqlite_insert_together(
    tx: &mut sqlx::SqliteConnection,
    batch: &[Pending],
    plain: &[usize],
) -> Result<Option<HashMap<String, Vec<StoredEvent>>>, StoreError> {
    let floor: i64 = sqlx::query_scalar("SELECT COALESCE(MAX(position), 0) FROM events")
        .fetch_one(&mut *tx)
        .await?;
    let rows: usize = plain.iter().map(|&i| batch[i].events.len()).sum();
    let sql = format!(
        "INSERT INTO events {INSERT_EVENT} VALUES {}",
        values_list(rows)
    );
    let mut query = sqlx::query(&sql);
    for &i in plain {
        let pending = &batch[i];
        query = bind_events(
            query,
            &pending.aggregate_id,
            pending.after,
            &pending.events,
            &pending.metadata,
        )?;
    }
    match query.execute(&mut *tx).await {
        Ok(_) => {}
        Err(error) if is_conflict(&error) => return Ok(None),
        Err(error) => return Err(error.into()),
    }
    let sql = format!("{SELECT_EVENTS} WHERE position > $1 ORDER BY position");
    let mut stored: HashMap<String, Vec<StoredEvent>> = HashMap::new();
    for row in sqlx::query(&sql).bind(floor).fetch_all(&mut *tx).await? {
        let event = decode_sqlite(row)?;
        stored
            .entry(event.aggregate_id.clone())
            .or_default()
            .push(event);
    }
    Ok(Some(stored))
}

fn decode_sqlite(row: sqlx::sqlite::SqliteRow) -> Result<StoredEvent, StoreError> {
    decode_event!(row, sqlite_recorded_at)
}

/// PostgreSQL, one command's events only: one statement, its own transaction, the stored
/// rows returned by it.
async fn postgres_events(
    db: &PostgresDb,
    aggregate_id: &str,
    after: i64,
    events: &[ScopeEvent],
    metadata: &HashMap<String, String>,
) -> Result<Appended, StoreError> {
    let sql = format!(
        "INSERT INTO events {INSERT_EVENT} VALUES {} {RETURNING}",
        values_list(events.len())
    );
    let query = bind_events(sqlx::query(&sql), aggregate_id, after, events, metadata)?;
    match within_deadline(query.fetch_all(db.statements())).await {
        Ok(rows) => {
            let mut stored = rows
                .into_iter()
                .map(|row| decode_event!(row, pg_recorded_at))
                .collect::<Result<Vec<StoredEvent>, StoreError>>()?;
            stored.sort_by_key(|e| e.sequence);
            Ok(Appended::Committed {
                positions: stored.iter().map(|e| e.position).collect(),
                last_sequence: after + i64::try_from(events.len()).unwrap_or(i64::MAX),
                events: stored,
            })
        }
        Err(error) if is_conflict(&error) => Ok(Appended::Conflict),
        Err(error) => Err(error.into()),
    }
}

/// SQLite: the batch in one transaction of the writer connection, each command in a
/// savepoint (a conflict or a raced key rolls back that command alone), one fsync.
async fn sqlite_group(db: &SqliteDb, batch: Vec<Pending>) -> bool {
    if batch.len() == 1 {
        return sqlite_one_by_one(db, batch).await;
    }
    let outcome = async {
        let mut tx = db.write.begin().await?;
        let mut answers: Vec<Option<Result<Appended, StoreError>>> =
            batch.iter().map(|_| None).collect();
        // The events-only appends together: one INSERT and one SELECT for all of them.
        let plain: Vec<usize> = (0..batch.len())
            .filter(|&i| batch[i].keys.wrapping.is_none() && batch[i].keys.version.is_none())
            .collect();
        if plain.len() > 1 {
            if let Some(mut stored) = sqlite_insert_together(&mut tx, &batch, &plain).await? {
                for &i in &plain {
                    // Rows missing: roll back, and go one by one.
                    answers[i] = Some(Ok(committed_rows(&batch[i], &mut stored)?));
                }
            }
        }
        for (i, pending) in batch.iter().enumerate() {
            if answers[i].is_some() {
                continue;
            }
            // Events only: one `INSERT`, which SQLite undoes whole if it fails (a conflict),
            // needs no savepoint. Key material is more statements: a savepoint around them.
            let keys = pending.keys.wrapping.is_some() || pending.keys.version.is_some();
            if keys {
                sqlx::query("SAVEPOINT ekm_append")
                    .execute(&mut *tx)
                    .await?;
            }
            let outcome = sqlite_append(&mut tx, pending).await;
            if keys {
                if !matches!(outcome, Ok(Appended::Committed { .. })) {
                    sqlx::query("ROLLBACK TO ekm_append")
                        .execute(&mut *tx)
                        .await?;
                }
                sqlx::query("RELEASE ekm_append").execute(&mut *tx).await?;
            } else if outcome.is_err() {
                // Its events may be in the transaction with no answer to give: the batch
                // is rolled back and every command tried on its own.
                return Err(StoreError::Database(sqlx::Error::Protocol(
                    "an append failed inside a group".into(),
                )));
            }
            answers[i] = Some(outcome);
        }
        tx.commit().await?;
        Ok::<_, StoreError>(answers)
    }
    .await;
    match outcome {
        Ok(answers) => {
            let mut committed = false;
            for (pending, outcome) in batch.into_iter().zip(answers) {
                // Every slot was filled above; an empty one would be a bug, answered as a
                // failure rather than a commit.
                let outcome = outcome.unwrap_or_else(|| {
                    Err(StoreError::Database(sqlx::Error::Protocol(
                        "a group append was left without an outcome".into(),
                    )))
                });
                committed |= answer(pending, outcome);
            }
            committed
        }
        // The transaction did not commit (SQLite rolls it back): nothing of the batch is
        // stored. Each command is tried on its own, and answers its own outcome.
        Err(_) => sqlite_one_by_one(db, batch).await,
    }
}

async fn sqlite_one_by_one(db: &SqliteDb, batch: Vec<Pending>) -> bool {
    let mut committed = false;
    for pending in batch {
        let outcome = sqlite_single(db, &pending).await;
        committed |= answer(pending, outcome);
    }
    committed
}

/// SQLite: one command's events and key material, inside the caller's transaction.
async fn sqlite_append(
    tx: &mut sqlx::SqliteConnection,
    pending: &Pending,
) -> Result<Appended, StoreError> {
    append_body!(
        &mut *tx,
        sqlite_recorded_at,
        &pending.aggregate_id,
        pending.after,
        &pending.events,
        &pending.metadata,
        &pending.keys
    )
}

/// SQLite, one command in a transaction of its own.
async fn sqlite_single(db: &SqliteDb, pending: &Pending) -> Result<Appended, StoreError> {
    let mut tx = db.write.begin().await?;
    let appended = sqlite_append(&mut tx, pending).await?;
    match appended {
        Appended::Committed { .. } => committed(tx.commit().await, appended),
        other => Ok(other),
    }
}

/// PostgreSQL, a command that made key material: its events and keys in one transaction.
async fn postgres_with_keys(
    db: &PostgresDb,
    aggregate_id: &str,
    after: i64,
    events: &[ScopeEvent],
    metadata: &HashMap<String, String>,
    keys: &KeyWrites,
) -> Result<Appended, StoreError> {
    let mut tx = db.pool.begin().await?;
    let appended = async {
        append_body!(
            &mut *tx,
            pg_recorded_at,
            aggregate_id,
            after,
            events,
            metadata,
            keys
        )
    }
    .await?;
    match appended {
        Appended::Committed { .. } => committed(tx.commit().await, appended),
        other => Ok(other),
    }
}

impl Db {
    /// Appends `events` to the scope `aggregate_id` after sequence `after` (what the
    /// deciding aggregate was loaded at), with the key material they refer to, in one
    /// transaction, which it may share with concurrent appends (group commit). Nothing of
    /// it is written unless all of it is.
    pub async fn append(
        &self,
        aggregate_id: &str,
        after: i64,
        events: &[ScopeEvent],
        metadata: &HashMap<String, String>,
        keys: &KeyWrites,
    ) -> Result<Appended, StoreError> {
        if events.is_empty() {
            return Ok(Appended::Committed {
                positions: vec![],
                last_sequence: after,
                events: vec![],
            });
        }
        match self {
            Db::Postgres(db) if keys.wrapping.is_some() || keys.version.is_some() => {
                let appended =
                    postgres_with_keys(db, aggregate_id, after, events, metadata, keys).await?;
                if matches!(appended, Appended::Committed { .. }) {
                    self.notify_committed();
                }
                Ok(appended)
            }
            // The flush notifies other instances of what it committed.
            _ => {
                self.join_group(aggregate_id, after, events, metadata, keys)
                    .await
            }
        }
    }
}
