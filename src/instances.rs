//! Every instance in sight: those in the chains (from their rules), and those that left
//! the chains but still serve connections they had (from conntrack, which still maps those
//! connections to their internal ports, and from the sockets that hold them).
//!
//! A replaced instance drains for as long as its clients keep their connections: seconds
//! for HTTP, hours for a websocket. Its rules are gone, so the ruleset cannot show it; its
//! connections can. When a [`Tenure`](crate::Tenure) (or `switcheroo run`) learns that its
//! rules are gone, it marks the process as retired with an abstract unix socket named
//! `switcheroo/retired/<namespace>/<milliseconds since the epoch>` in the service's network
//! namespace: it costs nothing, vanishes with the process whatever kills it, and tells
//! `status` the namespace and since when. A mark is only believed of the process that holds
//! it (by its socket's inode), so a process can only speak for itself.

use crate::comment::Identity;
use crate::error::Result;
use crate::port::{Mapping, Port};
use crate::process::Stat;
use crate::registry::Registry;
use crate::role::Role;
use crate::rule::Rule;
use crate::sockets::{self, Holder};
use crate::transact::{self, MAX_ATTEMPTS};
use std::collections::BTreeMap;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use switcheroo_sys::{Conn, Family, Protocol};

const MARK_PREFIX: &str = "switcheroo/retired/";

/// The mark of a retired instance; see the module docs. Dropping it removes it.
#[derive(Debug)]
pub(crate) struct Mark {
    _socket: UnixDatagram,
}

impl Mark {
    /// Marks this process as retired from `me`'s namespace, now. `None` (logged) if the
    /// socket cannot be made: `status` then shows the instance without a time.
    pub fn retired(registry: &Registry, me: &Identity) -> Option<Mark> {
        let since = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis();
        let name = format!("{MARK_PREFIX}{}/{since}", me.namespace);
        let bound = registry.in_netns(|| {
            let addr = SocketAddr::from_abstract_name(name.as_bytes())?;
            UnixDatagram::bind_addr(&addr)
        });
        match bound {
            Ok(Ok(socket)) => Some(Mark { _socket: socket }),
            Ok(Err(e)) => {
                log::debug!("cannot mark pid {} as retired: {e}", me.pid);
                None
            }
            Err(e) => {
                log::debug!("cannot mark pid {} as retired: {e}", me.pid);
                None
            }
        }
    }
}

/// Where an instance stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Standing {
    /// In the chains, in this role (of its first rule, IPv4 PREROUTING first).
    InChain(Role),
    /// Its rules name a process that no longer runs; the next transaction of the
    /// namespace removes them.
    Dead,
    /// Out of the chains (replaced, rolled back, moved, or stopped), still finishing the
    /// connections and UDP flows it had.
    Draining,
}

impl std::fmt::Display for Standing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Standing::InChain(role) => role.fmt(f),
            Standing::Dead => f.write_str("dead"),
            Standing::Draining => f.write_str("draining"),
        }
    }
}

/// The connections and UDP flows conntrack maps to an instance's internal ports.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Connections {
    /// TCP connections not yet closed (neither TIME_WAIT nor CLOSE).
    pub tcp: usize,
    /// UDP flows whose entries have not expired.
    pub udp: usize,
}

impl Connections {
    /// Both together.
    pub fn total(&self) -> usize {
        self.tcp + self.udp
    }
}

impl std::fmt::Display for Connections {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.tcp, self.udp) {
            (tcp, 0) => write!(f, "{tcp} tcp"),
            (0, udp) => write!(f, "{udp} udp"),
            (tcp, udp) => write!(f, "{tcp} tcp, {udp} udp"),
        }
    }
}

/// One instance of a service, as [`instances`] finds it.
#[derive(Debug, Clone, PartialEq)]
pub struct Instance {
    /// The service namespace.
    pub namespace: String,
    /// The process that committed its rules (for a draining instance found by its
    /// connections alone: the process that holds them).
    pub pid: u32,
    /// Where it stands.
    pub standing: Standing,
    /// For an instance in the chains, when its process started; for a draining one, when
    /// it left the chains, if it marked that (a library [`Tenure`](crate::Tenure) and
    /// `switcheroo run` do).
    pub since: Option<SystemTime>,
    /// Each public port and the internal port it leads to (for a draining instance, those
    /// that conntrack still maps clients of the public port to).
    pub mappings: Vec<Mapping>,
    /// The connections and flows it still holds.
    pub connections: Connections,
    /// The processes that hold its sockets (the server under `switcheroo run`), as far as
    /// `/proc` shows them to this user.
    pub processes: Vec<Holder>,
}

/// Every instance in the calling thread's network namespace (of `namespace` only, when
/// given), sorted by namespace, then standing (canary, active, standby, dead, draining),
/// then pid. Reads the rules, conntrack (a filtered dump per family for each internal and
/// each public port), the socket tables and `/proc`; changes nothing. Needs CAP_NET_ADMIN;
/// the owners of other users' sockets are found only with CAP_SYS_PTRACE (root).
pub fn instances(namespace: Option<&str>) -> Result<Vec<Instance>> {
    let mut conn = Conn::open()?;
    let rules: Vec<Rule> = transact::read(&mut conn, MAX_ATTEMPTS)?
        .rules
        .into_iter()
        .filter(|r| namespace.is_none_or(|ns| ns == r.namespace))
        .collect();
    let mut found = in_chains(&rules);
    for instance in &mut found {
        instance.connections = count(&mut conn, &instance.mappings)?;
        instance.processes = holders_of(&instance.mappings);
    }
    let marks = marks();
    found.extend(draining(&mut conn, &rules, &found, &marks, namespace)?);
    found.sort_by(|a, b| {
        (a.namespace.as_str(), a.standing, a.pid).cmp(&(b.namespace.as_str(), b.standing, b.pid))
    });
    Ok(found)
}

/// The connections and flows conntrack maps to the internal ports of `mappings`, in the
/// calling thread's network namespace: one filtered dump per family and port.
pub(crate) fn count(conn: &mut Conn, mappings: &[Mapping]) -> Result<Connections> {
    let mut total = Connections::default();
    for m in mappings {
        for family in Family::ALL {
            let open = conn
                .conntrack_to_port(family, m.public.protocol, m.internal)?
                .iter()
                .filter(|e| e.is_open())
                .count();
            match m.public.protocol {
                Protocol::Tcp => total.tcp += open,
                Protocol::Udp => total.udp += open,
            }
        }
    }
    Ok(total)
}

/// The instances that own rules, each once (by pid and start time), in chain order, with
/// the role of their first rule.
fn in_chains(rules: &[Rule]) -> Vec<Instance> {
    let mut out: Vec<(Identity, Instance)> = Vec::new();
    for rule in rules {
        let mapping = Mapping {
            public: rule.public(),
            internal: rule.internal_port,
        };
        match out.iter_mut().find(|(id, _)| rule.owned_by(id)) {
            Some((_, instance)) => {
                if !instance.mappings.contains(&mapping) {
                    instance.mappings.push(mapping);
                }
            }
            None => out.push((
                rule.identity(),
                Instance {
                    namespace: rule.namespace.clone(),
                    pid: rule.pid,
                    standing: if rule.alive {
                        Standing::InChain(rule.role)
                    } else {
                        Standing::Dead
                    },
                    since: rule.start.and_then(crate::process::started_at),
                    mappings: vec![mapping],
                    connections: Connections::default(),
                    processes: Vec::new(),
                },
            )),
        }
    }
    out.into_iter().map(|(_, instance)| instance).collect()
}

/// A retired mark: the namespace, since when, and the pid that holds it.
#[derive(Debug, Clone, PartialEq)]
struct Marked {
    namespace: String,
    since: SystemTime,
    pid: u32,
}

/// The retired marks of the calling thread's network namespace (`/proc/net/unix`), each
/// with the process that holds its socket.
fn marks() -> Vec<Marked> {
    let Ok(text) = std::fs::read_to_string("/proc/thread-self/net/unix") else {
        return Vec::new();
    };
    let named: Vec<(u64, String, SystemTime)> = text
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let inode = fields.get(6)?.parse().ok()?;
            let (namespace, since) = parse_mark(fields.get(7)?)?;
            Some((inode, namespace, since))
        })
        .collect();
    let inodes: Vec<u64> = named.iter().map(|(i, ..)| *i).collect();
    let holders = sockets::holders_of_inodes(&inodes);
    named
        .into_iter()
        .flat_map(|(inode, namespace, since)| {
            holders
                .get(&inode)
                .into_iter()
                .flatten()
                .map(move |h| Marked {
                    namespace: namespace.clone(),
                    since,
                    pid: h.pid,
                })
        })
        .collect()
}

/// A mark's name as `/proc/net/unix` shows it (`@switcheroo/retired/web/1764600000000`).
fn parse_mark(path: &str) -> Option<(String, SystemTime)> {
    let rest = path.strip_prefix('@')?.strip_prefix(MARK_PREFIX)?;
    let (namespace, ms) = rest.split_once('/')?;
    if !crate::comment::valid_namespace(namespace) {
        return None;
    }
    let ms: u64 = ms.parse().ok()?;
    Some((namespace.to_owned(), UNIX_EPOCH + Duration::from_millis(ms)))
}

/// The processes that hold the internal ports of `mappings`.
fn holders_of(mappings: &[Mapping]) -> Vec<Holder> {
    let mut out: Vec<Holder> = Vec::new();
    for protocol in [Protocol::Tcp, Protocol::Udp] {
        let ports: Vec<u16> = mappings
            .iter()
            .filter(|m| m.public.protocol == protocol)
            .map(|m| m.internal)
            .collect();
        if ports.is_empty() {
            continue;
        }
        if let Ok(used) = sockets::port_use(protocol, &ports) {
            for u in used.values() {
                for h in u.listeners.iter().chain(&u.connected) {
                    if !out.contains(h) {
                        out.push(h.clone());
                    }
                }
            }
        }
    }
    out.sort();
    out
}

/// The instances out of the chains that still hold connections or flows of a public port
/// of `rules` (conntrack maps them to an internal port that no rule names), and those that
/// marked themselves retired, with what they hold.
fn draining(
    conn: &mut Conn,
    rules: &[Rule],
    in_chain: &[Instance],
    marks: &[Marked],
    namespace: Option<&str>,
) -> Result<Vec<Instance>> {
    let mut publics: Vec<(Port, &str)> = Vec::new();
    for rule in rules {
        if !publics.iter().any(|(p, _)| *p == rule.public()) {
            publics.push((rule.public(), &rule.namespace));
        }
    }
    // Internal ports that clients of a public port still reach, outside every rule.
    let mut orphaned: BTreeMap<(Protocol, u16), (Port, String, Connections)> = BTreeMap::new();
    for (public, ns) in &publics {
        for family in Family::ALL {
            for entry in conn.conntrack_for_port(family, public.protocol, public.number)? {
                let named = rules
                    .iter()
                    .any(|r| r.protocol == public.protocol && r.internal_port == entry.reply_port);
                if !entry.is_open() || entry.reply_port == public.number || named {
                    continue;
                }
                let slot = orphaned
                    .entry((public.protocol, entry.reply_port))
                    .or_insert_with(|| (*public, (*ns).to_owned(), Connections::default()));
                match public.protocol {
                    Protocol::Tcp => slot.2.tcp += 1,
                    Protocol::Udp => slot.2.udp += 1,
                }
            }
        }
    }
    let mut out: Vec<Instance> = Vec::new();
    for ((protocol, internal), (public, ns, held)) in orphaned {
        let holders = holders_of(&[Mapping {
            public: Port {
                protocol,
                number: public.number,
            },
            internal,
        }]);
        let owner = owner_of(&holders, marks);
        let (pid, namespace_of, since) = match (&owner, holders.first()) {
            (Some(m), _) => (m.pid, m.namespace.clone(), Some(m.since)),
            (None, Some(h)) => (h.pid, ns, None),
            // Nobody holds the port any more: conntrack has yet to see the end.
            (None, None) => continue,
        };
        let mapping = Mapping { public, internal };
        match out.iter_mut().find(|i| i.pid == pid) {
            Some(instance) => {
                instance.mappings.push(mapping);
                instance.connections.tcp += held.tcp;
                instance.connections.udp += held.udp;
                for h in holders {
                    if !instance.processes.contains(&h) {
                        instance.processes.push(h);
                    }
                }
            }
            None => out.push(Instance {
                namespace: namespace_of,
                pid,
                standing: Standing::Draining,
                since,
                mappings: vec![mapping],
                connections: held,
                processes: holders,
            }),
        }
    }
    // Retired instances with nothing left to finish (they are about to exit).
    for mark in marks {
        let listed = out.iter().chain(in_chain).any(|i| i.pid == mark.pid);
        if !listed && namespace.is_none_or(|ns| ns == mark.namespace) {
            out.push(Instance {
                namespace: mark.namespace.clone(),
                pid: mark.pid,
                standing: Standing::Draining,
                since: Some(mark.since),
                mappings: Vec::new(),
                connections: Connections::default(),
                processes: Vec::new(),
            });
        }
    }
    out.retain(|i| namespace.is_none_or(|ns| ns == i.namespace));
    Ok(out)
}

/// The retired mark that speaks for the processes `holders`: one held by one of them, or by
/// an ancestor (a `switcheroo run` marks itself; its server holds the sockets).
fn owner_of<'a>(holders: &[Holder], marks: &'a [Marked]) -> Option<&'a Marked> {
    for holder in holders {
        let mut pid = holder.pid;
        for _ in 0..16 {
            if let Some(mark) = marks.iter().find(|m| m.pid == pid) {
                return Some(mark);
            }
            match Stat::of(pid) {
                Ok(stat) if stat.parent > 1 => pid = stat.parent,
                _ => break,
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::view::fixture::*;

    #[test]
    fn marks_parse_and_strangers_do_not() {
        let (ns, since) = parse_mark("@switcheroo/retired/web/1764600000123").unwrap();
        assert_eq!(ns, "web");
        assert_eq!(since, UNIX_EPOCH + Duration::from_millis(1_764_600_000_123));
        for bad in [
            "switcheroo/retired/web/1",
            "@switcheroo/retired/web",
            "@switcheroo/retired/a:b/1",
            "@switcheroo/retired/web/x",
            "@other/retired/web/1",
        ] {
            assert_eq!(parse_mark(bad), None, "{bad}");
        }
    }

    #[test]
    fn instances_in_the_chains_are_listed_once_with_every_port_and_their_role() {
        use switcheroo_sys::Protocol;
        let rules = everywhere(vec![
            r("web", 4),
            r("web", 4).port(Protocol::Udp, 8080),
            r("web", 3),
            r("web", 3).port(Protocol::Udp, 8080),
            r("api", 9).dead(),
        ]);
        let found = in_chains(&rules);
        let summary: Vec<(&str, u32, Standing, usize)> = found
            .iter()
            .map(|i| (i.namespace.as_str(), i.pid, i.standing, i.mappings.len()))
            .collect();
        assert_eq!(
            summary,
            [
                ("web", 4, Standing::InChain(Role::Active), 2),
                ("web", 3, Standing::InChain(Role::Standby), 2),
                ("api", 9, Standing::Dead, 1),
            ]
        );
    }

    #[test]
    fn connections_display_by_protocol() {
        assert_eq!(Connections { tcp: 3, udp: 0 }.to_string(), "3 tcp");
        assert_eq!(Connections { tcp: 0, udp: 2 }.to_string(), "2 udp");
        assert_eq!(Connections { tcp: 1, udp: 2 }.to_string(), "1 tcp, 2 udp");
        assert_eq!(Connections::default().to_string(), "0 tcp");
    }
}
