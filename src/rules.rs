//! This namespace's rules as the kernel holds them, and the retried transaction over them.

use crate::cache;
use crate::comment::Identity;
use crate::lock::NamespaceLock;
use crate::{owner, Error, Result};
use log::{debug, warn};
use std::time::Duration;
use switcheroo_sys::{Applied, Batch, Chain, Conn, Family, Handle, Op, RuleEntry};

/// One switcheroo rule of a namespace, as found in the kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// The namespace from the rule's comment.
    pub namespace: String,
    /// `ip` (IPv4) or `ip6` (IPv6) nat table.
    pub family: Family,
    /// `PREROUTING` (from the network) or `OUTPUT` (from this host).
    pub chain: Chain,
    /// The kernel's handle of the rule.
    pub handle: Handle,
    /// The matched destination port (`--dport`).
    pub public_port: u16,
    /// The port connections are redirected to (`--to-ports`).
    pub internal_port: u16,
    /// The pid of the process that committed the rule.
    pub pid: Option<u32>,
    /// That process's start time (field 22 of `/proc/<pid>/stat`), absent in rules written
    /// by the Go original.
    pub start: Option<u64>,
    /// Whether that process is still running (same pid and, when recorded, same start time).
    pub alive: bool,
}

impl Rule {
    pub(crate) fn identity(&self) -> Option<Identity> {
        Some(Identity {
            namespace: self.namespace.clone(),
            port: self.internal_port,
            pid: self.pid?,
            start: self.start,
        })
    }
}

/// What a transaction is computed from: the generation it was read at, this namespace's
/// rules, and the chains that do not exist yet.
#[derive(Debug, Default)]
pub(crate) struct Snapshot {
    pub generation: u32,
    pub ours: Vec<Rule>,
    pub missing: Vec<(Family, Chain)>,
}

/// Reads the generation, then dumps every (family, chain) (four dumps, each filtered to its
/// chain in the kernel) and keeps the switcheroo rules of `namespace` (of every namespace
/// when `None`). Chains in `wanted` that dump empty are looked up to learn whether they
/// exist.
pub(crate) fn snapshot(
    conn: &mut Conn,
    namespace: Option<&str>,
    wanted: impl Fn(Chain) -> bool,
) -> Result<Snapshot> {
    if let Some(namespace) = namespace {
        if let Some(snap) = cached(conn, namespace, &wanted)? {
            return Ok(snap);
        }
    }
    let generation = conn.generation()?;
    let mut snap = Snapshot {
        generation,
        ..Snapshot::default()
    };
    for family in Family::ALL {
        for chain in Chain::ALL {
            let entries = list_rules(conn, family, chain)?;
            if entries.is_empty() && wanted(chain) && !conn.chain_exists(family, chain)? {
                snap.missing.push((family, chain));
            }
            snap.ours.extend(
                entries
                    .into_iter()
                    .filter_map(|entry| switcheroo_rule(entry, family, chain, namespace)),
            );
        }
    }
    Ok(snap)
}

/// `entry` as a switcheroo rule, if it is one (of `namespace`, when given).
fn switcheroo_rule(
    entry: RuleEntry,
    family: Family,
    chain: Chain,
    namespace: Option<&str>,
) -> Option<Rule> {
    let redirect = entry.redirect?;
    let id = Identity::parse(&redirect.comment)?;
    if namespace.is_some_and(|ns| ns != id.namespace) {
        return None;
    }
    Some(Rule {
        alive: owner::is_alive(&id),
        namespace: id.namespace,
        family,
        chain,
        handle: entry.handle,
        public_port: redirect.public_port,
        internal_port: redirect.to_port,
        pid: Some(id.pid),
        start: id.start,
    })
}

/// The snapshot from the record of the namespace's last commit (see [`cache`]), if the
/// ruleset generation is still the recorded one, every recorded rule is still there and
/// ours, and every wanted chain holds one of them (so it exists). `None`: dump instead.
fn cached(
    conn: &mut Conn,
    namespace: &str,
    wanted: impl Fn(Chain) -> bool,
) -> Result<Option<Snapshot>> {
    let Some(record) = cache::load(conn.netns(), namespace) else {
        return Ok(None);
    };
    let covered = Family::ALL.into_iter().all(|family| {
        Chain::ALL.into_iter().all(|chain| {
            !wanted(chain)
                || record
                    .rules
                    .iter()
                    .any(|(f, c, _)| (*f, *c) == (family, chain))
        })
    });
    if !covered {
        return Ok(None);
    }
    let generation = conn.generation()?;
    if generation != record.generation {
        debug!(
            "namespace {namespace}: the ruleset changed since the last commit (generation {} -> {generation}); dumping",
            record.generation
        );
        return Ok(None);
    }
    let mut ours = Vec::with_capacity(record.rules.len());
    for (family, chain, handle) in record.rules {
        let rule = conn
            .get_rule(family, chain, handle)?
            .and_then(|entry| switcheroo_rule(entry, family, chain, Some(namespace)));
        match rule {
            Some(rule) => ours.push(rule),
            None => {
                debug!("namespace {namespace}: recorded rule {family} {chain} {handle} is not ours; dumping");
                return Ok(None);
            }
        }
    }
    debug!(
        "namespace {namespace}: generation {generation} unchanged since the last commit; no dump"
    );
    Ok(Some(Snapshot {
        generation,
        ours,
        missing: Vec::new(),
    }))
}

/// After a transaction: records this namespace's rules for the next one if the generation
/// moved by exactly this transaction, else drops any record.
fn record(conn: &mut Conn, namespace: &str, snap: &Snapshot, batch: &Batch, applied: &Applied) {
    let deleted: Vec<(Family, Chain, Handle)> = batch
        .ops()
        .iter()
        .filter_map(|op| match op {
            Op::Delete(f, c, h) => Some((*f, *c, *h)),
            _ => None,
        })
        .collect();
    let mut rules: Vec<(Family, Chain, u64)> = snap
        .ours
        .iter()
        .filter(|r| !deleted.contains(&(r.family, r.chain, r.handle)))
        .map(|r| (r.family, r.chain, r.handle.get()))
        .collect();
    rules.extend(applied.inserted.iter().filter_map(|entry| {
        let chain = Chain::ALL.into_iter().find(|c| c.name() == entry.chain)?;
        Some((entry.family, chain, entry.handle.get()))
    }));
    let after = conn.generation().ok();
    if after == Some(snap.generation.wrapping_add(1)) && !rules.is_empty() {
        cache::store(
            conn.netns(),
            namespace,
            &cache::Record {
                generation: snap.generation.wrapping_add(1),
                rules,
            },
        );
    } else {
        cache::forget(conn.netns(), namespace);
    }
}

/// Dumps one chain, again if a concurrent change interrupted the dump (NLM_F_DUMP_INTR).
fn list_rules(conn: &mut Conn, family: Family, chain: Chain) -> Result<Vec<RuleEntry>> {
    let mut tries = 0;
    loop {
        match conn.list_rules(family, chain) {
            Err(e) if e.is_conflict() && tries < MAX_ATTEMPTS => {
                tries += 1;
                debug!("dump of {family} nat {chain} interrupted, again: {e}");
                std::thread::sleep(backoff(tries));
            }
            other => return Ok(other?),
        }
    }
}

/// How many times a transaction is tried by default when the ruleset changes under it.
/// Each try is a fresh dump and one batch, well under a millisecond, so even a tight loop of
/// foreign writers leaves gaps to get through.
pub(crate) const MAX_ATTEMPTS: u32 = 32;

/// Builds a batch from a fresh snapshot and applies it, holding the namespace's lock; on a
/// conflict (a handle vanished, or the generation moved while the batch creates chains)
/// nothing was applied, so it re-reads and tries again after a short random pause, up to
/// `max_attempts` times.
///
/// The batch is bound to the generation of its dump only when it creates the table or
/// chains, where a concurrent creator matters; otherwise the namespace lock keeps our own
/// instances apart and deletion by handle keeps foreign writers harmless, so a busy foreign
/// writer cannot starve the switch.
pub(crate) fn transact(
    conn: &mut Conn,
    namespace: &str,
    max_attempts: u32,
    wanted: impl Fn(Chain) -> bool,
    mut build: impl FnMut(&Snapshot, &mut Batch) -> Result<()>,
) -> Result<(Snapshot, Applied, u32)> {
    let _lock = NamespaceLock::acquire(namespace)?;
    let mut attempt = 0;
    loop {
        attempt += 1;
        let snap = snapshot(conn, Some(namespace), &wanted)?;
        let generation = (!snap.missing.is_empty()).then_some(snap.generation);
        let mut batch = Batch::new(generation);
        build(&snap, &mut batch)?;
        if batch.ops().is_empty() {
            return Ok((snap, Applied::default(), attempt));
        }
        debug!(
            "namespace {namespace}: batch at generation {} (attempt {attempt}): {}",
            snap.generation,
            describe(batch.ops())
        );
        match conn.apply(&batch) {
            Ok(applied) => {
                record(conn, namespace, &snap, &batch, &applied);
                return Ok((snap, applied, attempt));
            }
            Err(e) if e.is_conflict() && attempt < max_attempts => {
                if attempt == max_attempts / 2 {
                    warn!("namespace {namespace}: {attempt} conflicting transactions in a row; the chains are changing fast ({e})");
                } else {
                    debug!("namespace {namespace}: conflict, retrying: {e}");
                }
                std::thread::sleep(backoff(attempt));
            }
            Err(e) if e.is_conflict() => {
                return Err(Error::Conflict {
                    attempts: attempt,
                    source: e,
                })
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// A random pause that grows with the attempt number (up to 1 ms, then up to 20 ms), so
/// that racing deployers fall out of step.
fn backoff(attempt: u32) -> Duration {
    let cap_us = (50u64 << attempt.min(10)).min(20_000);
    Duration::from_micros(rand::random_range(0..=cap_us))
}

/// Every switcheroo rule in the current network namespace, of every service namespace, in
/// the order of the dumps (IPv4 before IPv6, PREROUTING before OUTPUT, each chain top
/// down). Opens its own netfilter socket; needs CAP_NET_ADMIN.
///
/// ```no_run
/// for rule in switcheroo::all_rules()? {
///     println!("{} {} {} {} -> {} pid {:?} alive {}", rule.namespace, rule.family,
///         rule.chain, rule.public_port, rule.internal_port, rule.pid, rule.alive);
/// }
/// # Ok::<(), switcheroo::Error>(())
/// ```
pub fn all_rules() -> Result<Vec<Rule>> {
    let mut conn = Conn::open()?;
    Ok(snapshot(&mut conn, None, |_| false)?.ours)
}

/// Deletes every rule of the service `namespace`, whatever its public port, in one
/// transaction, and returns how many there were; processes are not signalled. The same as
/// [`Switcheroo::cleanup`](crate::Switcheroo::cleanup) without a configured service.
///
/// Errors: [`Error::InvalidNamespace`] before anything is read; then as `cleanup`.
pub fn cleanup(namespace: &str) -> Result<usize> {
    if !crate::comment::valid_namespace(namespace) {
        return Err(Error::InvalidNamespace {
            namespace: namespace.to_owned(),
        });
    }
    let mut conn = Conn::open()?;
    delete_namespace(&mut conn, namespace, MAX_ATTEMPTS)
}

/// The transaction behind both cleanups.
pub(crate) fn delete_namespace(
    conn: &mut Conn,
    namespace: &str,
    max_attempts: u32,
) -> Result<usize> {
    let (snap, _, _) = transact(
        conn,
        namespace,
        max_attempts,
        |_| false,
        |snap, batch| {
            for rule in &snap.ours {
                batch.push(Op::Delete(rule.family, rule.chain, rule.handle));
            }
            Ok(())
        },
    )?;
    if !snap.ours.is_empty() {
        log::info!("namespace {namespace}: removed {} rules", snap.ours.len());
    }
    Ok(snap.ours.len())
}

fn describe(ops: &[Op]) -> String {
    ops.iter().map(Op::to_string).collect::<Vec<_>>().join("; ")
}
