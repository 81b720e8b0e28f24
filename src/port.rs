//! Choosing and binding the internal port.

use crate::{Error, Result};
use nix::errno::Errno;
use nix::sys::socket::{
    self, sockopt, AddressFamily, Backlog, SockFlag, SockType, SockaddrIn, SockaddrIn6,
};
use std::collections::HashSet;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddrV4, SocketAddrV6, TcpListener};
use std::ops::RangeInclusive;
use std::os::fd::OwnedFd;

/// Binds a listener on a free port of `range`, starting at a random offset so that
/// instances started together spread out, and skipping `taken` (ports that rules of this
/// namespace still point at: an instance that just crashed may hold no socket, but its rule
/// still routes to that port).
///
/// The listener is dual-stack (`[::]` with `IPV6_V6ONLY` off), so a port is only taken if
/// it is free for IPv4 and IPv6 alike; on a host with IPv6 disabled it is IPv4 only.
///
/// A first pass takes only ports that a probe socket can bind without `SO_REUSEADDR`, so a
/// port that still has TIME_WAIT connections of an earlier instance counts as busy. (The
/// listener itself always sets `SO_REUSEADDR`: TIME_WAIT connections inherit the flag, and
/// without it they would keep the port from being bound again for a minute.) Reusing such a port at once makes new
/// redirected connections collide with those TIME_WAIT entries (measured: about 4 refused
/// connections per 10 deploys at one deploy every 50 ms with a 100-port range, none once
/// such ports were skipped). Only if every port is in that state does a second pass reuse
/// one.
pub(crate) fn bind_free(
    range: &RangeInclusive<u16>,
    taken: &HashSet<u16>,
    namespace: &str,
) -> Result<TcpListener> {
    let (start, end) = (*range.start() as u32, *range.end() as u32);
    let len = end - start + 1;
    let offset = rand::random_range(0..len);
    for clean_only in [true, false] {
        for i in 0..len {
            let port = (start + (offset + i) % len) as u16;
            if taken.contains(&port) || (clean_only && !is_clean(port)) {
                continue;
            }
            match bind(port, true) {
                Ok(listener) => return Ok(listener),
                Err(Errno::EADDRINUSE) => continue,
                Err(e) => {
                    return Err(Error::Bind {
                        port,
                        source: e.into(),
                    })
                }
            }
        }
    }
    Err(Error::PortRangeExhausted {
        range: range.clone(),
        namespace: namespace.to_owned(),
    })
}

/// Whether a socket holds TCP `port` for listening (or is bound to it) in the calling
/// thread's network namespace: a bind with `SO_REUSEADDR`, which connections in TIME_WAIT
/// do not refuse, fails. (Reading /proc/net/tcp would tell too, but with tens of thousands
/// of TIME_WAIT sockets after heavy traffic it takes seconds.)
pub(crate) fn in_use(port: u16) -> bool {
    matches!(bind_only(port), Err(Errno::EADDRINUSE))
}

/// Binds `port` with `SO_REUSEADDR`, dual-stack where the host has IPv6, without
/// listening; the socket is closed at once.
fn bind_only(port: u16) -> Result<(), Errno> {
    bound(port, true, false).map(drop)
}

/// Whether nothing at all uses `port`, not even a connection in TIME_WAIT.
fn is_clean(port: u16) -> bool {
    bind(port, false).is_ok()
}

fn bind(port: u16, reuse: bool) -> Result<TcpListener, Errno> {
    bound(port, reuse, true).map(TcpListener::from)
}

/// A TCP socket bound to `port` on every address, dual-stack (`[::]` with `IPV6_V6ONLY`
/// off), or IPv4 only where the host has IPv6 disabled; listening if `listen`.
fn bound(port: u16, reuse: bool, listen: bool) -> Result<OwnedFd, Errno> {
    let v6 = SockaddrIn6::from(SocketAddrV6::new(Ipv6Addr::UNSPECIFIED, port, 0, 0));
    match bound_to(AddressFamily::Inet6, &v6, reuse, listen) {
        // No IPv6 on this host (disabled by sysctl or boot option): IPv4 only.
        Err(Errno::EAFNOSUPPORT | Errno::EADDRNOTAVAIL) => {
            let v4 = SockaddrIn::from(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port));
            bound_to(AddressFamily::Inet, &v4, reuse, listen)
        }
        other => other,
    }
}

fn bound_to(
    family: AddressFamily,
    addr: &dyn socket::SockaddrLike,
    reuse: bool,
    listen: bool,
) -> Result<OwnedFd, Errno> {
    let fd = socket::socket(family, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)?;
    if family == AddressFamily::Inet6 {
        socket::setsockopt(&fd, sockopt::Ipv6V6Only, &false)?;
    }
    socket::setsockopt(&fd, sockopt::ReuseAddr, &reuse)?;
    socket::bind(std::os::fd::AsRawFd::as_raw_fd(&fd), addr)?;
    if listen {
        socket::listen(&fd, Backlog::MAXCONN)?;
    }
    Ok(fd)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_port_bound_for_ipv4_only_is_not_free() {
        // Something holds 127.0.0.1:p; the dual-stack bind of p must fail, so p is skipped.
        let v4 = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let p = v4.local_addr().unwrap().port();
        assert_eq!(bind(p, true).err(), Some(Errno::EADDRINUSE));
    }

    #[test]
    fn a_listening_port_is_in_use_and_a_closed_one_is_not() {
        let l = std::net::TcpListener::bind("[::]:0").unwrap();
        let p = l.local_addr().unwrap().port();
        assert!(in_use(p));
        drop(l);
        assert!(!in_use(p));
    }

    #[test]
    fn skips_taken_ports_and_reports_exhaustion() {
        let held = std::net::TcpListener::bind("[::]:0").unwrap();
        let p = held.local_addr().unwrap().port();
        let err = bind_free(&(p..=p), &HashSet::new(), "t").unwrap_err();
        assert!(matches!(err, Error::PortRangeExhausted { .. }), "{err}");
        drop(held);
        let err = bind_free(&(p..=p), &HashSet::from([p]), "t").unwrap_err();
        assert!(matches!(err, Error::PortRangeExhausted { .. }), "{err}");
        let l = bind_free(&(p..=p), &HashSet::new(), "t").unwrap();
        assert_eq!(l.local_addr().unwrap().port(), p);
    }
}
