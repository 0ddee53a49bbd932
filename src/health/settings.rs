//! What a service's health accounting runs with: which statuses count as failures,
//! passive ejection's thresholds, and the active checks' kind and interval.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

/// A set of gRPC status codes (0-16) that count as the backend failing the call.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct FailureCodes(u32);

impl FailureCodes {
    /// No code counts.
    pub const NONE: Self = Self(0);

    /// The default: UNAVAILABLE (14) only, the status of a node that cannot serve.
    pub const DEFAULT: Self = Self(1 << 14);

    /// Whether `code` (a `grpc-status` value) is in the set.
    #[inline]
    pub fn contains(self, code: u8) -> bool {
        code < 17 && self.0 & (1 << code) != 0
    }

    /// The codes in the set, lowest first.
    pub fn iter(self) -> impl Iterator<Item = u8> {
        (0..17u8).filter(move |c| self.contains(*c))
    }
}

impl Default for FailureCodes {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// A failure-code list that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a gRPC status code (0-16); give a comma-separated list such as \"14\" or \"13,14\"")]
pub struct BadFailureCode(String);

impl FromStr for FailureCodes {
    type Err = BadFailureCode;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut set = 0u32;
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            match part.parse::<u8>() {
                Ok(c) if c < 17 => set |= 1 << c,
                _ => return Err(BadFailureCode(part.to_owned())),
            }
        }
        Ok(Self(set))
    }
}

impl fmt::Display for FailureCodes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let codes: Vec<String> = self.iter().map(|c| c.to_string()).collect();
        f.write_str(&codes.join(","))
    }
}

impl fmt::Debug for FailureCodes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "FailureCodes({self})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failure_codes_parse() {
        let c: FailureCodes = "14".parse().unwrap();
        assert!(c.contains(14) && !c.contains(13) && !c.contains(17));
        let c: FailureCodes = " 13, 14 ,2".parse().unwrap();
        assert_eq!(c.to_string(), "2,13,14");
        assert_eq!("".parse::<FailureCodes>().unwrap(), FailureCodes::NONE);
        assert!("17".parse::<FailureCodes>().is_err());
        assert!("x"
            .parse::<FailureCodes>()
            .unwrap_err()
            .to_string()
            .contains("\"x\""));
    }
}

/// How an endpoint's health is checked: by the proxy's active checks (`--health-check`)
/// and by the `register` sidecar's health gate alike.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Default,
    clap::ValueEnum,
    strum::Display,
    strum::EnumString,
    strum::VariantNames,
)]
#[strum(serialize_all = "kebab-case", parse_err_ty = UnknownCheck, parse_err_fn = UnknownCheck::new)]
pub enum ActiveCheck {
    /// No check: the proxy goes by calls' outcomes only; the sidecar takes the backend as healthy.
    #[default]
    None,
    /// `grpc.health.v1.Health` for the endpoint's service: healthy while it answers SERVING
    /// (the proxy Watches, or Checks every interval where Watch is unimplemented).
    Grpc,
    /// A TCP connect to the address every interval: healthy while it is accepted.
    Tcp,
}

/// A health check name that is not one of [`ActiveCheck`]'s.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{given:?} is not a health check (choose one of: {})", <ActiveCheck as strum::VariantNames>::VARIANTS.join(", "))]
pub struct UnknownCheck {
    given: String,
}

impl UnknownCheck {
    fn new(given: &str) -> Self {
        Self {
            given: given.to_owned(),
        }
    }
}

/// Settings of passive outlier ejection and active health checks.
#[derive(Debug, Clone, PartialEq)]
pub struct HealthSettings {
    /// Failures in a row that eject an endpoint (0: never eject).
    pub eject_after: u32,
    /// How long the first ejection lasts; doubled for each ejection in a row.
    pub eject_for: Duration,
    /// Most of a service's endpoints ejected (or unhealthy) at once, in percent.
    pub max_ejected_percent: u8,
    /// Statuses that count as the backend failing the call.
    pub failure_codes: FailureCodes,
    /// Active health checks.
    pub check: ActiveCheck,
    /// Interval of health Check calls when the backend does not implement Watch.
    pub check_interval: Duration,
}

impl Default for HealthSettings {
    fn default() -> Self {
        Self {
            eject_after: 5,
            eject_for: Duration::from_secs(30),
            max_ejected_percent: 50,
            failure_codes: FailureCodes::DEFAULT,
            check: ActiveCheck::None,
            check_interval: Duration::from_secs(5),
        }
    }
}
