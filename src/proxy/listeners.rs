//! The running listeners: one accept loop each, which a reload can add, remove or
//! re-point without cutting a call.
//!
//! A listener's new connections are served with its current [`Serving`] (the forwarder
//! that routes its calls, the HTTP/2 settings, TLS), which a reload replaces. When the
//! bound service of a listener changes, its open connections are told to go away
//! (GOAWAY: the calls in flight finish; clients reconnect and get the new service).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;
use tokio_util::task::TaskTracker;

use super::conn::{self, ServerSettings};
use super::forward::Forwarder;
use crate::route::ServiceName;

/// Time allowed for a client's TLS handshake.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// How a listener's new connections are served.
pub(crate) struct Serving {
    /// Routes the listener's calls.
    pub forwarder: Arc<Forwarder>,
    /// HTTP/2 settings and time limits.
    pub settings: Arc<ServerSettings>,
    /// TLS on the listener, if on.
    pub acceptor: Option<TlsAcceptor>,
}

/// What all listeners share: the client connections' tasks and their limit.
#[derive(Clone)]
pub(crate) struct ClientConnections {
    /// Every connection task, for the drain.
    pub tracker: TaskTracker,
    /// Bounds the number of client connections.
    pub connections: Arc<Semaphore>,
}

/// What a listener's accept loop serves new connections with.
struct Current {
    serving: Serving,
    /// Turns true when these connections are to go away.
    conns: watch::Receiver<bool>,
}

/// One running listener.
struct Running {
    service: Option<ServiceName>,
    current: watch::Sender<Arc<Current>>,
    /// Tells the connections accepted under the current service to go away.
    conns: watch::Sender<bool>,
    /// Stops the accept loop (the socket closes).
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl Running {
    /// Closes the socket (after taking what the kernel queued on it) and tells every
    /// connection to go away.
    async fn close(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
        let _ = self.conns.send(true);
    }
}

/// The running listeners, by address.
pub(crate) struct Listeners {
    running: BTreeMap<SocketAddr, Running>,
    shared: ClientConnections,
}

impl Listeners {
    /// No listener yet.
    pub(crate) fn new(shared: ClientConnections) -> Self {
        Self {
            running: BTreeMap::new(),
            shared,
        }
    }

    /// The addresses listened on, with their bound service.
    pub(crate) fn bound(&self) -> impl Iterator<Item = (SocketAddr, Option<&ServiceName>)> {
        self.running.iter().map(|(a, r)| (*a, r.service.as_ref()))
    }

    /// Starts accepting on `listener` (at `addr`).
    pub(crate) fn start(
        &mut self,
        addr: SocketAddr,
        listener: TcpListener,
        service: Option<ServiceName>,
        serving: Serving,
    ) {
        tracing::info!(listen = %addr, service = service.as_ref().map(ServiceName::as_str), "listening");
        let (conns, conns_rx) = watch::channel(false);
        let (current, current_rx) = watch::channel(Arc::new(Current {
            serving,
            conns: conns_rx,
        }));
        let (stop, stop_rx) = watch::channel(false);
        let task = tokio::spawn(accept_loop(
            listener,
            current_rx,
            self.shared.clone(),
            stop_rx,
        ));
        self.running.insert(
            addr,
            Running {
                service,
                current,
                conns,
                stop,
                task,
            },
        );
    }

    /// Serves new connections of the listener at `addr` with `serving`. With another
    /// bound `service`, its open connections are told to go away (their calls finish;
    /// the clients reconnect to the new service).
    pub(crate) fn update(
        &mut self,
        addr: SocketAddr,
        service: Option<ServiceName>,
        serving: Serving,
    ) {
        let Some(r) = self.running.get_mut(&addr) else {
            return;
        };
        let moved = r.service != service;
        let old_conns = if moved {
            tracing::info!(listen = %addr, service = service.as_ref().map(ServiceName::as_str), "listener now bound to another service");
            r.service = service;
            Some(std::mem::replace(&mut r.conns, watch::channel(false).0))
        } else {
            None
        };
        r.current.send_replace(Arc::new(Current {
            serving,
            conns: r.conns.subscribe(),
        }));
        if let Some(old) = old_conns {
            let _ = old.send(true);
        }
    }

    /// Stops the listener at `addr`: its socket closes, its connections drain.
    pub(crate) async fn remove(&mut self, addr: SocketAddr) {
        if let Some(r) = self.running.remove(&addr) {
            tracing::info!(listen = %addr, "listener removed");
            r.close().await;
        }
    }

    /// Changes the limit on client connections from `old` to `now`.
    pub(crate) fn resize_connections(&self, old: usize, now: usize) {
        let limit = &self.shared.connections;
        if now > old {
            limit.add_permits(now - old);
        } else if old > now {
            let short = (old - now) - limit.forget_permits(old - now);
            if short > 0 {
                // Held by open connections: taken back as they close.
                let limit = Arc::clone(limit);
                let short = u32::try_from(short).unwrap_or(u32::MAX);
                tokio::spawn(async move {
                    if let Ok(p) = limit.acquire_many_owned(short).await {
                        p.forget();
                    }
                });
            }
        }
    }

    /// Stops every listener; their connections are told to go away.
    pub(crate) async fn close_all(&mut self) {
        for (_, r) in std::mem::take(&mut self.running) {
            r.close().await;
        }
    }
}

async fn accept_loop(
    listener: TcpListener,
    current: watch::Receiver<Arc<Current>>,
    shared: ClientConnections,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        // Bound the number of client connections: past the limit, new ones wait in the
        // kernel's backlog instead of taking memory and file descriptors here.
        let permit = tokio::select! {
            p = Arc::clone(&shared.connections).acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => return,
            },
            _ = stop.changed() => break,
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: pause instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stop.changed() => break,
        };
        spawn_conn(stream, peer, Some(permit), &current.borrow(), &shared);
    }
    take_queued(listener, &current, &shared);
}

/// Takes the connections the kernel completed on `listener` but nobody accepted yet, and
/// closes it. Closing a socket resets its queued connections; with `SO_REUSEPORT` the
/// kernel sends new ones to the other sockets on the port (a new proxy process) once it
/// is closed, so what is queued at that moment is all that could be lost. Those are
/// served here, and told to go away at once like every other connection.
fn take_queued(
    listener: TcpListener,
    current: &watch::Receiver<Arc<Current>>,
    shared: &ClientConnections,
) {
    // Straight `accept` calls until the queue is empty (tokio's own accept would wait
    // for the reactor to report readiness).
    let Ok(socket) = listener.into_std() else {
        return;
    };
    while let Ok((stream, peer)) = socket.accept() {
        let stream = stream
            .set_nonblocking(true)
            .and_then(|()| TcpStream::from_std(stream));
        if let Ok(stream) = stream {
            tracing::debug!(%peer, "connection taken from the closing socket's queue");
            let permit = Arc::clone(&shared.connections).try_acquire_owned().ok();
            spawn_conn(stream, peer, permit, &current.borrow(), shared);
        }
    }
}

/// Serves one accepted connection in its own task.
fn spawn_conn(
    stream: TcpStream,
    peer: SocketAddr,
    permit: Option<OwnedSemaphorePermit>,
    current: &Current,
    shared: &ClientConnections,
) {
    let _ = stream.set_nodelay(true);
    let fwd = Arc::clone(&current.serving.forwarder);
    let settings = Arc::clone(&current.serving.settings);
    let stop = current.conns.clone();
    match &current.serving.acceptor {
        None => {
            shared.tracker.spawn(async move {
                conn::serve(stream, settings, fwd, stop, peer).await;
                drop(permit);
            });
        }
        Some(acceptor) => {
            // The handshake runs in the connection's own task so a slow client cannot
            // stall the accept loop; it is bounded in time.
            let handshake = acceptor.accept(stream);
            shared.tracker.spawn(async move {
                match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, handshake).await {
                    Ok(Ok(tls)) => conn::serve(tls, settings, fwd, stop, peer).await,
                    Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                    Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                }
                drop(permit);
            });
        }
    }
}
