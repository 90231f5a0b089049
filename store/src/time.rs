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
