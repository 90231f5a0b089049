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

    /// `holds`, as a refusal (`AppError::NotPermitted`) naming what is missing.
    pub fn require(&self, permission: Permission, path: &[ScopeId]) -> Result<(), AppError> {
        if self.holds(permission, path) {
            Ok(())
        } else {
            Err(AppError::NotPermitted { permission })
        }
    }

    /// Org admins only (tokens and grants).
    pub fn require_org_admin(&self) -> Result<(), AppError> {
        if self.principal.role == Role::ORG_ADMIN {
            Ok(())
        } else {
            Err(AppError::NotOrgAdmin)
        }
    }
}

#[cfg(test)]
mod tests {
    use ekm_domain::{Grant, OrgRole, PrincipalName};

    use super::*;

    fn caller(role: Role, kind: PrincipalKind, grants: Vec<Grant>) -> Caller {
        let org = OrgId::generate();
        Caller {
            principal: Principal {
                token_id: "tok_1".into(),
                role,
                org_id: (role != Role::Operator).then_some(org),
                name: "alice".into(),
                expires_at: None,
                principal: "alice".into(),
                kind,
                grants,
                grants_until: None,
            },
            request_id: "req-1".into(),
            source_address: None,
        }
    }

    fn grant(permission: Permission, scope: Option<ScopeId>) -> Grant {
        Grant {
            principal: PrincipalName::parse("alice").unwrap(),
            permission,
            scope,
        }
    }

    #[test]
    fn require_refuses_a_member_without_a_grant_and_names_the_permission() {
        let member = caller(Role::Org(OrgRole::Member), PrincipalKind::User, vec![]);
        let root = ScopeId::generate();
        let refusal = member.require(Permission::DataUse, &[root]).unwrap_err();
        assert!(matches!(
            refusal,
            AppError::NotPermitted {
                permission: Permission::DataUse
            }
        ));
        assert!(refusal.to_string().contains("data:use"));
    }

    #[test]
    fn holds_follows_a_subtree_grant_down_but_not_up_or_sideways() {
        let (root, team, thread, other) = (
            ScopeId::generate(),
            ScopeId::generate(),
            ScopeId::generate(),
            ScopeId::generate(),
        );
        let member = caller(
            Role::Org(OrgRole::Member),
            PrincipalKind::User,
            vec![grant(Permission::EncryptionManage, Some(team))],
        );
        assert!(member.holds(Permission::EncryptionManage, &[root, team, thread]));
        // manage implies view
        assert!(member.holds(Permission::EncryptionView, &[root, team]));
        assert!(!member.holds(Permission::EncryptionManage, &[root]));
        assert!(!member.holds(Permission::EncryptionManage, &[root, other]));
        assert!(!member.holds(Permission::DataUse, &[root, team]));
        assert_eq!(
            member.subtrees(Permission::EncryptionView),
            Some(vec![team])
        );
        assert_eq!(member.subtrees(Permission::AuditRead), Some(vec![]));
    }

    #[test]
    fn an_admin_holds_everything_but_the_data_plane_everywhere() {
        let admin = caller(Role::ORG_ADMIN, PrincipalKind::User, vec![]);
        assert_eq!(admin.subtrees(Permission::EncryptionManage), None);
        assert!(!admin.holds(Permission::DataUse, &[ScopeId::generate()]));
        assert!(admin.require_org_admin().is_ok());
        let it_admin = caller(Role::Org(OrgRole::ItAdmin), PrincipalKind::User, vec![]);
        assert!(matches!(
            it_admin.require_org_admin(),
            Err(AppError::NotOrgAdmin)
        ));
    }

    #[test]
    fn the_actor_kind_follows_the_principal_kind_and_the_operator_acts_by_its_token() {
        let service = caller(Role::Org(OrgRole::Member), PrincipalKind::Service, vec![]);
        let metadata = service.metadata(None);
        assert_eq!(metadata.actor.kind, ActorKind::Service);
        assert_eq!(metadata.actor.id, "alice");
        let user = caller(Role::Org(OrgRole::Member), PrincipalKind::User, vec![]);
        assert_eq!(user.metadata(None).actor.kind, ActorKind::User);
        let operator = caller(Role::Operator, PrincipalKind::User, vec![]);
        let metadata = operator.metadata(None);
        assert_eq!(metadata.actor.kind, ActorKind::Operator);
        assert_eq!(metadata.actor.id, "tok_1");
        assert_eq!(metadata.request_id, "req-1");
    }
}
