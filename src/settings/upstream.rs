//! Backend connections (`[upstream]`): how many per backend address, and when an unused
//! one is closed.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::text;

/// `--upstream-idle-timeout`: a duration, or `off` to keep idle connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdleTimeout(pub Option<Duration>);

impl FromStr for IdleTimeout {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            "off" | "none" => Ok(Self(None)),
            d => super::duration::parse(d).map(|d| Self((!d.is_zero()).then_some(d))),
        }
    }
}

impl fmt::Display for IdleTimeout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(d) => write!(f, "{}", humantime::format_duration(d)),
            None => f.write_str("off"),
        }
    }
}

impl UpstreamSettings {
    /// Read at start only: the pool of backend connections is made once.
    pub const RESTART_ONLY: &'static [&'static str] = &["upstream"];
}

/// Backend connections (`[upstream]`).
#[derive(clap::Args, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct UpstreamSettings {
    /// Most HTTP/2 connections to one backend address: another is opened when every one
    /// is at the backend's stream limit (SETTINGS_MAX_CONCURRENT_STREAMS).
    #[arg(
        id = "upstream.max_connections",
        long = "upstream-max-connections",
        env = "SWITCHYARD_UPSTREAM_MAX_CONNECTIONS",
        value_name = "N",
        default_value_t = crate::upstream::DEFAULT_MAX_CONNECTIONS,
        value_parser = clap::value_parser!(usize)
    )]
    pub max_connections: usize,
    /// A backend connection with no stream for this long is closed (the next call
    /// reopens it); `off` keeps idle connections.
    #[arg(
        id = "upstream.idle_timeout",
        long = "upstream-idle-timeout",
        env = "SWITCHYARD_UPSTREAM_IDLE_TIMEOUT",
        value_name = "DURATION|off",
        default_value = "10m"
    )]
    #[serde(with = "text")]
    pub idle_timeout: IdleTimeout,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idle_timeouts_parse_and_print_back() {
        assert_eq!("off".parse::<IdleTimeout>(), Ok(IdleTimeout(None)));
        assert_eq!("0".parse::<IdleTimeout>(), Ok(IdleTimeout(None)));
        let t: IdleTimeout = "10m".parse().unwrap();
        assert_eq!(t, IdleTimeout(Some(Duration::from_secs(600))));
        assert_eq!(t.to_string().parse::<IdleTimeout>(), Ok(t));
        assert!("soon".parse::<IdleTimeout>().is_err());
    }
}
