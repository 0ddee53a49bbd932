//! The policies' picks over many calls: each policy against the load, latency and
//! failures it is meant to steer by.

use std::time::Duration;

use super::tests::{finish, port, set_for, Held};
use super::*;

fn settings(policy: Policy, slow_start: Option<Duration>) -> Arc<BalanceSettings> {
    Arc::new(BalanceSettings {
        policy,
        slow_start,
        ..BalanceSettings::default()
    })
}

/// Counts of `calls` picks per endpoint; each pick's call is held open when `hold`.
fn picks(b: &Balancer, s: &EndpointSet, calls: usize, hold: bool) -> Vec<usize> {
    let mut counts = vec![0; s.len()];
    let mut held = Vec::new();
    for _ in 0..calls {
        let (_, ep) = b.select_with(s, |_| true).unwrap();
        counts[port(ep)] += 1;
        if hold {
            held.push(Held::on(ep));
        }
    }
    counts
}

#[test]
fn least_request_avoids_the_loaded_endpoint() {
    let st = settings(Policy::LeastRequest, None);
    let (b, s) = set_for(3, &[], &st, HealthSettings::default());
    let busy: Vec<_> = (0..5).map(|_| Held::on(&s.backends[0])).collect();
    let counts = picks(&b, &s, 300, false);
    assert_eq!(counts[0], 0, "{counts:?}");
    assert!(counts[1] > 100 && counts[2] > 100, "{counts:?}");
    drop(busy);
    assert_eq!(s.backends[0].in_flight(), 0);
}

#[test]
fn least_request_shares_by_weight_under_load() {
    let st = settings(Policy::LeastRequest, None);
    let (b, s) = set_for(2, &[3, 1], &st, HealthSettings::default());
    let counts = picks(&b, &s, 400, true);
    assert!((295..=305).contains(&counts[0]), "{counts:?}");
}

#[test]
fn peak_ewma_avoids_the_slow_and_the_failing() {
    let st = settings(Policy::PeakEwma, None);
    let (bal, s) = set_for(3, &[], &st, HealthSettings::default());
    for b in s.iter() {
        finish(b, Duration::from_millis(1), false);
    }
    finish(&s.backends[0], Duration::from_millis(100), false);
    // Fails fast: counts as slow all the same.
    finish(&s.backends[1], Duration::from_micros(50), true);
    let counts = picks(&bal, &s, 300, false);
    // Two random choices: the dearest is never taken, the second only when drawn
    // with the dearest (a third of draws).
    assert_eq!(
        counts[1], 0,
        "the failing endpoint is the dearest: {counts:?}"
    );
    assert!(counts[2] > 170 && counts[0] < 130, "{counts:?}");
}

#[test]
fn latency_first_keeps_a_slow_node_out_while_its_peers_are_busy_but_not_loaded() {
    for policy in [Policy::PeakEwma, Policy::Latency] {
        let st = settings(policy, None);
        let (bal, s) = set_for(3, &[], &st, HealthSettings::default());
        for _ in 0..20 {
            finish(&s.backends[0], Duration::from_millis(11), false);
            finish(&s.backends[1], Duration::from_millis(1), false);
            finish(&s.backends[2], Duration::from_millis(1), false);
        }
        // The fast nodes have calls in flight (a burst); the slow one has none.
        let busy: Vec<_> = (0..6)
            .flat_map(|_| [Held::on(&s.backends[1]), Held::on(&s.backends[2])])
            .collect();
        let counts = picks(&bal, &s, 300, false);
        match policy {
            // Linkerd's cost: 1 ms × 7 in flight against 11 ms × 1: close; the slow
            // node wins whenever drawn with a fast one (two thirds of draws).
            Policy::PeakEwma => assert!(counts[0] > 100, "{counts:?}"),
            _ => assert_eq!(counts[0], 0, "{counts:?}"),
        }
        drop(busy);
    }
}

#[test]
fn peak_ewma_tuning_sets_the_start_and_the_memory() {
    let st = Arc::new(BalanceSettings {
        policy: Policy::PeakEwma,
        ewma_decay: Duration::from_secs(1),
        default_rtt: Duration::from_millis(5),
        ..BalanceSettings::default()
    });
    let (_, s) = set_for(1, &[], &st, HealthSettings::default());
    let b = &s.backends[0];
    let fresh = b.latency_estimate(now_ns());
    assert!(
        (fresh - 5e6).abs() < 0.2e6,
        "new endpoint: 5 ms, got {fresh}"
    );
    finish(b, Duration::from_millis(200), false);
    // One second later (the decay window) about 63 % is forgotten, not 10 %.
    let later = b.latency_estimate(now_ns() + 1_000_000_000);
    assert!((60e6..80e6).contains(&later), "{later}");
}

#[test]
fn slow_start_ramps_a_returning_endpoint() {
    for policy in [Policy::RoundRobin, Policy::LeastRequest] {
        let st = settings(policy, Some(Duration::from_millis(400)));
        let (b, s) = set_for(3, &[], &st, HealthSettings::default());
        std::thread::sleep(Duration::from_millis(420));
        assert_eq!(s.backends[0].ramp(now_ns()), 1.0);
        s.backends[0].restart_slow_start();
        let ramp = s.backends[0].ramp(now_ns());
        assert!((0.1..0.15).contains(&ramp), "{ramp}");
        let counts = picks(&b, &s, 300, policy == Policy::LeastRequest);
        assert!(counts[0] < 45, "{policy}: {counts:?}");
        std::thread::sleep(Duration::from_millis(420));
        let counts = picks(&b, &s, 300, false);
        assert!(counts[0] > 60, "{policy} after the window: {counts:?}");
    }
}
