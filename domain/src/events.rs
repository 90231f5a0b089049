//! Events of the scope aggregate. Past tense, immutable once stored.
//!
//! `event_type()` and `event_version()` are string literals that never change once shipped:
//! a new shape gets a new version and an upcaster, never an edit of a stored event.
//! Key material never appears here: only key versions.

use cqrs_es::DomainEvent;
use serde::{Deserialize, Serialize};

use crate::access::{OrgRole, Permission, PrincipalKind, PrincipalName};
use crate::ids::{KeyVersion, OrgId, ScopeId};
use crate::justification::JustificationCode;
use crate::master_key::{KeyHealth, MasterKeyRef, UnavailableReason};
use crate::scope::{OwnState, Plan, ScopeKind, ScopeName, Tier};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ScopeEvent {
    /// Version 2 added `admin_token_id` (version 1 events read it as `None`).
    OrganizationCreated {
        org_id: OrgId,
        name: ScopeName,
        plan: Plan,
        tier: Tier,
        key_version: KeyVersion,
        /// The id (never the secret) of the first `org_admin` token issued with it.
        admin_token_id: Option<String>,
        /// The fingerprint of the new key version (never the key). Absent on events
        /// recorded before keys existed.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        key_fingerprint: Option<String>,
    },
    ScopeCreated {
        scope_id: ScopeId,
        kind: ScopeKind,
        name: ScopeName,
        parent_id: ScopeId,
        org_id: OrgId,
        /// Ids from the root to this scope, inclusive.
        path: Vec<ScopeId>,
        key_version: KeyVersion,
        /// The fingerprint of the new key version (never the key). Absent on events
        /// recorded before keys existed.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        key_fingerprint: Option<String>,
    },
    ScopePaused {},
    ScopeResumed {},
    /// Revoked for good. `requested_by`: when the scheduler revokes at the end of a waiting
    /// period (actor `system:scheduler`), the actor who asked for it (absent on an immediate
    /// revoke, whose actor asked).
    ScopeRevoked {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        requested_by: Option<String>,
    },
    OrganizationTierChanged {
        from: Tier,
        to: Tier,
    },
    /// Every key version below `below` is retired; its key material is destroyed.
    ScopeKeyVersionsRetired {
        below: KeyVersion,
    },
    ScopeKeyRotated {
        key_version: KeyVersion,
        /// The fingerprint of the new key version (never the key). Absent on events
        /// recorded before keys existed.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        key_fingerprint: Option<String>,
    },
    /// The organization's key is now wrapped by another master key: the customer's
    /// (`to`, tier `byok`) or the platform's (`to: None`). Every live key version listed in
    /// `rewrapped` was re-wrapped; the old wrapping is destroyed.
    OrganizationMasterKeyChanged {
        from: Option<MasterKeyRef>,
        to: Option<MasterKeyRef>,
        tier_from: Tier,
        tier_to: Tier,
        rewrapped: Vec<KeyVersion>,
    },
    /// The health monitor (or a failed unwrap) found the customer's master key usable again,
    /// or not: disabled, scheduled for deletion, access removed, or unreachable past the
    /// grace period. The actor is the system.
    OrganizationMasterKeyHealthChanged {
        health: KeyHealth,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<UnavailableReason>,
        /// What the provider said, for people (no key material).
        detail: String,
    },
    /// A bearer token was issued to a principal of the organization (never the secret).
    TokenIssued {
        token_id: String,
        principal: PrincipalName,
        kind: PrincipalKind,
        role: OrgRole,
        /// RFC 3339, if the token expires.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        expires_at: Option<String>,
    },
    TokenRevoked {
        token_id: String,
    },
    /// A grant, or a grant again with another expiry (which replaces the first).
    PermissionGranted {
        principal: PrincipalName,
        permission: Permission,
        /// The subtree it is limited to; absent for the whole organization.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        scope_id: Option<ScopeId>,
        /// RFC 3339 (UTC), if the grant expires: it stops counting at that instant, and the
        /// scheduler then records its removal (issue 17 §2).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        expires_at: Option<String>,
    },
    PermissionRevoked {
        principal: PrincipalName,
        permission: Permission,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        scope_id: Option<ScopeId>,
    },
    /// The re-key that makes a revoke hold against copies of the database started (on the
    /// revoked scope; actor: the system). Each scope of `ancestors` (organization first)
    /// gets a new wrapping key, the surviving keys under it are re-wrapped, and its old
    /// wrapping keys are destroyed (ADR 0013).
    RevocationRekeyStarted {
        ancestors: Vec<ScopeId>,
    },
    /// One ancestor re-keyed: `rewrapped` keys moved to its new wrapping key, the old ones
    /// destroyed.
    RevocationRekeyProgressed {
        scope_id: ScopeId,
        rewrapped: u64,
    },
    /// Every ancestor re-keyed, and the destroyed keys' bytes gone from the database's files.
    /// Copies made before now open nothing of the subtree once the platform master key has
    /// been rotated.
    RevocationRekeyCompleted {
        rewrapped: u64,
    },
    /// The scope's own justification policy, inherited by its subtree, where policies only
    /// tighten (ADR 0027). One that requires nothing and lists nothing lifts the scope's own.
    ScopeJustificationPolicySet {
        required: bool,
        /// Sorted, without duplicates; empty: any reason is accepted.
        allowed: Vec<JustificationCode>,
    },
    /// Key versions below `version` no longer decrypt (reversibly: a lower floor enables
    /// them again); `retire` may destroy only versions below it.
    ScopeMinDecryptionVersionSet {
        version: KeyVersion,
    },
    /// The operator moved the organization to another plan. Leaving enterprise needs tier
    /// `default` and no scope control in force (nothing is cleared silently).
    OrganizationPlanChanged {
        from: Plan,
        to: Plan,
    },
    /// The paused scope resumes on its own at `at` (RFC 3339, UTC), fired by the scheduler;
    /// `None` cancels it (the scope stays paused until resumed by hand).
    ScopeResumeScheduled {
        at: Option<String>,
    },
    /// A revoke was requested with a waiting period: the scope is `pending_revocation` (it
    /// refuses like paused) until `due_at` (RFC 3339, UTC), when the scheduler revokes it;
    /// `from`: the own state a cancellation returns it to. `requested_by`: the actor.
    ScopeRevocationScheduled {
        due_at: String,
        from: OwnState,
        requested_by: String,
    },
    /// The pending revocation was cancelled: the scope is back in its own state `to`.
    ScopeRevocationCancelled {
        to: OwnState,
    },
    /// The organization's policy: `revoke_window` (an ISO 8601 duration, `PT0S` to `P90D`)
    /// is the waiting period of a revoke that names none; absent: the default, `P7D`.
    OrganizationPolicySet {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        revoke_window: Option<String>,
    },
    /// The scope's key rotates automatically once its current version is `period` old (ISO
    /// 8601, `P1D` to `P3650D`); its subtree inherits it unless a scope below sets its own.
    /// `None` lifts the scope's own period (it inherits again).
    ScopeRotationPeriodSet {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        period: Option<String>,
    },
    /// The operator set the organization's own rate limits (issue 18 §4, ADR 0036): each
    /// that is absent is the server's default.
    OrganizationRateLimitsSet {
        limits: crate::rate::RateLimits,
    },
}

/// Every audit action and the event type it names, one to one (a test checks it against
/// `ScopeEvent::action`).
pub const ACTIONS: &[(&str, &str)] = &[
    ("org.create", "OrganizationCreated"),
    ("scope.create", "ScopeCreated"),
    ("scope.pause", "ScopePaused"),
    ("scope.resume", "ScopeResumed"),
    ("scope.revoke", "ScopeRevoked"),
    ("scope.rotate", "ScopeKeyRotated"),
    ("org.tier", "OrganizationTierChanged"),
    ("scope.retire", "ScopeKeyVersionsRetired"),
    ("org.master_key", "OrganizationMasterKeyChanged"),
    (
        "org.master_key_health",
        "OrganizationMasterKeyHealthChanged",
    ),
    ("token.issue", "TokenIssued"),
    ("token.revoke", "TokenRevoked"),
    ("grant.add", "PermissionGranted"),
    ("grant.remove", "PermissionRevoked"),
    ("scope.rekey_start", "RevocationRekeyStarted"),
    ("scope.rekey_progress", "RevocationRekeyProgressed"),
    ("scope.rekey_complete", "RevocationRekeyCompleted"),
    ("scope.justification_policy", "ScopeJustificationPolicySet"),
    (
        "scope.min_decryption_version",
        "ScopeMinDecryptionVersionSet",
    ),
    ("org.plan", "OrganizationPlanChanged"),
    ("scope.resume_schedule", "ScopeResumeScheduled"),
    ("scope.revoke_schedule", "ScopeRevocationScheduled"),
    ("scope.revoke_cancel", "ScopeRevocationCancelled"),
    ("org.policy", "OrganizationPolicySet"),
    ("scope.rotation_period", "ScopeRotationPeriodSet"),
    ("org.rate_limits", "OrganizationRateLimitsSet"),
];

impl ScopeEvent {
    /// Every event type this aggregate has ever stored.
    pub const TYPES: [&'static str; 26] = [
        "OrganizationCreated",
        "ScopeCreated",
        "ScopePaused",
        "ScopeResumed",
        "ScopeRevoked",
        "ScopeKeyRotated",
        "OrganizationTierChanged",
        "ScopeKeyVersionsRetired",
        "OrganizationMasterKeyChanged",
        "OrganizationMasterKeyHealthChanged",
        "TokenIssued",
        "TokenRevoked",
        "PermissionGranted",
        "PermissionRevoked",
        "RevocationRekeyStarted",
        "RevocationRekeyProgressed",
        "RevocationRekeyCompleted",
        "ScopeJustificationPolicySet",
        "ScopeMinDecryptionVersionSet",
        "OrganizationPlanChanged",
        "ScopeResumeScheduled",
        "ScopeRevocationScheduled",
        "ScopeRevocationCancelled",
        "OrganizationPolicySet",
        "ScopeRotationPeriodSet",
        "OrganizationRateLimitsSet",
    ];

    pub fn type_name(&self) -> &'static str {
        match self {
            ScopeEvent::OrganizationCreated { .. } => "OrganizationCreated",
            ScopeEvent::ScopeCreated { .. } => "ScopeCreated",
            ScopeEvent::ScopePaused {} => "ScopePaused",
            ScopeEvent::ScopeResumed {} => "ScopeResumed",
            ScopeEvent::ScopeRevoked { .. } => "ScopeRevoked",
            ScopeEvent::ScopeKeyRotated { .. } => "ScopeKeyRotated",
            ScopeEvent::OrganizationTierChanged { .. } => "OrganizationTierChanged",
            ScopeEvent::ScopeKeyVersionsRetired { .. } => "ScopeKeyVersionsRetired",
            ScopeEvent::OrganizationMasterKeyChanged { .. } => "OrganizationMasterKeyChanged",
            ScopeEvent::OrganizationMasterKeyHealthChanged { .. } => {
                "OrganizationMasterKeyHealthChanged"
            }
            ScopeEvent::TokenIssued { .. } => "TokenIssued",
            ScopeEvent::TokenRevoked { .. } => "TokenRevoked",
            ScopeEvent::PermissionGranted { .. } => "PermissionGranted",
            ScopeEvent::PermissionRevoked { .. } => "PermissionRevoked",
            ScopeEvent::RevocationRekeyStarted { .. } => "RevocationRekeyStarted",
            ScopeEvent::RevocationRekeyProgressed { .. } => "RevocationRekeyProgressed",
            ScopeEvent::RevocationRekeyCompleted { .. } => "RevocationRekeyCompleted",
            ScopeEvent::ScopeJustificationPolicySet { .. } => "ScopeJustificationPolicySet",
            ScopeEvent::ScopeMinDecryptionVersionSet { .. } => "ScopeMinDecryptionVersionSet",
            ScopeEvent::OrganizationPlanChanged { .. } => "OrganizationPlanChanged",
            ScopeEvent::ScopeResumeScheduled { .. } => "ScopeResumeScheduled",
            ScopeEvent::ScopeRevocationScheduled { .. } => "ScopeRevocationScheduled",
            ScopeEvent::ScopeRevocationCancelled { .. } => "ScopeRevocationCancelled",
            ScopeEvent::OrganizationPolicySet { .. } => "OrganizationPolicySet",
            ScopeEvent::ScopeRotationPeriodSet { .. } => "ScopeRotationPeriodSet",
            ScopeEvent::OrganizationRateLimitsSet { .. } => "OrganizationRateLimitsSet",
        }
    }

    /// The audit action name of this event (`scope.pause`, ...).
    /// The event type an audit action names (`scope.pause` → `ScopePaused`): each action is
    /// exactly one event type.
    pub fn type_of_action(action: &str) -> Option<&'static str> {
        ACTIONS
            .iter()
            .find(|(a, _)| *a == action)
            .map(|(_, event_type)| *event_type)
    }

    pub fn action(&self) -> &'static str {
        match self {
            ScopeEvent::OrganizationCreated { .. } => "org.create",
            ScopeEvent::ScopeCreated { .. } => "scope.create",
            ScopeEvent::ScopePaused {} => "scope.pause",
            ScopeEvent::ScopeResumed {} => "scope.resume",
            ScopeEvent::ScopeRevoked { .. } => "scope.revoke",
            ScopeEvent::ScopeKeyRotated { .. } => "scope.rotate",
            ScopeEvent::OrganizationTierChanged { .. } => "org.tier",
            ScopeEvent::ScopeKeyVersionsRetired { .. } => "scope.retire",
            ScopeEvent::OrganizationMasterKeyChanged { .. } => "org.master_key",
            ScopeEvent::OrganizationMasterKeyHealthChanged { .. } => "org.master_key_health",
            ScopeEvent::TokenIssued { .. } => "token.issue",
            ScopeEvent::TokenRevoked { .. } => "token.revoke",
            ScopeEvent::PermissionGranted { .. } => "grant.add",
            ScopeEvent::PermissionRevoked { .. } => "grant.remove",
            ScopeEvent::RevocationRekeyStarted { .. } => "scope.rekey_start",
            ScopeEvent::RevocationRekeyProgressed { .. } => "scope.rekey_progress",
            ScopeEvent::RevocationRekeyCompleted { .. } => "scope.rekey_complete",
            ScopeEvent::ScopeJustificationPolicySet { .. } => "scope.justification_policy",
            ScopeEvent::ScopeMinDecryptionVersionSet { .. } => "scope.min_decryption_version",
            ScopeEvent::OrganizationPlanChanged { .. } => "org.plan",
            ScopeEvent::ScopeResumeScheduled { .. } => "scope.resume_schedule",
            ScopeEvent::ScopeRevocationScheduled { .. } => "scope.revoke_schedule",
            ScopeEvent::ScopeRevocationCancelled { .. } => "scope.revoke_cancel",
            ScopeEvent::OrganizationPolicySet { .. } => "org.policy",
            ScopeEvent::ScopeRotationPeriodSet { .. } => "scope.rotation_period",
            ScopeEvent::OrganizationRateLimitsSet { .. } => "org.rate_limits",
        }
    }
}

impl DomainEvent for ScopeEvent {
    fn event_type(&self) -> String {
        self.type_name().to_owned()
    }

    fn event_version(&self) -> String {
        match self {
            ScopeEvent::OrganizationCreated { .. } => "2".to_owned(),
            ScopeEvent::ScopeCreated { .. }
            | ScopeEvent::ScopePaused {}
            | ScopeEvent::ScopeResumed {}
            | ScopeEvent::ScopeRevoked { .. }
            | ScopeEvent::ScopeKeyRotated { .. }
            | ScopeEvent::OrganizationTierChanged { .. }
            | ScopeEvent::ScopeKeyVersionsRetired { .. }
            | ScopeEvent::OrganizationMasterKeyChanged { .. }
            | ScopeEvent::OrganizationMasterKeyHealthChanged { .. }
            | ScopeEvent::TokenIssued { .. }
            | ScopeEvent::TokenRevoked { .. }
            | ScopeEvent::PermissionGranted { .. }
            | ScopeEvent::PermissionRevoked { .. }
            | ScopeEvent::RevocationRekeyStarted { .. }
            | ScopeEvent::RevocationRekeyProgressed { .. }
            | ScopeEvent::RevocationRekeyCompleted { .. }
            | ScopeEvent::ScopeJustificationPolicySet { .. }
            | ScopeEvent::ScopeMinDecryptionVersionSet { .. }
            | ScopeEvent::OrganizationPlanChanged { .. }
            | ScopeEvent::ScopeResumeScheduled { .. }
            | ScopeEvent::ScopeRevocationScheduled { .. }
            | ScopeEvent::ScopeRevocationCancelled { .. }
            | ScopeEvent::OrganizationPolicySet { .. }
            | ScopeEvent::ScopeRotationPeriodSet { .. }
            | ScopeEvent::OrganizationRateLimitsSet { .. } => "1".to_owned(),
        }
    }
}
