//! What counts as a backend failing a call: the gRPC status codes an operator names.

use std::fmt;
use std::str::FromStr;

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
