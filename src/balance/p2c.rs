//! Power of two random choices: draw two endpoints at random, take the cheaper. Shared by
//! the load-aware policies, which differ only in what an endpoint costs.

use std::sync::Arc;

use super::{Backend, EndpointSet, Fit};

/// Draws made to find a second preferred endpoint before settling for one.
const REDRAWS: usize = 3;

/// The cheaper of two random preferred endpoints by `cost` (else the cheapest usable).
#[inline]
pub(super) fn pick(
    set: &EndpointSet,
    fit: impl Fn(usize, &Backend) -> Fit,
    cost: impl Fn(&Backend) -> f64,
) -> Option<(usize, &Arc<Backend>)> {
    let backends = &set.backends;
    let n = backends.len();
    if n < 2 {
        return cheapest(set, fit, cost);
    }
    let preferred = |i: usize| fit(i, &backends[i]) == Fit::Preferred;
    let mut first = None;
    for _ in 0..REDRAWS {
        let i = fastrand::usize(..n);
        // A second index distinct from the first.
        let j = (i + 1 + fastrand::usize(..n - 1)) % n;
        let (a, b) = match first {
            Some(a) => (Some(a), preferred(j).then_some(j)),
            None => (preferred(i).then_some(i), preferred(j).then_some(j)),
        };
        match (a, b) {
            (Some(a), Some(b)) if a != b => {
                let pick = if cost(&backends[b]) < cost(&backends[a]) {
                    b
                } else {
                    a
                };
                return Some((pick, &backends[pick]));
            }
            (Some(a), _) | (None, Some(a)) => first = Some(a),
            (None, None) => {}
        }
    }
    match first {
        Some(a) => Some((a, &backends[a])),
        // Few preferred endpoints left (or none): weigh them all.
        None => cheapest(set, fit, cost),
    }
}

/// The cheapest of the best-fitting endpoints, by a scan of all.
fn cheapest(
    set: &EndpointSet,
    fit: impl Fn(usize, &Backend) -> Fit,
    cost: impl Fn(&Backend) -> f64,
) -> Option<(usize, &Arc<Backend>)> {
    let mut best: Option<(Fit, f64, usize)> = None;
    for (i, b) in set.backends.iter().enumerate() {
        let f = fit(i, b);
        if f == Fit::No {
            continue;
        }
        let c = cost(b);
        let better = match best {
            None => true,
            Some((bf, bc, _)) => f > bf || (f == bf && c < bc),
        };
        if better {
            best = Some((f, c, i));
        }
    }
    best.map(|(_, _, i)| (i, &set.backends[i]))
}
