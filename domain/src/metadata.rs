//! Who did what, from where and why: the metadata stored beside every event.
//!
//! cqrs-es stores metadata as a string map; these are its keys. They never change once
//! shipped, since auditors read them from old events.

use std::collections::HashMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::scope::Reason;

pub const ACTOR_KIND: &str = "actor_kind";
pub const ACTOR_ID: &str = "actor_id";
pub const REQUEST_ID: &str = "request_id";
pub const REASON: &str = "reason";
pub const SOURCE_ADDRESS: &str = "source_address";
pub const RECORDED_AT: &str = "recorded_at";
pub const ORG_ID: &str = "org_id";
pub const SCOPE_PATH: &str = "scope_path";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ActorKind {
    /// The platform operator (creates organizations).
    Operator,
    /// A person of an organization.
    User,
    /// One of the platform's services.
    Service,
    /// EKM itself (for example the key health monitor).
    System,
}

impl ActorKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ActorKind::Operator => "operator",
            ActorKind::User => "user",
            ActorKind::Service => "service",
            ActorKind::System => "system",
        }
    }

    fn parse(input: &str) -> Option<Self> {
        [
            ActorKind::Operator,
            ActorKind::User,
            ActorKind::Service,
            ActorKind::System,
        ]
        .into_iter()
        .find(|k| k.as_str() == input)
    }
}

/// The principal behind a command.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Actor {
    pub kind: ActorKind,
    /// A stable principal id (never a token).
    pub id: String,
}

impl fmt::Display for Actor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.kind.as_str(), self.id)
    }
}

/// Everything recorded beside an event besides its payload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EventMetadata {
    pub actor: Actor,
    pub request_id: String,
    pub reason: Option<Reason>,
    pub source_address: Option<String>,
    /// RFC 3339, UTC, as the application saw it when it accepted the command.
    pub recorded_at: String,
    /// Where the event happened: its organization and the scope's path (ids root → scope,
    /// joined by '/'). Set by the application when it commits, so that audit entries and the
    /// per-organization hash chain follow from each event alone.
    pub location: Option<Location>,
}

/// The organization and path of the scope an event belongs to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Location {
    pub org_id: String,
    pub scope_path: String,
}

impl EventMetadata {
    pub fn to_map(&self) -> HashMap<String, String> {
        let mut map = HashMap::from([
            (ACTOR_KIND.to_owned(), self.actor.kind.as_str().to_owned()),
            (ACTOR_ID.to_owned(), self.actor.id.clone()),
            (REQUEST_ID.to_owned(), self.request_id.clone()),
            (RECORDED_AT.to_owned(), self.recorded_at.clone()),
        ]);
        if let Some(reason) = &self.reason {
            map.insert(REASON.to_owned(), reason.as_str().to_owned());
        }
        if let Some(addr) = &self.source_address {
            map.insert(SOURCE_ADDRESS.to_owned(), addr.clone());
        }
        if let Some(location) = &self.location {
            map.insert(ORG_ID.to_owned(), location.org_id.clone());
            map.insert(SCOPE_PATH.to_owned(), location.scope_path.clone());
        }
        map
    }

    /// Reads metadata back. Missing or unknown fields degrade to empty values rather than
    /// failing: an old event must stay readable whatever its metadata.
    pub fn from_map(map: &HashMap<String, String>) -> Self {
        let get = |key: &str| map.get(key).cloned();
        Self {
            actor: Actor {
                kind: get(ACTOR_KIND)
                    .and_then(|k| ActorKind::parse(&k))
                    .unwrap_or(ActorKind::System),
                id: get(ACTOR_ID).unwrap_or_default(),
            },
            request_id: get(REQUEST_ID).unwrap_or_default(),
            reason: get(REASON).and_then(|r| Reason::parse(&r).ok()),
            source_address: get(SOURCE_ADDRESS),
            recorded_at: get(RECORDED_AT).unwrap_or_default(),
            location: match (get(ORG_ID), get(SCOPE_PATH)) {
                (Some(org_id), Some(scope_path)) => Some(Location { org_id, scope_path }),
                _ => None,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_round_trips_through_the_string_map() {
        let metadata = EventMetadata {
            actor: Actor {
                kind: ActorKind::User,
                id: "tok_1".into(),
            },
            request_id: "req-1".into(),
            reason: Reason::parse("investigation 4711").ok(),
            source_address: Some("127.0.0.1".into()),
            recorded_at: "2026-11-28T15:00:00.000000Z".into(),
            location: Some(Location {
                org_id: "o".into(),
                scope_path: "o/t".into(),
            }),
        };
        assert_eq!(EventMetadata::from_map(&metadata.to_map()), metadata);
    }
}
