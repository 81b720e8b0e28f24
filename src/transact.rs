//! The retried transaction that applies any [`Plan`]: lock, read, plan, one batch, and on
//! a conflict read and plan again, all within one budget of attempts.

use crate::error::{Error, Result};
use crate::lock::Lock;
use crate::plan::Plan;
use crate::record::{Key, Records};
use crate::routes::Routes;
use crate::rule::{self, Rule};
use crate::snapshot::{self, Needs, Since, Snapshot};
use crate::view::View;
use log::{debug, warn};
use std::time::Duration;
use switcheroo_sys::{Batch, Chain, Conn, Family, Handle, Op};

/// How many times a transaction is tried by default when the ruleset changes under it.
/// Each try is a fresh read and one batch, well under a millisecond, so even a tight loop
/// of foreign writers leaves gaps to get through.
pub(crate) const MAX_ATTEMPTS: u32 = 32;

/// What a transaction is about.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Transaction<'a> {
    /// The service namespace whose view is planned on and whose lock is taken.
    pub namespace: &'a str,
    /// The budget: reads and batches that met a concurrent change, together.
    pub max_attempts: u32,
    /// The commit record to read from and write, if records are on.
    pub record: Option<(&'a Records, &'a Key)>,
    /// The chains of these routes may be inserted into (learn whether they exist).
    pub inserts_into: Option<Routes>,
}

/// What an applied transaction did, and what its plan returned besides.
#[derive(Debug)]
pub(crate) struct Applied<T> {
    pub value: T,
    /// The rules the batch inserted, as the kernel echoed them (roles as placed after).
    pub inserted: Vec<Rule>,
    /// The rules of the read that the batch deleted (of any namespace: a move deletes the
    /// old name's rules).
    pub removed: Vec<Rule>,
    /// The namespace's rules after the batch, chain by chain, top down, with their roles.
    pub remaining: Vec<Rule>,
    /// Every switcheroo rule of the chains after the batch (any namespace).
    pub after: Vec<Rule>,
    /// How many attempts were made (reads and batches that met a change count alike).
    pub attempts: u32,
    /// How long the lock was waited for.
    pub lock_wait: Duration,
}

/// The attempts made so far, against the budget.
struct Attempts {
    made: u32,
    max: u32,
}

impl Attempts {
    /// After a conflict: `Ok` (having paused) if another attempt is left, else the error
    /// that reports how many were made.
    fn after_conflict(&mut self, namespace: &str, e: switcheroo_sys::Error) -> Result<()> {
        if self.made >= self.max {
            return Err(Error::Conflict {
                attempts: self.made,
                source: e,
            });
        }
        if self.made == self.max / 2 {
            warn!("namespace {namespace}: {} conflicting attempts in a row; the chains are changing fast ({e})", self.made);
        } else {
            debug!("namespace {namespace}: conflict, again: {e}");
        }
        std::thread::sleep(backoff(self.made));
        Ok(())
    }
}

/// A random pause that grows with the attempt number (up to 1 ms, then up to 20 ms), so
/// that racing deployers fall out of step.
fn backoff(attempt: u32) -> Duration {
    let cap_us = (50u64 << attempt.min(10)).min(20_000);
    Duration::from_micros(rand::random_range(0..=cap_us))
}

/// Reads a snapshot without the lock, again after an interrupted dump, within
/// `max_attempts`.
pub(crate) fn read(conn: &mut Conn, max_attempts: u32) -> Result<Snapshot> {
    let mut attempts = Attempts {
        made: 0,
        max: max_attempts,
    };
    loop {
        attempts.made += 1;
        match snapshot::read(conn, Needs::default(), None) {
            Err(e) if e.is_conflict() => attempts.after_conflict("(read)", e)?,
            other => return Ok(other?),
        }
    }
}

impl Transaction<'_> {
    /// Takes the namespace's lock, then plans with `plan` on a fresh view of the chains and
    /// applies the plan in one batch, releasing the lock in the same batch. On a conflict
    /// (a dump interrupted, a handle vanished, a table or chain deleted under the batch, or
    /// the generation moved where the batch is bound to it) nothing was applied, so it
    /// reads and plans again after a short random pause, up to `max_attempts` attempts in
    /// all. A plan that changes nothing sends no batch.
    ///
    /// The batch is bound to the generation of its read only where that matters: when it
    /// creates the table or chains (a concurrent creator), or when the kernel has no lock
    /// to offer. Otherwise the lock keeps our own instances apart and deletion by handle
    /// keeps foreign writers harmless, so a busy foreign writer cannot starve the switch.
    ///
    /// An ENOENT on a write is either a table or chain deleted meanwhile or a part the
    /// kernel lacks; the first time, the kernel is probed for every part of the rule
    /// ([`Conn::probe_support`]): [`Error::Unsupported`] if one is missing, else a
    /// conflict like any other (the next read finds the chain gone and recreates it).
    pub fn run<T>(
        &self,
        conn: &mut Conn,
        mut plan: impl FnMut(&View<'_>) -> Result<(Plan, T)>,
    ) -> Result<Applied<T>> {
        let (lock, lock_wait) = Lock::acquire(conn, self.namespace)?;
        let mut released = false;
        let result = self.attempt(conn, &lock, &mut released, &mut plan);
        if !released {
            if let Err(e) = lock.release(conn) {
                warn!(
                    "namespace {}: releasing the commit lock: {e}",
                    self.namespace
                );
                // Either error makes the caller drop the socket, which releases the lock.
                result?;
                return Err(e);
            }
        }
        result.map(|mut applied| {
            applied.lock_wait = lock_wait;
            applied
        })
    }

    fn attempt<T>(
        &self,
        conn: &mut Conn,
        lock: &Lock,
        released: &mut bool,
        plan: &mut dyn FnMut(&View<'_>) -> Result<(Plan, T)>,
    ) -> Result<Applied<T>> {
        let namespace = self.namespace;
        let mut attempts = Attempts {
            made: 0,
            max: self.max_attempts,
        };
        let mut probed = false;
        loop {
            attempts.made += 1;
            // Taking the lock was a transaction of ours (where the kernel has the lock).
            let own = u32::from(lock.release_op().is_some());
            let since = self
                .record
                .map(|(records, key)| Since { records, key, own });
            let needs = Needs {
                chains: self.inserts_into,
                generation: lock.needs_generation(),
            };
            let snap = match snapshot::read(conn, needs, since) {
                Ok(snap) => snap,
                Err(e) if e.is_conflict() => {
                    attempts.after_conflict(namespace, e)?;
                    continue;
                }
                Err(e) => return Err(e.into()),
            };
            let view = View::new(namespace, &snap.rules);
            let (plan, value) = plan(&view)?;
            if plan.is_empty() {
                let remaining: Vec<Rule> = view.ours().cloned().collect();
                return Ok(Applied {
                    value,
                    inserted: Vec::new(),
                    removed: Vec::new(),
                    remaining,
                    after: snap.rules,
                    attempts: attempts.made,
                    lock_wait: Duration::ZERO,
                });
            }
            let batch = batch(&snap, &plan, lock);
            debug!(
                "namespace {namespace}: batch{} (attempt {}): {}",
                snap.generation
                    .map_or(String::new(), |g| format!(" at generation {g}")),
                attempts.made,
                describe(batch.ops())
            );
            let e = match conn.apply(&batch) {
                Ok(applied) => {
                    *released = true;
                    let mut owners = crate::owner::Owners::default();
                    let found = applied
                        .inserted
                        .into_iter()
                        .filter_map(|entry| rule::Found::parse(entry, &mut owners))
                        .collect();
                    let inserted = rule::place(found);
                    let deleted: Vec<(Family, Chain, Handle)> =
                        plan.delete.iter().map(Rule::place).collect();
                    self.record(conn, &snap, &deleted, &inserted);
                    let after = after(&snap.rules, &deleted, &inserted);
                    let remaining = after
                        .iter()
                        .filter(|r| r.namespace == namespace)
                        .cloned()
                        .collect();
                    let inserted = after
                        .iter()
                        .filter(|r| inserted.iter().any(|i| i.place() == r.place()))
                        .cloned()
                        .collect();
                    return Ok(Applied {
                        value,
                        inserted,
                        removed: plan.delete,
                        remaining,
                        after,
                        attempts: attempts.made,
                        lock_wait: Duration::ZERO,
                    });
                }
                Err(e) => e,
            };
            if e.is_missing() && !probed {
                probed = true;
                if let Some((family, chain, redirect)) = plan.insert.first() {
                    match conn.probe_support(*family, *chain, redirect) {
                        Ok(()) => debug!("namespace {namespace}: the kernel has every part of the rule, so a table or chain went away under the batch: {e}"),
                        Err(other) => return Err(other.into()),
                    }
                }
            }
            if e.is_conflict() || e.is_missing() {
                attempts.after_conflict(namespace, e)?;
            } else {
                return Err(e.into());
            }
        }
    }

    /// Records the rules for the next transaction if the generation moved by exactly this
    /// one, else drops any record.
    fn record(
        &self,
        conn: &mut Conn,
        snap: &Snapshot,
        deleted: &[(Family, Chain, Handle)],
        inserted: &[Rule],
    ) {
        let Some((records, key)) = self.record else {
            return;
        };
        let record = conn
            .generation()
            .ok()
            .and_then(|now| snapshot::record_after(snap, deleted, inserted, now));
        match record {
            Some(record) => records.store(key, &record),
            None => records.forget(key),
        }
    }
}

/// The batch for `plan` on the read `snap`: the missing tables and chains it inserts into
/// (bound to the read's generation then), the inserts, the deletes by handle, and the
/// release of the lock.
fn batch(snap: &Snapshot, plan: &Plan, lock: &Lock) -> Batch {
    let creates = plan
        .insert
        .iter()
        .any(|(f, c, _)| snap.missing.contains(&(*f, *c)));
    let bound = creates || lock.needs_generation();
    let mut batch = Batch::new(if bound { snap.generation } else { None });
    // As iptables-nft orders them: per family the table (a no-op if it exists), then per
    // chain the chain where missing and the chain's inserts.
    for family in Family::ALL {
        let inserts_into = |c: Chain| {
            plan.insert
                .iter()
                .any(|(f, ch, _)| (*f, *ch) == (family, c))
        };
        let creates = |c: Chain| snap.missing.contains(&(family, c)) && inserts_into(c);
        if Chain::ALL.into_iter().any(creates) {
            batch.push(Op::AddTable(family));
        }
        for chain in Chain::ALL {
            if creates(chain) {
                batch.push(Op::AddChain(family, chain));
            }
            for (_, _, redirect) in plan
                .insert
                .iter()
                .filter(|(f, c, _)| (*f, *c) == (family, chain))
            {
                batch.insert_rule(family, chain, redirect.clone());
            }
        }
    }
    for rule in &plan.delete {
        batch.delete_rule(rule.family, rule.chain, rule.handle);
    }
    if let Some(release) = lock.release_op() {
        batch.push(release);
    }
    batch
}

/// Every switcheroo rule of each chain after a batch that inserted `inserted` at the heads
/// and deleted `deleted` from `before`, top down, with their roles.
fn after(before: &[Rule], deleted: &[(Family, Chain, Handle)], inserted: &[Rule]) -> Vec<Rule> {
    let mut rules = Vec::new();
    for family in Family::ALL {
        for chain in Chain::ALL {
            let here = |r: &&Rule| (r.family, r.chain) == (family, chain);
            // Inserted in batch order at the head: the last insert is the top one.
            rules.extend(inserted.iter().rev().filter(here).cloned());
            rules.extend(
                before
                    .iter()
                    .filter(here)
                    .filter(|r| !deleted.contains(&r.place()))
                    .cloned(),
            );
        }
    }
    rule::replace_roles(&mut rules);
    rules
}

fn describe(ops: &[Op]) -> String {
    ops.iter().map(Op::to_string).collect::<Vec<_>>().join("; ")
}
