//! Transactions on a namespace's deploy history: which rules a deploy keeps, rolling back
//! to the standby, promoting the canary. Each is one nftables transaction built from the
//! roles the rules' positions give (see [`crate::Role`]).

use crate::comment::Identity;
use crate::deploy::{groups, live_plain};
use crate::owner::terminate_all;
use crate::role::Role;
use crate::rule::owners;
use crate::rule::Rule;
use crate::snapshot::Snapshot;
use crate::switcheroo::Switcheroo;
use crate::transaction::{Outcome, Transaction, MAX_ATTEMPTS};
use crate::{comment, Error, Result};
use log::info;
use switcheroo_sys::{Conn, Family, Op, Protocol, Redirect};

/// What [`Switcheroo::rollback`] and [`rollback`](crate::rollback) did.
#[derive(Debug, Clone)]
pub struct Rollback {
    /// The instance rolled back from: the canary, or the active.
    pub from: Option<u32>,
    /// The rules the transaction deleted: the rolled-back instance's, and any of dead
    /// owners.
    pub removed: Vec<Rule>,
    /// The processes sent SIGTERM (the rolled-back instance, after its identity check).
    pub signalled: Vec<u32>,
    /// The pid of the instance that takes every new connection now.
    pub serving: Option<u32>,
}

/// What [`Switcheroo::promote`] and [`promote`](crate::promote) did.
#[derive(Debug, Clone)]
pub struct Promotion {
    /// The pid of the canary that is now the active.
    pub promoted: u32,
    /// The previous active, kept below as the standby (the promoted instance's probation
    /// decides when it retires).
    pub standby: Option<u32>,
    /// The rules the transaction deleted: the canary's statistic rules, an older standby's,
    /// and any of dead owners.
    pub removed: Vec<Rule>,
    /// The processes sent SIGTERM (owners of deleted live rules, after their identity check).
    pub signalled: Vec<u32>,
}

/// What to roll back from, or why there is nothing to roll back to.
fn rollback_target(snap: &Snapshot, namespace: &str) -> Result<Identity> {
    let nothing = |why: String| {
        Err(Error::NothingToRollBack {
            namespace: namespace.to_owned(),
            why,
        })
    };
    if let Some(canary) = snap.ours.iter().find(|r| r.alive && r.role == Role::Canary) {
        return canary.identity().ok_or(Error::NothingToRollBack {
            namespace: namespace.to_owned(),
            why: "its canary rule names no process".into(),
        });
    }
    let Some((_, rules)) = groups(snap)
        .into_iter()
        .find(|(_, rules)| rules.iter().any(|r| r.weight.is_none()))
    else {
        return nothing("it has no rules".into());
    };
    let plain: Vec<&Rule> = rules
        .iter()
        .copied()
        .filter(|r| r.weight.is_none())
        .collect();
    let active = plain[0];
    let standby = plain[1..].iter().find(|r| r.alive);
    match (standby, active.alive) {
        (Some(_), _) => active.identity().ok_or(Error::NothingToRollBack {
            namespace: namespace.to_owned(),
            why: "its active rule names no process".into(),
        }),
        (None, true) => nothing(format!(
            "its active instance (pid {}) has no live standby below it; deploy with a probation to keep the previous instance warm",
            active.pid.unwrap_or(0)
        )),
        (None, false) => nothing(format!(
            "its active instance (pid {}) is dead and no live instance is below it; deploy a new one",
            active.pid.unwrap_or(0)
        )),
    }
}

/// The transaction behind both rollbacks.
fn rollback_in(
    conn: &mut Conn,
    namespace: &str,
    max_attempts: u32,
    recorded: Option<crate::snapshot::Recorded<'_>>,
) -> Result<Rollback> {
    let mut from = None;
    let outcome =
        Transaction::deleting(namespace, max_attempts, recorded).run(conn, |snap, batch| {
            let target = rollback_target(snap, namespace)?;
            for rule in &snap.ours {
                if rule.owned_by(&target) || !rule.alive {
                    let (family, chain, handle) = rule.place();
                    batch.push(Op::Delete(family, chain, handle));
                }
            }
            from = Some(target);
            Ok(())
        })?;
    let from = from.map(|id| id.pid);
    let serving = outcome
        .remaining
        .iter()
        .find(|r| r.alive && r.weight.is_none())
        .and_then(|r| r.pid);
    info!(
        "namespace {namespace}: rolled back from pid {} to pid {}",
        from.unwrap_or(0),
        serving.unwrap_or(0)
    );
    let signalled = terminate_all(owners(&outcome.removed));
    Ok(Rollback {
        from,
        removed: outcome.removed,
        signalled,
        serving,
    })
}

/// The transaction behind both promotions.
fn promote_in(
    conn: &mut Conn,
    namespace: &str,
    max_attempts: u32,
    recorded: Option<crate::snapshot::Recorded<'_>>,
) -> Result<Promotion> {
    let mut promoted = None;
    let mut standby = None;
    let outcome =
        Transaction::deleting(namespace, max_attempts, recorded).run(conn, |snap, batch| {
            let canary = snap
                .ours
                .iter()
                .find(|r| r.alive && r.role == Role::Canary)
                .and_then(Rule::identity)
                .ok_or_else(|| Error::NoCanary {
                    namespace: namespace.to_owned(),
                })?;
            let mut keep = Vec::new();
            for (_, rules) in groups(snap) {
                let canary_rule = rules
                    .iter()
                    .find(|r| r.owned_by(&canary) && r.role == Role::Canary);
                if let Some(rule) = canary_rule {
                    let comment = Identity {
                        port: rule.internal_port,
                        ..canary.clone()
                    }
                    .to_string();
                    let plain = Redirect::new(rule.public_port, rule.internal_port, &comment)?
                        .with_protocol(rule.protocol);
                    batch.insert_rule(rule.family, rule.chain, plain);
                }
                keep.extend(
                    live_plain(&rules)
                        .into_iter()
                        .filter(|r| !r.owned_by(&canary))
                        .take(1)
                        .map(|r| r.place()),
                );
            }
            for rule in &snap.ours {
                if !keep.contains(&rule.place()) {
                    let (family, chain, handle) = rule.place();
                    batch.push(Op::Delete(family, chain, handle));
                }
            }
            standby = snap
                .ours
                .iter()
                .find(|r| keep.contains(&r.place()))
                .and_then(|r| r.pid);
            promoted = Some(canary);
            Ok(())
        })?;
    let promoted = promoted.map_or(0, |id| id.pid);
    info!("namespace {namespace}: promoted the canary pid {promoted} to active");
    // The canary's own statistic rules were deleted; its owner stays, of course.
    let others: Vec<Rule> = outcome
        .removed
        .iter()
        .filter(|r| r.pid != Some(promoted))
        .cloned()
        .collect();
    let signalled = terminate_all(owners(&others));
    Ok(Promotion {
        promoted,
        standby,
        removed: outcome.removed,
        signalled,
    })
}

impl Switcheroo {
    /// Rolls the service back in one transaction: deletes its head instance's rules in
    /// every chain (the canary if there is a live one, else the active, if a live standby
    /// is below it, which then takes every new connection) and any rules of dead owners,
    /// then sends the rolled-back instance SIGTERM (after its identity check) so that it
    /// retires. [`Error::NothingToRollBack`] says why when there is nothing to go back to;
    /// the ruleset is then unchanged.
    pub fn rollback(&self) -> Result<Rollback> {
        let rollback = self.with_conn(|conn, recorded| {
            rollback_in(conn, self.namespace(), self.max_attempts(), recorded)
        })?;
        forget_dead_owners(self, &rollback.removed)?;
        Ok(rollback)
    }

    /// Makes the live canary the active in one transaction: a plain rule of the canary's
    /// instance replaces its statistic rule at the head of each chain, the previous active
    /// stays below as the standby, and an older standby's rules and those of dead owners
    /// go (their live owners get SIGTERM). The promoted instance's probation, if it watches
    /// with a [`Tenure`](crate::Tenure), decides when the standby retires.
    /// [`Error::NoCanary`] without a live canary; the ruleset is then unchanged.
    pub fn promote(&self) -> Result<Promotion> {
        let promotion = self.with_conn(|conn, recorded| {
            promote_in(conn, self.namespace(), self.max_attempts(), recorded)
        })?;
        forget_dead_owners(self, &promotion.removed)?;
        Ok(promotion)
    }
}

fn valid(namespace: &str) -> Result<()> {
    if comment::valid_namespace(namespace) {
        Ok(())
    } else {
        Err(Error::InvalidNamespace {
            namespace: namespace.to_owned(),
        })
    }
}

/// [`Switcheroo::rollback`] for the service `namespace` in the calling thread's network
/// namespace, without a configured service (what `switcheroo rollback` runs).
pub fn rollback(namespace: &str) -> Result<Rollback> {
    valid(namespace)?;
    let mut conn = Conn::open()?;
    let rollback = rollback_in(&mut conn, namespace, MAX_ATTEMPTS, None)?;
    forget_dead(&mut conn, &rollback.removed, &rebound(&rollback.removed));
    Ok(rollback)
}

/// [`Switcheroo::promote`] for the service `namespace` in the calling thread's network
/// namespace (what `switcheroo promote` runs).
pub fn promote(namespace: &str) -> Result<Promotion> {
    valid(namespace)?;
    let mut conn = Conn::open()?;
    let promotion = promote_in(&mut conn, namespace, MAX_ATTEMPTS, None)?;
    forget_dead(&mut conn, &promotion.removed, &rebound(&promotion.removed));
    Ok(promotion)
}

/// Deletes the rules of dead owners and those `which` selects, in one transaction, when
/// there are any: what an instance does when the one above it dies, and what the probation
/// does when it ends. The connections conntrack still maps to a dead owner's port are
/// forgotten too (see [`forget_dead`]). Returns what the transaction did.
pub(crate) fn remove(sw: &Switcheroo, mut which: impl FnMut(&Rule) -> bool) -> Result<Outcome> {
    let outcome = sw.with_conn(|conn, recorded| {
        sw.transaction(recorded, &|_| false)
            .run(conn, |snap, batch| {
                for rule in &snap.ours {
                    if !rule.alive || which(rule) {
                        let (family, chain, handle) = rule.place();
                        batch.push(Op::Delete(family, chain, handle));
                    }
                }
                Ok(())
            })
    })?;
    forget_dead_owners(sw, &outcome.removed)?;
    Ok(outcome)
}

/// The dead owners' ports among `removed` that something is bound to again, checked in
/// the calling thread's network namespace.
fn rebound(removed: &[Rule]) -> Vec<(Protocol, u16)> {
    removed
        .iter()
        .filter(|r| !r.alive)
        .map(|r| (r.protocol, r.internal_port))
        .filter(|(protocol, port)| crate::port::in_use(*protocol, *port))
        .collect()
}

/// [`forget_dead`] for rules a transaction of `sw` removed: whoever deletes a dead owner's
/// rules (a deploy, a rollback, an instance below it) also forgets the connections
/// conntrack still maps to its port.
pub(crate) fn forget_dead_owners(sw: &Switcheroo, removed: &[Rule]) -> Result<()> {
    if removed.iter().all(|r| r.alive) {
        return Ok(());
    }
    let listening = sw.in_netns(|| rebound(removed))?;
    sw.with_conn(|conn, _| {
        forget_dead(conn, removed, &listening);
        Ok(())
    })
}

/// `TCP_CONNTRACK_TIME_WAIT` (`linux/netfilter/nf_conntrack_tcp.h`).
const TCP_CONNTRACK_TIME_WAIT: u8 = 7;

/// Deletes the conntrack entries that still map connections and flows to the port of
/// each dead owner among `removed` (TCP and UDP, both families), unless something is bound
/// to that port again (`listening`): a connection reset by the owner's death leaves its
/// entry in CLOSE, and a new SYN from a reused client port would follow it to the dead port
/// and be refused; a UDP flow would keep feeding the closed port for as long as it stays
/// busy. Live owners' entries are never touched: their connections are still served.
/// Failures are logged, not returned: the rules are gone either way.
pub(crate) fn forget_dead(conn: &mut Conn, removed: &[Rule], listening: &[(Protocol, u16)]) {
    let mut ports: Vec<(Family, Protocol, u16)> = removed
        .iter()
        .filter(|r| !r.alive && !listening.contains(&(r.protocol, r.internal_port)))
        .map(|r| (r.family, r.protocol, r.internal_port))
        .collect();
    ports.sort();
    ports.dedup();
    for (family, protocol, port) in ports {
        let entries = match conn.conntrack_to_port(family, protocol, port) {
            Ok(entries) => entries,
            Err(e) => {
                log::warn!(
                    "cannot read the {protocol} flows redirected to the dead port {port}: {e}"
                );
                continue;
            }
        };
        let mut forgotten = 0;
        // TIME_WAIT entries need nothing: a new SYN on one reopens it and is redirected
        // afresh. The others (CLOSE after a reset, connections cut by the death) would
        // take a new SYN of the same tuple to the dead port.
        for entry in entries
            .iter()
            .filter(|e| e.tcp_state != Some(TCP_CONNTRACK_TIME_WAIT))
        {
            match conn.delete_conntrack(entry) {
                Ok(true) => forgotten += 1,
                Ok(false) => {}
                Err(e) => {
                    log::warn!(
                        "cannot forget a {protocol} flow redirected to the dead port {port}: {e}"
                    );
                    break;
                }
            }
        }
        if forgotten > 0 {
            log::debug!(
                "forgot {forgotten} {family} {protocol} flows redirected to the dead port {port}"
            );
        }
    }
}
