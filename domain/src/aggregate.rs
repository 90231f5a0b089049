//! The scope aggregate: one per scope, organizations included.

use cqrs_es::event_sink::EventSink;
use cqrs_es::Aggregate;
use serde::{Deserialize, Serialize};

use crate::access::Grant;
use crate::cascade::Effective;
use crate::commands::{Lineage, ScopeCommand};
use crate::errors::ScopeError;
use crate::events::ScopeEvent;
use crate::ids::{KeyVersion, OrgId, ScopeId};
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
    /// Organizations only: live grants and the ids of live tokens.
    #[serde(default)]
    pub grants: Vec<Grant>,
    #[serde(default)]
    pub tokens: Vec<String>,
    /// Revoked scopes: how far the re-key that destroys their keys in every copy has got.
    #[serde(default)]
    pub rekey: Option<RekeyProgress>,
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

    /// The events `command` produces on this scope, or the rule it breaks. Pure: the same
    /// state and command always give the same answer. `handle` is this plus the sink.
    pub fn decide(&self, command: ScopeCommand) -> Result<Vec<ScopeEvent>, ScopeError> {
        match command {
            ScopeCommand::CreateOrganization {
                id,
                name,
                plan,
                tier,
                admin_token_id,
                key_fingerprint,
            } => {
                if self.state.is_some() {
                    return Err(ScopeError::AlreadyExists(id.scope_id()));
                }
                if tier == Tier::Byok {
                    return Err(ScopeError::ByokNeedsMasterKey);
                }
                if tier != Tier::Default && plan != Plan::Enterprise {
                    return Err(ScopeError::TierNeedsEnterprise(tier));
                }
                Ok(vec![ScopeEvent::OrganizationCreated {
                    org_id: id,
                    name,
                    plan,
                    tier,
                    key_version: KeyVersion::FIRST,
                    admin_token_id,
                    key_fingerprint,
                }])
            }
            ScopeCommand::CreateScope {
                id,
                kind,
                name,
                parent,
                key_fingerprint,
            } => {
                if self.state.is_some() {
                    return Err(ScopeError::AlreadyExists(id));
                }
                if !kind.allows_parent(parent.kind) {
                    return Err(ScopeError::InvalidParent {
                        kind,
                        parent_kind: parent.kind,
                    });
                }
                match parent.effective {
                    // Creating under an unusable master key fails earlier, when the new
                    // key cannot be wrapped; the aggregate has no further rule for it.
                    Effective::Active | Effective::Unavailable { .. } => {}
                    Effective::Paused { by } => return Err(ScopeError::ParentPaused { cause: by }),
                    Effective::Revoked { by } => {
                        return Err(ScopeError::ParentRevoked { cause: by })
                    }
                }
                let mut path = parent.path;
                path.push(id);
                Ok(vec![ScopeEvent::ScopeCreated {
                    scope_id: id,
                    kind,
                    name,
                    parent_id: parent.id,
                    org_id: parent.org_id,
                    path,
                    key_version: KeyVersion::FIRST,
                    key_fingerprint,
                }])
            }
            ScopeCommand::PauseScope { lineage } => {
                let state = self.controllable(&lineage)?;
                Ok(match state.own_state {
                    OwnState::Paused => vec![],
                    _ => vec![ScopeEvent::ScopePaused {}],
                })
            }
            ScopeCommand::ResumeScope { lineage } => {
                let state = self.controllable(&lineage)?;
                Ok(match state.own_state {
                    OwnState::Active => vec![],
                    _ => vec![ScopeEvent::ScopeResumed {}],
                })
            }
            ScopeCommand::RevokeScope { confirm, lineage } => {
                let state = self.controllable(&lineage)?;
                if confirm.trim() != state.id.to_string() {
                    return Err(ScopeError::ConfirmationMismatch);
                }
                Ok(vec![ScopeEvent::ScopeRevoked {}])
            }
            ScopeCommand::RetireKeyVersions { below, lineage } => {
                let state = self.controllable(&lineage)?;
                if below > state.key_version {
                    return Err(ScopeError::CannotRetireCurrent {
                        below,
                        current: state.key_version,
                    });
                }
                Ok(if below <= state.retired_below {
                    vec![]
                } else {
                    vec![ScopeEvent::ScopeKeyVersionsRetired { below }]
                })
            }
            ScopeCommand::ChangeTier { tier, lineage } => {
                let state = self.controllable(&lineage)?;
                let Some(from) = state.tier else {
                    return Err(ScopeError::NotAnOrganization);
                };
                if tier == Tier::Byok {
                    return Err(ScopeError::ByokNeedsMasterKey);
                }
                if state.master.is_some() {
                    return Err(ScopeError::MasterKeyInUse);
                }
                Ok(if from == tier {
                    vec![]
                } else {
                    vec![ScopeEvent::OrganizationTierChanged { from, to: tier }]
                })
            }
            ScopeCommand::RotateKey {
                lineage,
                key_version,
                key_fingerprint,
            } => {
                // Rotation stays allowed while paused: rotating during an investigation is
                // exactly when a customer wants it.
                let state = self.controllable(&lineage)?;
                let next = state.key_version.next();
                if let Some(prepared) = key_version {
                    if prepared != next {
                        return Err(ScopeError::StaleKeyVersion { prepared, next });
                    }
                }
                Ok(vec![ScopeEvent::ScopeKeyRotated {
                    key_version: next,
                    key_fingerprint,
                }])
            }
            ScopeCommand::SetMasterKey {
                master,
                tier,
                rewrapped,
                lineage,
            } => {
                let state = self.existing()?;
                let Some(tier_from) = state.tier else {
                    return Err(ScopeError::NotAnOrganization);
                };
                let state = self.controllable(&lineage)?;
                if (tier == Tier::Byok) != master.is_some() {
                    return Err(ScopeError::ByokTierMismatch);
                }
                if tier != Tier::Default && lineage.plan != Plan::Enterprise {
                    return Err(ScopeError::TierNeedsEnterprise(tier));
                }
                if state.master == master && tier_from == tier {
                    return Ok(vec![]);
                }
                let live = state.live_versions();
                let rewrapped = rewrapped.unwrap_or_else(|| live.clone());
                if rewrapped != live {
                    return Err(ScopeError::StaleRewrap {
                        prepared: rewrapped,
                        live,
                    });
                }
                Ok(vec![ScopeEvent::OrganizationMasterKeyChanged {
                    from: state.master.clone(),
                    to: master,
                    tier_from,
                    tier_to: tier,
                    rewrapped,
                }])
            }
            ScopeCommand::IssueToken {
                token_id,
                principal,
                kind,
                role,
                expires_at,
            } => {
                self.organization()?;
                Ok(vec![ScopeEvent::TokenIssued {
                    token_id,
                    principal,
                    kind,
                    role,
                    expires_at,
                }])
            }
            ScopeCommand::RevokeToken { token_id } => {
                let state = self.organization()?;
                if !state.tokens.contains(&token_id) {
                    return Err(ScopeError::TokenNotFound);
                }
                Ok(vec![ScopeEvent::TokenRevoked { token_id }])
            }
            ScopeCommand::GrantPermission { grant } => {
                let state = self.organization()?;
                Ok(if state.grants.contains(&grant) {
                    vec![]
                } else {
                    vec![ScopeEvent::PermissionGranted {
                        principal: grant.principal,
                        permission: grant.permission,
                        scope_id: grant.scope,
                    }]
                })
            }
            ScopeCommand::RevokePermission { grant } => {
                let state = self.organization()?;
                if !state.grants.contains(&grant) {
                    return Err(ScopeError::GrantNotFound);
                }
                Ok(vec![ScopeEvent::PermissionRevoked {
                    principal: grant.principal,
                    permission: grant.permission,
                    scope_id: grant.scope,
                }])
            }
            ScopeCommand::StartRevocationRekey { ancestors } => {
                let state = self.existing()?;
                if state.own_state != OwnState::Revoked {
                    return Err(ScopeError::NotRevoked);
                }
                Ok(match state.rekey {
                    Some(_) => vec![],
                    None => vec![ScopeEvent::RevocationRekeyStarted { ancestors }],
                })
            }
            ScopeCommand::RecordRevocationRekey {
                scope_id,
                rewrapped,
            } => {
                let state = self.existing()?;
                let Some(rekey) = &state.rekey else {
                    return Err(ScopeError::RekeyOutOfOrder(scope_id));
                };
                if rekey.done.contains(&scope_id) {
                    return Ok(vec![]);
                }
                if rekey.completed || !rekey.ancestors.contains(&scope_id) {
                    return Err(ScopeError::RekeyOutOfOrder(scope_id));
                }
                Ok(vec![ScopeEvent::RevocationRekeyProgressed {
                    scope_id,
                    rewrapped,
                }])
            }
            ScopeCommand::CompleteRevocationRekey { rewrapped } => {
                let state = self.existing()?;
                let Some(rekey) = &state.rekey else {
                    return Err(ScopeError::RekeyOutOfOrder(state.id));
                };
                if rekey.completed {
                    return Ok(vec![]);
                }
                if let Some(missing) = rekey.ancestors.iter().find(|a| !rekey.done.contains(a)) {
                    return Err(ScopeError::RekeyOutOfOrder(*missing));
                }
                Ok(vec![ScopeEvent::RevocationRekeyCompleted { rewrapped }])
            }
            ScopeCommand::RecordMasterKeyHealth {
                health,
                reason,
                detail,
            } => {
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
                    KeyHealth::Unavailable => reason,
                };
                Ok(
                    if state.master_health == health && state.master_unavailable == reason {
                        vec![]
                    } else {
                        vec![ScopeEvent::OrganizationMasterKeyHealthChanged {
                            health,
                            reason,
                            detail,
                        }]
                    },
                )
            }
        }
    }
}

impl Aggregate for Scope {
    const TYPE: &'static str = "scope";
    type Command = ScopeCommand;
    type Event = ScopeEvent;
    type Error = ScopeError;
    type Services = ();

    async fn handle(
        &mut self,
        command: Self::Command,
        _services: &Self::Services,
        sink: &EventSink<Self>,
    ) -> Result<(), Self::Error> {
        for event in self.decide(command)? {
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
                    grants: vec![],
                    tokens: vec![],
                    rekey: None,
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
                    grants: vec![],
                    tokens: vec![],
                    rekey: None,
                });
            }
            ScopeEvent::ScopePaused {} => self.set_own_state(OwnState::Paused),
            ScopeEvent::ScopeResumed {} => self.set_own_state(OwnState::Active),
            ScopeEvent::ScopeRevoked {} => self.set_own_state(OwnState::Revoked),
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
                    state.tokens.push(token_id);
                }
            }
            ScopeEvent::TokenRevoked { token_id } => {
                if let Some(state) = self.state.as_mut() {
                    state.tokens.retain(|t| *t != token_id);
                }
            }
            ScopeEvent::PermissionGranted {
                principal,
                permission,
                scope_id,
            } => {
                if let Some(state) = self.state.as_mut() {
                    state.grants.push(Grant {
                        principal,
                        permission,
                        scope: scope_id,
                    });
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
                    state.grants.retain(|g| *g != revoked);
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
        }
    }
}

impl Scope {
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
    use crate::commands::ParentContext;

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
            .when(ScopeCommand::CreateOrganization {
                id: org_id(),
                name: name("Acme"),
                plan: Plan::Enterprise,
                tier: Tier::Managed,
                admin_token_id: Some("tok_1".into()),
                key_fingerprint: None,
            })
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
            .when(ScopeCommand::CreateOrganization {
                id: org_id(),
                name: name("Acme"),
                plan: Plan::Standard,
                tier: Tier::Managed,
                admin_token_id: None,
                key_fingerprint: None,
            })
            .then_expect_error(ScopeError::TierNeedsEnterprise(Tier::Managed));
    }

    #[test]
    fn create_organization_refused_when_tier_is_byok() {
        ScopeTest::with(())
            .given_no_previous_events()
            .when(ScopeCommand::CreateOrganization {
                id: org_id(),
                name: name("Acme"),
                plan: Plan::Enterprise,
                tier: Tier::Byok,
                admin_token_id: None,
                key_fingerprint: None,
            })
            .then_expect_error(ScopeError::ByokNeedsMasterKey);
    }

    #[test]
    fn create_scope_extends_the_parent_path() {
        ScopeTest::with(())
            .given_no_previous_events()
            .when(ScopeCommand::CreateScope {
                id: team_id(),
                kind: ScopeKind::Team,
                name: name("research"),
                parent: parent(Effective::Active),
                key_fingerprint: None,
            })
            .then_expect_events(vec![team_created()]);
    }

    #[test]
    fn create_scope_refused_when_it_already_exists() {
        ScopeTest::with(())
            .given(vec![team_created()])
            .when(ScopeCommand::CreateScope {
                id: team_id(),
                kind: ScopeKind::Team,
                name: name("research"),
                parent: parent(Effective::Active),
                key_fingerprint: None,
            })
            .then_expect_error(ScopeError::AlreadyExists(team_id()));
    }

    #[test]
    fn create_scope_refused_when_parent_kind_is_not_allowed() {
        let mut under_thread = parent(Effective::Active);
        under_thread.kind = ScopeKind::Thread;
        ScopeTest::with(())
            .given_no_previous_events()
            .when(ScopeCommand::CreateScope {
                id: team_id(),
                kind: ScopeKind::Agent,
                name: name("bot"),
                parent: under_thread,
                key_fingerprint: None,
            })
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
                .when(ScopeCommand::CreateScope {
                    id: team_id(),
                    kind: ScopeKind::Team,
                    name: name("research"),
                    parent: parent(effective),
                    key_fingerprint: None,
                })
                .then_expect_error(error);
        }
    }

    #[test]
    fn pause_records_one_event_when_active() {
        ScopeTest::with(())
            .given(vec![team_created()])
            .when(ScopeCommand::PauseScope {
                lineage: enterprise(),
            })
            .then_expect_events(vec![ScopeEvent::ScopePaused {}]);
    }

    #[test]
    fn pause_records_nothing_when_already_paused() {
        ScopeTest::with(())
            .given(vec![team_created(), ScopeEvent::ScopePaused {}])
            .when(ScopeCommand::PauseScope {
                lineage: enterprise(),
            })
            .then_expect_events(vec![]);
    }

    #[test]
    fn resume_records_nothing_when_already_active() {
        ScopeTest::with(())
            .given(vec![team_created()])
            .when(ScopeCommand::ResumeScope {
                lineage: enterprise(),
            })
            .then_expect_events(vec![]);
    }

    #[test]
    fn resume_records_event_when_ancestor_still_paused() {
        // The team's own state becomes active; its effective state stays paused by the
        // organization, which the read side reports as the cause.
        ScopeTest::with(())
            .given(vec![team_created(), ScopeEvent::ScopePaused {}])
            .when(ScopeCommand::ResumeScope {
                lineage: Lineage {
                    plan: Plan::Enterprise,
                    inherited: Effective::Paused {
                        by: org_id().scope_id(),
                    },
                },
            })
            .then_expect_events(vec![ScopeEvent::ScopeResumed {}]);
    }

    #[test]
    fn pause_refused_when_plan_is_standard() {
        ScopeTest::with(())
            .given(vec![team_created()])
            .when(ScopeCommand::PauseScope {
                lineage: Lineage {
                    plan: Plan::Standard,
                    inherited: Effective::Active,
                },
            })
            .then_expect_error(ScopeError::ControlsNeedEnterprise);
    }

    #[test]
    fn commands_refused_when_scope_does_not_exist() {
        ScopeTest::with(())
            .given_no_previous_events()
            .when(ScopeCommand::PauseScope {
                lineage: enterprise(),
            })
            .then_expect_error(ScopeError::NotFound);
    }

    #[test]
    fn revoke_refused_when_confirmation_does_not_match() {
        ScopeTest::with(())
            .given(vec![team_created()])
            .when(ScopeCommand::RevokeScope {
                confirm: org_id().to_string(),
                lineage: enterprise(),
            })
            .then_expect_error(ScopeError::ConfirmationMismatch);
    }

    #[test]
    fn revoke_records_event_when_confirmed_even_if_paused() {
        ScopeTest::with(())
            .given(vec![team_created(), ScopeEvent::ScopePaused {}])
            .when(ScopeCommand::RevokeScope {
                confirm: team_id().to_string(),
                lineage: enterprise(),
            })
            .then_expect_events(vec![ScopeEvent::ScopeRevoked {}]);
    }

    #[test]
    fn every_command_refused_when_scope_is_revoked() {
        let commands = [
            ScopeCommand::PauseScope {
                lineage: enterprise(),
            },
            ScopeCommand::ResumeScope {
                lineage: enterprise(),
            },
            ScopeCommand::RevokeScope {
                confirm: team_id().to_string(),
                lineage: enterprise(),
            },
            ScopeCommand::RotateKey {
                lineage: enterprise(),
                key_version: None,
                key_fingerprint: None,
            },
        ];
        for command in commands {
            ScopeTest::with(())
                .given(vec![team_created(), ScopeEvent::ScopeRevoked {}])
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
        };
        let commands = [
            ScopeCommand::PauseScope {
                lineage: revoked_above(),
            },
            ScopeCommand::ResumeScope {
                lineage: revoked_above(),
            },
            ScopeCommand::RevokeScope {
                confirm: team_id().to_string(),
                lineage: revoked_above(),
            },
            ScopeCommand::RotateKey {
                lineage: revoked_above(),
                key_version: None,
                key_fingerprint: None,
            },
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
    fn change_tier_records_from_and_to_once() {
        ScopeTest::with(())
            .given(vec![org_created(Tier::Default)])
            .when(ScopeCommand::ChangeTier {
                tier: Tier::Managed,
                lineage: enterprise(),
            })
            .then_expect_events(vec![ScopeEvent::OrganizationTierChanged {
                from: Tier::Default,
                to: Tier::Managed,
            }]);
        ScopeTest::with(())
            .given(vec![org_created(Tier::Managed)])
            .when(ScopeCommand::ChangeTier {
                tier: Tier::Managed,
                lineage: enterprise(),
            })
            .then_expect_events(vec![]);
    }

    #[test]
    fn change_tier_refused_when_scope_is_not_an_organization_or_tier_is_byok() {
        ScopeTest::with(())
            .given(vec![team_created()])
            .when(ScopeCommand::ChangeTier {
                tier: Tier::Managed,
                lineage: enterprise(),
            })
            .then_expect_error(ScopeError::NotAnOrganization);
        ScopeTest::with(())
            .given(vec![org_created(Tier::Managed)])
            .when(ScopeCommand::ChangeTier {
                tier: Tier::Byok,
                lineage: enterprise(),
            })
            .then_expect_error(ScopeError::ByokNeedsMasterKey);
    }

    #[test]
    fn retire_destroys_versions_below_and_keeps_the_current_one() {
        let rotated = ScopeEvent::ScopeKeyRotated {
            key_version: KeyVersion::new(2),
            key_fingerprint: None,
        };
        ScopeTest::with(())
            .given(vec![team_created(), rotated.clone()])
            .when(ScopeCommand::RetireKeyVersions {
                below: KeyVersion::new(2),
                lineage: enterprise(),
            })
            .then_expect_events(vec![ScopeEvent::ScopeKeyVersionsRetired {
                below: KeyVersion::new(2),
            }]);
        ScopeTest::with(())
            .given(vec![
                team_created(),
                rotated.clone(),
                ScopeEvent::ScopeKeyVersionsRetired {
                    below: KeyVersion::new(2),
                },
            ])
            .when(ScopeCommand::RetireKeyVersions {
                below: KeyVersion::new(2),
                lineage: enterprise(),
            })
            .then_expect_events(vec![]);
        ScopeTest::with(())
            .given(vec![team_created(), rotated])
            .when(ScopeCommand::RetireKeyVersions {
                below: KeyVersion::new(3),
                lineage: enterprise(),
            })
            .then_expect_error(ScopeError::CannotRetireCurrent {
                below: KeyVersion::new(3),
                current: KeyVersion::new(2),
            });
    }

    #[test]
    fn rotate_refused_when_the_prepared_version_is_stale() {
        ScopeTest::with(())
            .given(vec![team_created()])
            .when(ScopeCommand::RotateKey {
                lineage: enterprise(),
                key_version: Some(KeyVersion::new(5)),
                key_fingerprint: None,
            })
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
            .when(ScopeCommand::RotateKey {
                lineage: enterprise(),
                key_version: None,
                key_fingerprint: None,
            })
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

    fn connect(rewrapped: Vec<KeyVersion>) -> ScopeCommand {
        ScopeCommand::SetMasterKey {
            master: Some(customer_key()),
            tier: Tier::Byok,
            rewrapped: Some(rewrapped),
            lineage: enterprise(),
        }
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

    fn unavailable(reason: UnavailableReason) -> ScopeCommand {
        ScopeCommand::RecordMasterKeyHealth {
            health: KeyHealth::Unavailable,
            reason: Some(reason),
            detail: "DescribeKey: Disabled".into(),
        }
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
            .when(ScopeCommand::SetMasterKey {
                master: Some(customer_key()),
                tier: Tier::Managed,
                rewrapped: Some(vec![KeyVersion::FIRST]),
                lineage: enterprise(),
            })
            .then_expect_error(ScopeError::ByokTierMismatch);
    }

    #[test]
    fn set_master_key_refused_when_plan_is_standard() {
        ScopeTest::with(())
            .given(vec![org_created(Tier::Default)])
            .when(ScopeCommand::SetMasterKey {
                master: Some(customer_key()),
                tier: Tier::Byok,
                rewrapped: Some(vec![KeyVersion::FIRST]),
                lineage: Lineage {
                    plan: Plan::Standard,
                    inherited: Effective::Active,
                },
            })
            .then_expect_error(ScopeError::ControlsNeedEnterprise);
    }

    #[test]
    fn set_master_key_back_to_the_platform_key_records_the_tier() {
        ScopeTest::with(())
            .given(vec![org_created(Tier::Managed), connected()])
            .when(ScopeCommand::SetMasterKey {
                master: None,
                tier: Tier::Managed,
                rewrapped: Some(vec![KeyVersion::FIRST]),
                lineage: enterprise(),
            })
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
            .when(ScopeCommand::ChangeTier {
                tier: Tier::Managed,
                lineage: enterprise(),
            })
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
        let grant = data_use(scope);
        ScopeEvent::PermissionGranted {
            principal: grant.principal,
            permission: grant.permission,
            scope_id: grant.scope,
        }
    }

    #[test]
    fn grant_permission_records_a_grant_once() {
        ScopeTest::with(())
            .given(vec![org_created(Tier::Managed)])
            .when(ScopeCommand::GrantPermission {
                grant: data_use(Some(team_id())),
            })
            .then_expect_events(vec![granted(Some(team_id()))]);
        ScopeTest::with(())
            .given(vec![org_created(Tier::Managed), granted(Some(team_id()))])
            .when(ScopeCommand::GrantPermission {
                grant: data_use(Some(team_id())),
            })
            .then_expect_events(vec![]);
    }

    #[test]
    fn revoke_permission_refused_when_the_grant_does_not_exist() {
        // The same permission on another subtree is another grant.
        ScopeTest::with(())
            .given(vec![org_created(Tier::Managed), granted(Some(team_id()))])
            .when(ScopeCommand::RevokePermission {
                grant: data_use(None),
            })
            .then_expect_error(ScopeError::GrantNotFound);
        ScopeTest::with(())
            .given(vec![org_created(Tier::Managed), granted(None)])
            .when(ScopeCommand::RevokePermission {
                grant: data_use(None),
            })
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
            .when(ScopeCommand::RevokeToken {
                token_id: "tok_1".into(),
            })
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
            .when(ScopeCommand::RevokeToken {
                token_id: "tok_1".into(),
            })
            .then_expect_error(ScopeError::TokenNotFound);
    }

    #[test]
    fn grants_refused_on_a_scope_that_is_not_an_organization() {
        ScopeTest::with(())
            .given(vec![team_created()])
            .when(ScopeCommand::GrantPermission {
                grant: data_use(None),
            })
            .then_expect_error(ScopeError::NotAnOrganization);
    }
}
