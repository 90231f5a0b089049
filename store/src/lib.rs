//! EKM's storage: the database (embedded SQLite or PostgreSQL), its migrations, the event
//! log with its commit-ordered global position, and bearer tokens.
//!
//! Architecture invariant: this is the only crate besides `projections` that writes SQL,
//! and the only one that knows how a backend assigns positions. Everything above it sees
//! events as `StoredEvent`s in one global order.

pub mod access_log;
mod append;
mod db;
mod error;
mod event_log;
pub mod failover;
pub mod idempotency;
mod key_material;
mod notify;
pub mod private_files;
pub mod time;
mod tokens;
mod wrapping_keys;

pub use access_log::{
    AccessCount, AccessEntry, AccessFilter, AccessLog, AccessLogMode, AccessRecord, VersionUsage,
};
pub use append::{Appended, KeyWrites};
pub use db::{pg_pool_options, Db, DbConfig, PostgresDb, SqliteDb};
pub use error::StoreError;
pub use event_log::{ScopeStore, StoredEvent, EVENTS_CHANNEL};
pub use key_material::{KeyCheck, KeyRow, MasterKeyCheck};
pub use tokens::{
    hash as token_hash, NewToken, Principal, Role, RotatedOperatorToken, TokenInfo, Tokens,
    OPERATOR_TOKEN_FILE,
};
pub use wrapping_keys::{MasterWrappedKind, OrgKeysLock, PlatformKeyRow, Wrapped, WrappingKeyRow};
