//! The standard gRPC service config JSON (grpc's `service_config.proto`, gRFC A6), read
//! and checked: the parts the proxy applies (`methodConfig` names, `timeout`,
//! `retryPolicy`, `hedgingPolicy`, `retryThrottling`), the others accepted and ignored.
//! An error names the field, as a path (`methodConfig[0].retryPolicy.maxAttempts`).

use std::time::Duration;

use serde::Deserialize;
use serde_json::Value;

use super::policy::{
    CodeSet, HedgingPolicy, MethodPolicy, Resend, RetryPolicy, ThrottleParams, MAX_POLICY_ATTEMPTS,
};

/// Why a service config was refused: the field (as a path) and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {problem}")]
pub struct ConfigError {
    /// The field, as a path from the document's root (`.` for the whole document).
    pub field: String,
    /// What is wrong.
    pub problem: String,
}

impl ConfigError {
    fn new(field: impl Into<String>, problem: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            problem: problem.into(),
        }
    }
}

/// The service and method a `methodConfig` entry names: both, a whole service, or
/// neither (the default of every method not named elsewhere).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct MethodName {
    /// The gRPC service (`pkg.Svc`), as in the call's path; `None`: every service.
    pub service: Option<String>,
    /// The method; `None`: every method of the service.
    pub method: Option<String>,
}

/// One service config document, checked.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ServiceConfig {
    /// Each named method's policy, in the document's order.
    pub methods: Vec<(MethodName, std::sync::Arc<MethodPolicy>)>,
    /// The document's `retryThrottling`.
    pub throttling: Option<ThrottleParams>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Doc {
    #[serde(default)]
    method_config: Vec<MethodConfigJson>,
    retry_throttling: Option<ThrottlingJson>,
    // Standard fields the proxy does not apply: accepted, so that a client's own service
    // config can be used as it is.
    #[serde(default)]
    load_balancing_policy: Option<Value>,
    #[serde(default)]
    load_balancing_config: Option<Value>,
    #[serde(default)]
    health_check_config: Option<Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct MethodConfigJson {
    #[serde(default)]
    name: Vec<NameJson>,
    timeout: Option<String>,
    retry_policy: Option<RetryJson>,
    hedging_policy: Option<HedgingJson>,
    #[serde(default)]
    wait_for_ready: Option<Value>,
    #[serde(default)]
    max_request_message_bytes: Option<Value>,
    #[serde(default)]
    max_response_message_bytes: Option<Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NameJson {
    service: Option<String>,
    method: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RetryJson {
    max_attempts: u32,
    initial_backoff: String,
    max_backoff: String,
    backoff_multiplier: f64,
    retryable_status_codes: Vec<Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct HedgingJson {
    max_attempts: u32,
    hedging_delay: Option<String>,
    #[serde(default)]
    non_fatal_status_codes: Vec<Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct ThrottlingJson {
    max_tokens: f64,
    token_ratio: f64,
}

/// The gRPC status codes by their names in the spec, in code order.
const CODE_NAMES: [&str; 17] = [
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
];

/// Reads and checks one service config document.
pub fn parse(text: &str) -> Result<ServiceConfig, ConfigError> {
    let de = &mut serde_json::Deserializer::from_str(text);
    let doc: Doc = serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        ConfigError::new(
            if path.is_empty() { ".".into() } else { path },
            e.into_inner().to_string(),
        )
    })?;
    let _ignored = (
        doc.load_balancing_policy,
        doc.load_balancing_config,
        doc.health_check_config,
    );
    let mut methods = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for (i, mc) in doc.method_config.into_iter().enumerate() {
        let at = format!("methodConfig[{i}]");
        let policy = std::sync::Arc::new(method_policy(&at, &mc)?);
        if mc.name.is_empty() {
            return Err(ConfigError::new(
                format!("{at}.name"),
                "names no method (give [{}] for the default of every method)",
            ));
        }
        for (j, n) in mc.name.into_iter().enumerate() {
            let service = n.service.filter(|s| !s.is_empty());
            let method = n.method.filter(|m| !m.is_empty());
            if service.is_none() && method.is_some() {
                return Err(ConfigError::new(
                    format!("{at}.name[{j}].method"),
                    "a method needs its service",
                ));
            }
            let name = MethodName { service, method };
            if !seen.insert(name.clone()) {
                return Err(ConfigError::new(
                    format!("{at}.name[{j}]"),
                    "names a method an earlier entry names",
                ));
            }
            methods.push((name, std::sync::Arc::clone(&policy)));
        }
    }
    let throttling = match doc.retry_throttling {
        None => None,
        Some(t) => {
            if !(t.max_tokens > 0.0 && t.max_tokens <= 1000.0) {
                return Err(ConfigError::new(
                    "retryThrottling.maxTokens",
                    "must be in (0, 1000]",
                ));
            }
            if !(t.token_ratio > 0.0 && t.token_ratio.is_finite()) {
                return Err(ConfigError::new(
                    "retryThrottling.tokenRatio",
                    "must be above 0",
                ));
            }
            Some(ThrottleParams {
                max_tokens: t.max_tokens,
                token_ratio: t.token_ratio,
            })
        }
    };
    Ok(ServiceConfig {
        methods,
        throttling,
    })
}

fn method_policy(at: &str, mc: &MethodConfigJson) -> Result<MethodPolicy, ConfigError> {
    let _ignored = (
        &mc.wait_for_ready,
        &mc.max_request_message_bytes,
        &mc.max_response_message_bytes,
    );
    let timeout = match &mc.timeout {
        Some(t) => {
            let d = duration(&format!("{at}.timeout"), t)?;
            if d.is_zero() {
                return Err(ConfigError::new(format!("{at}.timeout"), "must be above 0"));
            }
            Some(d)
        }
        None => None,
    };
    let resend = match (&mc.retry_policy, &mc.hedging_policy) {
        (Some(_), Some(_)) => {
            return Err(ConfigError::new(
                at,
                "has both retryPolicy and hedgingPolicy (a method has one or the other)",
            ))
        }
        (Some(r), None) => Some(Resend::Retry(retry(&format!("{at}.retryPolicy"), r)?)),
        (None, Some(h)) => Some(Resend::Hedge(hedging(&format!("{at}.hedgingPolicy"), h)?)),
        (None, None) => None,
    };
    Ok(MethodPolicy { timeout, resend })
}

fn retry(at: &str, r: &RetryJson) -> Result<RetryPolicy, ConfigError> {
    let max_attempts = attempts(at, r.max_attempts)?;
    let initial_backoff = duration(&format!("{at}.initialBackoff"), &r.initial_backoff)?;
    let max_backoff = duration(&format!("{at}.maxBackoff"), &r.max_backoff)?;
    if initial_backoff.is_zero() {
        return Err(ConfigError::new(
            format!("{at}.initialBackoff"),
            "must be above 0",
        ));
    }
    if max_backoff.is_zero() {
        return Err(ConfigError::new(
            format!("{at}.maxBackoff"),
            "must be above 0",
        ));
    }
    if !(r.backoff_multiplier > 0.0 && r.backoff_multiplier.is_finite()) {
        return Err(ConfigError::new(
            format!("{at}.backoffMultiplier"),
            "must be above 0",
        ));
    }
    let retryable = codes(
        &format!("{at}.retryableStatusCodes"),
        &r.retryable_status_codes,
    )?;
    if retryable.is_empty() {
        return Err(ConfigError::new(
            format!("{at}.retryableStatusCodes"),
            "names no status (give at least one, e.g. [\"UNAVAILABLE\"])",
        ));
    }
    Ok(RetryPolicy {
        max_attempts,
        initial_backoff,
        max_backoff,
        backoff_multiplier: r.backoff_multiplier,
        retryable,
    })
}

fn hedging(at: &str, h: &HedgingJson) -> Result<HedgingPolicy, ConfigError> {
    let delay = match &h.hedging_delay {
        Some(d) => duration(&format!("{at}.hedgingDelay"), d)?,
        None => Duration::ZERO,
    };
    Ok(HedgingPolicy {
        max_attempts: attempts(at, h.max_attempts)?,
        delay,
        non_fatal: codes(
            &format!("{at}.nonFatalStatusCodes"),
            &h.non_fatal_status_codes,
        )?,
    })
}

/// `maxAttempts`: above 1; values above 5 count as 5 (A6).
fn attempts(at: &str, n: u32) -> Result<u8, ConfigError> {
    if n < 2 {
        return Err(ConfigError::new(
            format!("{at}.maxAttempts"),
            format!("is {n}: must be at least 2"),
        ));
    }
    Ok(u8::try_from(n.min(u32::from(MAX_POLICY_ATTEMPTS))).unwrap_or(MAX_POLICY_ATTEMPTS))
}

/// A proto JSON duration (`"0.1s"`, `"2s"`).
fn duration(at: &str, text: &str) -> Result<Duration, ConfigError> {
    let d: prost_types::Duration = text.parse().map_err(|_| {
        ConfigError::new(
            at,
            format!("{text:?} is not a duration (seconds with an s: \"0.25s\")"),
        )
    })?;
    Duration::try_from(d).map_err(|_| ConfigError::new(at, format!("{text:?} is negative")))
}

/// Status codes by name (`"UNAVAILABLE"`, any case) or number.
fn codes(at: &str, list: &[Value]) -> Result<CodeSet, ConfigError> {
    let mut set = CodeSet::default();
    for (i, v) in list.iter().enumerate() {
        let code = match v {
            Value::String(s) => CODE_NAMES
                .iter()
                .position(|n| n.eq_ignore_ascii_case(s))
                .and_then(|c| u8::try_from(c).ok()),
            Value::Number(n) => n
                .as_u64()
                .filter(|c| *c < 17)
                .and_then(|c| u8::try_from(c).ok()),
            _ => None,
        };
        match code {
            Some(0) => {
                return Err(ConfigError::new(
                    format!("{at}[{i}]"),
                    "OK is not a failure",
                ));
            }
            Some(c) => set = set.with(c),
            None => {
                return Err(ConfigError::new(
                    format!("{at}[{i}]"),
                    format!("{v} is not a gRPC status (a name such as \"UNAVAILABLE\", or 1-16)"),
                ))
            }
        }
    }
    Ok(set)
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = r#"{
      "methodConfig": [
        {"name": [{"service": "pkg.Svc", "method": "Get"}, {"service": "pkg.Other"}],
         "timeout": "1.5s",
         "retryPolicy": {"maxAttempts": 9, "initialBackoff": "0.1s", "maxBackoff": "1s",
                         "backoffMultiplier": 2, "retryableStatusCodes": ["UNAVAILABLE", 4]}},
        {"name": [{"service": "pkg.Svc", "method": "Put"}],
         "hedgingPolicy": {"maxAttempts": 3, "hedgingDelay": "0.02s",
                           "nonFatalStatusCodes": ["unavailable"]},
         "waitForReady": true}
      ],
      "retryThrottling": {"maxTokens": 10, "tokenRatio": 0.1},
      "loadBalancingConfig": [{"round_robin": {}}]
    }"#;

    #[test]
    fn the_standard_json_is_read() {
        let c = parse(EXAMPLE).unwrap();
        assert_eq!(c.methods.len(), 3);
        let (name, get) = &c.methods[0];
        assert_eq!(name.service.as_deref(), Some("pkg.Svc"));
        assert_eq!(name.method.as_deref(), Some("Get"));
        assert_eq!(get.timeout, Some(Duration::from_millis(1500)));
        let Some(Resend::Retry(r)) = &get.resend else {
            panic!("retry expected")
        };
        assert_eq!(r.max_attempts, 5, "capped at 5");
        assert!(r.retryable.contains(14) && r.retryable.contains(4));
        assert_eq!(c.methods[1].0.method, None);
        let Some(Resend::Hedge(h)) = &c.methods[2].1.resend else {
            panic!("hedge expected")
        };
        assert_eq!(h.delay, Duration::from_millis(20));
        assert!(h.non_fatal.contains(14));
        assert_eq!(c.throttling.unwrap().max_tokens, 10.0);
    }

    #[test]
    fn errors_name_the_field() {
        let cases = [
            (
                r#"{"methodConfig": [{"name": [{"service": "a"}], "timeout": "soon"}]}"#,
                "methodConfig[0].timeout",
            ),
            (
                r#"{"methodConfig": [{"name": [{"service": "a"}], "retryPolicy": {"maxAttempts": 1, "initialBackoff": "1s", "maxBackoff": "1s", "backoffMultiplier": 2, "retryableStatusCodes": [14]}}]}"#,
                "methodConfig[0].retryPolicy.maxAttempts",
            ),
            (
                r#"{"methodConfig": [{"name": [{"service": "a"}], "retryPolicy": {"maxAttempts": 3, "initialBackoff": "1s", "maxBackoff": "1s", "backoffMultiplier": 2, "retryableStatusCodes": ["SOMETIMES"]}}]}"#,
                "methodConfig[0].retryPolicy.retryableStatusCodes[0]",
            ),
            (
                r#"{"methodConfig": [{"name": [{"service": "a"}], "retryPolicy": {"maxAttempts": 3}}]}"#,
                "methodConfig[0].retryPolicy",
            ),
            (
                r#"{"methodConfig": [{"name": [{"service": "a"}], "retrypolicy": {}}]}"#,
                "methodConfig[0].retrypolicy",
            ),
            (
                r#"{"retryThrottling": {"maxTokens": 5000, "tokenRatio": 1}}"#,
                "retryThrottling.maxTokens",
            ),
            (
                r#"{"methodConfig": [{"name": [{"method": "Get"}]}]}"#,
                "methodConfig[0].name[0].method",
            ),
            (
                r#"{"methodConfig": [{"name": [{"service": "a"}], "hedgingPolicy": {"maxAttempts": 2}, "retryPolicy": {"maxAttempts": 2, "initialBackoff": "1s", "maxBackoff": "1s", "backoffMultiplier": 2, "retryableStatusCodes": [14]}}]}"#,
                "methodConfig[0]",
            ),
        ];
        for (text, field) in cases {
            let e = parse(text).unwrap_err();
            assert_eq!(e.field, field, "{text}: {e}");
        }
        assert!(parse("{").unwrap_err().to_string().contains("EOF"));
    }
}
