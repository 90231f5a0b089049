//! Times as stored in read models: microseconds since the Unix epoch, UTC, on both backends,
//! so that comparisons and ordering are exact and identical everywhere.

use chrono::{DateTime, SecondsFormat, Utc};

pub fn to_micros(at: DateTime<Utc>) -> i64 {
    at.timestamp_micros()
}

pub fn from_micros(micros: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_micros(micros).unwrap_or_default()
}

/// RFC 3339 in UTC with microseconds, the one format EKM prints times in.
pub fn rfc3339(at: DateTime<Utc>) -> String {
    at.to_rfc3339_opts(SecondsFormat::Micros, true)
}

pub fn now_micros() -> i64 {
    to_micros(Utc::now())
}

/// SQLite's events table records times as text, to the millisecond (its trigger's
/// `strftime('%Y-%m-%dT%H:%M:%fZ')`): an instant in that form, for comparing with it.
pub fn to_sqlite_event_time(at: DateTime<Utc>) -> String {
    at.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string()
}

/// A time as SQLite's events table records it (the epoch if it cannot be read).
pub fn from_sqlite_event_time(text: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(text)
        .map(|t| t.with_timezone(&Utc))
        .unwrap_or_default()
}
