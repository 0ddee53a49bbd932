//! Endpoint health, one state per endpoint that every balancing policy reads: what
//! counts as a backend failing a call, passive outlier ejection (failures in a row take
//! an endpoint out for a while, capped per service), and what active health checks say.
//! The connection-level "suspect, then probe" state of a frozen backend stays with its
//! connection ([`crate::upstream`]); the balancer reads both.

use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use arc_swap::{ArcSwap, Guard};

pub mod active;

use crate::clock::now_ns;
use crate::endpoint::BackendAddr;

/// A set of gRPC status codes (0-16) that count as the backend failing the call.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct FailureCodes(u32);

impl FailureCodes {
    /// No code counts.
    pub const NONE: Self = Self(0);

    /// The default: UNAVAILABLE (14) only, the status of a node that cannot serve.
    pub const DEFAULT: Self = Self(1 << 14);

    /// Whether `code` (a `grpc-status` value) is in the set.
    #[inline]
    pub fn contains(self, code: u8) -> bool {
        code < 17 && self.0 & (1 << code) != 0
    }

    /// The codes in the set, lowest first.
    pub fn iter(self) -> impl Iterator<Item = u8> {
        (0..17u8).filter(move |c| self.contains(*c))
    }
}

impl Default for FailureCodes {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// A failure-code list that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a gRPC status code (0-16); give a comma-separated list such as \"14\" or \"13,14\"")]
pub struct BadFailureCode(String);

impl FromStr for FailureCodes {
    type Err = BadFailureCode;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut set = 0u32;
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            match part.parse::<u8>() {
                Ok(c) if c < 17 => set |= 1 << c,
                _ => return Err(BadFailureCode(part.to_owned())),
            }
        }
        Ok(Self(set))
    }
}

impl fmt::Display for FailureCodes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let codes: Vec<String> = self.iter().map(|c| c.to_string()).collect();
        f.write_str(&codes.join(","))
    }
}

impl fmt::Debug for FailureCodes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "FailureCodes({self})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failure_codes_parse() {
        let c: FailureCodes = "14".parse().unwrap();
        assert!(c.contains(14) && !c.contains(13) && !c.contains(17));
        let c: FailureCodes = " 13, 14 ,2".parse().unwrap();
        assert_eq!(c.to_string(), "2,13,14");
        assert_eq!("".parse::<FailureCodes>().unwrap(), FailureCodes::NONE);
        assert!("17".parse::<FailureCodes>().is_err());
        assert!("x"
            .parse::<FailureCodes>()
            .unwrap_err()
            .to_string()
            .contains("\"x\""));
    }
}

/// How calls ending on an endpoint count for its health.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallResult {
    /// The backend served the call (any status not in the failure codes).
    Success,
    /// The backend failed the call (connection or stream failed, or a failure status).
    Failure,
    /// Says nothing of the backend (the client cancelled, or its deadline passed).
    Ignored,
}

/// Longest an endpoint stays ejected, however often it was ejected in a row.
pub const MAX_EJECTION: Duration = Duration::from_secs(300);

/// Whether the proxy checks endpoints' health itself, and how.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ActiveCheck {
    /// No active checks: only calls' outcomes tell.
    #[default]
    None,
    /// `grpc.health.v1.Health` Watch (or Check every interval) for the endpoint's service.
    Grpc,
}

impl FromStr for ActiveCheck {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "none" => Ok(Self::None),
            "grpc" => Ok(Self::Grpc),
            _ => Err(format!(
                "{s:?} is not a health check (choose one of: none, grpc)"
            )),
        }
    }
}

impl fmt::Display for ActiveCheck {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::None => "none",
            Self::Grpc => "grpc",
        })
    }
}

/// Settings of passive outlier ejection and active health checks.
#[derive(Debug, Clone, PartialEq)]
pub struct HealthSettings {
    /// Failures in a row that eject an endpoint (0: never eject).
    pub eject_after: u32,
    /// How long the first ejection lasts; doubled for each ejection in a row.
    pub eject_for: Duration,
    /// Most of a service's endpoints ejected (or unhealthy) at once, in percent.
    pub max_ejected_percent: u8,
    /// Statuses that count as the backend failing the call.
    pub failure_codes: FailureCodes,
    /// Active health checks.
    pub check: ActiveCheck,
    /// Interval of health Check calls when the backend does not implement Watch.
    pub check_interval: Duration,
}

impl Default for HealthSettings {
    fn default() -> Self {
        Self {
            eject_after: 5,
            eject_for: Duration::from_secs(30),
            max_ejected_percent: 50,
            failure_codes: FailureCodes::DEFAULT,
            check: ActiveCheck::None,
            check_interval: Duration::from_secs(5),
        }
    }
}

/// What an active check last said of an endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum CheckState {
    /// No answer yet (or no active checks): calls go there.
    Unknown = 0,
    /// SERVING.
    Serving = 1,
    /// NOT_SERVING, or no answer: no calls while the cap allows.
    NotServing = 2,
}

/// One endpoint's health: its failures in a row, its ejection, what active checks say.
/// Atomics only: the per-call path reads [`EndpointHealth::is_out`] without a lock.
/// In declared order (`repr(C)`): what every pick reads comes first, within one cache line.
#[derive(Debug, Default)]
#[repr(C)]
pub struct EndpointHealth {
    /// Until when it is ejected ([`now_ns`]); 0: not ejected.
    ejected_until: AtomicU64,
    /// Whether the active check's NOT_SERVING takes it out (the cap allowed it).
    check_out: AtomicBool,
    failures: AtomicU32,
    /// Ejections in a row (the next lasts `eject_for` × 2^this).
    times_ejected: AtomicU32,
    /// When it last came back from an ejection; 0: it never was ejected.
    returned_at: AtomicU64,
    /// When it was last ejected or found unhealthy ([`now_ns`]), for the admin view.
    last_failure_at: AtomicU64,
    check: AtomicU8,
    /// The generation of active checks whose checker runs for it (0: none).
    checker: AtomicU64,
}

impl EndpointHealth {
    /// Whether the endpoint is out of rotation now (ejected, or unhealthy by its active
    /// check). One atomic load unless it is or was ejected.
    #[inline]
    pub fn is_out(&self, now: impl Fn() -> u64) -> bool {
        let until = self.ejected_until.load(Ordering::Relaxed);
        (until != 0 && now() < until) || self.check_out.load(Ordering::Relaxed)
    }

    /// Until when the endpoint is ejected, if it is.
    pub fn ejected_until(&self, now: u64) -> Option<u64> {
        let until = self.ejected_until.load(Ordering::Relaxed);
        (until > now).then_some(until)
    }

    /// Whether the active check has taken the endpoint out.
    pub fn is_unhealthy(&self) -> bool {
        self.check_out.load(Ordering::Relaxed)
    }

    /// What the active check last said.
    pub fn check_state(&self) -> CheckState {
        match self.check.load(Ordering::Relaxed) {
            1 => CheckState::Serving,
            2 => CheckState::NotServing,
            _ => CheckState::Unknown,
        }
    }

    /// Failures in a row so far.
    pub fn failures(&self) -> u32 {
        self.failures.load(Ordering::Relaxed)
    }

    /// When it was last ejected or found unhealthy ([`now_ns`]), if ever.
    pub fn last_failure_at(&self) -> Option<u64> {
        let at = self.last_failure_at.load(Ordering::Relaxed);
        (at != 0).then_some(at)
    }

    /// When it last came back from an ejection, if ever.
    pub fn returned_at(&self) -> Option<u64> {
        let at = self.returned_at.load(Ordering::Relaxed);
        (at != 0).then_some(at)
    }

    fn out_at(&self, now: u64) -> bool {
        self.ejected_until(now).is_some() || self.is_unhealthy()
    }

    /// Forgets what active checks said (they were turned off).
    fn forget_check(&self) {
        self.check
            .store(CheckState::Unknown as u8, Ordering::Relaxed);
        self.check_out.store(false, Ordering::Relaxed);
        self.checker.store(0, Ordering::Relaxed);
    }
}

/// An endpoint as its service's health accounting knows it. The balancer's backends
/// keep their [`EndpointHealth`] inline, so that the per-call pick reads it without
/// following one more pointer, and are the members of their service's health.
pub trait Member: Send + Sync + 'static {
    /// The endpoint's health state.
    fn health(&self) -> &EndpointHealth;
}

/// Lets the unit tests here account bare endpoint states.
#[cfg(test)]
impl Member for EndpointHealth {
    fn health(&self) -> &EndpointHealth {
        self
    }
}

/// One member of a service's health: held weakly, as a backend holds its service's
/// health (an endpoint gone stops counting, and its checker stops).
pub type MemberRef = (Weak<dyn Member>, BackendAddr);

/// What happened to an endpoint's rotation, for the caller to log and count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// Nothing worth telling.
    None,
    /// Ejected for this long.
    Ejected(Duration),
    /// Would have been ejected, but the cap keeps it in rotation.
    Capped,
    /// Back in rotation after an ejection.
    Returned,
}

/// The health of one service's endpoints: the cap on how many are out at once applies
/// across them.
#[derive(Debug)]
pub struct ServiceHealth {
    /// The service's name, for logs.
    name: Box<str>,
    /// Swapped whole by a reload; read without a lock as each call ends.
    settings: ArcSwap<HealthSettings>,
    /// The service's endpoints, with their addresses (for active checks).
    members: ArcSwap<Vec<MemberRef>>,
    /// Serialises decisions that count members (ejections, checks) and the start and
    /// stop of active checks: rare, never per call.
    deciding: Mutex<()>,
    /// The generation of active checks (from 1): a change of the check's kind or
    /// interval starts a new one, and the checkers of older ones stop.
    checks: tokio::sync::watch::Sender<u64>,
}

impl Default for ServiceHealth {
    fn default() -> Self {
        Self::new("", HealthSettings::default())
    }
}

impl ServiceHealth {
    /// Health accounting of service `name` with `settings`.
    pub fn new(name: &str, settings: HealthSettings) -> Self {
        Self {
            name: name.into(),
            settings: ArcSwap::from_pointee(settings),
            members: ArcSwap::default(),
            deciding: Mutex::new(()),
            checks: tokio::sync::watch::Sender::new(1),
        }
    }

    /// The service's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The settings in force.
    pub fn settings(&self) -> Guard<Arc<HealthSettings>> {
        self.settings.load()
    }

    fn deciding(&self) -> std::sync::MutexGuard<'_, ()> {
        self.deciding.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs with `settings` from now on (a reload): ejection's settings apply to the
    /// next call's end; a change of the active check's kind or interval restarts the
    /// checks (turned off, what they said is forgotten). Endpoints keep their failures
    /// and ejections.
    /// Returns whether the settings changed. Call within the runtime.
    pub fn set_settings(self: &Arc<Self>, settings: HealthSettings) -> bool {
        let _guard = self.deciding();
        let old = self.settings.load_full();
        if *old == settings {
            return false;
        }
        let restart = (old.check, old.check_interval) != (settings.check, settings.check_interval);
        let off = settings.check == ActiveCheck::None;
        self.settings.store(Arc::new(settings));
        if restart {
            // Checkers of the old generation stop; what they said stays until the new
            // ones answer, unless checks are off now.
            self.checks.send_modify(|g| *g += 1);
            let members = self.members.load();
            if off {
                for ep in members.iter().filter_map(|(m, _)| m.upgrade()) {
                    ep.health().forget_check();
                }
            }
            self.start_checks(&members);
        }
        true
    }

    /// The service's current endpoints (called when its endpoint set changes); their
    /// active checks start when configured (call within the runtime).
    pub fn set_members(self: &Arc<Self>, members: Vec<MemberRef>) {
        let _guard = self.deciding();
        self.start_checks(&members);
        self.members.store(Arc::new(members));
    }

    /// Starts the active checks of `members` that have none of the current generation
    /// (under `deciding`).
    fn start_checks(self: &Arc<Self>, members: &[MemberRef]) {
        if self.settings.load().check != ActiveCheck::Grpc {
            return;
        }
        let generation = *self.checks.borrow();
        for (member, addr) in members {
            let Some(ep) = member.upgrade() else { continue };
            if ep.health().checker.swap(generation, Ordering::Relaxed) != generation {
                active::spawn(
                    Arc::clone(self),
                    member.clone(),
                    addr,
                    self.checks.subscribe(),
                );
            }
        }
    }

    /// How a call that ended with `failed` / `ok` counts, by the failure codes.
    #[inline]
    pub fn classify_status(&self, status: u8) -> CallResult {
        if self.settings.load().failure_codes.contains(status) {
            CallResult::Failure
        } else {
            CallResult::Success
        }
    }

    /// Whether one more endpoint may be taken out of rotation now.
    fn may_take_out(&self, now: u64, max_percent: u8) -> bool {
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

    /// Takes what an active check said of `ep`; returns whether the endpoint is now out
    /// of rotation by it.
    pub fn checked(&self, ep: &EndpointHealth, state: CheckState) -> bool {
        let generation = *self.checks.borrow();
        self.checked_by(generation, ep, state)
    }

    /// As [`ServiceHealth::checked`], said by a check of `generation`: ignored (false)
    /// if the checks were restarted or turned off since.
    fn checked_by(&self, generation: u64, ep: &EndpointHealth, state: CheckState) -> bool {
        let _guard = self.deciding();
        if *self.checks.borrow() != generation {
            return false;
        }
        ep.check.store(state as u8, Ordering::Relaxed);
        if state != CheckState::NotServing {
            ep.check_out.store(false, Ordering::Relaxed);
            return false;
        }
        if ep.is_unhealthy() {
            return true;
        }
        let now = now_ns();
        let out = self.may_take_out(now, self.settings.load().max_ejected_percent);
        ep.check_out.store(out, Ordering::Relaxed);
        if out {
            ep.last_failure_at.store(now, Ordering::Relaxed);
        }
        out
    }
}

#[cfg(test)]
mod ejection_tests {
    use super::*;

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
