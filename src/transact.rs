//! The retried transaction that applies any [`Plan`]: lock, read, plan, one batch, and on
//! a conflict read and plan again, all within one budget of attempts.

use crate::error::{Error, Result};
use crate::lock::Lock;
use crate::plan::Plan;
use crate::record::{Key, Records};
use crate::routes::Routes;
use crate::rule::{self, Rule};
use crate::snapshot::{self, Needs, Remembered, Since, Snapshot};
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
    /// How long the lock was waited for (zero when the first attempt needed none).
    pub lock_wait: Duration,
    /// Whether a batch was applied (a plan that changes nothing sends none).
    pub changed: bool,
    /// The owners the read found, each looked at once: what signals the leaving ones.
    pub owners: crate::owner::Owners,
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
        match snapshot::read(conn, Needs::default(), None, None) {
            Err(e) if e.is_conflict() => attempts.after_conflict("(read)", e)?,
            other => return Ok(other?),
        }
    }
}

/// [`read`] on a socket that keeps `memory` (see [`Remembered`]): the generation is read
/// first, so a read at the generation `memory` names skips the dumps, and what this read
/// found is remembered for the next one. A deploy reads before it binds its ports and
/// commits once its server is ready: when nothing changed the ruleset in between, the
/// commit's read costs one generation query instead of four dumps.
pub(crate) fn read_remembering(
    conn: &mut Conn,
    max_attempts: u32,
    memory: &mut Option<Remembered>,
) -> Result<Snapshot> {
    let mut attempts = Attempts {
        made: 0,
        max: max_attempts,
    };
    let needs = Needs {
        generation: true,
        ..Needs::default()
    };
    loop {
        attempts.made += 1;
        match snapshot::read(conn, needs, None, memory.take().as_ref()) {
            Err(e) if e.is_conflict() => attempts.after_conflict("(read)", e)?,
            Err(e) => return Err(e.into()),
            Ok(snap) => {
                // The generation was read before the dumps: a change after it moved the
                // generation on, so these rules can only ever be taken for this one.
                if let Some(generation) = snap.generation {
                    *memory = Some(Remembered {
                        generation,
                        rules: snap.rules.clone(),
                    });
                }
                return Ok(snap);
            }
        }
    }
}

/// How one attempt ended, when it did not fail for good.
enum Tried<T> {
    Applied(Applied<T>),
    /// Nothing was applied: the ruleset changed under the read or the batch.
    Conflict(switcheroo_sys::Error),
}

/// What keeps an attempt's batch from applying to a ruleset that changed since its read.
#[derive(Clone, Copy)]
enum Guard<'a> {
    /// The batch is bound to the generation of its read: any change at all refuses it.
    Generation,
    /// The namespace's commit lock is held; the batch releases it.
    Lock(&'a Lock),
}

impl Transaction<'_> {
    /// Plans with `plan` on a fresh view of the chains and applies the plan in one batch.
    /// A plan that changes nothing sends no batch.
    ///
    /// The first attempt takes no lock: its batch is bound to the generation of its read,
    /// so the kernel refuses it if anything at all changed the ruleset meanwhile (another
    /// instance of the namespace included). That is the common case, and costs no
    /// transaction besides the batch itself. After a conflict, the namespace's commit lock
    /// is taken and every further attempt runs under it, its batch releasing the lock: the
    /// lock keeps our own instances apart and deletion by handle keeps foreign writers
    /// harmless, so a busy foreign writer (which would refuse every bound batch) cannot
    /// starve the switch. Under the lock a batch is bound to the generation only where that
    /// matters: when it creates the table or chains (a concurrent creator), or when the
    /// kernel has no lock to offer. Conflicts (a dump interrupted, a handle vanished, a
    /// table or chain deleted under the batch, the generation moved) are retried after a
    /// short random pause, up to `max_attempts` attempts in all.
    ///
    /// An ENOENT on a write is either a table or chain deleted meanwhile or a part the
    /// kernel lacks; the first time, the kernel is probed for every part of the rule
    /// ([`Conn::probe_support`]): [`Error::Unsupported`] if one is missing, else a
    /// conflict like any other (the next read finds the chain gone and recreates it).
    ///
    /// `memory` is what the last transaction on `conn` left (see [`Remembered`]): a read at
    /// the generation it names skips the dumps. It is replaced by what this one leaves, when
    /// that is known without another round trip (a batch bound to its generation), and
    /// forgotten otherwise.
    pub fn run<T>(
        &self,
        conn: &mut Conn,
        memory: &mut Option<Remembered>,
        mut plan: impl FnMut(&View<'_>) -> Result<(Plan, T)>,
    ) -> Result<Applied<T>> {
        let result = self.run_with(conn, memory, &mut plan);
        if result.is_err() {
            *memory = None;
        }
        result
    }

    fn run_with<T>(
        &self,
        conn: &mut Conn,
        memory: &mut Option<Remembered>,
        plan: &mut dyn FnMut(&View<'_>) -> Result<(Plan, T)>,
    ) -> Result<Applied<T>> {
        let mut attempts = Attempts {
            made: 1,
            max: self.max_attempts,
        };
        let mut probed = false;
        match self.attempt(conn, Guard::Generation, &mut probed, memory, plan)? {
            Tried::Applied(applied) => return Ok(applied.attempts(1)),
            Tried::Conflict(e) => attempts.after_conflict(self.namespace, e)?,
        }
        let (lock, lock_wait) = Lock::acquire(conn, self.namespace)?;
        let result = loop {
            attempts.made += 1;
            match self.attempt(conn, Guard::Lock(&lock), &mut probed, memory, plan) {
                Ok(Tried::Applied(applied)) => break Ok(applied),
                Ok(Tried::Conflict(e)) => {
                    if let Err(e) = attempts.after_conflict(self.namespace, e) {
                        break Err(e);
                    }
                }
                Err(e) => break Err(e),
            }
        };
        // An applied batch released the lock; anything else must release it here.
        let released = matches!(&result, Ok(applied) if applied.changed);
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
        result.map(|applied| Applied {
            lock_wait,
            ..applied.attempts(attempts.made)
        })
    }

    /// One read, plan and batch.
    fn attempt<T>(
        &self,
        conn: &mut Conn,
        guard: Guard<'_>,
        probed: &mut bool,
        memory: &mut Option<Remembered>,
        plan: &mut dyn FnMut(&View<'_>) -> Result<(Plan, T)>,
    ) -> Result<Tried<T>> {
        let namespace = self.namespace;
        // Taking the lock was a transaction of ours (where the kernel has the lock).
        let own = match guard {
            Guard::Lock(lock) => u32::from(lock.release_op().is_some()),
            Guard::Generation => 0,
        };
        let bound_anyway = match guard {
            Guard::Generation => true,
            Guard::Lock(lock) => lock.needs_generation(),
        };
        let since = self
            .record
            .map(|(records, key)| Since { records, key, own });
        let needs = Needs {
            chains: self.inserts_into,
            generation: bound_anyway,
        };
        let snap = match snapshot::read(conn, needs, since, memory.take().as_ref()) {
            Ok(snap) => snap,
            Err(e) if e.is_conflict() => return Ok(Tried::Conflict(e)),
            Err(e) => return Err(e.into()),
        };
        let view = View::new(namespace, &snap.rules);
        let (plan, value) = plan(&view)?;
        if plan.is_empty() {
            let remaining: Vec<Rule> = view.ours().cloned().collect();
            // Nothing changed: the ruleset is still at the generation of the read.
            if let Some(generation) = snap.generation {
                *memory = Some(Remembered {
                    generation,
                    rules: snap.rules.clone(),
                });
            }
            return Ok(Tried::Applied(Applied {
                value,
                inserted: Vec::new(),
                removed: Vec::new(),
                remaining,
                after: snap.rules,
                attempts: 0,
                lock_wait: Duration::ZERO,
                changed: false,
                owners: snap.owners,
            }));
        }
        // Without the lock held, the batch takes and releases it itself: refused whole if
        // another instance holds it.
        let (take, release) = match guard {
            Guard::Lock(lock) => (None, lock.release_op()),
            Guard::Generation => {
                let (take, release) = Lock::within_batch(namespace)?;
                (Some(take), Some(release))
            }
        };
        let batch = batch(&snap, &plan, bound_anyway, take, release);
        debug!(
            "namespace {namespace}: batch{}{}: {}",
            snap.generation
                .filter(|_| batch.generation().is_some())
                .map_or(String::new(), |g| format!(" bound to generation {g}")),
            if matches!(guard, Guard::Lock(_)) {
                " under the lock"
            } else {
                ""
            },
            describe(batch.ops())
        );
        let e = match conn.apply(&batch) {
            Ok(applied) => {
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
                if let (Some(generation), true) = (snap.generation, batch.generation().is_some()) {
                    *memory = Some(Remembered::after_bound_batch(generation, after.clone()));
                }
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
                return Ok(Tried::Applied(Applied {
                    value,
                    inserted,
                    removed: plan.delete,
                    remaining,
                    after,
                    attempts: 0,
                    lock_wait: Duration::ZERO,
                    changed: true,
                    owners: snap.owners,
                }));
            }
            Err(e) => e,
        };
        if e.is_missing() && !*probed {
            *probed = true;
            if let Some((family, chain, redirect)) = plan.insert.first() {
                match conn.probe_support(*family, *chain, redirect) {
                    Ok(()) => debug!("namespace {namespace}: the kernel has every part of the rule, so a table or chain went away under the batch: {e}"),
                    Err(other) => return Err(other.into()),
                }
            }
        }
        let lock_in_the_way = matches!(guard, Guard::Generation)
            && (e.is_held()
                || matches!(
                    e,
                    switcheroo_sys::Error::Kernel {
                        errno: nix::errno::Errno::EOPNOTSUPP,
                        ..
                    }
                ));
        if e.is_conflict() || e.is_missing() || lock_in_the_way {
            // Held by another instance (or no owned tables in this kernel, before 5.12):
            // the next attempt takes the lock the long way, which waits for it (or learns
            // that there is none).
            Ok(Tried::Conflict(e))
        } else {
            Err(e.into())
        }
    }

    /// Records the rules for the next transaction if the generation moved by exactly this
    /// one since its read, else drops any record.
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

impl<T> Applied<T> {
    fn attempts(self, attempts: u32) -> Applied<T> {
        Applied { attempts, ..self }
    }
}

/// The batch for `plan` on the read `snap`: `take` (the lock's) first, the missing tables
/// and chains it inserts into (bound to the read's generation then, as it is when `bound`
/// says so), the inserts, the deletes by handle, and `release` (the lock's) last.
fn batch(
    snap: &Snapshot,
    plan: &Plan,
    bound: bool,
    take: Option<Op>,
    release: Option<Op>,
) -> Batch {
    let creates = plan
        .insert
        .iter()
        .any(|(f, c, _)| snap.missing.contains(&(*f, *c)));
    let bound = creates || bound;
    let mut batch = Batch::new(if bound { snap.generation } else { None });
    if let Some(take) = take {
        batch.push(take);
    }
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
    if let Some(release) = release {
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
