//! What a caller may see and use: the scope it names, if it is in the caller's organization
//! and the caller holds the permission on it; and for the data plane, the scope's keys if
//! it is also active right now.

use std::sync::Arc;

use ekm_domain::{Effective, Permission, ScopeId};
use ekm_projections::ScopeSnapshot;

use crate::app::{App, AppError};
use crate::caller::Caller;
use crate::keys::ScopeKeys;

impl App {
    /// The scope `id` if it is in the caller's organization (else `NotVisible`, as if it did
    /// not exist, so that ids of other organizations reveal nothing) and the caller holds
    /// `permission` on it (else `NotPermitted`). The operator sees no scopes.
    pub async fn visible_scope(
        &self,
        caller: &Caller,
        id: ScopeId,
        permission: Permission,
    ) -> Result<ScopeSnapshot, AppError> {
        if caller.is_operator() {
            return Err(AppError::OperatorHasNoScopes);
        }
        match self.scope(id).await? {
            Some(snapshot) if Some(snapshot.scope.org_id) == caller.org() => {
                caller.require(permission, &snapshot.scope.path)?;
                Ok(snapshot)
            }
            _ => Err(AppError::NotVisible),
        }
    }

    /// The keys of scope `id` if the caller may use it (`data:use`) and it is active right
    /// now: from the key cache, else loaded (and cached unless an eviction raced the load).
    pub async fn usable_keys(
        &self,
        caller: &Caller,
        id: ScopeId,
    ) -> Result<Arc<ScopeKeys>, AppError> {
        if caller.is_operator() {
            return Err(AppError::OperatorHasNoScopes);
        }
        // Fail closed while the read models do not follow the log: a pause committed since
        // may not have reached the tree this answer would come from.
        if let Some(stall) = self.projections_stall() {
            return Err(AppError::ProjectionsBehind {
                applied: stall.applied,
                head: stall.head,
                behind_ms: u64::try_from(stall.behind.as_millis()).unwrap_or(u64::MAX),
            });
        }
        let keys = self.keys();
        if let Some(entry) = keys.cached(id) {
            if Some(entry.org_id) != caller.org() {
                return Err(AppError::NotVisible);
            }
            caller.require(Permission::DataUse, &entry.path)?;
            return Ok(entry);
        }
        // The eviction epoch and the position seen before reading: an eviction after this
        // point keeps the entry out of the cache, and the entry is valid at least as of the
        // position.
        let epoch = keys.epoch();
        let memory = self.memory();
        let position = if memory.is_ready() {
            memory.position()
        } else {
            self.projector().applied()
        };
        let snapshot = self.scope(id).await?.ok_or(AppError::NotVisible)?;
        if Some(snapshot.scope.org_id) != caller.org() {
            return Err(AppError::NotVisible);
        }
        caller.require(Permission::DataUse, &snapshot.scope.path)?;
        match snapshot.effective {
            Effective::Active => {}
            Effective::Paused { by } => return Err(AppError::Paused { by }),
            Effective::PendingRevocation { by } => {
                let due_at = snapshot
                    .cause
                    .as_ref()
                    .and_then(|c| c.due_at.clone())
                    .unwrap_or_default();
                return Err(AppError::PendingRevocation { by, due_at });
            }
            Effective::Revoked { by } => return Err(AppError::Revoked { by }),
            Effective::Unavailable { by } => {
                let reason = snapshot
                    .cause
                    .as_ref()
                    .and_then(|c| c.change.as_ref())
                    .and_then(|c| c.reason.clone());
                return Err(AppError::MasterKeyUnavailable { by, reason });
            }
        }
        Ok(keys.load(&snapshot, position, epoch).await?)
    }
}
