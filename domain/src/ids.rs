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

    proptest! {
        #[test]
        fn parse_never_panics_and_only_accepts_what_it_prints(input in ".{0,80}") {
            if let Ok(id) = ScopeId::parse(&input) {
                prop_assert_eq!(id.to_string(), input.to_lowercase());
            }
        }
    }
}
