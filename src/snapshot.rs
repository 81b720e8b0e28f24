//! A namespace's rules as the kernel holds them, read in one go.

use crate::record::{Key, Record, Records};
use crate::rule::Rule;
use log::debug;
use switcheroo_sys::{Chain, Conn, Error, Family};

/// What a transaction is computed from: the generation it was read at, the switcheroo
/// rules (of one namespace, or all), chain by chain top down, and the nat chains of
/// interest that do not exist yet.
#[derive(Debug, Default)]
pub(crate) struct Snapshot {
    pub generation: u32,
    pub ours: Vec<Rule>,
    pub missing: Vec<(Family, Chain)>,
}

/// Where a snapshot may come from without dumps.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Recorded<'a> {
    pub records: &'a Records,
    pub key: &'a Key,
}

/// The record and what the caller has done since it was written: `own` transactions of
/// its own, each of which moved the generation by one (taking the commit lock is one).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Since<'a> {
    pub recorded: Recorded<'a>,
    pub own: u32,
}

/// Reads the generation, then dumps every (family, chain), each filtered to its chain in
/// the kernel, and keeps the switcheroo rules of `namespace` (of every namespace when
/// `None`). Chains for which `wanted` holds and that dump empty are looked up to learn
/// whether they exist. With `since`, the record of the namespace's last commit is used
/// instead of the dumps when it still holds (see [`crate::record`]).
///
/// A dump interrupted by a concurrent change fails with a conflict: the caller retries.
pub(crate) fn read(
    conn: &mut Conn,
    namespace: Option<&str>,
    wanted: &dyn Fn(Chain) -> bool,
    since: Option<Since<'_>>,
) -> Result<Snapshot, Error> {
    if let Some(since) = since {
        if let Some(snap) = from_record(conn, since, wanted)? {
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
            let entries = conn.list_rules(family, chain)?;
            if entries.is_empty() && wanted(chain) && !conn.chain_exists(family, chain)? {
                snap.missing.push((family, chain));
            }
            let mut rules: Vec<Rule> = entries
                .into_iter()
                .filter_map(|entry| Rule::from_entry(entry, namespace))
                .collect();
            crate::rule::assign_roles(&mut rules);
            snap.ours.extend(rules);
        }
    }
    Ok(snap)
}

/// The snapshot from the record of the namespace's last commit, if the ruleset generation
/// is still the recorded one (plus the caller's own transactions since, which came after
/// the record: the lock it took was released by the recorded commit), every recorded
/// rule is still there and ours, and every wanted chain holds one of them (so it exists).
/// `None`: dump instead.
fn from_record(
    conn: &mut Conn,
    Since {
        recorded: Recorded { records, key },
        own,
    }: Since<'_>,
    wanted: &dyn Fn(Chain) -> bool,
) -> Result<Option<Snapshot>, Error> {
    let Some(record) = records.load(key) else {
        return Ok(None);
    };
    let namespace = key.namespace.as_str();
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
    if generation != record.generation.wrapping_add(own) {
        debug!(
            "namespace {namespace}: the ruleset changed since the last commit (generation {} and {own} of ours -> {generation}); dumping",
            record.generation
        );
        return Ok(None);
    }
    let mut ours = Vec::with_capacity(record.rules.len());
    for (family, chain, handle) in record.rules {
        let rule = conn
            .get_rule(family, chain, handle)?
            .and_then(|entry| Rule::from_entry(entry, Some(namespace)));
        match rule {
            Some(rule) => ours.push(rule),
            None => {
                debug!("namespace {namespace}: recorded rule {family} {chain} {handle} is not ours; dumping");
                return Ok(None);
            }
        }
    }
    crate::rule::assign_roles_per_chain(&mut ours);
    debug!(
        "namespace {namespace}: generation {generation} unchanged since the last commit; no dump"
    );
    Ok(Some(Snapshot {
        generation,
        ours,
        missing: Vec::new(),
    }))
}

/// The record a transaction leaves: the rules of `snap` that `batch` did not delete,
/// and the rules it inserted, if the generation moved by exactly this transaction.
pub(crate) fn record_after(
    snap: &Snapshot,
    deleted: &[(Family, Chain, switcheroo_sys::Handle)],
    inserted: &[Rule],
    generation_now: u32,
) -> Option<Record> {
    if generation_now != snap.generation.wrapping_add(1) {
        return None;
    }
    let mut rules: Vec<(Family, Chain, u64)> = inserted
        .iter()
        .chain(snap.ours.iter().filter(|r| !deleted.contains(&r.place())))
        .map(|r| (r.family, r.chain, r.handle.get()))
        .collect();
    rules.sort_by_key(|(f, c, _)| (*f, *c));
    (!rules.is_empty()).then_some(Record {
        generation: generation_now,
        rules,
    })
}
