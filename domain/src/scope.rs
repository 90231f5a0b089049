//! The vocabulary of scopes: kinds and their allowed parents, own states, plans, tiers,
//! and the validated names and reasons that commands carry.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use unicode_properties::{GeneralCategory, UnicodeGeneralCategory};

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
    /// A revoke was requested with a waiting period (issue 17 §1): refused like paused
    /// until it falls due, then revoked by the scheduler, unless cancelled first.
    PendingRevocation,
    Revoked,
}

impl OwnState {
    pub fn as_str(self) -> &'static str {
        match self {
            OwnState::Active => "active",
            OwnState::Paused => "paused",
            OwnState::PendingRevocation => "pending_revocation",
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
    pub const ALL: [DataClass; 7] = [
        DataClass::Credentials,
        DataClass::McpSecrets,
        DataClass::Playbooks,
        DataClass::Skills,
        DataClass::Files,
        DataClass::Messages,
        DataClass::Threads,
    ];

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
    OwnState::PendingRevocation,
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

/// Whether `c` is a character a person cannot see or that changes how the text around it
/// is shown: controls (Cc), format characters (Cf: bidi overrides and isolates, zero-width
/// space and joiners, the BOM, soft hyphen, tags), line and paragraph separators, spaces
/// other than U+0020, private use and unassigned code points, and the blank letters
/// (Hangul fillers, the blank Braille pattern) used to fake an empty or duplicate name.
/// Such characters let `invoice\u{202E}fdp.exe` show as `invoiceexe.pdf`, or two scopes
/// look alike in the console and the audit log (CVE-2021-42574, "Trojan Source").
fn invisible(c: char) -> bool {
    match c.general_category() {
        GeneralCategory::Control
        | GeneralCategory::Format
        | GeneralCategory::LineSeparator
        | GeneralCategory::ParagraphSeparator
        | GeneralCategory::Surrogate
        | GeneralCategory::PrivateUse
        | GeneralCategory::Unassigned => true,
        GeneralCategory::SpaceSeparator => c != ' ',
        _ => matches!(
            c,
            '\u{115F}' | '\u{1160}' | '\u{3164}' | '\u{FFA0}' | '\u{2800}'
        ),
    }
}

/// A scope's display name: 1 to 200 characters after trimming, nothing invisible (see
/// `invisible`): what is shown is what is stored.
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
        if let Some(c) = trimmed.chars().find(|c| invisible(*c)) {
            return Err(ValueError::new(
                "name",
                format!(
                    "must not contain control, formatting or invisible characters (found U+{:04X}); \
                     spaces must be plain U+0020",
                    u32::from(c)
                ),
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
        // Line breaks, tabs and any kind of space are fine in prose; bidi controls and
        // zero-width characters would let a reason read differently in the audit log.
        if let Some(c) = trimmed.chars().find(|c| {
            !matches!(c, '\n' | '\t')
                && c.general_category() != GeneralCategory::SpaceSeparator
                && invisible(*c)
        }) {
            return Err(ValueError::new(
                "reason",
                format!(
                    "must not contain control, formatting or invisible characters (found U+{:04X})",
                    u32::from(c)
                ),
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

    /// The invisible characters the name rule names, written independently of `invisible`:
    /// general category Cc, Cf, Zl, Zp, Co and Cn, spaces other than U+0020, and the blank
    /// letters used to fake empty names.
    fn listed_invisible(c: char) -> bool {
        use unicode_properties::{GeneralCategory as G, UnicodeGeneralCategory};
        matches!(
            c.general_category(),
            G::Control
                | G::Format
                | G::LineSeparator
                | G::ParagraphSeparator
                | G::PrivateUse
                | G::Unassigned
        ) || (c.general_category() == G::SpaceSeparator && c != ' ')
            || matches!(
                c,
                '\u{115F}' | '\u{1160}' | '\u{3164}' | '\u{FFA0}' | '\u{2800}'
            )
    }

    /// Every listed character outside the large private-use and unassigned ranges (every
    /// Cf, Cc, Z* code point), plus samples of those ranges and of the noncharacters.
    fn invisible_sample() -> &'static [char] {
        use unicode_properties::{GeneralCategory as G, UnicodeGeneralCategory};
        static CHARS: std::sync::OnceLock<Vec<char>> = std::sync::OnceLock::new();
        CHARS.get_or_init(|| {
            let mut chars: Vec<char> = (0..=0x10FFFFu32)
                .filter_map(char::from_u32)
                .filter(|c| {
                    listed_invisible(*c)
                        && !matches!(c.general_category(), G::PrivateUse | G::Unassigned)
                })
                .collect();
            chars.extend([
                '\u{E000}',
                '\u{F8FF}',
                '\u{F0000}',
                '\u{10FFFD}',
                '\u{0378}',
            ]);
            chars.extend([
                '\u{FDD0}',
                '\u{FFFE}',
                '\u{FFFF}',
                '\u{1FFFF}',
                '\u{10FFFF}',
            ]);
            chars
        })
    }

    #[test]
    fn name_refuses_bidi_and_zero_width_characters() {
        for name in [
            "invoice\u{202E}exe.pdf\u{200B}",
            "a\u{200B}b",
            "a\u{200D}b",
            "\u{2066}x\u{2069}",
            "x\u{FEFF}",
            "x\u{00AD}y",
            "a\u{00A0}b",
            "a\u{2028}b",
            "\u{3164}",
            "tag\u{E0041}",
        ] {
            let refused = ScopeName::parse(name);
            assert!(refused.is_err(), "{name:?} was accepted");
            assert!(
                refused.is_err_and(|e| e.problem.contains("U+")),
                "the refusal names the code point"
            );
        }
        // Visible text of any script, symbols and emoji stays allowed.
        for name in [
            "Forschung & Entwicklung",
            "研究チーム",
            "équipe ☂ 🚀",
            "a b",
        ] {
            assert!(ScopeName::parse(name).is_ok(), "{name:?} was refused");
        }
    }

    #[test]
    fn reason_refuses_bidi_controls_but_keeps_line_breaks() {
        assert!(Reason::parse("ticket\u{202E}4711").is_err());
        assert!(Reason::parse("zero\u{200B}width").is_err());
        assert!(Reason::parse("line one\nline two\twith a tab").is_ok());
    }

    proptest! {
        #[test]
        fn names_with_any_invisible_character_are_refused(
            before in "[a-z ]{0,20}",
            index in any::<proptest::sample::Index>(),
            after in "[a-z ]{0,20}",
        ) {
            let chars = invisible_sample();
            let invisible = chars[index.index(chars.len())];
            let name = format!("x{before}{invisible}{after}x");
            prop_assert!(ScopeName::parse(&name).is_err(), "U+{:04X} accepted", u32::from(invisible));
        }

        #[test]
        fn accepted_names_hold_no_invisible_character(input in "\\PC{0,60}") {
            if let Ok(name) = ScopeName::parse(&input) {
                prop_assert!(!name.as_str().chars().any(listed_invisible));
            }
        }

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
