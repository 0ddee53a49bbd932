//! How calls are balanced (`[balance]`, `[service."NAME"]`) and how failing endpoints are
//! taken out of rotation (`[ejection]`, `[health_check]`).

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{duration, text};
use crate::balance::Policy;
use crate::health::{ActiveCheck, FailureCodes};

/// The balancing policy, slow start and peak-ewma's tuning (`[balance]`).
#[derive(clap::Args, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct BalanceSection {
    /// How each call's backend is picked: round-robin, least-request (fewest calls in
    /// flight of two random endpoints), peak-ewma (lowest latency x load of two) or latency
    /// (lowest recent latency of two, load counting past 8 calls in flight).
    #[arg(
        id = "balance.policy",
        long = "balance",
        env = "SWITCHYARD_BALANCE",
        value_name = "POLICY",
        default_value = "round-robin"
    )]
    #[serde(with = "text")]
    pub policy: Policy,
    /// Ramp a new or recovered endpoint's share from 10 % to 100 % over this window (0: off).
    #[arg(
        id = "balance.slow_start",
        long = "slow-start",
        env = "SWITCHYARD_SLOW_START",
        value_name = "DURATION",
        default_value = "0s",
        value_parser = duration::parse
    )]
    #[serde(with = "duration")]
    pub slow_start: Duration,
    /// peak-ewma: how fast the latency estimate forgets a slow answer (Linkerd: 10s).
    #[arg(
        id = "balance.ewma_decay",
        long = "ewma-decay",
        env = "SWITCHYARD_EWMA_DECAY",
        value_name = "DURATION",
        default_value = "10s",
        value_parser = duration::parse
    )]
    #[serde(with = "duration")]
    pub ewma_decay: Duration,
    /// peak-ewma: the latency estimate of an endpoint with no answer yet (Linkerd: 30ms).
    #[arg(
        id = "balance.ewma_default_rtt",
        long = "ewma-default-rtt",
        env = "SWITCHYARD_EWMA_DEFAULT_RTT",
        value_name = "DURATION",
        default_value = "30ms",
        value_parser = duration::parse
    )]
    #[serde(with = "duration")]
    pub ewma_default_rtt: Duration,
    /// The proxy's own zone: calls go to endpoints of this zone while it has enough usable
    /// ones, to the others otherwise (off by default).
    #[arg(
        id = "balance.zone",
        long = "zone",
        env = "SWITCHYARD_ZONE",
        value_name = "NAME"
    )]
    #[serde(default)]
    pub zone: Option<String>,
    /// The metadata key holding an endpoint's zone (e.g. topology.kubernetes.io/zone).
    #[arg(
        id = "balance.zone_key",
        long = "zone-key",
        env = "SWITCHYARD_ZONE_KEY",
        value_name = "KEY",
        default_value = "zone"
    )]
    pub zone_key: String,
    /// Per-service settings, by service name (config file only).
    #[arg(skip)]
    #[serde(
        default,
        rename = "service",
        skip_serializing_if = "BTreeMap::is_empty"
    )]
    pub services: BTreeMap<String, ServiceSection>,
}

/// One service's own settings (`[balance.service."pkg.Svc"]`).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ServiceSection {
    /// This service's balancing policy.
    #[serde(with = "text")]
    pub policy: Policy,
}

/// Passive outlier ejection (`[ejection]`).
#[derive(clap::Args, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct EjectionSection {
    /// Eject an endpoint whose last N calls failed (0: never eject).
    #[arg(
        id = "ejection.after",
        long = "eject-after",
        env = "SWITCHYARD_EJECT_AFTER",
        value_name = "N",
        default_value_t = 5
    )]
    pub after: u32,
    /// How long the first ejection lasts; doubled for each one in a row (at most 5 minutes).
    #[arg(
        id = "ejection.duration",
        long = "eject-for",
        env = "SWITCHYARD_EJECT_FOR",
        value_name = "DURATION",
        default_value = "30s",
        value_parser = duration::parse
    )]
    #[serde(with = "duration")]
    pub duration: Duration,
    /// Most of a service's endpoints ejected (or unhealthy) at once, in percent; never the last.
    #[arg(
        id = "ejection.max_percent",
        long = "max-ejected-percent",
        env = "SWITCHYARD_MAX_EJECTED_PERCENT",
        value_name = "PERCENT",
        default_value_t = 50,
        value_parser = clap::value_parser!(u8).range(0..=100)
    )]
    pub max_percent: u8,
    /// gRPC status codes that count as the backend failing a call (comma-separated).
    #[arg(
        id = "ejection.failure_codes",
        long = "failure-codes",
        env = "SWITCHYARD_FAILURE_CODES",
        value_name = "CODES",
        default_value = "14"
    )]
    #[serde(with = "text")]
    pub failure_codes: FailureCodes,
}

/// Active health checks of endpoints (`[health_check]`).
#[derive(clap::Args, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct HealthCheckSection {
    /// Check each endpoint itself: none, grpc (grpc.health.v1.Health for its service) or tcp (a connect).
    #[arg(
        id = "health_check.kind",
        long = "health-check",
        env = "SWITCHYARD_HEALTH_CHECK",
        value_name = "KIND",
        default_value = "none"
    )]
    #[serde(with = "text")]
    pub kind: ActiveCheck,
    /// Interval of health Check calls to backends that do not implement Watch.
    #[arg(
        id = "health_check.interval",
        long = "health-interval",
        env = "SWITCHYARD_HEALTH_INTERVAL",
        value_name = "DURATION",
        default_value = "5s",
        value_parser = duration::parse
    )]
    #[serde(with = "duration")]
    pub interval: Duration,
}
