//! Where listening sockets come from, so that a restart or an upgrade fails no call:
//!
//! - **Socket activation**: started by systemd with `LISTEN_FDS` / `LISTEN_PID` (and
//!   `LISTEN_FDNAMES`), the proxy uses the passed socket whose address matches a
//!   listener instead of binding. The socket stays in systemd across restarts, and
//!   connections wait in its backlog while the proxy restarts.
//! - **Handover on one port**: otherwise sockets are bound with `SO_REUSEPORT`, so a new
//!   proxy process binds the same addresses while the old one still serves; the old one,
//!   on SIGTERM, closes its sockets (taking what the kernel had queued on them, see
//!   [`super::listeners`]) and drains. Linux allows this only between processes of the
//!   same user.

use std::io;
use std::net::SocketAddr;

use tokio::net::{TcpListener, TcpSocket};

/// Backlog of the sockets bound here (tokio's and Go's default).
const BACKLOG: u32 = 1024;

/// A socket passed by the service manager.
#[derive(Debug)]
struct Passed {
    /// `LISTEN_FDNAMES`' name for it (`FileDescriptorName=` in the `.socket` unit).
    name: String,
    addr: SocketAddr,
    socket: std::net::TcpListener,
}

/// The listening sockets passed to the proxy, and how to open the others.
#[derive(Debug, Default)]
pub struct Sockets {
    passed: Vec<Passed>,
}

impl Sockets {
    /// No passed sockets: every listener is bound here.
    pub fn none() -> Self {
        Self::default()
    }

    /// The TCP sockets systemd passed to this process (sd_listen_fds semantics: only if
    /// `LISTEN_PID` is this process); other passed descriptors are logged and ignored.
    pub fn from_env() -> Self {
        let names: Vec<String> = std::env::var("LISTEN_FDNAMES")
            .map(|v| v.split(':').map(str::to_owned).collect())
            .unwrap_or_default();
        let mut fds = listenfd::ListenFd::from_env();
        let mut passed = Vec::new();
        for i in 0..fds.len() {
            let name = names.get(i).cloned().unwrap_or_default();
            let fd = i + 3;
            match fds.take_tcp_listener(i) {
                Ok(Some(socket)) => match socket.local_addr() {
                    Ok(addr) => {
                        tracing::info!(fd, %addr, name, "socket passed by the service manager");
                        passed.push(Passed { name, addr, socket });
                    }
                    Err(e) => {
                        tracing::warn!(fd, error = %e, "passed socket has no address; ignored")
                    }
                },
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(fd, name, error = %e, "passed descriptor is not a TCP listener; ignored")
                }
            }
        }
        Self { passed }
    }

    /// A listening socket on `addr`: the passed one with that address (a duplicate, so it
    /// can be taken again after a reload removed and re-added the listener), or a new
    /// one bound with `SO_REUSEPORT`.
    pub fn listen(&self, addr: SocketAddr) -> io::Result<TcpListener> {
        match self.passed.iter().find(|p| p.addr == addr) {
            Some(p) => {
                let socket = p.socket.try_clone()?;
                socket.set_nonblocking(true)?;
                tracing::debug!(%addr, name = p.name, "using the passed socket");
                TcpListener::from_std(socket)
            }
            None => bind_reuseport(addr),
        }
    }

    /// Passed sockets that no listener of `addrs` uses (a `.socket` unit out of step with
    /// the config file): logged, since their connections would wait for nothing.
    pub fn warn_unused(&self, addrs: &[SocketAddr]) {
        for p in self.passed.iter().filter(|p| !addrs.contains(&p.addr)) {
            tracing::warn!(addr = %p.addr, name = p.name, "passed socket matches no listener in the settings; its connections are not served");
        }
    }
}

/// A listening socket on `addr` that other processes of this user may bind too
/// (`SO_REUSEPORT`; the kernel spreads new connections over them).
pub fn bind_reuseport(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    #[cfg(all(unix, not(any(target_os = "solaris", target_os = "illumos"))))]
    socket.set_reuseport(true)?;
    socket.bind(addr)?;
    socket.listen(BACKLOG)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn two_sockets_bind_one_port_and_both_accept() {
        let a = bind_reuseport("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = a.local_addr().unwrap();
        let b = bind_reuseport(addr).unwrap();
        // Without SO_REUSEPORT the port is taken.
        assert!(std::net::TcpListener::bind(addr).is_err());
        // Closing one leaves the port served by the other.
        drop(a);
        let (client, accepted) = tokio::join!(tokio::net::TcpStream::connect(addr), b.accept());
        assert!(client.is_ok() && accepted.is_ok());
    }

    #[tokio::test]
    async fn without_passed_sockets_listeners_are_bound_here() {
        let sockets = Sockets::none();
        let l = sockets.listen("127.0.0.1:0".parse().unwrap()).unwrap();
        assert_ne!(l.local_addr().unwrap().port(), 0);
    }
}
