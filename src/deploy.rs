//! Which rules a deploy keeps below the new ones, read from the roles of the snapshot.

use crate::rule::{Group, Rule};
use crate::snapshot::Snapshot;

/// How a deploy treats the instances already in the chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Deploy {
    /// The new instance takes every new connection; every older rule goes.
    Replace,
    /// The new instance takes every new connection; the previous active stays below as
    /// the standby, everything else goes.
    Probation,
    /// The new instance takes a share of new connections above the active; the active and
    /// the standby stay, an earlier canary goes.
    Canary,
}

/// The rules of `snap`, group by group (one public port in one chain), each top down, in
/// the order the groups first appear.
pub(crate) fn groups(snap: &Snapshot) -> Vec<(Group, Vec<&Rule>)> {
    let mut out: Vec<(Group, Vec<&Rule>)> = Vec::new();
    for rule in &snap.ours {
        let group = rule.group();
        match out.iter_mut().find(|(g, _)| *g == group) {
            Some((_, rules)) => rules.push(rule),
            None => out.push((group, vec![rule])),
        }
    }
    out
}

/// The live plain rules of one group, top down: the active first, then the standby.
pub(crate) fn live_plain<'a>(rules: &[&'a Rule]) -> Vec<&'a Rule> {
    rules
        .iter()
        .copied()
        .filter(|r| r.alive && r.weight.is_none())
        .collect()
}

/// The rules a deploy of `how` keeps below the new ones: per group (public port and
/// chain), the first two live plain rules for a canary, the first one for a probation,
/// none for a plain deploy. Everything else of the namespace is deleted by the same
/// transaction.
pub(crate) fn kept_by(snap: &Snapshot, how: Deploy) -> Vec<Rule> {
    let keep = match how {
        Deploy::Replace => 0,
        Deploy::Probation => 1,
        Deploy::Canary => 2,
    };
    groups(snap)
        .into_iter()
        .flat_map(|(_, rules)| {
            live_plain(&rules)
                .into_iter()
                .take(keep)
                .cloned()
                .collect::<Vec<_>>()
        })
        .collect()
}
