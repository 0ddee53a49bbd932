//! switchyard: a per-host gRPC load-balancing proxy that finds its backends in etcd.
//!
//! Where things are:
//! - [`proxy`]: where a call enters (the h2c listener, [`proxy::conn`]), how its service
//!   is chosen ([`route`]), and how it is forwarded ([`proxy::forward`], frames moved by
//!   [`proxy::relay`]).
//! - [`discovery`]: one watched endpoint set per service, from an endpoint source (etcd's,
//!   or an in-memory one for tests and benchmarks), published as immutable snapshots
//!   ([`balance::EndpointSet`]).
//! - [`registry`]: registry formats: what an etcd key and its value say about backends
//!   (one codec per format, shared by discovery, `register` and `endpoints`).
//! - [`balance`]: how a backend is picked: the service's policy (round-robin,
//!   least-request, peak-EWMA) over its snapshot, through one seam
//!   ([`balance::Balancer::select_with`]); each policy keeps its own state of an endpoint.
//! - [`call`]: a call's end, reported once (one guard per attempt a backend took) to the
//!   backend's policy state, its health and the metrics.
//! - [`health`]: one health state per endpoint (passive ejection with its cap, active
//!   gRPC checks) that every policy reads.
//! - [`endpoint`]: what a backend is (address, weight, registry metadata).
//! - [`upstream`]: where a call leaves: one pool of multiplexed HTTP/2 connections per
//!   backend address, shared by every service naming it, grown at the backend's stream limit.
//! - [`registration`]: the other half of the pattern: leased keys kept alive.
//! - [`service_config`]: gRPC service configs (per-method timeouts, retries, hedging,
//!   throttling), applied per call by [`proxy::resend`].
//! - [`settings`]: every setting declared once (flag, environment variable, config file
//!   key, default), layered flag > environment > file > default.
//! - [`observe`]: the access log and OpenTelemetry traces of every call.
//! - [`status`]: gRPC errors produced by the proxy itself.
//! - [`backoff`]: the delays between retries, for every loop that waits on etcd or a backend.
//! - [`etcd`]: the etcd client, timed requests, and the lease-guarded delete.
//! - `demo`, `testkit` and `echo` (cargo feature `demo`, on for the tests and benchmarks):
//!   the example Echo backend and client and local etcd processes, for the demo, the tests
//!   and the benchmarks; not part of the proxy's own builds.
#![forbid(unsafe_code)]
#![warn(missing_docs)]
// Items only the crate uses say so (`pub(crate)`): what is `pub` is the library's API.
#![warn(unreachable_pub)]

pub mod admin;
pub mod backoff;
pub mod balance;
pub mod call;
pub mod clock;
#[cfg(feature = "demo")]
pub mod demo;
pub mod discovery;
pub mod endpoint;
pub mod etcd;
pub mod health;
pub mod metrics;
pub mod observe;
pub mod proxy;
pub mod registration;
pub mod registry;
pub mod route;
pub mod service_config;
pub mod settings;
pub mod status;
pub mod stream;
#[cfg(feature = "demo")]
pub mod testkit;
pub mod tls;
pub mod upstream;

/// Generated code for the example `Echo` service used by demos, tests and benchmarks.
#[cfg(feature = "demo")]
pub mod echo {
    #![allow(missing_docs, clippy::all)]
    tonic::include_proto!("switchyard.echo.v1");
    /// The encoded descriptors of `proto/echo.proto`, for server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("echo_descriptor");
}
