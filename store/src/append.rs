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

use std::collections::HashMap;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use cqrs_es::DomainEvent;
use ekm_domain::ScopeEvent;

use sqlx::Row;

use crate::db::Db;
use crate::error::StoreError;
use crate::event_log::{
    decode_event, pg_recorded_at, sqlite_recorded_at, StoredEvent, SELECT_EVENTS,
};
use crate::key_material::{KeyRow, INSERT_KEY};
use crate::time::now_micros;
use crate::wrapping_keys::{WrappingKeyRow, INSERT_WRAPPING};

/// The key material a command made, stored with its events.
#[derive(Debug, Default)]
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

impl Db {
    /// Appends `events` to the scope `aggregate_id` after sequence `after` (what the
    /// deciding aggregate was loaded at), with the key material they refer to, in one
    /// transaction. Nothing is written unless all of it is.
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
        let appended = match self {
            // Events only (pause, resume, grants, …): one statement, its own transaction, the
            // stored rows returned by it. One round trip instead of four.
            Db::Postgres(db) if keys.wrapping.is_none() && keys.version.is_none() => {
                let values = values_list(events.len());
                let sql = format!(
                    "INSERT INTO events {INSERT_EVENT} VALUES {values} RETURNING position, \
                     recorded_at, aggregate_type, aggregate_id, sequence, event_type, event_version, \
                     CAST(payload AS TEXT) AS payload, CAST(metadata AS TEXT) AS metadata"
                );
                let metadata = serde_json::to_value(metadata).map_err(StoreError::Encode)?;
                let mut query = sqlx::query(&sql);
                for (i, event) in events.iter().enumerate() {
                    let sequence = after + 1 + i64::try_from(i).unwrap_or(i64::MAX);
                    query = query
                        .bind(aggregate_id)
                        .bind(sequence)
                        .bind(event.event_type())
                        .bind(event.event_version())
                        .bind(serde_json::to_value(event).map_err(StoreError::Encode)?)
                        .bind(metadata.clone());
                }
                match query.fetch_all(&db.pool).await {
                    Ok(rows) => {
                        let mut stored = rows
                            .into_iter()
                            .map(|row| decode_event!(row, pg_recorded_at))
                            .collect::<Result<Vec<StoredEvent>, StoreError>>()?;
                        stored.sort_by_key(|e| e.sequence);
                        Appended::Committed {
                            positions: stored.iter().map(|e| e.position).collect(),
                            last_sequence: after + i64::try_from(events.len()).unwrap_or(i64::MAX),
                            events: stored,
                        }
                    }
                    Err(error) if is_conflict(&error) => Appended::Conflict,
                    Err(error) => return Err(error.into()),
                }
            }
            Db::Sqlite(db) => {
                let mut tx = db.write.begin().await?;
                let appended = async {
                    append_body!(
                        &mut *tx,
                        sqlite_recorded_at,
                        aggregate_id,
                        after,
                        events,
                        metadata,
                        keys
                    )
                }
                .await?;
                match appended {
                    Appended::Committed { .. } => committed(tx.commit().await, appended)?,
                    other => other,
                }
            }
            Db::Postgres(db) => {
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
                    Appended::Committed { .. } => committed(tx.commit().await, appended)?,
                    other => other,
                }
            }
        };
        if matches!(appended, Appended::Committed { .. }) {
            self.notify_committed();
        }
        Ok(appended)
    }
}
