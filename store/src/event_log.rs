//! The event log: loading aggregates through cqrs-es (appending is `Db::append`), and reading every
//! aggregate's events in one global, commit-ordered sequence of positions.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use cqrs_es::persist::{EventStoreAggregateContext, PersistedEventStore, SerializedEvent};
use cqrs_es::{AggregateError, EventStore};
use ekm_domain::metadata::EventMetadata;
use ekm_domain::upcast::upcasters;
use ekm_domain::{Scope, ScopeError, ScopeEvent};
use postgres_es::PostgresEventRepository;
use sqlite_es::SqliteEventRepository;
use sqlx::Row;

use crate::db::Db;
use crate::error::StoreError;
use crate::with_read_pool;

/// The PostgreSQL channel notified when events commit.
pub const EVENTS_CHANNEL: &str = "ekm_events";

/// The scope aggregate's event store. The plain event store (no snapshots: cqrs-es 0.5.0's
/// snapshot stores apply new events twice, see ../shared/NOTES.md).
pub enum ScopeStore {
    Sqlite(PersistedEventStore<SqliteEventRepository, Scope>),
    Postgres(PersistedEventStore<PostgresEventRepository, Scope>),
}

pub type ScopeContext = EventStoreAggregateContext<Scope>;
type BoxFuture<'a, T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;
type ScopeResult<T> = Result<T, AggregateError<ScopeError>>;

impl ScopeStore {
    pub fn new(db: &Db) -> Self {
        match db {
            Db::Sqlite(db) => ScopeStore::Sqlite(
                PersistedEventStore::new_event_store(SqliteEventRepository::new(db.write.clone()))
                    .with_upcasters(upcasters()),
            ),
            Db::Postgres(db) => ScopeStore::Postgres(
                PersistedEventStore::new_event_store(PostgresEventRepository::new(db.pool.clone()))
                    .with_upcasters(upcasters()),
            ),
        }
    }

    // The futures are boxed as `dyn Future + Send`: cqrs-es's trait methods return
    // `impl Future + Send`, which rustc cannot always prove `Send` for higher-ranked
    // lifetimes once they sit inside an axum handler.
    pub fn load<'a>(&'a self, id: &'a str) -> BoxFuture<'a, ScopeResult<ScopeContext>> {
        match self {
            ScopeStore::Sqlite(store) => Box::pin(store.load_aggregate(id)),
            ScopeStore::Postgres(store) => Box::pin(store.load_aggregate(id)),
        }
    }
}

/// One event as stored, with its global position and the time the database recorded it.
///
/// Payload and metadata are kept as the JSON text the database returned and decoded only by
/// whoever needs them (`scope_event`, `payload_value`, `event_metadata`): a rebuild reads a
/// million events and decodes each payload once, straight into its event type, instead of
/// building a generic JSON tree and a metadata map first (BENCHMARKS.md).
#[derive(Clone, Debug, PartialEq)]
pub struct StoredEvent {
    pub position: i64,
    pub recorded_at: DateTime<Utc>,
    pub aggregate_type: String,
    pub aggregate_id: String,
    pub sequence: i64,
    pub event_type: String,
    pub event_version: String,
    /// The payload as stored: JSON text.
    pub payload: String,
    /// The metadata as stored: JSON text, an object of strings.
    pub metadata: String,
}

impl StoredEvent {
    /// The stored payload as the current event type, after upcasting older versions.
    pub fn scope_event(&self) -> Result<ScopeEvent, StoreError> {
        if !ekm_domain::upcast::needs_upcast(&self.event_type, &self.event_version) {
            // The current shape: decoded straight from the text.
            return self.corrupt_if(serde_json::from_str(&self.payload));
        }
        let serialized = SerializedEvent::new(
            self.aggregate_id.clone(),
            usize::try_from(self.sequence).unwrap_or_default(),
            self.aggregate_type.clone(),
            self.event_type.clone(),
            self.event_version.clone(),
            self.payload_value()?,
            serde_json::Value::Null,
        );
        let upcast = ekm_domain::upcast::upcast(serialized);
        self.corrupt_if(serde_json::from_value(upcast.payload))
    }

    /// The stored payload as a JSON value (as stored, not upcast).
    pub fn payload_value(&self) -> Result<serde_json::Value, StoreError> {
        self.corrupt_if(serde_json::from_str(&self.payload))
    }

    /// The stored metadata as its map of strings.
    pub fn metadata_map(&self) -> Result<HashMap<String, String>, StoreError> {
        self.corrupt_if(serde_json::from_str(&self.metadata))
    }

    /// Who recorded the event, why, from where.
    pub fn event_metadata(&self) -> Result<EventMetadata, StoreError> {
        self.corrupt_if(EventMetadata::from_json(&self.metadata))
    }

    fn corrupt_if<T>(&self, decoded: Result<T, serde_json::Error>) -> Result<T, StoreError> {
        decoded.map_err(|source| StoreError::CorruptEvent {
            position: self.position,
            source,
        })
    }
}

pub(crate) const SELECT_EVENTS: &str = "SELECT position, recorded_at, aggregate_type, aggregate_id, sequence, \
    event_type, event_version, CAST(payload AS TEXT) AS payload, CAST(metadata AS TEXT) AS metadata \
    FROM events";

macro_rules! decode_event {
    ($row:expr, $recorded_at:expr) => {{
        let row = $row;
        Ok::<_, StoreError>(StoredEvent {
            position: row.try_get("position")?,
            recorded_at: $recorded_at(&row)?,
            aggregate_type: row.try_get("aggregate_type")?,
            aggregate_id: row.try_get("aggregate_id")?,
            sequence: row.try_get("sequence")?,
            event_type: row.try_get("event_type")?,
            event_version: row.try_get("event_version")?,
            payload: row.try_get("payload")?,
            metadata: row.try_get("metadata")?,
        })
    }};
}
pub(crate) use decode_event;

pub(crate) fn sqlite_recorded_at(
    row: &sqlx::sqlite::SqliteRow,
) -> Result<DateTime<Utc>, StoreError> {
    let text: String = row.try_get("recorded_at")?;
    Ok(crate::time::from_sqlite_event_time(&text))
}

pub(crate) fn pg_recorded_at(row: &sqlx::postgres::PgRow) -> Result<DateTime<Utc>, StoreError> {
    Ok(row.try_get("recorded_at")?)
}

impl Db {
    /// The condition that keeps a reader below the fence: on PostgreSQL, positions of
    /// transactions that may still commit are never passed (migration 0013); on SQLite, the
    /// single writer makes every visible event final.
    fn fence(&self) -> &'static str {
        match self {
            Db::Sqlite(_) => "",
            Db::Postgres(_) => " AND position < (SELECT ekm_events_fence())",
        }
    }

    /// Up to `limit` events with a position greater than `after`, in position order.
    ///
    /// On both backends a reader sees positions in increasing order (on PostgreSQL only up
    /// to the fence, see migration 0013), so a reader that remembers the last position it
    /// saw never skips an event.
    pub async fn events_after(
        &self,
        after: i64,
        limit: i64,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        let sql = format!(
            "{SELECT_EVENTS} WHERE position > $1{} ORDER BY position LIMIT $2",
            self.fence()
        );
        self.read_events(&sql, &[after, limit]).await
    }

    /// Up to `limit` events with a position in `(after, through]`, in position order,
    /// without the fence: for a caller that knows every event up to `through` is final (a
    /// projection checkpoint reached it, and a runner passes only positions below the fence
    /// it saw). The fence itself may stand lower for a moment (migration 0013 counts a
    /// transaction it cannot place as this database's), so a fenced read could return less.
    pub async fn events_through(
        &self,
        after: i64,
        through: i64,
        limit: i64,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        let sql = format!(
            "{SELECT_EVENTS} WHERE position > $1 AND position <= $3 ORDER BY position LIMIT $2"
        );
        self.read_events(&sql, &[after, limit, through]).await
    }

    /// The events of one aggregate after `sequence`, in order. On SQLite from the reader
    /// pool (WAL: every transaction committed before the read began is visible), so that
    /// loading an aggregate does not queue behind the one writer.
    pub async fn events_of_after(
        &self,
        aggregate_id: &str,
        sequence: i64,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        let sql = format!(
            "{SELECT_EVENTS} WHERE aggregate_type = 'scope' AND aggregate_id = $1 AND sequence > $2 \
             ORDER BY sequence"
        );
        match self {
            Db::Sqlite(db) => {
                let rows = sqlx::query(&sql)
                    .bind(aggregate_id)
                    .bind(sequence)
                    .fetch_all(&db.read)
                    .await?;
                rows.into_iter()
                    .map(|r| decode_event!(r, sqlite_recorded_at))
                    .collect()
            }
            Db::Postgres(db) => {
                let rows = sqlx::query(&sql)
                    .bind(aggregate_id)
                    .bind(sequence)
                    .fetch_all(&db.pool)
                    .await?;
                rows.into_iter()
                    .map(|r| decode_event!(r, pg_recorded_at))
                    .collect()
            }
        }
    }

    /// The events of one aggregate, in order.
    pub async fn events_of(&self, aggregate_id: &str) -> Result<Vec<StoredEvent>, StoreError> {
        self.events_of_after(aggregate_id, -1).await
    }

    /// Runs `sql` with `binds` as its `$1…$n`.
    async fn read_events(&self, sql: &str, binds: &[i64]) -> Result<Vec<StoredEvent>, StoreError> {
        // SQLite's readers see every committed transaction (WAL), and stay usable while the
        // projection runner holds the single writer connection.
        match self {
            Db::Sqlite(db) => {
                let mut query = sqlx::query(sql);
                for bind in binds {
                    query = query.bind(*bind);
                }
                let rows = query.fetch_all(&db.read).await?;
                rows.into_iter()
                    .map(|r| decode_event!(r, sqlite_recorded_at))
                    .collect()
            }
            Db::Postgres(db) => {
                let mut query = sqlx::query(sql);
                for bind in binds {
                    query = query.bind(*bind);
                }
                let rows = query.fetch_all(&db.pool).await?;
                rows.into_iter()
                    .map(|r| decode_event!(r, pg_recorded_at))
                    .collect()
            }
        }
    }

    /// The events at these positions (those that exist), in position order.
    pub async fn events_at(&self, positions: &[i64]) -> Result<Vec<StoredEvent>, StoreError> {
        if positions.is_empty() {
            return Ok(vec![]);
        }
        let list = (1..=positions.len())
            .map(|i| format!("${i}"))
            .collect::<Vec<_>>()
            .join(", ");
        let sql = format!("{SELECT_EVENTS} WHERE position IN ({list}) ORDER BY position");
        match self {
            Db::Sqlite(db) => {
                let mut query = sqlx::query(&sql);
                for p in positions {
                    query = query.bind(*p);
                }
                let rows = query.fetch_all(&db.read).await?;
                rows.into_iter()
                    .map(|r| decode_event!(r, sqlite_recorded_at))
                    .collect()
            }
            Db::Postgres(db) => {
                let mut query = sqlx::query(&sql);
                for p in positions {
                    query = query.bind(*p);
                }
                let rows = query.fetch_all(&db.pool).await?;
                rows.into_iter()
                    .map(|r| decode_event!(r, pg_recorded_at))
                    .collect()
            }
        }
    }

    /// Scope events up to `position` that have no seal in the audit chain and may belong to
    /// `org` (they name it, or their audit columns could not say whose they are).
    pub async fn unsealed_events_up_to(
        &self,
        position: i64,
        org: &str,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        let sql = format!(
            "{SELECT_EVENTS} WHERE aggregate_type = 'scope' AND position <= $1 \
             AND (audit_org = $2 OR audit_org IS NULL OR audit_org = '') \
             AND NOT EXISTS (SELECT 1 FROM audit_chain c WHERE c.position = events.position) \
             ORDER BY position LIMIT 100"
        );
        match self {
            Db::Sqlite(db) => {
                let rows = sqlx::query(&sql)
                    .bind(position)
                    .bind(org)
                    .fetch_all(&db.read)
                    .await?;
                rows.into_iter()
                    .map(|r| decode_event!(r, sqlite_recorded_at))
                    .collect()
            }
            Db::Postgres(db) => {
                let rows = sqlx::query(&sql)
                    .bind(position)
                    .bind(org)
                    .fetch_all(&db.pool)
                    .await?;
                rows.into_iter()
                    .map(|r| decode_event!(r, pg_recorded_at))
                    .collect()
            }
        }
    }

    /// Up to where the projection runner has sealed every scope event: the checkpoint of the
    /// audit chain, or of the key shredder if that is further (they move together; a chain
    /// checkpoint behind it was reset). 0 before the first catch-up.
    pub async fn sealed_through(&self) -> Result<i64, StoreError> {
        let position: i64 = with_read_pool!(self, pool => {
            sqlx::query_scalar(
                "SELECT COALESCE(MAX(position), 0) FROM projection_checkpoints \
                 WHERE name IN ('audit_chain', 'key_shredder')",
            )
            .fetch_one(pool)
            .await?
        });
        Ok(position)
    }

    /// The organizations named by stored events (the generated `audit_org` column).
    pub async fn event_orgs(&self) -> Result<Vec<String>, StoreError> {
        let orgs: Vec<String> = with_read_pool!(self, pool => {
            sqlx::query_scalar(
                "SELECT DISTINCT audit_org FROM events \
                 WHERE audit_org IS NOT NULL AND audit_org <> '' ORDER BY audit_org",
            )
            .fetch_all(pool)
            .await?
        });
        Ok(orgs)
    }

    /// The highest position recorded at or before `at` (0 if none).
    ///
    /// SQLite records milliseconds, so there an instant is compared at millisecond precision.
    pub async fn position_at(&self, at: DateTime<Utc>) -> Result<i64, StoreError> {
        let sql = "SELECT COALESCE(MAX(position), 0) FROM events WHERE recorded_at <= $1";
        let position: i64 = match self {
            Db::Sqlite(db) => {
                let text = crate::time::to_sqlite_event_time(at);
                sqlx::query_scalar(sql)
                    .bind(text)
                    .fetch_one(&db.read)
                    .await?
            }
            Db::Postgres(db) => sqlx::query_scalar(sql).bind(at).fetch_one(&db.pool).await?,
        };
        Ok(position)
    }

    /// The organizations that have sealed audit entries.
    pub async fn chained_orgs(&self) -> Result<Vec<String>, StoreError> {
        let orgs: Vec<String> = with_read_pool!(self, pool => {
            sqlx::query_scalar("SELECT DISTINCT org_id FROM audit_chain ORDER BY org_id")
                .fetch_all(pool)
                .await?
        });
        Ok(orgs)
    }

    /// The highest position a reader may pass now (0 when the log is empty): the last
    /// committed event, on PostgreSQL the last below the fence.
    pub async fn head_position(&self) -> Result<i64, StoreError> {
        let sql = format!(
            "SELECT COALESCE(MAX(position), 0) AS head FROM events WHERE TRUE{}",
            self.fence()
        );
        let sql = sql.as_str();
        let head: i64 = crate::with_write_pool!(self, pool => {
            sqlx::query_scalar(sql).fetch_one(pool).await?
        });
        Ok(head)
    }

    /// The highest position committed so far, fence or not (0 when the log is empty): above
    /// `head_position` while an older transaction holds the fence on PostgreSQL.
    pub async fn committed_head(&self) -> Result<i64, StoreError> {
        let sql = "SELECT COALESCE(MAX(position), 0) AS head FROM events";
        let head: i64 = crate::with_write_pool!(self, pool => {
            sqlx::query_scalar(sql).fetch_one(pool).await?
        });
        Ok(head)
    }

    /// The position of one committed event.
    pub async fn position_of(
        &self,
        aggregate_id: &str,
        sequence: i64,
    ) -> Result<Option<i64>, StoreError> {
        let sql = "SELECT position FROM events WHERE aggregate_type = 'scope' AND aggregate_id = $1 AND sequence = $2";
        let position: Option<i64> = crate::with_write_pool!(self, pool => {
            sqlx::query_scalar(sql).bind(aggregate_id).bind(sequence).fetch_optional(pool).await?
        });
        Ok(position)
    }

    /// How many events are stored.
    pub async fn event_count(&self) -> Result<i64, StoreError> {
        let count: i64 = with_read_pool!(self, pool => {
            sqlx::query_scalar("SELECT COUNT(*) FROM events").fetch_one(pool).await?
        });
        Ok(count)
    }
}
