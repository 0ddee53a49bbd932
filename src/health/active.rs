//! Active health checks: the proxy watches each endpoint's `grpc.health.v1.Health` for
//! the endpoint's service (Watch; Check every interval where Watch is unimplemented), or
//! connects to it over TCP every interval, and takes it out of rotation while it answers
//! NOT_SERVING or does not answer.

use std::sync::{Arc, Weak};
use std::time::Duration;

use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

use super::{ActiveCheck, CheckState, Member, ServiceHealth};
use crate::endpoint::BackendAddr;
use crate::upstream::BackendChannel;

/// Starts checking `ep` (at `addr`, for `service`) until it is dropped or `checks`
/// moves on to another generation (the checks were restarted or turned off).
pub(super) fn spawn(
    service_health: Arc<ServiceHealth>,
    ep: Weak<dyn Member>,
    addr: &BackendAddr,
    mut checks: tokio::sync::watch::Receiver<u64>,
) {
    let generation = *checks.borrow_and_update();
    let checker = Checker {
        service_health,
        ep,
        addr: addr.clone(),
        last: CheckState::Unknown,
        generation,
    };
    tokio::spawn(async move {
        tokio::select! {
            () = checker.run() => {}
            _ = checks.wait_for(|g| *g != generation) => {}
        }
    });
}

/// The check of one endpoint.
struct Checker {
    service_health: Arc<ServiceHealth>,
    ep: Weak<dyn Member>,
    addr: BackendAddr,
    last: CheckState,
    /// The generation of checks it belongs to.
    generation: u64,
}

impl Checker {
    async fn run(mut self) {
        let interval = self.service_health.settings().check_interval;
        if self.service_health.settings().check == ActiveCheck::Tcp {
            while self.ep.strong_count() > 0 {
                let state = match tcp_probe(&self.addr, interval).await {
                    Ok(()) => CheckState::Serving,
                    Err(reason) => {
                        tracing::debug!(backend = %self.addr, %reason, "tcp health check failed");
                        CheckState::NotServing
                    }
                };
                self.apply(state);
                tokio::time::sleep(interval).await;
            }
            return;
        }
        // On the endpoint's pooled connections, with their TLS and settings: a check is
        // one more stream on them (and keeps them from closing for idleness).
        let Some(upstream) = self.ep.upgrade().and_then(|ep| ep.upstream()) else {
            tracing::debug!(backend = %self.addr, "endpoint without connections: not checked");
            return;
        };
        let mut client = HealthClient::new(BackendChannel::new(upstream));
        let mut watch = true;
        while self.ep.strong_count() > 0 {
            if watch {
                watch = self.watch(&mut client, interval).await;
            } else {
                let answer = tokio::time::timeout(interval, client.check(self.request())).await;
                let state = match answer {
                    Ok(Ok(r)) => state_of(r.into_inner().status),
                    _ => CheckState::NotServing,
                };
                self.apply(state);
                tokio::time::sleep(interval).await;
            }
        }
    }

    fn request(&self) -> HealthCheckRequest {
        HealthCheckRequest {
            service: self.service_health.name().to_owned(),
        }
    }

    /// Follows the endpoint's Watch until it ends; returns false if the backend does
    /// not implement Watch (then Check is polled instead).
    async fn watch(
        &mut self,
        client: &mut HealthClient<BackendChannel>,
        interval: Duration,
    ) -> bool {
        let stream = match tokio::time::timeout(interval, client.watch(self.request())).await {
            Ok(Ok(r)) => r.into_inner(),
            Ok(Err(s)) if s.code() == tonic::Code::Unimplemented => return false,
            _ => {
                self.apply(CheckState::NotServing);
                tokio::time::sleep(interval).await;
                return true;
            }
        };
        tokio::pin!(stream);
        loop {
            tokio::select! {
                m = stream.message() => match m {
                    Ok(Some(m)) => self.apply(state_of(m.status)),
                    // The watch ended or broke: no answer until it is back.
                    _ => {
                        self.apply(CheckState::NotServing);
                        tokio::time::sleep(interval).await;
                        return true;
                    }
                },
                // Re-asserted now and then: a node the cap kept in rotation is taken out
                // once others are back.
                _ = tokio::time::sleep(interval) => {
                    if self.ep.strong_count() == 0 {
                        return true;
                    }
                    let last = self.last;
                    self.apply(last);
                }
            }
        }
    }

    /// Records what the check said; logs changes.
    fn apply(&mut self, state: CheckState) {
        let Some(ep) = self.ep.upgrade() else { return };
        let out = self
            .service_health
            .checked_by(self.generation, ep.health(), state);
        if state != self.last {
            let service = self.service_health.name();
            match state {
                CheckState::Serving => {
                    tracing::info!(service, backend = %self.addr, "health check: SERVING; endpoint in rotation")
                }
                _ if out => {
                    tracing::info!(service, backend = %self.addr, "health check: not serving; endpoint out of rotation")
                }
                _ => {
                    tracing::warn!(service, backend = %self.addr, "health check: not serving, but the cap keeps the endpoint in rotation")
                }
            }
            self.last = state;
        }
    }
}

fn state_of(status: i32) -> CheckState {
    if status == ServingStatus::Serving as i32 {
        CheckState::Serving
    } else {
        CheckState::NotServing
    }
}

/// One TCP health probe of `addr`: `Err` says why the connect failed (the proxy's
/// `--health-check tcp` and the sidecar's gate share it).
pub async fn tcp_probe(addr: &BackendAddr, timeout: Duration) -> Result<(), String> {
    let target = (addr.host(), addr.port());
    match tokio::time::timeout(timeout, tokio::net::TcpStream::connect(target)).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(format!("tcp connect: {e}")),
        Err(_) => Err(format!("tcp connect: no answer within {timeout:?}")),
    }
}
