//! The retried transaction over a namespace's rules: lock, read, build one batch, apply it,
//! and on a conflict read again, all within one budget of attempts.

use crate::lock::Lock;
use crate::rule::Rule;
use crate::snapshot::{self, Recorded, Since, Snapshot};
use crate::{Error, Result};
use log::{debug, warn};
use std::time::Duration;
use switcheroo_sys::{Batch, Chain, Conn, Family, Handle, Op};

/// How many times a transaction is tried by default when the ruleset changes under it.
/// Each try is a fresh read and one batch, well under a millisecond, so even a tight loop
/// of foreign writers leaves gaps to get through.
pub(crate) const MAX_ATTEMPTS: u32 = 32;

/// What a transaction is about.
#[derive(Clone, Copy)]
pub(crate) struct Transaction<'a> {
    /// The service namespace whose rules are read and whose lock is taken.
    pub namespace: &'a str,
    /// The budget: reads and batches that met a concurrent change, together.
    pub max_attempts: u32,
    /// The commit record to read from and write, if records are on.
    pub recorded: Option<Recorded<'a>>,
    /// The chains the batch may insert into (to learn whether they exist).
    pub wanted: &'a dyn Fn(Chain) -> bool,
}

/// What an applied transaction did.
#[derive(Debug)]
pub(crate) struct Outcome {
    /// The rules the batch inserted, as the kernel echoed them.
    pub inserted: Vec<Rule>,
    /// The rules of the snapshot that the batch deleted.
    pub removed: Vec<Rule>,
    /// The namespace's rules after the batch, chain by chain, top down, with their roles.
    pub remaining: Vec<Rule>,
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

/// Reads a snapshot, again after an interrupted dump, within `max_attempts`.
pub(crate) fn read(
    conn: &mut Conn,
    namespace: Option<&str>,
    max_attempts: u32,
    recorded: Option<Recorded<'_>>,
) -> Result<Snapshot> {
    let mut attempts = Attempts {
        made: 0,
        max: max_attempts,
    };
    loop {
        attempts.made += 1;
        let since = recorded.map(|recorded| Since { recorded, own: 0 });
        match snapshot::read(conn, namespace, &|_| false, since) {
            Err(e) if e.is_conflict() => {
                attempts.after_conflict(namespace.unwrap_or("(all)"), e)?
            }
            other => return Ok(other?),
        }
    }
}

impl<'a> Transaction<'a> {
    /// A transaction that only deletes rules (it creates no chain).
    pub fn deleting(namespace: &'a str, max_attempts: u32, recorded: Option<Recorded<'a>>) -> Self {
        Transaction {
            namespace,
            max_attempts,
            recorded,
            wanted: &|_| false,
        }
    }

    /// Takes the namespace's lock, then builds a batch with `build` from a fresh snapshot
    /// and applies it, releasing the lock in the same batch. On a conflict (a dump
    /// interrupted, a handle vanished, a table or chain deleted under the batch, or the
    /// generation moved where the batch is bound to it) nothing was applied, so it reads
    /// again after a short random pause, up to `max_attempts` attempts in all.
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
    pub fn run(
        &self,
        conn: &mut Conn,
        mut build: impl FnMut(&Snapshot, &mut Batch) -> Result<()>,
    ) -> Result<Outcome> {
        let (lock, lock_wait) = Lock::acquire(conn, self.namespace)?;
        let mut released = false;
        let result = self.attempt(conn, &lock, &mut released, &mut build);
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
        result.map(|mut outcome| {
            outcome.lock_wait = lock_wait;
            outcome
        })
    }

    fn attempt(
        &self,
        conn: &mut Conn,
        lock: &Lock,
        released: &mut bool,
        build: &mut dyn FnMut(&Snapshot, &mut Batch) -> Result<()>,
    ) -> Result<Outcome> {
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
            let since = self.recorded.map(|recorded| Since { recorded, own });
            let snap = match snapshot::read(conn, Some(namespace), self.wanted, since) {
                Ok(snap) => snap,
                Err(e) if e.is_conflict() => {
                    attempts.after_conflict(namespace, e)?;
                    continue;
                }
                Err(e) => return Err(e.into()),
            };
            let bound = !snap.missing.is_empty() || lock.needs_generation();
            let mut batch = Batch::new(bound.then_some(snap.generation));
            build(&snap, &mut batch)?;
            let changes = batch.ops().len();
            if changes == 0 {
                return Ok(Outcome {
                    inserted: Vec::new(),
                    removed: Vec::new(),
                    remaining: snap.ours,
                    attempts: attempts.made,
                    lock_wait: Duration::ZERO,
                });
            }
            debug!(
                "namespace {namespace}: batch at generation {} (attempt {}): {}",
                snap.generation,
                attempts.made,
                describe(batch.ops())
            );
            if let Some(release) = lock.release_op() {
                batch.push(release);
            }
            let e = match conn.apply(&batch) {
                Ok(applied) => {
                    *released = true;
                    let deleted = deleted(&batch);
                    let inserted: Vec<Rule> = applied
                        .inserted
                        .into_iter()
                        .filter_map(|entry| Rule::from_entry(entry, Some(namespace)))
                        .collect();
                    self.record(conn, &snap, &deleted, &inserted);
                    let (removed, kept): (Vec<Rule>, Vec<Rule>) = snap
                        .ours
                        .iter()
                        .cloned()
                        .partition(|r| deleted.contains(&r.place()));
                    let remaining = after(&inserted, kept);
                    return Ok(Outcome {
                        inserted,
                        removed,
                        remaining,
                        attempts: attempts.made,
                        lock_wait: Duration::ZERO,
                    });
                }
                Err(e) => e,
            };
            if e.is_missing() && !probed {
                probed = true;
                if let Some((family, chain, redirect)) = first_insert(&batch) {
                    match conn.probe_support(family, chain, redirect) {
                        Ok(()) => debug!("namespace {namespace}: the kernel has every part of the rule, so a table or chain went away under the batch: {e}"),
                        Err(unsupported @ switcheroo_sys::Error::Unsupported { .. }) => {
                            return Err(unsupported.into())
                        }
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

    /// Records the namespace's rules for the next transaction if the generation moved by
    /// exactly this one, else drops any record.
    fn record(
        &self,
        conn: &mut Conn,
        snap: &Snapshot,
        deleted: &[(Family, Chain, Handle)],
        inserted: &[Rule],
    ) {
        let Some(Recorded { records, key }) = self.recorded else {
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

/// The rules of each chain after a batch that inserted `inserted` at the heads and kept
/// `kept`, top down, with their roles.
fn after(inserted: &[Rule], kept: Vec<Rule>) -> Vec<Rule> {
    let mut rules = Vec::new();
    for family in Family::ALL {
        for chain in Chain::ALL {
            let here = |r: &&Rule| (r.family, r.chain) == (family, chain);
            // Inserted in batch order at the head: the last insert is the top one.
            rules.extend(inserted.iter().rev().filter(here).cloned());
            rules.extend(kept.iter().filter(here).cloned());
        }
    }
    crate::rule::assign_roles_per_chain(&mut rules);
    rules
}

fn deleted(batch: &Batch) -> Vec<(Family, Chain, Handle)> {
    batch
        .ops()
        .iter()
        .filter_map(|op| match op {
            Op::Delete(f, c, h) => Some((*f, *c, *h)),
            _ => None,
        })
        .collect()
}

fn first_insert(batch: &Batch) -> Option<(Family, Chain, &switcheroo_sys::Redirect)> {
    batch.ops().iter().find_map(|op| match op {
        Op::Insert(f, c, r) => Some((*f, *c, r)),
        _ => None,
    })
}

fn describe(ops: &[Op]) -> String {
    ops.iter().map(Op::to_string).collect::<Vec<_>>().join("; ")
}
