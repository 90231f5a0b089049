//! The vocabulary of scopes: kinds and their allowed parents, own states, plans, tiers,
//! and the validated names and reasons that commands carry.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// A value given by a client that does not satisfy its rule. The message is safe to show.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {problem}")]
pub struct ValueError {
    pub field: &'static str,
    pub problem: String,
}

impl ValueError {
    pub(crate) fn new(field: &'static str, problem: impl Into<String>) -> Self {
        Self {
            field,
            problem: problem.into(),
        }
    }
}

/// The kind of a scope, which fixes where it may sit in the tree.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ScopeKind {
    Organization,
    Team,
    Thread,
    McpConnector,
    Agent,
}

impl ScopeKind {
    pub const ALL: [ScopeKind; 5] = [
        ScopeKind::Organization,
        ScopeKind::Team,
        ScopeKind::Thread,
        ScopeKind::McpConnector,
        ScopeKind::Agent,
    ];

    /// Whether a scope of this kind may be created under a parent of `parent` kind.
    /// An organization is always a root.
    pub fn allows_parent(self, parent: ScopeKind) -> bool {
        match self {
            ScopeKind::Organization => false,
            ScopeKind::Team => parent == ScopeKind::Organization,
            ScopeKind::Thread | ScopeKind::McpConnector | ScopeKind::Agent => {
                matches!(parent, ScopeKind::Organization | ScopeKind::Team)
            }
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ScopeKind::Organization => "organization",
            ScopeKind::Team => "team",
            ScopeKind::Thread => "thread",
            ScopeKind::McpConnector => "mcp_connector",
            ScopeKind::Agent => "agent",
        }
    }
}

/// The state a scope was put in by commands on the scope itself (not its ancestors).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OwnState {
    Active,
    Paused,
    Revoked,
}

impl OwnState {
    pub fn as_str(self) -> &'static str {
        match self {
            OwnState::Active => "active",
            OwnState::Paused => "paused",
            OwnState::Revoked => "revoked",
        }
    }
}

/// An organization's commercial plan. Scope controls need `Enterprise`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Plan {
    Standard,
    Enterprise,
}

impl Plan {
    pub fn as_str(self) -> &'static str {
        match self {
            Plan::Standard => "standard",
            Plan::Enterprise => "enterprise",
        }
    }
}

/// An organization's encryption tier: what is encrypted and who holds the master key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Tier {
    Default,
    Managed,
    Byok,
}

impl Tier {
    pub fn as_str(self) -> &'static str {
        match self {
            Tier::Default => "default",
            Tier::Managed => "managed",
            Tier::Byok => "byok",
        }
    }
}

/// What kind of data a ciphertext protects. The tier decides which classes are covered.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DataClass {
    Credentials,
    McpSecrets,
    Playbooks,
    Skills,
    Files,
    Messages,
    Threads,
}

impl DataClass {
    pub fn as_str(self) -> &'static str {
        match self {
            DataClass::Credentials => "credentials",
            DataClass::McpSecrets => "mcp_secrets",
            DataClass::Playbooks => "playbooks",
            DataClass::Skills => "skills",
            DataClass::Files => "files",
            DataClass::Messages => "messages",
            DataClass::Threads => "threads",
        }
    }
}

impl Tier {
    /// Whether data of `class` is encrypted under this tier: the `default` tier covers
    /// agent credentials and MCP secrets; `managed` and `byok` cover every class.
    pub fn covers(self, class: DataClass) -> bool {
        match self {
            Tier::Default => matches!(class, DataClass::Credentials | DataClass::McpSecrets),
            Tier::Managed | Tier::Byok => true,
        }
    }
}

macro_rules! str_enum {
    ($ty:ty, $field:literal, $($variant:expr),+) => {
        impl FromStr for $ty {
            type Err = ValueError;
            fn from_str(input: &str) -> Result<Self, ValueError> {
                [$($variant),+]
                    .into_iter()
                    .find(|v| v.as_str() == input)
                    .ok_or_else(|| {
                        let allowed: Vec<&str> = [$($variant.as_str()),+].to_vec();
                        ValueError::new($field, format!(
                            "`{}` is not one of {}",
                            input.chars().take(64).collect::<String>(),
                            allowed.join(", ")
                        ))
                    })
            }
        }
        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

str_enum!(
    ScopeKind,
    "kind",
    ScopeKind::Organization,
    ScopeKind::Team,
    ScopeKind::Thread,
    ScopeKind::McpConnector,
    ScopeKind::Agent
);
str_enum!(
    OwnState,
    "state",
    OwnState::Active,
    OwnState::Paused,
    OwnState::Revoked
);
str_enum!(Plan, "plan", Plan::Standard, Plan::Enterprise);
str_enum!(
    DataClass,
    "class",
    DataClass::Credentials,
    DataClass::McpSecrets,
    DataClass::Playbooks,
    DataClass::Skills,
    DataClass::Files,
    DataClass::Messages,
    DataClass::Threads
);
str_enum!(Tier, "tier", Tier::Default, Tier::Managed, Tier::Byok);

/// A scope's display name: 1 to 200 characters after trimming, no control characters.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ScopeName(String);

impl ScopeName {
    pub const MAX_CHARS: usize = 200;

    pub fn parse(input: &str) -> Result<Self, ValueError> {
        let trimmed = input.trim();
        if trimmed.is_empty() {
            return Err(ValueError::new("name", "must not be empty"));
        }
        if trimmed.chars().count() > Self::MAX_CHARS {
            return Err(ValueError::new(
                "name",
                format!("must be at most {} characters", Self::MAX_CHARS),
            ));
        }
        if trimmed.chars().any(char::is_control) {
            return Err(ValueError::new(
                "name",
                "must not contain control characters",
            ));
        }
        Ok(Self(trimmed.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Why an operator acted: required for pause and revoke, kept in the audit trail.
/// 1 to 1000 characters after trimming; line breaks allowed, other control characters not.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Reason(String);

impl Reason {
    pub const MAX_CHARS: usize = 1000;

    pub fn parse(input: &str) -> Result<Self, ValueError> {
        let trimmed = input.trim();
        if trimmed.is_empty() {
            return Err(ValueError::new("reason", "must not be empty"));
        }
        if trimmed.chars().count() > Self::MAX_CHARS {
            return Err(ValueError::new(
                "reason",
                format!("must be at most {} characters", Self::MAX_CHARS),
            ));
        }
        if trimmed
            .chars()
            .any(|c| c.is_control() && c != '\n' && c != '\t')
        {
            return Err(ValueError::new(
                "reason",
                "must not contain control characters",
            ));
        }
        Ok(Self(trimmed.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn allowed_parents_follow_the_product_table() {
        use ScopeKind::*;
        let allowed: Vec<(ScopeKind, ScopeKind)> = ScopeKind::ALL
            .iter()
            .flat_map(|k| ScopeKind::ALL.iter().map(move |p| (*k, *p)))
            .filter(|(k, p)| k.allows_parent(*p))
            .collect();
        assert_eq!(
            allowed,
            vec![
                (Team, Organization),
                (Thread, Organization),
                (Thread, Team),
                (McpConnector, Organization),
                (McpConnector, Team),
                (Agent, Organization),
                (Agent, Team),
            ]
        );
    }

    #[test]
    fn kinds_parse_from_their_wire_names_only() {
        for kind in ScopeKind::ALL {
            assert_eq!(kind.as_str().parse::<ScopeKind>(), Ok(kind));
        }
        assert!("Team".parse::<ScopeKind>().is_err());
        assert!("mcp-connector".parse::<ScopeKind>().is_err());
    }

    #[test]
    fn name_is_trimmed_and_bounded() {
        assert_eq!(
            ScopeName::parse("  research ").map(|n| n.0),
            Ok("research".into())
        );
        assert!(ScopeName::parse("   ").is_err());
        assert!(ScopeName::parse(&"x".repeat(201)).is_err());
        assert!(ScopeName::parse(&"é".repeat(200)).is_ok());
        assert!(ScopeName::parse("a\u{0}b").is_err());
    }

    #[test]
    fn reason_allows_line_breaks_but_not_other_controls() {
        assert!(Reason::parse("investigation 4711\nsee ticket").is_ok());
        assert!(Reason::parse("bell\u{7}").is_err());
        assert!(Reason::parse("").is_err());
    }

    proptest! {
        #[test]
        fn name_parse_never_panics_and_accepted_names_are_stable(input in "\\PC{0,250}") {
            if let Ok(name) = ScopeName::parse(&input) {
                prop_assert_eq!(ScopeName::parse(name.as_str()), Ok(name.clone()));
                prop_assert!(name.as_str().chars().count() <= ScopeName::MAX_CHARS);
            }
        }

        #[test]
        fn reason_parse_never_panics(input in ".{0,1100}") {
            let _ = Reason::parse(&input);
        }
    }
}
