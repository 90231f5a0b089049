//! A circuit breaker per customer master key (issue 20 §3).
//!
//! A KMS that is down makes every call wait for its timeout: requests that miss the key
//! cache pile up behind one another for seconds each. After `failures` transient failures in
//! a row (timeouts, throttling, 5xx, connection errors), the breaker opens: calls to that
//! key fail at once with the last failure's kind (so cached keys within the outage grace
//! period keep serving, ADR 0012), for `cooldown`. Then one call goes through as a probe
//! (half-open); its success closes the breaker, its failure opens it again for twice as
//! long, up to `max_cooldown`. The health monitor's checks are not held back by the breaker
//! and their outcome counts, so a KMS that comes back closes it within a check interval at
//! the latest.
//!
//! A failure that is the customer's decision (a disabled key, a removed permission) is an
//! answer from a KMS that works: it closes the breaker. Those are never retried anyway, and
//! the organization becomes `unavailable` at once.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use ekm_domain::MasterKeyRef;
use ekm_kms::{Operation, ProviderError};

/// When a breaker opens, and for how long.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BreakerSettings {
    /// Transient failures in a row that open it.
    pub failures: u32,
    /// How long it stays open the first time.
    pub cooldown: Duration,
    /// The longest it stays open (the cooldown doubles with each failed probe).
    pub max_cooldown: Duration,
}

impl Default for BreakerSettings {
    fn default() -> Self {
        BreakerSettings {
            failures: 5,
            cooldown: Duration::from_secs(1),
            max_cooldown: Duration::from_secs(30),
        }
    }
}

#[derive(Default)]
struct State {
    /// Transient failures in a row.
    failures: u32,
    open_until: Option<Instant>,
    /// How long the last opening lasted.
    cooldown: Duration,
    /// A probe is out (half-open): other calls still fail at once.
    probing: bool,
    last: Option<ProviderError>,
    /// Which opening this is: a probe admitted in an earlier one (before a health check
    /// closed the breaker and failures opened it again) must not touch this one's state.
    generation: u64,
}

/// The breakers of every customer master key this process calls.
#[derive(Default)]
pub struct Breakers {
    settings: BreakerSettings,
    states: Mutex<HashMap<MasterKeyRef, State>>,
}

/// A call let through. `finish` records its outcome; dropped without it (the caller went
/// away), a probe lets the next call probe instead.
pub struct Admission<'a> {
    breakers: &'a Breakers,
    key: &'a MasterKeyRef,
    /// The opening it probes (`State::generation`), if it is a probe.
    probe: Option<u64>,
    finished: bool,
}

impl Admission<'_> {
    pub fn finish<T>(mut self, result: &Result<T, ProviderError>) {
        self.finished = true;
        self.breakers
            .record(self.key, result.as_ref().map(|_| ()), self.probe);
    }
}

/// Generations of openings, unique in the process.
static NEXT_GENERATION: AtomicU64 = AtomicU64::new(1);

impl Drop for Admission<'_> {
    fn drop(&mut self) {
        let (Some(generation), false) = (self.probe, self.finished) else {
            return;
        };
        if let Ok(mut states) = self.breakers.states.lock() {
            if let Some(state) = states.get_mut(self.key) {
                if state.generation == generation {
                    state.probing = false;
                }
            }
        }
    }
}

impl Breakers {
    pub fn new(settings: BreakerSettings) -> Self {
        Breakers {
            settings,
            states: Mutex::new(HashMap::new()),
        }
    }

    /// Lets a call to `key` through, or refuses it at once while the breaker is open (or
    /// half-open with its probe out).
    pub fn admit<'a>(
        &'a self,
        key: &'a MasterKeyRef,
        operation: Operation,
    ) -> Result<Admission<'a>, ProviderError> {
        let admitted = |probe: Option<u64>| Admission {
            breakers: self,
            key,
            probe,
            finished: false,
        };
        let Ok(mut states) = self.states.lock() else {
            return Ok(admitted(None));
        };
        let Some(state) = states.get_mut(key) else {
            return Ok(admitted(None));
        };
        let Some(until) = state.open_until else {
            return Ok(admitted(None));
        };
        let now = Instant::now();
        if now < until || state.probing {
            metrics::counter!(
                "ekm_kms_calls_total",
                "provider" => key.provider.as_str(),
                "outcome" => "circuit_open"
            )
            .increment(1);
            let (kind, code) = match &state.last {
                Some(last) => (last.kind, last.code.clone()),
                None => (ekm_kms::FailureKind::Unreachable, String::new()),
            };
            let wait = until.saturating_duration_since(now);
            return Err(ProviderError::new(
                operation,
                kind,
                "CircuitOpen",
                format!(
                    "{} calls to this key failed in a row (last: {}); none is made for {} ms \
                     (circuit breaker)",
                    state.failures,
                    if code.is_empty() { "?" } else { &code },
                    wait.as_millis()
                ),
            ));
        }
        state.probing = true;
        Ok(admitted(Some(state.generation)))
    }

    /// Records the outcome of a call to `key`: one admitted (`probe`: the opening it
    /// probed), or a health check's (`None`).
    pub fn record(
        &self,
        key: &MasterKeyRef,
        result: Result<(), &ProviderError>,
        probe: Option<u64>,
    ) {
        let Ok(mut states) = self.states.lock() else {
            return;
        };
        match result {
            Err(error) if error.kind.is_transient() => {
                let settings = self.settings;
                let state = states.entry(key.clone()).or_default();
                // A probe of an earlier opening counts as a failure, nothing more.
                let probe = probe.is_some_and(|g| g == state.generation && state.probing);
                state.failures = state.failures.saturating_add(1);
                state.last = Some(error.clone());
                if probe {
                    state.probing = false;
                }
                let reopen = probe && state.open_until.is_some();
                if reopen || (state.open_until.is_none() && state.failures >= settings.failures) {
                    state.cooldown = match reopen {
                        true => state.cooldown.saturating_mul(2).min(settings.max_cooldown),
                        false => settings.cooldown,
                    };
                    if !reopen {
                        state.generation = NEXT_GENERATION.fetch_add(1, Ordering::Relaxed);
                    }
                    let now = Instant::now();
                    state.open_until = Some(now.checked_add(state.cooldown).unwrap_or(now));
                    metrics::counter!(
                        "ekm_kms_circuit_opened_total",
                        "provider" => key.provider.as_str()
                    )
                    .increment(1);
                    tracing::warn!(
                        provider = key.provider.as_str(),
                        key = %key.key_id,
                        failures = state.failures,
                        cooldown_ms = state.cooldown.as_millis() as u64,
                        kind = error.kind.as_str(),
                        "customer KMS failing: circuit open, calls to the key fail at once until a probe succeeds"
                    );
                }
            }
            // Neither an outage nor an answer from the KMS (no credentials, a malformed
            // request): says nothing about whether it works.
            Err(error) if error.kind.customer_reason().is_none() => {}
            // An answer from a KMS that works: a success, or the customer's decision.
            _ => {
                if let Some(state) = states.remove(key) {
                    if state.open_until.is_some() {
                        tracing::info!(
                            provider = key.provider.as_str(),
                            key = %key.key_id,
                            "customer KMS answers again: circuit closed"
                        );
                    }
                }
            }
        }
    }

    /// Whether calls to `key` fail at once now.
    pub fn is_open(&self, key: &MasterKeyRef) -> bool {
        self.states
            .lock()
            .ok()
            .and_then(|states| states.get(key).and_then(|s| s.open_until))
            .is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ekm_domain::Provider;
    use ekm_kms::FailureKind;

    fn key() -> MasterKeyRef {
        MasterKeyRef {
            provider: Provider::AwsKms,
            key_id: "arn:aws:kms:eu-west-1:111122223333:key/k".into(),
            region: None,
            endpoint_url: None,
        }
    }

    fn failure(kind: FailureKind) -> Result<(), ProviderError> {
        Err(ProviderError::new(Operation::Decrypt, kind, "X", "x"))
    }

    fn settings(cooldown: Duration) -> BreakerSettings {
        BreakerSettings {
            failures: 3,
            cooldown,
            max_cooldown: cooldown * 4,
        }
    }

    /// Given 3 timeouts in a row, when a call comes, then it fails at once with the last
    /// failure's kind (transient: cached keys keep their grace).
    #[test]
    fn opens_after_the_failures_in_a_row() {
        let breakers = Breakers::new(settings(Duration::from_secs(60)));
        let key = key();
        for _ in 0..2 {
            breakers
                .admit(&key, Operation::Decrypt)
                .unwrap()
                .finish(&failure(FailureKind::Timeout));
        }
        assert!(!breakers.is_open(&key));
        breakers
            .admit(&key, Operation::Decrypt)
            .unwrap()
            .finish(&failure(FailureKind::Timeout));
        assert!(breakers.is_open(&key));
        let Err(refused) = breakers.admit(&key, Operation::Encrypt) else {
            panic!("admitted while open");
        };
        assert_eq!(refused.kind, FailureKind::Timeout);
        assert_eq!(refused.code, "CircuitOpen");
        assert_eq!(refused.operation, Operation::Encrypt);
    }

    /// Given failures broken by a success or by the customer's decision, the count starts
    /// again: the breaker opens for an outage, not for a key the customer disabled.
    #[test]
    fn an_answer_from_a_working_kms_resets_the_count() {
        let breakers = Breakers::new(settings(Duration::from_secs(60)));
        let key = key();
        for outcome in [
            failure(FailureKind::Unreachable),
            failure(FailureKind::Unreachable),
            Ok(()),
            failure(FailureKind::Unreachable),
            failure(FailureKind::Unreachable),
            failure(FailureKind::Disabled),
            failure(FailureKind::Unreachable),
            failure(FailureKind::Unreachable),
        ] {
            breakers
                .admit(&key, Operation::Decrypt)
                .unwrap()
                .finish(&outcome);
        }
        assert!(!breakers.is_open(&key));
    }

    /// Given an open breaker past its cooldown, one probe goes through while the others
    /// still fail; a failed probe opens it for longer, a probe dropped unfinished lets the
    /// next call probe, and a successful one (or a health check's success) closes it.
    #[test]
    fn half_open_lets_one_probe_through() {
        let breakers = Breakers::new(settings(Duration::ZERO));
        let key = key();
        for _ in 0..3 {
            breakers
                .admit(&key, Operation::Decrypt)
                .unwrap()
                .finish(&failure(FailureKind::ProviderFault));
        }
        let probe = breakers.admit(&key, Operation::Decrypt).unwrap();
        assert!(breakers.admit(&key, Operation::Decrypt).is_err());
        drop(probe);
        let probe = breakers.admit(&key, Operation::Decrypt).unwrap();
        probe.finish(&failure(FailureKind::ProviderFault));
        assert!(breakers.is_open(&key));
        breakers.record(&key, Ok(()), None);
        assert!(!breakers.is_open(&key));
        assert!(breakers.admit(&key, Operation::Decrypt).is_ok());
    }

    /// A probe of an earlier opening (a health check closed the breaker meanwhile, and
    /// failures opened it again) does not end the present opening's probe.
    #[test]
    fn a_stale_probe_leaves_the_present_opening_alone() {
        let breakers = Breakers::new(settings(Duration::ZERO));
        let key = key();
        let open = |b: &Breakers| {
            for _ in 0..3 {
                b.record(
                    &key,
                    failure(FailureKind::Timeout).as_ref().map(|_| ()),
                    None,
                );
            }
        };
        open(&breakers);
        let stale = breakers.admit(&key, Operation::Decrypt).unwrap();
        breakers.record(&key, Ok(()), None);
        open(&breakers);
        let probe = breakers.admit(&key, Operation::Decrypt).unwrap();
        drop(stale);
        assert!(
            breakers.admit(&key, Operation::Decrypt).is_err(),
            "a second probe"
        );
        probe.finish(&Ok::<(), ProviderError>(()));
        assert!(!breakers.is_open(&key));
    }

    /// Neither an outage nor an answer (no credentials): the count neither grows nor ends.
    #[test]
    fn failures_that_say_nothing_about_the_kms_leave_it_alone() {
        let breakers = Breakers::new(settings(Duration::from_secs(60)));
        let key = key();
        for outcome in [
            failure(FailureKind::Timeout),
            failure(FailureKind::Timeout),
            failure(FailureKind::Unauthenticated),
            failure(FailureKind::Timeout),
        ] {
            breakers.record(&key, outcome.as_ref().map(|_| ()), None);
        }
        assert!(breakers.is_open(&key));
    }

    /// The cooldown doubles with each failed probe, up to the maximum.
    #[test]
    fn the_cooldown_doubles_up_to_the_maximum() {
        let breakers = Breakers::new(BreakerSettings {
            failures: 1,
            cooldown: Duration::from_millis(1),
            max_cooldown: Duration::from_millis(4),
        });
        let key = key();
        breakers.record(
            &key,
            failure(FailureKind::Timeout).as_ref().map(|_| ()),
            None,
        );
        let cooldown = |b: &Breakers| b.states.lock().unwrap().get(&key).unwrap().cooldown;
        assert_eq!(cooldown(&breakers), Duration::from_millis(1));
        for expected in [2, 4, 4] {
            // Force the probe: past the cooldown.
            breakers
                .states
                .lock()
                .unwrap()
                .get_mut(&key)
                .unwrap()
                .open_until = Some(Instant::now());
            breakers
                .admit(&key, Operation::Decrypt)
                .unwrap()
                .finish(&failure(FailureKind::Timeout));
            assert_eq!(cooldown(&breakers), Duration::from_millis(expected));
        }
    }
}
