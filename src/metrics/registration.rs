//! Metrics of the leased keys a process (the `register` sidecar, or the proxy's own
//! registrations) holds in etcd for its backends.

use prometheus::{IntCounterVec, IntGaugeVec, Opts, Registry};

use super::export::register;

/// What happened to a registration (the `event` label of `switchyard_registration_events_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, strum::IntoStaticStr)]
#[strum(serialize_all = "snake_case")]
pub enum RegistrationEvent {
    /// The key was put in etcd (at start, under a new lease after one was lost, or back
    /// after a pause).
    Registered,
    /// The lease was lost (expired, or keep-alive failed) while the backend still runs.
    LeaseLost,
    /// The key was deleted and its lease revoked on a clean shutdown.
    Deregistered,
}

impl RegistrationEvent {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        self.into()
    }
}

/// Metrics of the leased keys this process holds in etcd for its backends.
#[derive(Debug, Clone)]
pub struct RegistrationMetrics {
    held: IntGaugeVec,
    events: IntCounterVec,
}

impl RegistrationMetrics {
    /// Creates the registration metrics and registers them in `registry`.
    pub fn new(registry: &Registry) -> Self {
        let held = IntGaugeVec::new(
            Opts::new(
                "switchyard_registrations",
                "Keys this process currently holds alive in etcd, by service.",
            ),
            &["service"],
        );
        let events = IntCounterVec::new(
            Opts::new(
                "switchyard_registration_events_total",
                "Registration events by service and event (registered, lease_lost, deregistered).",
            ),
            &["service", "event"],
        );
        let (Ok(held), Ok(events)) = (held, events) else {
            unreachable!("static metric definitions are valid")
        };
        Self {
            held: register(registry, held),
            events: register(registry, events),
        }
    }

    /// Sets how many keys of `service` this process holds alive right now.
    pub fn set_held(&self, service: &str, keys: i64) {
        self.held.with_label_values(&[service]).set(keys);
    }

    /// Adds `delta` (negative to remove) to the keys of `service` held alive.
    pub fn add_held(&self, service: &str, delta: i64) {
        self.held.with_label_values(&[service]).add(delta);
    }

    /// Counts one `event` for `service`.
    pub fn event(&self, service: &str, event: RegistrationEvent) {
        self.events
            .with_label_values(&[service, event.as_str()])
            .inc();
    }
}

#[cfg(test)]
mod tests {
    use super::super::export::render;
    use super::*;

    #[test]
    fn registrations_are_exposed() {
        let registry = Registry::new();
        let m = RegistrationMetrics::new(&registry);
        m.set_held("a", 2);
        m.event("a", RegistrationEvent::Registered);
        m.event("a", RegistrationEvent::LeaseLost);
        m.event("a", RegistrationEvent::Registered);
        let text = String::from_utf8(render(&registry)).unwrap();
        assert!(text.contains(r#"switchyard_registrations{service="a"} 2"#));
        assert!(text
            .contains(r#"switchyard_registration_events_total{event="registered",service="a"} 2"#));
        assert!(text
            .contains(r#"switchyard_registration_events_total{event="lease_lost",service="a"} 1"#));
    }
}
