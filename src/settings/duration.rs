//! Durations in flags and in the config file, parsed by `humantime` (`250ms`, `10s`,
//! `2m`, `1h 30m`); a bare whole number is seconds (`drain = 20`, `--drain-timeout 20`).
//!
//! Use as a flag's `value_parser = duration::parse` and the field's
//! `#[serde(with = "duration")]`.

use std::fmt;
use std::time::Duration;

use serde::de::{self, Deserializer, Visitor};
use serde::Serializer;

/// Parses a duration given as text: humantime's syntax, or whole seconds.
pub fn parse(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if let Ok(secs) = s.parse::<u64>() {
        return Ok(Duration::from_secs(secs));
    }
    humantime::parse_duration(s).map_err(|e| format!("{s:?}: {e} (e.g. 500ms, 10s, 2m)"))
}

/// Writes a duration in humantime's syntax (which [`parse`] reads back).
pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&humantime::format_duration(*d))
}

/// Reads a duration from a string ([`parse`]) or a whole number of seconds.
pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    struct DurationVisitor;
    impl Visitor<'_> for DurationVisitor {
        type Value = Duration;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a duration such as \"500ms\", \"10s\" or \"2m\" (or whole seconds)")
        }
        fn visit_str<E: de::Error>(self, s: &str) -> Result<Duration, E> {
            parse(s).map_err(E::custom)
        }
        fn visit_u64<E: de::Error>(self, n: u64) -> Result<Duration, E> {
            Ok(Duration::from_secs(n))
        }
        fn visit_i64<E: de::Error>(self, n: i64) -> Result<Duration, E> {
            u64::try_from(n)
                .map(Duration::from_secs)
                .map_err(|_| E::custom(format!("{n}: a duration cannot be negative")))
        }
    }
    d.deserialize_any(DurationVisitor)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse() {
        assert_eq!(parse("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse("3"), Ok(Duration::from_secs(3)));
        assert_eq!(parse("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse("1h 30m"), Ok(Duration::from_secs(5400)));
        assert!(parse("10x").unwrap_err().contains("unit"));
        assert!(parse("").is_err());
        assert!(parse("-1s").is_err());
    }

    #[test]
    fn what_is_written_reads_back() {
        for d in [Duration::from_millis(1500), Duration::from_secs(300)] {
            let text = humantime::format_duration(d).to_string();
            assert_eq!(parse(&text), Ok(d), "{text}");
        }
    }
}
