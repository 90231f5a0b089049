//! Telling other instances that events committed, without serialising commits.
//!
//! PostgreSQL takes a global lock on its notification queue while a transaction that called
//! `NOTIFY` commits, so a notification inside every append transaction serialises commits
//! again (../shared/NOTES.md). Instead the committing instance sends `pg_notify` from a
//! statement of its own after the commit, throttled: the first commit after a quiet spell is
//! told at once; commits that land within `GAP` of a notification are told together by one
//! more when the gap ends. Under load that is at most one notification per `GAP` per
//! instance instead of one per command (each is a statement in PostgreSQL); another
//! instance hears of a commit at most `GAP` plus a round trip later. Other instances'
//! runners wake on it; polling remains the fallback.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use sqlx::PgPool;

use crate::event_log::EVENTS_CHANNEL;

/// The least time between two notifications of one instance.
pub const GAP: Duration = Duration::from_millis(5);

#[derive(Debug)]
pub struct Notifier {
    /// A notification is owed (set by a commit, cleared by the sender before it sends).
    owed: AtomicBool,
    /// The sending task is running (at most one per instance).
    ///
    /// Both flags are read and written `SeqCst`: a commit stores `owed` then reads `running`,
    /// the task stores `running` then reads `owed`, and only a single total order rules out
    /// each side missing the other's store (a commit left unsent until the next one).
    running: AtomicBool,
    /// Sent as the payload, so that this instance's runner can pass over its own.
    instance: String,
}

impl Default for Notifier {
    fn default() -> Self {
        Self {
            owed: AtomicBool::new(false),
            running: AtomicBool::new(false),
            instance: uuid::Uuid::now_v7().simple().to_string(),
        }
    }
}

impl Notifier {
    pub fn instance(&self) -> &str {
        &self.instance
    }

    /// Owes other instances a notification; sends it from a task unless one is running.
    pub fn committed(self: &Arc<Self>, pool: &PgPool) {
        self.owed.store(true, Ordering::SeqCst);
        if self.running.swap(true, Ordering::SeqCst) {
            return; // The running task sends it when its gap ends.
        }
        let this = self.clone();
        let pool = pool.clone();
        tokio::spawn(async move {
            loop {
                if this.owed.swap(false, Ordering::SeqCst) {
                    // Covers every commit made before the flag was cleared.
                    if let Err(error) = sqlx::query("SELECT pg_notify($1, $2)")
                        .bind(EVENTS_CHANNEL)
                        .bind(&this.instance)
                        .execute(&pool)
                        .await
                    {
                        // Other instances fall back to polling; nothing is lost.
                        tracing::warn!(error = %error, "could not notify other instances of a commit");
                    }
                    tokio::time::sleep(GAP).await;
                    continue;
                }
                this.running.store(false, Ordering::SeqCst);
                // A commit between the check and the store saw the task running and left the
                // notification to it: take the task back up unless another commit did.
                if !this.owed.load(Ordering::SeqCst) || this.running.swap(true, Ordering::SeqCst) {
                    break;
                }
            }
        });
    }
}
