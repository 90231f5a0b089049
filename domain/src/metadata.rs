//! Who did what, from where and why: the metadata stored beside every event.
//!
//! cqrs-es stores metadata as a string map; these are its keys. They never change once
//! shipped, since auditors read them from old events.

use std::borrow::Cow;
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
        Self::from_lookup(|key| map.get(key).map(String::as_str))
    }

    /// Reads metadata back from its stored JSON text (an object of strings), as `from_map`
    /// does: usually without building the map, the keys it does not know skipped unread.
    /// Text the fast path refuses (a key given twice, say) is read through the map, so the
    /// result is `from_map`'s whenever the text is an object of strings.
    pub fn from_json(text: &str) -> Result<Self, serde_json::Error> {
        // A struct also reads from a JSON array; stored metadata is always an object.
        let fast = text
            .trim_start()
            .starts_with('{')
            .then(|| serde_json::from_str::<StoredFields<'_>>(text).ok())
            .flatten();
        let Some(fields) = fast else {
            let map: HashMap<String, String> = serde_json::from_str(text)?;
            return Ok(Self::from_map(&map));
        };
        Ok(Self::from_lookup(|key| {
            let field = match key {
                ACTOR_KIND => &fields.actor_kind,
                ACTOR_ID => &fields.actor_id,
                REQUEST_ID => &fields.request_id,
                REASON => &fields.reason,
                SOURCE_ADDRESS => &fields.source_address,
                RECORDED_AT => &fields.recorded_at,
                ORG_ID => &fields.org_id,
                SCOPE_PATH => &fields.scope_path,
                _ => return None,
            };
            field.as_deref()
        }))
    }

    fn from_lookup<'a>(get: impl Fn(&str) -> Option<&'a str>) -> Self {
        let owned = |key: &str| get(key).map(ToOwned::to_owned);
        Self {
            actor: Actor {
                kind: get(ACTOR_KIND)
                    .and_then(ActorKind::parse)
                    .unwrap_or(ActorKind::System),
                id: owned(ACTOR_ID).unwrap_or_default(),
            },
            request_id: owned(REQUEST_ID).unwrap_or_default(),
            reason: get(REASON).and_then(|r| Reason::parse(r).ok()),
            source_address: owned(SOURCE_ADDRESS),
            recorded_at: owned(RECORDED_AT).unwrap_or_default(),
            location: match (owned(ORG_ID), owned(SCOPE_PATH)) {
                (Some(org_id), Some(scope_path)) => Some(Location { org_id, scope_path }),
                _ => None,
            },
        }
    }
}

/// The stored metadata's known keys, borrowed from the text where it has no escapes.
#[derive(Deserialize)]
struct StoredFields<'a> {
    #[serde(borrow, default)]
    actor_kind: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    actor_id: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    request_id: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    reason: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    source_address: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    recorded_at: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    org_id: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    scope_path: Option<Cow<'a, str>>,
}

#[cfg(test)]
mod tests {
    use proptest::strategy::Strategy;

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
        let text = serde_json::to_string(&metadata.to_map()).unwrap();
        assert_eq!(EventMetadata::from_json(&text).unwrap(), metadata);
    }

    #[test]
    fn stored_metadata_that_is_not_an_object_of_strings_is_refused() {
        for text in ["", "[]", "{\"actor_id\": 7}", "{\"actor_id\": \"a\""] {
            assert!(EventMetadata::from_json(text).is_err(), "{text}");
        }
    }

    proptest::proptest! {
        /// Reading the stored text directly agrees with reading it through the map, whatever
        /// the keys (known, unknown, missing) and values (escapes, non-ASCII, invalid kinds
        /// or reasons).
        #[test]
        fn reading_the_text_agrees_with_reading_the_map(
            entries in proptest::collection::vec(
                (
                    proptest::prop_oneof![
                        proptest::sample::select(vec![
                            ACTOR_KIND, ACTOR_ID, REQUEST_ID, REASON, SOURCE_ADDRESS,
                            RECORDED_AT, ORG_ID, SCOPE_PATH,
                        ]).prop_map(str::to_owned),
                        "[a-z_]{1,12}",
                    ],
                    proptest::prop_oneof![
                        proptest::sample::select(vec!["user", "operator", "service", "system"])
                            .prop_map(str::to_owned),
                        "\\PC{0,20}",
                    ],
                ),
                0..10,
            )
        ) {
            // Written pair by pair, so a key may come twice; a map keeps the last value.
            let members: Vec<String> = entries
                .iter()
                .map(|(k, v)| format!("{}:{}", serde_json::json!(k), serde_json::json!(v)))
                .collect();
            let text = format!("{{{}}}", members.join(","));
            let map: HashMap<String, String> = serde_json::from_str(&text).unwrap();
            proptest::prop_assert_eq!(
                EventMetadata::from_json(&text).unwrap(),
                EventMetadata::from_map(&map)
            );
        }
    }
}
