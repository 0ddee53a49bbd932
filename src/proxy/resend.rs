//! Calls sent again by their method's service config (gRFC A6): retries, one attempt
//! after another on the statuses the policy names, and hedging, attempts sent a delay
//! apart with the first answer winning; both bounded by the service's retry throttle,
//! the call's deadline and whether its request is still buffered.
//!
//! An attempt is committed, and never sent again, once its response headers carry a
//! response (a trailers-only answer ends the attempt and can be retried): what reaches
//! the client is always one backend's whole answer. Calls of methods without a policy
//! never come here: they are only sent again when a backend never took them
//! ([`super::forward`]).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::stream::{FuturesUnordered, StreamExt};
use http::request::Parts;
use http::{HeaderValue, Response};

use super::error::CallError;
use super::forward::{Forwarded, Forwarder};
use super::grpc::{timeout_value, GRPC_TIMEOUT, PREVIOUS_ATTEMPTS, RETRY_PUSHBACK};
use super::replay::ReplayBody;
use crate::balance::Backend;
use crate::call::{BackendCall, Outcome};
use crate::discovery::Service;
use crate::endpoint::BackendAddr;
use crate::metrics::AttemptKind;
use crate::observe::CallObs;
use crate::service_config::{HedgingPolicy, Resend, RetryPolicy, Throttle, MAX_POLICY_ATTEMPTS};
use crate::status::GRPC_STATUS;

/// What one attempt came to.
pub(super) enum Sent {
    /// The backend answered with response headers (its request body, if still
    /// replayable, comes back for another attempt).
    Answered(Response<h2::RecvStream>, BackendCall, Option<ReplayBody>),
    /// The backend's stream failed after it may have processed the call.
    Failed {
        /// The backend.
        backend: BackendAddr,
        /// How the stream failed.
        error: h2::Error,
        /// The request body, if still replayable.
        replay: Option<ReplayBody>,
    },
}

/// Most endpoints one call remembers having tried.
const AVOID_SLOTS: usize = 8;

/// The endpoints a call's earlier attempts went to, which later attempts avoid while
/// another endpoint is usable. Shared by a call's concurrent hedges (atomics, no lock);
/// the default one, for calls without a policy, records nothing.
#[derive(Debug, Default)]
pub(super) struct Avoid {
    on: bool,
    len: AtomicUsize,
    slots: [AtomicUsize; AVOID_SLOTS],
}

/// The [`Avoid`] of calls without a policy: records nothing. A static, so that a call's
/// future does not hold one across its attempt.
pub(super) static NO_AVOID: Avoid = Avoid {
    on: false,
    len: AtomicUsize::new(0),
    slots: [const { AtomicUsize::new(0) }; AVOID_SLOTS],
};

impl Avoid {
    fn tracking() -> Self {
        Self {
            on: true,
            ..Self::default()
        }
    }

    /// Whether nothing is to be avoided.
    #[inline]
    pub(super) fn is_empty(&self) -> bool {
        !self.on || self.len.load(Ordering::Relaxed) == 0
    }

    /// Notes that an attempt went to `backend`.
    #[inline]
    pub(super) fn add(&self, backend: &Arc<Backend>) {
        if !self.on {
            return;
        }
        let id = Arc::as_ptr(backend) as usize;
        if self.holds(Some(backend)) {
            return;
        }
        let n = self.len.fetch_add(1, Ordering::Relaxed);
        if let Some(slot) = self.slots.get(n) {
            slot.store(id, Ordering::Relaxed);
        }
    }

    /// Whether an earlier attempt went to `backend`.
    pub(super) fn holds(&self, backend: Option<&Arc<Backend>>) -> bool {
        let Some(b) = backend else { return false };
        let id = Arc::as_ptr(b) as usize;
        let n = self.len.load(Ordering::Relaxed).min(AVOID_SLOTS);
        self.slots[..n]
            .iter()
            .any(|s| s.load(Ordering::Relaxed) == id)
    }
}

/// The status of a trailers-only answer (its headers end the stream), if it is one.
fn trailers_only_status(resp: &Response<h2::RecvStream>) -> Option<u8> {
    if !resp.body().is_end_stream() {
        return None;
    }
    let v = resp.headers().get(&GRPC_STATUS)?;
    std::str::from_utf8(v.as_bytes()).ok()?.parse().ok()
}

/// What a server's `grpc-retry-pushback-ms` says: `None` (absent), wait this long, or
/// do not retry (`Some(None)`: a negative or unreadable value).
fn pushback(resp: &Response<h2::RecvStream>) -> Option<Option<Duration>> {
    let v = resp.headers().get(&RETRY_PUSHBACK)?;
    let ms: Option<u64> = std::str::from_utf8(v.as_bytes())
        .ok()
        .and_then(|t| t.trim().parse().ok());
    Some(ms.map(Duration::from_millis))
}

/// How one call is sent under its policy.
pub(super) struct Resender<'a> {
    pub(super) forwarder: &'a Forwarder,
    pub(super) service: &'a Service,
    pub(super) parts: &'a Parts,
    pub(super) throttle: Option<&'a Throttle>,
    pub(super) deadline: Option<tokio::time::Instant>,
}

/// An attempt that ended with a status the policy treats as a failure: it is reported
/// to its backend's health and policy as that status, then dropped.
fn end_attempt(mut call: BackendCall, status: u8) {
    call.set_outcome(Outcome::Status(status));
}

impl Resender<'_> {
    /// Sends the call as `resend` says.
    pub(super) async fn run(
        self,
        resend: &Resend,
        body: ReplayBody,
        obs: &mut Option<Box<CallObs>>,
    ) -> Forwarded {
        let metrics = self.service.metrics();
        metrics.attempt(AttemptKind::FirstTry);
        match resend {
            Resend::Retry(r) => self.retry(r, body, obs).await,
            Resend::Hedge(h) => self.hedge(h, body, obs).await,
        }
    }

    /// The request head of attempt `n` (0 for the first): later attempts say how many
    /// came before, and carry the deadline that is left.
    fn head(&self, n: u8) -> std::borrow::Cow<'_, Parts> {
        if n == 0 {
            return std::borrow::Cow::Borrowed(self.parts);
        }
        let mut parts = self.parts.clone();
        parts
            .headers
            .insert(&PREVIOUS_ATTEMPTS, HeaderValue::from(u16::from(n)));
        if let Some(d) = self.deadline {
            let left = d.saturating_duration_since(tokio::time::Instant::now());
            parts.headers.insert(&GRPC_TIMEOUT, timeout_value(left));
        }
        std::borrow::Cow::Owned(parts)
    }

    fn throttled(&self) -> bool {
        self.throttle.is_some_and(|t| !t.allows())
    }

    /// The answer as the client gets it, committing the call to it.
    fn commit(&self, sent: Sent) -> Forwarded {
        match sent {
            Sent::Answered(resp, call, replay) => {
                if let Some(b) = replay {
                    b.commit();
                }
                Ok((resp, call))
            }
            Sent::Failed { backend, error, .. } => Err(CallError::BackendFailed {
                service: self.service.name().clone(),
                backend,
                error,
            }),
        }
    }

    /// Retries: one attempt at a time, again while the status is retryable and the
    /// attempts, the throttle, the buffer and the deadline allow.
    async fn retry(
        &self,
        policy: &RetryPolicy,
        mut body: ReplayBody,
        obs: &mut Option<Box<CallObs>>,
    ) -> Forwarded {
        let avoid = Avoid::tracking();
        let metrics = self.service.metrics();
        let mut n: u8 = 0;
        loop {
            let head = self.head(n);
            let sent = self
                .forwarder
                .send(self.service, &head, body, &avoid, obs)
                .await?;
            n += 1;
            // A stream broken before an answer reads as UNAVAILABLE, as clients see it.
            let (status, replay, wait) = match &sent {
                Sent::Answered(resp, _, replay) => {
                    (trailers_only_status(resp), replay, pushback(resp))
                }
                Sent::Failed { replay, .. } => (Some(14), replay, None),
            };
            let retryable = status.is_some_and(|s| policy.retryable.contains(s));
            if let Some(t) = self.throttle {
                if retryable || wait == Some(None) {
                    t.failed();
                } else {
                    t.succeeded();
                }
            }
            if !retryable || n >= policy.max_attempts.min(MAX_POLICY_ATTEMPTS) {
                return self.commit(sent);
            }
            let delay = match wait {
                Some(Some(d)) => d,
                // The server says not to retry.
                Some(None) => return self.commit(sent),
                None => {
                    let ceiling = policy.ceiling(u32::from(n));
                    Duration::from_secs_f64(ceiling.as_secs_f64() * fastrand::f64())
                }
            };
            if self.throttled() {
                metrics.attempt(AttemptKind::Throttled);
                return self.commit(sent);
            }
            let Some(next) = replay.as_ref().and_then(ReplayBody::try_clone) else {
                metrics.attempt(AttemptKind::Committed);
                return self.commit(sent);
            };
            if self
                .deadline
                .is_some_and(|d| tokio::time::Instant::now() + delay >= d)
            {
                return self.commit(sent);
            }
            match sent {
                Sent::Answered(_, call, _) => end_attempt(call, status.unwrap_or(14)),
                Sent::Failed { .. } => {}
            }
            tracing::debug!(service = %self.service.name(), attempt = n + 1, delay_ms = delay.as_millis() as u64, "retrying the call");
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            metrics.attempt(AttemptKind::Retried);
            body = next;
        }
    }

    /// Hedging: attempts sent `delay` apart (at once after a non-fatal status) to
    /// distinct endpoints while none has answered; the first answer that is not a
    /// non-fatal status wins, and the others are cancelled (dropping their streams
    /// resets them with CANCEL).
    async fn hedge(
        &self,
        policy: &HedgingPolicy,
        body: ReplayBody,
        obs: &mut Option<Box<CallObs>>,
    ) -> Forwarded {
        let avoid = Avoid::tracking();
        let metrics = self.service.metrics();
        let max = policy.max_attempts.min(MAX_POLICY_ATTEMPTS);
        let heads: Vec<_> = (0..max).map(|n| self.head(n)).collect();
        let mut pending = FuturesUnordered::new();
        let spare = body;
        let mut sent_n: u8 = 0;
        // The latest non-fatal answer (and its status), which stands if no other comes.
        let mut last: Option<(Forwarded, u8)> = None;
        let mut next_at = tokio::time::Instant::now();
        let result = loop {
            // Send the next hedge when it is due.
            if sent_n < max && tokio::time::Instant::now() >= next_at {
                // Every attempt replays from the start: a view of a body past the buffer
                // (committed) is never sent.
                let body = spare.try_clone();
                let allowed = sent_n == 0 || !self.throttled();
                match body {
                    Some(b) if allowed => {
                        let head = &heads[usize::from(sent_n)];
                        let avoid = &avoid;
                        // The call's record and span note the winning attempt only.
                        pending.push(Box::pin(async move {
                            self.forwarder
                                .send(self.service, head, b, avoid, &mut None)
                                .await
                        }));
                        if sent_n > 0 {
                            metrics.attempt(AttemptKind::Hedged);
                        }
                        sent_n += 1;
                        next_at = tokio::time::Instant::now() + policy.delay;
                    }
                    Some(_) => {
                        metrics.attempt(AttemptKind::Throttled);
                        sent_n = max;
                    }
                    None => {
                        metrics.attempt(AttemptKind::Committed);
                        sent_n = max;
                    }
                }
                continue;
            }
            if pending.is_empty() {
                break last.map_or_else(
                    || Err(CallError::NoEndpoints(self.service.name().clone())),
                    |(r, _)| r,
                );
            }
            let done = if sent_n < max {
                tokio::select! {
                    d = pending.next() => d,
                    _ = tokio::time::sleep_until(next_at) => continue,
                }
            } else {
                pending.next().await
            };
            let Some(r) = done else { continue };
            let sent = match r {
                Ok(s) => s,
                Err(e) => {
                    if last.is_none() {
                        last = Some((Err(e), 14));
                    }
                    next_at = tokio::time::Instant::now();
                    continue;
                }
            };
            let status = match &sent {
                Sent::Answered(resp, _, _) => trailers_only_status(resp),
                Sent::Failed { .. } => Some(14),
            };
            let non_fatal = status.is_some_and(|s| policy.non_fatal.contains(s));
            if let Some(t) = self.throttle {
                if non_fatal {
                    t.failed();
                } else {
                    t.succeeded();
                }
            }
            if !non_fatal {
                break self.commit(sent);
            }
            // A non-fatal status: the next hedge goes now; this answer stands if no
            // other comes.
            let status = status.unwrap_or(14);
            let answer = match sent {
                Sent::Answered(resp, call, _) => Ok((resp, call)),
                failed @ Sent::Failed { .. } => self.commit(failed),
            };
            if let Some((Ok((_, call)), st)) = last.replace((answer, status)) {
                end_attempt(call, st);
            }
            next_at = tokio::time::Instant::now();
        };
        // The losers' streams are reset as their futures drop.
        drop(pending);
        if let (Some(o), Ok((_, call))) = (obs.as_mut(), &result) {
            o.attempt(call.backend().addr());
        }
        result
    }
}
