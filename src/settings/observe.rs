//! Seeing every call (`[observe]`): the access log and OpenTelemetry traces. Read at
//! start only (a reload names a change as needing a restart); SIGHUP reopens the access
//! log's file, for logrotate.

use std::ffi::OsStr;
use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use clap::builder::{PossibleValue, StringValueParser, TypedValueParser};
use serde::{Deserialize, Serialize};

use super::text;

/// Where the access log goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AccessLogTarget {
    /// No access log.
    Off,
    /// One line per call on the process's standard output.
    Stdout,
    /// One line per call appended to this file (reopened on SIGHUP).
    File(PathBuf),
}

/// The access log's words that are not file paths (a file of that name: `./off`).
const WORDS: [&str; 3] = ["off", "stdout", "-"];

impl FromStr for AccessLogTarget {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim() {
            "" => Err("empty; give a file path, `stdout` or `off`".to_owned()),
            "off" => Ok(Self::Off),
            "stdout" | "-" => Ok(Self::Stdout),
            path => Ok(Self::File(PathBuf::from(path))),
        }
    }
}

/// Parses `--access-log`, naming its [`WORDS`] as its possible values: the layering
/// makes a relative path in the config file relative to the file's directory, as for
/// every path setting, and leaves those words alone.
#[derive(Debug, Clone, Copy)]
pub struct AccessLogParser;

impl TypedValueParser for AccessLogParser {
    type Value = AccessLogTarget;

    fn parse_ref(
        &self,
        cmd: &clap::Command,
        arg: Option<&clap::Arg>,
        value: &OsStr,
    ) -> Result<AccessLogTarget, clap::Error> {
        StringValueParser::new()
            .try_map(|s| s.parse::<AccessLogTarget>())
            .parse_ref(cmd, arg, value)
    }

    fn possible_values(&self) -> Option<Box<dyn Iterator<Item = PossibleValue> + '_>> {
        Some(Box::new(WORDS.into_iter().map(PossibleValue::new)))
    }
}

impl fmt::Display for AccessLogTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Off => f.write_str("off"),
            Self::Stdout => f.write_str("stdout"),
            Self::File(p) => write!(f, "{}", p.display()),
        }
    }
}

/// Parses `--trace-sample-rate`: a share of calls from 0 to 1.
fn sample_rate(s: &str) -> Result<f64, String> {
    let rate: f64 = s
        .trim()
        .parse()
        .map_err(|e| format!("{s:?} is not a number: {e}"))?;
    if (0.0..=1.0).contains(&rate) {
        Ok(rate)
    } else {
        Err(format!("{rate} is not between 0 and 1"))
    }
}

impl ObserveSection {
    /// Read at start only: the access log and the exporter start once (a reload reopens
    /// the log's file).
    pub const RESTART_ONLY: &'static [&'static str] = &["observe"];
}

/// The access log and tracing (`[observe]`; read at start only).
#[derive(clap::Args, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ObserveSection {
    /// Access log: one JSON line per call, to this file (reopened on SIGHUP; relative to
    /// the config file's directory when set there), `stdout`, or `off`.
    #[arg(
        id = "observe.access_log",
        long = "access-log",
        env = "SWITCHYARD_ACCESS_LOG",
        value_name = "PATH|stdout|off",
        default_value = "off",
        value_hint = clap::ValueHint::AnyPath,
        value_parser = AccessLogParser,
        hide_possible_values = true
    )]
    #[serde(with = "text")]
    pub access_log: AccessLogTarget,
    /// Send a span per sampled call to this OTLP/gRPC collector (e.g.
    /// `http://127.0.0.1:4317`); unset: no tracing.
    #[arg(
        id = "observe.otlp_endpoint",
        long = "otlp-endpoint",
        env = "SWITCHYARD_OTLP_ENDPOINT",
        value_name = "URL"
    )]
    #[serde(default)]
    pub otlp_endpoint: Option<String>,
    /// Share of calls traced (0 to 1) among those whose client sent no `traceparent`; a
    /// client's sampled one is always followed, an unsampled one never.
    #[arg(
        id = "observe.trace_sample_rate",
        long = "trace-sample-rate",
        env = "SWITCHYARD_TRACE_SAMPLE_RATE",
        value_name = "RATE",
        default_value = "1.0",
        value_parser = sample_rate
    )]
    #[serde(deserialize_with = "rate_from_file")]
    pub trace_sample_rate: f64,
}

/// The file's `trace_sample_rate`, checked as the flag's.
fn rate_from_file<'de, D: serde::Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    let rate = f64::deserialize(d)?;
    sample_rate(&rate.to_string()).map_err(serde::de::Error::custom)
}

// `f64` is not `Eq`, but a rate is never NaN (checked when read).
impl Eq for ObserveSection {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn access_log_targets_and_rates_parse() {
        assert_eq!("off".parse(), Ok(AccessLogTarget::Off));
        assert_eq!("stdout".parse(), Ok(AccessLogTarget::Stdout));
        assert_eq!(
            "/var/log/sy.log".parse(),
            Ok(AccessLogTarget::File("/var/log/sy.log".into()))
        );
        assert!("".parse::<AccessLogTarget>().is_err());
        assert_eq!(sample_rate("0.01"), Ok(0.01));
        assert!(sample_rate("1.5").is_err());
        assert!(sample_rate("-0.1").is_err());
        assert!(sample_rate("NaN").is_err());
    }
}
