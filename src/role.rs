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

/// The place of a rule in its chain among its namespace's rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// A rule with a statistic match above the active: it takes a share of new
    /// connections ([`Rule::weight`](crate::Rule::weight)).
    Canary,
    /// The first plain rule: it takes every new connection the canary does not.
    Active,
    /// The second plain rule: it takes no new connection while the active is there.
    Standby,
    /// A rule below the standby, or a second canary: left by an older tool or a crash;
    /// the next transaction removes it.
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
