//! Key minting behind a trait (ADR 0022): what a command needs made before the aggregate
//! decides it (a key version's material, a re-wrap under another master key, children
//! re-wrapped before a retire). `KeyService` is the real one; `FakeMinter` (tests) records
//! what it was asked and makes nothing.

use std::future::Future;
use std::pin::Pin;

use ekm_domain::{KeyVersion, MasterKeyRef, OrgId, ScopeId};
use ekm_projections::ScopeSnapshot;
use ekm_store::KeyWrites;

use crate::keys::{KeyError, KeyService};

/// What minting returns, later.
pub type Minting<'a, T> = Pin<Box<dyn Future<Output = Result<T, KeyError>> + Send + 'a>>;

/// Makes the key material a command needs. Returns fingerprints and the rows to store in
/// the command's own transaction (ADR 0020); never the material itself.
pub trait KeyMinter: Send + Sync {
    /// A version of an organization's key (`new_org`: the organization is being created).
    fn org_key<'a>(
        &'a self,
        org: OrgId,
        version: KeyVersion,
        master: Option<&'a MasterKeyRef>,
        new_org: bool,
    ) -> Minting<'a, (String, KeyWrites)>;

    /// A version of a scope's key, wrapped along its `parent`.
    fn scope_key<'a>(
        &'a self,
        scope: ScopeId,
        version: KeyVersion,
        parent: &'a ScopeSnapshot,
    ) -> Minting<'a, (String, KeyWrites)>;

    /// The organization's `live` versions (with their fingerprints) re-wrapped under
    /// `target` (`None`: the platform's key) and staged; returns the versions staged.
    fn stage_master_switch<'a>(
        &'a self,
        org: OrgId,
        live: &'a [(KeyVersion, String)],
        target: Option<&'a MasterKeyRef>,
    ) -> Minting<'a, Vec<KeyVersion>>;

    /// Whatever `scope`'s children wrap under its versions below `below`, re-wrapped under
    /// its current one; returns how many were.
    fn rewrap_children<'a>(
        &'a self,
        scope: &'a ScopeSnapshot,
        below: KeyVersion,
    ) -> Minting<'a, usize>;
}

impl KeyMinter for KeyService {
    fn org_key<'a>(
        &'a self,
        org: OrgId,
        version: KeyVersion,
        master: Option<&'a MasterKeyRef>,
        new_org: bool,
    ) -> Minting<'a, (String, KeyWrites)> {
        Box::pin(self.prepare_org_key(org, version, master, new_org))
    }

    fn scope_key<'a>(
        &'a self,
        scope: ScopeId,
        version: KeyVersion,
        parent: &'a ScopeSnapshot,
    ) -> Minting<'a, (String, KeyWrites)> {
        Box::pin(self.prepare_scope_key(scope, version, parent))
    }

    fn stage_master_switch<'a>(
        &'a self,
        org: OrgId,
        live: &'a [(KeyVersion, String)],
        target: Option<&'a MasterKeyRef>,
    ) -> Minting<'a, Vec<KeyVersion>> {
        Box::pin(KeyService::stage_master_switch(self, org, live, target))
    }

    fn rewrap_children<'a>(
        &'a self,
        scope: &'a ScopeSnapshot,
        below: KeyVersion,
    ) -> Minting<'a, usize> {
        Box::pin(KeyService::rewrap_children(self, scope, below))
    }
}

/// A call the fake minter received.
#[cfg(test)]
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MintCall {
    OrgKey {
        org: OrgId,
        version: KeyVersion,
        new_org: bool,
    },
    ScopeKey {
        scope: ScopeId,
        version: KeyVersion,
    },
    MasterSwitch {
        org: OrgId,
        live: Vec<KeyVersion>,
        target: Option<MasterKeyRef>,
    },
    RewrapChildren {
        scope: ScopeId,
        below: KeyVersion,
    },
}

/// Records every call and makes no key material: fingerprints are `fake-<scope>-v<n>`,
/// there are no rows to store, and a switch of master key stages exactly what it is given.
#[cfg(test)]
#[derive(Default)]
pub struct FakeMinter {
    calls: std::sync::Mutex<Vec<MintCall>>,
}

#[cfg(test)]
impl FakeMinter {
    pub fn calls(&self) -> Vec<MintCall> {
        self.calls.lock().map(|c| c.clone()).unwrap_or_default()
    }

    fn record(&self, call: MintCall) {
        if let Ok(mut calls) = self.calls.lock() {
            calls.push(call);
        }
    }
}

#[cfg(test)]
impl KeyMinter for FakeMinter {
    fn org_key<'a>(
        &'a self,
        org: OrgId,
        version: KeyVersion,
        _master: Option<&'a MasterKeyRef>,
        new_org: bool,
    ) -> Minting<'a, (String, KeyWrites)> {
        self.record(MintCall::OrgKey {
            org,
            version,
            new_org,
        });
        let fingerprint = format!("fake-{org}-v{}", version.get());
        Box::pin(async move { Ok((fingerprint, KeyWrites::default())) })
    }

    fn scope_key<'a>(
        &'a self,
        scope: ScopeId,
        version: KeyVersion,
        _parent: &'a ScopeSnapshot,
    ) -> Minting<'a, (String, KeyWrites)> {
        self.record(MintCall::ScopeKey { scope, version });
        let fingerprint = format!("fake-{scope}-v{}", version.get());
        Box::pin(async move { Ok((fingerprint, KeyWrites::default())) })
    }

    fn stage_master_switch<'a>(
        &'a self,
        org: OrgId,
        live: &'a [(KeyVersion, String)],
        target: Option<&'a MasterKeyRef>,
    ) -> Minting<'a, Vec<KeyVersion>> {
        let versions: Vec<KeyVersion> = live.iter().map(|(version, _)| *version).collect();
        self.record(MintCall::MasterSwitch {
            org,
            live: versions.clone(),
            target: target.cloned(),
        });
        Box::pin(async move { Ok(versions) })
    }

    fn rewrap_children<'a>(
        &'a self,
        scope: &'a ScopeSnapshot,
        below: KeyVersion,
    ) -> Minting<'a, usize> {
        self.record(MintCall::RewrapChildren {
            scope: scope.scope.id,
            below,
        });
        Box::pin(async move { Ok(0) })
    }
}
