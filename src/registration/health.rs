//! The sidecar's health gate: polls the backend (gRPC health, TCP connect, or nothing)
//! and reports when it turns healthy or unhealthy, after a number of consecutive
//! results in the new direction, so that one slow probe does not flap the registration.

use std::time::Duration;

use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

use crate::endpoint::BackendAddr;
use crate::health::{tcp_probe, ActiveCheck};

/// Settings of the health gate.
#[derive(Debug, Clone)]
pub struct HealthGateConfig {
    /// What to check.
    pub kind: ActiveCheck,
    /// The backend.
    pub addr: BackendAddr,
    /// The service name asked about in gRPC checks (`""`: the whole server).
    pub service: String,
    /// Time between probes.
    pub interval: Duration,
    /// Time allowed for one probe.
    pub timeout: Duration,
    /// Consecutive failed probes that make a healthy backend unhealthy.
    pub unhealthy_after: u32,
    /// Consecutive passed probes that make an unhealthy backend healthy.
    pub healthy_after: u32,
}

/// Why a health gate could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum HealthGateError {
    /// The backend address does not make a gRPC endpoint.
    #[error("health check endpoint for {addr}: {source}")]
    Endpoint {
        /// The backend address.
        addr: String,
        /// What tonic said.
        #[source]
        source: tonic::transport::Error,
    },
}

/// Polls a backend's health; starts unhealthy.
#[derive(Debug)]
pub struct HealthGate {
    config: HealthGateConfig,
    grpc: Option<HealthClient<Channel>>,
    healthy: bool,
    /// Consecutive probe results disagreeing with `healthy`.
    streak: u32,
    first: bool,
}

impl HealthGate {
    /// A gate for `config` (connections are made lazily, at the first probe).
    pub fn new(config: HealthGateConfig) -> Result<Self, HealthGateError> {
        let grpc = match config.kind {
            ActiveCheck::Grpc => {
                let channel = Endpoint::from_shared(format!("http://{}", config.addr))
                    .map_err(|source| HealthGateError::Endpoint {
                        addr: config.addr.to_string(),
                        source,
                    })?
                    .connect_timeout(config.timeout)
                    .timeout(config.timeout)
                    .connect_lazy();
                Some(HealthClient::new(channel))
            }
            ActiveCheck::Tcp | ActiveCheck::None => None,
        };
        Ok(Self {
            config,
            grpc,
            healthy: false,
            streak: 0,
            first: true,
        })
    }

    /// Probes every interval until the backend's health changes; returns the new value.
    /// With [`ActiveCheck::None`] the first call returns `true` and later calls never
    /// return.
    pub async fn changed(&mut self) -> bool {
        if self.config.kind == ActiveCheck::None {
            if self.healthy {
                std::future::pending::<()>().await;
            }
            self.healthy = true;
            return true;
        }
        loop {
            if !std::mem::take(&mut self.first) {
                tokio::time::sleep(self.config.interval).await;
            }
            let result = self.probe().await;
            if let Err(reason) = &result {
                tracing::debug!(addr = %self.config.addr, %reason, "health probe failed");
            }
            let passed = result.is_ok();
            if passed == self.healthy {
                self.streak = 0;
                continue;
            }
            self.streak += 1;
            let needed = if self.healthy {
                self.config.unhealthy_after
            } else {
                self.config.healthy_after
            };
            if self.streak >= needed.max(1) {
                self.streak = 0;
                self.healthy = passed;
                match result {
                    Ok(()) => tracing::info!(addr = %self.config.addr, "backend is healthy"),
                    Err(reason) => {
                        tracing::warn!(addr = %self.config.addr, %reason, "backend is unhealthy")
                    }
                }
                return passed;
            }
        }
    }

    /// One probe: `Err` says why it failed.
    async fn probe(&mut self) -> Result<(), String> {
        let timeout = self.config.timeout;
        match self.config.kind {
            ActiveCheck::None => Ok(()),
            ActiveCheck::Tcp => tcp_probe(&self.config.addr, timeout).await,
            ActiveCheck::Grpc => {
                let Some(client) = self.grpc.as_mut() else {
                    return Err("no gRPC health client".to_owned());
                };
                let request = HealthCheckRequest {
                    service: self.config.service.clone(),
                };
                match tokio::time::timeout(timeout, client.check(request)).await {
                    Ok(Ok(resp)) => match resp.into_inner().status() {
                        ServingStatus::Serving => Ok(()),
                        other => Err(format!("health status {}", other.as_str_name())),
                    },
                    Ok(Err(status)) => Err(format!(
                        "health check: {:?}: {}",
                        status.code(),
                        status.message()
                    )),
                    Err(_) => Err(format!("health check: no answer within {timeout:?}")),
                }
            }
        }
    }
}
