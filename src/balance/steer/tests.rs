//! The steered pick over fake sets: backends with labels, never connected (assumed
//! ready), ejected through the service's health accounting.

use std::collections::BTreeMap;

use super::*;
use crate::balance::{BalanceSettings, Balancer, Policy};
use crate::endpoint::Endpoint;
use crate::health::{CallResult, HealthSettings};
use crate::upstream::{Upstream, UpstreamConfig};

fn subset(pairs: &[(&str, &str)]) -> Subset {
    Subset::new(
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect::<BTreeMap<_, _>>(),
    )
}

fn zone(z: &str) -> Steering {
    Steering {
        zone: Some(z.into()),
        ..Steering::default()
    }
}

fn rules(splits: &[(&str, u32)], header_to: Option<&str>, strict: bool) -> Arc<TrafficRules> {
    Arc::new(TrafficRules {
        matches: header_to
            .map(|v| HeaderMatch {
                header: HeaderName::from_static("x-canary"),
                value: HeaderValue::from_static("1"),
                subset: subset(&[("version", v)]),
            })
            .into_iter()
            .collect(),
        splits: splits
            .iter()
            .map(|(v, w)| (subset(&[("version", v)]), *w))
            .collect(),
        strict,
    })
}

/// A balancer steered by `steering` (policy `policy`) and its snapshot of backends on
/// ports 1000.., each with the metadata `labels[i]` (`zone`, `version`).
fn steered(labels: &[(&str, &str)], steering: Steering, policy: Policy) -> (Balancer, EndpointSet) {
    let settings = Arc::new(BalanceSettings {
        policy,
        ..BalanceSettings::default()
    });
    let balancer = Balancer::new("t", settings, HealthSettings::default());
    balancer.set_steering(steering);
    let cfg = UpstreamConfig::default();
    let backends = labels
        .iter()
        .enumerate()
        .map(|(i, (z, v))| {
            let mut ep = Endpoint::new(format!("127.0.0.1:{}", 1000 + i).parse().unwrap());
            let mut meta = serde_json::Map::new();
            if !z.is_empty() {
                meta.insert("zone".into(), (*z).into());
            }
            if !v.is_empty() {
                meta.insert("version".into(), (*v).into());
            }
            ep.metadata = Some(meta.into());
            let up = Upstream::new(ep.addr.clone(), &cfg);
            up.assume_ready();
            Backend::new(up, &ep, &balancer)
        })
        .collect();
    let set = balancer.snapshot(backends);
    (balancer, set)
}

/// Counts of `calls` picks per endpoint, each call steered by `headers`.
fn picks(b: &Balancer, s: &EndpointSet, calls: usize, headers: &HeaderMap) -> Vec<usize> {
    let mut counts = vec![0; s.len()];
    for _ in 0..calls {
        let steer = b.steer(headers);
        let (i, _) = b.select_steered(s, steer, |_| true).unwrap().unwrap();
        counts[i] += 1;
    }
    counts
}

fn eject(b: &Balancer, s: &EndpointSet, i: usize) {
    for _ in 0..5 {
        b.health()
            .report(s.get(i).unwrap().health(), CallResult::Failure);
    }
    assert_eq!(s.get(i).unwrap().fit(), Fit::No, "endpoint {i} ejected");
}

const AB: [(&str, &str); 6] = [
    ("a", ""),
    ("b", ""),
    ("a", ""),
    ("b", ""),
    ("a", ""),
    ("", ""),
];

#[test]
fn calls_stay_in_the_zone_for_every_policy() {
    for policy in [Policy::RoundRobin, Policy::LeastRequest, Policy::Latency] {
        let (b, s) = steered(&AB, zone("a"), policy);
        assert!(s.is_steered());
        let counts = picks(&b, &s, 300, &HeaderMap::new());
        // (How the zone's three share them is the policy's business.)
        assert_eq!(
            counts[0] + counts[2] + counts[4],
            300,
            "{policy}: {counts:?}"
        );
    }
    let (b, s) = steered(&AB, zone("a"), Policy::RoundRobin);
    assert_eq!(
        picks(&b, &s, 300, &HeaderMap::new()),
        [100, 0, 100, 0, 100, 0]
    );
    assert_eq!(s.is_local(0), Some(true));
    assert_eq!(s.is_local(5), Some(false), "no zone label: another zone");
}

#[test]
fn without_a_zone_or_rules_nothing_is_steered() {
    let (b, s) = steered(&AB, Steering::default(), Policy::RoundRobin);
    assert!(!s.is_steered());
    assert_eq!(s.is_local(0), None);
    assert_eq!(b.steer(&HeaderMap::new()), None);
    assert_eq!(picks(&b, &s, 60, &HeaderMap::new()), [10; 6]);
}

#[test]
fn a_zone_short_of_usable_endpoints_spills_over_all() {
    let (b, s) = steered(&AB, zone("a"), Policy::RoundRobin);
    // One of three out: two of three still usable, at least half: stay.
    eject(&b, &s, 0);
    let counts = picks(&b, &s, 200, &HeaderMap::new());
    assert_eq!(counts, [0, 0, 100, 0, 100, 0]);
    // Two of three out: under half, the calls go to every usable endpoint.
    eject(&b, &s, 2);
    let counts = picks(&b, &s, 400, &HeaderMap::new());
    assert_eq!(counts[0] + counts[2], 0, "{counts:?}");
    assert!(
        counts[1] > 50 && counts[3] > 50 && counts[4] > 50 && counts[5] > 50,
        "{counts:?}"
    );
}

#[test]
fn a_call_that_tried_the_zone_goes_elsewhere() {
    let (b, s) = steered(&AB, zone("a"), Policy::RoundRobin);
    let tried = [0usize, 2, 4];
    for _ in 0..10 {
        let (i, _) = b
            .select_steered(&s, None, |i| !tried.contains(&i))
            .unwrap()
            .unwrap();
        assert!(!tried.contains(&i));
    }
    // A zone nobody is in: every endpoint.
    let (b, s) = steered(&AB, zone("c"), Policy::RoundRobin);
    assert_eq!(picks(&b, &s, 60, &HeaderMap::new()), [10; 6]);
}

const VERSIONS: [(&str, &str); 5] = [
    ("a", "v1"),
    ("b", "v1"),
    ("a", "v2"),
    ("b", "v2"),
    ("a", "v1"),
];

#[test]
fn a_split_is_exact_and_each_subset_rotates_on_its_own() {
    let steering = Steering {
        traffic: Some(rules(&[("v1", 95), ("v2", 5)], None, false)),
        ..Steering::default()
    };
    let (b, s) = steered(&VERSIONS, steering, Policy::RoundRobin);
    let counts = picks(&b, &s, 2000, &HeaderMap::new());
    assert_eq!(counts[2] + counts[3], 100, "{counts:?}");
    // v1's three endpoints share its calls evenly, v2's two its own.
    for i in [0, 1, 4] {
        assert!((632..=634).contains(&counts[i]), "{counts:?}");
    }
    assert_eq!(counts[2], 50, "{counts:?}");
    // Alternating subsets do not starve anyone of a subset (a shared rotation would).
    let steering = Steering {
        traffic: Some(rules(&[("v1", 1), ("v2", 1)], None, false)),
        ..Steering::default()
    };
    let (b, s) = steered(&VERSIONS, steering, Policy::RoundRobin);
    let counts = picks(&b, &s, 600, &HeaderMap::new());
    assert_eq!(counts, [100, 100, 150, 150, 100]);
}

#[test]
fn a_header_match_wins_over_the_split() {
    let steering = Steering {
        traffic: Some(rules(&[("v1", 100)], Some("v2"), false)),
        ..Steering::default()
    };
    let (b, s) = steered(&VERSIONS, steering, Policy::RoundRobin);
    let mut canary = HeaderMap::new();
    canary.insert("x-canary", HeaderValue::from_static("1"));
    let counts = picks(&b, &s, 100, &canary);
    assert_eq!(counts, [0, 0, 50, 50, 0]);
    let mut other = HeaderMap::new();
    other.insert("x-canary", HeaderValue::from_static("0"));
    let counts = picks(&b, &s, 99, &other);
    assert_eq!(counts[2] + counts[3], 0, "{counts:?}");
}

#[test]
fn subsets_prefer_the_zone_too() {
    let steering = Steering {
        traffic: Some(rules(&[("v1", 1), ("v2", 1)], None, false)),
        ..zone("a")
    };
    let (b, s) = steered(&VERSIONS, steering, Policy::RoundRobin);
    let counts = picks(&b, &s, 400, &HeaderMap::new());
    assert_eq!(counts, [100, 0, 200, 0, 100]);
    // v2 in zone a gone: v2's calls go to v2 in zone b, v1's stay in a.
    eject(&b, &s, 2);
    let counts = picks(&b, &s, 400, &HeaderMap::new());
    assert_eq!(counts, [100, 0, 0, 200, 100]);
}

#[test]
fn a_subset_without_endpoints_falls_back_or_fails_when_strict() {
    let steering = Steering {
        traffic: Some(rules(&[("v1", 1), ("v3", 1)], None, false)),
        ..Steering::default()
    };
    let (b, s) = steered(&VERSIONS, steering, Policy::RoundRobin);
    let counts = picks(&b, &s, 600, &HeaderMap::new());
    // Half to v1, half (v3's, fallen back) over all five.
    assert_eq!(counts, [160, 160, 60, 60, 160]);
    assert_eq!(
        s.traffic().unwrap().falling_back(),
        [Arc::<str>::from("version=v3")]
    );

    let steering = Steering {
        traffic: Some(rules(&[("v2", 1)], None, true)),
        ..Steering::default()
    };
    let (b, s) = steered(&VERSIONS, steering, Policy::RoundRobin);
    assert!(b
        .select_steered(&s, b.steer(&HeaderMap::new()), |_| true)
        .unwrap()
        .is_some());
    eject(&b, &s, 2);
    eject(&b, &s, 3);
    let err = b
        .select_steered(&s, b.steer(&HeaderMap::new()), |_| true)
        .unwrap_err();
    assert_eq!(&*err.subset, "version=v2");
    // Every usable endpoint of the subset tried: nothing more, not another subset.
    let (b, s) = steered(
        &VERSIONS,
        Steering {
            traffic: Some(rules(&[("v2", 1)], None, false)),
            ..Steering::default()
        },
        Policy::RoundRobin,
    );
    let steer = b.steer(&HeaderMap::new());
    assert!(b
        .select_steered(&s, steer, |i| i != 2 && i != 3)
        .unwrap()
        .is_none());
}

#[test]
fn rules_of_another_generation_steer_to_the_whole_service() {
    let with = |w| Steering {
        traffic: Some(rules(&[("v2", w)], None, false)),
        ..Steering::default()
    };
    let (b, s) = steered(&VERSIONS, with(1), Policy::RoundRobin);
    let old = b.steer(&HeaderMap::new());
    assert!(b.set_steering(with(2)));
    assert!(!b.set_steering(with(2)), "unchanged");
    // The snapshot still has the old views; a call chosen with the new rules does not
    // find its subset there.
    let new = b.steer(&HeaderMap::new());
    assert_ne!(old, new);
    let mut counts = [0usize; 5];
    for _ in 0..50 {
        counts[b.select_steered(&s, new, |_| true).unwrap().unwrap().0] += 1;
    }
    assert_eq!(counts, [10; 5]);
}

#[test]
fn the_split_order_is_smooth() {
    let t = Traffic::new("t", rules(&[("v1", 3), ("v2", 1)], None, false), None);
    let order: Vec<u16> = (0..8)
        .map(|_| t.choose(&HeaderMap::new()).unwrap().subset)
        .collect();
    assert_eq!(order, [0, 0, 1, 0, 0, 0, 1, 0]);
    let none = Traffic::new("t", rules(&[], Some("v2"), false), None);
    assert_eq!(
        none.choose(&HeaderMap::new()),
        None,
        "no split: the whole service"
    );
}

#[test]
fn a_large_zone_counts_its_usable_endpoints_every_so_often() {
    // 20 in zone a, 20 in zone b.
    let labels: Vec<(&str, &str)> = (0..40)
        .map(|i: usize| (if i.is_multiple_of(2) { "a" } else { "b" }, ""))
        .collect();
    let (b, s) = steered(&labels, zone("a"), Policy::RoundRobin);
    let in_zone = |counts: &[usize]| counts.iter().step_by(2).sum::<usize>();
    assert_eq!(in_zone(&picks(&b, &s, 100, &HeaderMap::new())), 100);
    // 11 of the zone's 20 out (the cap allows 20 of 40): under half. Within the next
    // 64 picks the zone is counted again, and from then on calls spill.
    for i in (0..22).step_by(2) {
        eject(&b, &s, i);
    }
    let _ = picks(&b, &s, 64, &HeaderMap::new());
    let counts = picks(&b, &s, 290, &HeaderMap::new());
    assert!(in_zone(&counts) < 100, "{counts:?}");
    assert!(
        counts.iter().skip(1).step_by(2).all(|&c| c > 0),
        "{counts:?}"
    );
}
