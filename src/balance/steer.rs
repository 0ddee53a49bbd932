//! Where a call may go before the policy picks: the proxy's zone, and the service's
//! traffic rules (subsets of endpoints by label, header matches, weighted splits).
//!
//! Everything that reads labels runs when a snapshot is made: each snapshot of a steered
//! service carries its views ([`Steered`]), the index lists of the zone's endpoints and of
//! each subset (and of each subset within the zone), each with its own weighted rotation.
//! A call then only picks in a view: its policy, weights, ejection and slow start apply
//! within it, as over the whole set. Which subset a call goes to is chosen once per call
//! ([`Traffic::choose`]): a header match, else the next turn of the split's smooth
//! weighted order (an atomic cursor over a precomputed period: exact over many calls,
//! no lock, no random draw).
//!
//! The zone's rule (Envoy's panic threshold, with a per-host proxy's signals): a call
//! stays in the zone while at least one of the zone's endpoints, and at least half of
//! them, can take calls (not ejected, not unhealthy by active check, not failing to
//! connect; counted at each pick, or every 64 picks in a zone of more than 16);
//! otherwise it is balanced over all endpoints. When every endpoint of the
//! zone a call may still try is used up, it is offered to the others: the zone never
//! fails a call. Endpoints without a zone label count as another zone.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::Arc;

use http::{HeaderMap, HeaderName, HeaderValue};
use prometheus::IntCounter;

use super::round_robin::{smooth_order, RoundRobin};
use super::{Backend, EndpointSet, Fit};
use crate::metrics::ServiceMetrics;

/// The label key an endpoint's zone is read from unless `--zone-key` says another.
pub const DEFAULT_ZONE_KEY: &str = "zone";

/// A subset of a service's endpoints: those whose labels hold all these pairs.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Subset(BTreeMap<String, String>);

impl Subset {
    /// The subset of endpoints labelled with all of `pairs`.
    pub fn new(pairs: BTreeMap<String, String>) -> Self {
        Self(pairs)
    }

    /// Whether `backend`'s labels hold every pair.
    fn holds(&self, backend: &Backend) -> bool {
        let ep = backend.endpoint();
        self.0
            .iter()
            .all(|(k, v)| ep.label(k).as_deref() == Some(v.as_str()))
    }

    /// The pairs, by key.
    pub fn pairs(&self) -> &BTreeMap<String, String> {
        &self.0
    }
}

impl fmt::Display for Subset {
    /// `version=v2` (pairs joined by `,`), as logs, errors and metric labels name it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, (k, v)) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{k}={v}")?;
        }
        Ok(())
    }
}

/// Calls carrying a header with a value go to a subset, whatever the split says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeaderMatch {
    /// The request header.
    pub header: HeaderName,
    /// Its value, exactly.
    pub value: HeaderValue,
    /// Where such calls go.
    pub subset: Subset,
}

/// One service's traffic rules as configured (`[[traffic]]`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TrafficRules {
    /// Header matches, first match wins.
    pub matches: Vec<HeaderMatch>,
    /// The other calls, split by weight between subsets (none: the whole service).
    pub splits: Vec<(Subset, u32)>,
    /// A subset without a usable endpoint fails its calls (UNAVAILABLE) instead of
    /// sending them to the whole service.
    pub strict: bool,
}

/// How one service's calls are steered before the policy picks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Steering {
    /// The proxy's own zone: calls prefer endpoints labelled with it.
    pub zone: Option<Arc<str>>,
    /// The label key holding an endpoint's zone.
    pub zone_key: Arc<str>,
    /// The service's traffic rules, if any.
    pub traffic: Option<Arc<TrafficRules>>,
}

impl Default for Steering {
    fn default() -> Self {
        Self {
            zone: None,
            zone_key: DEFAULT_ZONE_KEY.into(),
            traffic: None,
        }
    }
}

impl Steering {
    /// Whether it changes anything: a zone or rules.
    pub fn is_active(&self) -> bool {
        self.zone.is_some() || self.traffic.is_some()
    }
}

/// A call's subset, chosen once per call by [`Traffic::choose`] (and carried in the
/// request's extensions to each of its attempts).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Steer {
    /// Which compiled rules chose it (a reload's may number subsets differently).
    generation: u32,
    /// The subset, by index in those rules.
    subset: u16,
}

/// Numbers each compiled set of rules.
static GENERATION: AtomicU32 = AtomicU32::new(1);

/// A service's traffic rules, compiled for the call path: distinct subsets by index, the
/// header matches, the split's period and its cursor.
#[derive(Debug)]
pub struct Traffic {
    generation: u32,
    service: Box<str>,
    rules: Arc<TrafficRules>,
    subsets: Box<[SubsetState]>,
    matches: Box<[(HeaderName, HeaderValue, u16)]>,
    /// One period of the split: subset indices in smooth weighted order.
    split: Box<[u16]>,
    cursor: AtomicUsize,
}

/// One subset's state: its name, whether its calls are falling back (for the log on
/// change), and its metric handles (subset, fallback).
#[derive(Debug)]
struct SubsetState {
    subset: Subset,
    name: Arc<str>,
    falling_back: AtomicBool,
    counters: Option<[IntCounter; 2]>,
}

impl Traffic {
    /// `rules` of `service` compiled, counted in `metrics` if given.
    pub(super) fn new(
        service: &str,
        rules: Arc<TrafficRules>,
        metrics: Option<&ServiceMetrics>,
    ) -> Self {
        let mut subsets: Vec<Subset> = Vec::new();
        let mut index_of = |s: &Subset| match subsets.iter().position(|x| x == s) {
            Some(i) => i as u16,
            None => {
                subsets.push(s.clone());
                (subsets.len() - 1) as u16
            }
        };
        let matches = rules
            .matches
            .iter()
            .map(|m| (m.header.clone(), m.value.clone(), index_of(&m.subset)))
            .collect();
        let split_subsets: Vec<u16> = rules.splits.iter().map(|(s, _)| index_of(s)).collect();
        let weights: Vec<u64> = rules.splits.iter().map(|(_, w)| u64::from(*w)).collect();
        let split = smooth_order(&weights)
            .into_iter()
            .map(|i| split_subsets[i as usize])
            .collect();
        let subsets = subsets
            .into_iter()
            .map(|subset| {
                let name: Arc<str> = subset.to_string().into();
                SubsetState {
                    counters: metrics.map(|m| m.subset_counters(&name)),
                    subset,
                    name,
                    falling_back: AtomicBool::new(false),
                }
            })
            .collect();
        Self {
            generation: GENERATION.fetch_add(1, Ordering::Relaxed),
            service: service.into(),
            rules,
            subsets,
            matches,
            split,
            cursor: AtomicUsize::new(0),
        }
    }

    /// The rules as configured.
    pub fn rules(&self) -> &TrafficRules {
        &self.rules
    }

    /// The subset of a call with `headers`: the first header match, else the split's
    /// next turn; `None` (the whole service) when neither applies.
    #[inline]
    pub fn choose(&self, headers: &HeaderMap) -> Option<Steer> {
        let subset = self
            .matches
            .iter()
            .find(|(h, v, _)| headers.get(h) == Some(v))
            .map(|m| m.2)
            .or_else(|| {
                let n = self.split.len();
                (n > 0).then(|| self.split[self.cursor.fetch_add(1, Ordering::Relaxed) % n])
            })?;
        Some(Steer {
            generation: self.generation,
            subset,
        })
    }

    /// Subsets whose calls go elsewhere now (no usable endpoint), by name.
    pub fn falling_back(&self) -> Vec<Arc<str>> {
        self.subsets
            .iter()
            .filter(|s| s.falling_back.load(Ordering::Relaxed))
            .map(|s| Arc::clone(&s.name))
            .collect()
    }

    /// Notes whether subset `k`'s calls are falling back; logs a change.
    #[inline]
    fn note(&self, k: usize, falling_back: bool) {
        let s = &self.subsets[k];
        if s.falling_back.load(Ordering::Relaxed) == falling_back
            || s.falling_back.swap(falling_back, Ordering::Relaxed) == falling_back
        {
            return;
        }
        self.log_change(s, falling_back);
    }

    #[cold]
    fn log_change(&self, s: &SubsetState, falling_back: bool) {
        match (falling_back, self.rules.strict) {
            (true, false) => tracing::warn!(
                service = %self.service,
                subset = %s.name,
                "subset has no usable endpoint: its calls go to the whole service"
            ),
            (true, true) => tracing::warn!(
                service = %self.service,
                subset = %s.name,
                "subset has no usable endpoint: its calls fail (strict)"
            ),
            (false, _) => tracing::info!(
                service = %self.service,
                subset = %s.name,
                "subset has usable endpoints again: its calls go to it"
            ),
        }
    }
}

/// A subset with no usable endpoint, under strict rules: the call fails.
#[derive(Debug, Clone, thiserror::Error)]
#[error("no usable endpoint in subset {subset}")]
pub struct SubsetUnavailable {
    /// The subset, as `key=value` pairs.
    pub subset: Arc<str>,
}

/// Some of a snapshot's endpoints, with their own rotation: a zone's, a subset's.
#[derive(Debug)]
struct View {
    set: EndpointSet,
    /// Each endpoint's index in the snapshot.
    index: Box<[u32]>,
    rr: RoundRobin,
    /// A large zone's last count of usable endpoints (see [`View::enough`]).
    gate: AtomicU32,
}

/// Zones of up to this many endpoints count their usable ones at every pick.
const EXACT_GATE_UP_TO: usize = 16;

/// A larger zone counts them again after this many picks.
const GATE_RECHECK_EVERY: u32 = 64;

impl View {
    /// The endpoints of `backends` that `keep` takes; `None` if it takes none.
    fn of(backends: &[Arc<Backend>], keep: impl Fn(usize) -> bool) -> Option<Self> {
        let index: Box<[u32]> = (0..backends.len())
            .filter(|&i| keep(i))
            .map(|i| i as u32)
            .collect();
        if index.is_empty() {
            return None;
        }
        let set = EndpointSet::sorted(
            index
                .iter()
                .map(|&i| Arc::clone(&backends[i as usize]))
                .collect(),
        );
        Some(Self {
            set,
            index,
            rr: RoundRobin::starting_anywhere(),
            gate: AtomicU32::new(0),
        })
    }

    /// Whether the zone can take the calls: at least one endpoint, and at least half of
    /// them, usable. Counted at each pick in a zone of up to [`EXACT_GATE_UP_TO`]
    /// endpoints; in a larger one, once every [`GATE_RECHECK_EVERY`] picks (a count of
    /// hundreds per call would cost more than the pick): until then a zone that lost
    /// endpoints takes calls on those left, and one that got them back still spills.
    /// Neither fails a call.
    #[inline]
    fn enough(&self) -> bool {
        if self.set.len() <= EXACT_GATE_UP_TO {
            return self.count_enough();
        }
        // Bit 0: the last count's answer; the others count picks (adding 2 keeps bit 0).
        let state = self.gate.fetch_add(2, Ordering::Relaxed);
        if !(state >> 1).is_multiple_of(GATE_RECHECK_EVERY) {
            return state & 1 == 1;
        }
        let enough = self.count_enough();
        if enough {
            self.gate.fetch_or(1, Ordering::Relaxed);
        } else {
            self.gate.fetch_and(!1, Ordering::Relaxed);
        }
        enough
    }

    /// [`View::enough`] counted now (the scan stops as soon as it knows).
    fn count_enough(&self) -> bool {
        let n = self.set.len();
        let need = n.div_ceil(2).max(1);
        let mut usable = 0;
        for (i, b) in self.set.iter().enumerate() {
            if b.fit() != Fit::No {
                usable += 1;
                if usable >= need {
                    return true;
                }
            } else if usable + (n - i - 1) < need {
                return false;
            }
        }
        false
    }

    /// Whether any endpoint can take calls now.
    fn any_usable(&self) -> bool {
        self.set.iter().any(|b| b.fit() != Fit::No)
    }
}

/// One subset's views in a snapshot: all of its endpoints, and those in the zone.
#[derive(Debug)]
struct SubsetViews {
    /// `None`: no endpoint of the snapshot is in the subset.
    all: Option<View>,
    local: Option<View>,
}

/// A steered snapshot's views: the zone's endpoints, and each subset's.
#[derive(Debug)]
pub(super) struct Steered {
    traffic: Option<Arc<Traffic>>,
    /// The zone's endpoints (`None`: no zone, or none in it).
    local: Option<View>,
    /// Whether each endpoint of the snapshot is in the zone (empty without a zone).
    is_local: Box<[bool]>,
    /// Calls sent in the zone and out of it, when a zone is set and calls are counted.
    locality: Option<[IntCounter; 2]>,
    /// By subset index of `traffic`.
    subsets: Box<[SubsetViews]>,
}

impl Steered {
    /// The views of `backends` (in snapshot order) for `steering` and its compiled
    /// `traffic`; `None` when nothing steers.
    pub(super) fn build(
        backends: &[Arc<Backend>],
        steering: &Steering,
        traffic: Option<&Arc<Traffic>>,
        metrics: Option<&ServiceMetrics>,
    ) -> Option<Box<Self>> {
        if !steering.is_active() {
            return None;
        }
        let is_local: Box<[bool]> = match &steering.zone {
            Some(zone) => backends
                .iter()
                .map(|b| b.endpoint().label(&steering.zone_key).as_deref() == Some(&**zone))
                .collect(),
            None => Box::default(),
        };
        let zoned = !is_local.is_empty();
        let subsets = traffic
            .map(|t| {
                t.subsets
                    .iter()
                    .map(|s| {
                        let member: Vec<bool> =
                            backends.iter().map(|b| s.subset.holds(b)).collect();
                        SubsetViews {
                            all: View::of(backends, |i| member[i]),
                            local: View::of(backends, |i| zoned && member[i] && is_local[i]),
                        }
                    })
                    .collect()
            })
            .unwrap_or_default();
        Some(Box::new(Self {
            traffic: traffic.cloned(),
            local: View::of(backends, |i| zoned && is_local[i]),
            locality: steering
                .zone
                .as_ref()
                .and(metrics)
                .map(ServiceMetrics::locality_counters),
            is_local,
            subsets,
        }))
    }

    /// Whether endpoint `i` of the snapshot is in the proxy's zone.
    pub(super) fn is_local(&self, i: usize) -> Option<bool> {
        self.is_local.get(i).copied()
    }

    /// The compiled rules the views were made for.
    pub(super) fn traffic(&self) -> Option<&Arc<Traffic>> {
        self.traffic.as_ref()
    }
}

impl super::Balancer {
    /// Picks the endpoint for a call as [`super::Balancer::select_with`] does, steered:
    /// within the call's subset (`steer`), then within the proxy's zone while it can
    /// take the calls. A subset with no usable endpoint sends the call to the whole
    /// service, or fails it under strict rules.
    #[inline]
    pub fn select_steered<'s>(
        &self,
        set: &'s EndpointSet,
        steer: Option<Steer>,
        accept: impl Fn(usize) -> bool,
    ) -> Result<Option<(usize, &'s Arc<Backend>)>, SubsetUnavailable> {
        let Some(st) = set.steered.as_deref() else {
            return Ok(self.select_with(set, accept));
        };
        if let Some((k, t)) = steer.and_then(|s| {
            let t = st.traffic.as_ref()?;
            (t.generation == s.generation).then_some((usize::from(s.subset), t))
        }) {
            let views = &st.subsets[k];
            if let Some(all) = &views.all {
                let picked = self.zoned(st, views.local.as_ref(), &accept, |accept| {
                    self.pick_view(all, accept)
                });
                if let Some(p) = picked {
                    t.note(k, false);
                    count(&t.subsets[k].counters, 0);
                    return Ok(Some(p));
                }
                if all.any_usable() {
                    // The call has been offered to every usable endpoint of its subset.
                    return Ok(None);
                }
            }
            t.note(k, true);
            if t.rules.strict {
                return Err(SubsetUnavailable {
                    subset: Arc::clone(&t.subsets[k].name),
                });
            }
            count(&t.subsets[k].counters, 1);
        }
        Ok(self.zoned(st, st.local.as_ref(), &accept, |accept| {
            self.select_with(set, accept)
        }))
    }

    /// The pick within `local` (the zone's part of what `wider` picks from) while the
    /// zone can take the call, else `wider`'s; counted by locality.
    #[inline]
    fn zoned<'s, A: Fn(usize) -> bool>(
        &self,
        st: &Steered,
        local: Option<&'s View>,
        accept: &A,
        wider: impl FnOnce(&A) -> Option<(usize, &'s Arc<Backend>)>,
    ) -> Option<(usize, &'s Arc<Backend>)> {
        let picked = local
            .filter(|l| l.enough())
            .and_then(|l| self.pick_view(l, accept))
            .or_else(|| wider(accept));
        if let (Some((i, _)), Some(c)) = (picked, &st.locality) {
            let other = usize::from(!st.is_local.get(i).copied().unwrap_or(false));
            c[other].inc();
        }
        picked
    }

    /// The policy's pick within `view`, by snapshot index.
    #[inline]
    fn pick_view<'s>(
        &self,
        view: &'s View,
        accept: &impl Fn(usize) -> bool,
    ) -> Option<(usize, &'s Arc<Backend>)> {
        let index = &view.index;
        self.pick_in(&view.set, &view.rr, |j| accept(index[j] as usize))
            .map(|(j, b)| (index[j] as usize, b))
    }
}

#[inline]
fn count(counters: &Option<[IntCounter; 2]>, which: usize) {
    if let Some(c) = counters {
        c[which].inc();
    }
}

#[cfg(test)]
mod tests;
