//! The scope tree in memory: every scope's parent, kind, name, own state and the event that
//! set it, plan and tier, master key, version, key versions, and the organizations' grants.
//! It answers `ReadModels::scope` without SQL, so reads and data-plane enforcement cost a
//! few pointer walks.
//!
//! It is fed from events in position order: the projector tells it (as a listener) every
//! event this process sees, its own and other instances' (`Projector::add_listener`); a
//! command may also hand it its own events straight after they commit (`apply`). Applying is
//! idempotent per scope: an event whose aggregate sequence is not newer than what the scope
//! has already seen changes nothing, so the same event may arrive by both ways.
//!
//! At start-up (`load`) it reads the SQL read models and the scope tree projection's
//! checkpoint in one consistent read (a read transaction; REPEATABLE READ on PostgreSQL),
//! then applies the events after that checkpoint. Events told while it loads are kept and
//! applied after the rows, in position order.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use ekm_domain::{
    effective_state, Effective, EffectiveJustification, Grant, JustificationPolicy, KeyHealth,
    MasterKeyRef, OrgId, OwnState, Permission, Plan, PrincipalName, ScopeId, ScopeKind, Tier,
};
use ekm_store::time::from_micros;
use ekm_store::{Db, StoredEvent};

use crate::error::ProjectionError;
use crate::queries::{
    Cause, Destruction, KeyVersionRecord, ScopeRecord, ScopeSnapshot, StateChange,
};
use crate::runner::{EventListener, Projector};

mod apply;
mod load;
#[cfg(test)]
mod tests;

use load::read_rows;

/// No parent: an organization.
const ROOT: u32 = u32::MAX;
/// Events read per query when catching up after the loaded checkpoint.
const CATCH_UP_BATCH: i64 = 1_000;

/// The scope tree, in memory; shared between the projector (which feeds it) and readers.
pub struct MemoryTree {
    state: RwLock<State>,
}

/// What a start-up load did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemoryLoad {
    /// The scope tree projection's checkpoint the rows were read at.
    pub checkpoint: i64,
    pub scopes: usize,
    pub key_versions: usize,
    pub grants: usize,
    /// Events applied after the checkpoint (read from the log, or told meanwhile).
    pub events_after: usize,
    /// How far the tree has applied the log once loaded.
    pub position: i64,
}

/// One grant as `grants_view` holds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GrantRecord {
    pub org_id: ScopeId,
    pub principal: String,
    pub permission: String,
    /// Empty for a grant on the whole organization.
    pub scope_id: String,
    pub granted_position: i64,
    pub granted_at: i64,
    pub granted_by: String,
    pub expires_at: Option<i64>,
}

#[derive(Default)]
struct State {
    phase: Phase,
    /// Events told while loading, applied after the rows.
    pending: Vec<StoredEvent>,
    tree: Tree,
}

/// Where the tree stands: not in use (events told are dropped: without a load, as with
/// `--scope-reads sql`, nothing accumulates), loading (events told are kept), ready.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum Phase {
    #[default]
    Idle,
    Loading,
    Ready,
}

#[derive(Default)]
struct Tree {
    /// The checkpoint the rows were loaded at: events at or below it are in the rows.
    floor: i64,
    /// The highest position applied.
    position: i64,
    index: HashMap<ScopeId, u32>,
    nodes: Vec<Node>,
    /// Actors, event types and permissions: few distinct values, many uses.
    strings: Interner,
    grants: HashMap<ScopeId, Vec<GrantRow>>,
    /// Per organization, how many of its scopes set a rotation period: an organization
    /// with none is skipped by the schedule listing without a pass over the tree.
    rotation_orgs: HashMap<ScopeId, u32>,
}

/// One scope. Kept small: most scopes are leaves that were created and never changed, so
/// whatever only some scopes have (a state change, an organization's plan and master key,
/// a re-key) lives behind one optional box.
struct Node {
    id: ScopeId,
    parent: u32,
    kind: ScopeKind,
    own_state: OwnState,
    rekey: Rekey,
    key_version: u32,
    /// The sequence of the last event of this aggregate applied here: the row's version,
    /// which every event moves (migration 0014), so a scope loaded from its row knows it too.
    version: i64,
    created_at: i64,
    updated_position: i64,
    name: Box<str>,
    rare: Option<Box<Rare>>,
    key_versions: Box<[KeyVer]>,
}

#[derive(Default)]
struct Rare {
    state_change: Option<Change>,
    rekey_done_position: Option<i64>,
    org: Option<OrgFields>,
    justification: Option<JustificationPolicy>,
    /// The decryption floor, when above 1.
    min_decryption: Option<u32>,
    /// While `pending_revocation`: when the revoke falls due.
    revoke_due_at: Option<Box<str>>,
    /// The scope's own key rotation period, in seconds, and as the event wrote it.
    rotation: Option<(u64, Box<str>)>,
}

struct Change {
    event: u32,
    position: i64,
    at: i64,
    actor: u32,
    reason: Option<Box<str>>,
}

#[derive(Default)]
struct OrgFields {
    plan: Option<Plan>,
    tier: Option<Tier>,
    master_key: Option<MasterKeyRef>,
    master_health: Option<KeyHealth>,
    master_reason: Option<Box<str>>,
    master_detail: Option<Box<str>>,
    master_position: Option<i64>,
    master_at: Option<i64>,
    revoke_window: Option<Box<str>>,
    rate_limits: ekm_domain::RateLimits,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Rekey {
    None,
    Pending,
    Running,
    Done,
}

impl Rekey {
    fn parse(text: Option<&str>) -> Rekey {
        match text {
            Some("pending") => Rekey::Pending,
            Some("running") => Rekey::Running,
            Some("done") => Rekey::Done,
            _ => Rekey::None,
        }
    }

    fn as_str(self) -> Option<&'static str> {
        match self {
            Rekey::None => None,
            Rekey::Pending => Some("pending"),
            Rekey::Running => Some("running"),
            Rekey::Done => Some("done"),
        }
    }
}

struct KeyVer {
    version: u32,
    retired: bool,
    created_at: i64,
    fingerprint: Fingerprint,
}

/// Fingerprints are 32 lowercase hex digits: kept as their 16 bytes.
enum Fingerprint {
    None,
    Hex([u8; 16]),
    Text(Box<str>),
}

impl Fingerprint {
    fn new(text: Option<String>) -> Fingerprint {
        let Some(text) = text else {
            return Fingerprint::None;
        };
        let lower_hex = text.len() == 32
            && text
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        match hex::decode(&text) {
            Ok(bytes) if lower_hex => {
                let mut out = [0u8; 16];
                out.copy_from_slice(&bytes);
                Fingerprint::Hex(out)
            }
            _ => Fingerprint::Text(text.into_boxed_str()),
        }
    }

    fn text(&self) -> Option<String> {
        match self {
            Fingerprint::None => None,
            Fingerprint::Hex(bytes) => Some(hex::encode(bytes)),
            Fingerprint::Text(text) => Some(text.to_string()),
        }
    }
}

struct GrantRow {
    principal: Box<str>,
    permission: u32,
    /// Empty for the whole organization.
    scope_id: Option<ScopeId>,
    granted_position: i64,
    granted_at: i64,
    granted_by: u32,
    /// Microseconds since the epoch, if it expires.
    expires_at: Option<i64>,
}

#[derive(Default)]
struct Interner {
    ids: HashMap<Box<str>, u32>,
    texts: Vec<Box<str>>,
}

impl Interner {
    fn intern(&mut self, text: &str) -> u32 {
        if let Some(id) = self.ids.get(text) {
            return *id;
        }
        let id = u32::try_from(self.texts.len()).unwrap_or(u32::MAX);
        self.texts.push(text.into());
        self.ids.insert(text.into(), id);
        id
    }

    fn get(&self, id: u32) -> &str {
        self.texts.get(id as usize).map_or("", |t| t)
    }
}

/// Whether an event applied, or why not.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Applied {
    Yes,
    /// Already applied (or part of the loaded rows), or not about the scope tree.
    Skipped,
    /// An earlier event of the same aggregate (or the parent's creation) has not arrived
    /// yet; the projector will tell both in order.
    Gap,
}

impl Default for MemoryTree {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryTree {
    /// An empty tree, not in use until `load` fills it (what it is told meanwhile is
    /// dropped; the load reads it from the rows).
    pub fn new() -> Self {
        Self {
            state: RwLock::new(State::default()),
        }
    }

    /// Whether `load` has finished: until then readers use SQL.
    pub fn is_ready(&self) -> bool {
        self.state
            .read()
            .map(|s| s.phase == Phase::Ready)
            .unwrap_or(false)
    }

    /// The highest position applied.
    pub fn position(&self) -> i64 {
        self.state.read().map(|s| s.tree.position).unwrap_or(0)
    }

    /// The listener to register with the projector. Register it before any listener that
    /// relies on it being current (the key cache's eviction): listeners run in order.
    pub fn listener(self: &Arc<Self>) -> EventListener {
        let tree = Arc::downgrade(self);
        Arc::new(move |events: &[StoredEvent]| {
            if let Some(tree) = tree.upgrade() {
                tree.told(events);
            }
        })
    }

    fn told(&self, events: &[StoredEvent]) {
        let Ok(mut state) = self.state.write() else {
            return;
        };
        match state.phase {
            Phase::Idle => return,
            Phase::Loading => {
                state.pending.extend(events.iter().cloned());
                return;
            }
            Phase::Ready => {}
        }
        for event in events {
            // In position order, all of them: a gap cannot be filled later, apply anyway.
            if let Err(error) = state.tree.apply(event, false) {
                tracing::error!(position = event.position, error = %crate::error::chain(&error), "the in-memory scope tree could not apply an event");
            }
        }
    }

    /// Makes an idle tree ready as it is, empty, to be fed events alone (benchmarks of the
    /// tree itself; a server loads it with `load`).
    pub fn load_empty(&self) {
        if let Ok(mut state) = self.state.write() {
            if state.phase == Phase::Idle {
                state.phase = Phase::Ready;
            }
        }
    }

    /// Applies events a command has just committed (in position order), before the
    /// projector tells them. An event whose aggregate has older events this tree has not
    /// seen yet is left for the projector (`Applied::Gap`).
    pub fn apply(&self, events: &[StoredEvent]) -> Result<Vec<Applied>, ProjectionError> {
        let Ok(mut state) = self.state.write() else {
            return Ok(vec![]);
        };
        match state.phase {
            Phase::Idle => return Ok(vec![Applied::Skipped; events.len()]),
            Phase::Loading => {
                state.pending.extend(events.iter().cloned());
                return Ok(vec![Applied::Skipped; events.len()]);
            }
            Phase::Ready => {}
        }
        events.iter().map(|e| state.tree.apply(e, true)).collect()
    }

    /// Fills the tree from the read models at the scope tree projection's checkpoint, in
    /// one consistent read, then applies the events after it. The projector must have
    /// caught up once (so that its listeners hear every event after that point); this
    /// does it.
    pub async fn load(
        &self,
        db: &Db,
        projector: &Projector,
    ) -> Result<MemoryLoad, ProjectionError> {
        // From here on, events told are kept. Those told before are at or below the
        // projector's applied position, which the checkpoint read below has reached.
        if let Ok(mut state) = self.state.write() {
            if state.phase == Phase::Idle {
                state.phase = Phase::Loading;
            }
        }
        projector.catch_up().await?;
        let (mut tree, checkpoint) = read_rows(db).await?;
        tree.count_rotation_orgs();
        let mut events_after = 0;
        let mut after = checkpoint;
        loop {
            let events = db.events_after(after, CATCH_UP_BATCH).await?;
            let Some(last) = events.last().map(|e| e.position) else {
                break;
            };
            for event in &events {
                tree.apply(event, false)?;
            }
            events_after += events.len();
            after = last;
        }
        let Ok(mut state) = self.state.write() else {
            return Err(ProjectionError::MalformedRow {
                id: String::new(),
                problem: "the in-memory tree's lock is poisoned".into(),
            });
        };
        let mut pending = std::mem::take(&mut state.pending);
        pending.sort_by_key(|e| e.position);
        for event in &pending {
            if tree.apply(event, false)? == Applied::Yes {
                events_after += 1;
            }
        }
        state.tree = tree;
        state.phase = Phase::Ready;
        let tree = &state.tree;
        Ok(MemoryLoad {
            checkpoint,
            scopes: tree.nodes.len(),
            key_versions: tree.nodes.iter().map(|n| n.key_versions.len()).sum(),
            grants: tree.grants.values().map(Vec::len).sum(),
            events_after,
            position: tree.position,
        })
    }

    /// The scope as `ReadModels::scope` shows it, or `None` if it is unknown here. The
    /// master key's activation (`Destruction::master_activated_position`) is not an event:
    /// the caller fills it for snapshots with a destruction.
    pub fn snapshot(&self, id: ScopeId) -> Result<Option<ScopeSnapshot>, ProjectionError> {
        let Ok(state) = self.state.read() else {
            return Ok(None);
        };
        state.tree.snapshot(id)
    }

    /// The rate limits organization `org` set (ADR 0036): read on every limited request,
    /// so without building a snapshot. Defaults when it set none or is unknown here.
    pub fn rate_limits(&self, org: ScopeId) -> ekm_domain::RateLimits {
        let Ok(state) = self.state.read() else {
            return Default::default();
        };
        let Some(slot) = state.tree.index.get(&org).copied() else {
            return Default::default();
        };
        state.tree.nodes[slot as usize]
            .rare
            .as_ref()
            .and_then(|rare| rare.org.as_ref())
            .map(|org| org.rate_limits)
            .unwrap_or_default()
    }

    /// The sequence of the last event of `id`'s aggregate this tree applied (for a scope
    /// loaded from its row, the row's version: every event moves it). A command may decide on a cached aggregate at this sequence without reading
    /// the store: if another instance appended meanwhile, the append conflicts (ADR 0020).
    pub fn sequence_of(&self, id: ScopeId) -> Option<i64> {
        let state = self.state.read().ok()?;
        let slot = state.tree.index.get(&id).copied()?;
        let node = &state.tree.nodes[slot as usize];
        Some(node.version)
    }

    /// What `principal` holds in `org` at `now` (microseconds since the epoch), in the order
    /// granted (as `Tokens::grants_of`), and when the first of them expires: expired grants
    /// do not count, whether or not the scheduler has removed them yet.
    pub fn grants_of(&self, org: OrgId, principal: &str, now: i64) -> (Vec<Grant>, Option<i64>) {
        let Ok(state) = self.state.read() else {
            return (vec![], None);
        };
        let tree = &state.tree;
        let Some(rows) = tree.grants.get(&org.scope_id()) else {
            return (vec![], None);
        };
        let mut rows: Vec<&GrantRow> = rows
            .iter()
            .filter(|g| &*g.principal == principal && g.expires_at.is_none_or(|e| e > now))
            .collect();
        rows.sort_by_key(|g| g.granted_position);
        let until = rows.iter().filter_map(|g| g.expires_at).min();
        let grants = rows
            .into_iter()
            .filter_map(|g| {
                Some(Grant {
                    principal: PrincipalName::parse(&g.principal).ok()?,
                    permission: tree.strings.get(g.permission).parse::<Permission>().ok()?,
                    scope: g.scope_id,
                })
            })
            .collect();
        (grants, until)
    }

    /// Every grant, as `grants_view` rows ordered by granted position (for comparisons).
    pub fn grant_records(&self) -> Vec<GrantRecord> {
        let Ok(state) = self.state.read() else {
            return vec![];
        };
        let tree = &state.tree;
        let mut out: Vec<GrantRecord> = tree
            .grants
            .iter()
            .flat_map(|(org, rows)| {
                rows.iter().map(|g| GrantRecord {
                    org_id: *org,
                    principal: g.principal.to_string(),
                    permission: tree.strings.get(g.permission).to_owned(),
                    scope_id: g.scope_id.map(|s| s.to_string()).unwrap_or_default(),
                    granted_position: g.granted_position,
                    granted_at: g.granted_at,
                    granted_by: tree.strings.get(g.granted_by).to_owned(),
                    expires_at: g.expires_at,
                })
            })
            .collect();
        out.sort_by_key(|g| g.granted_position);
        out
    }

    /// Every scope id it holds.
    pub fn ids(&self) -> Vec<ScopeId> {
        self.state
            .read()
            .map(|s| s.tree.nodes.iter().map(|n| n.id).collect())
            .unwrap_or_default()
    }

    /// An estimate of the heap this tree holds, in bytes (structures and their
    /// allocations, without the allocator's own overhead).
    pub fn heap_bytes(&self) -> usize {
        let Ok(state) = self.state.read() else {
            return 0;
        };
        state.tree.heap_bytes()
    }
}

/// A rotation period as a row or an event wrote it: its length in seconds, 0 when it cannot
/// be read (a row written around the aggregate: it then sets nothing, and the scope
/// inherits, rather than rotating at every look).
fn rotation(text: &str) -> (u64, Box<str>) {
    let seconds = match ekm_domain::RotationPeriod::parse("rotation_period", text) {
        Ok(period) => period.seconds(),
        Err(_) => {
            tracing::warn!(
                period = text,
                "a rotation period that cannot be read is ignored"
            );
            0
        }
    };
    (seconds, text.into())
}

/// The kind a key's next rotation is listed under in the schedule (its subject: the version
/// it replaces).
pub const ROTATION: &str = "rotation";

/// A key whose rotation period has run out (issue 17 §2).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RotationDue {
    pub scope_id: ScopeId,
    /// The current version, which the rotation replaces (`AutoRotate { from }`).
    pub from: ekm_domain::KeyVersion,
    /// The period in force, as set (on the scope or the nearest ancestor that set one).
    pub period: String,
    /// When it fell due, in microseconds since the epoch.
    pub due_at: i64,
}

impl MemoryTree {
    /// The keys due for rotation at `now` (microseconds since the epoch), at most `limit`,
    /// and when the next one falls due (`now` when more are due than `limit`). A scope's
    /// period is its own, else the nearest ancestor's; its current key version falls due
    /// that long after it was created. Revoked subtrees rotate nothing, nor do
    /// organizations whose customer master key is unavailable (nothing could be minted).
    /// One pass over the tree under the read lock (1M scopes: BENCHMARKS.md), so no schedule
    /// row per scope has to be rewritten when an organization's period changes.
    pub fn rotations_due(&self, now: i64, limit: usize) -> (Vec<RotationDue>, Option<i64>) {
        self.rotations_due_from(now, limit, 0, &|_, _| false)
    }

    /// The next rotation of every key of organization `org` that has a period in force, in
    /// the schedule's order (due time, scope id, then the version it replaces), after
    /// `after` (that order's key of the last one listed), at most `limit`: what the schedule
    /// listing shows beside its rows. One pass over the tree.
    pub fn org_rotations(
        &self,
        org: ScopeId,
        after: Option<(i64, String, String, String)>,
        limit: usize,
    ) -> Vec<RotationDue> {
        let Ok(state) = self.state.read() else {
            return vec![];
        };
        let tree = &state.tree;
        // Most organizations set no period: no pass over the tree for them.
        if tree.rotation_orgs.get(&org).copied().unwrap_or(0) == 0 {
            return vec![];
        }
        let mut out: Vec<((i64, String, String, String), RotationDue)> = vec![];
        for node in &tree.nodes {
            let Some((due_at, period, root)) = tree.next_rotation(node) else {
                continue;
            };
            if root != org {
                continue;
            }
            let key = (
                due_at,
                node.id.to_string(),
                ROTATION.to_owned(),
                node.key_version.to_string(),
            );
            if after.as_ref().is_some_and(|a| key <= *a) {
                continue;
            }
            out.push((key, Tree::rotation_of(node, due_at, period)));
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out.into_iter().take(limit).map(|(_, r)| r).collect()
    }

    /// `rotations_due`, starting the pass at node `start` (instances start at random points,
    /// so two rarely work the same keys) and leaving out, without counting them against
    /// `limit`, the keys `skip` names (scope, current version: those waiting out a backoff).
    pub fn rotations_due_from(
        &self,
        now: i64,
        limit: usize,
        start: usize,
        skip: &dyn Fn(ScopeId, u32) -> bool,
    ) -> (Vec<RotationDue>, Option<i64>) {
        let Ok(state) = self.state.read() else {
            return (vec![], None);
        };
        let tree = &state.tree;
        let mut due = vec![];
        let mut next: Option<i64> = None;
        let count = tree.nodes.len();
        let start = if count == 0 { 0 } else { start % count };
        for node in tree.nodes[start..].iter().chain(&tree.nodes[..start]) {
            let Some((due_at, period, _)) = tree.next_rotation(node) else {
                continue;
            };
            if due_at > now {
                next = Some(next.map_or(due_at, |n| n.min(due_at)));
            } else if skip(node.id, node.key_version) {
                continue;
            } else if due.len() < limit {
                due.push(Tree::rotation_of(node, due_at, period));
            } else {
                next = Some(now);
            }
        }
        (due, next)
    }
}

fn malformed(id: &str, problem: impl Into<String>) -> ProjectionError {
    ProjectionError::MalformedRow {
        id: id.to_owned(),
        problem: problem.into(),
    }
}

impl Tree {
    /// The id of the root (organization) above the node at `slot`.
    fn root_of(&self, slot: u32) -> Option<ScopeId> {
        let mut at = self.nodes.get(slot as usize)?;
        let mut steps = 0;
        while at.parent != ROOT {
            at = self.nodes.get(at.parent as usize)?;
            steps += 1;
            if steps > self.nodes.len() {
                return None;
            }
        }
        Some(at.id)
    }

    /// The node's next rotation and its organization, or `None` if nothing would rotate it:
    /// no period in force (its own, else the nearest ancestor's), a revoke on its path, or
    /// its organization's customer key unavailable (nothing could be minted). Its current
    /// version falls due that long after it was created.
    /// Returns when it falls due (microseconds), the period as set, and the organization.
    fn next_rotation<'a>(&'a self, node: &'a Node) -> Option<(i64, &'a str, ScopeId)> {
        let mut period: Option<&(u64, Box<str>)> = None;
        let mut at = node;
        loop {
            if at.own_state == OwnState::Revoked {
                return None;
            }
            if period.is_none() {
                period = at
                    .rare
                    .as_ref()
                    .and_then(|r| r.rotation.as_ref())
                    .filter(|r| r.0 > 0);
            }
            match self.nodes.get(at.parent as usize) {
                Some(parent) if at.parent != ROOT => at = parent,
                _ => break,
            }
        }
        if Self::master_health(at) == KeyHealth::Unavailable {
            return None;
        }
        let (seconds, text) = period?;
        let current = node
            .key_versions
            .iter()
            .find(|k| k.version == node.key_version)?;
        let length = i64::try_from(*seconds)
            .unwrap_or(i64::MAX / 2_000_000)
            .saturating_mul(1_000_000);
        Some((current.created_at.saturating_add(length), text, at.id))
    }

    /// The rotation of `node` due at `due_at`, under `period`.
    fn rotation_of(node: &Node, due_at: i64, period: &str) -> RotationDue {
        RotationDue {
            scope_id: node.id,
            from: ekm_domain::KeyVersion::new(node.key_version),
            period: period.to_owned(),
            due_at,
        }
    }

    /// Counts, per organization, the scopes that set a rotation period (after a load).
    pub(super) fn count_rotation_orgs(&mut self) {
        let mut counts: HashMap<ScopeId, u32> = HashMap::new();
        for (slot, node) in self.nodes.iter().enumerate() {
            if node.rare.as_ref().is_some_and(|r| r.rotation.is_some()) {
                if let Some(org) = self.root_of(slot as u32) {
                    *counts.entry(org).or_default() += 1;
                }
            }
        }
        self.rotation_orgs = counts;
    }

    /// Records that the scope at `slot` now does (`set`) or does not set a period.
    pub(super) fn rotation_changed(&mut self, slot: u32, had: bool, set: bool) {
        if had == set {
            return;
        }
        let Some(org) = self.root_of(slot) else {
            return;
        };
        let count = self.rotation_orgs.entry(org).or_default();
        match set {
            true => *count += 1,
            false => *count = count.saturating_sub(1),
        }
    }

    fn path_slots(&self, slot: u32) -> Option<Vec<u32>> {
        let mut path = vec![slot];
        let mut at = slot;
        while let Some(node) = self.nodes.get(at as usize) {
            if node.parent == ROOT {
                path.reverse();
                return Some(path);
            }
            at = node.parent;
            path.push(at);
            if path.len() > self.nodes.len() {
                return None;
            }
        }
        None
    }

    fn change(&self, change: &Change) -> StateChange {
        StateChange {
            event: self.strings.get(change.event).to_owned(),
            position: change.position,
            at: from_micros(change.at),
            actor: self.strings.get(change.actor).to_owned(),
            reason: change.reason.as_deref().map(str::to_owned),
        }
    }

    fn master_health(node: &Node) -> KeyHealth {
        match node.rare.as_ref().and_then(|r| r.org.as_ref()) {
            Some(org) if org.master_health == Some(KeyHealth::Unavailable) => {
                KeyHealth::Unavailable
            }
            _ => KeyHealth::Available,
        }
    }

    fn master_change(node: &Node) -> Option<StateChange> {
        let org = node.rare.as_ref()?.org.as_ref()?;
        let position = org.master_position?;
        let health = Self::master_health(node);
        Some(StateChange {
            event: if health == KeyHealth::Unavailable {
                "OrganizationMasterKeyHealthChanged".to_owned()
            } else {
                "OrganizationMasterKeyChanged".to_owned()
            },
            position,
            at: from_micros(org.master_at.unwrap_or(0)),
            actor: "system".to_owned(),
            reason: org.master_reason.as_deref().map(str::to_owned),
        })
    }

    fn record(&self, node: &Node, path: Vec<ScopeId>) -> ScopeRecord {
        let rare = node.rare.as_deref();
        let org = rare.and_then(|r| r.org.as_ref());
        ScopeRecord {
            id: node.id,
            org_id: OrgId::of_root(path.first().copied().unwrap_or(node.id)),
            parent_id: (node.parent != ROOT).then(|| self.nodes[node.parent as usize].id),
            kind: node.kind,
            name: node.name.to_string(),
            path,
            own_state: node.own_state,
            plan: org.and_then(|o| o.plan),
            tier: org.and_then(|o| o.tier),
            key_version: node.key_version,
            version: node.version,
            created_at: from_micros(node.created_at),
            updated_position: node.updated_position,
            state_change: rare
                .and_then(|r| r.state_change.as_ref())
                .map(|c| self.change(c)),
            master_key: org.and_then(|o| o.master_key.clone()),
            master_health: Self::master_health(node),
            master_change: Self::master_change(node),
            master_detail: org.and_then(|o| o.master_detail.as_deref().map(str::to_owned)),
            rekey_state: node.rekey.as_str().map(str::to_owned),
            rekey_done_position: rare.and_then(|r| r.rekey_done_position),
            justification: rare.and_then(|r| r.justification.clone()),
            min_decryption_version: rare.and_then(|r| r.min_decryption).unwrap_or(1),
            revoke_due_at: rare.and_then(|r| r.revoke_due_at.as_deref().map(str::to_owned)),
            revoke_window: org.and_then(|o| o.revoke_window.as_deref().map(str::to_owned)),
            rotation_period: rare.and_then(|r| r.rotation.as_ref().map(|(_, p)| p.to_string())),
            rate_limits: org.map(|o| o.rate_limits).unwrap_or_default(),
        }
    }

    /// Mirrors `queries::snapshot`: the cascade from the own states on the path.
    fn snapshot(&self, id: ScopeId) -> Result<Option<ScopeSnapshot>, ProjectionError> {
        let Some(slot) = self.index.get(&id).copied() else {
            return Ok(None);
        };
        let slots = self.path_slots(slot).ok_or_else(|| {
            malformed(
                &id.to_string(),
                "an ancestor is missing from the scope tree",
            )
        })?;
        let nodes: Vec<&Node> = slots.iter().map(|s| &self.nodes[*s as usize]).collect();
        let (Some(org), Some(node)) = (nodes.first(), nodes.last()) else {
            return Err(malformed(&id.to_string(), "empty path"));
        };
        let path: Vec<ScopeId> = nodes.iter().map(|n| n.id).collect();
        let health = Self::master_health(org);
        let inherited =
            effective_state(nodes[..nodes.len() - 1].iter().map(|n| (n.id, n.own_state)));
        let effective = inherited
            .child(node.id, node.own_state)
            .with_master_key(org.id, health);
        let inherited = if nodes.len() > 1 {
            inherited.with_master_key(org.id, health)
        } else {
            inherited
        };
        let cause = effective.cause().and_then(|by| {
            let cause = nodes.iter().find(|n| n.id == by)?;
            let change = match effective {
                Effective::Unavailable { .. } => Self::master_change(cause),
                _ => cause
                    .rare
                    .as_ref()
                    .and_then(|r| r.state_change.as_ref())
                    .map(|c| self.change(c)),
            };
            Some(Cause {
                scope_id: cause.id,
                kind: cause.kind,
                name: cause.name.to_string(),
                change,
                due_at: match effective {
                    Effective::PendingRevocation { .. } => cause
                        .rare
                        .as_ref()
                        .and_then(|r| r.revoke_due_at.as_deref().map(str::to_owned)),
                    _ => None,
                },
            })
        });
        let org_fields = org.rare.as_ref().and_then(|r| r.org.as_ref());
        let destruction = nodes
            .iter()
            .find(|n| n.own_state == OwnState::Revoked)
            .map(|n| Destruction {
                revoked: n.id,
                live_done_position: n
                    .rare
                    .as_ref()
                    .and_then(|r| r.rekey_done_position)
                    .filter(|_| n.rekey == Rekey::Done),
                master_activated_position: None,
            });
        let key_versions = node
            .key_versions
            .iter()
            .map(|k| KeyVersionRecord {
                version: k.version,
                created_at: from_micros(k.created_at),
                fingerprint: k.fingerprint.text(),
                retired: k.retired,
            })
            .collect();
        let justification = EffectiveJustification::along(
            nodes
                .iter()
                .map(|n| (n.id, n.rare.as_ref().and_then(|r| r.justification.as_ref()))),
        );
        Ok(Some(ScopeSnapshot {
            justification,
            scope: self.record(node, path),
            effective,
            inherited,
            cause,
            org_plan: org_fields.and_then(|o| o.plan).unwrap_or(Plan::Standard),
            org_tier: org_fields.and_then(|o| o.tier).unwrap_or(Tier::Default),
            key_versions,
            destruction,
        }))
    }

    fn heap_bytes(&self) -> usize {
        use std::mem::size_of;
        let index = self.index.capacity() * (size_of::<ScopeId>() + size_of::<u32>() + 1);
        let nodes = self.nodes.capacity() * size_of::<Node>();
        let owned: usize = self
            .nodes
            .iter()
            .map(|n| {
                n.name.len()
                    + n.key_versions.len() * size_of::<KeyVer>()
                    + n.key_versions
                        .iter()
                        .map(|k| match &k.fingerprint {
                            Fingerprint::Text(t) => t.len(),
                            _ => 0,
                        })
                        .sum::<usize>()
                    + n.rare.as_ref().map_or(0, |r| {
                        size_of::<Rare>()
                            + r.state_change
                                .as_ref()
                                .and_then(|c| c.reason.as_ref())
                                .map_or(0, |t| t.len())
                            + r.justification.as_ref().map_or(0, |p| {
                                p.allowed.iter().map(|c| c.as_str().len() + 24).sum()
                            })
                    })
            })
            .sum();
        let grants: usize = self
            .grants
            .values()
            .map(|rows| {
                rows.capacity() * size_of::<GrantRow>()
                    + rows.iter().map(|g| g.principal.len()).sum::<usize>()
            })
            .sum();
        index + nodes + owned + grants
    }
}
