//! Storage errors. Their messages never contain SQL parameters or secrets.

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot connect to the database")]
    Connect(#[source] sqlx::Error),
    #[error("database error")]
    Database(#[from] sqlx::Error),
    #[error("database migration failed")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("{count} database migration(s) are pending, from version {first}: run `ekm migrate` as the database owner first")]
    MigrationsPending { first: i64, count: usize },
    #[error("applied migration {version} is not the one in this binary (changed, unknown to it, or failed half-way)")]
    MigrationDiffers { version: i64 },
    #[error("stored event at position {position} cannot be read")]
    CorruptEvent {
        position: i64,
        #[source]
        source: serde_json::Error,
    },
    #[error("an event could not be encoded")]
    Encode(#[source] serde_json::Error),
    #[error("cannot use the data directory {path}")]
    DataDir {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("a stored key of scope {scope_id} is malformed")]
    MalformedKey { scope_id: String },
    #[error("the SQLite write-ahead log could not be emptied: a reader kept it busy")]
    WalBusy,
    #[error(
        "a long transaction still sees destroyed keys; their bytes leave the files once it ends"
    )]
    SnapshotsHeld,
    #[error(
        "the database's platform master key is not the one being rotated (another rotation ran?)"
    )]
    MasterKeyChanged,
    #[error("another operator token was created at the same time; run the rotation again")]
    OperatorTokenRace,
}
