//! What a method's service config makes of its calls, in the form the call path reads:
//! a timeout, and a retry or a hedging policy (gRFC A6), with the service's throttle.

use std::time::Duration;

/// Most attempts of one call that a policy may ask for (A6: larger values count as 5).
pub const MAX_POLICY_ATTEMPTS: u8 = 5;

/// A set of gRPC status codes (0–16), one bit each.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CodeSet(u32);

impl CodeSet {
    /// The set with `code` added.
    pub const fn with(self, code: u8) -> Self {
        if code < 17 {
            Self(self.0 | (1 << code))
        } else {
            self
        }
    }

    /// Whether status `code` is in the set.
    #[inline]
    pub fn contains(self, code: u8) -> bool {
        code < 17 && self.0 & (1 << code) != 0
    }

    /// Whether no code is in the set.
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }
}

/// gRFC A6 `retryPolicy`: attempts are made one after another.
#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    /// Attempts in all, the first included (2–5).
    pub max_attempts: u8,
    /// The first backoff ceiling; each pause is random in [0, ceiling).
    pub initial_backoff: Duration,
    /// The most the ceiling grows to.
    pub max_backoff: Duration,
    /// The ceiling's growth per retry.
    pub backoff_multiplier: f64,
    /// Statuses that make another attempt.
    pub retryable: CodeSet,
}

impl RetryPolicy {
    /// The backoff ceiling before retry `n` (1 for the first retry).
    pub fn ceiling(&self, n: u32) -> Duration {
        let exp = i32::try_from(n.saturating_sub(1)).unwrap_or(i32::MAX);
        let secs = self.initial_backoff.as_secs_f64() * self.backoff_multiplier.powi(exp);
        Duration::from_secs_f64(secs.min(self.max_backoff.as_secs_f64()))
    }
}

/// gRFC A6 `hedgingPolicy`: attempts are sent `delay` apart without waiting for answers;
/// the first answer wins.
#[derive(Debug, Clone, PartialEq)]
pub struct HedgingPolicy {
    /// Attempts in all, the first included (2–5).
    pub max_attempts: u8,
    /// Time between attempts (zero: all at once).
    pub delay: Duration,
    /// Statuses after which the next attempt goes at once (any other status ends the call).
    pub non_fatal: CodeSet,
}

/// What the config says to do when an attempt does not succeed.
#[derive(Debug, Clone, PartialEq)]
pub enum Resend {
    /// Retry on the statuses given.
    Retry(RetryPolicy),
    /// Hedge.
    Hedge(HedgingPolicy),
}

/// A method's config: its timeout and its retry or hedging policy.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct MethodPolicy {
    /// The longest the call may take (bounds the client's deadline, or sets one).
    pub timeout: Option<Duration>,
    /// Whether and how calls are sent again.
    pub resend: Option<Resend>,
}

/// gRFC A6 `retryThrottling`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ThrottleParams {
    /// The bucket's size, in (0, 1000].
    pub max_tokens: f64,
    /// What a success gives back (a failure takes 1).
    pub token_ratio: f64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_ceilings_grow_by_the_multiplier_up_to_the_max() {
        let p = RetryPolicy {
            max_attempts: 5,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_millis(350),
            backoff_multiplier: 2.0,
            retryable: CodeSet::default().with(14),
        };
        assert_eq!(p.ceiling(1), Duration::from_millis(100));
        assert_eq!(p.ceiling(2), Duration::from_millis(200));
        assert_eq!(p.ceiling(3), Duration::from_millis(350));
        assert!(p.retryable.contains(14) && !p.retryable.contains(2));
        assert!(!p.retryable.contains(40));
    }
}
