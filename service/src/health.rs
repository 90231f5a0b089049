//! The master key health monitor: checks every customer master key each
//! `--key-health-interval`, and at once when an unwrap through it fails.
//!
//! A check is the connect validation again: the key's state (DescribeKey or its equivalent),
//! then a wrap/unwrap round trip of a probe bound to the organization, so a permission the
//! customer removed shows even where the key still reads as enabled. The customer's
//! decisions (disabled, scheduled for deletion, access removed, not found) make the
//! organization `unavailable` at once; an outage (timeouts, throttling, 5xx, no answer),
//! already retried with backoff by the provider layer, does so only once it has lasted the
//! grace period. Changes are recorded as events with the system as actor; recovery is the
//! same check succeeding again. Each check's outcome is stored (not as an event) for
//! `GET /v1/orgs/{org}/master-key`.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, Instant};

use ekm_domain::{
    Actor, ActorKind, EventMetadata, KeyHealth, MasterKeyRef, ScopeId, UnavailableReason,
};
use ekm_kms::{FailureKind, Operation, ProviderError};
use futures_util::stream::{FuturesUnordered, StreamExt};
use tokio::sync::watch;

use crate::app::{Action, App, AppError};

/// The actor id of health events.
pub const MONITOR_ACTOR: &str = "key-health-monitor";

/// How long one organization's check may take: a customer KMS that answers later counts as
/// not answering (an outage), and never holds up the checks of other organizations, which
/// run beside it.
pub const CHECK_DEADLINE: Duration = Duration::from_secs(10);

pub struct HealthMonitor {
    app: App,
    interval: Duration,
    grace: Duration,
    deadline: Duration,
    /// When each organization's current outage started.
    outages: HashMap<ScopeId, Instant>,
    /// When each organization was last checked because an unwrap failed.
    prompted: HashMap<ScopeId, Instant>,
    /// Organizations whose check is running: not started again until it ends.
    running: HashSet<ScopeId>,
    /// Organizations to check again as soon as their running check ends (an unwrap failed
    /// meanwhile: the running check may have started before the customer's change).
    again: HashSet<ScopeId>,
}

/// What probing an organization's customer key found, before it is judged.
enum Probe {
    /// The organization is gone or revoked: nothing to check.
    Nothing,
    /// It has no customer key (any outage it had is over).
    NoCustomerKey,
    Checked {
        master: MasterKeyRef,
        result: Result<(), ProviderError>,
    },
}

type Probing = Pin<Box<dyn Future<Output = (ScopeId, Result<Probe, AppError>)> + Send>>;

/// The state of `org`'s customer key, from a round trip bounded by `deadline`.
async fn probe(app: App, org: ScopeId, deadline: Duration) -> Result<Probe, AppError> {
    let Some(snapshot) = app.scope(org).await? else {
        return Ok(Probe::Nothing);
    };
    let Some(master) = snapshot.scope.master_key.clone() else {
        return Ok(Probe::NoCustomerKey);
    };
    if snapshot.scope.own_state == ekm_domain::OwnState::Revoked {
        return Ok(Probe::Nothing);
    }
    let keys = app.keys();
    // Not held back by the circuit breaker: the check is how a KMS that comes back is
    // noticed, and its outcome opens or closes the breaker like any call's.
    let round_trip = async {
        let provider = keys.provider(&master).await?;
        crate::keys::timed_kms_call(
            master.provider,
            ekm_kms::round_trip(provider.as_ref(), &org.to_string()),
        )
        .await
    };
    let result = tokio::time::timeout(deadline, round_trip)
        .await
        .unwrap_or_else(|_| {
            Err(ProviderError::new(
                Operation::Describe,
                FailureKind::Timeout,
                "CheckDeadline",
                format!("no answer within the check's deadline of {deadline:?}"),
            ))
        });
    // A check cut by its deadline is a timeout too.
    keys.breakers()
        .record(&master, result.as_ref().map(|_| ()), None);
    Ok(Probe::Checked { master, result })
}

/// What one check found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verdict {
    pub ok: bool,
    /// The health to record, or `None` while an outage is within its grace period.
    pub record: Option<(KeyHealth, Option<UnavailableReason>)>,
    pub detail: String,
}

impl HealthMonitor {
    pub fn new(app: App, interval: Duration) -> Self {
        let grace = app.keys().kms_options().grace;
        HealthMonitor {
            app,
            interval,
            grace,
            deadline: CHECK_DEADLINE,
            outages: HashMap::new(),
            prompted: HashMap::new(),
            running: HashSet::new(),
            again: HashSet::new(),
        }
    }

    /// With another deadline per check (tests).
    pub fn with_deadline(mut self, deadline: Duration) -> Self {
        self.deadline = deadline;
        self
    }

    /// Starts `org`'s check beside the others, unless it is running already.
    fn start(&mut self, org: ScopeId, probes: &mut FuturesUnordered<Probing>) {
        if self.running.insert(org) {
            let app = self.app.clone();
            let deadline = self.deadline;
            probes.push(Box::pin(
                async move { (org, probe(app, org, deadline).await) },
            ));
        }
    }

    /// Runs until `shutdown` turns true. Every interval each organization's check starts,
    /// unless its last one still runs; the checks run side by side, and each verdict is
    /// recorded as soon as its check ends: one slow customer KMS delays no one else.
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        let mut failures = self.app.keys().take_failures();
        let mut ticker = tokio::time::interval(self.interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut probes: FuturesUnordered<Probing> = FuturesUnordered::new();
        loop {
            tokio::select! {
                _ = ticker.tick() => match self.app.customer_key_orgs().await {
                    Ok(orgs) => {
                        let mut by_health = [0u64; 2];
                        for org in orgs {
                            if let Ok(Some(snapshot)) = self.app.scope(org).await {
                                by_health[usize::from(
                                    snapshot.scope.master_health == KeyHealth::Unavailable,
                                )] += 1;
                            }
                            self.start(org, &mut probes);
                        }
                        for (health, count) in [KeyHealth::Available, KeyHealth::Unavailable]
                            .into_iter()
                            .zip(by_health)
                        {
                            metrics::gauge!("ekm_master_keys", "health" => health.as_str())
                                .set(count as f64);
                        }
                    }
                    Err(error) => {
                        tracing::warn!(error = %ekm_projections::error_chain(&error), "key health: cannot list organizations");
                    }
                },
                Some(org) = next_failure(&mut failures) => {
                    // One prompted check per organization per second, however many
                    // requests fail meanwhile.
                    let recent = self
                        .prompted
                        .get(&org)
                        .is_some_and(|at| at.elapsed() < Duration::from_secs(1));
                    if !recent {
                        self.prompted.insert(org, Instant::now());
                        if self.running.contains(&org) {
                            self.again.insert(org);
                        } else {
                            self.start(org, &mut probes);
                        }
                    }
                }
                Some((org, probed)) = probes.next(), if !probes.is_empty() => {
                    self.running.remove(&org);
                    let judged = match probed {
                        Ok(probe) => self.judge(org, probe).await,
                        Err(error) => Err(error),
                    };
                    if let Err(error) = judged {
                        tracing::warn!(org = %org, error = %ekm_projections::error_chain(&error), "key health check failed");
                    }
                    if self.again.remove(&org) {
                        self.start(org, &mut probes);
                    }
                }
                changed = shutdown.changed() => {
                    if changed.is_err() || *shutdown.borrow() {
                        return;
                    }
                }
            }
        }
    }

    /// Checks one organization's customer key now and records a change of health.
    pub async fn check(&mut self, org: ScopeId) -> Result<Option<Verdict>, AppError> {
        let probed = probe(self.app.clone(), org, self.deadline).await?;
        self.judge(org, probed).await
    }

    /// Judges what a probe found and records a change of health.
    async fn judge(&mut self, org: ScopeId, probed: Probe) -> Result<Option<Verdict>, AppError> {
        let (master, result) = match probed {
            Probe::Nothing => return Ok(None),
            Probe::NoCustomerKey => {
                self.outages.remove(&org);
                return Ok(None);
            }
            Probe::Checked { master, result, .. } => (master, result),
        };
        let verdict = match result {
            Ok(()) => {
                self.outages.remove(&org);
                Verdict {
                    ok: true,
                    record: Some((KeyHealth::Available, None)),
                    detail: "state enabled; wrap/unwrap round trip succeeded".into(),
                }
            }
            Err(error) => match error.kind.customer_reason() {
                Some(reason) => {
                    self.outages.remove(&org);
                    Verdict {
                        ok: false,
                        record: Some((KeyHealth::Unavailable, Some(reason))),
                        detail: error.to_string(),
                    }
                }
                None => {
                    let since = *self.outages.entry(org).or_insert_with(Instant::now);
                    let past_grace = since.elapsed() >= self.grace;
                    Verdict {
                        ok: false,
                        record: past_grace.then_some((
                            KeyHealth::Unavailable,
                            Some(UnavailableReason::Unreachable),
                        )),
                        detail: format!(
                            "{error} (outage for {}s; grace period {}s)",
                            since.elapsed().as_secs(),
                            self.grace.as_secs()
                        ),
                    }
                }
            },
        };
        // The verdict is about the key checked: if the organization switched keys meanwhile,
        // it says nothing about the new one. What it changes is judged against the
        // organization as it is now (the probe's read may be seconds old, and another
        // instance may have recorded a change meanwhile).
        let Some(snapshot) = self
            .app
            .scope(org)
            .await?
            .filter(|s| s.scope.master_key.as_ref() == Some(&master))
        else {
            return Ok(None);
        };
        self.app
            .db()
            .record_key_check(&org.to_string(), verdict.ok, &verdict.detail)
            .await?;
        if let Some((health, reason)) = verdict.record {
            let current_reason = snapshot
                .scope
                .master_change
                .as_ref()
                .and_then(|c| c.reason.clone());
            let changed = health != snapshot.scope.master_health
                || reason.map(|r| r.as_str().to_owned()) != current_reason;
            if changed {
                tracing::warn!(
                    org = %org,
                    health = health.as_str(),
                    reason = reason.map(|r| r.as_str()),
                    detail = %verdict.detail,
                    "master key health changed"
                );
                self.app
                    .act(
                        org,
                        Action::RecordMasterKeyHealth {
                            health,
                            reason,
                            detail: verdict.detail.clone(),
                        },
                        &system_metadata(),
                        None,
                    )
                    .await?;
            }
        }
        Ok(Some(verdict))
    }
}

async fn next_failure(
    failures: &mut Option<tokio::sync::mpsc::UnboundedReceiver<ScopeId>>,
) -> Option<ScopeId> {
    match failures {
        Some(receiver) => receiver.recv().await,
        None => std::future::pending().await,
    }
}

/// Metadata of events the system records on its own.
pub fn system_metadata() -> EventMetadata {
    system_metadata_as(MONITOR_ACTOR)
}

/// Metadata of events a system job (`actor`) records on its own.
pub fn system_metadata_as(actor: &str) -> EventMetadata {
    EventMetadata {
        actor: Actor {
            kind: ActorKind::System,
            id: actor.into(),
        },
        request_id: uuid::Uuid::now_v7().to_string(),
        reason: None,
        source_address: None,
        recorded_at: ekm_store::time::rfc3339(chrono::Utc::now()),
        location: None,
    }
}
