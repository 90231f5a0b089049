//! The scope aggregate: one per scope, organizations included.

use cqrs_es::event_sink::EventSink;
use cqrs_es::Aggregate;
use serde::{Deserialize, Serialize};

use crate::access::Grant;
use crate::cascade::Effective;
use crate::commands::{Admitted, Command, Lineage, Needs, Prepared};
use crate::errors::ScopeError;
use crate::events::ScopeEvent;
use crate::ids::{KeyVersion, OrgId, ScopeId};
use crate::justification::JustificationPolicy;
use crate::master_key::{KeyHealth, MasterKeyRef, UnavailableReason};
use crate::scope::{OwnState, Plan, ScopeKind, ScopeName, Tier};

/// A scope, as rebuilt from its events. `None` until it is created.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Scope {
    state: Option<ScopeState>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScopeState {
    pub id: ScopeId,
    pub kind: ScopeKind,
    pub name: ScopeName,
    pub org_id: OrgId,
    pub parent_id: Option<ScopeId>,
    pub path: Vec<ScopeId>,
    pub own_state: OwnState,
    pub key_version: KeyVersion,
    /// Versions below this one are retired (1: none).
    #[serde(default = "first_version")]
    pub retired_below: KeyVersion,
    /// Only on organizations.
    pub plan: Option<Plan>,
    pub tier: Option<Tier>,
    /// Only on organizations: the customer's master key, if the tier is `byok`.
    #[serde(default)]
    pub master: Option<MasterKeyRef>,
    /// Only meaningful with a customer master key.
    #[serde(default = "available")]
    pub master_health: KeyHealth,
    #[serde(default)]
    pub master_unavailable: Option<UnavailableReason>,
    /// Organizations only: live grants and the ids of live tokens. Shared, not copied, when
    /// the aggregate is cloned (every command decides on a clone of the cached aggregate):
    /// an organization with 10,000 tokens paused as fast as one with 10. Changed copy on
    /// write, by the events that add or remove one (BENCHMARKS.md, "Commands against
    /// history"). Stored as the plain lists they were.
    #[serde(default)]
    pub grants: std::sync::Arc<Vec<Grant>>,
    /// The live grants that expire, with their instant (RFC 3339), as the events said.
    #[serde(default)]
    pub grant_expiries: std::sync::Arc<Vec<(Grant, String)>>,
    #[serde(default)]
    pub tokens: std::sync::Arc<Vec<String>>,
    /// Revoked scopes: how far the re-key that destroys their keys in every copy has got.
    #[serde(default)]
    pub rekey: Option<RekeyProgress>,
    /// The scope's own justification policy, if it set one (ADR 0027).
    #[serde(default)]
    pub justification: Option<JustificationPolicy>,
    /// Versions below this one do not decrypt (1: all do); `retire` destroys only below it.
    #[serde(default = "first_version")]
    pub min_decryption: KeyVersion,
    /// While paused: when the scheduler resumes it, if a pause set a time.
    #[serde(default)]
    pub resume_at: Option<String>,
    /// While `pending_revocation`: when it falls due, the own state a cancellation restores,
    /// and who asked.
    #[serde(default)]
    pub pending_revocation: Option<PendingRevocation>,
    /// Organizations: the default waiting period of a revoke (ISO 8601), if set.
    #[serde(default)]
    pub revoke_window: Option<String>,
    /// The scope's own rotation period (ISO 8601), if it set one.
    #[serde(default)]
    pub rotation_period: Option<String>,
    /// Organizations: the rate limits the operator set (the rest are the server's).
    #[serde(default)]
    pub rate_limits: crate::rate::RateLimits,
}

/// A revoke waiting for its due time (issue 17 §1).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingRevocation {
    pub due_at: String,
    pub from: OwnState,
    pub requested_by: String,
}

/// The re-key of a revoked scope's ancestors (ADR 0013).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RekeyProgress {
    pub ancestors: Vec<ScopeId>,
    pub done: Vec<ScopeId>,
    pub completed: bool,
}

fn available() -> KeyHealth {
    KeyHealth::Available
}

impl ScopeState {
    /// The key versions that still have key material: from the oldest unretired to the
    /// current one.
    pub fn live_versions(&self) -> Vec<KeyVersion> {
        (self.retired_below.get()..=self.key_version.get())
            .map(KeyVersion::new)
            .collect()
    }

    /// When a live grant expires, if it does.
    pub fn grant_expiry(&self, grant: &Grant) -> Option<&str> {
        self.grant_expiries
            .iter()
            .find(|(g, _)| g == grant)
            .map(|(_, at)| at.as_str())
    }
}

fn first_version() -> KeyVersion {
    KeyVersion::FIRST
}

impl Scope {
    pub fn state(&self) -> Option<&ScopeState> {
        self.state.as_ref()
    }

    fn existing(&self) -> Result<&ScopeState, ScopeError> {
        self.state.as_ref().ok_or(ScopeError::NotFound)
    }

    /// An existing organization that is not revoked: where tokens and grants live.
    fn organization(&self) -> Result<&ScopeState, ScopeError> {
        let state = self.existing()?;
        if state.tier.is_none() {
            return Err(ScopeError::NotAnOrganization);
        }
        if state.own_state == OwnState::Revoked {
            return Err(ScopeError::Revoked);
        }
        Ok(state)
    }

    /// The checks every lifecycle command shares: the scope exists, neither it nor an
    /// ancestor is revoked, and the organization may use scope controls.
    fn controllable(&self, lineage: &Lineage) -> Result<&ScopeState, ScopeError> {
        let state = self.existing()?;
        if state.own_state == OwnState::Revoked {
            return Err(ScopeError::Revoked);
        }
        if let Effective::Revoked { by } = lineage.inherited {
            return Err(ScopeError::AncestorRevoked { cause: by });
        }
        if lineage.plan != Plan::Enterprise {
            return Err(ScopeError::ControlsNeedEnterprise);
        }
        Ok(state)
    }

    /// A scope whose controls may be undone: not revoked, nor under a revoked ancestor, on
    /// any plan. Undoing (resume, lifting a justification policy, lowering a floor) works on
    /// the standard plan too, so that nothing set under enterprise can be stranded by a plan
    /// change (ADR 0029).
    fn undoable(&self, lineage: &Lineage) -> Result<&ScopeState, ScopeError> {
        let state = self.existing()?;
        if state.own_state == OwnState::Revoked {
            return Err(ScopeError::Revoked);
        }
        if let Effective::Revoked { by } = lineage.inherited {
            return Err(ScopeError::AncestorRevoked { cause: by });
        }
        Ok(state)
    }

    /// The lineage a lifecycle command was prepared with (a caller that did not look it up
    /// gets `NotFound`: the scope's ancestors are unknown).
    fn lineage(prepared: &Prepared) -> Result<&Lineage, ScopeError> {
        prepared.lineage.as_ref().ok_or(ScopeError::NotFound)
    }

    /// Whether `command` is admitted on this scope and what it needs made first (a key
    /// version, a re-wrap), or the rule it breaks. Pure, and checked before anything is
    /// made: a refused command mints no key and calls no KMS.
    pub fn admits(&self, command: &Command, prepared: &Prepared) -> Result<Admitted, ScopeError> {
        let (needs, events) = self.decision(command, prepared)?;
        Ok(match events.is_empty() {
            true => Admitted::Unchanged,
            false => Admitted::Records(needs),
        })
    }

    /// The events `command` produces on this scope with what was prepared for it, or the
    /// rule it breaks. Pure: the same state and pair always give the same answer. `handle`
    /// is this plus the sink.
    pub fn decide(
        &self,
        command: &Command,
        prepared: &Prepared,
    ) -> Result<Vec<ScopeEvent>, ScopeError> {
        Ok(self.decision(command, prepared)?.1)
    }

    /// The rules, once: what the command needs made, and the events it records with what
    /// `prepared` holds.
    fn decision(
        &self,
        command: &Command,
        prepared: &Prepared,
    ) -> Result<(Needs, Vec<ScopeEvent>), ScopeError> {
        let fingerprint = prepared.minted.as_ref().map(|m| m.fingerprint.clone());
        let nothing = |events: Vec<ScopeEvent>| Ok((Needs::Nothing, events));
        match command {
            Command::CreateOrganization {
                id,
                name,
                plan,
                tier,
                admin_token_id,
            } => {
                if self.state.is_some() {
                    return Err(ScopeError::AlreadyExists(id.scope_id()));
                }
                if *tier == Tier::Byok {
                    return Err(ScopeError::ByokNeedsMasterKey);
                }
                if *tier != Tier::Default && *plan != Plan::Enterprise {
                    return Err(ScopeError::TierNeedsEnterprise(*tier));
                }
                Ok((
                    Needs::KeyVersion(KeyVersion::FIRST),
                    vec![ScopeEvent::OrganizationCreated {
                        org_id: *id,
                        name: name.clone(),
                        plan: *plan,
                        tier: *tier,
                        key_version: KeyVersion::FIRST,
                        admin_token_id: admin_token_id.clone(),
                        key_fingerprint: fingerprint,
                    }],
                ))
            }
            Command::CreateScope { id, kind, name, .. } => {
                if self.state.is_some() {
                    return Err(ScopeError::AlreadyExists(*id));
                }
                let parent = prepared.parent.as_ref().ok_or(ScopeError::NotFound)?;
                if !kind.allows_parent(parent.kind) {
                    return Err(ScopeError::InvalidParent {
                        kind: *kind,
                        parent_kind: parent.kind,
                    });
                }
                if parent.path.len() >= crate::scope::MAX_DEPTH {
                    return Err(ScopeError::TooDeep {
                        max: crate::scope::MAX_DEPTH,
                    });
                }
                match parent.effective {
                    // Creating under an unusable master key fails earlier, when the new
                    // key cannot be wrapped; the aggregate has no further rule for it.
                    Effective::Active | Effective::Unavailable { .. } => {}
                    Effective::Paused { by } | Effective::PendingRevocation { by } => {
                        return Err(ScopeError::ParentPaused { cause: by })
                    }
                    Effective::Revoked { by } => {
                        return Err(ScopeError::ParentRevoked { cause: by })
                    }
                }
                let mut path = parent.path.clone();
                path.push(*id);
                Ok((
                    Needs::KeyVersion(KeyVersion::FIRST),
                    vec![ScopeEvent::ScopeCreated {
                        scope_id: *id,
                        kind: *kind,
                        name: name.clone(),
                        parent_id: parent.id,
                        org_id: parent.org_id,
                        path,
                        key_version: KeyVersion::FIRST,
                        key_fingerprint: fingerprint,
                    }],
                ))
            }
            Command::Pause => {
                let state = self.controllable(Self::lineage(prepared)?)?;
                Self::not_pending(state)?;
                nothing(match (state.own_state, &state.resume_at) {
                    // Paused until a time, now paused for good: the resume is cancelled.
                    (OwnState::Paused, Some(_)) => {
                        vec![ScopeEvent::ScopeResumeScheduled { at: None }]
                    }
                    (OwnState::Paused, None) => vec![],
                    _ => vec![ScopeEvent::ScopePaused {}],
                })
            }
            Command::PauseUntil(at) => {
                let state = self.controllable(Self::lineage(prepared)?)?;
                Self::not_pending(state)?;
                let schedule = ScopeEvent::ScopeResumeScheduled {
                    at: Some(at.clone()),
                };
                nothing(match state.own_state {
                    OwnState::Paused if state.resume_at.as_ref() == Some(at) => vec![],
                    OwnState::Paused => vec![schedule],
                    _ => vec![ScopeEvent::ScopePaused {}, schedule],
                })
            }
            Command::FireScheduledResume { at } => {
                let state = self.undoable(Self::lineage(prepared)?)?;
                nothing(
                    match state.own_state == OwnState::Paused
                        && state.resume_at.as_ref() == Some(at)
                    {
                        true => vec![ScopeEvent::ScopeResumed {}],
                        // Cancelled, replaced, fired by another instance, or resumed by hand.
                        false => vec![],
                    },
                )
            }
            Command::Resume => {
                let state = self.undoable(Self::lineage(prepared)?)?;
                // Resuming would undo a revocation silently: it is cancelled by name.
                Self::not_pending(state)?;
                nothing(match state.own_state {
                    OwnState::Active => vec![],
                    _ => vec![ScopeEvent::ScopeResumed {}],
                })
            }
            Command::Revoke { confirm } => {
                let state = self.controllable(Self::lineage(prepared)?)?;
                if confirm.trim() != state.id.to_string() {
                    return Err(ScopeError::ConfirmationMismatch);
                }
                nothing(vec![ScopeEvent::ScopeRevoked { requested_by: None }])
            }
            Command::ScheduleRevocation {
                confirm,
                due_at,
                requested_by,
            } => {
                let state = self.controllable(Self::lineage(prepared)?)?;
                if confirm.trim() != state.id.to_string() {
                    return Err(ScopeError::ConfirmationMismatch);
                }
                // One waiting period at a time: cancel it, or revoke immediately.
                Self::not_pending(state)?;
                let mut events = vec![];
                // A timed pause would resume in the middle of the waiting period; the
                // revocation supersedes it (a cancellation leaves the scope paused).
                if state.resume_at.is_some() {
                    events.push(ScopeEvent::ScopeResumeScheduled { at: None });
                }
                events.push(ScopeEvent::ScopeRevocationScheduled {
                    due_at: due_at.clone(),
                    from: state.own_state,
                    requested_by: requested_by.clone(),
                });
                nothing(events)
            }
            Command::CancelRevocation { now } => {
                let state = self.undoable(Self::lineage(prepared)?)?;
                match &state.pending_revocation {
                    // Both instants are RFC 3339 in UTC with microseconds, as EKM writes
                    // them, so their text order is their time order. Once due, the promise
                    // "revoked at T unless cancelled" holds even while the scheduler is late.
                    Some(pending) if now.as_str() >= pending.due_at.as_str() => {
                        Err(ScopeError::RevocationDue {
                            due_at: pending.due_at.clone(),
                        })
                    }
                    Some(pending) => nothing(vec![ScopeEvent::ScopeRevocationCancelled {
                        to: pending.from,
                    }]),
                    None => nothing(vec![]),
                }
            }
            Command::FireScheduledRevocation { at } => {
                let state = self.undoable(Self::lineage(prepared)?)?;
                nothing(match &state.pending_revocation {
                    Some(pending) if pending.due_at == *at => vec![ScopeEvent::ScopeRevoked {
                        requested_by: Some(pending.requested_by.clone()),
                    }],
                    // Cancelled, or rescheduled (after a cancellation).
                    _ => vec![],
                })
            }
            Command::SetOrgPolicy {
                revoke_window,
                rotation_period,
            } => {
                let state = self.organization()?;
                let mut events = vec![];
                if state.revoke_window != *revoke_window {
                    events.push(ScopeEvent::OrganizationPolicySet {
                        revoke_window: revoke_window.clone(),
                    });
                }
                if state.rotation_period != *rotation_period {
                    // Setting a period is a scope control; lifting one needs no plan.
                    if rotation_period.is_some() && state.plan != Some(Plan::Enterprise) {
                        return Err(ScopeError::ControlsNeedEnterprise);
                    }
                    events.push(ScopeEvent::ScopeRotationPeriodSet {
                        period: rotation_period.clone(),
                    });
                }
                nothing(events)
            }
            Command::SetRateLimits(limits) => {
                let state = self.organization()?;
                nothing(match state.rate_limits == *limits {
                    true => vec![],
                    false => vec![ScopeEvent::OrganizationRateLimitsSet { limits: *limits }],
                })
            }
            Command::SetRotationPeriod(period) => {
                let lineage = Self::lineage(prepared)?;
                // Unchanged records nothing on any plan, as the organization's policy does.
                match (self.undoable(lineage)?.rotation_period == *period, period) {
                    (true, _) => return nothing(vec![]),
                    (false, Some(_)) => self.controllable(lineage)?,
                    (false, None) => self.undoable(lineage)?,
                };
                nothing(vec![ScopeEvent::ScopeRotationPeriodSet {
                    period: period.clone(),
                }])
            }
            Command::AutoRotate { from } => {
                // As `Rotate`, on any plan (a period set under enterprise keeps rotating: it
                // only ever adds a key version), once: only while `from` is still current.
                let state = self.undoable(Self::lineage(prepared)?)?;
                if state.key_version != *from {
                    return nothing(vec![]);
                }
                Self::rotation(state, prepared, fingerprint)
            }
            Command::RetireKeyVersions(below) => {
                let below = *below;
                let state = self.controllable(Self::lineage(prepared)?)?;
                if below > state.key_version {
                    return Err(ScopeError::CannotRetireCurrent {
                        below,
                        current: state.key_version,
                    });
                }
                if below > state.min_decryption && below > state.retired_below {
                    return Err(ScopeError::RetireAboveFloor {
                        below,
                        floor: state.min_decryption,
                    });
                }
                Ok((
                    Needs::RewrapChildren(below),
                    if below <= state.retired_below {
                        vec![]
                    } else {
                        vec![ScopeEvent::ScopeKeyVersionsRetired { below }]
                    },
                ))
            }
            Command::ChangeTier(tier) if command.switches_master(prepared.customer_key) => {
                self.switch_master(None, *tier, prepared)
            }
            Command::SetMasterKey { master, tier }
                if command.switches_master(prepared.customer_key) =>
            {
                self.switch_master(master.clone(), *tier, prepared)
            }
            Command::ChangeTier(tier) | Command::SetMasterKey { tier, .. } => {
                let tier = *tier;
                let state = self.controllable(Self::lineage(prepared)?)?;
                let Some(from) = state.tier else {
                    return Err(ScopeError::NotAnOrganization);
                };
                if tier == Tier::Byok {
                    return Err(ScopeError::ByokNeedsMasterKey);
                }
                if state.master.is_some() {
                    return Err(ScopeError::MasterKeyInUse);
                }
                nothing(if from == tier {
                    vec![]
                } else {
                    vec![ScopeEvent::OrganizationTierChanged { from, to: tier }]
                })
            }
            Command::Rotate => {
                // Rotation stays allowed while paused: rotating during an investigation is
                // exactly when a customer wants it.
                let state = self.controllable(Self::lineage(prepared)?)?;
                Self::rotation(state, prepared, fingerprint)
            }
            Command::ChangePlan(plan) => {
                let state = self.existing()?;
                let Some(from) = state.plan else {
                    return Err(ScopeError::NotAnOrganization);
                };
                if state.own_state == OwnState::Revoked {
                    return Err(ScopeError::Revoked);
                }
                if from == *plan {
                    return nothing(vec![]);
                }
                if *plan != Plan::Enterprise {
                    let tier = state.tier.unwrap_or(Tier::Default);
                    if tier != Tier::Default || state.master.is_some() {
                        return Err(ScopeError::PlanNeedsDefaultTier(tier));
                    }
                    let controls = prepared.controls_in_force.ok_or(ScopeError::NotFound)?;
                    if !controls.is_empty() {
                        return Err(ScopeError::PlanLeavesControlsInForce {
                            paused: controls.paused,
                            policies: controls.justification_policies,
                            floors: controls.floors,
                        });
                    }
                }
                nothing(vec![ScopeEvent::OrganizationPlanChanged {
                    from,
                    to: *plan,
                }])
            }
            Command::SetMinDecryptionVersion(version) => {
                let version = *version;
                let lineage = Self::lineage(prepared)?;
                let state = match version < self.existing()?.min_decryption {
                    // Lowering the floor undoes a control: on any plan.
                    true => self.undoable(lineage)?,
                    false => self.controllable(lineage)?,
                };
                if version > state.key_version {
                    return Err(ScopeError::FloorAboveCurrent {
                        version,
                        current: state.key_version,
                    });
                }
                nothing(if version == state.min_decryption {
                    vec![]
                } else {
                    vec![ScopeEvent::ScopeMinDecryptionVersionSet { version }]
                })
            }
            Command::SetJustificationPolicy(policy) => {
                let lineage = Self::lineage(prepared)?;
                let state = match policy.is_empty() {
                    // Lifting the policy undoes a control: on any plan.
                    true => self.undoable(lineage)?,
                    false => self.controllable(lineage)?,
                };
                let current = state.justification.clone().unwrap_or_default();
                let above = &lineage.justification;
                // A policy that would leave the path admitting nothing is refused, unless
                // the path above already admits nothing (then lifting or loosening stays
                // possible).
                if current != *policy
                    && above.admits_some()
                    && !above.clone().then(state.id, Some(policy)).admits_some()
                {
                    return Err(ScopeError::JustificationPolicyConflict);
                }
                nothing(if current == *policy {
                    vec![]
                } else {
                    vec![ScopeEvent::ScopeJustificationPolicySet {
                        required: policy.required,
                        allowed: policy.allowed.clone(),
                    }]
                })
            }
            Command::IssueToken {
                token_id,
                principal,
                kind,
                role,
                expires_at,
            } => {
                self.organization()?;
                nothing(vec![ScopeEvent::TokenIssued {
                    token_id: token_id.clone(),
                    principal: principal.clone(),
                    kind: *kind,
                    role: *role,
                    expires_at: expires_at.clone(),
                }])
            }
            Command::RevokeToken(token_id) => {
                let state = self.organization()?;
                if !state.tokens.contains(token_id) {
                    return Err(ScopeError::TokenNotFound);
                }
                nothing(vec![ScopeEvent::TokenRevoked {
                    token_id: token_id.clone(),
                }])
            }
            Command::Grant { grant, expires_at } => {
                let state = self.organization()?;
                // The same grant with the same expiry again records nothing; another expiry
                // (or none) replaces the one it had.
                let same = state.grants.contains(grant)
                    && state.grant_expiry(grant) == expires_at.as_deref();
                nothing(if same {
                    vec![]
                } else {
                    vec![ScopeEvent::PermissionGranted {
                        principal: grant.principal.clone(),
                        permission: grant.permission,
                        scope_id: grant.scope,
                        expires_at: expires_at.clone(),
                    }]
                })
            }
            Command::ExpireGrant { grant, at } => {
                let state = self.organization()?;
                let due = state.grants.contains(grant) && state.grant_expiry(grant) == Some(at);
                nothing(match due {
                    true => vec![ScopeEvent::PermissionRevoked {
                        principal: grant.principal.clone(),
                        permission: grant.permission,
                        scope_id: grant.scope,
                    }],
                    // Granted again with another expiry, removed, or expired elsewhere.
                    false => vec![],
                })
            }
            Command::Ungrant(grant) => {
                let state = self.organization()?;
                if !state.grants.contains(grant) {
                    return Err(ScopeError::GrantNotFound);
                }
                nothing(vec![ScopeEvent::PermissionRevoked {
                    principal: grant.principal.clone(),
                    permission: grant.permission,
                    scope_id: grant.scope,
                }])
            }
            Command::StartRevocationRekey { ancestors } => {
                let state = self.existing()?;
                if state.own_state != OwnState::Revoked {
                    return Err(ScopeError::NotRevoked);
                }
                nothing(match state.rekey {
                    Some(_) => vec![],
                    None => vec![ScopeEvent::RevocationRekeyStarted {
                        ancestors: ancestors.clone(),
                    }],
                })
            }
            Command::RecordRevocationRekey {
                scope_id,
                rewrapped,
            } => {
                let scope_id = *scope_id;
                let state = self.existing()?;
                let Some(rekey) = &state.rekey else {
                    return Err(ScopeError::RekeyOutOfOrder(scope_id));
                };
                if rekey.done.contains(&scope_id) {
                    return nothing(vec![]);
                }
                if rekey.completed || !rekey.ancestors.contains(&scope_id) {
                    return Err(ScopeError::RekeyOutOfOrder(scope_id));
                }
                nothing(vec![ScopeEvent::RevocationRekeyProgressed {
                    scope_id,
                    rewrapped: *rewrapped,
                }])
            }
            Command::CompleteRevocationRekey { rewrapped } => {
                let state = self.existing()?;
                let Some(rekey) = &state.rekey else {
                    return Err(ScopeError::RekeyOutOfOrder(state.id));
                };
                if rekey.completed {
                    return nothing(vec![]);
                }
                if let Some(missing) = rekey.ancestors.iter().find(|a| !rekey.done.contains(a)) {
                    return Err(ScopeError::RekeyOutOfOrder(*missing));
                }
                nothing(vec![ScopeEvent::RevocationRekeyCompleted {
                    rewrapped: *rewrapped,
                }])
            }
            Command::RecordMasterKeyHealth {
                health,
                reason,
                detail,
            } => {
                let health = *health;
                let state = self.existing()?;
                if state.tier.is_none() {
                    return Err(ScopeError::NotAnOrganization);
                }
                if state.own_state == OwnState::Revoked {
                    return Err(ScopeError::Revoked);
                }
                if state.master.is_none() {
                    return Err(ScopeError::NoCustomerMasterKey);
                }
                let reason = match health {
                    KeyHealth::Available => None,
                    KeyHealth::Unavailable => *reason,
                };
                nothing(
                    if state.master_health == health && state.master_unavailable == reason {
                        vec![]
                    } else {
                        vec![ScopeEvent::OrganizationMasterKeyHealthChanged {
                            health,
                            reason,
                            detail: detail.clone(),
                        }]
                    },
                )
            }
        }
    }

    /// A switch of master key: every live version must have been re-wrapped
    /// (`prepared.rewrapped`; unstaged, the rules are checked as if they were).
    fn switch_master(
        &self,
        master: Option<MasterKeyRef>,
        tier: Tier,
        prepared: &Prepared,
    ) -> Result<(Needs, Vec<ScopeEvent>), ScopeError> {
        let state = self.existing()?;
        let Some(tier_from) = state.tier else {
            return Err(ScopeError::NotAnOrganization);
        };
        let lineage = Self::lineage(prepared)?;
        let state = self.controllable(lineage)?;
        if (tier == Tier::Byok) != master.is_some() {
            return Err(ScopeError::ByokTierMismatch);
        }
        if tier != Tier::Default && lineage.plan != Plan::Enterprise {
            return Err(ScopeError::TierNeedsEnterprise(tier));
        }
        if state.master == master && tier_from == tier {
            return Ok((Needs::Nothing, vec![]));
        }
        let live = state.live_versions();
        let rewrapped = prepared.rewrapped.clone().unwrap_or_else(|| live.clone());
        if rewrapped != live {
            return Err(ScopeError::StaleRewrap {
                prepared: rewrapped,
                live,
            });
        }
        Ok((
            Needs::Rewrap(live),
            vec![ScopeEvent::OrganizationMasterKeyChanged {
                from: state.master.clone(),
                to: master,
                tier_from,
                tier_to: tier,
                rewrapped,
            }],
        ))
    }
}

impl Aggregate for Scope {
    const TYPE: &'static str = "scope";
    /// The intent and what was prepared for it, decided together once.
    type Command = (Command, Prepared);
    type Event = ScopeEvent;
    type Error = ScopeError;
    type Services = ();

    async fn handle(
        &mut self,
        (command, prepared): Self::Command,
        _services: &Self::Services,
        sink: &EventSink<Self>,
    ) -> Result<(), Self::Error> {
        for event in self.decide(&command, &prepared)? {
            sink.write(event, self).await;
        }
        Ok(())
    }

    fn apply(&mut self, event: Self::Event) {
        match event {
            ScopeEvent::OrganizationCreated {
                org_id,
                name,
                plan,
                tier,
                key_version,
                ..
            } => {
                self.state = Some(ScopeState {
                    id: org_id.scope_id(),
                    kind: ScopeKind::Organization,
                    name,
                    org_id,
                    parent_id: None,
                    path: vec![org_id.scope_id()],
                    own_state: OwnState::Active,
                    key_version,
                    retired_below: KeyVersion::FIRST,
                    plan: Some(plan),
                    tier: Some(tier),
                    master: None,
                    master_health: KeyHealth::Available,
                    master_unavailable: None,
                    grants: Default::default(),
                    grant_expiries: Default::default(),
                    tokens: Default::default(),
                    rekey: None,
                    justification: None,
                    min_decryption: KeyVersion::FIRST,
                    resume_at: None,
                    pending_revocation: None,
                    revoke_window: None,
                    rotation_period: None,
                    rate_limits: Default::default(),
                });
            }
            ScopeEvent::ScopeCreated {
                scope_id,
                kind,
                name,
                parent_id,
                org_id,
                path,
                key_version,
                ..
            } => {
                self.state = Some(ScopeState {
                    id: scope_id,
                    kind,
                    name,
                    org_id,
                    parent_id: Some(parent_id),
                    path,
                    own_state: OwnState::Active,
                    key_version,
                    retired_below: KeyVersion::FIRST,
                    plan: None,
                    tier: None,
                    master: None,
                    master_health: KeyHealth::Available,
                    master_unavailable: None,
                    grants: Default::default(),
                    grant_expiries: Default::default(),
                    tokens: Default::default(),
                    rekey: None,
                    justification: None,
                    min_decryption: KeyVersion::FIRST,
                    resume_at: None,
                    pending_revocation: None,
                    revoke_window: None,
                    rotation_period: None,
                    rate_limits: Default::default(),
                });
            }
            ScopeEvent::ScopePaused {} => self.set_own_state(OwnState::Paused),
            ScopeEvent::ScopeResumed {} => {
                self.set_own_state(OwnState::Active);
                self.set_resume_at(None);
            }
            ScopeEvent::ScopeRevoked { .. } => {
                self.set_own_state(OwnState::Revoked);
                self.set_resume_at(None);
                if let Some(state) = self.state.as_mut() {
                    state.pending_revocation = None;
                }
            }
            ScopeEvent::ScopeRevocationScheduled {
                due_at,
                from,
                requested_by,
            } => {
                self.set_own_state(OwnState::PendingRevocation);
                if let Some(state) = self.state.as_mut() {
                    state.pending_revocation = Some(PendingRevocation {
                        due_at,
                        from,
                        requested_by,
                    });
                }
            }
            ScopeEvent::ScopeRevocationCancelled { to } => {
                self.set_own_state(to);
                if let Some(state) = self.state.as_mut() {
                    state.pending_revocation = None;
                }
            }
            ScopeEvent::OrganizationPolicySet { revoke_window } => {
                if let Some(state) = self.state.as_mut() {
                    state.revoke_window = revoke_window;
                }
            }
            ScopeEvent::ScopeRotationPeriodSet { period } => {
                if let Some(state) = self.state.as_mut() {
                    state.rotation_period = period;
                }
            }
            ScopeEvent::OrganizationRateLimitsSet { limits } => {
                if let Some(state) = self.state.as_mut() {
                    state.rate_limits = limits;
                }
            }
            ScopeEvent::ScopeResumeScheduled { at } => self.set_resume_at(at),
            ScopeEvent::ScopeKeyVersionsRetired { below } => {
                if let Some(state) = self.state.as_mut() {
                    state.retired_below = below;
                }
            }
            ScopeEvent::OrganizationTierChanged { to, .. } => {
                if let Some(state) = self.state.as_mut() {
                    state.tier = Some(to);
                }
            }
            ScopeEvent::ScopeKeyRotated { key_version, .. } => {
                if let Some(state) = self.state.as_mut() {
                    state.key_version = key_version;
                }
            }
            ScopeEvent::OrganizationMasterKeyChanged { to, tier_to, .. } => {
                if let Some(state) = self.state.as_mut() {
                    state.master = to;
                    state.tier = Some(tier_to);
                    // A key is connected only after a successful round trip.
                    state.master_health = KeyHealth::Available;
                    state.master_unavailable = None;
                }
            }
            ScopeEvent::OrganizationMasterKeyHealthChanged { health, reason, .. } => {
                if let Some(state) = self.state.as_mut() {
                    state.master_health = health;
                    state.master_unavailable = reason;
                }
            }
            ScopeEvent::TokenIssued { token_id, .. } => {
                if let Some(state) = self.state.as_mut() {
                    std::sync::Arc::make_mut(&mut state.tokens).push(token_id);
                }
            }
            ScopeEvent::TokenRevoked { token_id } => {
                if let Some(state) = self.state.as_mut() {
                    std::sync::Arc::make_mut(&mut state.tokens).retain(|t| *t != token_id);
                }
            }
            ScopeEvent::PermissionGranted {
                principal,
                permission,
                scope_id,
                expires_at,
            } => {
                if let Some(state) = self.state.as_mut() {
                    let grant = Grant {
                        principal,
                        permission,
                        scope: scope_id,
                    };
                    let expiries = std::sync::Arc::make_mut(&mut state.grant_expiries);
                    expiries.retain(|(g, _)| *g != grant);
                    if let Some(at) = expires_at {
                        expiries.push((grant.clone(), at));
                    }
                    if !state.grants.contains(&grant) {
                        std::sync::Arc::make_mut(&mut state.grants).push(grant);
                    }
                }
            }
            ScopeEvent::PermissionRevoked {
                principal,
                permission,
                scope_id,
            } => {
                if let Some(state) = self.state.as_mut() {
                    let revoked = Grant {
                        principal,
                        permission,
                        scope: scope_id,
                    };
                    if state.grant_expiries.iter().any(|(g, _)| *g == revoked) {
                        std::sync::Arc::make_mut(&mut state.grant_expiries)
                            .retain(|(g, _)| *g != revoked);
                    }
                    std::sync::Arc::make_mut(&mut state.grants).retain(|g| *g != revoked);
                }
            }
            ScopeEvent::RevocationRekeyStarted { ancestors } => {
                if let Some(state) = self.state.as_mut() {
                    state.rekey = Some(RekeyProgress {
                        ancestors,
                        done: vec![],
                        completed: false,
                    });
                }
            }
            ScopeEvent::RevocationRekeyProgressed { scope_id, .. } => {
                if let Some(rekey) = self.state.as_mut().and_then(|s| s.rekey.as_mut()) {
                    if !rekey.done.contains(&scope_id) {
                        rekey.done.push(scope_id);
                    }
                }
            }
            ScopeEvent::RevocationRekeyCompleted { .. } => {
                if let Some(rekey) = self.state.as_mut().and_then(|s| s.rekey.as_mut()) {
                    rekey.completed = true;
                }
            }
            ScopeEvent::OrganizationPlanChanged { to, .. } => {
                if let Some(state) = self.state.as_mut() {
                    state.plan = Some(to);
                }
            }
            ScopeEvent::ScopeMinDecryptionVersionSet { version } => {
                if let Some(state) = self.state.as_mut() {
                    state.min_decryption = version;
                }
            }
            ScopeEvent::ScopeJustificationPolicySet { required, allowed } => {
                if let Some(state) = self.state.as_mut() {
                    let policy = JustificationPolicy { required, allowed };
                    state.justification = (!policy.is_empty()).then_some(policy);
                }
            }
        }
    }
}

impl Scope {
    /// A rotation to the next key version, with the version prepared for it (if any, it must
    /// be that next one).
    fn rotation(
        state: &ScopeState,
        prepared: &Prepared,
        fingerprint: Option<String>,
    ) -> Result<(Needs, Vec<ScopeEvent>), ScopeError> {
        let next = state.key_version.next();
        if let Some(minted) = &prepared.minted {
            if minted.version != next {
                return Err(ScopeError::StaleKeyVersion {
                    prepared: minted.version,
                    next,
                });
            }
        }
        Ok((
            Needs::KeyVersion(next),
            vec![ScopeEvent::ScopeKeyRotated {
                key_version: next,
                key_fingerprint: fingerprint,
            }],
        ))
    }

    /// Refuses a command that a pending revocation excludes (pause, resume, another
    /// revocation with a waiting period): it is cancelled, or revoked immediately, by name.
    fn not_pending(state: &ScopeState) -> Result<(), ScopeError> {
        match &state.pending_revocation {
            Some(pending) if state.own_state == OwnState::PendingRevocation => {
                Err(ScopeError::PendingRevocation {
                    due_at: pending.due_at.clone(),
                })
            }
            _ => Ok(()),
        }
    }

    fn set_resume_at(&mut self, at: Option<String>) {
        if let Some(state) = self.state.as_mut() {
            state.resume_at = at;
        }
    }

    fn set_own_state(&mut self, own_state: OwnState) {
        if let Some(state) = self.state.as_mut() {
            state.own_state = own_state;
        }
    }
}

#[cfg(test)]
mod tests {
    use cqrs_es::test::TestFramework;

    use super::*;
    use crate::commands::{MintedKey, ParentContext};

    type ScopeTest = TestFramework<Scope>;

    fn org_id() -> OrgId {
        OrgId::parse("0190c7a2-8a1e-7c3b-9d4e-2f1a3b5c6d7e").unwrap_or_else(|_| unreachable!())
    }

    fn team_id() -> ScopeId {
        ScopeId::parse("0190c7a2-8a1e-7c3b-9d4e-2f1a3b5c6d7f").unwrap_or_else(|_| unreachable!())
    }

    fn name(n: &str) -> ScopeName {
        ScopeName::parse(n).unwrap_or_else(|_| unreachable!())
    }

    fn team_created() -> ScopeEvent {
        ScopeEvent::ScopeCreated {
            scope_id: team_id(),
            kind: ScopeKind::Team,
            name: name("research"),
            parent_id: org_id().scope_id(),
            org_id: org_id(),
            path: vec![org_id().scope_id(), team_id()],
            key_version: KeyVersion::FIRST,
            key_fingerprint: None,
        }
    }

    fn enterprise() -> Lineage {
        Lineage {
            plan: Plan::Enterprise,
            inherited: Effective::Active,
            justification: crate::EffectiveJustification::default(),
        }
    }

    fn parent(effective: Effective) -> ParentContext {
        ParentContext {
            id: org_id().scope_id(),
            kind: ScopeKind::Organization,
            org_id: org_id(),
            path: vec![org_id().scope_id()],
            effective,
        }
    }

    #[test]
    fn create_organization_records_plan_tier_and_first_key_version() {
        ScopeTest::with(())
            .given_no_previous_events()
            .when((
                Command::CreateOrganization {
                    id: org_id(),
                    name: name("Acme"),
                    plan: Plan::Enterprise,
                    tier: Tier::Managed,
                    admin_token_id: Some("tok_1".into()),
                },
                Prepared::default(),
            ))
            .then_expect_events(vec![ScopeEvent::OrganizationCreated {
                org_id: org_id(),
                name: name("Acme"),
                plan: Plan::Enterprise,
                tier: Tier::Managed,
                key_version: KeyVersion::FIRST,
                admin_token_id: Some("tok_1".into()),
                key_fingerprint: None,
            }]);
    }

    #[test]
    fn create_organization_refused_when_managed_tier_on_standard_plan() {
        ScopeTest::with(())
            .given_no_previous_events()
            .when((
                Command::CreateOrganization {
                    id: org_id(),
                    name: name("Acme"),
                    plan: Plan::Standard,
                    tier: Tier::Managed,
                    admin_token_id: None,
                },
                Prepared::default(),
            ))
            .then_expect_error(ScopeError::TierNeedsEnterprise(Tier::Managed));
    }

    #[test]
    fn create_organization_refused_when_tier_is_byok() {
        ScopeTest::with(())
            .given_no_previous_events()
            .when((
                Command::CreateOrganization {
                    id: org_id(),
                    name: name("Acme"),
                    plan: Plan::Enterprise,
                    tier: Tier::Byok,
                    admin_token_id: None,
                },
                Prepared::default(),
            ))
            .then_expect_error(ScopeError::ByokNeedsMasterKey);
    }

    #[test]
    fn create_scope_extends_the_parent_path() {
        ScopeTest::with(())
            .given_no_previous_events()
            .when((
                Command::CreateScope {
                    id: team_id(),
                    kind: ScopeKind::Team,
                    name: name("research"),
                    parent: org_id().scope_id(),
                },
                Prepared {
                    parent: Some(parent(Effective::Active)),
                    ..Prepared::default()
                },
            ))
            .then_expect_events(vec![team_created()]);
    }

    #[test]
    fn create_scope_refused_when_it_already_exists() {
        ScopeTest::with(())
            .given(vec![team_created()])
            .when((
                Command::CreateScope {
                    id: team_id(),
                    kind: ScopeKind::Team,
                    name: name("research"),
                    parent: org_id().scope_id(),
                },
                Prepared {
                    parent: Some(parent(Effective::Active)),
                    ..Prepared::default()
                },
            ))
            .then_expect_error(ScopeError::AlreadyExists(team_id()));
    }

    #[test]
    fn create_scope_refused_when_parent_kind_is_not_allowed() {
        let mut under_thread = parent(Effective::Active);
        under_thread.kind = ScopeKind::Thread;
        ScopeTest::with(())
            .given_no_previous_events()
            .when((
                Command::CreateScope {
                    id: team_id(),
                    kind: ScopeKind::Agent,
                    name: name("bot"),
                    parent: org_id().scope_id(),
                },
                Prepared {
                    parent: Some(under_thread),
                    ..Prepared::default()
                },
            ))
            .then_expect_error(ScopeError::InvalidParent {
                kind: ScopeKind::Agent,
                parent_kind: ScopeKind::Thread,
            });
    }

    #[test]
    fn create_scope_refused_when_parent_is_paused_or_revoked() {
        let by = org_id().scope_id();
        for (effective, error) in [
            (
                Effective::Paused { by },
                ScopeError::ParentPaused { cause: by },
            ),
            (
                Effective::Revoked { by },
                ScopeError::ParentRevoked { cause: by },
            ),
        ] {
            ScopeTest::with(())
                .given_no_previous_events()
                .when((
                    Command::CreateScope {
                        id: team_id(),
                        kind: ScopeKind::Team,
                        name: name("research"),
                        parent: org_id().scope_id(),
                    },
                    Prepared {
                        parent: Some(parent(effective)),
                        ..Prepared::default()
                    },
                ))
                .then_expect_error(error);
        }
    }

    fn justification(required: bool, allowed: &[&str]) -> JustificationPolicy {
        JustificationPolicy::new(
            required,
            allowed
                .iter()
                .map(|c| crate::JustificationCode::parse(c).unwrap_or_else(|_| unreachable!()))
                .collect(),
        )
        .unwrap_or_else(|_| unreachable!())
    }

    fn on(lineage: Lineage) -> Prepared {
        Prepared {
            lineage: Some(lineage),
            ..Prepared::default()
        }
    }

    #[test]
    fn justification_policy_records_one_event_when_it_changes() {
        let policy = justification(true, &["customer_support", "agent_run"]);
        ScopeTest::with(())
            .given(vec![team_created()])
            .when((
                Command::SetJustificationPolicy(policy.clone()),
                on(enterprise()),
            ))
            .then_expect_events(vec![ScopeEvent::ScopeJustificationPolicySet {
                required: true,
                allowed: policy.allowed,
            }]);
    }

    #[test]
    fn justification_policy_records_nothing_when_it_is_unchanged() {
        let set = ScopeEvent::ScopeJustificationPolicySet {
            required: true,
            allowed: justification(true, &["agent_run"]).allowed,
        };
        ScopeTest::with(())
            .given(vec![team_created(), set])
            .when((
                Command::SetJustificationPolicy(justification(true, &["agent_run"])),
                on(enterprise()),
            ))
            .then_expect_events(vec![]);
        // Lifting a policy that was never set changes nothing either.
        ScopeTest::with(())
            .given(vec![team_created()])
            .when((
                Command::SetJustificationPolicy(justification(false, &[])),
                on(enterprise()),
            ))
            .then_expect_events(vec![]);
    }

    #[test]
    fn justification_policy_is_refused_when_the_path_would_admit_nothing() {
        let org_list = justification(true, &["agent_run"]);
        let above = crate::EffectiveJustification::along([(org_id().scope_id(), Some(&org_list))]);
        let under = |justification: crate::EffectiveJustification| Lineage {
            justification,
            ..enterprise()
        };
        ScopeTest::with(())
            .given(vec![team_created()])
            .when((
                Command::SetJustificationPolicy(justification(true, &["legal_hold"])),
                on(under(above.clone())),
            ))
            .then_expect_error(ScopeError::JustificationPolicyConflict);
        // Where the path above already admits nothing (an ancestor changed later), the
        // scope's own policy can still be lifted.
        let legal = justification(true, &["legal_hold"]);
        let stuck = above.then(team_id(), Some(&legal));
        let set = ScopeEvent::ScopeJustificationPolicySet {
            required: true,
            allowed: legal.allowed.clone(),
        };
        ScopeTest::with(())
            .given(vec![team_created(), set])
            .when((
                Command::SetJustificationPolicy(justification(false, &[])),
                on(under(
                    stuck
                        .without(team_id())
                        .then(ScopeId::generate(), Some(&legal)),
                )),
            ))
            .then_expect_events(vec![ScopeEvent::ScopeJustificationPolicySet {
                required: false,
                allowed: vec![],
            }]);
    }

    #[test]
    fn justification_policy_is_refused_when_revoked_or_not_enterprise() {
        ScopeTest::with(())
            .given(vec![
                team_created(),
                ScopeEvent::ScopeRevoked { requested_by: None },
            ])
            .when((
                Command::SetJustificationPolicy(justification(true, &[])),
                on(enterprise()),
            ))
            .then_expect_error(ScopeError::Revoked);
        ScopeTest::with(())
            .given(vec![team_created()])
            .when((
                Command::SetJustificationPolicy(justification(true, &[])),
                on(Lineage {
                    plan: Plan::Standard,
                    inherited: Effective::Active,
                    justification: crate::EffectiveJustification::default(),
                }),
            ))
            .then_expect_error(ScopeError::ControlsNeedEnterprise);
    }

    fn schedule_revocation(due_at: &str) -> Command {
        Command::ScheduleRevocation {
            confirm: team_id().to_string(),
            due_at: due_at.to_owned(),
            requested_by: "user:alice".to_owned(),
        }
    }

    fn revocation_scheduled(due_at: &str, from: OwnState) -> ScopeEvent {
        ScopeEvent::ScopeRevocationScheduled {
            due_at: due_at.to_owned(),
            from,
            requested_by: "user:alice".to_owned(),
        }
    }

    #[test]
    fn revoke_with_a_window_is_pending_then_fires_once_naming_the_requester() {
        let due = "2026-12-08T12:00:00.000000Z";
        ScopeTest::with(())
            .given(vec![team_created()])
            .when((schedule_revocation(due), on(enterprise())))
            .then_expect_events(vec![revocation_scheduled(due, OwnState::Active)]);
        let pending = vec![team_created(), revocation_scheduled(due, OwnState::Active)];
        ScopeTest::with(())
            .given(pending.clone())
            .when((
                Command::FireScheduledRevocation { at: due.to_owned() },
                on(enterprise()),
            ))
            .then_expect_events(vec![ScopeEvent::ScopeRevoked {
                requested_by: Some("user:alice".to_owned()),
            }]);
        // Another instant than the one pending: not this revocation's to fire.
        ScopeTest::with(())
            .given(pending.clone())
            .when((
                Command::FireScheduledRevocation {
                    at: "2026-12-09T12:00:00.000000Z".to_owned(),
                },
                on(enterprise()),
            ))
            .then_expect_events(vec![]);
        // Fired already (by another instance): revoked, nothing more.
        let mut fired = pending.clone();
        fired.push(ScopeEvent::ScopeRevoked {
            requested_by: Some("user:alice".to_owned()),
        });
        ScopeTest::with(())
            .given(fired)
            .when((
                Command::FireScheduledRevocation { at: due.to_owned() },
                on(enterprise()),
            ))
            .then_expect_error(ScopeError::Revoked);
    }

    #[test]
    fn cancel_revocation_restores_the_state_it_had_and_then_fire_does_nothing() {
        let due = "2026-12-08T12:00:00.000000Z";
        let paused_then_pending = vec![
            team_created(),
            ScopeEvent::ScopePaused {},
            revocation_scheduled(due, OwnState::Paused),
        ];
        ScopeTest::with(())
            .given(paused_then_pending.clone())
            .when((
                Command::CancelRevocation {
                    now: "2026-12-02T12:00:00.000000Z".to_owned(),
                },
                on(enterprise()),
            ))
            .then_expect_events(vec![ScopeEvent::ScopeRevocationCancelled {
                to: OwnState::Paused,
            }]);
        let mut cancelled = paused_then_pending.clone();
        cancelled.push(ScopeEvent::ScopeRevocationCancelled {
            to: OwnState::Paused,
        });
        ScopeTest::with(())
            .given(cancelled.clone())
            .when((
                Command::FireScheduledRevocation { at: due.to_owned() },
                on(enterprise()),
            ))
            .then_expect_events(vec![]);
        // Due already (the scheduler is late): too late to cancel.
        ScopeTest::with(())
            .given(paused_then_pending.clone())
            .when((
                Command::CancelRevocation {
                    now: due.to_owned(),
                },
                on(enterprise()),
            ))
            .then_expect_error(ScopeError::RevocationDue {
                due_at: due.to_owned(),
            });
        // Nothing pending: cancelling records nothing.
        ScopeTest::with(())
            .given(cancelled)
            .when((
                Command::CancelRevocation {
                    now: "2026-12-02T12:00:00.000000Z".to_owned(),
                },
                on(enterprise()),
            ))
            .then_expect_events(vec![]);
    }

    #[test]
    fn pending_revocation_refuses_pause_resume_and_a_second_window_but_not_an_immediate_revoke() {
        let due = "2026-12-08T12:00:00.000000Z";
        let pending = vec![team_created(), revocation_scheduled(due, OwnState::Active)];
        let refused = ScopeError::PendingRevocation {
            due_at: due.to_owned(),
        };
        for command in [
            Command::Pause,
            Command::Resume,
            Command::PauseUntil("2026-12-02T12:00:00.000000Z".to_owned()),
            schedule_revocation("2026-12-09T12:00:00.000000Z"),
        ] {
            ScopeTest::with(())
                .given(pending.clone())
                .when((command, on(enterprise())))
                .then_expect_error(refused.clone());
        }
        ScopeTest::with(())
            .given(pending)
            .when((
                Command::Revoke {
                    confirm: team_id().to_string(),
                },
                on(enterprise()),
            ))
            .then_expect_events(vec![ScopeEvent::ScopeRevoked { requested_by: None }]);
    }

    #[test]
    fn revoke_with_a_window_supersedes_a_timed_pause_and_needs_the_confirmation() {
        let due = "2026-12-08T12:00:00.000000Z";
        let until = "2026-12-02T12:00:00.000000Z".to_owned();
        ScopeTest::with(())
            .given(vec![
                team_created(),
                ScopeEvent::ScopePaused {},
                ScopeEvent::ScopeResumeScheduled {
                    at: Some(until.clone()),
                },
            ])
            .when((schedule_revocation(due), on(enterprise())))
            .then_expect_events(vec![
                ScopeEvent::ScopeResumeScheduled { at: None },
                revocation_scheduled(due, OwnState::Paused),
            ]);
        ScopeTest::with(())
            .given(vec![team_created()])
            .when((
                Command::ScheduleRevocation {
                    confirm: "not-the-id".to_owned(),
                    due_at: due.to_owned(),
                    requested_by: "user:alice".to_owned(),
                },
                on(enterprise()),
            ))
            .then_expect_error(ScopeError::ConfirmationMismatch);
    }

    #[test]
    fn auto_rotation_rotates_once_from_the_version_it_saw() {
        let rotated = ScopeEvent::ScopeKeyRotated {
            key_version: KeyVersion::new(2),
            key_fingerprint: None,
        };
        ScopeTest::with(())
            .given(vec![team_created()])
            .when((
                Command::AutoRotate {
                    from: KeyVersion::FIRST,
                },
                on(enterprise()),
            ))
            .then_expect_events(vec![rotated.clone()]);
        // Rotated meanwhile (by hand, or by another instance): nothing more.
        ScopeTest::with(())
            .given(vec![team_created(), rotated])
            .when((
                Command::AutoRotate {
                    from: KeyVersion::FIRST,
                },
                on(enterprise()),
            ))
            .then_expect_events(vec![]);
    }

    #[test]
    fn rotation_period_is_set_under_enterprise_and_lifted_on_any_plan() {
        let standard = Lineage {
            plan: Plan::Standard,
            inherited: Effective::Active,
            justification: crate::EffectiveJustification::default(),
        };
        let set = ScopeEvent::ScopeRotationPeriodSet {
            period: Some("P90D".to_owned()),
        };
        ScopeTest::with(())
            .given(vec![team_created()])
            .when((
                Command::SetRotationPeriod(Some("P90D".to_owned())),
                on(enterprise()),
            ))
            .then_expect_events(vec![set.clone()]);
        ScopeTest::with(())
            .given(vec![team_created(), set.clone()])
            .when((
                Command::SetRotationPeriod(Some("P90D".to_owned())),
                on(enterprise()),
            ))
            .then_expect_events(vec![]);
        ScopeTest::with(())
            .given(vec![team_created()])
            .when((
                Command::SetRotationPeriod(Some("P90D".to_owned())),
                on(standard.clone()),
            ))
            .then_expect_error(ScopeError::ControlsNeedEnterprise);
        ScopeTest::with(())
            .given(vec![team_created(), set])
            .when((Command::SetRotationPeriod(None), on(standard)))
            .then_expect_events(vec![ScopeEvent::ScopeRotationPeriodSet { period: None }]);
    }

    #[test]
    fn rate_limits_are_an_organizations_and_record_only_a_change() {
        let limits = crate::RateLimits {
            commands_principal: crate::RateBucket::new("t", 5, 10).ok(),
            ..Default::default()
        };
        let set = ScopeEvent::OrganizationRateLimitsSet { limits };
        // Given an organization, when the operator sets limits, then one event
        ScopeTest::with(())
            .given(vec![org_created(Tier::Default)])
            .when((Command::SetRateLimits(limits), Prepared::default()))
            .then_expect_events(vec![set.clone()]);
        // Given the same limits, then nothing
        ScopeTest::with(())
            .given(vec![org_created(Tier::Default), set.clone()])
            .when((Command::SetRateLimits(limits), Prepared::default()))
            .then_expect_events(vec![]);
        // Back to the defaults is a change
        ScopeTest::with(())
            .given(vec![org_created(Tier::Default), set])
            .when((
                Command::SetRateLimits(crate::RateLimits::default()),
                Prepared::default(),
            ))
            .then_expect_events(vec![ScopeEvent::OrganizationRateLimitsSet {
                limits: crate::RateLimits::default(),
            }]);
        // A team has none of its own
        ScopeTest::with(())
            .given(vec![team_created()])
            .when((Command::SetRateLimits(limits), Prepared::default()))
            .then_expect_error(ScopeError::NotAnOrganization);
    }

    #[test]
    fn pause_until_schedules_a_resume_that_fires_once() {
        let at = "2026-12-01T12:00:00.000000Z".to_owned();
        let scheduled = ScopeEvent::ScopeResumeScheduled {
            at: Some(at.clone()),
        };
        ScopeTest::with(())
            .given(vec![team_created()])
            .when((Command::PauseUntil(at.clone()), on(enterprise())))
            .then_expect_events(vec![ScopeEvent::ScopePaused {}, scheduled.clone()]);
        let paused_until = vec![
            team_created(),
            ScopeEvent::ScopePaused {},
            scheduled.clone(),
        ];
        ScopeTest::with(())
            .given(paused_until.clone())
            .when((
                Command::FireScheduledResume { at: at.clone() },
                on(enterprise()),
            ))
            .then_expect_events(vec![ScopeEvent::ScopeResumed {}]);
        // Fired already (by another instance): nothing more.
        let mut fired = paused_until.clone();
        fired.push(ScopeEvent::ScopeResumed {});
        ScopeTest::with(())
            .given(fired)
            .when((
                Command::FireScheduledResume { at: at.clone() },
                on(enterprise()),
            ))
            .then_expect_events(vec![]);
        // Another time than the one scheduled: not this schedule's to fire.
        ScopeTest::with(())
            .given(paused_until.clone())
            .when((
                Command::FireScheduledResume {
                    at: "2026-12-01T13:00:00.000000Z".into(),
                },
                on(enterprise()),
            ))
            .then_expect_events(vec![]);
        // Paused for good by hand: the scheduled resume is cancelled, and never fires.
        ScopeTest::with(())
            .given(paused_until.clone())
            .when((Command::Pause, on(enterprise())))
            .then_expect_events(vec![ScopeEvent::ScopeResumeScheduled { at: None }]);
        let mut cancelled = paused_until;
        cancelled.push(ScopeEvent::ScopeResumeScheduled { at: None });
        ScopeTest::with(())
            .given(cancelled)
            .when((Command::FireScheduledResume { at }, on(enterprise())))
            .then_expect_events(vec![]);
    }

    #[test]
    fn pause_records_one_event_when_active() {
        ScopeTest::with(())
            .given(vec![team_created()])
            .when((
                Command::Pause,
                Prepared {
                    lineage: Some(enterprise()),
                    ..Prepared::default()
                },
            ))
            .then_expect_events(vec![ScopeEvent::ScopePaused {}]);
    }

    #[test]
    fn pause_records_nothing_when_already_paused() {
        ScopeTest::with(())
            .given(vec![team_created(), ScopeEvent::ScopePaused {}])
            .when((
                Command::Pause,
                Prepared {
                    lineage: Some(enterprise()),
                    ..Prepared::default()
                },
            ))
            .then_expect_events(vec![]);
    }

    #[test]
    fn resume_records_nothing_when_already_active() {
        ScopeTest::with(())
            .given(vec![team_created()])
            .when((
                Command::Resume,
                Prepared {
                    lineage: Some(enterprise()),
                    ..Prepared::default()
                },
            ))
            .then_expect_events(vec![]);
    }

    #[test]
    fn resume_records_event_when_ancestor_still_paused() {
        // The team's own state becomes active; its effective state stays paused by the
        // organization, which the read side reports as the cause.
        ScopeTest::with(())
            .given(vec![team_created(), ScopeEvent::ScopePaused {}])
            .when((
                Command::Resume,
                Prepared {
                    lineage: Some(Lineage {
                        plan: Plan::Enterprise,
                        inherited: Effective::Paused {
                            by: org_id().scope_id(),
                        },
                        justification: crate::EffectiveJustification::default(),
                    }),
                    ..Prepared::default()
                },
            ))
            .then_expect_events(vec![ScopeEvent::ScopeResumed {}]);
    }

    #[test]
    fn pause_refused_when_plan_is_standard() {
        ScopeTest::with(())
            .given(vec![team_created()])
            .when((
                Command::Pause,
                Prepared {
                    lineage: Some(Lineage {
                        plan: Plan::Standard,
                        inherited: Effective::Active,
                        justification: crate::EffectiveJustification::default(),
                    }),
                    ..Prepared::default()
                },
            ))
            .then_expect_error(ScopeError::ControlsNeedEnterprise);
    }

    #[test]
    fn commands_refused_when_scope_does_not_exist() {
        ScopeTest::with(())
            .given_no_previous_events()
            .when((
                Command::Pause,
                Prepared {
                    lineage: Some(enterprise()),
                    ..Prepared::default()
                },
            ))
            .then_expect_error(ScopeError::NotFound);
    }

    #[test]
    fn revoke_refused_when_confirmation_does_not_match() {
        ScopeTest::with(())
            .given(vec![team_created()])
            .when((
                Command::Revoke {
                    confirm: org_id().to_string(),
                },
                Prepared {
                    lineage: Some(enterprise()),
                    ..Prepared::default()
                },
            ))
            .then_expect_error(ScopeError::ConfirmationMismatch);
    }

    #[test]
    fn revoke_records_event_when_confirmed_even_if_paused() {
        ScopeTest::with(())
            .given(vec![team_created(), ScopeEvent::ScopePaused {}])
            .when((
                Command::Revoke {
                    confirm: team_id().to_string(),
                },
                Prepared {
                    lineage: Some(enterprise()),
                    ..Prepared::default()
                },
            ))
            .then_expect_events(vec![ScopeEvent::ScopeRevoked { requested_by: None }]);
    }

    #[test]
    fn every_command_refused_when_scope_is_revoked() {
        let commands = [
            (
                Command::Pause,
                Prepared {
                    lineage: Some(enterprise()),
                    ..Prepared::default()
                },
            ),
            (
                Command::Resume,
                Prepared {
                    lineage: Some(enterprise()),
                    ..Prepared::default()
                },
            ),
            (
                Command::Revoke {
                    confirm: team_id().to_string(),
                },
                Prepared {
                    lineage: Some(enterprise()),
                    ..Prepared::default()
                },
            ),
            (
                Command::Rotate,
                Prepared {
                    lineage: Some(enterprise()),
                    ..Prepared::default()
                },
            ),
        ];
        for command in commands {
            ScopeTest::with(())
                .given(vec![
                    team_created(),
                    ScopeEvent::ScopeRevoked { requested_by: None },
                ])
                .when(command)
                .then_expect_error(ScopeError::Revoked);
        }
    }

    #[test]
    fn every_command_refused_when_an_ancestor_is_revoked() {
        let by = org_id().scope_id();
        let revoked_above = || Lineage {
            plan: Plan::Enterprise,
            inherited: Effective::Revoked { by },
            justification: crate::EffectiveJustification::default(),
        };
        let commands = [
            (
                Command::Pause,
                Prepared {
                    lineage: Some(revoked_above()),
                    ..Prepared::default()
                },
            ),
            (
                Command::Resume,
                Prepared {
                    lineage: Some(revoked_above()),
                    ..Prepared::default()
                },
            ),
            (
                Command::Revoke {
                    confirm: team_id().to_string(),
                },
                Prepared {
                    lineage: Some(revoked_above()),
                    ..Prepared::default()
                },
            ),
            (
                Command::Rotate,
                Prepared {
                    lineage: Some(revoked_above()),
                    ..Prepared::default()
                },
            ),
        ];
        for command in commands {
            ScopeTest::with(())
                .given(vec![team_created()])
                .when(command)
                .then_expect_error(ScopeError::AncestorRevoked { cause: by });
        }
    }

    fn org_created(tier: Tier) -> ScopeEvent {
        ScopeEvent::OrganizationCreated {
            org_id: org_id(),
            name: name("Acme"),
            plan: Plan::Enterprise,
            tier,
            key_version: KeyVersion::FIRST,
            admin_token_id: None,
            key_fingerprint: None,
        }
    }

    #[test]
    fn leaving_enterprise_is_refused_while_anything_would_be_left_behind() {
        let with = |controls: Option<crate::ControlsInForce>| Prepared {
            controls_in_force: controls,
            ..Prepared::default()
        };
        let none = Some(crate::ControlsInForce::default());
        ScopeTest::with(())
            .given(vec![org_created(Tier::Managed)])
            .when((Command::ChangePlan(Plan::Standard), with(none)))
            .then_expect_error(ScopeError::PlanNeedsDefaultTier(Tier::Managed));
        let paused = crate::ControlsInForce {
            paused: 2,
            ..Default::default()
        };
        ScopeTest::with(())
            .given(vec![org_created(Tier::Default)])
            .when((Command::ChangePlan(Plan::Standard), with(Some(paused))))
            .then_expect_error(ScopeError::PlanLeavesControlsInForce {
                paused: 2,
                policies: 0,
                floors: 0,
            });
        // Not looked up: refused, never decided blind.
        ScopeTest::with(())
            .given(vec![org_created(Tier::Default)])
            .when((Command::ChangePlan(Plan::Standard), with(None)))
            .then_expect_error(ScopeError::NotFound);
        ScopeTest::with(())
            .given(vec![org_created(Tier::Default)])
            .when((Command::ChangePlan(Plan::Standard), with(none)))
            .then_expect_events(vec![ScopeEvent::OrganizationPlanChanged {
                from: Plan::Enterprise,
                to: Plan::Standard,
            }]);
        ScopeTest::with(())
            .given(vec![org_created(Tier::Managed)])
            .when((Command::ChangePlan(Plan::Enterprise), with(None)))
            .then_expect_events(vec![]);
        ScopeTest::with(())
            .given(vec![team_created()])
            .when((Command::ChangePlan(Plan::Standard), with(none)))
            .then_expect_error(ScopeError::NotAnOrganization);
    }

    #[test]
    fn controls_set_under_enterprise_can_be_undone_on_the_standard_plan() {
        let standard = || Lineage {
            plan: Plan::Standard,
            ..enterprise()
        };
        let rotated = ScopeEvent::ScopeKeyRotated {
            key_version: KeyVersion::new(2),
            key_fingerprint: None,
        };
        let floor = ScopeEvent::ScopeMinDecryptionVersionSet {
            version: KeyVersion::new(2),
        };
        ScopeTest::with(())
            .given(vec![team_created(), ScopeEvent::ScopePaused {}])
            .when((Command::Resume, on(standard())))
            .then_expect_events(vec![ScopeEvent::ScopeResumed {}]);
        ScopeTest::with(())
            .given(vec![team_created(), rotated.clone(), floor.clone()])
            .when((
                Command::SetMinDecryptionVersion(KeyVersion::FIRST),
                on(standard()),
            ))
            .then_expect_events(vec![ScopeEvent::ScopeMinDecryptionVersionSet {
                version: KeyVersion::FIRST,
            }]);
        // Setting one is still enterprise's.
        ScopeTest::with(())
            .given(vec![team_created(), rotated.clone()])
            .when((
                Command::SetMinDecryptionVersion(KeyVersion::new(2)),
                on(standard()),
            ))
            .then_expect_error(ScopeError::ControlsNeedEnterprise);
        // A retire already done answers unchanged, whatever the floor became since.
        ScopeTest::with(())
            .given(vec![
                team_created(),
                rotated,
                floor,
                ScopeEvent::ScopeKeyVersionsRetired {
                    below: KeyVersion::new(2),
                },
                ScopeEvent::ScopeMinDecryptionVersionSet {
                    version: KeyVersion::FIRST,
                },
            ])
            .when((
                Command::RetireKeyVersions(KeyVersion::new(2)),
                on(enterprise()),
            ))
            .then_expect_events(vec![]);
    }

    #[test]
    fn change_tier_records_from_and_to_once() {
        ScopeTest::with(())
            .given(vec![org_created(Tier::Default)])
            .when((
                Command::ChangeTier(Tier::Managed),
                Prepared {
                    lineage: Some(enterprise()),
                    ..Prepared::default()
                },
            ))
            .then_expect_events(vec![ScopeEvent::OrganizationTierChanged {
                from: Tier::Default,
                to: Tier::Managed,
            }]);
        ScopeTest::with(())
            .given(vec![org_created(Tier::Managed)])
            .when((
                Command::ChangeTier(Tier::Managed),
                Prepared {
                    lineage: Some(enterprise()),
                    ..Prepared::default()
                },
            ))
            .then_expect_events(vec![]);
    }

    #[test]
    fn change_tier_refused_when_scope_is_not_an_organization_or_tier_is_byok() {
        ScopeTest::with(())
            .given(vec![team_created()])
            .when((
                Command::ChangeTier(Tier::Managed),
                Prepared {
                    lineage: Some(enterprise()),
                    ..Prepared::default()
                },
            ))
            .then_expect_error(ScopeError::NotAnOrganization);
        ScopeTest::with(())
            .given(vec![org_created(Tier::Managed)])
            .when((
                Command::ChangeTier(Tier::Byok),
                Prepared {
                    lineage: Some(enterprise()),
                    ..Prepared::default()
                },
            ))
            .then_expect_error(ScopeError::ByokNeedsMasterKey);
    }

    #[test]
    fn retire_destroys_versions_below_and_keeps_the_current_one() {
        let rotated = ScopeEvent::ScopeKeyRotated {
            key_version: KeyVersion::new(2),
            key_fingerprint: None,
        };
        let floor = ScopeEvent::ScopeMinDecryptionVersionSet {
            version: KeyVersion::new(2),
        };
        ScopeTest::with(())
            .given(vec![team_created(), rotated.clone(), floor.clone()])
            .when((
                Command::RetireKeyVersions(KeyVersion::new(2)),
                Prepared {
                    lineage: Some(enterprise()),
                    ..Prepared::default()
                },
            ))
            .then_expect_events(vec![ScopeEvent::ScopeKeyVersionsRetired {
                below: KeyVersion::new(2),
            }]);
        ScopeTest::with(())
            .given(vec![
                team_created(),
                rotated.clone(),
                floor,
                ScopeEvent::ScopeKeyVersionsRetired {
                    below: KeyVersion::new(2),
                },
            ])
            .when((
                Command::RetireKeyVersions(KeyVersion::new(2)),
                Prepared {
                    lineage: Some(enterprise()),
                    ..Prepared::default()
                },
            ))
            .then_expect_events(vec![]);
        ScopeTest::with(())
            .given(vec![team_created(), rotated])
            .when((
                Command::RetireKeyVersions(KeyVersion::new(3)),
                Prepared {
                    lineage: Some(enterprise()),
                    ..Prepared::default()
                },
            ))
            .then_expect_error(ScopeError::CannotRetireCurrent {
                below: KeyVersion::new(3),
                current: KeyVersion::new(2),
            });
    }

    #[test]
    fn retire_is_refused_when_the_versions_still_decrypt() {
        let rotated = ScopeEvent::ScopeKeyRotated {
            key_version: KeyVersion::new(2),
            key_fingerprint: None,
        };
        ScopeTest::with(())
            .given(vec![team_created(), rotated])
            .when((
                Command::RetireKeyVersions(KeyVersion::new(2)),
                on(enterprise()),
            ))
            .then_expect_error(ScopeError::RetireAboveFloor {
                below: KeyVersion::new(2),
                floor: KeyVersion::FIRST,
            });
    }

    #[test]
    fn floor_moves_both_ways_and_never_above_the_current_version() {
        let rotated = ScopeEvent::ScopeKeyRotated {
            key_version: KeyVersion::new(2),
            key_fingerprint: None,
        };
        let raised = ScopeEvent::ScopeMinDecryptionVersionSet {
            version: KeyVersion::new(2),
        };
        ScopeTest::with(())
            .given(vec![team_created(), rotated.clone()])
            .when((
                Command::SetMinDecryptionVersion(KeyVersion::new(2)),
                on(enterprise()),
            ))
            .then_expect_events(vec![raised.clone()]);
        // Lowered again: reversible.
        ScopeTest::with(())
            .given(vec![team_created(), rotated.clone(), raised.clone()])
            .when((
                Command::SetMinDecryptionVersion(KeyVersion::FIRST),
                on(enterprise()),
            ))
            .then_expect_events(vec![ScopeEvent::ScopeMinDecryptionVersionSet {
                version: KeyVersion::FIRST,
            }]);
        ScopeTest::with(())
            .given(vec![team_created(), rotated.clone(), raised])
            .when((
                Command::SetMinDecryptionVersion(KeyVersion::new(2)),
                on(enterprise()),
            ))
            .then_expect_events(vec![]);
        ScopeTest::with(())
            .given(vec![team_created(), rotated])
            .when((
                Command::SetMinDecryptionVersion(KeyVersion::new(3)),
                on(enterprise()),
            ))
            .then_expect_error(ScopeError::FloorAboveCurrent {
                version: KeyVersion::new(3),
                current: KeyVersion::new(2),
            });
    }

    #[test]
    fn rotate_refused_when_the_prepared_version_is_stale() {
        ScopeTest::with(())
            .given(vec![team_created()])
            .when((
                Command::Rotate,
                Prepared {
                    lineage: Some(enterprise()),
                    minted: Some(MintedKey {
                        version: KeyVersion::new(5),
                        fingerprint: "fp".to_owned(),
                    }),
                    ..Prepared::default()
                },
            ))
            .then_expect_error(ScopeError::StaleKeyVersion {
                prepared: KeyVersion::new(5),
                next: KeyVersion::new(2),
            });
    }

    #[test]
    fn rotate_adds_the_next_key_version_even_while_paused() {
        ScopeTest::with(())
            .given(vec![
                team_created(),
                ScopeEvent::ScopeKeyRotated {
                    key_version: KeyVersion::new(2),
                    key_fingerprint: None,
                },
                ScopeEvent::ScopePaused {},
            ])
            .when((
                Command::Rotate,
                Prepared {
                    lineage: Some(enterprise()),
                    ..Prepared::default()
                },
            ))
            .then_expect_events(vec![ScopeEvent::ScopeKeyRotated {
                key_version: KeyVersion::new(3),
                key_fingerprint: None,
            }]);
    }

    fn customer_key() -> MasterKeyRef {
        MasterKeyRef::parse(
            crate::master_key::Provider::AwsKms,
            "arn:aws:kms:eu-west-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab",
            None,
            None,
        )
        .unwrap_or_else(|_| unreachable!())
    }

    fn connect(rewrapped: Vec<KeyVersion>) -> (Command, Prepared) {
        (
            Command::SetMasterKey {
                master: Some(customer_key()),
                tier: Tier::Byok,
            },
            Prepared {
                lineage: Some(enterprise()),
                customer_key: true,
                rewrapped: Some(rewrapped),
                ..Prepared::default()
            },
        )
    }

    fn connected() -> ScopeEvent {
        ScopeEvent::OrganizationMasterKeyChanged {
            from: None,
            to: Some(customer_key()),
            tier_from: Tier::Managed,
            tier_to: Tier::Byok,
            rewrapped: vec![KeyVersion::FIRST],
        }
    }

    fn unavailable(reason: UnavailableReason) -> (Command, Prepared) {
        (
            Command::RecordMasterKeyHealth {
                health: KeyHealth::Unavailable,
                reason: Some(reason),
                detail: "DescribeKey: Disabled".into(),
            },
            Prepared::default(),
        )
    }

    #[test]
    fn set_master_key_records_the_switch_to_byok_when_every_live_version_is_rewrapped() {
        ScopeTest::with(())
            .given(vec![org_created(Tier::Managed)])
            .when(connect(vec![KeyVersion::FIRST]))
            .then_expect_events(vec![connected()]);
    }

    #[test]
    fn set_master_key_refused_when_a_live_version_was_not_rewrapped() {
        ScopeTest::with(())
            .given(vec![
                org_created(Tier::Managed),
                ScopeEvent::ScopeKeyRotated {
                    key_version: KeyVersion::new(2),
                    key_fingerprint: None,
                },
            ])
            .when(connect(vec![KeyVersion::FIRST]))
            .then_expect_error(ScopeError::StaleRewrap {
                prepared: vec![KeyVersion::FIRST],
                live: vec![KeyVersion::FIRST, KeyVersion::new(2)],
            });
    }

    #[test]
    fn set_master_key_records_nothing_when_the_same_key_is_connected_again() {
        ScopeTest::with(())
            .given(vec![org_created(Tier::Managed), connected()])
            .when(connect(vec![KeyVersion::FIRST]))
            .then_expect_events(vec![]);
    }

    #[test]
    fn set_master_key_refused_when_tier_and_key_disagree() {
        ScopeTest::with(())
            .given(vec![org_created(Tier::Managed)])
            .when((
                Command::SetMasterKey {
                    master: Some(customer_key()),
                    tier: Tier::Managed,
                },
                Prepared {
                    lineage: Some(enterprise()),
                    customer_key: true,
                    rewrapped: Some(vec![KeyVersion::FIRST]),
                    ..Prepared::default()
                },
            ))
            .then_expect_error(ScopeError::ByokTierMismatch);
    }

    #[test]
    fn set_master_key_refused_when_plan_is_standard() {
        ScopeTest::with(())
            .given(vec![org_created(Tier::Default)])
            .when((
                Command::SetMasterKey {
                    master: Some(customer_key()),
                    tier: Tier::Byok,
                },
                Prepared {
                    lineage: Some(Lineage {
                        plan: Plan::Standard,
                        inherited: Effective::Active,
                        justification: crate::EffectiveJustification::default(),
                    }),
                    customer_key: true,
                    rewrapped: Some(vec![KeyVersion::FIRST]),
                    ..Prepared::default()
                },
            ))
            .then_expect_error(ScopeError::ControlsNeedEnterprise);
    }

    #[test]
    fn set_master_key_back_to_the_platform_key_records_the_tier() {
        ScopeTest::with(())
            .given(vec![org_created(Tier::Managed), connected()])
            .when((
                Command::SetMasterKey {
                    master: None,
                    tier: Tier::Managed,
                },
                Prepared {
                    lineage: Some(enterprise()),
                    customer_key: true,
                    rewrapped: Some(vec![KeyVersion::FIRST]),
                    ..Prepared::default()
                },
            ))
            .then_expect_events(vec![ScopeEvent::OrganizationMasterKeyChanged {
                from: Some(customer_key()),
                to: None,
                tier_from: Tier::Byok,
                tier_to: Tier::Managed,
                rewrapped: vec![KeyVersion::FIRST],
            }]);
    }

    #[test]
    fn change_tier_refused_when_a_customer_master_key_is_in_use() {
        ScopeTest::with(())
            .given(vec![org_created(Tier::Managed), connected()])
            .when((
                Command::ChangeTier(Tier::Managed),
                Prepared {
                    lineage: Some(enterprise()),
                    ..Prepared::default()
                },
            ))
            .then_expect_error(ScopeError::MasterKeyInUse);
    }

    #[test]
    fn record_health_records_a_change_once() {
        let changed = ScopeEvent::OrganizationMasterKeyHealthChanged {
            health: KeyHealth::Unavailable,
            reason: Some(UnavailableReason::Disabled),
            detail: "DescribeKey: Disabled".into(),
        };
        ScopeTest::with(())
            .given(vec![org_created(Tier::Managed), connected()])
            .when(unavailable(UnavailableReason::Disabled))
            .then_expect_events(vec![changed.clone()]);
        ScopeTest::with(())
            .given(vec![
                org_created(Tier::Managed),
                connected(),
                changed.clone(),
            ])
            .when(unavailable(UnavailableReason::Disabled))
            .then_expect_events(vec![]);
        // Another reason is a change auditors want to see.
        ScopeTest::with(())
            .given(vec![org_created(Tier::Managed), connected(), changed])
            .when(unavailable(UnavailableReason::PendingDeletion))
            .then_expect_events(vec![ScopeEvent::OrganizationMasterKeyHealthChanged {
                health: KeyHealth::Unavailable,
                reason: Some(UnavailableReason::PendingDeletion),
                detail: "DescribeKey: Disabled".into(),
            }]);
    }

    #[test]
    fn record_health_refused_when_the_organization_has_no_customer_key() {
        ScopeTest::with(())
            .given(vec![org_created(Tier::Managed)])
            .when(unavailable(UnavailableReason::Disabled))
            .then_expect_error(ScopeError::NoCustomerMasterKey);
    }

    fn data_use(scope: Option<ScopeId>) -> crate::access::Grant {
        crate::access::Grant {
            principal: crate::access::PrincipalName::parse("svc-chat")
                .unwrap_or_else(|_| unreachable!()),
            permission: crate::access::Permission::DataUse,
            scope,
        }
    }

    fn granted(scope: Option<ScopeId>) -> ScopeEvent {
        granted_until(scope, None)
    }

    fn granted_until(scope: Option<ScopeId>, expires_at: Option<&str>) -> ScopeEvent {
        let grant = data_use(scope);
        ScopeEvent::PermissionGranted {
            principal: grant.principal,
            permission: grant.permission,
            scope_id: grant.scope,
            expires_at: expires_at.map(str::to_owned),
        }
    }

    fn grant(scope: Option<ScopeId>, expires_at: Option<&str>) -> Command {
        Command::Grant {
            grant: data_use(scope),
            expires_at: expires_at.map(str::to_owned),
        }
    }

    #[test]
    fn grant_again_with_another_expiry_replaces_it_and_the_same_records_nothing() {
        let soon = "2030-01-01T00:00:00.000000Z";
        let later = "2031-01-01T00:00:00.000000Z";
        // Given a grant that expires
        let given = vec![org_created(Tier::Managed), granted_until(None, Some(soon))];
        // When granted again with the same expiry, then nothing is recorded
        ScopeTest::with(())
            .given(given.clone())
            .when((grant(None, Some(soon)), Prepared::default()))
            .then_expect_events(vec![]);
        // When granted with a later expiry, or none, then the grant is recorded again
        ScopeTest::with(())
            .given(given.clone())
            .when((grant(None, Some(later)), Prepared::default()))
            .then_expect_events(vec![granted_until(None, Some(later))]);
        ScopeTest::with(())
            .given(given)
            .when((grant(None, None), Prepared::default()))
            .then_expect_events(vec![granted(None)]);
        // A permanent grant given an expiry gets one
        ScopeTest::with(())
            .given(vec![org_created(Tier::Managed), granted(None)])
            .when((grant(None, Some(soon)), Prepared::default()))
            .then_expect_events(vec![granted_until(None, Some(soon))]);
    }

    #[test]
    fn expire_grant_removes_only_the_grant_still_due_at_that_instant() {
        let soon = "2030-01-01T00:00:00.000000Z";
        let later = "2031-01-01T00:00:00.000000Z";
        let expire = |at: &str| Command::ExpireGrant {
            grant: data_use(None),
            at: at.to_owned(),
        };
        let removed = ScopeEvent::PermissionRevoked {
            principal: data_use(None).principal,
            permission: crate::access::Permission::DataUse,
            scope_id: None,
        };
        // Given a grant that expires at `soon`, when its expiry fires, then it is removed
        ScopeTest::with(())
            .given(vec![
                org_created(Tier::Managed),
                granted_until(None, Some(soon)),
            ])
            .when((expire(soon), Prepared::default()))
            .then_expect_events(vec![removed.clone()]);
        // Given it was granted again until later (or for good), or removed, or already
        // expired, when the old expiry fires, then nothing is recorded
        for given in [
            vec![
                granted_until(None, Some(soon)),
                granted_until(None, Some(later)),
            ],
            vec![granted_until(None, Some(soon)), granted(None)],
            vec![granted_until(None, Some(soon)), removed.clone()],
        ] {
            let mut events = vec![org_created(Tier::Managed)];
            events.extend(given);
            ScopeTest::with(())
                .given(events)
                .when((expire(soon), Prepared::default()))
                .then_expect_events(vec![]);
        }
        // A removed grant granted again for good does not expire with its old time
        ScopeTest::with(())
            .given(vec![
                org_created(Tier::Managed),
                granted_until(None, Some(soon)),
                removed,
                granted(None),
            ])
            .when((expire(soon), Prepared::default()))
            .then_expect_events(vec![]);
    }

    #[test]
    fn grant_permission_records_a_grant_once() {
        ScopeTest::with(())
            .given(vec![org_created(Tier::Managed)])
            .when((grant(Some(team_id()), None), Prepared::default()))
            .then_expect_events(vec![granted(Some(team_id()))]);
        ScopeTest::with(())
            .given(vec![org_created(Tier::Managed), granted(Some(team_id()))])
            .when((grant(Some(team_id()), None), Prepared::default()))
            .then_expect_events(vec![]);
    }

    #[test]
    fn revoke_permission_refused_when_the_grant_does_not_exist() {
        // The same permission on another subtree is another grant.
        ScopeTest::with(())
            .given(vec![org_created(Tier::Managed), granted(Some(team_id()))])
            .when((Command::Ungrant(data_use(None)), Prepared::default()))
            .then_expect_error(ScopeError::GrantNotFound);
        ScopeTest::with(())
            .given(vec![org_created(Tier::Managed), granted(None)])
            .when((Command::Ungrant(data_use(None)), Prepared::default()))
            .then_expect_events(vec![ScopeEvent::PermissionRevoked {
                principal: data_use(None).principal,
                permission: crate::access::Permission::DataUse,
                scope_id: None,
            }]);
    }

    #[test]
    fn revoke_token_refused_when_the_token_is_unknown_or_already_revoked() {
        let issued = ScopeEvent::TokenIssued {
            token_id: "tok_1".into(),
            principal: data_use(None).principal,
            kind: crate::access::PrincipalKind::Service,
            role: crate::access::OrgRole::Member,
            expires_at: None,
        };
        ScopeTest::with(())
            .given(vec![org_created(Tier::Managed), issued.clone()])
            .when((Command::RevokeToken("tok_1".into()), Prepared::default()))
            .then_expect_events(vec![ScopeEvent::TokenRevoked {
                token_id: "tok_1".into(),
            }]);
        ScopeTest::with(())
            .given(vec![
                org_created(Tier::Managed),
                issued,
                ScopeEvent::TokenRevoked {
                    token_id: "tok_1".into(),
                },
            ])
            .when((Command::RevokeToken("tok_1".into()), Prepared::default()))
            .then_expect_error(ScopeError::TokenNotFound);
    }

    #[test]
    fn grants_refused_on_a_scope_that_is_not_an_organization() {
        ScopeTest::with(())
            .given(vec![team_created()])
            .when((grant(None, None), Prepared::default()))
            .then_expect_error(ScopeError::NotAnOrganization);
    }

    fn with(lineage: Lineage) -> Prepared {
        Prepared {
            lineage: Some(lineage),
            ..Prepared::default()
        }
    }

    #[test]
    fn admits_rotation_with_the_next_version_to_mint() {
        let scope = Scope { state: None };
        assert_eq!(
            scope.admits(&Command::Rotate, &with(enterprise())),
            Err(ScopeError::NotFound)
        );
        let mut scope = Scope::default();
        scope.apply(team_created());
        assert_eq!(
            scope.admits(&Command::Rotate, &with(enterprise())),
            Ok(Admitted::Records(Needs::KeyVersion(KeyVersion::new(2))))
        );
        let minted = Prepared {
            minted: Some(MintedKey {
                version: KeyVersion::new(2),
                fingerprint: "fp2".into(),
            }),
            ..with(enterprise())
        };
        assert_eq!(
            scope.decide(&Command::Rotate, &minted),
            Ok(vec![ScopeEvent::ScopeKeyRotated {
                key_version: KeyVersion::new(2),
                key_fingerprint: Some("fp2".into()),
            }])
        );
    }

    #[test]
    fn admits_nothing_to_make_when_pause_changes_nothing() {
        let mut scope = Scope::default();
        scope.apply(team_created());
        scope.apply(ScopeEvent::ScopePaused {});
        assert_eq!(
            scope.admits(&Command::Pause, &with(enterprise())),
            Ok(Admitted::Unchanged)
        );
    }

    #[test]
    fn change_tier_is_a_switch_of_master_key_when_a_customer_key_wraps() {
        let mut scope = Scope::default();
        scope.apply(org_created(Tier::Managed));
        scope.apply(ScopeEvent::ScopeKeyRotated {
            key_version: KeyVersion::new(2),
            key_fingerprint: None,
        });
        let master = MasterKeyRef {
            provider: crate::master_key::Provider::AwsKms,
            key_id: "alias/test".into(),
            region: None,
            endpoint_url: None,
        };
        let connect = Command::SetMasterKey {
            master: Some(master.clone()),
            tier: Tier::Byok,
        };
        assert_eq!(
            scope.admits(&connect, &with(enterprise())),
            Ok(Admitted::Records(Needs::Rewrap(vec![
                KeyVersion::FIRST,
                KeyVersion::new(2)
            ])))
        );
        scope.apply(ScopeEvent::OrganizationMasterKeyChanged {
            from: None,
            to: Some(master),
            tier_from: Tier::Managed,
            tier_to: Tier::Byok,
            rewrapped: vec![KeyVersion::FIRST, KeyVersion::new(2)],
        });
        let leave = Prepared {
            customer_key: true,
            ..with(enterprise())
        };
        assert_eq!(
            scope.admits(&Command::ChangeTier(Tier::Managed), &leave),
            Ok(Admitted::Records(Needs::Rewrap(vec![
                KeyVersion::FIRST,
                KeyVersion::new(2)
            ])))
        );
        let stale = Prepared {
            rewrapped: Some(vec![KeyVersion::new(2)]),
            ..leave
        };
        assert_eq!(
            scope.decide(&Command::ChangeTier(Tier::Managed), &stale),
            Err(ScopeError::StaleRewrap {
                prepared: vec![KeyVersion::new(2)],
                live: vec![KeyVersion::FIRST, KeyVersion::new(2)],
            })
        );
    }
}
