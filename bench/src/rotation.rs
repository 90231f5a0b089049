//! The scan that finds keys due for rotation (issue 17 §2) on a big in-memory tree: one
//! organization with a rotation period, `teams` teams of 999 threads (1,000: 1M scopes).
//! `MemoryTree::rotations_due` walks every scope's path for the nearest period; the baseline
//! is `MemoryTree::ids`, one plain pass over the same nodes, in the same run. Median of
//! `repeats`, with nothing due (the usual case) and with every key due (the first 500 taken).

use std::io::Write;
use std::time::Instant;

use ekm_domain::metadata::{Actor, ActorKind, EventMetadata};
use ekm_domain::{KeyVersion, OrgId, Plan, ScopeEvent, ScopeId, ScopeKind, ScopeName, Tier};
use ekm_projections::MemoryTree;
use ekm_store::StoredEvent;

use crate::report::quantile;

struct Log {
    position: i64,
    metadata: String,
}

impl Log {
    fn event(&mut self, id: ScopeId, sequence: i64, event: &ScopeEvent) -> StoredEvent {
        self.position += 1;
        StoredEvent {
            position: self.position,
            recorded_at: chrono::Utc::now(),
            aggregate_type: "scope".into(),
            aggregate_id: id.to_string(),
            sequence,
            event_type: event.type_name().to_owned(),
            event_version: "1".into(),
            payload: serde_json::to_string(event).unwrap_or_default(),
            metadata: self.metadata.clone(),
        }
    }
}

pub(crate) async fn run(teams: usize, repeats: usize) -> anyhow::Result<()> {
    let tree = std::sync::Arc::new(MemoryTree::new());
    tree.load_empty();
    let metadata = EventMetadata {
        actor: Actor {
            kind: ActorKind::User,
            id: "bench".into(),
        },
        request_id: "bench".into(),
        reason: None,
        source_address: None,
        recorded_at: "2026-12-02T00:00:00Z".into(),
        location: None,
    };
    let mut log = Log {
        position: 0,
        metadata: serde_json::to_string(&metadata.to_map())?,
    };
    let name = ScopeName::parse("s")?;
    let org = OrgId::generate();
    let started = Instant::now();
    let created = ScopeEvent::OrganizationCreated {
        org_id: org,
        name: name.clone(),
        plan: Plan::Enterprise,
        tier: Tier::Managed,
        key_version: KeyVersion::FIRST,
        admin_token_id: None,
        key_fingerprint: None,
    };
    let period = ScopeEvent::ScopeRotationPeriodSet {
        period: Some("P90D".into()),
    };
    tree.apply(&[
        log.event(org.scope_id(), 1, &created),
        log.event(org.scope_id(), 2, &period),
    ])?;
    let scope = |id: ScopeId, kind: ScopeKind, parent: ScopeId, path: Vec<ScopeId>| {
        ScopeEvent::ScopeCreated {
            scope_id: id,
            kind,
            name: name.clone(),
            parent_id: parent,
            org_id: org,
            path,
            key_version: KeyVersion::FIRST,
            key_fingerprint: None,
        }
    };
    for _ in 0..teams {
        let team = ScopeId::generate();
        let mut batch = vec![log.event(
            team,
            1,
            &scope(
                team,
                ScopeKind::Team,
                org.scope_id(),
                vec![org.scope_id(), team],
            ),
        )];
        for _ in 0..999 {
            let thread = ScopeId::generate();
            let path = vec![org.scope_id(), team, thread];
            batch.push(log.event(thread, 1, &scope(thread, ScopeKind::Thread, team, path)));
        }
        tree.apply(&batch)?;
    }
    let scopes = tree.ids().len();
    let built = started.elapsed();
    let now = chrono::Utc::now().timestamp_micros();
    let day: i64 = 86_400_000_000;
    let median = |f: &dyn Fn() -> usize| -> (f64, usize) {
        let mut times = vec![];
        let mut found = 0;
        for _ in 0..repeats {
            let started = Instant::now();
            found = f();
            times.push(started.elapsed().as_secs_f64() * 1000.0);
        }
        times.sort_by(f64::total_cmp);
        (quantile(&times, 0.5), found)
    };
    let (baseline, _) = median(&|| tree.ids().len());
    let (none_due, found_none) = median(&|| tree.rotations_due(now, 500).0.len());
    let (all_due, found_all) = median(&|| tree.rotations_due(now + 91 * day, 500).0.len());
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "rotation scan: {scopes} scopes in memory (built in {:.1} s), median of {repeats}",
        built.as_secs_f64()
    )?;
    writeln!(out, "| pass | ms | found | ratio to the baseline |")?;
    writeln!(out, "|---|---|---|---|")?;
    writeln!(
        out,
        "| baseline: `MemoryTree::ids` (one plain pass) | {baseline:.1} | | 1.00 |"
    )?;
    for (label, ms, found) in [
        ("`rotations_due`, nothing due", none_due, found_none),
        (
            "`rotations_due`, every key due (500 taken)",
            all_due,
            found_all,
        ),
    ] {
        writeln!(
            out,
            "| {label} | {ms:.1} | {found} | {:.2} |",
            ms / baseline.max(0.001)
        )?;
    }
    Ok(())
}
