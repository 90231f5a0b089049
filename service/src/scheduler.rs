//! The scheduler (issue 17 §2): fires scheduled actions when they fall due: the resume of a
//! pause given `until`, the removal of a grant given `expires_at` (which has stopped
//! counting at that instant already; the event is the audit log's record of it), and the
//! revoke of a scope whose revocation was pending (§1).
//!
//! Every instance runs it. What is due lives in the `schedule` read model, which the
//! projection keeps from the events (so it survives restarts and rebuilds). Firing is a
//! command on the scope's aggregate (`FireScheduledResume`, `ExpireGrant`,
//! `FireScheduledRevocation`), which records
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
use tokio::task::JoinSet;

use crate::app::{Action, App, AppError};
use crate::health::system_metadata_as;

/// The actor of the events the scheduler records.
pub const SCHEDULER_ACTOR: &str = "scheduler";
/// The longest sleep between two looks at the schedule.
const POLL: Duration = Duration::from_secs(1);
/// Actions fired per look.
const BATCH: i64 = 500;
/// Commands of one look in flight at once.
const IN_FLIGHT: usize = 16;
/// How many of the soonest actions `next_wake` looks through for one not in backoff.
const WAKE_LOOKAHEAD: i64 = 64;
/// The pause before a look when something is due already.
const NEXT_LOOK: Duration = Duration::from_millis(1);
/// The first wait before an action that could not fire (or fired nothing) is looked at
/// again: a row that keeps failing must not turn the job into a busy loop.
const MIN_RETRY: Duration = Duration::from_millis(100);
/// The longest wait before an action that failed is tried again.
const MAX_RETRY: Duration = Duration::from_secs(30);

/// An action as the backoff map knows it: its scope, and its kind, subject and instant.
type BackoffKey = (ScopeId, String);

fn backoff_key(action: &ScheduledAction) -> BackoffKey {
    (
        action.scope_id,
        format!("{}\u{0}{}\u{0}{}", action.kind, action.subject, action.at),
    )
}

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
    backoff: Mutex<HashMap<BackoffKey, (Instant, Duration)>>,
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
                    "ScopeResumeScheduled" | "PermissionGranted" | "ScopeRevocationScheduled"
                )
            }) {
                if let Some(scheduler) = scheduler.upgrade() {
                    scheduler.wake.notify_one();
                }
            }
        })
    }

    /// Runs until `shutdown` turns true (or its sender is gone).
    pub async fn run(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        loop {
            if *shutdown.borrow() {
                return;
            }
            let next = match self.fire_due(&shutdown).await {
                Ok(next) => next,
                Err(error) => {
                    tracing::warn!(error = %error_chain(&error), "the scheduler could not fire what is due; it will look again");
                    None
                }
            };
            let sleep = match next {
                // Due already (it came while the last look ran): look again at once, or
                // nearly (actions in backoff are not counted here).
                Some(due) if due <= chrono::Utc::now().timestamp_micros() => NEXT_LOOK,
                Some(due) => {
                    let now = chrono::Utc::now().timestamp_micros();
                    Duration::from_micros(u64::try_from(due.saturating_sub(now)).unwrap_or(0))
                        .min(POLL)
                }
                None => POLL,
            };
            tokio::select! {
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(sleep) => {}
                changed = shutdown.changed() => {
                    if changed.is_err() || *shutdown.borrow() {
                        return;
                    }
                }
            }
        }
    }

    /// Fires every action due now, once, as one look of `run` does (for tests and tools that
    /// drive the schedule by hand instead of running the job). Actions that fail wait out
    /// their backoff as they would in `run`.
    pub async fn fire_due_now(&self) -> Result<(), AppError> {
        let (_keep, shutdown) = watch::channel(false);
        self.fire_due(&shutdown).await.map(drop)
    }

    /// Fires every action due now. Returns when the next one is due (microseconds since the
    /// epoch), if any.
    ///
    /// A look pages through every due action (a page that fires nothing does not hide the
    /// ones after it). Actions on distinct aggregates fire `IN_FLIGHT` at a time (their
    /// commands share commits); those on one aggregate (an organization's grant expiries)
    /// one after another, so they do not conflict with each other. Each instance starts a
    /// page at its own random point, so two instances rarely race for one action. The read
    /// models are brought up to what fired once per look, not per action. Shutdown stops a
    /// look between pages.
    async fn fire_due(&self, shutdown: &watch::Receiver<bool>) -> Result<Option<i64>, AppError> {
        // Forget the waits of actions not seen for a while (their rows are gone).
        self.backoffs()
            .retain(|_, (until, _)| *until + 2 * MAX_RETRY > Instant::now());
        let now = chrono::Utc::now().timestamp_micros();
        let mut after: Option<(i64, String, String, String)> = None;
        let mut sent = 0;
        let mut unfired = 0;
        loop {
            if *shutdown.borrow() {
                return Ok(None);
            }
            let (page, next) = self
                .app
                .read()
                .due_actions_after(now, after.take(), BATCH)
                .await?;
            after = next;
            // One group per aggregate, in due order within it; groups start at a random point.
            let mut groups: Vec<Vec<(BackoffKey, ScheduledAction)>> = vec![];
            let mut index: HashMap<ScopeId, usize> = HashMap::new();
            for action in page {
                let key = backoff_key(&action);
                if self.waiting(&key) {
                    unfired += 1;
                    continue;
                }
                let at = *index.entry(action.scope_id).or_insert_with(|| {
                    groups.push(vec![]);
                    groups.len() - 1
                });
                groups[at].push((key, action));
            }
            if !groups.is_empty() {
                let start = rand::random_range(0..groups.len());
                groups.rotate_left(start);
            }
            let mut groups = groups.into_iter();
            let mut flying = JoinSet::new();
            let mut keys_of: HashMap<tokio::task::Id, Vec<BackoffKey>> = HashMap::new();
            loop {
                while flying.len() < IN_FLIGHT {
                    let Some(group) = groups.next() else {
                        break;
                    };
                    let app = self.app.clone();
                    let keys: Vec<BackoffKey> = group.iter().map(|(key, _)| key.clone()).collect();
                    let handle = flying.spawn(async move {
                        let mut outcomes = vec![];
                        for (key, action) in group {
                            let outcome = fire(&app, &action).await;
                            outcomes.push((key, action, outcome));
                        }
                        outcomes
                    });
                    keys_of.insert(handle.id(), keys);
                }
                let Some(joined) = flying.join_next_with_id().await else {
                    break;
                };
                let outcomes = match joined {
                    Ok((id, outcomes)) => {
                        keys_of.remove(&id);
                        outcomes
                    }
                    Err(error) => {
                        // A firing task panicked: its actions wait out a backoff like any
                        // failure, so the job does not spin on them.
                        for key in keys_of.remove(&error.id()).unwrap_or_default() {
                            self.failed(key);
                            unfired += 1;
                        }
                        tracing::error!(%error, "a scheduled action's task failed; it will be retried");
                        continue;
                    }
                };
                for (key, action, outcome) in outcomes {
                    sent += 1;
                    // One action that cannot fire now does not hold up the others; it stays
                    // in the schedule and is tried again after a growing wait. So does one
                    // that fired nothing: its row normally leaves with the event that made
                    // it moot, and one that stays (written around the projection) must not
                    // spin the job.
                    match outcome {
                        Ok(Fired::Recorded) => {
                            self.backoffs().remove(&key);
                        }
                        Ok(Fired::Moot) => {
                            self.failed(key);
                        }
                        Ok(Fired::Refused(why)) => {
                            unfired += 1;
                            let wait = self.failed(key);
                            tracing::warn!(scope = %action.scope_id, kind = action.kind, at = action.at, retry_in_ms = wait.as_millis() as u64, "a scheduled action was not fired: {why}");
                        }
                        Err(error) => {
                            unfired += 1;
                            let wait = self.failed(key);
                            tracing::warn!(scope = %action.scope_id, kind = action.kind, error = %error_chain(&error), retry_in_ms = wait.as_millis() as u64, "a scheduled action could not fire; it will be retried");
                        }
                    }
                }
            }
            if after.is_none() {
                break;
            }
        }
        // Due and not fired by this look (waiting out a backoff, refused or failing).
        metrics::gauge!("ekm_scheduled_actions_due").set(unfired as f64);
        // What fired here or elsewhere leaves the schedule before the next look.
        if sent > 0 {
            self.app.refresh().await?;
        }
        self.next_wake().await
    }

    /// When to look again: the due time of the soonest action not waiting out a backoff, or
    /// the end of the soonest backoff (microseconds since the epoch). An action fired by
    /// another instance stays in this instance's read model for a moment, in backoff here;
    /// it must not hold up the actions due after it.
    async fn next_wake(&self) -> Result<Option<i64>, AppError> {
        let soonest = self
            .app
            .read()
            .due_actions(i64::MAX, WAKE_LOOKAHEAD)
            .await?;
        let now = Instant::now();
        let now_micros = chrono::Utc::now().timestamp_micros();
        let mut wake: Option<i64> = None;
        let backoffs = self.backoffs();
        for action in &soonest {
            match backoffs.get(&backoff_key(action)) {
                Some((until, _)) if *until > now => {
                    let at = now_micros
                        + i64::try_from((*until - now).as_micros()).unwrap_or(i64::MAX / 2);
                    wake = Some(wake.map_or(at, |w| w.min(at)));
                }
                _ => {
                    wake = Some(wake.map_or(action.due_at, |w| w.min(action.due_at)));
                    break;
                }
            }
        }
        Ok(wake)
    }

    /// The retry times. A panic while the lock was held leaves nothing half-done in the map
    /// (each use is one insert, remove or get), so a poisoned lock is used as it is.
    fn backoffs(&self) -> std::sync::MutexGuard<'_, HashMap<BackoffKey, (Instant, Duration)>> {
        self.backoff
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn waiting(&self, key: &BackoffKey) -> bool {
        self.backoffs()
            .get(key)
            .is_some_and(|(until, _)| *until > Instant::now())
    }

    /// Records a failure; returns how long the action now waits.
    fn failed(&self, key: BackoffKey) -> Duration {
        let mut backoff = self.backoffs();
        let wait = backoff
            .get(&key)
            .map(|(_, wait)| (*wait * 2).min(MAX_RETRY))
            .unwrap_or(MIN_RETRY);
        backoff.insert(key, (Instant::now() + wait, wait));
        wait
    }
}

/// Sends one action's command. The caller brings the read models up to it afterwards.
async fn fire(app: &App, action: &ScheduledAction) -> Result<Fired, AppError> {
    // Due by the instant the event recorded, not only by the row's `due_at` (a row
    // written around the projection). Both are read on this instance's clock: instances
    // must keep their clocks synchronised (NTP), or one ahead fires early by its lead.
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
                    ekm_domain::Reason::parse(&format!("the grant expired at {}", action.at)).ok();
                Action::ExpireGrant {
                    grant,
                    at: action.at.clone(),
                }
            }
            // Written around the projection: the grant itself already counts as expired.
            None => return Ok(Fired::Refused("it names no grant")),
        },
        "revoke" => {
            // The revoke carries the reason its request gave (the scope's last change of
            // state, while pending, is that request); the event names the requester itself.
            let requested = app.scope(action.scope_id).await?.and_then(|s| {
                (s.scope.own_state == ekm_domain::OwnState::PendingRevocation)
                    .then_some(s.scope.state_change)
                    .flatten()
            });
            metadata.reason = match requested.and_then(|c| c.reason) {
                Some(reason) => ekm_domain::Reason::parse(&reason).ok(),
                None => ekm_domain::Reason::parse(&format!(
                    "the revocation's waiting period ended at {}",
                    action.at
                ))
                .ok(),
            };
            Action::FireScheduledRevocation {
                at: action.at.clone(),
            }
        }
        _ => return Ok(Fired::Refused("this version does not know its kind")),
    };
    let lateness_ms = chrono::Utc::now()
        .timestamp_micros()
        .saturating_sub(action.due_at) as f64
        / 1000.0;
    match app.act(action.scope_id, command, &metadata, None).await {
        Ok(outcome) => {
            if outcome.changed {
                tracing::info!(scope = %action.scope_id, kind = action.kind, lateness_ms, "scheduled action fired");
                metrics::histogram!("ekm_scheduled_action_lateness_seconds")
                    .record((lateness_ms / 1000.0).max(0.0));
            }
            Ok(match outcome.changed {
                true => Fired::Recorded,
                false => Fired::Moot,
            })
        }
        // Recorded, though not read back: the row leaves when the runner applies it.
        Err(AppError::Committed { .. }) => Ok(Fired::Recorded),
        // A rule now forbids it (an ancestor was revoked meanwhile): the revocation
        // removes the subtree's rows when its re-key completes. Until then the action
        // waits like any failure, and says why.
        Err(error) => Err(error),
    }
}
