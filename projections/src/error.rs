//! Errors of the read side.

use ekm_store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum ProjectionError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("database error")]
    Database(#[from] sqlx::Error),
    #[error("array parameters are for PostgreSQL only")]
    ArraysOnSqlite,
    #[error("another rebuild is running on this database; wait for it to finish")]
    RebuildRunning,
    #[error("the task reading ahead stopped unexpectedly")]
    ReaderStopped,
    #[error("the projection checkpoints moved while a catch-up read ahead of them")]
    CheckpointsMoved,
    #[error(
        "this database's audit seals are made with the audit key {recorded}, not with {given}: \
         give every instance and auditor the same audit.key"
    )]
    WrongSealKey { recorded: String, given: String },
    #[error(
        "this database's exports are signed with the audit signing key {recorded}, not with {given}: \
         give every instance the same audit-signing.key"
    )]
    WrongSigningKey { recorded: String, given: String },
    #[error("the audit chain cannot be sealed without the audit key")]
    NoSealKey,
    #[error(
        "the audit chain's checkpoint is at position {checkpoint} although history up to position {expected} was sealed or exists: \
         its seals were reset, and sealing again would launder any change made meanwhile. \
         Run `ekm audit verify` with the auditor's head file; only for history written outside EKM \
         (a seeded database, or an upgrade from unkeyed seals) start once with --seal-existing-history"
    )]
    ResealRefused { checkpoint: i64, expected: i64 },
    #[error(
        "the read models did not reach position {position} within {waited_ms} ms: an older \
         transaction of this database is still open (PostgreSQL's fence, migration 0013)"
    )]
    FenceHeld { position: i64, waited_ms: u64 },
    #[error("read model row for scope {id} is malformed: {problem}")]
    MalformedRow { id: String, problem: String },
}

/// An error and its sources, one line, for logs.
pub fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
