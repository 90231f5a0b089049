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
    /// How long the runner has not reached a head it was shown.
    pub behind: Duration,
}

impl App {
    /// Whether the data plane must refuse because the read models stopped following the log.
    pub fn projections_stall(&self) -> Option<Stall> {
        if !self.inner().stalled.load(Ordering::Acquire) {
            return None;
        }
        self.inner().stall.borrow().clone()
    }

    /// Stalls as the watch task sees them: `Some` while stalled.
    pub fn subscribe_stall(&self) -> watch::Receiver<Option<Stall>> {
        self.inner().stall.subscribe()
    }

    /// Watches the runner until `shutdown`: every quarter of `bound` (50 ms to 1 s) it reads
    /// the head; a head the runner has not reached within `bound` stalls the data plane, and
    /// reaching it lifts the stall. A head that cannot be read changes nothing (the runner
    /// cannot fall behind a log nobody can append to either).
    pub async fn watch_projections(self, bound: Duration, mut shutdown: watch::Receiver<bool>) {
        let tick = (bound / 4).clamp(Duration::from_millis(50), Duration::from_secs(1));
        // A head the runner had not reached when seen, and since when.
        let mut behind: Option<(i64, Instant)> = None;
        loop {
            tokio::select! {
                () = tokio::time::sleep(tick) => {}
                changed = shutdown.changed() => {
                    if changed.is_err() || *shutdown.borrow() {
                        return;
                    }
                }
            }
            let head = match self.db().head_position().await {
                Ok(head) => head,
                Err(error) => {
                    tracing::warn!(error = %error, "the projection watch cannot read the head of the event log");
                    continue;
                }
            };
            let applied = self.projector().applied();
            if behind.is_some_and(|(target, _)| applied >= target) {
                behind = None;
            }
            if behind.is_none() && applied < head {
                behind = Some((head, Instant::now()));
            }
            let stall = behind
                .filter(|(_, since)| since.elapsed() > bound)
                .map(|(_, since)| Stall {
                    applied,
                    head,
                    behind: since.elapsed(),
                });
            self.set_stall(stall);
        }
    }

    fn set_stall(&self, stall: Option<Stall>) {
        let was = self.inner().stalled.swap(stall.is_some(), Ordering::AcqRel);
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
        self.inner().stall.send_replace(stall);
    }
}
