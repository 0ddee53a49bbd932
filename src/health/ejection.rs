//! Passive outlier ejection: failures in a row take an endpoint out of rotation for a
//! while (doubled for each ejection in a row, forgiven after serving well), never more
//! of a service's endpoints at once than its cap allows, and never the last one.

use std::sync::atomic::Ordering;
use std::time::Duration;

use super::{CallResult, Change, EndpointHealth, ServiceHealth};
use crate::clock::now_ns;

/// Longest an endpoint stays ejected, however often it was ejected in a row.
pub const MAX_EJECTION: Duration = Duration::from_secs(300);

impl ServiceHealth {
    /// Whether one more endpoint may be taken out of rotation now.
    pub(super) fn may_take_out(&self, now: u64, max_percent: u8) -> bool {
        let members = self.members.load();
        // Endpoints gone since the last snapshot count neither way.
        let (n, out) = members
            .iter()
            .filter_map(|(m, _)| m.upgrade())
            .fold((0usize, 0usize), |(n, out), m| {
                (n + 1, out + usize::from(m.health().out_at(now)))
            });
        let allowed = (n * usize::from(max_percent) / 100).min(n.saturating_sub(1));
        out < allowed
    }

    /// Accounts one call's end on `ep`; says what changed.
    pub fn report(&self, ep: &EndpointHealth, result: CallResult) -> Change {
        let settings = self.settings.load();
        if settings.eject_after == 0 {
            return Change::None;
        }
        let now = now_ns();
        let mut change = Change::None;
        // Coming back: the first call after an ejection ended.
        let until = ep.ejected_until.load(Ordering::Relaxed);
        if until != 0
            && now >= until
            && ep
                .ejected_until
                .compare_exchange(until, 0, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            ep.returned_at.store(now, Ordering::Relaxed);
            change = Change::Returned;
        }
        match result {
            CallResult::Ignored => change,
            CallResult::Success => {
                ep.failures.store(0, Ordering::Relaxed);
                // Serving well for a base ejection time since coming back: forgiven.
                let back = ep.returned_at.load(Ordering::Relaxed);
                if back != 0 && now.saturating_sub(back) >= settings.eject_for.as_nanos() as u64 {
                    ep.times_ejected.store(0, Ordering::Relaxed);
                    ep.returned_at.store(0, Ordering::Relaxed);
                }
                change
            }
            CallResult::Failure => {
                let failures = ep.failures.fetch_add(1, Ordering::Relaxed) + 1;
                // Right after coming back, one failure is enough.
                let on_probation = ep.returned_at.load(Ordering::Relaxed) != 0
                    && ep.times_ejected.load(Ordering::Relaxed) > 0;
                if failures < settings.eject_after && !on_probation {
                    return change;
                }
                if ep.ejected_until(now).is_some() {
                    return change;
                }
                let _guard = self.deciding();
                if !self.may_take_out(now, settings.max_ejected_percent) {
                    return Change::Capped;
                }
                let times = ep.times_ejected.fetch_add(1, Ordering::Relaxed).min(16);
                let length = settings
                    .eject_for
                    .saturating_mul(1 << times)
                    .min(MAX_EJECTION.max(settings.eject_for));
                ep.ejected_until
                    .store(now + length.as_nanos() as u64, Ordering::Relaxed);
                ep.failures.store(0, Ordering::Relaxed);
                ep.returned_at.store(0, Ordering::Relaxed);
                ep.last_failure_at.store(now, Ordering::Relaxed);
                Change::Ejected(length)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Weak};

    use super::super::{CheckState, Member};
    use super::*;
    use crate::clock::now_ns;
    use crate::health::HealthSettings;

    fn service(
        n: usize,
        settings: HealthSettings,
    ) -> (Arc<ServiceHealth>, Vec<Arc<EndpointHealth>>) {
        let s = Arc::new(ServiceHealth::new("svc", settings));
        let eps: Vec<_> = (0..n)
            .map(|_| Arc::new(EndpointHealth::default()))
            .collect();
        s.set_members(
            eps.iter()
                .enumerate()
                .map(|(i, ep)| {
                    (
                        Arc::downgrade(ep) as Weak<dyn Member>,
                        format!("127.0.0.1:{}", 1000 + i).parse().unwrap(),
                    )
                })
                .collect(),
        );
        (s, eps)
    }

    fn fail(s: &ServiceHealth, ep: &EndpointHealth, times: usize) -> Change {
        (0..times).fold(Change::None, |_, _| s.report(ep, CallResult::Failure))
    }

    #[test]
    fn failures_in_a_row_eject_and_successes_reset() {
        let (s, eps) = service(3, HealthSettings::default());
        assert_eq!(fail(&s, &eps[0], 4), Change::None);
        s.report(&eps[0], CallResult::Success);
        assert_eq!(fail(&s, &eps[0], 4), Change::None);
        // Cancelled calls neither count nor reset.
        s.report(&eps[0], CallResult::Ignored);
        assert_eq!(
            s.report(&eps[0], CallResult::Failure),
            Change::Ejected(Duration::from_secs(30))
        );
        assert!(eps[0].is_out(now_ns));
        assert!(!eps[1].is_out(now_ns));
    }

    #[test]
    fn the_cap_keeps_half_and_never_the_last() {
        let (s, eps) = service(3, HealthSettings::default());
        assert!(matches!(fail(&s, &eps[0], 5), Change::Ejected(_)));
        // 50 % of 3: one endpoint at most.
        assert_eq!(fail(&s, &eps[1], 5), Change::Capped);
        assert!(!eps[1].is_out(now_ns));
        let (s, eps) = service(1, HealthSettings::default());
        assert_eq!(fail(&s, &eps[0], 5), Change::Capped);
        let all = HealthSettings {
            max_ejected_percent: 100,
            ..HealthSettings::default()
        };
        let (s, eps) = service(2, all);
        assert!(matches!(fail(&s, &eps[0], 5), Change::Ejected(_)));
        assert_eq!(fail(&s, &eps[1], 5), Change::Capped, "never the last one");
    }

    #[test]
    fn a_returning_endpoint_is_ejected_again_for_twice_as_long() {
        let settings = HealthSettings {
            eject_for: Duration::from_millis(50),
            ..HealthSettings::default()
        };
        let (s, eps) = service(3, settings);
        assert_eq!(
            fail(&s, &eps[0], 5),
            Change::Ejected(Duration::from_millis(50))
        );
        std::thread::sleep(Duration::from_millis(60));
        assert!(!eps[0].is_out(now_ns), "back after its time");
        // The first call back fails: out again at once, for twice as long.
        assert_eq!(
            s.report(&eps[0], CallResult::Failure),
            Change::Ejected(Duration::from_millis(100))
        );
        std::thread::sleep(Duration::from_millis(110));
        assert_eq!(s.report(&eps[0], CallResult::Success), Change::Returned);
        // Serving well for a while: forgiven, five failures again before the next.
        std::thread::sleep(Duration::from_millis(60));
        s.report(&eps[0], CallResult::Success);
        assert_eq!(fail(&s, &eps[0], 4), Change::None);
        assert_eq!(
            s.report(&eps[0], CallResult::Failure),
            Change::Ejected(Duration::from_millis(50))
        );
    }

    #[test]
    fn zero_turns_ejection_off() {
        let (s, eps) = service(
            3,
            HealthSettings {
                eject_after: 0,
                ..HealthSettings::default()
            },
        );
        assert_eq!(fail(&s, &eps[0], 50), Change::None);
        assert!(!eps[0].is_out(now_ns));
    }

    #[test]
    fn settings_swap_live_and_endpoints_keep_their_state() {
        let off = HealthSettings {
            eject_after: 0,
            max_ejected_percent: 100,
            ..HealthSettings::default()
        };
        let (s, eps) = service(3, off.clone());
        assert_eq!(fail(&s, &eps[0], 10), Change::None);
        assert!(s.checked(&eps[1], CheckState::NotServing));
        // Ejection on: the next failures count.
        assert!(s.set_settings(HealthSettings {
            eject_after: 2,
            ..off.clone()
        }));
        assert!(!s.set_settings(HealthSettings {
            eject_after: 2,
            ..off.clone()
        }));
        assert_eq!(fail(&s, &eps[0], 1), Change::None);
        assert!(matches!(fail(&s, &eps[0], 1), Change::Ejected(_)));
        // The check's settings changed (checks stay off): what they said is forgotten,
        // and a checker of the old generation is not heard any more.
        assert!(eps[1].is_out(now_ns));
        assert!(s.set_settings(HealthSettings {
            eject_after: 2,
            check_interval: Duration::from_secs(1),
            ..off
        }));
        assert!(!eps[1].is_out(now_ns));
        assert_eq!(eps[1].check_state(), CheckState::Unknown);
        assert!(!s.checked_by(1, &eps[1], CheckState::NotServing));
        assert!(!eps[1].is_out(now_ns));
        // The ejection made before stays.
        assert!(eps[0].is_out(now_ns));
    }

    #[test]
    fn active_checks_take_out_within_the_cap() {
        let (s, eps) = service(2, HealthSettings::default());
        assert!(s.checked(&eps[0], CheckState::NotServing));
        assert!(eps[0].is_out(now_ns));
        assert!(
            !s.checked(&eps[1], CheckState::NotServing),
            "never the last one"
        );
        assert!(!s.checked(&eps[0], CheckState::Serving));
        assert!(!eps[0].is_out(now_ns));
    }
}
