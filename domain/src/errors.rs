//! Why the scope aggregate refuses a command: one variant per rule.

use crate::ids::{KeyVersion, ScopeId};
use crate::scope::{ScopeKind, Tier};

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ScopeError {
    #[error("scope {0} already exists")]
    AlreadyExists(ScopeId),
    #[error("the scope does not exist")]
    NotFound,
    #[error("a {kind} cannot be created under a {parent_kind}")]
    InvalidParent {
        kind: ScopeKind,
        parent_kind: ScopeKind,
    },
    #[error(
        "the parent scope is paused or pending revocation (by scope {cause}); resume it (or cancel the revocation) before creating scopes under it"
    )]
    ParentPaused { cause: ScopeId },
    #[error("the parent scope is revoked (by scope {cause}); nothing can be created under it")]
    ParentRevoked { cause: ScopeId },
    #[error("the scope is revoked; revocation is final and no further command is accepted")]
    Revoked,
    #[error("ancestor scope {cause} is revoked; revocation is final for its whole subtree")]
    AncestorRevoked { cause: ScopeId },
    #[error("the confirmation does not match: set `confirm` to the scope's id to revoke it")]
    ConfirmationMismatch,
    #[error("scope controls need the enterprise plan")]
    ControlsNeedEnterprise,
    #[error("the {0} tier needs the enterprise plan")]
    TierNeedsEnterprise(Tier),
    #[error("the byok tier is set by connecting a master key, not at creation")]
    ByokNeedsMasterKey,
    #[error("versions below {below} cannot be retired: the current version is {current} and stays usable")]
    CannotRetireCurrent {
        below: KeyVersion,
        current: KeyVersion,
    },
    #[error("only an organization has a tier")]
    NotAnOrganization,
    #[error(
        "the byok tier needs a customer master key, and a customer master key needs the byok tier"
    )]
    ByokTierMismatch,
    #[error("the organization's key is wrapped by the customer's master key: change it with PUT /v1/orgs/{{org}}/master-key (or set the tier, which re-wraps it under the platform key)")]
    MasterKeyInUse,
    #[error("key versions {prepared:?} were re-wrapped, but the live versions are {live:?}")]
    StaleRewrap {
        prepared: Vec<KeyVersion>,
        live: Vec<KeyVersion>,
    },
    #[error("no such token in this organization")]
    TokenNotFound,
    #[error("this principal does not hold that grant")]
    GrantNotFound,
    #[error("the organization has no customer master key to monitor")]
    NoCustomerMasterKey,
    #[error("only a revoked scope is re-keyed to destroy its keys in every copy")]
    NotRevoked,
    #[error("the re-key of this revoked scope has not started, or scope {0} is not on its path")]
    RekeyOutOfOrder(ScopeId),
    #[error("the decryption floor cannot be above the current version {current} (asked {version}): new encryptions must stay decryptable")]
    FloorAboveCurrent {
        version: KeyVersion,
        current: KeyVersion,
    },
    #[error("versions below {below} cannot be retired while the decryption floor is {floor}: raise it first with PUT /v1/scopes/{{id}}/min-decryption-version, check that nothing decrypts with them any more, then retire")]
    RetireAboveFloor {
        below: KeyVersion,
        floor: KeyVersion,
    },
    #[error("leaving the enterprise plan needs tier default (the organization's is {0}): set the tier first, so that nothing is re-wrapped or left uncovered silently")]
    PlanNeedsDefaultTier(Tier),
    #[error("leaving the enterprise plan would leave scope controls in force that the standard plan cannot change: {paused} paused or pending-revocation scope(s), {policies} justification polic(ies), {floors} decryption floor(s); resume (or cancel), lift or lower them first")]
    PlanLeavesControlsInForce {
        paused: u64,
        policies: u64,
        floors: u64,
    },
    #[error("with the policies above this scope, no justification would be allowed: list at least one reason the scopes above also allow")]
    JustificationPolicyConflict,
    #[error("the scope's revocation is pending until {due_at}: cancel it with POST /v1/scopes/{{id}}/cancel-revocation, or revoke immediately")]
    PendingRevocation { due_at: String },
    #[error("a scope may sit at most {max} levels deep (the organization is level 1)")]
    TooDeep { max: usize },
    #[error("the revocation fell due at {due_at} and can no longer be cancelled; the scheduler revokes it")]
    RevocationDue { due_at: String },
    #[error("key version {prepared} was prepared, but the next version is {next}")]
    StaleKeyVersion {
        prepared: KeyVersion,
        next: KeyVersion,
    },
}
