//! Durations on the command line: a whole number and a unit, `500ms`, `1s`, `1m`, `2h`.

use std::time::Duration;

/// Parses `<n><unit>` with unit `ms`, `s`, `m` or `h`. Zero and values above a day are
/// refused: neither is a sensible interval for anything EKM schedules.
pub fn parse_duration(input: &str) -> Result<Duration, String> {
    let input = input.trim();
    let split = input
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| format!("`{input}` has no unit (use ms, s, m or h, as in 500ms or 1m)"))?;
    let (number, unit) = input.split_at(split);
    let n: u64 = number
        .parse()
        .map_err(|_| format!("`{input}` does not start with a whole number"))?;
    let millis_per_unit = match unit {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        _ => return Err(format!("`{unit}` is not a unit (use ms, s, m or h)")),
    };
    let millis = n
        .checked_mul(millis_per_unit)
        .filter(|ms| (1..=86_400_000).contains(ms))
        .ok_or_else(|| format!("`{input}` must be between 1ms and 24h"))?;
    Ok(Duration::from_millis(millis))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_the_documented_examples() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("1s"), Ok(Duration::from_secs(1)));
        assert_eq!(parse_duration("1m"), Ok(Duration::from_secs(60)));
        assert_eq!(parse_duration("60s"), Ok(Duration::from_secs(60)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
    }

    #[test]
    fn refuses_missing_units_zero_and_nonsense() {
        for bad in [
            "",
            "1",
            "0s",
            "s",
            "1x",
            "-1s",
            "1.5s",
            "25h",
            "99999999999999999999s",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    proptest! {
        #[test]
        fn never_panics(input in ".{0,30}") {
            let _ = parse_duration(&input);
        }

        #[test]
        fn round_trips_milliseconds(ms in 1u64..=86_400_000) {
            prop_assert_eq!(parse_duration(&format!("{ms}ms")), Ok(Duration::from_millis(ms)));
        }
    }
}
