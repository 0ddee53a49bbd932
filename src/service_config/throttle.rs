//! gRFC A6 retry throttling: a token bucket per service that stops retries and hedges
//! while most attempts fail, so that a service failing everywhere gets little more than
//! its calls' first attempts.

use std::sync::atomic::{AtomicU32, Ordering};

use super::policy::ThrottleParams;

/// Fixed point: thousandths of a token (A6 keeps three decimal places of `tokenRatio`).
const MILLI: f64 = 1000.0;

/// One service's token bucket.
#[derive(Debug)]
pub struct Throttle {
    /// Tokens now, in thousandths.
    tokens: AtomicU32,
    max: u32,
    ratio: u32,
}

impl Throttle {
    /// A full bucket for `params`.
    pub fn new(params: ThrottleParams) -> Self {
        let max = (params.max_tokens * MILLI) as u32;
        Self {
            tokens: AtomicU32::new(max),
            max,
            ratio: (params.token_ratio * MILLI) as u32,
        }
    }

    /// The parameters it was made with (a reload with the same ones keeps the bucket).
    pub fn same(&self, params: ThrottleParams) -> bool {
        self.max == (params.max_tokens * MILLI) as u32
            && self.ratio == (params.token_ratio * MILLI) as u32
    }

    /// Whether a retry or hedge may be sent now: more than half the tokens are left.
    #[inline]
    pub fn allows(&self) -> bool {
        self.tokens.load(Ordering::Relaxed) > self.max / 2
    }

    /// An attempt failed with a retryable (or non-fatal) status: one token less.
    pub fn failed(&self) {
        let _ = self
            .tokens
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |t| {
                Some(t.saturating_sub(1000))
            });
    }

    /// An attempt succeeded: `tokenRatio` back, up to the bucket's size.
    pub fn succeeded(&self) {
        let (max, ratio) = (self.max, self.ratio);
        let _ = self
            .tokens
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |t| {
                Some(t.saturating_add(ratio).min(max))
            });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_close_the_bucket_and_successes_reopen_it() {
        let t = Throttle::new(ThrottleParams {
            max_tokens: 10.0,
            token_ratio: 0.5,
        });
        assert!(t.allows());
        for _ in 0..5 {
            t.failed();
        }
        // 5 of 10 left: not above half.
        assert!(!t.allows());
        t.succeeded();
        assert!(t.allows(), "5.5 > 5");
        for _ in 0..100 {
            t.succeeded();
        }
        for _ in 0..4 {
            t.failed();
        }
        assert!(t.allows(), "capped at 10, 6 left");
        assert!(t.same(ThrottleParams {
            max_tokens: 10.0,
            token_ratio: 0.5
        }));
    }
}
