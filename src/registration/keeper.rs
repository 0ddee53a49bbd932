//! The background task of a [`Registration`](super::Registration): keeps the lease
//! alive, and registers again with a new lease when the old one is lost.

use std::sync::Arc;
use std::time::Duration;

use etcd_client::{Client, PutOptions};
use futures_util::StreamExt;
use tokio::sync::{oneshot, watch};
use tokio::time::Instant;

use super::{Checked, RegistrationError, RegistrationState, Reporter};
use crate::backoff::Backoff;
use crate::etcd::{delete_if_under_lease, timed, RequestError};
use crate::metrics::RegistrationEvent;

/// First pause after a failed etcd request or a lost lease.
const BACKOFF_FIRST: Duration = Duration::from_millis(100);

/// What we know about the key under the current lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KeyState {
    /// Put under the current lease.
    Present,
    /// Not in etcd (or not under the current lease).
    Absent,
    /// A put or delete failed midway: it may or may not have been applied.
    Unknown,
}

/// Why keeping the lease alive stopped.
enum Interrupted {
    /// etcd says the lease is gone.
    LeaseLost,
    /// A request failed or etcd is unreachable; the lease may still be alive.
    Failed(RegistrationError),
}

impl From<RegistrationError> for Interrupted {
    fn from(e: RegistrationError) -> Self {
        Self::Failed(e)
    }
}

/// The keep-alive state machine.
pub(super) struct Keeper {
    client: Client,
    key: Arc<str>,
    /// Until the first lease is granted, for keys it names (go-zero): the key without
    /// its last segment.
    key_base: Option<String>,
    value: String,
    ttl: Duration,
    ttl_secs: i64,
    request_timeout: Duration,
    active: watch::Receiver<bool>,
    state: watch::Sender<RegistrationState>,
    /// Where held keys and events are reported, if anywhere.
    report: Option<Arc<Reporter>>,
    /// The lease we hold (granted and not known to be gone).
    lease: Option<i64>,
    key_state: KeyState,
    /// When the lease expires unless renewed (as far as we know).
    expires_at: Instant,
    /// After a failure, ask etcd whether the lease still exists before using it again.
    check_lease: bool,
    backoff: Backoff,
    /// Since when etcd requests have been failing (for logging once per outage).
    failing_since: Option<Instant>,
}

impl Keeper {
    pub(super) fn new(
        client: Client,
        checked: &Checked,
        active: watch::Receiver<bool>,
        state: watch::Sender<RegistrationState>,
    ) -> Self {
        Self {
            client,
            key: Arc::clone(&checked.key),
            key_base: checked.key_base.clone(),
            value: checked.value.clone(),
            ttl: checked.ttl,
            ttl_secs: checked.ttl_secs,
            request_timeout: checked.request_timeout,
            active,
            state,
            report: checked.report.clone(),
            lease: None,
            key_state: KeyState::Absent,
            expires_at: Instant::now(),
            check_lease: false,
            failing_since: None,
            // At most a third of the TTL (and 1 s): a retry comes well before the lease
            // would expire.
            backoff: Backoff::new(BACKOFF_FIRST, (checked.ttl / 3).min(Duration::from_secs(1))),
        }
    }

    /// The key (named by the first lease for go-zero, so known after
    /// [`register_first`](Self::register_first)).
    pub(super) fn key(&self) -> Arc<str> {
        Arc::clone(&self.key)
    }

    /// The first registration, done before [`Registration::start`](super::Registration::start)
    /// returns; on failure the lease (if granted) is revoked.
    pub(super) async fn register_first(&mut self) -> Result<(), RegistrationError> {
        let lease = self.grant().await?;
        if let Err(e) = self.sync_key(lease).await {
            let mut c = self.client.clone();
            let _ = timed("lease revoke", self.request_timeout, c.lease_revoke(lease)).await;
            return Err(e);
        }
        Ok(())
    }

    /// Keeps the registration until `stop` fires (or its sender is dropped); returns the
    /// lease held at that point, for deregistration.
    pub(super) async fn run(mut self, mut stop: oneshot::Receiver<()>) -> Option<i64> {
        tokio::select! {
            biased;
            _ = &mut stop => {}
            () = self.keep() => {}
        }
        self.state.send_replace(RegistrationState::Stopped);
        self.report(|r| r.held(false));
        self.lease
    }

    async fn keep(&mut self) {
        loop {
            match self.keep_alive().await {
                Interrupted::LeaseLost => {
                    tracing::warn!(
                        key = %self.key,
                        lease = self.lease.unwrap_or_default(),
                        "lease lost (expired or revoked); granting a new one and registering again"
                    );
                    self.report(|r| r.event(RegistrationEvent::LeaseLost));
                    self.lease = None;
                    self.key_state = KeyState::Absent;
                    self.check_lease = false;
                    self.publish();
                    // Short at first (the backoff was reset when the lease was last kept
                    // alive), longer if etcd keeps losing new leases.
                    self.backoff.sleep().await;
                }
                Interrupted::Failed(e) => {
                    self.check_lease = true;
                    self.publish();
                    let delay = self.backoff.next_delay();
                    let retry_in_ms = delay.as_millis() as u64;
                    let lease = self.lease.unwrap_or_default();
                    if self.failing_since.is_none() {
                        self.failing_since = Some(Instant::now());
                        tracing::warn!(key = %self.key, lease, error = %e, retry_in_ms, "registration: etcd request failed; retrying");
                    } else {
                        tracing::debug!(key = %self.key, lease, error = %e, retry_in_ms, "registration: etcd request failed again; retrying");
                    }
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }

    /// Gets a lease and the key in place, then renews the lease every TTL/3 until
    /// something goes wrong.
    async fn keep_alive(&mut self) -> Interrupted {
        match self.keep_alive_inner().await {
            Ok(never) => match never {},
            Err(i) => i,
        }
    }

    async fn keep_alive_inner(&mut self) -> Result<std::convert::Infallible, Interrupted> {
        let lease = match self.lease {
            Some(lease) if self.check_lease => {
                let resp = timed(
                    "lease time-to-live",
                    self.request_timeout,
                    self.client.lease_time_to_live(lease, None),
                )
                .await
                .map_err(RegistrationError::etcd(&self.key))?;
                // etcd answers -1 for a lease it does not know.
                if resp.ttl() < 0 {
                    return Err(Interrupted::LeaseLost);
                }
                self.check_lease = false;
                lease
            }
            Some(lease) => lease,
            None => self.grant().await?,
        };
        self.sync_key(lease).await?;

        let opened = Instant::now();
        let (mut keeper, mut responses) = timed(
            "lease keep-alive",
            self.request_timeout,
            self.client.lease_keep_alive(lease),
        )
        .await
        .map_err(RegistrationError::etcd(&self.key))?;
        // The opening request renewed the lease.
        self.expires_at = opened + self.ttl;
        self.backoff.reset();
        if let Some(since) = self.failing_since.take() {
            tracing::info!(
                key = %self.key,
                lease,
                failing_for_ms = since.elapsed().as_millis() as u64,
                "registration: etcd reachable again; lease kept alive"
            );
        }
        self.publish();

        let period = self.ttl / 3;
        // An unanswered renewal older than this means the connection is not working.
        let answer_within = self.request_timeout.min(period * 2);
        let mut tick = tokio::time::interval_at(Instant::now() + period, period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut sent: Option<Instant> = None;
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    self.publish();
                    match sent {
                        Some(at) if at.elapsed() >= answer_within => {
                            let timed_out = RequestError::TimedOut {
                                op: "lease keep-alive",
                                after: at.elapsed(),
                            };
                            return Err(RegistrationError::etcd(&self.key)(timed_out).into());
                        }
                        Some(_) => {}
                        None => {
                            keeper.keep_alive().await.map_err(|source| self.etcd_error("lease keep-alive", source))?;
                            sent = Some(Instant::now());
                        }
                    }
                }
                response = responses.next() => match response {
                    Some(Ok(r)) if r.ttl() <= 0 => return Err(Interrupted::LeaseLost),
                    Some(Ok(r)) => {
                        let at = sent.take().unwrap_or_else(Instant::now);
                        self.expires_at = at + Duration::from_secs(r.ttl().unsigned_abs());
                        self.publish();
                    }
                    Some(Err(source)) => return Err(self.etcd_error("lease keep-alive", source).into()),
                    None => {
                        return Err(RegistrationError::StreamClosed { key: self.key.to_string() }.into());
                    }
                },
                Ok(()) = self.active.changed() => {
                    self.sync_key(lease).await?;
                }
            }
        }
    }

    fn etcd_error(&self, op: &'static str, source: etcd_client::Error) -> RegistrationError {
        RegistrationError::etcd(&self.key)(RequestError::Failed { op, source })
    }

    /// Grants a new lease and makes it the current one.
    async fn grant(&mut self) -> Result<i64, RegistrationError> {
        let asked = Instant::now();
        let resp = timed(
            "lease grant",
            self.request_timeout,
            self.client.lease_grant(self.ttl_secs, None),
        )
        .await
        .map_err(RegistrationError::etcd(&self.key))?;
        // A key named by the lease keeps the first lease's name for good, as a go-zero
        // publisher with an ID does: one key per registration however often the lease
        // is lost.
        if let Some(base) = self.key_base.take() {
            self.key = format!("{base}{}", resp.id()).into();
        }
        self.lease = Some(resp.id());
        self.key_state = KeyState::Absent;
        self.check_lease = false;
        self.expires_at = asked + Duration::from_secs(resp.ttl().unsigned_abs());
        Ok(resp.id())
    }

    /// Puts or deletes the key so that it matches what is wanted (`set_active`).
    async fn sync_key(&mut self, lease: i64) -> Result<(), RegistrationError> {
        let want = *self.active.borrow_and_update();
        if want && self.key_state != KeyState::Present {
            self.key_state = KeyState::Unknown;
            timed(
                "put",
                self.request_timeout,
                self.client.put(
                    &*self.key,
                    self.value.as_str(),
                    Some(PutOptions::new().with_lease(lease)),
                ),
            )
            .await
            .map_err(RegistrationError::etcd(&self.key))?;
            self.key_state = KeyState::Present;
            self.report(|r| r.event(RegistrationEvent::Registered));
            tracing::debug!(key = %self.key, lease, "key put");
        } else if !want && self.key_state != KeyState::Absent {
            self.key_state = KeyState::Unknown;
            delete_if_under_lease(&mut self.client, &self.key, lease, self.request_timeout)
                .await
                .map_err(RegistrationError::etcd(&self.key))?;
            self.key_state = KeyState::Absent;
            tracing::info!(key = %self.key, lease, "key deleted (registration paused)");
        }
        self.publish();
        Ok(())
    }

    /// Calls `f` with the reporter, if there is one.
    fn report(&self, f: impl FnOnce(&Reporter)) {
        if let Some(r) = &self.report {
            f(r);
        }
    }

    /// Publishes the current state (only when it changes).
    fn publish(&self) {
        let want = *self.active.borrow();
        let new = match self.lease {
            None => RegistrationState::Pending,
            Some(_) if Instant::now() >= self.expires_at => RegistrationState::Pending,
            Some(lease) if want && self.key_state == KeyState::Present => {
                RegistrationState::Registered { lease }
            }
            Some(_) if !want && self.key_state == KeyState::Absent => RegistrationState::Paused,
            Some(_) => RegistrationState::Pending,
        };
        self.state.send_if_modified(|s| {
            if *s == new {
                false
            } else {
                match (*s, new) {
                    (_, RegistrationState::Registered { lease }) => {
                        tracing::info!(key = %self.key, lease, ttl_s = self.ttl_secs, "registered");
                    }
                    (RegistrationState::Registered { lease }, RegistrationState::Pending)
                        if self.lease.is_some() =>
                    {
                        tracing::warn!(key = %self.key, lease, "etcd unreachable past the lease TTL: the key has likely expired; registering again once etcd answers");
                    }
                    (from, to) => {
                        tracing::debug!(key = %self.key, ?from, ?to, "registration state");
                    }
                }
                *s = new;
                true
            }
        });
        self.report(|r| r.held(new.is_registered()));
    }
}
