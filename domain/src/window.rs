//! The waiting period of a revoke (issue 17 §1): an ISO 8601 duration from `PT0S` to `P90D`;
//! and the rotation period of a scope's key (§2), from `P1D` to `P3650D`.
//!
//! Only units of fixed length are accepted: weeks, days, hours, minutes and seconds
//! (`P7D`, `P2W`, `PT36H`, `P1DT12H`). Years and months are refused, since their length
//! depends on the calendar (`P1M` from January 31st has no single answer), and so are
//! fractions and signs. A window is kept in its canonical form (`P1DT12H`, `PT0S`), which
//! is what events record and the API answers.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::scope::ValueError;

/// The longest waiting period: 90 days, as the big KMSs allow at most (AWS: 30).
pub const MAX_WINDOW_SECONDS: u64 = 90 * 86_400;

/// A validated waiting period, in whole seconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct RevokeWindow(u64);

impl RevokeWindow {
    /// The default of an organization that set none: seven days.
    pub const DEFAULT: RevokeWindow = RevokeWindow(7 * 86_400);
    pub const ZERO: RevokeWindow = RevokeWindow(0);

    pub fn parse(field: &'static str, input: &str) -> Result<RevokeWindow, ValueError> {
        let seconds = parse_seconds(field, input)?;
        if seconds > MAX_WINDOW_SECONDS {
            return Err(ValueError::new(field, "at most P90D"));
        }
        Ok(RevokeWindow(seconds))
    }

    pub fn seconds(self) -> u64 {
        self.0
    }

    pub fn is_zero(self) -> bool {
        self.0 == 0
    }
}

/// The shortest and longest rotation periods: a day (as Google Cloud KMS) and ten years.
pub const MIN_ROTATION_SECONDS: u64 = 86_400;
pub const MAX_ROTATION_SECONDS: u64 = 3_650 * 86_400;

/// How often a scope's key is rotated automatically (issue 17 §2), in whole seconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct RotationPeriod(u64);

impl RotationPeriod {
    pub fn parse(field: &'static str, input: &str) -> Result<RotationPeriod, ValueError> {
        let seconds = parse_seconds(field, input)?;
        if !(MIN_ROTATION_SECONDS..=MAX_ROTATION_SECONDS).contains(&seconds) {
            return Err(ValueError::new(field, "from P1D to P3650D"));
        }
        Ok(RotationPeriod(seconds))
    }

    pub fn seconds(self) -> u64 {
        self.0
    }
}

impl fmt::Display for RotationPeriod {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        RevokeWindow(self.0).fmt(f)
    }
}

impl TryFrom<String> for RotationPeriod {
    type Error = ValueError;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        RotationPeriod::parse("rotation_period", &value)
    }
}

impl From<RotationPeriod> for String {
    fn from(value: RotationPeriod) -> Self {
        value.to_string()
    }
}

/// An ISO 8601 duration of weeks, days, hours, minutes and seconds, in seconds (at most
/// about 31 years: 9 digits a unit, checked arithmetic).
fn parse_seconds(field: &'static str, input: &str) -> Result<u64, ValueError> {
    {
        let bad = || {
            ValueError::new(
                field,
                "an ISO 8601 duration in weeks, days, hours, minutes and seconds, from PT0S to P90D (e.g. P7D, PT12H)",
            )
        };
        let rest = input.strip_prefix('P').ok_or_else(bad)?;
        if rest.is_empty() {
            return Err(bad());
        }
        let (date, time) = match rest.split_once('T') {
            Some((_, "")) => return Err(bad()),
            Some((date, time)) => (date, Some(time)),
            None => (rest, None),
        };
        let mut seconds: u64 = 0;
        let mut add = |part: &str, units: &[(char, u64)]| -> Result<(), ValueError> {
            let mut number = String::new();
            let mut next_unit = 0;
            for c in part.chars() {
                if c.is_ascii_digit() {
                    number.push(c);
                    continue;
                }
                // Units in their order, each at most once, each after a number.
                let at = units[next_unit..]
                    .iter()
                    .position(|(u, _)| *u == c)
                    .ok_or_else(bad)?;
                if number.is_empty() || number.len() > 9 {
                    return Err(bad());
                }
                let n: u64 = number.parse().map_err(|_| bad())?;
                seconds = seconds
                    .checked_add(n.checked_mul(units[next_unit + at].1).ok_or_else(bad)?)
                    .ok_or_else(bad)?;
                next_unit += at + 1;
                number.clear();
            }
            match number.is_empty() {
                true => Ok(()),
                false => Err(bad()),
            }
        };
        add(date, &[('W', 7 * 86_400), ('D', 86_400)])?;
        if let Some(time) = time {
            add(time, &[('H', 3_600), ('M', 60), ('S', 1)])?;
        }
        Ok(seconds)
    }
}

impl fmt::Display for RevokeWindow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0 == 0 {
            return f.write_str("PT0S");
        }
        let (days, rest) = (self.0 / 86_400, self.0 % 86_400);
        let (hours, minutes, seconds) = (rest / 3_600, rest % 3_600 / 60, rest % 60);
        f.write_str("P")?;
        if days > 0 {
            write!(f, "{days}D")?;
        }
        if rest > 0 {
            f.write_str("T")?;
            for (n, unit) in [(hours, 'H'), (minutes, 'M'), (seconds, 'S')] {
                if n > 0 {
                    write!(f, "{n}{unit}")?;
                }
            }
        }
        Ok(())
    }
}

impl TryFrom<String> for RevokeWindow {
    type Error = ValueError;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        RevokeWindow::parse("revoke_window", &value)
    }
}

impl From<RevokeWindow> for String {
    fn from(value: RevokeWindow) -> Self {
        value.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn windows_read_as_their_length_in_seconds() {
        for (input, seconds) in [
            ("PT0S", 0),
            ("P0D", 0),
            ("P7D", 7 * 86_400),
            ("P2W", 14 * 86_400),
            ("PT36H", 36 * 3_600),
            ("P1DT12H", 86_400 + 12 * 3_600),
            ("PT90M", 5_400),
            ("P1W2DT3H4M5S", 9 * 86_400 + 3 * 3_600 + 4 * 60 + 5),
            ("P90D", 90 * 86_400),
        ] {
            assert_eq!(
                RevokeWindow::parse("after", input).unwrap().seconds(),
                seconds,
                "{input}"
            );
        }
    }

    #[test]
    fn windows_are_refused_when_not_fixed_length_or_out_of_range() {
        for input in [
            "",
            "P",
            "PT",
            "7D",
            "P1M",
            "P1Y",
            "P91D",
            "P13W",
            "PT2161H",
            "P-1D",
            "P1.5D",
            "PT1H30",
            "P1DT",
            "PD",
            "P1H",
            "PT1D",
            "P1D1W",
            "PT1S1H",
            "P1D1D",
            "p7d",
            " P7D",
            "P99999999999D",
        ] {
            assert!(
                RevokeWindow::parse("after", input).is_err(),
                "{input:?} was accepted"
            );
        }
    }

    #[test]
    fn rotation_periods_read_from_a_day_to_ten_years() {
        assert_eq!(
            RotationPeriod::parse("p", "P90D").unwrap().seconds(),
            90 * 86_400
        );
        assert_eq!(
            RotationPeriod::parse("p", "P1D").unwrap().to_string(),
            "P1D"
        );
        assert_eq!(
            RotationPeriod::parse("p", "P3650D").unwrap().to_string(),
            "P3650D"
        );
        for input in ["PT23H", "P3651D", "PT0S", "P1M", "P1Y"] {
            assert!(RotationPeriod::parse("p", input).is_err(), "{input}");
        }
    }

    proptest! {
        /// Any text: a clear refusal or a window, never a panic; and a window's canonical
        /// form reads back as itself.
        #[test]
        fn any_text_parses_or_is_refused_and_canonical_forms_read_back(input in "\\PC{0,16}") {
            if let Ok(window) = RevokeWindow::parse("after", &input) {
                prop_assert!(window.seconds() <= MAX_WINDOW_SECONDS);
                prop_assert_eq!(RevokeWindow::parse("after", &window.to_string()), Ok(window));
            }
        }

        #[test]
        fn every_length_up_to_ninety_days_round_trips(seconds in 0..=MAX_WINDOW_SECONDS) {
            let window = RevokeWindow(seconds);
            prop_assert_eq!(RevokeWindow::parse("after", &window.to_string()), Ok(window));
        }

        #[test]
        fn durations_built_from_units_parse_to_their_sum(
            w in 0u64..13, d in 0u64..91, h in 0u64..100, m in 0u64..100, s in 0u64..100,
        ) {
            let input = format!("P{w}W{d}DT{h}H{m}M{s}S");
            let total = w * 7 * 86_400 + d * 86_400 + h * 3_600 + m * 60 + s;
            match RevokeWindow::parse("after", &input) {
                Ok(window) => prop_assert_eq!(window.seconds(), total),
                Err(_) => prop_assert!(total > MAX_WINDOW_SECONDS),
            }
        }
    }
}
