//! The re-key job: makes a revoke hold against copies of the database (ADR 0013).
//!
//! Deleting a revoked scope's rows (the key shredder, before the revoke is answered) stops
//! the live database from opening its subtree. A copy made earlier still holds the revoked
//! keys, wrapped under the ancestors' wrapping keys; so every ancestor, organization first,
//! gets a new wrapping key, everything surviving under the old one is re-wrapped, and the
//! old one is destroyed. Then the destroyed bytes are removed from the database's files.
//! Old copies stay openable only through the organization's old wrapping key, which only the
//! old platform master key opens: `ekm master-key rotate` ends that.
//!
//! The job runs in every instance, woken by revokes it sees and by a slow poll; each step is
//! idempotent and recorded as an event on the revoked scope (started, one per ancestor,
//! completed), so it resumes after a crash or kill -9 and two instances never record a step
//! twice. On PostgreSQL an advisory lock keeps a second instance from doing the same work.

use std::sync::Arc;
use std::time::Duration;

use ekm_domain::{EventMetadata, ScopeId};
use ekm_projections::{error_chain, EventListener};
use ekm_store::StoredEvent;
use tokio::sync::{watch, Notify};

use crate::app::{Action, App, AppError};

/// The actor of the job's events.
pub const REKEY_ACTOR: &str = "revocation-rekey";
/// Keys re-wrapped per transaction.
pub const BATCH: i64 = 1_000;
/// How often to look for unfinished re-keys when nothing wakes the job.
const POLL: Duration = Duration::from_secs(5);
/// Any value that is ours alone among advisory locks on the database.
const LOCK_KEY: i64 = 0x656b_6d5f_7265_6b79; // "ekm_reky"

pub struct Rekeyer {
    app: App,
    batch: i64,
    wake: Notify,
    /// One run at a time in this process (the background loop, or a caller waiting for it).
    running: tokio::sync::Mutex<()>,
}

impl Rekeyer {
    pub fn new(app: App) -> Arc<Rekeyer> {
        Rekeyer::with_batch(app, BATCH)
    }

    /// With `batch` keys re-wrapped per transaction.
    pub fn with_batch(app: App, batch: i64) -> Arc<Rekeyer> {
        let rekeyer = Arc::new(Rekeyer {
            app,
            batch: batch.max(1),
            wake: Notify::new(),
            running: tokio::sync::Mutex::new(()),
        });
        rekeyer.app.projector().add_listener(rekeyer.listener());
        rekeyer
    }

    fn listener(self: &Arc<Self>) -> EventListener {
        let rekeyer = Arc::downgrade(self);
        Arc::new(move |events: &[StoredEvent]| {
            if events.iter().any(|e| e.event_type == "ScopeRevoked") {
                if let Some(rekeyer) = rekeyer.upgrade() {
                    rekeyer.wake.notify_one();
                }
            }
        })
    }

    /// Runs until `shutdown` turns true.
    pub async fn run(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        loop {
            if *shutdown.borrow() {
                return;
            }
            if let Err(error) = self.run_pending().await {
                tracing::warn!(error = %error_chain(&error), "re-key after a revoke failed; it will be retried");
            }
            tokio::select! {
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(POLL) => {}
                // A sender gone without saying so ends the job too (else `changed` answers
                // at once, for ever).
                changed = shutdown.changed() => {
                    if changed.is_err() {
                        return;
                    }
                }
            }
        }
    }

    /// Finishes every unfinished re-key. Returns how many completed.
    pub async fn run_pending(&self) -> Result<usize, AppError> {
        let _running = self.running.lock().await;
        let _lock = match self.app.db() {
            ekm_store::Db::Postgres(db) => {
                // The guard holds the connection before the lock is asked for: if this future
                // is dropped mid-query, its drop unlocks (a no-op when not granted) instead of
                // the connection going back to the pool holding the lock for ever.
                let mut lock = AdvisoryLock(Some(db.pool.acquire().await.map_err(store_error)?));
                let mut locked = false;
                if let Some(connection) = lock.0.as_mut() {
                    locked = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
                        .bind(LOCK_KEY)
                        .fetch_one(&mut **connection)
                        .await
                        .map_err(store_error)?;
                }
                if !locked {
                    return Ok(0);
                }
                Some(lock)
            }
            ekm_store::Db::Sqlite(_) => None,
        };
        self.app.refresh().await?;
        let mut completed = 0;
        let mut failure = None;
        for revoked in self.app.read().pending_rekeys().await? {
            // One revoke that cannot be finished now does not hold up the others.
            match self.rekey(revoked).await {
                Ok(()) => completed += 1,
                Err(error) => {
                    tracing::warn!(scope = %revoked, error = %error_chain(&error), "re-key after a revoke failed; it will be retried");
                    failure = Some(error);
                }
            }
        }
        match failure {
            Some(error) if completed == 0 => Err(error),
            _ => Ok(completed),
        }
    }

    async fn rekey(&self, revoked: ScopeId) -> Result<(), AppError> {
        let snapshot = self.app.scope(revoked).await?.ok_or(AppError::NotFound)?;
        let path = &snapshot.scope.path;
        let ancestors: Vec<ScopeId> = path[..path.len().saturating_sub(1)].to_vec();
        let metadata = rekey_metadata();
        tracing::info!(scope = %revoked, ancestors = ancestors.len(), "re-keying the path of a revoked scope");
        self.app
            .act(
                revoked,
                Action::StartRevocationRekey {
                    ancestors: ancestors.clone(),
                },
                &metadata,
                None,
            )
            .await?;
        let done = self
            .app
            .rekey_progress(revoked)
            .await?
            .map(|p| p.done)
            .unwrap_or_default();
        let mut total = 0u64;
        for ancestor in ancestors.iter().filter(|a| !done.contains(a)) {
            let Some(scope) = self.app.scope(*ancestor).await? else {
                return Err(AppError::NotFound);
            };
            let rewrapped = self
                .app
                .keys()
                .rekey_scope(&scope, revoked, self.batch)
                .await?;
            total += rewrapped;
            self.app
                .act(
                    revoked,
                    Action::RecordRevocationRekey {
                        scope_id: *ancestor,
                        rewrapped,
                    },
                    &metadata,
                    None,
                )
                .await?;
        }
        // Children created while the revoke was being applied (born revoked) were not in the
        // tree when the shredder ran: their keys go now.
        let subtree = self.app.read().subtree_ids(&snapshot.scope).await?;
        self.app.db().delete_scope_keys(&subtree).await?;
        self.app.db().destroy_at_rest().await?;
        self.app
            .act(
                revoked,
                Action::CompleteRevocationRekey { rewrapped: total },
                &metadata,
                None,
            )
            .await?;
        tracing::info!(scope = %revoked, rewrapped = total, "revoked keys destroyed in the live database");
        Ok(())
    }
}

/// Holds a pooled connection with the job's advisory lock, and unlocks it when dropped.
struct AdvisoryLock(Option<sqlx::pool::PoolConnection<sqlx::Postgres>>);

impl Drop for AdvisoryLock {
    fn drop(&mut self) {
        if let Some(mut connection) = self.0.take() {
            tokio::spawn(async move {
                let unlocked = sqlx::query("SELECT pg_advisory_unlock($1)")
                    .bind(LOCK_KEY)
                    .execute(&mut *connection)
                    .await;
                if unlocked.is_err() {
                    // Closing the connection ends the session and its lock; never return
                    // it to the pool still locked.
                    let _ = connection.detach();
                }
            });
        }
    }
}

fn store_error(error: sqlx::Error) -> AppError {
    AppError::from(ekm_store::StoreError::from(error))
}

fn rekey_metadata() -> EventMetadata {
    crate::health::system_metadata_as(REKEY_ACTOR)
}
