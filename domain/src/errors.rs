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
        "the parent scope is paused (by scope {cause}); resume it before creating scopes under it"
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
    #[error("key version {prepared} was prepared, but the next version is {next}")]
    StaleKeyVersion {
        prepared: KeyVersion,
        next: KeyVersion,
    },
}
