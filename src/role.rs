//! What a rule is for, from its place in its chain.
//!
//! A namespace's rules in each (family, chain), top down, are its deploy history:
//!
//! ```text
//! canary    -m statistic --mode random --probability P ... (at most one, above the active)
//! active    the first plain rule: every new connection the canary does not take
//! standby   the previous active, kept below it during a probation: it matches nothing new
//!           but can become the active again in one transaction, its process still warm
//! ```
//!
//! Roles are read from positions, so any process that can read the ruleset knows them, and
//! a process killed at any moment leaves a state the next one can read.

use std::fmt;

/// The place of a rule in its chain among its namespace's rules for the same public port.
/// Ordered as a chain reads, top down: canary, active, standby, extra.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Role {
    /// A rule with a statistic match above the active: it takes a share of new
    /// connections ([`Rule::weight`](crate::Rule::weight)).
    Canary,
    /// The first plain rule: it takes every new connection the canary does not.
    Active,
    /// The second plain rule: it takes no new connection while the active is there.
    Standby,
    /// A rule below the standby, or a statistic rule below another one or below the
    /// active: left by an older tool or a crash; the next transaction removes it.
    Extra,
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Canary => "canary",
            Role::Active => "active",
            Role::Standby => "standby",
            Role::Extra => "extra",
        })
    }
}

/// The roles of one group's rules (one namespace's rules for one public port in one chain),
/// top down, from whether each has a statistic match (`weighted`). A statistic rule is the
/// canary only above every plain rule, and only the first one; the first plain rule is the
/// active and the second the standby. A dead owner's rule keeps its place: it still catches
/// the connections of that place.
pub(crate) fn by_position(weighted: impl IntoIterator<Item = bool>) -> Vec<Role> {
    let mut plain = 0;
    let mut canary = false;
    weighted
        .into_iter()
        .map(|weighted| {
            if weighted {
                if plain == 0 && !canary {
                    canary = true;
                    Role::Canary
                } else {
                    Role::Extra
                }
            } else {
                plain += 1;
                match plain {
                    1 => Role::Active,
                    2 => Role::Standby,
                    _ => Role::Extra,
                }
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use Role::*;

    #[test]
    fn roles_come_from_positions() {
        // (statistic match of each rule, top down) -> roles
        let table: &[(&[bool], &[Role])] = &[
            (&[], &[]),
            (&[false], &[Active]),
            (&[false, false], &[Active, Standby]),
            (&[false, false, false], &[Active, Standby, Extra]),
            (&[true, false], &[Canary, Active]),
            (&[true, false, false], &[Canary, Active, Standby]),
            (&[true, true, false], &[Canary, Extra, Active]),
            (&[false, true], &[Active, Extra]),
            (&[true], &[Canary]),
        ];
        for (weighted, roles) in table {
            assert_eq!(
                by_position(weighted.iter().copied()),
                *roles,
                "{weighted:?}"
            );
        }
    }
}
