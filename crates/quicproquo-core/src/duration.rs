//! Durations written the way operators and users type them: `250ms`, `10s`, `5m`, `1h`, `30d`.
//!
//! One parser for every command line and configuration file of the project (the server's
//! settings, `qpq --timeout`, the load test's options), so that a duration one of them accepts
//! is accepted by all.

use std::time::Duration;

/// Why a duration could not be parsed. Each message quotes the text and the accepted form.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DurationError {
    /// Digits only (or nothing at all): the unit is missing.
    #[error("`{0}` needs a unit (ms, s, m, h or d)")]
    MissingUnit(String),
    /// The part before the unit is not a whole number that fits in 64 bits.
    #[error("`{0}` is not a duration like 500ms, 10s, 5m")]
    NotANumber(String),
    /// The unit is none of `ms`, `s`, `m`, `h`, `d`.
    #[error("`{0}` has an unknown unit (use ms, s, m, h or d)")]
    UnknownUnit(String),
}

/// Parses a whole number followed by a unit: `ms` (milliseconds), `s` (seconds), `m` (minutes)
/// `h` (hours) or `d` (days of 24 hours), e.g. `250ms`, `10s`, `5m`, `1h`, `30d`. Surrounding whitespace is ignored; a bare
/// number is refused (its unit would be a guess). Values too large for a [`Duration`] of
/// seconds saturate.
pub fn parse_duration(text: &str) -> Result<Duration, DurationError> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| DurationError::MissingUnit(text.to_owned()))?;
    let (number, unit) = text.split_at(split);
    let n: u64 = number
        .parse()
        .map_err(|_| DurationError::NotANumber(text.to_owned()))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n.saturating_mul(60))),
        "h" => Ok(Duration::from_secs(n.saturating_mul(3600))),
        "d" => Ok(Duration::from_secs(n.saturating_mul(86_400))),
        _ => Err(DurationError::UnknownUnit(text.to_owned())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_unit_parses() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("1m"), Ok(Duration::from_secs(60)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        assert_eq!(parse_duration("30d"), Ok(Duration::from_secs(30 * 86_400)));
        assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));
        assert_eq!(parse_duration(" 30s\n"), Ok(Duration::from_secs(30)));
    }

    #[test]
    fn a_missing_unit_is_refused() {
        assert_eq!(
            parse_duration("10"),
            Err(DurationError::MissingUnit("10".into()))
        );
        assert_eq!(
            parse_duration(""),
            Err(DurationError::MissingUnit("".into()))
        );
    }

    #[test]
    fn a_missing_or_oversized_number_is_refused() {
        assert_eq!(
            parse_duration("ms"),
            Err(DurationError::NotANumber("ms".into()))
        );
        assert_eq!(
            parse_duration("99999999999999999999s"),
            Err(DurationError::NotANumber("99999999999999999999s".into()))
        );
    }

    #[test]
    fn unknown_units_and_fractions_are_refused() {
        for text in ["5 parsecs", "1.5s", "10S", "3w", "-1s", "10 s"] {
            assert!(
                matches!(
                    parse_duration(text),
                    Err(DurationError::UnknownUnit(_)) | Err(DurationError::NotANumber(_))
                ),
                "{text:?} was accepted"
            );
        }
        assert_eq!(
            parse_duration("3w").map_err(|e| e.to_string()),
            Err("`3w` has an unknown unit (use ms, s, m, h or d)".to_owned())
        );
    }

    #[test]
    fn huge_values_saturate_instead_of_wrapping() {
        let d = parse_duration(&format!("{}h", u64::MAX)).map_err(|e| e.to_string());
        assert_eq!(d, Ok(Duration::from_secs(u64::MAX)));
    }
}
