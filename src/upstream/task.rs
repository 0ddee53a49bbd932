//! An upstream's connection task: connect (and prove the peer speaks HTTP/2), keep the
//! connection with keep-alive pings, probe it when a call found it unresponsive, open
//! one more when every connection is full, close what goes unused, and reconnect with
//! backoff when a connection dies.

use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::Duration;

use super::connect::{connect, keepalive, probe, Driver};
use super::{CloseReason, Connection, Signals, State, Upstream, UpstreamConfig};
use crate::backoff::Backoff;

/// How often a connection is looked at: idleness, the peer's stream limit.
const LOOK_EVERY: Duration = Duration::from_secs(1);

/// An extra connection (beyond the first) without a stream for this long is closed.
const EXTRA_IDLE: Duration = Duration::from_secs(10);

/// How a connection's service ended.
enum Ended {
    /// It broke or the peer closed it (the message says how).
    Lost(String),
    /// It went unused for its idle time and was closed.
    Idle,
    /// The upstream is gone.
    Unused,
}

/// Runs the upstream's first connection for as long as the upstream lives.
pub(super) async fn run(this: Weak<Upstream>, signals: Arc<Signals>, config: UpstreamConfig) {
    let mut backoff = Backoff::new(config.backoff_min, config.backoff_max);
    loop {
        let Some(up) = this.upgrade() else { return };
        if up.state() == State::Idle {
            drop(up);
            // Wait for a call (or the upstream's end) before connecting again.
            loop {
                tokio::select! {
                    () = signals.wake.notified() => break,
                    () = tokio::time::sleep(Duration::from_secs(5)) => {
                        if this.strong_count() == 0 {
                            return;
                        }
                    }
                }
            }
            let Some(up) = this.upgrade() else { return };
            up.set_state(State::Connecting);
            continue;
        }
        let addr = up.addr.clone();
        drop(up);
        let Some(conn) = open(&this, &config).await else {
            backoff.sleep().await;
            continue;
        };
        let Some(up) = this.upgrade() else { return };
        up.suspect.store(false, Ordering::Relaxed);
        if up.state() != State::Ready {
            tracing::info!(backend = %addr, "backend connected");
        }
        up.set_state(State::Ready);
        drop(up);
        let connected_at = tokio::time::Instant::now();
        let ended = serve(&this, &signals, conn, &config, true).await;
        let Some(up) = this.upgrade() else { return };
        match ended {
            Ended::Idle => {
                tracing::debug!(backend = %addr, "backend connection closed: idle");
                up.set_state(State::Idle);
                continue;
            }
            Ended::Unused => return,
            Ended::Lost(e) => {
                up.set_state(State::Connecting);
                tracing::warn!(backend = %addr, error = %e, "backend connection lost");
            }
        }
        drop(up);
        // A connection that lived a while is re-established at once; one that died
        // young backs off, so a backend that accepts and drops is not hammered.
        if connected_at.elapsed() >= Duration::from_secs(1) {
            backoff.reset();
        } else {
            backoff.sleep().await;
        }
    }
}

/// A connection set up and proven, and the half that drives it.
struct Opened {
    conn: Weak<Connection>,
    driver: Driver,
    ping: Option<h2::PingPong>,
}

/// Connects, proves the peer speaks HTTP/2, and adds the connection to the upstream;
/// `None` (with the upstream marked failed, and logged once) if that fails.
async fn open(this: &Weak<Upstream>, config: &UpstreamConfig) -> Option<Opened> {
    let addr = this.upgrade()?.addr.clone();
    let attempt = tokio::time::timeout(config.connect_timeout, connect(&addr, config)).await;
    let up = this.upgrade()?;
    let why = match attempt {
        Ok(Ok((sender, mut driver))) => {
            let ping = driver.ping_pong();
            // The HTTP/2 handshake only sends our preface; make sure the peer really
            // answers HTTP/2 before calls are sent its way.
            let probed = tokio::select! {
                r = tokio::time::timeout(config.connect_timeout, probe(&sender)) => match r {
                    Ok(Ok(())) => Ok(()),
                    Ok(Err(e)) => Err(e.to_string()),
                    Err(_) => Err(format!("no HTTP/2 answer within {:?}", config.connect_timeout)),
                },
                r = &mut driver => Err(match r {
                    Ok(()) => "connection closed during probe".to_owned(),
                    Err(e) => e.to_string(),
                }),
            };
            match probed {
                Ok(()) => {
                    // The probe's answer came after the peer's SETTINGS: its stream
                    // limit is known now.
                    let conn = Connection::new(sender);
                    let weak = Arc::downgrade(&conn);
                    up.add_connection(conn);
                    return Some(Opened {
                        conn: weak,
                        driver,
                        ping,
                    });
                }
                Err(e) => format!("backend does not answer HTTP/2: {e}"),
            }
        }
        Ok(Err(e)) => format!("backend unreachable: {e}"),
        Err(_) => format!(
            "backend connect timed out after {:?}",
            config.connect_timeout
        ),
    };
    // An extra connection failing says nothing new while the first one is up.
    if up.conns.load().is_empty() {
        if up.state() != State::Failed {
            tracing::warn!(backend = %addr, error = %why, "backing off");
        }
        up.set_state(State::Failed);
    } else {
        tracing::debug!(backend = %addr, error = %why, "cannot open one more connection");
    }
    None
}

/// Serves one connection until it ends, is closed for idleness, or the upstream is gone.
/// The first connection (`first`) also probes on request and opens extra connections.
/// The connection is not dropped for an unanswered probe: a backend busy with long
/// streams up to its stream limit would lose them all; a dead peer is found by the
/// keep-alive pings.
async fn serve(
    this: &Weak<Upstream>,
    signals: &Signals,
    opened: Opened,
    config: &UpstreamConfig,
    first: bool,
) -> Ended {
    let Opened {
        conn,
        mut driver,
        ping,
    } = opened;
    let keepalive = keepalive(ping, config.keepalive_interval);
    tokio::pin!(keepalive);
    let idle_after = match (first, config.idle_timeout) {
        (true, t) => t,
        (false, t) => Some(t.map_or(EXTRA_IDLE, |t| t.min(EXTRA_IDLE))),
    };
    let mut look = tokio::time::interval(LOOK_EVERY);
    look.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut unused_for = Duration::ZERO;
    let ended = loop {
        tokio::select! {
            r = &mut driver => break Ended::Lost(match r {
                Ok(()) => "closed by the backend".to_owned(),
                Err(e) => e.to_string(),
            }),
            e = &mut keepalive => break Ended::Lost(e),
            () = signals.check.notified(), if first => {
                if let Some(e) = probe_until_answered(this, &conn, Pin::new(&mut driver), config).await {
                    break e;
                }
            }
            _ = look.tick() => {
                let Some(up) = this.upgrade() else { break Ended::Unused };
                let Some(c) = conn.upgrade() else { break Ended::Lost("dropped".into()) };
                c.refresh_room();
                // Streams besides the pool's reference and this one.
                let busy = Arc::strong_count(&c) > 2 || (first && up.used.swap(false, Ordering::Relaxed));
                unused_for = if busy { Duration::ZERO } else { unused_for + LOOK_EVERY };
                if idle_after.is_some_and(|t| unused_for >= t) {
                    break Ended::Idle;
                }
            }
        }
    };
    let Some(up) = this.upgrade() else {
        // Gone: let the streams still on the connection finish.
        let _ = driver.await;
        return Ended::Unused;
    };
    if let Some(c) = conn.upgrade() {
        let why = match ended {
            Ended::Idle => CloseReason::Idle,
            Ended::Lost(_) => CloseReason::Lost,
            Ended::Unused => CloseReason::Unused,
        };
        up.remove_connection(&c, why);
    }
    drop(up);
    if let Ended::Idle = ended {
        // No stream is left (or the last ones finish): close once they are done.
        tokio::spawn(async move {
            let _ = driver.await;
        });
    }
    ended
}

/// Probes the connection until it answers (the upstream is suspect meanwhile); the
/// connection's end, if it ends first.
async fn probe_until_answered(
    this: &Weak<Upstream>,
    conn: &Weak<Connection>,
    mut driver: Pin<&mut Driver>,
    config: &UpstreamConfig,
) -> Option<Ended> {
    let mut warned = false;
    loop {
        // Take a sender for the probe only (holding one for good would keep the
        // connection open after the upstream is gone).
        let Some(sender) = conn.upgrade().map(|c| c.send.clone()) else {
            return Some(Ended::Lost("dropped".into()));
        };
        let probed = tokio::select! {
            r = tokio::time::timeout(config.connect_timeout, probe(&sender)) => r,
            r = driver.as_mut() => return Some(Ended::Lost(match r {
                Ok(()) => "closed by the backend".to_owned(),
                Err(e) => e.to_string(),
            })),
        };
        drop(sender);
        let up = this.upgrade()?;
        let error = match probed {
            Ok(Ok(())) => {
                up.suspect.store(false, Ordering::Relaxed);
                if warned {
                    tracing::info!(backend = %up.addr, "backend answers again");
                }
                return None;
            }
            Ok(Err(e)) => e.to_string(),
            Err(_) => format!("no answer within {:?}", config.connect_timeout),
        };
        if !warned {
            tracing::warn!(backend = %up.addr, %error, "backend does not answer a probe on its connection; calls prefer other backends");
            warned = true;
        }
        drop(up);
        tokio::select! {
            () = tokio::time::sleep(config.connect_timeout) => {}
            r = driver.as_mut() => return Some(Ended::Lost(match r {
                Ok(()) => "closed by the backend".to_owned(),
                Err(e) => e.to_string(),
            })),
        }
    }
}

/// Opens one more connection whenever a call found every connection full, for as long
/// as the upstream lives.
pub(super) async fn grow(this: Weak<Upstream>, signals: Arc<Signals>, config: UpstreamConfig) {
    loop {
        tokio::select! {
            () = signals.more.notified() => {}
            () = tokio::time::sleep(Duration::from_secs(5)) => {
                if this.strong_count() == 0 {
                    return;
                }
                continue;
            }
        }
        tokio::spawn(extra(this.clone(), Arc::clone(&signals), config.clone()));
    }
}

/// Opens one more connection and serves it until it goes unused or ends.
async fn extra(this: Weak<Upstream>, signals: Arc<Signals>, config: UpstreamConfig) {
    let Some(opened) = open(&this, &config).await else {
        if let Some(up) = this.upgrade() {
            up.growth_failed();
        }
        return;
    };
    if let Some(up) = this.upgrade() {
        tracing::debug!(backend = %up.addr, connections = up.conns.load().len(), "every connection was full: one more opened");
    }
    serve(&this, &signals, opened, &config, false).await;
}
