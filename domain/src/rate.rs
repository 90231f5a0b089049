//! Rate limits (issue 18 §4): token buckets per principal and per organization, on the
//! data plane and on commands. An organization's own limits are an event
//! (`OrganizationRateLimitsSet`), set by the operator; a limit it does not set is the
//! server's default (`ekm serve`'s flags). The buckets themselves live in each instance
//! (ADR 0036): the domain only knows the numbers.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::scope::ValueError;

/// The most tokens a bucket may add per second, or hold.
pub const MAX_RATE: u32 = 10_000_000;

/// A token bucket: `per_second` tokens are added each second, up to `burst`; a request
/// takes one (a batch, one per item, at most `burst`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "BucketFields")]
pub struct RateBucket {
    per_second: u32,
    burst: u32,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BucketFields {
    per_second: u32,
    burst: u32,
}

impl TryFrom<BucketFields> for RateBucket {
    type Error = ValueError;
    fn try_from(fields: BucketFields) -> Result<Self, ValueError> {
        RateBucket::new("rate limit", fields.per_second, fields.burst)
    }
}

impl RateBucket {
    /// `per_second` and `burst` from 1 to `MAX_RATE`.
    pub fn new(field: &'static str, per_second: u32, burst: u32) -> Result<Self, ValueError> {
        let range = 1..=MAX_RATE;
        if !range.contains(&per_second) || !range.contains(&burst) {
            return Err(ValueError::new(
                field,
                "per_second and burst: whole numbers from 1 to 10000000",
            ));
        }
        Ok(RateBucket { per_second, burst })
    }

    /// `PER_SECOND:BURST` (the flags' form), e.g. `100:1000`.
    pub fn parse(field: &'static str, text: &str) -> Result<Self, ValueError> {
        let invalid = || ValueError::new(field, "expected PER_SECOND:BURST, as in 100:1000");
        let (rate, burst) = text.split_once(':').ok_or_else(invalid)?;
        let number = |t: &str| t.trim().parse::<u32>().map_err(|_| invalid());
        RateBucket::new(field, number(rate)?, number(burst)?)
    }

    pub fn per_second(self) -> u32 {
        self.per_second
    }

    pub fn burst(self) -> u32 {
        self.burst
    }
}

impl fmt::Display for RateBucket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.per_second, self.burst)
    }
}

/// What a limit applies to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RateClass {
    /// Encrypt, decrypt, datakey, rewrap.
    DataPlane,
    /// POST, PUT and DELETE outside the data plane.
    Commands,
}

/// Who a bucket counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RateHolder {
    /// One principal (all its tokens).
    Principal,
    /// The whole organization.
    Organization,
}

/// An organization's own limits: `None` is the server's default.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimits {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_plane_principal: Option<RateBucket>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_plane_organization: Option<RateBucket>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commands_principal: Option<RateBucket>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commands_organization: Option<RateBucket>,
}

impl RateLimits {
    pub fn get(&self, class: RateClass, holder: RateHolder) -> Option<RateBucket> {
        match (class, holder) {
            (RateClass::DataPlane, RateHolder::Principal) => self.data_plane_principal,
            (RateClass::DataPlane, RateHolder::Organization) => self.data_plane_organization,
            (RateClass::Commands, RateHolder::Principal) => self.commands_principal,
            (RateClass::Commands, RateHolder::Organization) => self.commands_organization,
        }
    }

    pub fn is_default(&self) -> bool {
        *self == RateLimits::default()
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn a_bucket_reads_its_flag_form_and_refuses_zero_and_nonsense() {
        let bucket = RateBucket::parse("f", "100:1000").unwrap();
        assert_eq!((bucket.per_second(), bucket.burst()), (100, 1000));
        assert_eq!(bucket.to_string(), "100:1000");
        for bad in [
            "",
            "100",
            "0:10",
            "10:0",
            "a:b",
            "-1:5",
            "10:20000000",
            "1:2:3",
        ] {
            assert!(RateBucket::parse("f", bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn limits_keep_only_what_an_organization_set() {
        let limits = RateLimits {
            commands_principal: Some(RateBucket::new("f", 5, 10).unwrap()),
            ..RateLimits::default()
        };
        let json = serde_json::to_value(limits).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"commands_principal": {"per_second": 5, "burst": 10}})
        );
        let back: RateLimits = serde_json::from_value(json).unwrap();
        assert_eq!(back, limits);
        assert!(serde_json::from_value::<RateLimits>(
            serde_json::json!({"commands_principal": {"per_second": 0, "burst": 10}})
        )
        .is_err());
    }

    proptest! {
        #[test]
        fn parsing_never_panics_and_round_trips(text in "\\PC{0,24}") {
            if let Ok(bucket) = RateBucket::parse("f", &text) {
                prop_assert_eq!(RateBucket::parse("f", &bucket.to_string()).unwrap(), bucket);
            }
        }
    }
}
