//! Choosing and binding an instance's internal ports.

use crate::error::{Error, Result};
use crate::port::{Mapping, Port};
use nix::errno::Errno;
use nix::sys::socket::{
    self, sockopt, AddressFamily, Backlog, SockFlag, SockType, SockaddrIn, SockaddrIn6,
};
use std::collections::HashSet;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddrV4, SocketAddrV6, TcpListener, UdpSocket};
use std::ops::RangeInclusive;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use switcheroo_sys::Protocol;

/// An instance's socket for one public port: a TCP listener or a UDP socket, bound on
/// the internal port (dual-stack where the host has IPv6).
#[derive(Debug)]
pub enum Socket {
    /// For a TCP port: listening, with the system's maximum backlog.
    Tcp(TcpListener),
    /// For a UDP port: unconnected, as systemd passes one for `ListenDatagram=`.
    Udp(UdpSocket),
}

impl Socket {
    /// The TCP listener, for a TCP port.
    pub fn tcp(&self) -> Option<&TcpListener> {
        match self {
            Socket::Tcp(l) => Some(l),
            Socket::Udp(_) => None,
        }
    }

    /// The UDP socket, for a UDP port.
    pub fn udp(&self) -> Option<&UdpSocket> {
        match self {
            Socket::Udp(s) => Some(s),
            Socket::Tcp(_) => None,
        }
    }
}

impl AsFd for Socket {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            Socket::Tcp(l) => l.as_fd(),
            Socket::Udp(s) => s.as_fd(),
        }
    }
}

impl From<Socket> for OwnedFd {
    fn from(socket: Socket) -> OwnedFd {
        match socket {
            Socket::Tcp(l) => l.into(),
            Socket::Udp(s) => s.into(),
        }
    }
}

/// One public port of an instance and the socket that serves it, from
/// [`Switcheroo::begin_all`](crate::Switcheroo::begin_all).
#[derive(Debug)]
pub struct Bound {
    /// The public port.
    pub public: Port,
    /// The internal port the socket is bound to, which the rules will redirect to.
    pub internal: u16,
    /// The socket.
    pub socket: Socket,
}

impl Bound {
    /// The public and the internal port.
    pub fn mapping(&self) -> Mapping {
        Mapping {
            public: self.public,
            internal: self.internal,
        }
    }
}

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
///
/// A UDP socket is bound without `SO_REUSEADDR` (with it, two sockets could share the port
/// and split its datagrams).
pub(crate) fn bind_free(
    protocol: Protocol,
    range: &RangeInclusive<u16>,
    taken: &HashSet<u16>,
    namespace: &str,
) -> Result<Socket> {
    let (start, end) = (*range.start() as u32, *range.end() as u32);
    let len = end - start + 1;
    let offset = rand::random_range(0..len);
    for clean_only in [true, false] {
        for i in 0..len {
            let port = (start + (offset + i) % len) as u16;
            if taken.contains(&port) || (clean_only && protocol == Protocol::Tcp && !is_clean(port))
            {
                continue;
            }
            let socket = match protocol {
                Protocol::Tcp => bind(port, true).map(Socket::Tcp),
                Protocol::Udp => {
                    bound(SockType::Datagram, port, false, false).map(|fd| Socket::Udp(fd.into()))
                }
            };
            match socket {
                Ok(socket) => return Ok(socket),
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

/// Whether a socket holds `port` of `protocol` in the calling thread's network namespace.
/// For TCP, a listener or a bound socket: a bind with `SO_REUSEADDR`, which connections
/// in TIME_WAIT do not refuse, fails. (Reading /proc/net/tcp would tell too, but with tens
/// of thousands of TIME_WAIT sockets after heavy traffic it takes seconds.) For UDP, any
/// socket bound to it.
pub(crate) fn in_use(protocol: Protocol, port: u16) -> bool {
    let (kind, reuse) = match protocol {
        Protocol::Tcp => (SockType::Stream, true),
        Protocol::Udp => (SockType::Datagram, false),
    };
    matches!(bound(kind, port, reuse, false), Err(Errno::EADDRINUSE))
}

/// Whether nothing at all uses TCP `port`, not even a connection in TIME_WAIT.
fn is_clean(port: u16) -> bool {
    bind(port, false).is_ok()
}

fn bind(port: u16, reuse: bool) -> Result<TcpListener, Errno> {
    bound(SockType::Stream, port, reuse, true).map(TcpListener::from)
}

/// A socket of `kind` bound to `port` on every address, dual-stack (`[::]` with
/// `IPV6_V6ONLY` off), or IPv4 only where the host has IPv6 disabled; listening if
/// `listen`.
fn bound(kind: SockType, port: u16, reuse: bool, listen: bool) -> Result<OwnedFd, Errno> {
    let v6 = SockaddrIn6::from(SocketAddrV6::new(Ipv6Addr::UNSPECIFIED, port, 0, 0));
    match bound_to(kind, AddressFamily::Inet6, &v6, reuse, listen) {
        // No IPv6 on this host (disabled by sysctl or boot option): IPv4 only.
        Err(Errno::EAFNOSUPPORT | Errno::EADDRNOTAVAIL) => {
            let v4 = SockaddrIn::from(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port));
            bound_to(kind, AddressFamily::Inet, &v4, reuse, listen)
        }
        other => other,
    }
}

fn bound_to(
    kind: SockType,
    family: AddressFamily,
    addr: &dyn socket::SockaddrLike,
    reuse: bool,
    listen: bool,
) -> Result<OwnedFd, Errno> {
    let fd = socket::socket(family, kind, SockFlag::SOCK_CLOEXEC, None)?;
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
        assert!(in_use(Protocol::Tcp, p));
        drop(l);
        assert!(!in_use(Protocol::Tcp, p));
    }

    #[test]
    fn a_bound_udp_port_is_in_use_and_bind_free_gives_a_dual_stack_datagram_socket() {
        let s = bind_free(Protocol::Udp, &(41000..=41999), &HashSet::new(), "t").unwrap();
        let udp = s.udp().expect("a UDP socket");
        let p = udp.local_addr().unwrap().port();
        assert!(udp.local_addr().unwrap().is_ipv6());
        assert!(in_use(Protocol::Udp, p));
        drop(s);
        assert!(!in_use(Protocol::Udp, p));
    }

    #[test]
    fn skips_taken_ports_and_reports_exhaustion() {
        let held = std::net::TcpListener::bind("[::]:0").unwrap();
        let p = held.local_addr().unwrap().port();
        let tcp = Protocol::Tcp;
        let err = bind_free(tcp, &(p..=p), &HashSet::new(), "t").unwrap_err();
        assert!(matches!(err, Error::PortRangeExhausted { .. }), "{err}");
        drop(held);
        let err = bind_free(tcp, &(p..=p), &HashSet::from([p]), "t").unwrap_err();
        assert!(matches!(err, Error::PortRangeExhausted { .. }), "{err}");
        let l = bind_free(tcp, &(p..=p), &HashSet::new(), "t").unwrap();
        assert_eq!(l.tcp().unwrap().local_addr().unwrap().port(), p);
    }
}
