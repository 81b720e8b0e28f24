//! A switcheroo rule as found in the kernel: where it is, what it redirects, and who owns
//! it. Built in one place, [`Rule::from_entry`], from a dump or from the kernel's echo of
//! an insert.

use crate::comment::Identity;
use crate::owner;
use crate::port::Port;
use crate::role::Role;
use switcheroo_sys::{Chain, Family, Handle, Protocol, RuleEntry};

/// Where rules compete: one public port in one (family, chain).
pub(crate) type Group = (Family, Chain, Port);

/// One switcheroo rule of a namespace, as found in the kernel.
#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    /// The namespace from the rule's comment.
    pub namespace: String,
    /// `ip` (IPv4) or `ip6` (IPv6) nat table.
    pub family: Family,
    /// `PREROUTING` (from the network) or `OUTPUT` (from this host).
    pub chain: Chain,
    /// The kernel's handle of the rule.
    pub handle: Handle,
    /// The matched protocol (`-p tcp` or `-p udp`).
    pub protocol: Protocol,
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
    /// The rule's place among its namespace's rules for the same public port in its chain
    /// (see [`Role`]); a rule
    /// whose owner is dead keeps its place (`status` shows it as dead).
    pub role: Role,
    /// For a rule with a statistic match (a canary): the share of new connections it
    /// takes, in percent.
    pub weight: Option<f64>,
}

impl Rule {
    /// `entry` as a switcheroo rule, if its comment makes it one (of `namespace`, when
    /// given); `None` for every other rule, which is somebody else's.
    pub(crate) fn from_entry(entry: RuleEntry, namespace: Option<&str>) -> Option<Rule> {
        let redirect = entry.redirect?;
        let id = Identity::parse(&redirect.comment)?;
        if namespace.is_some_and(|ns| ns != id.namespace) {
            return None;
        }
        let weight = redirect
            .probability
            .map(|_| (redirect.share() * 10_000.0).round() / 100.0);
        Some(Rule {
            alive: owner::is_alive(&id),
            role: Role::Active, // until `assign_roles` sees the whole chain
            weight,
            namespace: id.namespace,
            family: entry.family,
            chain: entry.chain,
            handle: entry.handle,
            protocol: redirect.protocol,
            public_port: redirect.public_port,
            internal_port: redirect.to_port,
            pid: Some(id.pid),
            start: id.start,
        })
    }

    /// The owner named by the comment.
    pub(crate) fn identity(&self) -> Option<Identity> {
        Some(Identity {
            namespace: self.namespace.clone(),
            port: self.internal_port,
            pid: self.pid?,
            start: self.start,
        })
    }

    /// Where the rule is: enough to delete it.
    pub(crate) fn place(&self) -> (Family, Chain, Handle) {
        (self.family, self.chain, self.handle)
    }

    /// The public port the rule matches.
    pub fn public(&self) -> Port {
        Port {
            protocol: self.protocol,
            number: self.public_port,
        }
    }

    /// What the rule competes for with the other rules of its namespace: one public port
    /// in one (family, chain). Roles are positions within a group.
    pub(crate) fn group(&self) -> Group {
        (self.family, self.chain, self.public())
    }

    /// Whether the rule was written by the process `id` names (by pid and start time: an
    /// instance has one rule per public port and chain, each with its own internal port).
    pub(crate) fn owned_by(&self, id: &Identity) -> bool {
        self.pid == Some(id.pid) && self.start == id.start
    }

    /// The role as `status` shows it: `dead` for a dead owner, `canary 10%` for a canary.
    pub fn role_name(&self) -> String {
        match (self.alive, self.role, self.weight) {
            (false, ..) => "dead".to_owned(),
            (true, Role::Canary, Some(w)) => format!("canary {w}%"),
            (true, role, _) => role.to_string(),
        }
    }
}

/// Gives each rule of `chain_rules` (one chain's switcheroo rules, top down, of any
/// namespaces) its role among the rules of its own namespace for the same public port. A
/// dead owner's rule keeps its place: it still catches the connections of that place.
pub(crate) fn assign_roles(chain_rules: &mut [Rule]) {
    let mut groups: Vec<(String, Port)> = Vec::new();
    for rule in chain_rules.iter() {
        let group = (rule.namespace.clone(), rule.public());
        if !groups.contains(&group) {
            groups.push(group);
        }
    }
    for (namespace, public) in groups {
        let mut plain = 0;
        let mut canary = false;
        for rule in chain_rules
            .iter_mut()
            .filter(|r| r.namespace == namespace && r.public() == public)
        {
            rule.role = if rule.weight.is_some() {
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
            };
        }
    }
}

/// The distinct owners of `rules`.
pub(crate) fn owners(rules: &[Rule]) -> Vec<Identity> {
    let mut ids: Vec<Identity> = rules.iter().filter_map(Rule::identity).collect();
    ids.sort_by_key(|id| (id.pid, id.start));
    ids.dedup_by_key(|id| (id.pid, id.start));
    ids
}

/// [`assign_roles`] for each chain of `rules`, which holds each chain's rules together.
pub(crate) fn assign_roles_per_chain(rules: &mut [Rule]) {
    let mut start = 0;
    while start < rules.len() {
        let place = (rules[start].family, rules[start].chain);
        let len = rules[start..]
            .iter()
            .take_while(|r| (r.family, r.chain) == place)
            .count();
        assign_roles(&mut rules[start..start + len]);
        start += len;
    }
}
