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

/// The kind of a scope, which fixes where it may sit in the tree. The platform may register
/// further kinds, and further parents for the built-in ones, with `--scope-kinds FILE`
/// (`KindRegistry`, ADR 0034).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ScopeKind {
    Organization,
    Team,
    Thread,
    McpConnector,
    Agent,
    /// A kind registered by the platform (its name; interned, so the kind stays `Copy`).
    Custom(&'static str),
}

/// The deepest a scope may sit: the organization is depth 1. Teams nest, so the depth is
/// bounded here rather than by the kinds (paths stay short in every row and event).
pub const MAX_DEPTH: usize = 16;

impl ScopeKind {
    pub const ALL: [ScopeKind; 5] = [
        ScopeKind::Organization,
        ScopeKind::Team,
        ScopeKind::Thread,
        ScopeKind::McpConnector,
        ScopeKind::Agent,
    ];

    /// Whether a scope of this kind may be created under a parent of `parent` kind: the
    /// built-in table (teams nest), plus what the registry adds. An organization is always
    /// a root.
    pub fn allows_parent(self, parent: ScopeKind) -> bool {
        let built_in = match self {
            ScopeKind::Organization | ScopeKind::Custom(_) => false,
            ScopeKind::Team | ScopeKind::Thread | ScopeKind::McpConnector | ScopeKind::Agent => {
                matches!(parent, ScopeKind::Organization | ScopeKind::Team)
            }
        };
        built_in || KindRegistry::installed().is_some_and(|r| r.allows(self, parent))
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ScopeKind::Organization => "organization",
            ScopeKind::Team => "team",
            ScopeKind::Thread => "thread",
            ScopeKind::McpConnector => "mcp_connector",
            ScopeKind::Agent => "agent",
            ScopeKind::Custom(name) => name,
        }
    }

    /// A kind a client may name: a built-in one, or one registered on this server. Unlike
    /// `from_str` (which reads any well-formed name back from the log and the read models,
    /// registered or not any more), it never interns a name a client made up.
    pub fn known(input: &str) -> Result<ScopeKind, ValueError> {
        if let Some(kind) = Self::ALL.into_iter().find(|k| k.as_str() == input) {
            return Ok(kind);
        }
        if let Some(kind) = KindRegistry::installed().and_then(|r| r.kind(input)) {
            return Ok(kind);
        }
        let mut allowed: Vec<&str> = Self::ALL.iter().map(|k| k.as_str()).collect();
        if let Some(registry) = KindRegistry::installed() {
            allowed.extend(registry.kinds.iter().map(|(k, _)| k.as_str()));
        }
        allowed.sort_unstable();
        allowed.dedup();
        Err(ValueError::new(
            "kind",
            format!(
                "`{}` is not one of {}",
                input.chars().take(64).collect::<String>(),
                allowed.join(", ")
            ),
        ))
    }
}

/// Whether `name` may name a registered kind: 1 to 32 of `a-z`, `0-9`, `_`, from a letter.
fn kind_name_is_valid(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_lowercase())
        && name.len() <= 32
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

/// Registered kind names, each leaked once (a handful per deployment, read from the file
/// at start-up and back from the log).
fn intern(name: &str) -> &'static str {
    static NAMES: std::sync::Mutex<Vec<&'static str>> = std::sync::Mutex::new(Vec::new());
    let mut names = NAMES
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some(known) = names.iter().find(|n| **n == name) {
        return known;
    }
    let leaked: &'static str = Box::leak(name.to_owned().into_boxed_str());
    names.push(leaked);
    leaked
}

impl FromStr for ScopeKind {
    type Err = ValueError;
    /// Any well-formed kind name: built-in, or registered (now or once; what was recorded
    /// stays readable when a kind leaves the registry). Clients' input goes through `known`.
    fn from_str(input: &str) -> Result<Self, ValueError> {
        if let Some(kind) = Self::ALL.into_iter().find(|k| k.as_str() == input) {
            return Ok(kind);
        }
        if kind_name_is_valid(input) {
            return Ok(ScopeKind::Custom(intern(input)));
        }
        Err(ValueError::new(
            "kind",
            format!(
                "`{}` is not a kind name",
                input.chars().take(64).collect::<String>()
            ),
        ))
    }
}

impl fmt::Display for ScopeKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for ScopeKind {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for ScopeKind {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let name = String::deserialize(deserializer)?;
        name.parse().map_err(serde::de::Error::custom)
    }
}

/// The kinds the platform registers, and the parents each may have, from `--scope-kinds
/// FILE`: `{"kinds": [{"name": "project", "parents": ["organization", "team"]},
/// {"name": "thread", "parents": ["project"]}]}`. A new name is a new kind; a built-in name
/// (not `organization`, always the root) gains the parents listed. Validated whole at
/// start-up; installed once per process.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KindRegistry {
    kinds: Vec<(ScopeKind, Vec<ScopeKind>)>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KindFile {
    kinds: Vec<KindEntry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KindEntry {
    name: String,
    parents: Vec<String>,
}

static REGISTRY: std::sync::OnceLock<KindRegistry> = std::sync::OnceLock::new();

impl KindRegistry {
    /// Reads and validates a registry file's text. Every problem is named.
    pub fn parse(text: &str) -> Result<KindRegistry, ValueError> {
        let bad = |problem: String| ValueError::new("scope_kinds", problem);
        let file: KindFile = serde_json::from_str(text).map_err(|e| bad(e.to_string()))?;
        let mut names: Vec<&str> = vec![];
        for entry in &file.kinds {
            if entry.name == "organization" {
                return Err(bad(
                    "`organization` is always the root: it cannot be given parents".into(),
                ));
            }
            if !kind_name_is_valid(&entry.name) {
                return Err(bad(format!(
                    "`{}`: a kind name is 1 to 32 of a-z, 0-9 and _, starting with a letter",
                    entry.name.chars().take(64).collect::<String>()
                )));
            }
            if names.contains(&entry.name.as_str()) {
                return Err(bad(format!("`{}` is listed twice", entry.name)));
            }
            if entry.parents.is_empty() {
                return Err(bad(format!("`{}` lists no parent", entry.name)));
            }
            names.push(&entry.name);
        }
        let mut kinds = vec![];
        for entry in &file.kinds {
            let kind: ScopeKind = entry.name.parse()?;
            let mut parents = vec![];
            for parent in &entry.parents {
                let known = ScopeKind::ALL.iter().any(|k| k.as_str() == parent)
                    || names.contains(&parent.as_str());
                if !known {
                    return Err(bad(format!(
                        "`{}`: parent `{}` is neither a built-in kind nor listed in the file",
                        entry.name,
                        parent.chars().take(64).collect::<String>()
                    )));
                }
                parents.push(parent.parse()?);
            }
            kinds.push((kind, parents));
        }
        // Every registered kind must be reachable from an organization.
        let mut reachable: Vec<ScopeKind> = ScopeKind::ALL.to_vec();
        loop {
            let before = reachable.len();
            for (kind, parents) in &kinds {
                if !reachable.contains(kind) && parents.iter().any(|p| reachable.contains(p)) {
                    reachable.push(*kind);
                }
            }
            if reachable.len() == before {
                break;
            }
        }
        if let Some((kind, _)) = kinds.iter().find(|(k, _)| !reachable.contains(k)) {
            return Err(bad(format!(
                "`{kind}` can never be created: none of its parents can be reached from an organization"
            )));
        }
        Ok(KindRegistry { kinds })
    }

    /// Makes this registry the process's. Installing the same again is a no-op; another is
    /// refused (one server, one set of kinds).
    pub fn install(self) -> Result<(), ValueError> {
        let installed = REGISTRY.get_or_init(|| self.clone());
        match *installed == self {
            true => Ok(()),
            false => Err(ValueError::new(
                "scope_kinds",
                "another set of kinds is already installed in this process",
            )),
        }
    }

    pub fn installed() -> Option<&'static KindRegistry> {
        REGISTRY.get()
    }

    fn allows(&self, kind: ScopeKind, parent: ScopeKind) -> bool {
        self.kinds
            .iter()
            .any(|(k, parents)| *k == kind && parents.contains(&parent))
    }

    fn kind(&self, name: &str) -> Option<ScopeKind> {
        self.kinds
            .iter()
            .map(|(k, _)| *k)
            .find(|k| k.as_str() == name)
    }

    /// The kinds it registers or extends, with their parents (logged at start-up).
    pub fn entries(&self) -> &[(ScopeKind, Vec<ScopeKind>)] {
        &self.kinds
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
                (Team, Team),
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
            assert_eq!(ScopeKind::known(kind.as_str()), Ok(kind));
        }
        assert!("Team".parse::<ScopeKind>().is_err());
        assert!("mcp-connector".parse::<ScopeKind>().is_err());
        // A well-formed name reads back (from the log), but a client may not name it
        // unless it is registered.
        assert_eq!(
            "ticket".parse::<ScopeKind>().map(ScopeKind::as_str),
            Ok("ticket")
        );
        assert!(ScopeKind::known("ticket").is_err());
        assert_eq!(
            serde_json::to_string(&ScopeKind::McpConnector).unwrap(),
            "\"mcp_connector\""
        );
        assert_eq!(
            serde_json::from_str::<ScopeKind>("\"ticket\"")
                .map(|k| k.as_str())
                .ok(),
            Some("ticket")
        );
    }

    #[test]
    fn registry_adds_kinds_and_parents_and_names_every_problem() {
        let registry = KindRegistry::parse(
            r#"{"kinds": [
                {"name": "project", "parents": ["organization", "team", "project"]},
                {"name": "thread", "parents": ["project"]},
                {"name": "ticket", "parents": ["thread"]}
            ]}"#,
        )
        .unwrap();
        let kind = |n: &str| n.parse::<ScopeKind>().unwrap();
        assert!(registry.allows(kind("project"), ScopeKind::Organization));
        assert!(registry.allows(kind("project"), kind("project")));
        assert!(registry.allows(ScopeKind::Thread, kind("project")));
        assert!(registry.allows(kind("ticket"), ScopeKind::Thread));
        assert!(!registry.allows(kind("ticket"), ScopeKind::Organization));
        assert_eq!(registry.kind("ticket"), Some(kind("ticket")));
        for (text, problem) in [
            ("not json", "expected"),
            (
                r#"{"kinds": [{"name": "organization", "parents": ["team"]}]}"#,
                "root",
            ),
            (
                r#"{"kinds": [{"name": "Project", "parents": ["team"]}]}"#,
                "a-z",
            ),
            (r#"{"kinds": [{"name": "p", "parents": []}]}"#, "no parent"),
            (
                r#"{"kinds": [{"name": "p", "parents": ["team"]}, {"name": "p", "parents": ["team"]}]}"#,
                "twice",
            ),
            (
                r#"{"kinds": [{"name": "p", "parents": ["galaxy"]}]}"#,
                "neither",
            ),
            (
                r#"{"kinds": [{"name": "p", "parents": ["q"]}, {"name": "q", "parents": ["p"]}]}"#,
                "never be created",
            ),
            (
                r#"{"kinds": [{"name": "p", "parents": ["team"], "icon": "x"}]}"#,
                "unknown field",
            ),
        ] {
            let error = KindRegistry::parse(text).unwrap_err().to_string();
            assert!(error.contains(problem), "{text}: {error}");
        }
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
