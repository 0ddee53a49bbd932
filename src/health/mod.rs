//! Endpoint health, one state per endpoint that every balancing policy reads: what
//! counts as a backend failing a call, passive outlier ejection (failures in a row take
//! an endpoint out for a while, capped per service), and what active health checks say.
//! The connection-level "suspect, then probe" state of a frozen backend stays with its
//! connection ([`crate::upstream`]); the balancer reads both.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Weak};

use parking_lot::{Mutex, MutexGuard};
use std::time::Duration;

use arc_swap::{ArcSwap, Guard};

pub mod active;
mod ejection;
mod settings;

pub use active::tcp_probe;
pub use ejection::MAX_EJECTION;
pub use settings::{ActiveCheck, BadFailureCode, FailureCodes, HealthSettings, UnknownCheck};

use crate::clock::now_ns;
use crate::endpoint::BackendAddr;

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
    #[cfg(test)]
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

    /// The endpoint's pooled connections, which active checks use (`None`: not checked).
    fn upstream(&self) -> Option<std::sync::Arc<crate::upstream::Upstream>> {
        None
    }
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

    fn deciding(&self) -> MutexGuard<'_, ()> {
        self.deciding.lock()
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
        if self.settings.load().check == ActiveCheck::None {
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

    /// Takes what an active check said of `ep`; returns whether the endpoint is now out
    /// of rotation by it.
    #[cfg(test)]
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
