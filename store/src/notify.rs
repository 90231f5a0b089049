//! Telling other instances that events committed, without serialising commits.
//!
//! PostgreSQL takes a global lock on its notification queue while a transaction that called
//! `NOTIFY` commits, so a notification inside every append transaction serialises commits
//! again (../shared/NOTES.md). Instead the committing instance sends one `pg_notify` from a
//! statement of its own after the commit, coalesced: at most one is in flight per instance,
//! and commits that land meanwhile are covered by one more. Other instances' runners wake on
//! it; polling remains the fallback.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use sqlx::PgPool;

use crate::event_log::EVENTS_CHANNEL;

#[derive(Debug)]
pub struct Notifier {
    /// A notification is owed (set by a commit, cleared by the sender before it sends).
    pending: AtomicBool,
    /// Sent as the payload, so that this instance's runner can pass over its own.
    instance: String,
}

impl Default for Notifier {
    fn default() -> Self {
        Self {
            pending: AtomicBool::new(false),
            instance: uuid::Uuid::now_v7().simple().to_string(),
        }
    }
}

impl Notifier {
    pub fn instance(&self) -> &str {
        &self.instance
    }

    /// Owes other instances a notification; sends it from a task unless one is on its way.
    pub fn committed(self: &Arc<Self>, pool: &PgPool) {
        if self.pending.swap(true, Ordering::AcqRel) {
            return; // The task in flight sends again before it stops.
        }
        let this = self.clone();
        let pool = pool.clone();
        tokio::spawn(async move {
            // Each round covers every commit made before its flag was cleared.
            while this.pending.swap(false, Ordering::AcqRel) {
                if let Err(error) = sqlx::query("SELECT pg_notify($1, $2)")
                    .bind(EVENTS_CHANNEL)
                    .bind(&this.instance)
                    .execute(&pool)
                    .await
                {
                    // Other instances fall back to polling; nothing is lost.
                    tracing::warn!(error = %error, "could not notify other instances of a commit");
                }
            }
        });
    }
}
