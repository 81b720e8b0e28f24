//! A switcheroo rule as found in the kernel: where it is, what it redirects, who owns it,
//! and its role. Parsed in one place, [`Found::parse`], from a dump or from the kernel's
//! echo of an insert; given its role in one place, [`place`], once its whole chain is known.

use crate::comment::Identity;
use crate::owner::Owners;
use crate::port::Port;
use crate::role::{self, Role};
use switcheroo_sys::{Chain, Family, Handle, Protocol, RuleEntry};

/// Where rules compete: one public port in one (family, chain).
pub(crate) type GroupKey = (Family, Chain, Port);

/// One switcheroo rule, as found in the kernel.
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
    pub pid: u32,
    /// That process's start time (field 22 of `/proc/<pid>/stat`), absent in rules written
    /// by the Go original.
    pub start: Option<u64>,
    /// Whether that process was running when the rule was read (same pid and, when
    /// recorded, same start time).
    pub alive: bool,
    /// The rule's place among its namespace's rules for the same public port in its chain
    /// (see [`Role`]). A rule whose owner is dead keeps its place: it still catches the
    /// connections of that place (`status` shows it as dead).
    pub role: Role,
    /// For a rule with a statistic match (a canary): the share of new connections it
    /// takes, in percent.
    pub weight: Option<f64>,
}

impl Rule {
    /// The owner named by the comment.
    pub(crate) fn identity(&self) -> Identity {
        Identity {
            namespace: self.namespace.clone(),
            port: self.internal_port,
            pid: self.pid,
            start: self.start,
        }
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
    pub(crate) fn group(&self) -> GroupKey {
        (self.family, self.chain, self.public())
    }

    /// Whether the rule was written by the process `id` names (by pid and start time: an
    /// instance has one rule per public port and chain, each with its own internal port).
    pub(crate) fn owned_by(&self, id: &Identity) -> bool {
        self.pid == id.pid && self.start == id.start
    }

    /// Whether the rule takes every new connection that reaches it (no statistic match).
    pub(crate) fn is_plain(&self) -> bool {
        self.weight.is_none()
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

/// A switcheroo rule read from the kernel, before its place among its neighbours is known.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Found {
    pub id: Identity,
    pub family: Family,
    pub chain: Chain,
    pub handle: Handle,
    pub protocol: Protocol,
    pub public_port: u16,
    pub alive: bool,
    pub weight: Option<f64>,
}

impl Found {
    /// `entry` as a switcheroo rule, if its comment makes it one; `None` for every other
    /// rule, which is somebody else's. Each owner's liveness comes from `owners`, which
    /// reads a process once however many rules name it.
    pub fn parse(entry: RuleEntry, owners: &mut Owners) -> Option<Found> {
        let redirect = entry.redirect?;
        let mut id = Identity::parse(&redirect.comment)?;
        // The comment names the internal port; the rule's target is what the kernel does.
        id.port = redirect.to_port;
        let weight = redirect
            .probability
            .map(|_| (redirect.share() * 10_000.0).round() / 100.0);
        Some(Found {
            alive: owners.is_alive(&id),
            id,
            family: entry.family,
            chain: entry.chain,
            handle: entry.handle,
            protocol: redirect.protocol,
            public_port: redirect.public_port,
            weight,
        })
    }
}

/// The roles of one chain's rules (any namespaces, top down), given each rule's namespace,
/// public port and whether it has a statistic match: each rule's place among its own
/// namespace's rules for the same public port.
fn roles_in_chain(keys: &[(&str, Port, bool)]) -> Vec<Role> {
    let mut roles = vec![Role::Extra; keys.len()];
    let mut done = vec![false; keys.len()];
    for i in 0..keys.len() {
        if done[i] {
            continue;
        }
        let members: Vec<usize> = (i..keys.len())
            .filter(|&j| (keys[j].0, keys[j].1) == (keys[i].0, keys[i].1))
            .collect();
        let assigned = role::by_position(members.iter().map(|&j| keys[j].2));
        for (&j, role) in members.iter().zip(assigned) {
            roles[j] = role;
            done[j] = true;
        }
    }
    roles
}

/// The rules of one chain (any namespaces, top down) with their roles.
pub(crate) fn place(chain: Vec<Found>) -> Vec<Rule> {
    let keys: Vec<(&str, Port, bool)> = chain
        .iter()
        .map(|f| {
            let port = Port {
                protocol: f.protocol,
                number: f.public_port,
            };
            (f.id.namespace.as_str(), port, f.weight.is_some())
        })
        .collect();
    let roles = roles_in_chain(&keys);
    chain
        .into_iter()
        .zip(roles)
        .map(|(f, role)| Rule {
            namespace: f.id.namespace,
            family: f.family,
            chain: f.chain,
            handle: f.handle,
            protocol: f.protocol,
            public_port: f.public_port,
            internal_port: f.id.port,
            pid: f.id.pid,
            start: f.id.start,
            alive: f.alive,
            role,
            weight: f.weight,
        })
        .collect()
}

/// Gives each rule of `rules` (whole chains, each top down, chains one after another) its
/// role again, after rules were inserted and deleted.
pub(crate) fn replace_roles(rules: &mut [Rule]) {
    let mut start = 0;
    while start < rules.len() {
        let chain = (rules[start].family, rules[start].chain);
        let len = rules[start..]
            .iter()
            .take_while(|r| (r.family, r.chain) == chain)
            .count();
        let here = &mut rules[start..start + len];
        let keys: Vec<(&str, Port, bool)> = here
            .iter()
            .map(|r| (r.namespace.as_str(), r.public(), r.weight.is_some()))
            .collect();
        let roles = roles_in_chain(&keys);
        for (rule, role) in here.iter_mut().zip(roles) {
            rule.role = role;
        }
        start += len;
    }
}

/// The distinct owners of `rules`, in the order they first appear.
pub(crate) fn owners<'a>(rules: impl IntoIterator<Item = &'a Rule>) -> Vec<Identity> {
    let mut ids: Vec<Identity> = Vec::new();
    for rule in rules {
        if !ids.iter().any(|id| rule.owned_by(id)) {
            ids.push(rule.identity());
        }
    }
    ids
}
