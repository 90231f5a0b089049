//! The scheduler (issue 17 §2): fires scheduled actions when they fall due: the resume of a
//! pause given `until`, and the removal of a grant given `expires_at` (which has stopped
//! counting at that instant already; the event is the audit log's record of it).
//!
//! Every instance runs it. What is due lives in the `schedule` read model, which the
//! projection keeps from the events (so it survives restarts and rebuilds). Firing is a
//! command on the scope's aggregate (`FireScheduledResume`, `ExpireGrant`), which records
//! only if what was scheduled for that instant is still pending, committed against the aggregate's
//! version: when two instances fire the same action, one appends and the other finds nothing
//! left to do (or conflicts and re-reads), so every action fires exactly once. The job sleeps
//! until the next due time, at most `POLL`, and wakes at once when this process sees a new
//! schedule (another instance's is seen when the projector hears it).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ekm_domain::ScopeId;
use ekm_projections::{error_chain, EventListener, ScheduledAction};
use ekm_store::StoredEvent;
use tokio::sync::{watch, Notify};

use crate::app::{Action, App, AppError};
use crate::health::system_metadata_as;

/// The actor of the events the scheduler records.
pub const SCHEDULER_ACTOR: &str = "scheduler";
/// The longest sleep between two looks at the schedule.
const POLL: Duration = Duration::from_secs(1);
/// Actions fired per look.
const BATCH: i64 = 500;
/// The shortest sleep when something due could not fire: a row that keeps failing must not
/// turn the job into a busy loop.
const MIN_RETRY: Duration = Duration::from_millis(100);
/// The longest wait before an action that failed is tried again.
const MAX_RETRY: Duration = Duration::from_secs(30);

/// What became of an action the scheduler looked at.
enum Fired {
    /// Its event was recorded here.
    Recorded,
    /// Nothing to record: fired by another instance, cancelled, replaced.
    Moot,
    /// Not sent, and why.
    Refused(&'static str),
}

pub struct Scheduler {
    app: App,
    wake: Notify,
    /// Actions that failed to fire, by scope and (kind, subject, instant): when to try again,
    /// and the wait after that. In memory: a restart tries them all again at once, which is what one wants.
    backoff: Mutex<HashMap<(ScopeId, String), (Instant, Duration)>>,
}

impl Scheduler {
    pub fn new(app: App) -> Arc<Scheduler> {
        let scheduler = Arc::new(Scheduler {
            app,
            wake: Notify::new(),
            backoff: Mutex::new(HashMap::new()),
        });
        scheduler.app.projector().add_listener(scheduler.listener());
        scheduler
    }

    fn listener(self: &Arc<Self>) -> EventListener {
        let scheduler = Arc::downgrade(self);
        Arc::new(move |events: &[StoredEvent]| {
            if events.iter().any(|e| {
                matches!(
                    e.event_type.as_str(),
                    "ScopeResumeScheduled" | "PermissionGranted"
                )
            }) {
                if let Some(scheduler) = scheduler.upgrade() {
                    scheduler.wake.notify_one();
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
            let next = match self.fire_due().await {
                Ok(next) => next,
                Err(error) => {
                    tracing::warn!(error = %error_chain(&error), "the scheduler could not read what is due; it will look again");
                    None
                }
            };
            let sleep = match next {
                // Something is due but could not fire (it waits out its backoff): look again
                // soon, not at once.
                Some(due) if due <= chrono::Utc::now().timestamp_micros() => MIN_RETRY,
                Some(due) => {
                    let now = chrono::Utc::now().timestamp_micros();
                    Duration::from_micros(u64::try_from(due - now).unwrap_or(0)).min(POLL)
                }
                None => POLL,
            };
            tokio::select! {
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(sleep) => {}
                _ = shutdown.changed() => {}
            }
        }
    }

    /// Fires every action due now. Returns when the next one is due (microseconds since the
    /// epoch), if any.
    pub async fn fire_due(&self) -> Result<Option<i64>, AppError> {
        // Forget the waits of actions not seen for a while (their rows are gone).
        self.backoffs()
            .retain(|_, (until, _)| *until + 2 * MAX_RETRY > Instant::now());
        loop {
            let now = chrono::Utc::now().timestamp_micros();
            let due = self.app.read().due_actions(now, BATCH).await?;
            let full = due.len() as i64 == BATCH;
            let mut fired = 0;
            for action in due {
                let key = (
                    action.scope_id,
                    format!("{}\u{0}{}\u{0}{}", action.kind, action.subject, action.at),
                );
                if self.waiting(&key) {
                    continue;
                }
                // One action that cannot fire now does not hold up the others; it stays in
                // the schedule and is tried again after a growing wait. So does one that
                // fired nothing: its row normally leaves with the event that made it moot,
                // and one that stays (written around the projection) must not spin the job.
                match self.fire(&action).await {
                    Ok(Fired::Recorded) => {
                        fired += 1;
                        self.backoffs().remove(&key);
                    }
                    Ok(Fired::Moot) => {
                        self.failed(key);
                    }
                    Ok(Fired::Refused(why)) => {
                        let wait = self.failed(key);
                        tracing::warn!(scope = %action.scope_id, kind = action.kind, at = action.at, retry_in_ms = wait.as_millis() as u64, "a scheduled action was not fired: {why}");
                    }
                    Err(error) => {
                        let wait = self.failed(key);
                        tracing::warn!(scope = %action.scope_id, kind = action.kind, error = %error_chain(&error), retry_in_ms = wait.as_millis() as u64, "a scheduled action could not fire; it will be retried");
                    }
                }
            }
            // A full batch of which nothing fired would be read again unchanged.
            if !full || fired == 0 {
                break;
            }
        }
        Ok(self.app.read().next_due().await?)
    }

    /// The retry times. A panic while the lock was held leaves nothing half-done in the map
    /// (each use is one insert, remove or get), so a poisoned lock is used as it is.
    fn backoffs(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<(ScopeId, String), (Instant, Duration)>> {
        self.backoff
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn waiting(&self, key: &(ScopeId, String)) -> bool {
        self.backoffs()
            .get(key)
            .is_some_and(|(until, _)| *until > Instant::now())
    }

    /// Records a failure; returns how long the action now waits.
    fn failed(&self, key: (ScopeId, String)) -> Duration {
        let mut backoff = self.backoffs();
        let wait = backoff
            .get(&key)
            .map(|(_, wait)| (*wait * 2).min(MAX_RETRY))
            .unwrap_or(MIN_RETRY);
        backoff.insert(key, (Instant::now() + wait, wait));
        wait
    }

    async fn fire(&self, action: &ScheduledAction) -> Result<Fired, AppError> {
        // Due by the instant the event recorded, not only by the row's `due_at` (a row
        // written around the projection, or this instance's clock ahead of the others').
        match chrono::DateTime::parse_from_rfc3339(&action.at) {
            Ok(at) if at <= chrono::Utc::now() => {}
            Ok(_) => return Ok(Fired::Refused("its instant has not come")),
            Err(_) => return Ok(Fired::Refused("its instant cannot be read")),
        }
        let mut metadata = system_metadata_as(SCHEDULER_ACTOR);
        let command = match action.kind.as_str() {
            "resume" => {
                metadata.reason =
                    ekm_domain::Reason::parse(&format!("paused until {}", action.at)).ok();
                Action::FireScheduledResume {
                    at: action.at.clone(),
                }
            }
            "grant_expiry" => match action.grant() {
                Some(grant) => {
                    metadata.reason =
                        ekm_domain::Reason::parse(&format!("the grant expired at {}", action.at))
                            .ok();
                    Action::ExpireGrant {
                        grant,
                        at: action.at.clone(),
                    }
                }
                // Written around the projection: the grant itself already counts as expired.
                None => return Ok(Fired::Refused("it names no grant")),
            },
            _ => return Ok(Fired::Refused("this version does not know its kind")),
        };
        let lateness_ms = (chrono::Utc::now().timestamp_micros() - action.due_at) as f64 / 1000.0;
        match self
            .app
            .act(action.scope_id, command, &metadata, None)
            .await
        {
            Ok(outcome) => {
                if outcome.changed {
                    tracing::info!(scope = %action.scope_id, kind = action.kind, lateness_ms, "scheduled action fired");
                }
                // Fired here or elsewhere: bring the read models up to it, so that the row
                // is gone before the next look.
                self.app.refresh().await?;
                Ok(match outcome.changed {
                    true => Fired::Recorded,
                    false => Fired::Moot,
                })
            }
            // A rule now forbids it (an ancestor was revoked meanwhile): the revocation
            // removes the subtree's rows when its re-key completes. Until then the action
            // waits like any failure, and says why.
            Err(AppError::Rule(rule)) => {
                self.app.refresh().await?;
                Err(AppError::Rule(rule))
            }
            Err(error) => Err(error),
        }
    }
}
