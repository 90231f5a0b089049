//! Typed identifiers: scope and organization ids (UUIDv7) and key versions.

use std::fmt;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// The id of any scope, organizations included. Time-ordered (UUIDv7) when EKM creates it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ScopeId(Uuid);

/// The id of an organization. An organization is also the root scope of its tree, so
/// every `OrgId` is a `ScopeId` too.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct OrgId(Uuid);

/// A version of a scope's key-encryption key. Versions start at 1 and only grow.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct KeyVersion(u32);

/// A string that is not a UUID was given where an id was expected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "`{input}` is not a valid id (expected a UUID such as 0190c7a2-8a1e-7c3b-9d4e-2f1a3b5c6d7e)"
)]
pub struct IdError {
    input: String,
}

fn parse_uuid(input: &str) -> Result<Uuid, IdError> {
    // Only the canonical hyphenated form: ids are compared as strings in storage, so one
    // spelling per id keeps lookups exact.
    if input.len() != 36 {
        return Err(IdError {
            input: truncate(input),
        });
    }
    Uuid::try_parse(input).map_err(|_| IdError {
        input: truncate(input),
    })
}

fn truncate(input: &str) -> String {
    input.chars().take(64).collect()
}

impl ScopeId {
    /// A fresh, time-ordered id.
    pub fn generate() -> Self {
        Self(Uuid::now_v7())
    }

    pub fn parse(input: &str) -> Result<Self, IdError> {
        parse_uuid(input).map(Self)
    }

    pub fn from_uuid(uuid: Uuid) -> Self {
        Self(uuid)
    }

    pub fn as_uuid(&self) -> Uuid {
        self.0
    }
}

impl OrgId {
    pub fn generate() -> Self {
        Self(Uuid::now_v7())
    }

    pub fn parse(input: &str) -> Result<Self, IdError> {
        parse_uuid(input).map(Self)
    }

    pub fn scope_id(self) -> ScopeId {
        ScopeId(self.0)
    }

    /// The organization whose root scope is `scope` (callers know it is a root).
    pub fn of_root(scope: ScopeId) -> Self {
        Self(scope.0)
    }
}

impl From<OrgId> for ScopeId {
    fn from(org: OrgId) -> Self {
        org.scope_id()
    }
}

impl KeyVersion {
    pub const FIRST: KeyVersion = KeyVersion(1);

    pub fn new(version: u32) -> Self {
        Self(version)
    }

    pub fn get(self) -> u32 {
        self.0
    }

    /// The version a rotation creates. Saturates: four billion rotations of one scope are
    /// not a case worth a failure path.
    pub fn next(self) -> Self {
        Self(self.0.saturating_add(1))
    }
}

impl fmt::Display for ScopeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.as_hyphenated().fmt(f)
    }
}

impl fmt::Display for OrgId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.as_hyphenated().fmt(f)
    }
}

impl fmt::Display for KeyVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parse_accepts_canonical_form_and_round_trips() {
        let id = ScopeId::generate();
        assert_eq!(ScopeId::parse(&id.to_string()), Ok(id));
    }

    #[test]
    fn parse_refuses_other_spellings() {
        let id = ScopeId::generate().as_uuid();
        assert!(ScopeId::parse(&id.simple().to_string()).is_err());
        assert!(ScopeId::parse(&id.urn().to_string()).is_err());
        assert!(ScopeId::parse("").is_err());
    }

    /// A UUID's canonical text, with one character changed for `replacement` at `index`
    /// (hyphen positions included).
    fn spoiled(uuid: Uuid, index: usize, replacement: char) -> String {
        let mut chars: Vec<char> = uuid.hyphenated().to_string().chars().collect();
        let index = index % chars.len();
        chars[index] = if replacement == chars[index] {
            'g'
        } else {
            replacement
        };
        chars.into_iter().collect()
    }

    proptest! {
        #[test]
        fn parse_never_panics_and_only_accepts_what_it_prints(input in ".{0,80}") {
            if let Ok(id) = ScopeId::parse(&input) {
                prop_assert_eq!(id.to_string(), input.to_lowercase());
            }
        }

        #[test]
        fn parse_accepts_every_uuid_in_canonical_form_and_prints_it_back(bits in any::<u128>()) {
            let uuid = Uuid::from_u128(bits);
            let text = uuid.hyphenated().to_string();
            let id = ScopeId::parse(&text).unwrap();
            prop_assert_eq!(id.as_uuid(), uuid);
            prop_assert_eq!(id.to_string(), text.clone());
            let org = OrgId::parse(&text).unwrap();
            prop_assert_eq!(org.to_string(), text.clone());
            prop_assert_eq!(org.scope_id(), id);
            // Upper case is the same id, printed in lower case.
            prop_assert_eq!(ScopeId::parse(&text.to_uppercase()).unwrap(), id);
        }

        #[test]
        fn parse_refuses_every_other_spelling_of_a_uuid(
            bits in any::<u128>(),
            index in any::<usize>(),
            replacement in prop_oneof![Just('-'), Just('x'), Just(' '), Just('{'), Just('é'), Just('0')],
        ) {
            let uuid = Uuid::from_u128(bits);
            for other in [
                uuid.simple().to_string(),
                uuid.urn().to_string(),
                uuid.braced().to_string(),
                format!(" {}", uuid.hyphenated()),
                format!("{}0", uuid.hyphenated()),
            ] {
                prop_assert!(ScopeId::parse(&other).is_err(), "{}", other);
                prop_assert!(OrgId::parse(&other).is_err(), "{}", other);
            }
            let spoiled = spoiled(uuid, index, replacement);
            // A digit for a digit is another valid id; everything else is refused.
            let still_hex = spoiled.chars().zip(uuid.hyphenated().to_string().chars())
                .all(|(a, b)| a == b || (a.is_ascii_hexdigit() && b.is_ascii_hexdigit()));
            if !still_hex {
                prop_assert!(ScopeId::parse(&spoiled).is_err(), "{}", spoiled);
            }
        }
    }
}
