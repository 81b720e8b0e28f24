//! Serving under `switcheroo run` or systemd: the inherited socket and readiness.
//!
//! A Rust server run by the `switcheroo` command does not switch anything itself: it takes
//! the listening socket it was handed, says when it is ready, and drains on SIGTERM.
//!
//! ```no_run
//! use switcheroo::{activation, Drain, Shutdown};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let shutdown = Shutdown::install()?;
//! let listener = activation::listener()?.expect("run me under `switcheroo run`");
//! // ... start serving on the listener ...
//! activation::notify("READY=1")?;
//! shutdown.wait();
//! Drain::new().wait(&listener)?;
//! # Ok(())
//! # }
//! ```

use crate::bind::Socket;
use std::io;
use std::net::TcpListener;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use switcheroo_sys::activation::Passed;

/// The listening socket passed as fd 3 (`LISTEN_FDS`/`LISTEN_PID` name this process), or
/// `None` when the process was not started that way. The first call takes it; later calls
/// return `None`.
///
/// Errors: the variables are set for this process but fd 3 is not a listening TCP socket.
pub fn listener() -> io::Result<Option<TcpListener>> {
    switcheroo_sys::activation::take_listener()
}

/// Every socket passed as fds 3, 4, ... (`LISTEN_FDS` of them, `LISTEN_PID` naming this
/// process), in order, each with its name from `LISTEN_FDNAMES` (`switcheroo run` names
/// them after `--port NAME=PORT`), or `None` when the process was not started that way.
/// The first call (of this or [`listener`]) takes them; later calls return `None`.
///
/// Errors: the variables are set for this process but a passed fd is not a listening TCP
/// socket or a UDP socket.
pub fn sockets() -> io::Result<Option<Vec<(String, Socket)>>> {
    Ok(switcheroo_sys::activation::take_sockets()?.map(|passed| {
        passed
            .into_iter()
            .map(|(name, p)| match p {
                Passed::Tcp(l) => (name, Socket::Tcp(l)),
                Passed::Udp(u) => (name, Socket::Udp(u)),
            })
            .collect()
    }))
}

/// Sends `state` (e.g. `READY=1`, `STATUS=...`, `STOPPING=1`) to the service manager's
/// `NOTIFY_SOCKET` (sd_notify(3)); `Ok(false)` when the variable is not set.
pub fn notify(state: &str) -> io::Result<bool> {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return Ok(false);
    };
    notify_to(&path.to_string_lossy(), state)?;
    Ok(true)
}

/// Sends `state` to the notify socket `socket`, a path or, starting with `@`, an abstract
/// name (the two forms `NOTIFY_SOCKET` takes), in one datagram.
pub fn notify_to(socket: &str, state: &str) -> io::Result<()> {
    let addr = match socket.strip_prefix('@') {
        Some(name) => SocketAddr::from_abstract_name(name.as_bytes())?,
        None => SocketAddr::from_pathname(socket)?,
    };
    UnixDatagram::unbound()?.send_to_addr(state.as_bytes(), &addr)?;
    Ok(())
}
