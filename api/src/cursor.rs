//! List cursors: opaque to clients, versioned, bound to the list and the query that issued
//! them, and naming only the last item of a page the caller was shown (ADR 0016).
//!
//! A cursor is base64url (no padding) of `c1.<list>.<binding>.<key>`: `binding` is the
//! first 16 hex digits of SHA-256 over the list's query (parent, organization, search
//! text, filters), `key` the id or position of the page's last item. There is no secret
//! and no MAC: every list only ever pages through rows the caller may see (the search
//! filters by what the caller may view in SQL), and the handlers check that a presented
//! cursor's key is such a row before using it. Anything else is 400 `invalid_request`.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use ekm_domain::ScopeId;
use sha2::{Digest, Sha256};

use crate::error::ApiError;

const VERSION: &str = "c1";

/// Which list issued a cursor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum List {
    Children,
    Search,
    Audit,
    Access,
    Tokens,
    Grants,
    Schedule,
}

impl List {
    fn tag(self) -> &'static str {
        match self {
            List::Children => "children",
            List::Search => "search",
            List::Audit => "audit",
            List::Access => "access",
            List::Tokens => "tokens",
            List::Grants => "grants",
            List::Schedule => "schedule",
        }
    }
}

/// What a cursor belongs to: its list and the query's parts, in a fixed order.
pub(crate) struct Binding<'a> {
    pub list: List,
    pub query: &'a [&'a str],
}

impl Binding<'_> {
    fn digest(&self) -> String {
        let mut hasher = Sha256::new();
        for part in self.query {
            // Length-prefixed, so that ("ab", "c") and ("a", "bc") differ.
            hasher.update((part.len() as u64).to_be_bytes());
            hasher.update(part.as_bytes());
        }
        hex::encode(&hasher.finalize()[..8])
    }

    fn encode(&self, key: &str) -> String {
        URL_SAFE_NO_PAD.encode(format!(
            "{VERSION}.{}.{}.{key}",
            self.list.tag(),
            self.digest()
        ))
    }

    /// The key of a cursor this binding issued; anything else is refused.
    fn decode(&self, cursor: &str) -> Result<String, ApiError> {
        let bytes = URL_SAFE_NO_PAD
            .decode(cursor.as_bytes())
            .map_err(|_| invalid())?;
        let text = String::from_utf8(bytes).map_err(|_| invalid())?;
        let mut parts = text.splitn(4, '.');
        let (Some(version), Some(list), Some(digest), Some(key)) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(invalid());
        };
        if version != VERSION || list != self.list.tag() || digest != self.digest() {
            return Err(invalid());
        }
        Ok(key.to_owned())
    }

    pub fn encode_scope(&self, last: ScopeId) -> String {
        self.encode(&last.to_string())
    }

    /// The scope id in a cursor; the caller still checks that it is a row it may list.
    pub fn decode_scope(&self, cursor: &str) -> Result<ScopeId, ApiError> {
        ScopeId::parse(&self.decode(cursor)?).map_err(|_| invalid())
    }

    /// A cursor whose key is JSON (a list ordered by several columns).
    pub fn encode_json(&self, last: &serde_json::Value) -> String {
        self.encode(&last.to_string())
    }

    /// The key of a JSON cursor. Cursors carry no MAC, so the key is checked as any input:
    /// no string in it may hold a control character (PostgreSQL refuses a NUL in text, for
    /// one) or be longer than a key of these lists can be.
    pub fn decode_json<T: serde::de::DeserializeOwned>(&self, cursor: &str) -> Result<T, ApiError> {
        let value: serde_json::Value =
            serde_json::from_str(&self.decode(cursor)?).map_err(|_| invalid())?;
        let plain = |v: &serde_json::Value| match v {
            serde_json::Value::String(text) => {
                text.len() <= 256 && !text.chars().any(char::is_control)
            }
            serde_json::Value::Number(_) => true,
            _ => false,
        };
        match &value {
            serde_json::Value::Array(parts) if parts.iter().all(plain) => {}
            _ => return Err(invalid()),
        }
        serde_json::from_value(value).map_err(|_| invalid())
    }

    pub fn encode_position(&self, last: i64) -> String {
        self.encode(&last.to_string())
    }

    pub fn decode_position(&self, cursor: &str) -> Result<i64, ApiError> {
        self.decode(cursor)?
            .parse::<i64>()
            .ok()
            .filter(|p| *p >= 0)
            .ok_or_else(invalid)
    }
}

/// The one refusal for every cursor that is not usable here; it says nothing about why.
pub(crate) fn invalid() -> ApiError {
    ApiError::invalid("cursor: not a cursor returned by this list for this query")
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn search<'a>(query: &'a [&'a str]) -> Binding<'a> {
        Binding {
            list: List::Search,
            query,
        }
    }

    #[test]
    fn a_cursor_round_trips_only_through_its_own_list_and_query() {
        let id = ScopeId::generate();
        let cursor = search(&["org", "q"]).encode_scope(id);
        assert_eq!(search(&["org", "q"]).decode_scope(&cursor).ok(), Some(id));
        assert!(search(&["org", "other"]).decode_scope(&cursor).is_err());
        assert!(search(&["or", "gq"]).decode_scope(&cursor).is_err());
        let children = Binding {
            list: List::Children,
            query: &["org", "q"],
        };
        assert!(children.decode_scope(&cursor).is_err());
        let audit = Binding {
            list: List::Audit,
            query: &[],
        };
        let position = audit.encode_position(42);
        assert_eq!(audit.decode_position(&position).ok(), Some(42));
        assert!(audit.decode_scope(&position).is_err());
    }

    #[test]
    fn the_old_formats_are_refused() {
        let id = ScopeId::generate();
        for old in [format!("after:{id}"), "pos:7".to_owned()] {
            let old = URL_SAFE_NO_PAD.encode(old);
            assert!(search(&[]).decode_scope(&old).is_err());
        }
    }

    proptest! {
        #[test]
        fn decoding_never_panics_and_accepts_only_what_was_encoded(input in "\\PC{0,120}") {
            let binding = search(&["x"]);
            if let Ok(id) = binding.decode_scope(&input) {
                prop_assert_eq!(binding.encode_scope(id), input);
            }
        }
    }
}
