//! The data plane fails closed when the read models stop following the event log (issue 20,
//! section 2). The data plane answers from the in-memory scope tree, which the projection
//! runner feeds; a runner stuck on an event it cannot apply would leave every pause after
//! that event unseen, and encryption would go on. A watch task compares the runner's applied
//! position with the head of the log: once a head the runner had not reached stays
//! unreached past the bound (`--max-projection-lag`, default 5 s), the data plane refuses
//! with 503 `unavailable` and `/readyz` fails, until the runner catches up.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::app::App;

/// The read models are behind the event log past the bound.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stall {
    /// The runner's applied position.
    pub applied: i64,
    /// The head of the event log when last read.
    pub head: i64,
    /// How long the runner has not reached a head it was shown (or the head could not be
    /// read).
    pub behind: Duration,
}

impl App {
    /// Whether the data plane must refuse because the read models stopped following the log.
    pub fn projections_stall(&self) -> Option<Stall> {
        if !self.inner().stalled.load(Ordering::Acquire) {
            return None;
        }
        // Up, and the value not published yet (a moment): a stall all the same.
        Some(self.inner().stall.borrow().clone().unwrap_or(Stall {
            applied: self.projector().applied(),
            head: self.projector().applied(),
            behind: Duration::ZERO,
        }))
    }

    /// Stalls as the watch task sees them: `Some` while stalled.
    pub fn subscribe_stall(&self) -> watch::Receiver<Option<Stall>> {
        self.inner().stall.subscribe()
    }

    /// Watches the runner until `shutdown`: every quarter of `bound` (50 ms to 1 s) it reads
    /// the head of the log, committed (not fenced: a transaction held open would hold the
    /// fenced head down with the runner, and hide exactly the events the runner cannot
    /// read). A head seen at time t that the runner has not reached by t + `bound` stalls the
    /// data plane, and reaching it lifts the stall. So does failing to read the head for
    /// longer than `bound`: an instance cut off from the database cannot hear of a pause
    /// another instance commits.
    pub async fn watch_projections(self, bound: Duration, mut shutdown: watch::Receiver<bool>) {
        let tick = (bound / 4).clamp(Duration::from_millis(50), Duration::from_secs(1));
        // Heads seen and not reached yet, oldest first, each with when it was first seen.
        let mut unreached: std::collections::VecDeque<(i64, Instant)> = Default::default();
        let mut last_read = Instant::now();
        let mut head = 0;
        loop {
            tokio::select! {
                () = tokio::time::sleep(tick) => {}
                changed = shutdown.changed() => {
                    if changed.is_err() || *shutdown.borrow() {
                        return;
                    }
                }
            }
            match self.db().committed_head().await {
                Ok(read) => {
                    head = read;
                    last_read = Instant::now();
                    if unreached.back().is_none_or(|&(seen, _)| head > seen) {
                        if unreached.len() < 64 {
                            unreached.push_back((head, Instant::now()));
                        } else if let Some(newest) = unreached.back_mut() {
                            // Bounded: the newest entry takes the new head and keeps its
                            // older time, which can only make the bound stricter.
                            newest.0 = head;
                        }
                    }
                }
                Err(error) => {
                    tracing::warn!(error = %error, "the projection watch cannot read the head of the event log");
                }
            }
            let applied = self.projector().applied();
            while unreached.front().is_some_and(|&(seen, _)| applied >= seen) {
                unreached.pop_front();
            }
            let lag = unreached
                .front()
                .map(|&(_, since)| since.elapsed())
                .unwrap_or_default();
            metrics::gauge!("ekm_projection_head_position").set(head as f64);
            metrics::gauge!("ekm_projection_position", "projection" => "runner")
                .set(applied as f64);
            metrics::gauge!("ekm_projection_lag_positions", "projection" => "runner")
                .set((head - applied).max(0) as f64);
            metrics::gauge!("ekm_projection_lag_seconds").set(lag.as_secs_f64());
            let behind = Some(lag).filter(|behind| *behind > bound);
            let blind = Some(last_read.elapsed()).filter(|blind| *blind > bound);
            let stall = behind.or(blind).map(|behind| Stall {
                applied,
                head,
                behind,
            });
            self.set_stall(stall);
        }
    }

    fn set_stall(&self, stall: Option<Stall>) {
        // The flag is what the data plane reads; it changes first, and the value is published
        // after, so that whoever is told of a stall, or of its end, finds the data plane
        // already acting on it (`projections_stall` follows the flag).
        let was = self.inner().stalled.swap(stall.is_some(), Ordering::AcqRel);
        self.inner().stall.send_replace(stall.clone());
        match (&stall, was) {
            (Some(s), false) => tracing::error!(
                applied = s.applied,
                head = s.head,
                behind_ms = s.behind.as_millis() as u64,
                "the read models stopped following the event log; the data plane refuses (503 unavailable) and /readyz fails until they catch up"
            ),
            (None, true) => {
                tracing::info!("the read models caught up with the event log; the data plane serves again");
            }
            _ => {}
        }
    }
}
