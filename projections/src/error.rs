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
