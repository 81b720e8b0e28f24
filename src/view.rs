//! The deploy history of one namespace as a typed view, built once from a read of the
//! ruleset: per group (one public port in one family and chain) its rules top down, their
//! roles and whether their owners live, and the rules of other namespaces beside them.
//!
//! Every decision about the history (what a deploy keeps, what a rollback removes, what a
//! tenure must do) is a pure function of this view; see [`crate::plan`] and
//! [`crate::tenure`].

use crate::comment::Identity;
use crate::role::Role;
use crate::rule::{GroupKey, Rule};

/// One namespace's rules, group by group, and its neighbours.
#[derive(Debug, Clone)]
pub(crate) struct View<'a> {
    /// The service namespace.
    pub namespace: &'a str,
    /// Its groups, in the order their first rules appear in the chains.
    pub groups: Vec<Group<'a>>,
    /// The switcheroo rules of every other namespace in the same chains, in chain order.
    pub neighbours: Vec<&'a Rule>,
}

/// One namespace's rules for one public port in one (family, chain), top down.
#[derive(Debug, Clone)]
pub(crate) struct Group<'a> {
    pub key: GroupKey,
    pub rules: Vec<&'a Rule>,
}

impl<'a> Group<'a> {
    /// The first rule: the one a new connection meets first.
    pub fn head(&self) -> Option<&'a Rule> {
        self.rules.first().copied()
    }

    /// The canary, if its owner lives.
    pub fn live_canary(&self) -> Option<&'a Rule> {
        self.rules
            .iter()
            .copied()
            .find(|r| r.alive && r.role == Role::Canary)
    }

    /// The plain rules of live owners, top down: once the dead rules are gone (every
    /// transaction removes them), the first is the active and the second the standby.
    pub fn live_plain(&self) -> Vec<&'a Rule> {
        self.rules
            .iter()
            .copied()
            .filter(|r| r.alive && r.is_plain())
            .collect()
    }

    /// The live instance that gets every new connection once the dead rules are gone.
    pub fn serving(&self) -> Option<&'a Rule> {
        self.live_plain().first().copied()
    }
}

impl<'a> View<'a> {
    /// The view of `namespace` in `rules`: every switcheroo rule of the chains, of any
    /// namespace, each chain top down (as a read of the ruleset gives them).
    pub fn new(namespace: &'a str, rules: &'a [Rule]) -> View<'a> {
        let mut groups: Vec<Group<'a>> = Vec::new();
        let mut neighbours = Vec::new();
        for rule in rules {
            if rule.namespace != namespace {
                neighbours.push(rule);
                continue;
            }
            let key = rule.group();
            match groups.iter_mut().find(|g| g.key == key) {
                Some(group) => group.rules.push(rule),
                None => groups.push(Group {
                    key,
                    rules: vec![rule],
                }),
            }
        }
        View {
            namespace,
            groups,
            neighbours,
        }
    }

    /// Every rule of the namespace, group by group.
    pub fn ours(&self) -> impl Iterator<Item = &'a Rule> + '_ {
        self.groups.iter().flat_map(|g| g.rules.iter().copied())
    }

    /// The rules of the process `id`.
    pub fn owned_by(&self, id: &Identity) -> Vec<&'a Rule> {
        self.ours().filter(|r| r.owned_by(id)).collect()
    }

    /// The group of `key`, if the namespace has rules there.
    pub fn group(&self, key: GroupKey) -> Option<&Group<'a>> {
        self.groups.iter().find(|g| g.key == key)
    }

    /// The live canary of the namespace (its rules in every group it entered).
    pub fn live_canary(&self) -> Option<Identity> {
        self.groups
            .iter()
            .find_map(Group::live_canary)
            .map(Rule::identity)
    }

    /// The live rules of other namespaces that compete for `key`: a rule inserted above
    /// them would take their new connections.
    pub fn held_by_others(&self, key: GroupKey) -> Vec<&'a Rule> {
        self.neighbours
            .iter()
            .copied()
            .filter(|r| r.alive && r.group() == key)
            .collect()
    }
}

/// Rules made up for the unit tests of the pure core: no kernel, no process.
#[cfg(test)]
pub(crate) mod fixture {
    use crate::comment::Identity;
    use crate::rule::{place, Found, Rule};
    use switcheroo_sys::{Chain, Family, Handle, Protocol};

    /// A rule to place: namespace, public port, owner pid, alive, statistic share.
    #[derive(Debug, Clone)]
    pub struct R {
        pub ns: &'static str,
        pub protocol: Protocol,
        pub port: u16,
        pub pid: u32,
        pub alive: bool,
        pub weight: Option<f64>,
    }

    /// A live plain TCP rule of namespace `ns` on port 8080, owned by `pid`.
    pub fn r(ns: &'static str, pid: u32) -> R {
        R {
            ns,
            protocol: Protocol::Tcp,
            port: 8080,
            pid,
            alive: true,
            weight: None,
        }
    }

    impl R {
        pub fn dead(mut self) -> R {
            self.alive = false;
            self
        }
        pub fn canary(mut self, percent: f64) -> R {
            self.weight = Some(percent);
            self
        }
        pub fn port(mut self, protocol: Protocol, port: u16) -> R {
            self.protocol = protocol;
            self.port = port;
            self
        }
    }

    /// The identity of `pid` in `ns` (start time `pid * 10`, internal port `40000 + pid`).
    pub fn id(ns: &str, pid: u32) -> Identity {
        Identity {
            namespace: ns.into(),
            port: 40000 + pid as u16,
            pid,
            start: Some(u64::from(pid) * 10),
        }
    }

    /// The rules of each (family, chain), each top down as listed, with handles that grow
    /// down the list in reverse (the top rule was inserted last) and roles assigned.
    pub fn chains(layout: &[(Family, Chain, Vec<R>)]) -> Vec<Rule> {
        let mut out = Vec::new();
        for (family, chain, rules) in layout {
            let n = rules.len() as u64;
            let found = rules
                .iter()
                .enumerate()
                .map(|(i, r)| Found {
                    id: Identity {
                        port: 40000
                            + r.pid as u16
                            + if r.protocol == Protocol::Udp { 1000 } else { 0 },
                        ..id(r.ns, r.pid)
                    },
                    family: *family,
                    chain: *chain,
                    handle: Handle::for_tests(100 + n - i as u64),
                    protocol: r.protocol,
                    public_port: r.port,
                    alive: r.alive,
                    weight: r.weight,
                })
                .collect();
            out.extend(place(found));
        }
        out
    }

    /// The same rules in all four (family, chain)s.
    pub fn everywhere(rules: Vec<R>) -> Vec<Rule> {
        let mut layout = Vec::new();
        for family in Family::ALL {
            for chain in Chain::ALL {
                layout.push((family, chain, rules.clone()));
            }
        }
        chains(&layout)
    }
}

#[cfg(test)]
mod tests {
    use super::fixture::*;
    use super::*;
    use switcheroo_sys::{Chain, Family};

    #[test]
    fn groups_hold_one_namespaces_rules_per_port_and_chain() {
        let rules = everywhere(vec![r("web", 3), r("api", 9), r("web", 2)]);
        let view = View::new("web", &rules);
        assert_eq!(view.groups.len(), 4);
        assert_eq!(view.neighbours.len(), 4);
        for g in &view.groups {
            let pids: Vec<u32> = g.rules.iter().map(|r| r.pid).collect();
            assert_eq!(pids, [3, 2]);
            assert_eq!(g.rules[0].role, Role::Active);
            assert_eq!(g.rules[1].role, Role::Standby);
        }
        let key = view.groups[0].key;
        assert_eq!(view.held_by_others(key).len(), 1);
    }

    #[test]
    fn a_dead_head_keeps_its_place_and_the_live_rules_below_serve_after_it() {
        let rules = chains(&[(
            Family::Ipv4,
            Chain::Output,
            vec![r("web", 3).dead(), r("web", 2), r("web", 1)],
        )]);
        let view = View::new("web", &rules);
        let g = &view.groups[0];
        assert_eq!(g.head().map(|r| (r.pid, r.role)), Some((3, Role::Active)));
        assert_eq!(g.serving().map(|r| r.pid), Some(2));
        assert_eq!(view.ours().filter(|r| !r.alive).count(), 1);
        assert_eq!(g.live_plain().len(), 2);
    }

    #[test]
    fn the_canary_is_only_a_live_statistic_rule_at_the_top() {
        let rules = everywhere(vec![r("web", 4).canary(10.0), r("web", 3)]);
        let view = View::new("web", &rules);
        assert_eq!(view.live_canary().map(|id| id.pid), Some(4));
        let dead = everywhere(vec![r("web", 4).canary(10.0).dead(), r("web", 3)]);
        assert_eq!(View::new("web", &dead).live_canary(), None);
        let below = everywhere(vec![r("web", 3), r("web", 4).canary(10.0)]);
        assert_eq!(View::new("web", &below).live_canary(), None, "an extra");
    }
}
