//! Read models and the projection runner.
//!
//! The runner tails the event log in global position order and applies each event to the
//! read models, writing the rows and the projection's checkpoint in one transaction: after a
//! crash it resumes exactly where the last commit left it, never losing or repeating an
//! event. Several instances may run it against one PostgreSQL database: the checkpoint row
//! is locked for the duration of a batch, so each event is applied once.
//!
//! Architecture invariant: read models are written only here, and only from events. Any of
//! them can be dropped and rebuilt from the log.

mod access_at;
mod access_check;
mod audit;
mod compare;
mod error;
mod history;
mod memory;
mod queries;
mod rebuild;
mod runner;
mod scope_tree;
mod sql;

pub use access_at::{access_as_of, PastAccess, PastHolder, PastToken};
pub use access_check::Mismatch;
pub use audit::{
    audit_entries, audit_pages, check_seal_key, refuse_resealing, register_seal_key,
    register_signing_key, rotate_signing_key, seal_entry, sealed_through, signing_keys,
    verify_chain, AuditChain, AuditEntry, AuditFilter, AuditPages, ChainFailure, ChainReport,
    RecordedHead, SigningKeyRecord, GENESIS_HASH,
};
pub use compare::{read_model_rows, read_model_tables, row_differences, table_columns, table_rows};
pub use error::{chain as error_chain, ProjectionError};
pub use history::{scope_as_of, AsOf, PastKeyVersion, PastScope};
pub use memory::{Applied, GrantRecord, MemoryLoad, MemoryTree, RotationDue, ROTATION};
pub use queries::{
    BlastRadius, Cause, Destruction, KeyVersionRecord, Page, ReadModels, ScheduledAction,
    ScopeRecord, ScopeSnapshot, StateChange,
};
pub use rebuild::{rebuild, status, ProjectionStatus, RebuildReport};
pub use runner::{
    standard_projections, EventListener, Projection, ProjectionState, Projector, ProjectorConfig,
};
pub use scope_tree::ScopeTree;
pub use sql::{merge, Dialect, Param, Prepared, Statement};
