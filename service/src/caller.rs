//! Who is acting: an authenticated principal and the facts about its request, turned into
//! event metadata; and what it may do (its role and grants against a scope's path).

use chrono::Utc;
use ekm_domain::{
    Actor, ActorKind, EventMetadata, OrgId, Permission, PrincipalKind, Reason, ScopeId,
};
use ekm_store::{Principal, Role};

use crate::app::AppError;

/// An authenticated caller and the facts about its request.
#[derive(Clone, Debug)]
pub struct Caller {
    pub principal: Principal,
    pub request_id: String,
    pub source_address: Option<String>,
}

impl Caller {
    pub fn metadata(&self, reason: Option<Reason>) -> EventMetadata {
        // The principal behind the token is the actor (the operator has only its token).
        let (kind, id) = match self.principal.role {
            Role::Operator => (ActorKind::Operator, self.principal.token_id.clone()),
            Role::Org(_) if self.principal.kind == PrincipalKind::Service => {
                (ActorKind::Service, self.principal.principal.clone())
            }
            Role::Org(_) => (ActorKind::User, self.principal.principal.clone()),
        };
        EventMetadata {
            actor: Actor { kind, id },
            request_id: self.request_id.clone(),
            reason,
            source_address: self.source_address.clone(),
            recorded_at: ekm_store::time::rfc3339(Utc::now()),
            location: None,
        }
    }

    /// The organization this caller acts for; the operator acts for none.
    pub fn org(&self) -> Option<OrgId> {
        self.principal.org_id
    }

    pub fn is_operator(&self) -> bool {
        self.principal.role == Role::Operator
    }

    /// Whether the caller holds `permission` on the scope whose path (root first) is
    /// `path`: through its role, or a grant on the whole organization or on an ancestor of
    /// (or the scope itself). The caller's organization was checked before.
    pub fn holds(&self, permission: Permission, path: &[ScopeId]) -> bool {
        let by_role = match self.principal.role {
            Role::Operator => false,
            Role::Org(role) => role.holds(permission),
        };
        by_role
            || self.principal.grants.iter().any(|grant| {
                grant.permission.implies(permission)
                    && grant.scope.is_none_or(|scope| path.contains(&scope))
            })
    }

    /// Where in its organization the caller holds `permission`: `None` for everywhere (its
    /// role, or a grant on the whole organization), else the roots of the subtrees it was
    /// granted (possibly none). Lists filter by this, so they never page through rows the
    /// caller may not see.
    pub fn subtrees(&self, permission: Permission) -> Option<Vec<ScopeId>> {
        let everywhere = match self.principal.role {
            Role::Operator => false,
            Role::Org(role) => role.holds(permission),
        } || self
            .principal
            .grants
            .iter()
            .any(|grant| grant.permission.implies(permission) && grant.scope.is_none());
        if everywhere {
            return None;
        }
        Some(
            self.principal
                .grants
                .iter()
                .filter(|grant| grant.permission.implies(permission))
                .filter_map(|grant| grant.scope)
                .collect(),
        )
    }

    /// `holds`, as a refusal (`AppError::Forbidden`) naming what is missing.
    pub fn require(&self, permission: Permission, path: &[ScopeId]) -> Result<(), AppError> {
        if self.holds(permission, path) {
            Ok(())
        } else {
            Err(AppError::Forbidden(format!(
                "this token's principal does not hold {permission} here; an org admin can grant it"
            )))
        }
    }

    /// Org admins only (tokens and grants).
    pub fn require_org_admin(&self) -> Result<(), AppError> {
        if self.principal.role == Role::ORG_ADMIN {
            Ok(())
        } else {
            Err(AppError::Forbidden(
                "only an org_admin manages tokens and grants".into(),
            ))
        }
    }
}
