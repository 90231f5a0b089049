//! Applying one event to the tree, as the scope tree projection applies it to its rows.

use ekm_domain::{JustificationPolicy, KeyHealth, OwnState, ScopeEvent, ScopeId, ScopeKind};
use ekm_store::time::to_micros;
use ekm_store::StoredEvent;

use super::{
    malformed, Applied, Change, Fingerprint, GrantRow, KeyVer, Node, OrgFields, Rare, Rekey, Tree,
    ROOT,
};
use crate::error::ProjectionError;

impl Tree {
    fn node_mut(&mut self, id: &str) -> Result<&mut Node, ProjectionError> {
        let scope = ScopeId::parse(id).map_err(|e| malformed(id, e.to_string()))?;
        let slot = self
            .index
            .get(&scope)
            .copied()
            .ok_or_else(|| malformed(id, "an event for a scope the tree does not hold"))?;
        Ok(&mut self.nodes[slot as usize])
    }

    pub(super) fn insert(&mut self, node: Node) -> u32 {
        let slot = u32::try_from(self.nodes.len()).unwrap_or(ROOT - 1);
        self.index.insert(node.id, slot);
        self.nodes.push(node);
        slot
    }

    /// Applies one event, unless already applied. With `strict`, an event that does not
    /// follow what this tree has seen of its aggregate is left out (`Applied::Gap`).
    pub(super) fn apply(
        &mut self,
        stored: &StoredEvent,
        strict: bool,
    ) -> Result<Applied, ProjectionError> {
        if stored.aggregate_type != "scope" || stored.position <= self.floor {
            return Ok(Applied::Skipped);
        }
        let id = ScopeId::parse(&stored.aggregate_id)
            .map_err(|e| malformed(&stored.aggregate_id, e.to_string()))?;
        if let Some(slot) = self.index.get(&id) {
            let node = &self.nodes[*slot as usize];
            if stored.sequence <= node.version {
                return Ok(Applied::Skipped);
            }
            if stored.sequence != node.version + 1 {
                if strict {
                    return Ok(Applied::Gap);
                }
                // The projector tells every event in position order, and the rows were
                // loaded at a checkpoint: an earlier event of this scope went missing.
                tracing::error!(
                    scope = %id,
                    position = stored.position,
                    sequence = stored.sequence,
                    applied = node.version,
                    "the in-memory scope tree was told an event whose predecessor it never \
                     applied; it applies it, and may differ from the read models until restart"
                );
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
                    key_version: key_version.get(),
                    version: stored.sequence,
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
                    key_version: key_version.get(),
                    version: stored.sequence,
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
                expires_at,
            } => {
                let actor = stored.event_metadata()?.actor.to_string();
                // As `grants_view`: a time that cannot be read counts as expired already.
                let expires_at =
                    expires_at.map(|e| crate::scope_tree::grant_expiry_micros(&e).unwrap_or(0));
                let permission = self.strings.intern(permission.as_str());
                let row = GrantRow {
                    principal: principal.as_str().into(),
                    permission,
                    scope_id,
                    granted_position: stored.position,
                    granted_at: at,
                    granted_by: self.strings.intern(&actor),
                    expires_at,
                };
                let rows = self.grants.entry(id).or_default();
                // Granted again (another expiry, or none): the new row replaces the older.
                rows.retain(|g| {
                    !(&*g.principal == principal.as_str()
                        && g.permission == permission
                        && g.scope_id == scope_id
                        && g.granted_position < stored.position)
                });
                rows.push(row);
                self.touch(stored)?;
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
                self.touch(stored)?;
            }
            // Nothing else in the scope's row, but its version (the ETag) moves.
            ScopeEvent::TokenIssued { .. }
            | ScopeEvent::TokenRevoked { .. }
            | ScopeEvent::ScopeResumeScheduled { .. }
            | ScopeEvent::RevocationRekeyProgressed { .. } => {
                self.touch(stored)?;
            }
            ScopeEvent::ScopePaused {} => self.state_change(stored, OwnState::Paused, at)?,
            ScopeEvent::ScopeResumed {} => self.state_change(stored, OwnState::Active, at)?,
            ScopeEvent::ScopeRevocationScheduled { due_at, .. } => {
                self.state_change(stored, OwnState::PendingRevocation, at)?;
                let node = self.node_mut(&stored.aggregate_id)?;
                node.rare.get_or_insert_with(Default::default).revoke_due_at =
                    Some(due_at.into_boxed_str());
            }
            ScopeEvent::ScopeRevocationCancelled { to } => {
                self.state_change(stored, to, at)?;
                let node = self.node_mut(&stored.aggregate_id)?;
                if let Some(rare) = node.rare.as_mut() {
                    rare.revoke_due_at = None;
                }
            }
            ScopeEvent::ScopeRotationPeriodSet { period } => {
                let slot = self.index.get(&id).copied();
                let node = self.touch(stored)?;
                let had = node.rare.as_ref().is_some_and(|r| r.rotation.is_some());
                let rotation = period.map(|p| super::rotation(&p));
                let set = rotation.is_some();
                if rotation.is_some() || node.rare.is_some() {
                    node.rare.get_or_insert_with(Default::default).rotation = rotation;
                }
                if let Some(slot) = slot {
                    self.rotation_changed(slot, had, set);
                }
            }
            ScopeEvent::OrganizationPolicySet { revoke_window } => {
                let node = self.touch(stored)?;
                org_fields(node).revoke_window = revoke_window.map(String::into_boxed_str);
            }
            ScopeEvent::OrganizationRateLimitsSet { limits } => {
                let node = self.touch(stored)?;
                org_fields(node).rate_limits = limits;
            }
            ScopeEvent::ScopeRevoked { .. } => {
                self.state_change(stored, OwnState::Revoked, at)?;
                let node = self.node_mut(&stored.aggregate_id)?;
                if let Some(rare) = node.rare.as_mut() {
                    rare.revoke_due_at = None;
                }
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
            ScopeEvent::ScopeMinDecryptionVersionSet { version } => {
                let node = self.touch(stored)?;
                let floor = (version.get() != 1).then_some(version.get());
                if floor.is_some() || node.rare.is_some() {
                    node.rare
                        .get_or_insert_with(Default::default)
                        .min_decryption = floor;
                }
            }
            ScopeEvent::ScopeJustificationPolicySet { required, allowed } => {
                let node = self.touch(stored)?;
                let policy = JustificationPolicy { required, allowed };
                let policy = (!policy.is_empty()).then_some(policy);
                if policy.is_some() || node.rare.is_some() {
                    node.rare.get_or_insert_with(Default::default).justification = policy;
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
            ScopeEvent::OrganizationPlanChanged { to, .. } => {
                let node = self.touch(stored)?;
                org_fields(node).plan = Some(to);
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
