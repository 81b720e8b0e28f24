//! What follows every applied plan: the owners of removed rules that have no rule left are
//! told to go (SIGTERM, after their identity check), and the connections conntrack still
//! maps to the ports of dead owners are forgotten.

use crate::comment::Identity;
use crate::owner;
use crate::rule::{self, Rule};
use log::{debug, warn};
use switcheroo_sys::{Conn, Family, Protocol};

/// `TCP_CONNTRACK_TIME_WAIT` (`linux/netfilter/nf_conntrack_tcp.h`).
const TCP_CONNTRACK_TIME_WAIT: u8 = 7;

/// The live owners of `removed` rules that no rule of `after` names any more: they were
/// replaced, rolled back or moved away, and must retire. An owner that still has a rule
/// (a standby kept, a canary promoted to a plain rule) stays.
pub(crate) fn leaving(removed: &[Rule], after: &[Rule]) -> Vec<Identity> {
    rule::owners(removed.iter().filter(|r| r.alive))
        .into_iter()
        .filter(|id| !after.iter().any(|r| r.owned_by(id)))
        .collect()
}

/// The ports of dead owners among `removed`, by family and protocol, each once: the
/// connections conntrack still maps there lead nowhere.
pub(crate) fn dead_ports(removed: &[Rule]) -> Vec<(Family, Protocol, u16)> {
    let mut ports: Vec<(Family, Protocol, u16)> = removed
        .iter()
        .filter(|r| !r.alive)
        .map(|r| (r.family, r.protocol, r.internal_port))
        .collect();
    ports.sort();
    ports.dedup();
    ports
}

/// Sends SIGTERM to each owner in `leaving` (never this process), after its identity
/// check by `owners`, the read that planned the transaction; returns the pids signalled.
pub(crate) fn signal(leaving: &[Identity], owners: &mut owner::Owners) -> Vec<u32> {
    owner::terminate_all(leaving, owners)
}

/// Deletes the conntrack entries that still map connections and flows to each of `ports`
/// (dead owners' ports, see [`dead_ports`]), unless something is bound to that port again
/// (`rebound` tells, in the service's network namespace): a connection reset by the
/// owner's death leaves its entry in CLOSE, and a new SYN from a reused client port would
/// follow it to the dead port and be refused; a UDP flow would keep feeding the closed
/// port for as long as it stays busy. Live owners' entries are never touched: their
/// connections are still served. Failures are logged, not returned: the rules are gone
/// either way.
pub(crate) fn forget_dead(
    conn: &mut Conn,
    ports: &[(Family, Protocol, u16)],
    rebound: impl Fn(Protocol, u16) -> bool,
) {
    for &(family, protocol, port) in ports {
        if rebound(protocol, port) {
            continue;
        }
        let entries = match conn.conntrack_to_port(family, protocol, port) {
            Ok(entries) => entries,
            Err(e) => {
                warn!("cannot read the {protocol} flows redirected to the dead port {port}: {e}");
                continue;
            }
        };
        // TIME_WAIT entries need nothing: a new SYN on one reopens it and is redirected
        // afresh. The others (CLOSE after a reset, connections cut by the death) would
        // take a new SYN of the same tuple to the dead port.
        let stale: Vec<_> = entries
            .into_iter()
            .filter(|e| e.tcp_state != Some(TCP_CONNTRACK_TIME_WAIT))
            .collect();
        match conn.delete_conntrack_all(&stale) {
            Ok(0) => {}
            Ok(n) => {
                debug!("forgot {n} {family} {protocol} flows redirected to the dead port {port}")
            }
            Err(e) => {
                warn!("cannot forget the {protocol} flows redirected to the dead port {port}: {e}")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::view::fixture::*;

    fn pids(ids: &[Identity]) -> Vec<u32> {
        ids.iter().map(|id| id.pid).collect()
    }

    #[test]
    fn owners_without_a_rule_after_the_plan_leave_and_the_others_stay() {
        let before = everywhere(vec![
            r("web", 4).canary(10.0),
            r("web", 3),
            r("web", 2),
            r("web", 1).dead(),
        ]);
        let removed: Vec<Rule> = before.iter().filter(|r| r.pid != 3).cloned().collect();
        // A promotion: pid 4 has a plain rule now, pid 3 stays as the standby.
        let after = everywhere(vec![r("web", 4), r("web", 3)]);
        assert_eq!(
            pids(&leaving(&removed, &after)),
            [2],
            "the dead one is not signalled"
        );
        // A plain deploy by pid 5: everybody leaves but the deployer.
        let after = everywhere(vec![r("web", 5)]);
        assert_eq!(pids(&leaving(&before, &after)), [4, 3, 2]);
        // A move: the old namespace's owners leave too.
        let moved = everywhere(vec![r("api", 7)]);
        assert_eq!(pids(&leaving(&moved, &after)), [7]);
    }

    #[test]
    fn dead_owners_ports_are_listed_once_per_family_and_protocol() {
        let removed = everywhere(vec![r("web", 3).dead(), r("web", 2)]);
        let ports = dead_ports(&removed);
        assert_eq!(ports.len(), 2, "{ports:?}");
        assert!(ports
            .iter()
            .all(|(_, p, port)| *p == Protocol::Tcp && *port == 40003));
    }
}
