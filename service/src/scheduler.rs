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
use ekm_projections::{error_chain, EventListener, RotationDue, ScheduledAction};
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
    /// Key rotations (issue 17 §2): when the tree was last scanned and when the next
    /// rotation falls due as of then.
    rotation: Mutex<RotationLook>,
    /// An event that may bring a rotation due sooner (a period set, a scope created, a key
    /// rotated) was heard since the last scan.
    rotation_dirty: std::sync::atomic::AtomicBool,
    /// Whether this instance has said that it cannot apply rotation periods.
    rotation_unavailable_said: std::sync::atomic::AtomicBool,
}

#[derive(Default)]
struct RotationLook {
    last: Option<Instant>,
    next: Option<i64>,
}

/// The longest a rotation scan waits when nothing has changed (a safety net: clock jumps).
const ROTATION_RESCAN: Duration = Duration::from_secs(60);
/// The shortest gap between two scans brought on by events (a bulk of creates scans once).
const ROTATION_MIN_GAP: Duration = Duration::from_secs(1);

impl Scheduler {
    pub fn new(app: App) -> Arc<Scheduler> {
        let scheduler = Arc::new(Scheduler {
            app,
            wake: Notify::new(),
            backoff: Mutex::new(HashMap::new()),
            rotation: Mutex::new(RotationLook::default()),
            rotation_dirty: std::sync::atomic::AtomicBool::new(true),
            rotation_unavailable_said: std::sync::atomic::AtomicBool::new(false),
        });
        scheduler.app.projector().add_listener(scheduler.listener());
        scheduler
    }

    fn listener(self: &Arc<Self>) -> EventListener {
        let scheduler = Arc::downgrade(self);
        Arc::new(move |events: &[StoredEvent]| {
            let Some(scheduler) = scheduler.upgrade() else {
                return;
            };
            if events.iter().any(|e| {
                matches!(
                    e.event_type.as_str(),
                    // What can bring a rotation due sooner than the next scan thought. A new
                    // scope or key is due a period (a day at least) after it was made: the
                    // scan each minute sees it in time.
                    "ScopeRotationPeriodSet"
                        | "OrganizationMasterKeyHealthChanged"
                        | "OrganizationMasterKeyChanged"
                )
            }) {
                scheduler
                    .rotation_dirty
                    .store(true, std::sync::atomic::Ordering::Relaxed);
            }
            if events.iter().any(|e| {
                matches!(
                    e.event_type.as_str(),
                    "ScopeResumeScheduled" | "PermissionGranted" | "ScopeRevocationScheduled"
                )
            }) {
                scheduler.wake.notify_one();
            }
        })
    }

    /// Runs until `shutdown` turns true (or its sender is gone): the schedule, and key
    /// rotations beside it (so that a slow KMS minting keys never delays a resume or a
    /// revocation, nor a failing schedule query the rotations).
    pub async fn run(self: Arc<Self>, shutdown: watch::Receiver<bool>) {
        tokio::join!(
            self.clone().run_schedule(shutdown.clone()),
            self.run_rotations(shutdown)
        );
    }

    /// Looks for due rotations about once a second (a look scans the tree only when one may
    /// be due: `fire_rotations`).
    async fn run_rotations(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        loop {
            if *shutdown.borrow() {
                return;
            }
            self.fire_rotations(false, None).await;
            let sleep = match self.rotations().next {
                Some(due) => {
                    let now = chrono::Utc::now().timestamp_micros();
                    Duration::from_micros(u64::try_from(due.saturating_sub(now)).unwrap_or(0))
                        .clamp(NEXT_LOOK, POLL)
                }
                None => POLL,
            };
            tokio::select! {
                _ = tokio::time::sleep(sleep) => {}
                changed = shutdown.changed() => {
                    if changed.is_err() || *shutdown.borrow() {
                        return;
                    }
                }
            }
        }
    }

    async fn run_schedule(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
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

    fn rotations(&self) -> std::sync::MutexGuard<'_, RotationLook> {
        self.rotation
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Rotates every key whose rotation period ran out by `at` (microseconds since the
    /// epoch: tests and tools look ahead with it), as one look of `run` does with now.
    pub async fn rotate_due_at(&self, at: i64) {
        self.fire_rotations(true, Some(at)).await;
    }

    /// Scans the memory tree for keys due for rotation, when one may be due (the next due
    /// time has come, an event may have brought one sooner, or a minute passed), and sends
    /// `AutoRotate` for each, `IN_FLIGHT` at a time, starting at a random point of the tree.
    /// Keys waiting out a backoff are left out of the scan's count; the next look comes when
    /// the first of them may go again. Returns how many were sent and how many did not fire.
    async fn fire_rotations(&self, force: bool, at: Option<i64>) -> (usize, usize) {
        let memory = self.app.memory();
        if !memory.is_ready() {
            // `--scope-reads sql`: the tree is not kept, so periods are not applied.
            if !self
                .rotation_unavailable_said
                .swap(true, std::sync::atomic::Ordering::Relaxed)
            {
                tracing::warn!("key rotation periods are not applied by this instance: the scope tree is not kept in memory (--scope-reads sql)");
            }
            return (0, 0);
        }
        let now = at.unwrap_or_else(|| chrono::Utc::now().timestamp_micros());
        {
            let look = self.rotations();
            let dirty = self
                .rotation_dirty
                .load(std::sync::atomic::Ordering::Relaxed);
            let since = look.last.map(|l| l.elapsed());
            let due = look.next.is_some_and(|n| n <= now);
            let stale = since.is_none_or(|s| s >= ROTATION_RESCAN);
            let changed = dirty && since.is_none_or(|s| s >= ROTATION_MIN_GAP);
            if !(force || due || stale || changed) {
                return (0, 0);
            }
        }
        self.rotation_dirty
            .store(false, std::sync::atomic::Ordering::Relaxed);
        // The keys waiting out a backoff, and when the first may go again.
        let (waiting, retry_at) = {
            let backoffs = self.backoffs();
            let now_instant = Instant::now();
            let now_micros = chrono::Utc::now().timestamp_micros();
            let mut waiting = std::collections::HashSet::new();
            let mut retry_at: Option<i64> = None;
            for ((scope, what), (until, _)) in backoffs.iter() {
                let Some(version) = what.strip_prefix("rotation\u{0}") else {
                    continue;
                };
                if *until > now_instant {
                    waiting.insert((*scope, version.parse::<u32>().unwrap_or(0)));
                    let at = now_micros
                        + i64::try_from((*until - now_instant).as_micros()).unwrap_or(i64::MAX / 2);
                    retry_at = Some(retry_at.map_or(at, |r| r.min(at)));
                }
            }
            (waiting, retry_at)
        };
        let start = rand::random_range(0..usize::MAX);
        let skip = |scope: ScopeId, version: u32| waiting.contains(&(scope, version));
        let (due, next) = memory.rotations_due_from(now, BATCH as usize, start, &skip);
        {
            let mut look = self.rotations();
            look.last = Some(Instant::now());
            look.next = match (next, retry_at) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
        }
        let mut due = due.into_iter();
        let (mut sent, mut unfired) = (0, waiting.len());
        let mut flying = JoinSet::new();
        loop {
            while flying.len() < IN_FLIGHT {
                let Some(rotation) = due.next() else {
                    break;
                };
                let app = self.app.clone();
                flying.spawn(async move {
                    let outcome = rotate(&app, &rotation).await;
                    (rotation, outcome)
                });
            }
            let Some(joined) = flying.join_next().await else {
                break;
            };
            let Ok((rotation, outcome)) = joined else {
                // A panicked rotation is found due again at the next scan.
                tracing::error!("a key rotation's task failed; it will be retried");
                unfired += 1;
                continue;
            };
            sent += 1;
            let key = rotation_key(&rotation);
            match outcome {
                Ok(true) => {
                    self.backoffs().remove(&key);
                }
                // Rotated elsewhere meanwhile: this tree hears it shortly.
                Ok(false) => {
                    self.failed(key);
                }
                Err(error) => {
                    unfired += 1;
                    let wait = self.failed(key);
                    tracing::warn!(scope = %rotation.scope_id, error = %error_chain(&error), retry_in_ms = wait.as_millis() as u64, "a key rotation could not be made; it will be retried");
                }
            }
        }
        (sent, unfired)
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

fn rotation_key(rotation: &RotationDue) -> BackoffKey {
    (
        rotation.scope_id,
        format!("rotation\u{0}{}", rotation.from.get()),
    )
}

/// Rotates one key whose period ran out, if its version is still `from`. `true`: rotated.
async fn rotate(app: &App, rotation: &RotationDue) -> Result<bool, AppError> {
    let mut metadata = system_metadata_as(SCHEDULER_ACTOR);
    metadata.reason = ekm_domain::Reason::parse(&format!(
        "the key's rotation period {} ran out",
        rotation.period
    ))
    .ok();
    let action = Action::AutoRotate {
        from: rotation.from,
    };
    let outcome = match app.act(rotation.scope_id, action, &metadata, None).await {
        Ok(outcome) => outcome,
        // Recorded, only not read back: it is done (as for the schedule's actions).
        Err(AppError::Committed { .. }) => return Ok(true),
        Err(error) => return Err(error),
    };
    if outcome.changed {
        let lateness = chrono::Utc::now()
            .timestamp_micros()
            .saturating_sub(rotation.due_at) as f64
            / 1e6;
        tracing::info!(scope = %rotation.scope_id, from = rotation.from.get(), "key rotated on its period");
        metrics::histogram!("ekm_scheduled_action_lateness_seconds").record(lateness.max(0.0));
    }
    Ok(outcome.changed)
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
