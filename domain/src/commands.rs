//! Commands on a scope. Each carries what its rules need from outside the aggregate
//! (the parent's effective state, the organization's plan), looked up by the caller first,
//! so the aggregate stays deterministic.

use crate::cascade::Effective;
use crate::ids::{OrgId, ScopeId};
use crate::scope::{Plan, ScopeKind, ScopeName, Tier};

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ScopeCommand {
    /// Create an organization, the root scope of its tree.
    CreateOrganization {
        id: OrgId,
        name: ScopeName,
        plan: Plan,
        tier: Tier,
        /// The id of the first admin token, recorded for auditors.
        admin_token_id: Option<String>,
    },
    /// Create a scope under an existing parent.
    CreateScope {
        id: ScopeId,
        kind: ScopeKind,
        name: ScopeName,
        parent: ParentContext,
    },
    PauseScope {
        lineage: Lineage,
    },
    ResumeScope {
        lineage: Lineage,
    },
    /// Revoke for good. `confirm` must repeat the scope's id, as typed by the caller.
    RevokeScope {
        confirm: String,
        lineage: Lineage,
    },
    /// Add a key version; new encryptions use it.
    RotateKey {
        lineage: Lineage,
    },
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
}
