//! Which processes hold sockets on a port: the kernel's list of sockets
//! ([`switcheroo_sys::diag`], what `ss` reads; each socket with its inode) and each
//! process's descriptors (`/proc/<pid>/fd/*`, links to `socket:[inode]`).
//!
//! What another user's process holds is readable only with CAP_SYS_PTRACE (root has it):
//! such a process is not found, never guessed.

use std::collections::{BTreeMap, HashMap};
use std::io;
use switcheroo_sys::diag::{self, state};
use switcheroo_sys::Protocol;

/// The sockets of `protocol` on `ports` (every port when empty) in `states`, in the
/// calling thread's network namespace.
fn listed(protocol: Protocol, states: u32, ports: &[u16]) -> io::Result<Vec<diag::SocketInfo>> {
    let port = match ports {
        [one] => Some(*one),
        _ => None,
    };
    let all = diag::sockets(protocol, states, port).map_err(|e| io::Error::other(e.to_string()))?;
    Ok(all
        .into_iter()
        .filter(|s| s.inode != 0 && (ports.is_empty() || ports.contains(&s.local_port)))
        .collect())
}

/// A process that holds a socket.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Holder {
    /// Its pid.
    pub pid: u32,
    /// Its program (`/proc/<pid>/comm`).
    pub program: String,
}

/// The processes that hold the sockets with these inodes: inode -> holders. Walks every
/// process's descriptors once.
pub(crate) fn holders_of_inodes(inodes: &[u64]) -> HashMap<u64, Vec<Holder>> {
    let mut found: HashMap<u64, Vec<Holder>> = HashMap::new();
    if inodes.is_empty() {
        return found;
    }
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return found;
    };
    for proc_entry in procs.flatten() {
        let Some(pid) = proc_entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(proc_entry.path().join("fd")) else {
            continue; // gone, or another user's without CAP_SYS_PTRACE
        };
        let mut program = None;
        for fd in fds.flatten() {
            let Ok(target) = std::fs::read_link(fd.path()) else {
                continue;
            };
            let inode = target
                .to_str()
                .and_then(|t| t.strip_prefix("socket:["))
                .and_then(|t| t.strip_suffix(']'))
                .and_then(|t| t.parse::<u64>().ok());
            let Some(inode) = inode.filter(|i| inodes.contains(i)) else {
                continue;
            };
            let program = program
                .get_or_insert_with(|| {
                    std::fs::read_to_string(proc_entry.path().join("comm"))
                        .map(|c| c.trim_end().to_owned())
                        .unwrap_or_default()
                })
                .clone();
            let list = found.entry(inode).or_default();
            if !list.iter().any(|h| h.pid == pid) {
                list.push(Holder { pid, program });
            }
        }
    }
    found
}

/// The processes with a socket listening on TCP `port` (or bound to UDP `port`) in the
/// calling thread's network namespace.
pub(crate) fn listening_on(protocol: Protocol, port: u16) -> io::Result<Vec<Holder>> {
    let states = match protocol {
        Protocol::Tcp => state::bit(state::LISTEN),
        Protocol::Udp => state::ALL,
    };
    let inodes: Vec<u64> = listed(protocol, states, &[port])?
        .iter()
        .map(|s| s.inode)
        .collect();
    let mut all: Vec<Holder> = holders_of_inodes(&inodes).into_values().flatten().collect();
    all.sort();
    all.dedup();
    Ok(all)
}

/// What the processes of one port hold there.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct PortUse {
    /// Who listens on it (TCP) or is bound to it (UDP).
    pub listeners: Vec<Holder>,
    /// Who holds connected TCP sockets on it (established or closing, not TIME_WAIT).
    pub connected: Vec<Holder>,
}

/// For each of `ports` (internal ports of `protocol`), who holds sockets there, in the
/// calling thread's network namespace. One listing, one walk of the processes.
pub(crate) fn port_use(protocol: Protocol, ports: &[u16]) -> io::Result<BTreeMap<u16, PortUse>> {
    let states = match protocol {
        Protocol::Tcp => state::ALL & !state::bit(state::TIME_WAIT) & !state::bit(state::CLOSE),
        Protocol::Udp => state::ALL,
    };
    let sockets = listed(protocol, states, ports)?;
    let inodes: Vec<u64> = sockets.iter().map(|s| s.inode).collect();
    let held = holders_of_inodes(&inodes);
    let mut out: BTreeMap<u16, PortUse> = BTreeMap::new();
    for socket in &sockets {
        let Some(who) = held.get(&socket.inode) else {
            continue;
        };
        let entry = out.entry(socket.local_port).or_default();
        let list = if protocol == Protocol::Udp || socket.state == state::LISTEN {
            &mut entry.listeners
        } else {
            &mut entry.connected
        };
        for h in who {
            if !list.contains(h) {
                list.push(h.clone());
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_is_found_behind_its_listener_and_its_connection() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let me = std::process::id();
        let found = listening_on(Protocol::Tcp, port).unwrap();
        assert!(found.iter().any(|h| h.pid == me), "{found:?}");
        let _client = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        let (_served, _) = listener.accept().unwrap();
        let used = port_use(Protocol::Tcp, &[port]).unwrap();
        let here = &used[&port];
        assert!(here.listeners.iter().any(|h| h.pid == me));
        assert!(here.connected.iter().any(|h| h.pid == me));
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let uport = udp.local_addr().unwrap().port();
        assert!(listening_on(Protocol::Udp, uport)
            .unwrap()
            .iter()
            .any(|h| h.pid == me));
    }
}
