//! The integration tests, as one test binary: each module was its own binary before, and
//! each linked tonic, etcd-client and h2 again (most of the test build's time on 2 cores).
//! A new test file is a module here. Run one area with a filter, e.g.
//! `cargo test --all-features --test it proxy::`.

mod common;
mod faults;

mod admin;
mod bad_input;
mod balance;
mod config;
mod ejection;
mod hardening;
mod local;
mod observe;
mod proxy;
mod refused;
mod registration;
mod registries;
mod reload;
mod resilience;
mod restart;
mod service_config;
mod sidecar_admin;
mod tls;
mod upstream;
mod zones;
