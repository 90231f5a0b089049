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
    effective_state, Effective, Grant, KeyHealth, MasterKeyRef, OrgId, OwnState, Permission, Plan,
    PrincipalName, ScopeEvent, ScopeId, ScopeKind, Tier,
};
use ekm_store::time::{from_micros, to_micros};
use ekm_store::{Db, StoredEvent};
use futures_util::TryStreamExt;
use sqlx::Row;

use crate::error::ProjectionError;
use crate::queries::{
    Cause, Destruction, KeyVersionRecord, ScopeRecord, ScopeSnapshot, StateChange,
};
use crate::runner::{EventListener, Projector};

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
    /// Whether `seen` is the aggregate's sequence (a scope loaded from its row knows only
    /// the version the row shows, which events such as grants do not move).
    exact: bool,
    key_version: u32,
    version: i64,
    /// The sequence of the last event of this aggregate applied here.
    seen: i64,
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

    /// What `principal` was granted in `org`, in the order granted (as `Tokens::grants_of`).
    pub fn grants_of(&self, org: OrgId, principal: &str) -> Vec<Grant> {
        let Ok(state) = self.state.read() else {
            return vec![];
        };
        let tree = &state.tree;
        let Some(rows) = tree.grants.get(&org.scope_id()) else {
            return vec![];
        };
        let mut rows: Vec<&GrantRow> = rows.iter().filter(|g| &*g.principal == principal).collect();
        rows.sort_by_key(|g| g.granted_position);
        rows.into_iter()
            .filter_map(|g| {
                Some(Grant {
                    principal: PrincipalName::parse(&g.principal).ok()?,
                    permission: tree.strings.get(g.permission).parse::<Permission>().ok()?,
                    scope: g.scope_id,
                })
            })
            .collect()
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

fn malformed(id: &str, problem: impl Into<String>) -> ProjectionError {
    ProjectionError::MalformedRow {
        id: id.to_owned(),
        problem: problem.into(),
    }
}

impl Tree {
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
        Ok(Some(ScopeSnapshot {
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

    fn node_mut(&mut self, id: &str) -> Result<&mut Node, ProjectionError> {
        let scope = ScopeId::parse(id).map_err(|e| malformed(id, e.to_string()))?;
        let slot = self
            .index
            .get(&scope)
            .copied()
            .ok_or_else(|| malformed(id, "an event for a scope the tree does not hold"))?;
        Ok(&mut self.nodes[slot as usize])
    }

    fn insert(&mut self, node: Node) -> u32 {
        let slot = u32::try_from(self.nodes.len()).unwrap_or(ROOT - 1);
        self.index.insert(node.id, slot);
        self.nodes.push(node);
        slot
    }

    /// Applies one event, unless already applied. With `strict`, an event that does not
    /// follow what this tree has seen of its aggregate is left out (`Applied::Gap`).
    fn apply(&mut self, stored: &StoredEvent, strict: bool) -> Result<Applied, ProjectionError> {
        if stored.aggregate_type != "scope" || stored.position <= self.floor {
            return Ok(Applied::Skipped);
        }
        let id = ScopeId::parse(&stored.aggregate_id)
            .map_err(|e| malformed(&stored.aggregate_id, e.to_string()))?;
        if let Some(slot) = self.index.get(&id) {
            let node = &self.nodes[*slot as usize];
            if stored.sequence <= node.seen {
                return Ok(Applied::Skipped);
            }
            if strict && node.exact && stored.sequence != node.seen + 1 {
                return Ok(Applied::Gap);
            }
        } else if strict && stored.sequence != 1 {
            return Ok(Applied::Gap);
        }
        let event = stored.scope_event()?;
        let at = to_micros(stored.recorded_at);
        let exists = self.index.contains_key(&id);
        match event {
            ScopeEvent::OrganizationCreated {
                name,
                plan,
                tier,
                key_version,
                key_fingerprint,
                ..
            } => {
                if exists {
                    return Ok(Applied::Skipped);
                }
                self.insert(Node {
                    id,
                    parent: ROOT,
                    kind: ScopeKind::Organization,
                    own_state: OwnState::Active,
                    rekey: Rekey::None,
                    exact: true,
                    key_version: key_version.get(),
                    version: stored.sequence,
                    seen: stored.sequence,
                    created_at: at,
                    updated_position: stored.position,
                    name: name.as_str().into(),
                    rare: Some(Box::new(Rare {
                        org: Some(OrgFields {
                            plan: Some(plan),
                            tier: Some(tier),
                            ..OrgFields::default()
                        }),
                        ..Rare::default()
                    })),
                    key_versions: Box::new([KeyVer {
                        version: key_version.get(),
                        retired: false,
                        created_at: at,
                        fingerprint: Fingerprint::new(key_fingerprint),
                    }]),
                });
                self.position = self.position.max(stored.position);
                return Ok(Applied::Yes);
            }
            ScopeEvent::ScopeCreated {
                kind,
                name,
                parent_id,
                key_version,
                key_fingerprint,
                ..
            } => {
                if exists {
                    return Ok(Applied::Skipped);
                }
                let Some(parent) = self.index.get(&parent_id).copied() else {
                    if strict {
                        return Ok(Applied::Gap);
                    }
                    return Err(malformed(
                        &stored.aggregate_id,
                        "created under a parent the tree does not hold",
                    ));
                };
                self.insert(Node {
                    id,
                    parent,
                    kind,
                    own_state: OwnState::Active,
                    rekey: Rekey::None,
                    exact: true,
                    key_version: key_version.get(),
                    version: stored.sequence,
                    seen: stored.sequence,
                    created_at: at,
                    updated_position: stored.position,
                    name: name.as_str().into(),
                    rare: None,
                    key_versions: Box::new([KeyVer {
                        version: key_version.get(),
                        retired: false,
                        created_at: at,
                        fingerprint: Fingerprint::new(key_fingerprint),
                    }]),
                });
                self.position = self.position.max(stored.position);
                return Ok(Applied::Yes);
            }
            _ if !exists => {
                if strict {
                    return Ok(Applied::Gap);
                }
                return Err(malformed(
                    &stored.aggregate_id,
                    "an event for a scope the tree does not hold",
                ));
            }
            ScopeEvent::PermissionGranted {
                principal,
                permission,
                scope_id,
            } => {
                let actor = stored.event_metadata()?.actor.to_string();
                let row = GrantRow {
                    principal: principal.as_str().into(),
                    permission: self.strings.intern(permission.as_str()),
                    scope_id,
                    granted_position: stored.position,
                    granted_at: at,
                    granted_by: self.strings.intern(&actor),
                };
                self.grants.entry(id).or_default().push(row);
            }
            ScopeEvent::PermissionRevoked {
                principal,
                permission,
                scope_id,
            } => {
                let permission = self.strings.intern(permission.as_str());
                if let Some(rows) = self.grants.get_mut(&id) {
                    rows.retain(|g| {
                        !(&*g.principal == principal.as_str()
                            && g.permission == permission
                            && g.scope_id == scope_id
                            && g.granted_position < stored.position)
                    });
                }
            }
            ScopeEvent::TokenIssued { .. }
            | ScopeEvent::TokenRevoked { .. }
            | ScopeEvent::RevocationRekeyProgressed { .. } => {}
            ScopeEvent::ScopePaused {} => self.state_change(stored, OwnState::Paused, at)?,
            ScopeEvent::ScopeResumed {} => self.state_change(stored, OwnState::Active, at)?,
            ScopeEvent::ScopeRevoked {} => {
                self.state_change(stored, OwnState::Revoked, at)?;
                let node = self.node_mut(&stored.aggregate_id)?;
                node.rekey = Rekey::Pending;
                if let Some(rare) = node.rare.as_mut() {
                    rare.rekey_done_position = None;
                }
            }
            ScopeEvent::RevocationRekeyStarted { .. } => {
                let node = self.touch(stored)?;
                node.rekey = Rekey::Running;
                if let Some(rare) = node.rare.as_mut() {
                    rare.rekey_done_position = None;
                }
            }
            ScopeEvent::RevocationRekeyCompleted { .. } => {
                let node = self.touch(stored)?;
                node.rekey = Rekey::Done;
                node.rare
                    .get_or_insert_with(Default::default)
                    .rekey_done_position = Some(stored.position);
            }
            ScopeEvent::ScopeKeyRotated {
                key_version,
                key_fingerprint,
            } => {
                let node = self.touch(stored)?;
                node.key_version = key_version.get();
                let mut versions = std::mem::take(&mut node.key_versions).into_vec();
                versions.push(KeyVer {
                    version: key_version.get(),
                    retired: false,
                    created_at: at,
                    fingerprint: Fingerprint::new(key_fingerprint),
                });
                versions.sort_by_key(|k| k.version);
                node.key_versions = versions.into_boxed_slice();
            }
            ScopeEvent::ScopeKeyVersionsRetired { below } => {
                let node = self.touch(stored)?;
                for version in node.key_versions.iter_mut() {
                    if version.version < below.get() {
                        version.retired = true;
                    }
                }
            }
            ScopeEvent::OrganizationTierChanged { to, .. } => {
                let node = self.touch(stored)?;
                org_fields(node).tier = Some(to);
            }
            ScopeEvent::OrganizationMasterKeyChanged { to, tier_to, .. } => {
                let position = stored.position;
                let node = self.touch(stored)?;
                let org = org_fields(node);
                org.tier = Some(tier_to);
                org.master_health = to.as_ref().map(|_| KeyHealth::Available);
                org.master_key = to;
                org.master_reason = None;
                org.master_detail = None;
                org.master_position = Some(position);
                org.master_at = Some(at);
            }
            ScopeEvent::OrganizationMasterKeyHealthChanged {
                health,
                reason,
                detail,
            } => {
                let position = stored.position;
                let node = self.touch(stored)?;
                let org = org_fields(node);
                org.master_health = Some(health);
                org.master_reason = reason.map(|r| r.as_str().into());
                org.master_detail = Some(detail.into_boxed_str());
                org.master_position = Some(position);
                org.master_at = Some(at);
            }
        }
        let node = self.node_mut(&stored.aggregate_id)?;
        node.seen = stored.sequence;
        node.exact = true;
        self.position = self.position.max(stored.position);
        Ok(Applied::Yes)
    }

    /// The node of the event's aggregate, with its version and updated position moved to
    /// the event (as the row's `version` and `updated_position` columns).
    fn touch(&mut self, stored: &StoredEvent) -> Result<&mut Node, ProjectionError> {
        let node = self.node_mut(&stored.aggregate_id)?;
        node.version = stored.sequence;
        node.updated_position = stored.position;
        Ok(node)
    }

    fn state_change(
        &mut self,
        stored: &StoredEvent,
        state: OwnState,
        at: i64,
    ) -> Result<(), ProjectionError> {
        let metadata = stored.event_metadata()?;
        let change = Change {
            event: self.strings.intern(&stored.event_type),
            position: stored.position,
            at,
            actor: self.strings.intern(&metadata.actor.to_string()),
            reason: metadata.reason.map(|r| r.as_str().into()),
        };
        let node = self.touch(stored)?;
        node.own_state = state;
        node.rare.get_or_insert_with(Default::default).state_change = Some(change);
        Ok(())
    }
}

fn org_fields(node: &mut Node) -> &mut OrgFields {
    node.rare
        .get_or_insert_with(Default::default)
        .org
        .get_or_insert_with(Default::default)
}

const LOAD_SCOPES: &str = "SELECT id, parent_id, kind, name, own_state, plan, tier, key_version, \
    version, created_at, updated_position, state_event, state_position, state_at, state_actor, \
    state_reason, master_key, master_health, master_reason, master_detail, master_position, \
    master_at, rekey_state, rekey_done_position FROM scope_view";
const LOAD_KEY_VERSIONS: &str = "SELECT scope_id, version, created_at, fingerprint, \
    retired_position FROM key_version_view ORDER BY scope_id, version";
const LOAD_GRANTS: &str = "SELECT org_id, principal, permission, scope_id, granted_position, \
    granted_at, granted_by FROM grants_view ORDER BY granted_position";
const LOAD_CHECKPOINT: &str =
    "SELECT position FROM projection_checkpoints WHERE name = 'scope_tree'";

/// Reads the three tables and the checkpoint inside `$tx`, one consistent snapshot.
macro_rules! read_rows_in {
    ($tx:ident) => {{
        let tx = &mut $tx;
        let checkpoint: Option<i64> = sqlx::query_scalar(LOAD_CHECKPOINT)
            .fetch_optional(&mut **tx)
            .await?;
        let mut tree = Tree {
            floor: checkpoint.unwrap_or(0),
            position: checkpoint.unwrap_or(0),
            ..Tree::default()
        };
        let count: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM scope_view")
            .fetch_one(&mut **tx)
            .await?;
        let count = usize::try_from(count).unwrap_or(0);
        tree.nodes.reserve_exact(count);
        tree.index.reserve(count);
        let mut parents: Vec<Option<ScopeId>> = Vec::with_capacity(count);
        {
            let mut rows = sqlx::query(LOAD_SCOPES).fetch(&mut **tx);
            while let Some(row) = rows.try_next().await? {
                let (node, parent) = decode_node(&mut tree.strings, &row)?;
                tree.insert(node);
                parents.push(parent);
            }
        }
        for (slot, parent) in parents.into_iter().enumerate() {
            if let Some(parent) = parent {
                let id = tree.nodes[slot].id;
                let parent = tree.index.get(&parent).copied().ok_or_else(|| {
                    malformed(&id.to_string(), "its parent is not in the scope tree")
                })?;
                tree.nodes[slot].parent = parent;
            }
        }
        {
            let mut rows = sqlx::query(LOAD_KEY_VERSIONS).fetch(&mut **tx);
            let mut current: Option<(u32, Vec<KeyVer>)> = None;
            while let Some(row) = rows.try_next().await? {
                let scope: String = row.try_get("scope_id")?;
                let id = ScopeId::parse(&scope).map_err(|e| malformed(&scope, e.to_string()))?;
                let Some(slot) = tree.index.get(&id).copied() else {
                    continue;
                };
                let version: i64 = row.try_get("version")?;
                let retired: Option<i64> = row.try_get("retired_position")?;
                let key = KeyVer {
                    version: u32::try_from(version)
                        .map_err(|e| malformed(&scope, e.to_string()))?,
                    retired: retired.is_some(),
                    created_at: row.try_get("created_at")?,
                    fingerprint: Fingerprint::new(row.try_get("fingerprint")?),
                };
                match &mut current {
                    Some((at, versions)) if *at == slot => versions.push(key),
                    _ => {
                        if let Some((at, versions)) = current.take() {
                            tree.nodes[at as usize].key_versions = versions.into_boxed_slice();
                        }
                        current = Some((slot, vec![key]));
                    }
                }
            }
            if let Some((at, versions)) = current.take() {
                tree.nodes[at as usize].key_versions = versions.into_boxed_slice();
            }
        }
        {
            let mut rows = sqlx::query(LOAD_GRANTS).fetch(&mut **tx);
            while let Some(row) = rows.try_next().await? {
                let org: String = row.try_get("org_id")?;
                let org_id = ScopeId::parse(&org).map_err(|e| malformed(&org, e.to_string()))?;
                let scope: String = row.try_get("scope_id")?;
                let scope_id = if scope.is_empty() {
                    None
                } else {
                    Some(ScopeId::parse(&scope).map_err(|e| malformed(&org, e.to_string()))?)
                };
                let permission: String = row.try_get("permission")?;
                let granted_by: String = row.try_get("granted_by")?;
                let principal: String = row.try_get("principal")?;
                let grant = GrantRow {
                    principal: principal.into_boxed_str(),
                    permission: tree.strings.intern(&permission),
                    scope_id,
                    granted_position: row.try_get("granted_position")?,
                    granted_at: row.try_get("granted_at")?,
                    granted_by: tree.strings.intern(&granted_by),
                };
                tree.grants.entry(org_id).or_default().push(grant);
            }
        }
        Ok::<_, ProjectionError>((tree, checkpoint.unwrap_or(0)))
    }};
}

async fn read_rows(db: &Db) -> Result<(Tree, i64), ProjectionError> {
    match db {
        Db::Sqlite(db) => {
            // One read transaction: SQLite (WAL) reads every statement from one snapshot.
            let mut tx = db.read.begin().await?;
            let out = read_rows_in!(tx)?;
            tx.rollback().await?;
            Ok(out)
        }
        Db::Postgres(db) => {
            let mut tx = db.pool.begin().await?;
            sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
                .execute(&mut *tx)
                .await?;
            let out = read_rows_in!(tx)?;
            tx.rollback().await?;
            Ok(out)
        }
    }
}

fn decode_node<R>(
    strings: &mut Interner,
    row: &R,
) -> Result<(Node, Option<ScopeId>), ProjectionError>
where
    R: Row,
    for<'a> &'a str: sqlx::ColumnIndex<R>,
    for<'a> String: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
    for<'a> i64: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
{
    let id: String = row.try_get("id")?;
    let parse = |text: &str| ScopeId::parse(text).map_err(|e| malformed(&id, e.to_string()));
    let bad = |e: ekm_domain::ValueError| malformed(&id, e.to_string());
    let parent: Option<String> = row.try_get("parent_id")?;
    let kind: String = row.try_get("kind")?;
    let own_state: String = row.try_get("own_state")?;
    let plan: Option<String> = row.try_get("plan")?;
    let tier: Option<String> = row.try_get("tier")?;
    let state_event: Option<String> = row.try_get("state_event")?;
    let state_change = match state_event {
        Some(event) => Some(Change {
            event: strings.intern(&event),
            position: row
                .try_get::<Option<i64>, _>("state_position")?
                .unwrap_or(0),
            at: row.try_get::<Option<i64>, _>("state_at")?.unwrap_or(0),
            actor: strings.intern(
                &row.try_get::<Option<String>, _>("state_actor")?
                    .unwrap_or_default(),
            ),
            reason: row
                .try_get::<Option<String>, _>("state_reason")?
                .map(String::into_boxed_str),
        }),
        None => None,
    };
    let master_key: Option<String> = row.try_get("master_key")?;
    let master_key: Option<MasterKeyRef> = master_key
        .map(|text| serde_json::from_str(&text))
        .transpose()
        .map_err(|e| malformed(&id, e.to_string()))?;
    let master_health = match row
        .try_get::<Option<String>, _>("master_health")?
        .as_deref()
    {
        Some("unavailable") => Some(KeyHealth::Unavailable),
        Some(_) => Some(KeyHealth::Available),
        None => None,
    };
    let is_org = parent.is_none();
    let org = is_org.then(|| -> Result<OrgFields, ProjectionError> {
        Ok(OrgFields {
            plan: plan.as_deref().map(str::parse).transpose().map_err(bad)?,
            tier: tier.as_deref().map(str::parse).transpose().map_err(bad)?,
            master_key,
            master_health,
            master_reason: row
                .try_get::<Option<String>, _>("master_reason")?
                .map(String::into_boxed_str),
            master_detail: row
                .try_get::<Option<String>, _>("master_detail")?
                .map(String::into_boxed_str),
            master_position: row.try_get("master_position")?,
            master_at: row.try_get("master_at")?,
        })
    });
    let org = org.transpose()?;
    let rekey_state: Option<String> = row.try_get("rekey_state")?;
    let rekey_done_position: Option<i64> = row.try_get("rekey_done_position")?;
    let rare =
        (state_change.is_some() || rekey_done_position.is_some() || org.is_some()).then(|| {
            Box::new(Rare {
                state_change,
                rekey_done_position,
                org,
            })
        });
    let version: i64 = row.try_get("version")?;
    let key_version: i64 = row.try_get("key_version")?;
    let node = Node {
        id: parse(&id)?,
        parent: ROOT,
        kind: kind.parse().map_err(bad)?,
        own_state: own_state.parse().map_err(bad)?,
        rekey: Rekey::parse(rekey_state.as_deref()),
        exact: false,
        key_version: u32::try_from(key_version).map_err(|e| malformed(&id, e.to_string()))?,
        version,
        seen: version,
        created_at: row.try_get("created_at")?,
        updated_position: row.try_get("updated_position")?,
        name: row.try_get::<String, _>("name")?.into_boxed_str(),
        rare,
        key_versions: Box::new([]),
    };
    Ok((node, parent.as_deref().map(parse).transpose()?))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use cqrs_es::DomainEvent;
    use ekm_domain::metadata::{Actor, ActorKind, EventMetadata};
    use ekm_domain::{KeyVersion, Provider, Reason, ScopeName, UnavailableReason};

    use super::*;

    /// Hands out positions and per-aggregate sequences, as the event log would.
    #[derive(Default)]
    struct Log {
        position: i64,
        sequences: HashMap<ScopeId, i64>,
    }

    impl Log {
        fn event(&mut self, id: ScopeId, event: &ScopeEvent) -> StoredEvent {
            self.position += 1;
            let sequence = self.sequences.entry(id).or_default();
            *sequence += 1;
            let metadata = EventMetadata {
                actor: Actor {
                    kind: ActorKind::User,
                    id: "alice".into(),
                },
                request_id: "req".into(),
                reason: Reason::parse("incident 7").ok(),
                source_address: None,
                recorded_at: "2026-11-30T00:00:00Z".into(),
                location: None,
            };
            StoredEvent {
                position: self.position,
                recorded_at: chrono::Utc::now(),
                aggregate_type: "scope".into(),
                aggregate_id: id.to_string(),
                sequence: *sequence,
                event_type: event.event_type(),
                event_version: "1".into(),
                payload: serde_json::to_string(event).unwrap(),
                metadata: serde_json::to_string(&metadata.to_map()).unwrap(),
            }
        }
    }

    fn ready() -> MemoryTree {
        let tree = MemoryTree::new();
        tree.state.write().unwrap().phase = Phase::Ready;
        tree
    }

    /// An organization with a team and a thread in the team.
    struct Given {
        tree: MemoryTree,
        log: Log,
        org: ScopeId,
        team: ScopeId,
        thread: ScopeId,
    }

    fn given() -> Given {
        let mut log = Log::default();
        let org = OrgId::generate();
        let team = ScopeId::generate();
        let thread = ScopeId::generate();
        let name = |n: &str| ScopeName::parse(n).unwrap();
        let events = vec![
            log.event(
                org.scope_id(),
                &ScopeEvent::OrganizationCreated {
                    org_id: org,
                    name: name("acme"),
                    plan: Plan::Enterprise,
                    tier: Tier::Managed,
                    key_version: KeyVersion::FIRST,
                    admin_token_id: None,
                    key_fingerprint: Some("00112233445566778899aabbccddeeff".into()),
                },
            ),
            log.event(
                team,
                &ScopeEvent::ScopeCreated {
                    scope_id: team,
                    kind: ScopeKind::Team,
                    name: name("research"),
                    parent_id: org.scope_id(),
                    org_id: org,
                    path: vec![org.scope_id(), team],
                    key_version: KeyVersion::FIRST,
                    key_fingerprint: Some("not-hex".into()),
                },
            ),
            log.event(
                thread,
                &ScopeEvent::ScopeCreated {
                    scope_id: thread,
                    kind: ScopeKind::Thread,
                    name: name("chat"),
                    parent_id: team,
                    org_id: org,
                    path: vec![org.scope_id(), team, thread],
                    key_version: KeyVersion::FIRST,
                    key_fingerprint: None,
                },
            ),
        ];
        let tree = ready();
        assert_eq!(
            tree.apply(&events).unwrap(),
            vec![Applied::Yes, Applied::Yes, Applied::Yes]
        );
        Given {
            tree,
            log,
            org: org.scope_id(),
            team,
            thread,
        }
    }

    impl Given {
        fn when(&mut self, id: ScopeId, event: ScopeEvent) -> StoredEvent {
            let stored = self.log.event(id, &event);
            assert_eq!(
                self.tree.apply(std::slice::from_ref(&stored)).unwrap(),
                [Applied::Yes]
            );
            stored
        }

        fn snapshot(&self, id: ScopeId) -> ScopeSnapshot {
            self.tree.snapshot(id).unwrap().unwrap()
        }
    }

    #[test]
    fn snapshot_shows_path_plan_and_key_versions_when_nothing_changed() {
        let given = given();
        let thread = given.snapshot(given.thread);
        assert_eq!(thread.scope.path, vec![given.org, given.team, given.thread]);
        assert_eq!(thread.scope.org_id.scope_id(), given.org);
        assert_eq!(thread.scope.parent_id, Some(given.team));
        assert_eq!(thread.scope.name, "chat");
        assert_eq!(thread.effective, Effective::Active);
        assert_eq!(thread.inherited, Effective::Active);
        assert_eq!(thread.cause, None);
        assert_eq!(
            (thread.org_plan, thread.org_tier),
            (Plan::Enterprise, Tier::Managed)
        );
        assert_eq!(thread.scope.plan, None);
        let org = given.snapshot(given.org);
        assert_eq!(org.scope.plan, Some(Plan::Enterprise));
        assert_eq!(
            org.key_versions[0].fingerprint.as_deref(),
            Some("00112233445566778899aabbccddeeff")
        );
        let team = given.snapshot(given.team);
        assert_eq!(team.key_versions[0].fingerprint.as_deref(), Some("not-hex"));
    }

    #[test]
    fn pause_of_a_team_cascades_to_its_thread_with_the_team_as_cause() {
        let mut given = given();
        let paused = given.when(given.team, ScopeEvent::ScopePaused {});
        let thread = given.snapshot(given.thread);
        assert_eq!(thread.effective, Effective::Paused { by: given.team });
        assert_eq!(thread.inherited, Effective::Paused { by: given.team });
        let cause = thread.cause.unwrap();
        assert_eq!(
            (cause.scope_id, cause.name.as_str()),
            (given.team, "research")
        );
        let change = cause.change.unwrap();
        assert_eq!(change.event, "ScopePaused");
        assert_eq!(change.position, paused.position);
        assert_eq!(change.actor, "user:alice");
        assert_eq!(change.reason.as_deref(), Some("incident 7"));
        // The thread's own state and version are untouched; the team's moved.
        assert_eq!(thread.scope.own_state, OwnState::Active);
        assert_eq!(given.snapshot(given.team).scope.version, 2);
        // Resumed: active again, and the change is the resume.
        given.when(given.team, ScopeEvent::ScopeResumed {});
        let thread = given.snapshot(given.thread);
        assert_eq!(thread.effective, Effective::Active);
        assert_eq!(
            given.snapshot(given.team).scope.state_change.unwrap().event,
            "ScopeResumed"
        );
    }

    #[test]
    fn revoke_beats_a_higher_pause_and_the_highest_revoke_is_the_cause() {
        let mut given = given();
        given.when(given.org, ScopeEvent::ScopePaused {});
        given.when(given.thread, ScopeEvent::ScopeRevoked {});
        let thread = given.snapshot(given.thread);
        assert_eq!(thread.effective, Effective::Revoked { by: given.thread });
        assert_eq!(thread.inherited, Effective::Paused { by: given.org });
        given.when(given.team, ScopeEvent::ScopeRevoked {});
        let thread = given.snapshot(given.thread);
        assert_eq!(thread.effective, Effective::Revoked { by: given.team });
        assert_eq!(thread.cause.unwrap().scope_id, given.team);
        // The destruction is the highest revoke's, pending until its re-key completes.
        let destruction = thread.destruction.unwrap();
        assert_eq!(destruction.revoked, given.team);
        assert_eq!(destruction.live_done_position, None);
        given.when(
            given.team,
            ScopeEvent::RevocationRekeyStarted { ancestors: vec![] },
        );
        let done = given.when(
            given.team,
            ScopeEvent::RevocationRekeyCompleted { rewrapped: 1 },
        );
        let thread = given.snapshot(given.thread);
        assert_eq!(
            thread.destruction.unwrap().live_done_position,
            Some(done.position)
        );
        let team = given.snapshot(given.team);
        assert_eq!(team.scope.rekey_state.as_deref(), Some("done"));
    }

    #[test]
    fn an_unusable_master_key_makes_every_scope_unavailable_with_the_org_as_cause() {
        let mut given = given();
        let master = MasterKeyRef {
            provider: Provider::AwsKms,
            key_id: "alias/acme".into(),
            region: Some("eu-west-1".into()),
            endpoint_url: None,
        };
        given.when(
            given.org,
            ScopeEvent::OrganizationMasterKeyChanged {
                from: None,
                to: Some(master.clone()),
                tier_from: Tier::Managed,
                tier_to: Tier::Byok,
                rewrapped: vec![],
            },
        );
        assert_eq!(given.snapshot(given.thread).effective, Effective::Active);
        assert_eq!(given.snapshot(given.thread).org_tier, Tier::Byok);
        given.when(
            given.org,
            ScopeEvent::OrganizationMasterKeyHealthChanged {
                health: KeyHealth::Unavailable,
                reason: Some(UnavailableReason::Disabled),
                detail: "disabled by the customer".into(),
            },
        );
        let thread = given.snapshot(given.thread);
        assert_eq!(thread.effective, Effective::Unavailable { by: given.org });
        let change = thread.cause.unwrap().change.unwrap();
        assert_eq!(change.event, "OrganizationMasterKeyHealthChanged");
        assert_eq!(change.actor, "system");
        assert_eq!(change.reason.as_deref(), Some("disabled"));
        let org = given.snapshot(given.org);
        assert_eq!(org.scope.master_key, Some(master));
        assert_eq!(
            org.scope.master_detail.as_deref(),
            Some("disabled by the customer")
        );
        // A revoke below still wins over the master key.
        given.when(given.team, ScopeEvent::ScopeRevoked {});
        assert_eq!(
            given.snapshot(given.thread).effective,
            Effective::Revoked { by: given.team }
        );
    }

    #[test]
    fn rotation_adds_a_version_and_retiring_marks_the_older_ones() {
        let mut given = given();
        given.when(
            given.thread,
            ScopeEvent::ScopeKeyRotated {
                key_version: KeyVersion::new(2),
                key_fingerprint: Some("ffeeddccbbaa99887766554433221100".into()),
            },
        );
        given.when(
            given.thread,
            ScopeEvent::ScopeKeyVersionsRetired {
                below: KeyVersion::new(2),
            },
        );
        let thread = given.snapshot(given.thread);
        assert_eq!(thread.scope.key_version, 2);
        let versions: Vec<(u32, bool)> = thread
            .key_versions
            .iter()
            .map(|k| (k.version, k.retired))
            .collect();
        assert_eq!(versions, [(1, true), (2, false)]);
    }

    #[test]
    fn an_event_applied_twice_or_out_of_order_changes_nothing() {
        let mut given = given();
        let paused = given.when(given.team, ScopeEvent::ScopePaused {});
        // The projector tells it again after the command handed it over.
        assert_eq!(
            given.tree.apply(std::slice::from_ref(&paused)).unwrap(),
            [Applied::Skipped]
        );
        // A command's event whose predecessor (another instance's) has not arrived: left
        // for the projector, which tells both in order.
        let resumed = given.log.event(given.team, &ScopeEvent::ScopeResumed {});
        let paused_again = given.log.event(given.team, &ScopeEvent::ScopePaused {});
        assert_eq!(
            given
                .tree
                .apply(std::slice::from_ref(&paused_again))
                .unwrap(),
            [Applied::Gap]
        );
        assert_eq!(
            given.snapshot(given.thread).effective,
            Effective::Paused { by: given.team }
        );
        given.tree.told(&[resumed, paused_again.clone()]);
        let team = given.snapshot(given.team);
        assert_eq!(team.scope.version, 4);
        assert_eq!(
            team.scope.state_change.unwrap().position,
            paused_again.position
        );
        // A child whose parent is unknown here yet: also left for the projector.
        let orphan = ScopeId::generate();
        let unknown_parent = ScopeId::generate();
        let created = given.log.event(
            orphan,
            &ScopeEvent::ScopeCreated {
                scope_id: orphan,
                kind: ScopeKind::Thread,
                name: ScopeName::parse("x").unwrap(),
                parent_id: unknown_parent,
                org_id: OrgId::of_root(given.org),
                path: vec![given.org, unknown_parent, orphan],
                key_version: KeyVersion::FIRST,
                key_fingerprint: None,
            },
        );
        assert_eq!(given.tree.apply(&[created]).unwrap(), [Applied::Gap]);
        assert!(given.tree.snapshot(orphan).unwrap().is_none());
    }

    #[test]
    fn grants_follow_grant_and_revoke_in_position_order() {
        let mut given = given();
        let principal = PrincipalName::parse("svc").unwrap();
        let grant = |scope| ScopeEvent::PermissionGranted {
            principal: principal.clone(),
            permission: Permission::DataUse,
            scope_id: scope,
        };
        given.when(given.org, grant(Some(given.team)));
        given.when(given.org, grant(None));
        let org = OrgId::of_root(given.org);
        let scopes: Vec<Option<ScopeId>> = given
            .tree
            .grants_of(org, "svc")
            .iter()
            .map(|g| g.scope)
            .collect();
        assert_eq!(scopes, [Some(given.team), None]);
        given.when(
            given.org,
            ScopeEvent::PermissionRevoked {
                principal: principal.clone(),
                permission: Permission::DataUse,
                scope_id: Some(given.team),
            },
        );
        let left = given.tree.grants_of(org, "svc");
        assert_eq!(left.len(), 1);
        assert_eq!(left[0].scope, None);
        assert!(given.tree.grants_of(org, "someone-else").is_empty());
        // Grants do not move the organization's version (nor does its row's).
        assert_eq!(given.snapshot(given.org).scope.version, 1);
    }

    #[test]
    fn events_told_while_loading_are_kept_and_none_before() {
        let tree = MemoryTree::new();
        let mut given = given();
        let paused = given.log.event(given.team, &ScopeEvent::ScopePaused {});
        // Not in use (SQL reads): nothing accumulates.
        tree.told(std::slice::from_ref(&paused));
        assert_eq!(tree.state.read().unwrap().pending.len(), 0);
        // Loading: kept for after the rows.
        tree.state.write().unwrap().phase = Phase::Loading;
        tree.told(std::slice::from_ref(&paused));
        assert!(!tree.is_ready());
        assert!(tree.snapshot(given.team).unwrap().is_none());
        assert_eq!(tree.state.read().unwrap().pending.len(), 1);
    }
}
