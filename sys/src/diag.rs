//! The host's sockets as the kernel lists them (`NETLINK_SOCK_DIAG`, what `ss` reads):
//! which sockets listen on or are connected to a port, their accept queues and inodes.
//!
//! Reading `/proc/net/tcp` instead costs the kernel a line of text for every socket,
//! TIME_WAIT ones included: after heavy traffic, tens of thousands of them, and seconds.
//! A dump of the listening sockets only walks the listening hash; a dump of other states
//! walks the connections but formats only those asked for.

use crate::attr;
use crate::{Error, Protocol};
use nix::errno::Errno;
use nix::sys::socket::{
    bind, recv, sendto, socket, AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol,
    SockType,
};
use std::os::fd::{AsRawFd, OwnedFd};

/// `SOCK_DIAG_BY_FAMILY` (`linux/sock_diag.h`).
const SOCK_DIAG_BY_FAMILY: u16 = 20;
/// `sizeof(struct inet_diag_req_v2)` and `sizeof(struct inet_diag_msg)`
/// (`linux/inet_diag.h`).
const REQ_LEN: usize = 56;
const MSG_LEN: usize = 72;

/// TCP states (`include/net/tcp_states.h`), as bits of a state mask.
pub mod state {
    /// `TCP_ESTABLISHED`.
    pub const ESTABLISHED: u8 = 1;
    /// `TCP_TIME_WAIT`.
    pub const TIME_WAIT: u8 = 6;
    /// `TCP_CLOSE` (also every unconnected UDP socket).
    pub const CLOSE: u8 = 7;
    /// `TCP_LISTEN`.
    pub const LISTEN: u8 = 10;
    /// Every state.
    pub const ALL: u32 = !0;

    /// The mask of one state.
    pub const fn bit(state: u8) -> u32 {
        1 << state
    }
}

/// One socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SocketInfo {
    /// TCP state (`state::*`); UDP sockets are CLOSE unless connected.
    pub state: u8,
    /// The local port.
    pub local_port: u16,
    /// For a listening socket, the connections in its accept queue.
    pub queued: u32,
    /// The socket's inode (the `socket:[N]` of `/proc/<pid>/fd`).
    pub inode: u64,
}

/// The sockets of `protocol` (IPv4 and IPv6) in the calling thread's network namespace
/// whose state is in `states` (a mask of `state::bit`s) and whose local port is `port`
/// (every port with `None`).
pub fn sockets(
    protocol: Protocol,
    states: u32,
    port: Option<u16>,
) -> Result<Vec<SocketInfo>, Error> {
    let op = || format!("listing the {protocol} sockets (sock_diag)");
    let fail = |e: Errno| Error::from_errno(op(), e, crate::error::Context::Read);
    let fd: OwnedFd = socket(
        AddressFamily::Netlink,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::NetlinkSockDiag,
    )
    .map_err(fail)?;
    bind(fd.as_raw_fd(), &NetlinkAddr::new(0, 0)).map_err(fail)?;
    let mut found = Vec::new();
    for (seq, family) in [(1u32, libc::AF_INET as u8), (2, libc::AF_INET6 as u8)] {
        let request = request(seq, family, protocol, states);
        sendto(
            fd.as_raw_fd(),
            &request,
            &NetlinkAddr::new(0, 0),
            MsgFlags::empty(),
        )
        .map_err(fail)?;
        let mut buf = vec![0u8; 64 * 1024];
        'dump: loop {
            let n = recv(fd.as_raw_fd(), &mut buf, MsgFlags::empty()).map_err(fail)?;
            for msg in attr::messages(&buf[..n]) {
                if msg.seq != seq {
                    continue;
                }
                match msg.kind as i32 {
                    libc::NLMSG_DONE => break 'dump,
                    libc::NLMSG_ERROR => match crate::conn::ack_errno(msg.payload) {
                        Some(0) => break 'dump,
                        // No IPv6 in this kernel, or no UDP diag module: nothing to list.
                        Some(e) if e == libc::ENOENT || e == libc::EAFNOSUPPORT => break 'dump,
                        Some(e) => return Err(fail(Errno::from_raw(e))),
                        None => {
                            return Err(Error::Protocol {
                                op: op(),
                                why: "a short ack".into(),
                            })
                        }
                    },
                    _ => {
                        if let Some(info) = parse(msg.payload) {
                            if port.is_none_or(|p| p == info.local_port) {
                                found.push(info);
                            }
                        }
                    }
                }
            }
        }
    }
    Ok(found)
}

/// A dump request of `family`'s `protocol` sockets in `states`.
fn request(seq: u32, family: u8, protocol: Protocol, states: u32) -> Vec<u8> {
    let len = 16 + REQ_LEN;
    let mut m = Vec::with_capacity(len);
    m.extend_from_slice(&(len as u32).to_ne_bytes());
    m.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    m.extend_from_slice(&((libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16).to_ne_bytes());
    m.extend_from_slice(&seq.to_ne_bytes());
    m.extend_from_slice(&0u32.to_ne_bytes());
    // struct inet_diag_req_v2: family, protocol, ext, pad, states, then a zeroed id.
    m.extend_from_slice(&[family, protocol.number(), 0, 0]);
    m.extend_from_slice(&states.to_ne_bytes());
    m.resize(len, 0);
    m
}

/// A `struct inet_diag_msg` (after `nlmsghdr`).
fn parse(payload: &[u8]) -> Option<SocketInfo> {
    if payload.len() < MSG_LEN {
        return None;
    }
    let u32_at = |at: usize| -> Option<u32> {
        Some(u32::from_ne_bytes(
            payload.get(at..at + 4)?.try_into().ok()?,
        ))
    };
    Some(SocketInfo {
        state: payload[1],
        // idiag_sport, network order, right after family/state/timer/retrans.
        local_port: u16::from_be_bytes([payload[4], payload[5]]),
        queued: u32_at(56)?,
        inode: u64::from(u32_at(68)?),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_listener_is_listed_with_its_accept_queue_and_a_connection_with_its_state() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let _a = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        let listening = sockets(Protocol::Tcp, state::bit(state::LISTEN), Some(port)).unwrap();
        assert_eq!(listening.len(), 1, "{listening:?}");
        assert_eq!(listening[0].queued, 1);
        assert!(listening[0].inode > 0);
        let (_served, _) = listener.accept().unwrap();
        let connected = sockets(Protocol::Tcp, state::bit(state::ESTABLISHED), Some(port)).unwrap();
        assert_eq!(connected.len(), 1, "{connected:?}");
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let uport = udp.local_addr().unwrap().port();
        let bound = sockets(Protocol::Udp, state::ALL, Some(uport)).unwrap();
        assert_eq!(bound.len(), 1, "{bound:?}");
    }
}
