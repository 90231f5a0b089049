//! "Who could decrypt X at T": the principals whose `data:use` grants covered a scope at an
//! instant, each with its tokens that were valid then, and the scope's effective state then
//! (nobody could while it was paused, revoked or unavailable). Computed from the events
//! only, like the rest of time travel (`history.rs`): grants and tokens are events of the
//! organization's aggregate.

use std::collections::{BTreeMap, HashSet};

use chrono::{DateTime, Utc};
use ekm_domain::{Effective, Permission, PrincipalName, ScopeEvent, ScopeId};
use ekm_store::{Db, StoredEvent};

use crate::error::ProjectionError;
use crate::history::{scope_as_of, AsOf, PastScope};

/// The principal the first org admin token of an organization belongs to (it is issued with
/// the organization, `OrganizationCreated::admin_token_id`, not by a `TokenIssued` event).
const FIRST_ADMIN: &str = "admin";

/// Who could use a scope's keys at an instant.
#[derive(Clone, Debug, PartialEq)]
pub struct PastAccess {
    /// The scope as it was (its effective state and cause).
    pub scope: PastScope,
    pub at: DateTime<Utc>,
    /// Empty unless the scope was active.
    pub principals: Vec<PastHolder>,
}

/// A `data:use` grant that covered the scope, and its principal's tokens valid then.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PastHolder {
    pub principal: PrincipalName,
    pub permission: Permission,
    /// The scope the grant was made on: the organization for an organization-wide grant,
    /// else the root of the subtree (the scope itself or one of its ancestors).
    pub granted_on: ScopeId,
    /// RFC 3339, as granted, if the grant was to expire.
    pub expires_at: Option<String>,
    pub tokens: Vec<PastToken>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PastToken {
    pub token_id: String,
    /// RFC 3339, as issued.
    pub expires_at: Option<String>,
}

/// Who could use the keys of `id` at `at`, or `None` if the scope did not exist then.
pub async fn access_as_of(
    db: &Db,
    id: ScopeId,
    at: DateTime<Utc>,
) -> Result<Option<PastAccess>, ProjectionError> {
    let upto = db.position_at(at).await?;
    let Some(scope) = scope_as_of(db, id, AsOf::Position(upto)).await? else {
        return Ok(None);
    };
    let principals = if scope.effective == Effective::Active {
        let org = scope.state.org_id.scope_id();
        let events = db.events_of(&org.to_string()).await?;
        holders(&events, upto, at, &scope.state.path)?
    } else {
        vec![]
    };
    Ok(Some(PastAccess {
        scope,
        at,
        principals,
    }))
}

/// From an organization's events up to position `upto`: its `data:use` grants on a scope of
/// `path` (the organization first, the scope asked about last), each with the tokens of its
/// principal that were issued, not revoked and not expired at `at`. Ordered by principal,
/// then by the scope granted on (organization-wide first).
pub fn holders(
    org_events: &[StoredEvent],
    upto: i64,
    at: DateTime<Utc>,
    path: &[ScopeId],
) -> Result<Vec<PastHolder>, ProjectionError> {
    // (principal, permission, scope, expiry) → live; in the order granted (a grant again
    // with another expiry replaces the first).
    type Live = (PrincipalName, Permission, Option<ScopeId>, Option<String>);
    let mut grants: Vec<Live> = vec![];
    let mut tokens: BTreeMap<String, (PrincipalName, Option<String>)> = BTreeMap::new();
    let mut revoked: HashSet<String> = HashSet::new();
    let mut org = None;
    for stored in org_events.iter().filter(|e| e.position <= upto) {
        match stored.scope_event()? {
            ScopeEvent::OrganizationCreated {
                org_id,
                admin_token_id,
                ..
            } => {
                org = Some(org_id.scope_id());
                if let (Some(token), Ok(admin)) =
                    (admin_token_id, PrincipalName::parse(FIRST_ADMIN))
                {
                    tokens.insert(token, (admin, None));
                }
            }
            ScopeEvent::TokenIssued {
                token_id,
                principal,
                expires_at,
                ..
            } => {
                tokens.insert(token_id, (principal, expires_at));
            }
            ScopeEvent::TokenRevoked { token_id } => {
                revoked.insert(token_id);
            }
            ScopeEvent::PermissionGranted {
                principal,
                permission,
                scope_id,
                expires_at,
            } => {
                grants.retain(|g| (&g.0, g.1, g.2) != (&principal, permission, scope_id));
                grants.push((principal, permission, scope_id, expires_at));
            }
            ScopeEvent::PermissionRevoked {
                principal,
                permission,
                scope_id,
            } => grants.retain(|g| (&g.0, g.1, g.2) != (&principal, permission, scope_id)),
            _ => {}
        }
    }
    let Some(org) = org else {
        return Ok(vec![]);
    };
    // An expiry that does not parse (never written so) counts as valid: an auditor asking
    // who could is better told one token or grant too many than one too few.
    let valid_at = |expires_at: &Option<String>| match expires_at {
        None => true,
        Some(text) => DateTime::parse_from_rfc3339(text).map_or(true, |t| t > at),
    };
    let mut out: Vec<PastHolder> = grants
        .into_iter()
        .filter(|(_, permission, _, expires_at)| {
            *permission == Permission::DataUse && valid_at(expires_at)
        })
        .map(|(principal, permission, scope, expires_at)| {
            (principal, permission, scope.unwrap_or(org), expires_at)
        })
        .filter(|(_, _, granted_on, _)| path.contains(granted_on))
        .map(
            |(principal, permission, granted_on, expires_at)| PastHolder {
                tokens: tokens
                    .iter()
                    .filter(|(id, (owner, expires_at))| {
                        *owner == principal && !revoked.contains(*id) && valid_at(expires_at)
                    })
                    .map(|(id, (_, expires_at))| PastToken {
                        token_id: id.clone(),
                        expires_at: expires_at.clone(),
                    })
                    .collect(),
                principal,
                permission,
                granted_on,
                expires_at,
            },
        )
        .collect();
    let depth = |scope: &ScopeId| path.iter().position(|s| s == scope);
    out.sort_by(|a, b| {
        (a.principal.as_str(), depth(&a.granted_on))
            .cmp(&(b.principal.as_str(), depth(&b.granted_on)))
    });
    out.dedup();
    Ok(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use cqrs_es::DomainEvent;
    use ekm_domain::metadata::{Actor, ActorKind, EventMetadata};
    use ekm_domain::{KeyVersion, OrgId, OrgRole, Plan, PrincipalKind, ScopeName, Tier};

    use super::*;

    /// An organization's history, one event per position.
    struct Given {
        org: OrgId,
        team: ScopeId,
        thread: ScopeId,
        other: ScopeId,
        events: Vec<StoredEvent>,
    }

    fn at(text: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(text)
            .unwrap()
            .with_timezone(&Utc)
    }

    impl Given {
        fn new() -> Given {
            let org = OrgId::generate();
            let mut given = Given {
                org,
                team: ScopeId::generate(),
                thread: ScopeId::generate(),
                other: ScopeId::generate(),
                events: vec![],
            };
            given.then(ScopeEvent::OrganizationCreated {
                org_id: org,
                name: ScopeName::parse("acme").unwrap(),
                plan: Plan::Enterprise,
                tier: Tier::Managed,
                key_version: KeyVersion::FIRST,
                admin_token_id: Some("tok_first".into()),
                key_fingerprint: None,
            });
            given
        }

        fn then(&mut self, event: ScopeEvent) -> i64 {
            let position = i64::try_from(self.events.len()).unwrap() + 1;
            let metadata = EventMetadata {
                actor: Actor {
                    kind: ActorKind::User,
                    id: "alice".into(),
                },
                request_id: "req".into(),
                reason: None,
                source_address: None,
                recorded_at: "2026-11-30T00:00:00Z".into(),
                location: None,
            };
            self.events.push(StoredEvent {
                position,
                recorded_at: Utc::now(),
                aggregate_type: "scope".into(),
                aggregate_id: self.org.to_string(),
                sequence: position,
                event_type: event.event_type(),
                event_version: "1".into(),
                payload: serde_json::to_string(&event).unwrap(),
                metadata: serde_json::to_string(&metadata.to_map()).unwrap(),
            });
            position
        }

        fn grant(
            &mut self,
            principal: &str,
            permission: Permission,
            scope: Option<ScopeId>,
        ) -> i64 {
            self.then(ScopeEvent::PermissionGranted {
                principal: PrincipalName::parse(principal).unwrap(),
                permission,
                scope_id: scope,
                expires_at: None,
            })
        }

        fn ungrant(
            &mut self,
            principal: &str,
            permission: Permission,
            scope: Option<ScopeId>,
        ) -> i64 {
            self.then(ScopeEvent::PermissionRevoked {
                principal: PrincipalName::parse(principal).unwrap(),
                permission,
                scope_id: scope,
            })
        }

        fn token(&mut self, id: &str, principal: &str, expires_at: Option<&str>) -> i64 {
            self.then(ScopeEvent::TokenIssued {
                token_id: id.into(),
                principal: PrincipalName::parse(principal).unwrap(),
                kind: PrincipalKind::Service,
                role: OrgRole::Member,
                expires_at: expires_at.map(str::to_owned),
            })
        }

        /// Who could use the thread's keys at position `upto` and instant `when`.
        fn who(&self, upto: i64, when: &str) -> Vec<(String, ScopeId, Vec<String>)> {
            let path = [self.org.scope_id(), self.team, self.thread];
            holders(&self.events, upto, at(when), &path)
                .unwrap()
                .into_iter()
                .map(|h| {
                    assert_eq!(h.permission, Permission::DataUse);
                    (
                        h.principal.to_string(),
                        h.granted_on,
                        h.tokens.into_iter().map(|t| t.token_id).collect(),
                    )
                })
                .collect()
        }
    }

    const NOON: &str = "2026-11-30T12:00:00Z";

    #[test]
    fn nobody_could_when_nothing_was_granted_data_use() {
        let mut given = Given::new();
        let upto = given.grant("bob", Permission::EncryptionManage, None);
        given.token("tok_bob", "bob", None);
        assert!(given.who(upto + 1, NOON).is_empty());
    }

    #[test]
    fn grants_on_the_path_count_and_grants_elsewhere_do_not() {
        let mut given = Given::new();
        let (team, other, org) = (given.team, given.other, given.org.scope_id());
        given.grant("svc", Permission::DataUse, Some(team));
        given.grant("svc", Permission::DataUse, None);
        given.grant("elsewhere", Permission::DataUse, Some(other));
        let upto = given.token("tok_svc", "svc", None);
        assert_eq!(
            given.who(upto, NOON),
            vec![
                ("svc".into(), org, vec!["tok_svc".into()]),
                ("svc".into(), team, vec!["tok_svc".into()]),
            ]
        );
    }

    #[test]
    fn the_answer_follows_grants_and_tokens_as_they_were_at_the_position() {
        let mut given = Given::new();
        let team = given.team;
        let granted = given.grant("svc", Permission::DataUse, Some(team));
        let issued = given.token("tok_svc", "svc", None);
        let revoked = given.then(ScopeEvent::TokenRevoked {
            token_id: "tok_svc".into(),
        });
        let ungranted = given.ungrant("svc", Permission::DataUse, Some(team));
        assert_eq!(given.who(granted, NOON), vec![("svc".into(), team, vec![])]);
        assert_eq!(
            given.who(issued, NOON),
            vec![("svc".into(), team, vec!["tok_svc".into()])]
        );
        assert_eq!(given.who(revoked, NOON), vec![("svc".into(), team, vec![])]);
        assert!(given.who(ungranted, NOON).is_empty());
        // Before the grant: nobody.
        assert!(given.who(granted - 1, NOON).is_empty());
    }

    #[test]
    fn a_grant_counts_until_it_expires_and_a_grant_again_replaces_its_expiry() {
        // Given a grant on the team until noon, and a token
        let mut given = Given::new();
        let team = given.team;
        given.then(ScopeEvent::PermissionGranted {
            principal: PrincipalName::parse("svc").unwrap(),
            permission: Permission::DataUse,
            scope_id: Some(team),
            expires_at: Some(NOON.into()),
        });
        let upto = given.token("tok_svc", "svc", None);
        let holder = vec![("svc".into(), team, vec!["tok_svc".into()])];
        // Then it counts before noon, and not from noon on, though not yet removed
        assert_eq!(given.who(upto, "2026-11-30T11:59:59Z"), holder);
        assert!(given.who(upto, NOON).is_empty());
        // When granted again for good, then it counts after noon too
        let again = given.grant("svc", Permission::DataUse, Some(team));
        assert_eq!(given.who(again, "2026-12-01T00:00:00Z"), holder);
    }

    #[test]
    fn a_token_counts_until_it_expires() {
        let mut given = Given::new();
        given.grant("svc", Permission::DataUse, None);
        let upto = given.token("tok_svc", "svc", Some("2026-11-30T12:00:00Z"));
        let org = given.org.scope_id();
        assert_eq!(
            given.who(upto, "2026-11-30T11:59:59Z"),
            vec![("svc".into(), org, vec!["tok_svc".into()])]
        );
        assert_eq!(given.who(upto, NOON), vec![("svc".into(), org, vec![])]);
    }

    #[test]
    fn the_first_admin_token_counts_once_admin_is_granted_data_use() {
        let mut given = Given::new();
        let upto = given.grant("admin", Permission::DataUse, None);
        assert_eq!(
            given.who(upto, NOON),
            vec![(
                "admin".into(),
                given.org.scope_id(),
                vec!["tok_first".into()]
            )]
        );
    }
}
