//! gRPC service config in the proxy (gRFC A6): per-method timeouts, retry and hedging
//! policies, and retry throttling, from the standard JSON.
//!
//! - [`json`]: the document, read and checked (errors name the field).
//! - [`policy`]: what a method's entry makes of its calls, as the call path reads it.
//! - [`throttle`]: the per-service token bucket.
//! - [`table`]: the documents in force, merged from `--service-config` files and
//!   `--service-config-prefix` keys in etcd, looked up per call.
//! - [`source`]: loading the files, and the etcd watch.
//!
//! The call path that applies them is [`crate::proxy::resend`].

pub mod json;
pub mod policy;
pub mod source;
pub mod table;
pub mod throttle;

pub use json::{parse, ConfigError, MethodName, ServiceConfig};
pub use policy::{
    CodeSet, HedgingPolicy, MethodPolicy, Resend, RetryPolicy, ThrottleParams, MAX_POLICY_ATTEMPTS,
};
pub use table::{CallPolicy, LivePolicies};
pub use throttle::Throttle;
