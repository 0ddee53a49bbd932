//! Where the proxy listens: `--listen ADDR[=SERVICE]` / `[[listener]]`, and the admin
//! listener (`--admin-listen` / `[admin]`).

use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use super::text;
use crate::route::{ServiceName, ServiceNameError};

/// `ADDR[=SERVICE]`: a listener address, optionally bound to one service. In the file,
/// a `[[listener]]` table with `addr` and `service`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenSpec {
    /// Where to listen.
    pub addr: SocketAddr,
    /// If set, every call on this listener goes to this service.
    #[serde(default, with = "text::opt", skip_serializing_if = "Option::is_none")]
    pub service: Option<ServiceName>,
}

/// Why a `--listen` value is malformed.
#[derive(Debug, thiserror::Error)]
pub enum ListenSpecError {
    /// The address part is not `ip:port`.
    #[error("--listen {0:?}: address is not ip:port")]
    Addr(String),
    /// The service part is not a valid service name.
    #[error("--listen {0:?}: {1}")]
    Service(String, ServiceNameError),
}

impl FromStr for ListenSpec {
    type Err = ListenSpecError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (addr, service) = match s.split_once('=') {
            Some((a, svc)) => (a, Some(svc)),
            None => (s, None),
        };
        let addr = addr
            .trim()
            .parse()
            .map_err(|_| ListenSpecError::Addr(s.to_owned()))?;
        let service = service
            .map(|svc| ServiceName::new(svc.trim()))
            .transpose()
            .map_err(|e| ListenSpecError::Service(s.to_owned(), e))?;
        Ok(Self { addr, service })
    }
}

impl fmt::Display for ListenSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.service {
            Some(s) => write!(f, "{}={s}", self.addr),
            None => write!(f, "{}", self.addr),
        }
    }
}

/// `--admin-listen`: an `ip:port`, or `off` to disable the admin listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AdminListen(pub Option<SocketAddr>);

impl FromStr for AdminListen {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            "off" | "none" | "" => Ok(Self(None)),
            a => a
                .parse()
                .map(|a| Self(Some(a)))
                .map_err(|_| format!("{a:?} is not ip:port (or off)")),
        }
    }
}

impl fmt::Display for AdminListen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(addr) => write!(f, "{addr}"),
            None => f.write_str("off"),
        }
    }
}

impl AdminSettings {
    /// Read at start only: the admin listener is bound once.
    pub const RESTART_ONLY: &'static [&'static str] = &["admin"];
}

/// The admin listener (`[admin]`).
#[derive(clap::Args, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct AdminSettings {
    /// Admin listener (`/metrics`, `/endpoints`, `/healthz`, `/readyz`); `off` disables it.
    #[arg(
        id = "admin.listen",
        long = "admin-listen",
        env = "SWITCHYARD_ADMIN_LISTEN",
        value_name = "ADDR|off",
        default_value = "127.0.0.1:7071"
    )]
    #[serde(with = "text")]
    pub listen: AdminListen,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_specs_parse_and_print_back() {
        let l: ListenSpec = "127.0.0.1:7001=a".parse().unwrap();
        assert_eq!(l.addr, "127.0.0.1:7001".parse().unwrap());
        assert_eq!(l.service.as_ref().unwrap().as_str(), "a");
        assert_eq!(l.to_string().parse::<ListenSpec>().unwrap(), l);
        let l: ListenSpec = "[::1]:7070".parse().unwrap();
        assert!(l.service.is_none());
        assert_eq!(l.to_string().parse::<ListenSpec>().unwrap(), l);
        assert!("nohost=a".parse::<ListenSpec>().is_err());
        assert!("127.0.0.1:1=a/b".parse::<ListenSpec>().is_err());
    }

    #[test]
    fn admin_listen_parses_and_prints_back() {
        for text in ["off", "127.0.0.1:7071"] {
            let a: AdminListen = text.parse().unwrap();
            assert_eq!(a.to_string(), text);
        }
        assert_eq!("none".parse::<AdminListen>(), Ok(AdminListen(None)));
        assert!("nowhere"
            .parse::<AdminListen>()
            .unwrap_err()
            .contains("ip:port"));
    }
}
