//! The access model's vocabulary: principals (people and services of an organization),
//! their roles, and the permissions an org admin grants.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::ids::ScopeId;
use crate::scope::ValueError;

/// What a principal may be allowed to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Permission {
    /// Pause, resume, revoke, rotate, create scopes, set tier and master key.
    #[serde(rename = "encryption:manage")]
    EncryptionManage,
    /// Read scopes, their state and history, and the master key's status.
    #[serde(rename = "encryption:view")]
    EncryptionView,
    /// Read, export and verify the audit log.
    #[serde(rename = "audit:read")]
    AuditRead,
    /// The data plane: encrypt, decrypt, data keys, rewrap.
    #[serde(rename = "data:use")]
    DataUse,
}

impl Permission {
    pub const ALL: [Permission; 4] = [
        Permission::EncryptionManage,
        Permission::EncryptionView,
        Permission::AuditRead,
        Permission::DataUse,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Permission::EncryptionManage => "encryption:manage",
            Permission::EncryptionView => "encryption:view",
            Permission::AuditRead => "audit:read",
            Permission::DataUse => "data:use",
        }
    }

    /// Whether holding `self` gives `wanted` (managing includes viewing).
    pub fn implies(self, wanted: Permission) -> bool {
        self == wanted
            || (self == Permission::EncryptionManage && wanted == Permission::EncryptionView)
    }
}

impl FromStr for Permission {
    type Err = ValueError;
    fn from_str(input: &str) -> Result<Self, ValueError> {
        Permission::ALL
            .into_iter()
            .find(|p| p.as_str() == input)
            .ok_or_else(|| {
                ValueError::new(
                    "permission",
                    format!(
                        "`{}` is not one of encryption:manage, encryption:view, audit:read, data:use",
                        input.chars().take(64).collect::<String>()
                    ),
                )
            })
    }
}

impl fmt::Display for Permission {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A principal's role in its organization.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OrgRole {
    /// Manages encryption, tokens and grants.
    OrgAdmin,
    /// Manages encryption.
    ItAdmin,
    /// Holds only what is granted.
    Member,
}

impl OrgRole {
    pub fn as_str(self) -> &'static str {
        match self {
            OrgRole::OrgAdmin => "org_admin",
            OrgRole::ItAdmin => "it_admin",
            OrgRole::Member => "member",
        }
    }

    /// The permissions the role holds without a grant.
    pub fn holds(self, permission: Permission) -> bool {
        match self {
            OrgRole::OrgAdmin | OrgRole::ItAdmin => permission != Permission::DataUse,
            OrgRole::Member => false,
        }
    }
}

impl FromStr for OrgRole {
    type Err = ValueError;
    fn from_str(input: &str) -> Result<Self, ValueError> {
        [OrgRole::OrgAdmin, OrgRole::ItAdmin, OrgRole::Member]
            .into_iter()
            .find(|r| r.as_str() == input)
            .ok_or_else(|| {
                ValueError::new(
                    "role",
                    format!(
                        "`{}` is not one of org_admin, it_admin, member",
                        input.chars().take(64).collect::<String>()
                    ),
                )
            })
    }
}

/// A person or a service.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PrincipalKind {
    User,
    Service,
}

impl PrincipalKind {
    pub fn as_str(self) -> &'static str {
        match self {
            PrincipalKind::User => "user",
            PrincipalKind::Service => "service",
        }
    }
}

impl FromStr for PrincipalKind {
    type Err = ValueError;
    fn from_str(input: &str) -> Result<Self, ValueError> {
        match input {
            "user" => Ok(PrincipalKind::User),
            "service" => Ok(PrincipalKind::Service),
            other => Err(ValueError::new(
                "kind",
                format!(
                    "`{}` is not one of user, service",
                    other.chars().take(64).collect::<String>()
                ),
            )),
        }
    }
}

/// A principal's name within its organization: 1 to 64 of letters, digits and `.-_@`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct PrincipalName(String);

impl PrincipalName {
    pub fn parse(input: &str) -> Result<PrincipalName, ValueError> {
        let valid = !input.is_empty()
            && input.len() <= 64
            && input
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | '@'));
        if valid {
            Ok(PrincipalName(input.to_owned()))
        } else {
            Err(ValueError::new(
                "principal",
                "must be 1 to 64 letters, digits or . - _ @",
            ))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for PrincipalName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A permission held by a principal, on the whole organization (`scope: None`) or on one
/// subtree.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Grant {
    pub principal: PrincipalName,
    pub permission: Permission,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<ScopeId>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn admins_hold_everything_but_the_data_plane() {
        for role in [OrgRole::OrgAdmin, OrgRole::ItAdmin] {
            assert!(role.holds(Permission::EncryptionManage));
            assert!(role.holds(Permission::EncryptionView));
            assert!(role.holds(Permission::AuditRead));
            assert!(!role.holds(Permission::DataUse));
        }
        assert!(Permission::ALL.iter().all(|p| !OrgRole::Member.holds(*p)));
    }

    #[test]
    fn manage_implies_view_only() {
        assert!(Permission::EncryptionManage.implies(Permission::EncryptionView));
        assert!(!Permission::EncryptionView.implies(Permission::EncryptionManage));
        assert!(!Permission::EncryptionManage.implies(Permission::DataUse));
    }

    proptest! {
        #[test]
        fn principal_names_of_allowed_characters_parse_and_print_back(
            input in "[A-Za-z0-9.@_-]{1,64}",
        ) {
            let name = PrincipalName::parse(&input).unwrap();
            prop_assert_eq!(name.as_str(), input.as_str());
        }

        #[test]
        fn principal_names_with_one_other_character_or_too_long_are_refused(
            prefix in "[A-Za-z0-9.@_-]{0,30}",
            bad in prop_oneof!["[ !#$%&'()*+,/:;<=>?\\[\\]^`{|}~\t]", "[^A-Za-z0-9.@_-]"],
            suffix in "[A-Za-z0-9.@_-]{0,30}",
            long in "[a-z]{65,80}",
        ) {
            let with_bad = format!("{prefix}{bad}{suffix}");
            prop_assert!(PrincipalName::parse(&with_bad).is_err(), "{}", with_bad);
            prop_assert!(PrincipalName::parse(&long).is_err());
            prop_assert!(PrincipalName::parse("").is_err());
        }

        #[test]
        fn every_permission_and_role_parses_from_its_name_and_nothing_near_it(
            permission in proptest::sample::select(Permission::ALL.to_vec()),
            role in proptest::sample::select(vec![OrgRole::OrgAdmin, OrgRole::ItAdmin, OrgRole::Member]),
            cut in 0usize..20,
            extra in "[ a-zA-Z:_]",
        ) {
            prop_assert_eq!(permission.as_str().parse::<Permission>(), Ok(permission));
            prop_assert_eq!(role.as_str().parse::<OrgRole>(), Ok(role));
            for name in [permission.as_str(), role.as_str()] {
                let shorter = &name[..cut % name.len()];
                let longer = format!("{name}{extra}");
                let upper = name.to_uppercase();
                for other in [shorter, longer.as_str(), upper.as_str()] {
                    prop_assert!(other.parse::<Permission>().is_err(), "{}", other);
                    prop_assert!(other.parse::<OrgRole>().is_err(), "{}", other);
                }
            }
        }

        #[test]
        fn parsers_never_panic_and_round_trip(input in ".{0,80}") {
            if let Ok(name) = PrincipalName::parse(&input) {
                prop_assert_eq!(name.as_str(), input.as_str());
            }
            if let Ok(permission) = input.parse::<Permission>() {
                prop_assert_eq!(permission.as_str(), input.as_str());
            }
            if let Ok(role) = input.parse::<OrgRole>() {
                prop_assert_eq!(role.as_str(), input.as_str());
            }
        }
    }
}
