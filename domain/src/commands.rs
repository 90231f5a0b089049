//! Commands on a scope. Each carries what its rules need from outside the aggregate
//! (the parent's effective state, the organization's plan), looked up by the caller first,
//! so the aggregate stays deterministic.

use crate::access::{Grant, OrgRole, PrincipalKind, PrincipalName};
use crate::cascade::Effective;
use crate::ids::{KeyVersion, OrgId, ScopeId};
use crate::master_key::{KeyHealth, MasterKeyRef, UnavailableReason};
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
        /// The fingerprint of the key created for version 1 (the caller stored it first).
        key_fingerprint: Option<String>,
    },
    /// Create a scope under an existing parent.
    CreateScope {
        id: ScopeId,
        kind: ScopeKind,
        name: ScopeName,
        parent: ParentContext,
        key_fingerprint: Option<String>,
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
    /// Move an organization to another tier (what is encrypted). Only the organization key
    /// is re-wrapped where the master key changes; no data is re-encrypted.
    ChangeTier {
        tier: Tier,
        lineage: Lineage,
    },
    /// Retire every key version below `below`: their key material is destroyed. The caller
    /// re-wraps whatever the scope's children still wrap under them first, and clients
    /// rewrap their ciphertexts first (a retired version decrypts nothing).
    RetireKeyVersions {
        below: KeyVersion,
        lineage: Lineage,
    },
    /// Add a key version; new encryptions use it. `key_version` is the version the caller
    /// prepared key material for: the command is refused if it is not the next one.
    RotateKey {
        lineage: Lineage,
        key_version: Option<KeyVersion>,
        key_fingerprint: Option<String>,
    },
    /// Wrap the organization's key under another master key: the customer's (`master`,
    /// tier `byok`), or the platform's again (`master: None`, tier `managed` or `default`).
    /// The caller validated the customer's key with a round trip and re-wrapped every live
    /// key version (`rewrapped`) before sending this; the command is refused if that set is
    /// not exactly the organization's live versions. `None`: not prepared yet (the rules
    /// are checked; the caller prepares, then sends it again).
    SetMasterKey {
        master: Option<MasterKeyRef>,
        tier: Tier,
        rewrapped: Option<Vec<KeyVersion>>,
        lineage: Lineage,
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
    RevokeToken {
        token_id: String,
    },
    /// Grant a permission; `scope` (checked by the caller to be in this organization)
    /// limits it to a subtree.
    GrantPermission {
        grant: Grant,
    },
    RevokePermission {
        grant: Grant,
    },
    /// Start the re-key of a revoked scope's ancestors (sent by the system's re-key job).
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
