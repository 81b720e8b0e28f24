//! Durations as the command and the examples take them on their command lines.

use crate::error::{Error, Result};
use std::time::Duration;

/// Parses `250ms`, `2s`, `1.5s`, `1m`, or a plain number of seconds: the form
/// `switcheroo run --probation`, `--drain-idle` and the examples' flags take.
/// [`Error::InvalidDuration`] says what is wrong.
pub fn parse_duration(text: &str) -> Result<Duration> {
    let invalid = |why: &'static str| Error::InvalidDuration {
        text: text.to_owned(),
        why,
    };
    let (number, unit) = text
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .map_or((text, ""), |i| text.split_at(i));
    let value: f64 = number
        .parse()
        .map_err(|_| invalid("expected a duration such as 200ms, 5s or 1m"))?;
    let seconds = match unit {
        "ms" => value / 1000.0,
        "" | "s" => value,
        "m" => value * 60.0,
        _ => return Err(invalid("the unit is ms, s or m")),
    };
    Duration::try_from_secs_f64(seconds).map_err(|_| invalid("out of range"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("200ms").unwrap(), Duration::from_millis(200));
        assert_eq!(parse_duration("5").unwrap(), Duration::from_secs(5));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        for bad in ["5h", "", "-1s", "s", "1e999"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
        assert_eq!(
            parse_duration("5h").unwrap_err().to_string(),
            "invalid duration \"5h\": the unit is ms, s or m"
        );
    }
}
