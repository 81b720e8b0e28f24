//! The switcheroo rules of the nat chains as the kernel holds them, read in one go.

use crate::owner::Owners;
use crate::record::{Record, Records};
use crate::routes::Routes;
use crate::rule::{self, Found, Rule};
use log::debug;
use switcheroo_sys::{Chain, Conn, Error, Family, Handle};

/// What a transaction is computed from: every switcheroo rule of the four nat chains, of
/// every namespace, chain by chain top down with their roles; the chains of interest that
/// do not exist yet; and the generation the read was made at, when it was asked for.
#[derive(Debug, Default)]
pub(crate) struct Snapshot {
    pub generation: Option<u32>,
    pub rules: Vec<Rule>,
    pub missing: Vec<(Family, Chain)>,
    /// The owners the rules name, each looked at once (and held by a pidfd).
    pub owners: Owners,
}

/// Where a snapshot may come from without dumps: the record of the namespace's last
/// commit, and the transactions of the caller's own since it was written, each of which
/// moved the generation by one (taking the commit lock is one).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Since<'a> {
    pub records: &'a Records,
    pub key: &'a crate::record::Key,
    pub own: u32,
}

/// What this process's last transaction on the same socket left: every switcheroo rule of
/// the chains after it, and the generation it moved the ruleset to. While the generation is
/// still that one, nothing has changed the ruleset since, so these are exactly the rules the
/// dumps would return (only their owners' liveness must be read again). Kept in memory,
/// beside the socket it was learnt on, so it can belong to no other network namespace and
/// dies with the socket.
#[derive(Debug, Clone)]
pub(crate) struct Remembered {
    pub generation: u32,
    pub rules: Vec<Rule>,
}

impl Remembered {
    /// What a batch bound to `generation` left when it applied: the kernel moves the
    /// generation by one per transaction (skipping 0 when it wraps).
    pub fn after_bound_batch(generation: u32, rules: Vec<Rule>) -> Remembered {
        let next = match generation.wrapping_add(1) {
            0 => 1,
            n => n,
        };
        Remembered {
            generation: next,
            rules,
        }
    }
}

/// What a read needs besides the rules.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Needs {
    /// The chains of these routes will be inserted into: learn whether they exist.
    pub chains: Option<Routes>,
    /// The generation, read before the dumps (to bind a batch to, or to record).
    pub generation: bool,
}

impl Needs {
    fn wants(&self, chain: Chain) -> bool {
        self.chains.is_some_and(|r| r.has_chain(chain))
    }
}

/// Dumps every (family, chain), each filtered to its chain in the kernel, and keeps the
/// switcheroo rules. Chains that [`Needs::chains`] names and that dump empty are looked up
/// to learn whether they exist. With `since`, the record of the namespace's last commit is
/// used instead of the dumps when it still holds (see [`crate::record`]); with `memory`,
/// what this socket's last read or transaction left, when the generation is still the one
/// it names (tried before the record: it needs no round trip beyond the generation).
///
/// The generation is read first only when `needs` asks for it or there is a `memory`, or when a chain turns out
/// to be missing (a batch that creates chains is bound to the generation of its read): the
/// read is then made again after it, so that the generation is not newer than the rules.
///
/// A dump interrupted by a concurrent change fails with a conflict: the caller retries.
pub(crate) fn read(
    conn: &mut Conn,
    mut needs: Needs,
    since: Option<Since<'_>>,
    memory: Option<&Remembered>,
) -> Result<Snapshot, Error> {
    // What this socket remembers costs no round trip beyond the generation: tried first.
    let mut known = None;
    if needs.generation || memory.is_some() {
        let generation = conn.generation()?;
        if let Some(snap) = memory.and_then(|m| from_memory(m, generation, &needs)) {
            return Ok(snap);
        }
        known = Some(generation);
    }
    if let Some(since) = since {
        if let Some(snap) = from_record(conn, since, &needs, known)? {
            return Ok(snap);
        }
        needs.generation = true;
    }
    loop {
        let generation = match known.take() {
            Some(generation) => Some(generation),
            None if needs.generation => Some(conn.generation()?),
            None => None,
        };
        let mut snap = Snapshot {
            generation,
            ..Snapshot::default()
        };
        for family in Family::ALL {
            for chain in Chain::ALL {
                let entries = conn.list_rules(family, chain)?;
                if entries.is_empty() && needs.wants(chain) && !conn.chain_exists(family, chain)? {
                    snap.missing.push((family, chain));
                }
                let found = entries
                    .into_iter()
                    .filter_map(|entry| Found::parse(entry, &mut snap.owners))
                    .collect();
                snap.rules.extend(rule::place(found));
            }
        }
        if snap.missing.is_empty() || snap.generation.is_some() {
            return Ok(snap);
        }
        needs.generation = true;
    }
}

/// The snapshot from what this process's last transaction left, if the ruleset is still at
/// the generation it left (`generation`, just read) and every wanted chain holds one of its
/// rules (so it exists): the same rules, their owners' liveness read again.
fn from_memory(memory: &Remembered, generation: u32, needs: &Needs) -> Option<Snapshot> {
    if memory.generation != generation {
        return None;
    }
    let covered = Family::ALL.into_iter().all(|family| {
        Chain::ALL.into_iter().all(|chain| {
            !needs.wants(chain)
                || memory
                    .rules
                    .iter()
                    .any(|r| (r.family, r.chain) == (family, chain))
        })
    });
    if !covered {
        return None;
    }
    let mut owners = Owners::default();
    let rules = memory
        .rules
        .iter()
        .map(|r| Rule {
            alive: owners.is_alive(&r.identity()),
            ..r.clone()
        })
        .collect();
    debug!("generation {generation} unchanged since this process's last transaction; no dump");
    Some(Snapshot {
        generation: Some(generation),
        rules,
        missing: Vec::new(),
        owners,
    })
}

/// The snapshot from the record of the namespace's last commit, if the ruleset generation
/// is still the recorded one (plus the caller's own transactions since, which came after
/// the record: the lock it took was released by the recorded commit), every recorded rule
/// is still there and a switcheroo rule, and every wanted chain holds one of them (so it
/// exists). `None`: dump instead.
fn from_record(
    conn: &mut Conn,
    Since { records, key, own }: Since<'_>,
    needs: &Needs,
    known: Option<u32>,
) -> Result<Option<Snapshot>, Error> {
    let Some(record) = records.load(key) else {
        return Ok(None);
    };
    let namespace = key.namespace.as_str();
    let covered = Family::ALL.into_iter().all(|family| {
        Chain::ALL.into_iter().all(|chain| {
            !needs.wants(chain)
                || record
                    .rules
                    .iter()
                    .any(|(f, c, _)| (*f, *c) == (family, chain))
        })
    });
    if !covered {
        return Ok(None);
    }
    let generation = match known {
        Some(generation) => generation,
        None => conn.generation()?,
    };
    if generation != record.generation.wrapping_add(own) {
        debug!(
            "namespace {namespace}: the ruleset changed since the last commit (generation {} and {own} of ours -> {generation}); dumping",
            record.generation
        );
        return Ok(None);
    }
    let mut owners = Owners::default();
    let mut rules = Vec::with_capacity(record.rules.len());
    for family in Family::ALL {
        for chain in Chain::ALL {
            let mut found = Vec::new();
            for (_, _, handle) in record
                .rules
                .iter()
                .filter(|(f, c, _)| (*f, *c) == (family, chain))
            {
                let rule = conn
                    .get_rule(family, chain, *handle)?
                    .and_then(|entry| Found::parse(entry, &mut owners));
                match rule {
                    Some(rule) => found.push(rule),
                    None => {
                        debug!("namespace {namespace}: recorded rule {family} {chain} {handle} is gone or not a switcheroo rule; dumping");
                        return Ok(None);
                    }
                }
            }
            rules.extend(rule::place(found));
        }
    }
    debug!(
        "namespace {namespace}: generation {generation} unchanged since the last commit; no dump"
    );
    Ok(Some(Snapshot {
        generation: Some(generation),
        rules,
        missing: Vec::new(),
        owners,
    }))
}

/// The record a transaction leaves: every switcheroo rule after it (the rules of `snap`
/// that it did not delete, and those it inserted), chain by chain top down, if the
/// generation moved by exactly this transaction; `None` otherwise.
pub(crate) fn record_after(
    snap: &Snapshot,
    deleted: &[(Family, Chain, Handle)],
    inserted: &[Rule],
    generation_now: u32,
) -> Option<Record> {
    let read_at = snap.generation?;
    if generation_now != read_at.wrapping_add(1) {
        return None;
    }
    let mut rules = Vec::new();
    for family in Family::ALL {
        for chain in Chain::ALL {
            let here = |r: &&Rule| (r.family, r.chain) == (family, chain);
            // Inserted in batch order at the head: the last insert is the top one.
            let new = inserted.iter().rev().filter(here);
            let kept = snap
                .rules
                .iter()
                .filter(here)
                .filter(|r| !deleted.contains(&r.place()));
            rules.extend(new.chain(kept).map(|r| (family, chain, r.handle.get())));
        }
    }
    (!rules.is_empty()).then_some(Record {
        generation: generation_now,
        rules,
    })
}
