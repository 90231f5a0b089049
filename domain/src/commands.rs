//! Commands on a scope. A `Command` is only the intent (what a caller asks); what its rules
//! need from outside the aggregate (the ancestors' state, the organization's plan) and the
//! key material made for it are looked up and made by the caller first, in `Prepared`, so
//! the aggregate stays deterministic. The aggregate decides the pair `(Command, Prepared)`
//! once (ADR 0022).

use crate::access::{Grant, OrgRole, PrincipalKind, PrincipalName};
use crate::cascade::Effective;
use crate::ids::{KeyVersion, OrgId, ScopeId};
use crate::justification::JustificationPolicy;
use crate::master_key::{KeyHealth, MasterKeyRef, UnavailableReason};
use crate::scope::{Plan, ScopeKind, ScopeName, Tier};

/// One typed command per intent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    /// Create an organization, the root scope of its tree.
    CreateOrganization {
        id: OrgId,
        name: ScopeName,
        plan: Plan,
        tier: Tier,
        /// The id of the first admin token, recorded for auditors.
        admin_token_id: Option<String>,
    },
    /// Create a scope under the existing scope `parent`.
    CreateScope {
        id: ScopeId,
        kind: ScopeKind,
        name: ScopeName,
        parent: ScopeId,
    },
    Pause,
    Resume,
    /// Revoke for good. `confirm` must repeat the scope's id, as typed by the caller.
    Revoke {
        confirm: String,
    },
    /// Add a key version; new encryptions use it.
    Rotate,
    /// Move an organization to another tier (what is encrypted). Leaving `byok` re-wraps
    /// the organization key under the platform's master key; no data is re-encrypted.
    ChangeTier(Tier),
    /// Retire every key version below this one: their key material is destroyed. Whatever
    /// the scope's children still wrap under them is re-wrapped first, and clients rewrap
    /// their ciphertexts first (a retired version decrypts nothing).
    RetireKeyVersions(KeyVersion),
    /// Wrap the organization's key under another master key: the customer's (`master`,
    /// tier `byok`, validated by the caller with a round trip first), or the platform's
    /// again (`master: None`, tier `managed` or `default`).
    SetMasterKey {
        master: Option<MasterKeyRef>,
        tier: Tier,
    },
    /// Record what the health monitor found about the customer's master key. Sent by the
    /// system, never by a client.
    RecordMasterKeyHealth {
        health: KeyHealth,
        reason: Option<UnavailableReason>,
        detail: String,
    },
    /// Record a token issued to a principal (the caller stores its hash).
    IssueToken {
        token_id: String,
        principal: PrincipalName,
        kind: PrincipalKind,
        role: OrgRole,
        expires_at: Option<String>,
    },
    RevokeToken(String),
    /// Grant a permission; its `scope` (checked by the caller to be in this organization)
    /// limits it to a subtree.
    /// Granting again with another `expires_at` (RFC 3339, UTC, checked to be in the future
    /// by the caller) replaces the expiry; `None` makes the grant permanent.
    Grant {
        grant: Grant,
        expires_at: Option<String>,
    },
    Ungrant(Grant),
    /// The scheduler's command: remove the grant if it still expires at `at` (not granted
    /// again with another expiry, removed, or already expired elsewhere).
    ExpireGrant {
        grant: Grant,
        at: String,
    },
    /// Start the re-key of a revoked scope's ancestors (sent by the system's re-key job;
    /// ADR 0013).
    StartRevocationRekey {
        ancestors: Vec<ScopeId>,
    },
    /// Record that one ancestor was re-keyed.
    RecordRevocationRekey {
        scope_id: ScopeId,
        rewrapped: u64,
    },
    /// Record that the whole re-key is done and the destroyed bytes are gone from the files.
    CompleteRevocationRekey {
        rewrapped: u64,
    },
    /// Set the scope's own justification policy (ADR 0027).
    SetJustificationPolicy(JustificationPolicy),
    /// Stop (or, lower, allow again) decryption with key versions below this one.
    SetMinDecryptionVersion(KeyVersion),
    /// Move an organization to another plan (the operator's command).
    ChangePlan(Plan),
    /// Pause, and resume on its own at this instant (RFC 3339, UTC, checked to be in the
    /// future by the caller).
    PauseUntil(String),
    /// The scheduler's command: resume the scope if the resume scheduled for `at` is still
    /// due (not cancelled, replaced or already fired).
    FireScheduledResume {
        at: String,
    },
    /// Revoke at `due_at` (RFC 3339, UTC, checked to be in the future by the caller): the
    /// scope is `pending_revocation` until then. `confirm` repeats the scope's id, as for
    /// `Revoke`. `requested_by`: the actor, named again by the revoke when it fires.
    ScheduleRevocation {
        confirm: String,
        due_at: String,
        requested_by: String,
    },
    /// Cancel a pending revocation: the scope returns to the own state it had. `now` (RFC 3339,
    /// UTC, microseconds, as the caller's clock reads it): a revocation whose due time has
    /// come is no longer cancelled, even if the scheduler has not fired it yet.
    CancelRevocation {
        now: String,
    },
    /// The scheduler's command: revoke the scope if its revocation is still pending for `at`
    /// (not cancelled, or revoked already).
    FireScheduledRevocation {
        at: String,
    },
    /// Set the organization's policy: the default waiting period of a revoke (an ISO 8601
    /// duration, validated by the caller; `None`: the built-in default).
    SetOrgPolicy {
        revoke_window: Option<String>,
        /// The organization's own rotation period (validated by the caller; `None`: none).
        rotation_period: Option<String>,
    },
    /// Set (or, `None`, lift) the scope's own rotation period (validated by the caller).
    SetRotationPeriod(Option<String>),
    /// The operator sets the organization's own rate limits (the rest: the server's).
    SetRateLimits(crate::rate::RateLimits),
    /// The scheduler's command: rotate the key if its current version is still `from` (not
    /// rotated meanwhile, by hand or by another instance).
    AutoRotate {
        from: KeyVersion,
    },
}

impl Command {
    /// Whether the command creates its scope (its id is new).
    pub fn creates(&self) -> bool {
        matches!(
            self,
            Command::CreateOrganization { .. } | Command::CreateScope { .. }
        )
    }

    /// Whether the command re-wraps the organization key under another master key, on an
    /// organization that has (`customer_key`) or has not a customer master key connected:
    /// leaving `byok` by a tier change does; the platform's key where it already wraps is
    /// only a tier change.
    pub fn switches_master(&self, customer_key: bool) -> bool {
        match self {
            Command::ChangeTier(tier) => customer_key && *tier != Tier::Byok,
            Command::SetMasterKey { master: None, .. } => customer_key,
            Command::SetMasterKey { .. } => true,
            _ => false,
        }
    }

    /// Whether the command reads the scope's own key versions from the read models (a switch
    /// of master key, a retire, a tier change that may be a switch): they are brought up to
    /// every committed event first.
    pub fn refreshes_first(&self) -> bool {
        matches!(
            self,
            Command::SetMasterKey { .. }
                | Command::ChangeTier(_)
                | Command::RetireKeyVersions(_)
                | Command::ChangePlan(_)
        )
    }

    /// Whether the command destroys key material (retiring versions, switching master keys):
    /// once the runner has deleted or replaced the rows, their bytes also leave the files.
    pub fn destroys(&self, customer_key: bool) -> bool {
        matches!(self, Command::RetireKeyVersions(_)) || self.switches_master(customer_key)
    }

    /// Whether the command is answered from this instance's memory as soon as its events
    /// commit. The others wait for the runner, which also destroys keys (revoke, retire, a
    /// switch of master key) and writes what the re-key job and token checks read.
    pub fn answers_from_memory(&self, customer_key: bool) -> bool {
        match self {
            Command::CreateOrganization { .. }
            | Command::CreateScope { .. }
            | Command::Pause
            | Command::Resume
            | Command::Rotate
            | Command::Grant { .. }
            | Command::Ungrant(_)
            | Command::ExpireGrant { .. }
            | Command::SetJustificationPolicy(_)
            | Command::SetMinDecryptionVersion(_)
            | Command::ChangePlan(_)
            | Command::PauseUntil(_)
            | Command::FireScheduledResume { .. }
            | Command::ScheduleRevocation { .. }
            | Command::CancelRevocation { .. }
            | Command::SetOrgPolicy { .. }
            | Command::SetRotationPeriod(_)
            | Command::SetRateLimits(_)
            | Command::AutoRotate { .. }
            | Command::RecordMasterKeyHealth { .. } => true,
            Command::ChangeTier(_) | Command::SetMasterKey { .. } => {
                !self.switches_master(customer_key)
            }
            _ => false,
        }
    }
}

/// What the caller looked up and made for a command, kept apart from the intent.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Prepared {
    /// The ancestors' state, for a command on an existing scope.
    pub lineage: Option<Lineage>,
    /// The parent, for `CreateScope`.
    pub parent: Option<ParentContext>,
    /// Whether the organization's key is wrapped by a customer master key (as the read
    /// models say): decides whether a tier change is a switch of master key.
    pub customer_key: bool,
    /// The key version made for the command (creates, rotations), stored with its events.
    pub minted: Option<MintedKey>,
    /// The key versions re-wrapped under the new master key (a switch of master key). `None`:
    /// not staged (the rules are checked as if every live version were).
    pub rewrapped: Option<Vec<KeyVersion>>,
    /// For leaving enterprise: the scope controls in force in the organization's tree, which
    /// the standard plan could no longer change. `None`: not looked up.
    pub controls_in_force: Option<ControlsInForce>,
}

/// Scope controls in force in an organization's tree, outside revoked subtrees.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ControlsInForce {
    /// Scopes paused by their own state.
    pub paused: u64,
    pub justification_policies: u64,
    /// Scopes with a decryption floor above 1.
    pub floors: u64,
}

impl ControlsInForce {
    pub fn is_empty(&self) -> bool {
        self.paused == 0 && self.justification_policies == 0 && self.floors == 0
    }
}

/// Key material made for a command: its version and fingerprint (never the material).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MintedKey {
    pub version: KeyVersion,
    pub fingerprint: String,
}

/// What the aggregate admits a command with: nothing to record, or events that need this
/// made first.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Admitted {
    /// Nothing to record (pause and resume are idempotent, and so on).
    Unchanged,
    /// Events would be recorded once `Needs` is made.
    Records(Needs),
}

/// What a command needs made before it is decided with it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Needs {
    Nothing,
    /// Key material for this version of the scope's key (creates, rotations).
    KeyVersion(KeyVersion),
    /// These live versions re-wrapped under the new master key.
    Rewrap(Vec<KeyVersion>),
    /// Whatever the scope's children wrap under versions below this one, re-wrapped.
    RewrapChildren(KeyVersion),
}

/// What creating a child needs to know about its parent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParentContext {
    pub id: ScopeId,
    pub kind: ScopeKind,
    pub org_id: OrgId,
    /// Ids from the root to the parent itself.
    pub path: Vec<ScopeId>,
    /// The parent's effective state, ancestors included.
    pub effective: Effective,
}

/// What a lifecycle command needs to know about the scope's ancestors.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lineage {
    /// The organization's plan.
    pub plan: Plan,
    /// The effective state of the parent (for an organization: `Active`).
    pub inherited: Effective,
    /// What the justification policies above the scope impose (ADR 0027).
    pub justification: crate::justification::EffectiveJustification,
}
