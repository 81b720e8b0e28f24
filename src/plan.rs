//! What each operation does to the deploy history, decided from a [`View`] by pure
//! functions: which rules to insert at the heads of the chains and which to delete by
//! handle. [`crate::transact`] applies any plan in one transaction; [`crate::retire`]
//! follows every applied plan (SIGTERM for the owners that left, conntrack for the dead).
//!
//! Every plan deletes the rules of dead owners, so after any transaction the positions of
//! the live rules are their roles.

use crate::comment::Identity;
use crate::error::{Error, Result};
use crate::port::Mapping;
use crate::role::Role;
use crate::routes::Routes;
use crate::rule::{GroupKey, Rule};
use crate::view::View;
use switcheroo_sys::{Chain, Family, Redirect};

/// One transaction's changes: rules to insert at the heads of chains, and rules of the read
/// to delete by handle. The inserts go in the order given, each at the head of its chain,
/// so of two inserts into one chain the later ends up on top.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Plan {
    pub insert: Vec<(Family, Chain, Redirect)>,
    pub delete: Vec<Rule>,
}

impl Plan {
    /// A plan that deletes the namespace's rules that `which` selects and every rule of a
    /// dead owner.
    fn deleting(view: &View<'_>, which: impl Fn(&Rule) -> bool) -> Plan {
        Plan {
            insert: Vec::new(),
            delete: view
                .ours()
                .filter(|r| !r.alive || which(r))
                .cloned()
                .collect(),
        }
    }

    /// Whether the plan changes nothing.
    pub fn is_empty(&self) -> bool {
        self.insert.is_empty() && self.delete.is_empty()
    }
}

/// How a deploy treats the instances already in the chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Keep {
    /// The new instance takes every new connection; every older rule goes.
    Nothing,
    /// The new instance takes every new connection; the previous active stays below as
    /// the standby (a probation), everything else goes.
    Active,
    /// The new instance takes a share of new connections above the active (a canary); the
    /// active and the standby stay, an earlier canary goes.
    ActiveAndStandby,
}

/// A deploy: who commits, what, and how.
#[derive(Debug, Clone)]
pub(crate) struct Deployment<'a> {
    /// The committing process: pid and start time.
    pub me: (u32, Option<u64>),
    /// Each public port and the internal port it is to lead to.
    pub mappings: &'a [Mapping],
    /// The chains to insert into.
    pub routes: Routes,
    /// For a canary, the share of new connections it takes.
    pub canary: Option<u8>,
    /// Whether the previous active stays as the standby.
    pub probation: bool,
    /// A namespace whose rules this deploy replaces as if they were its own (moving a
    /// service to a new name); `None`: another namespace's live rule on one of the public
    /// ports refuses the deploy.
    pub moving_from: Option<&'a str>,
}

impl Deployment<'_> {
    fn keep(&self) -> Keep {
        match (self.canary, self.probation) {
            (Some(_), _) => Keep::ActiveAndStandby,
            (None, true) => Keep::Active,
            (None, false) => Keep::Nothing,
        }
    }

    /// The groups the deploy inserts into, in batch order.
    fn targets(&self) -> impl Iterator<Item = (GroupKey, &Mapping)> + '_ {
        Family::ALL.into_iter().flat_map(move |family| {
            Chain::ALL
                .into_iter()
                .filter(|chain| self.routes.has_chain(*chain))
                .flat_map(move |chain| {
                    self.mappings
                        .iter()
                        .map(move |m| ((family, chain, m.public), m))
                })
        })
    }
}

/// The plan of a deploy: insert the new instance's rule for each public port at the head
/// of each chain of the routes, and delete every older rule of the namespace except those
/// [`Keep`] keeps (per group, the first live plain rules), and every rule of the namespace
/// it moves from.
///
/// Refused, changing nothing: a public port that a live instance of another namespace holds
/// ([`Error::PortHeld`]) unless that namespace is the one moved from; a canary without a
/// live active in every group it would enter ([`Error::CanaryWithoutActive`]); a canary
/// share outside 1-99 ([`Error::InvalidCanary`]).
pub(crate) fn deploy(view: &View<'_>, d: &Deployment<'_>) -> Result<Plan> {
    if let Some(held) = port_held(view, d) {
        return Err(held);
    }
    let keep = d.keep();
    if keep == Keep::ActiveAndStandby {
        let covered = d
            .targets()
            .all(|(key, _)| view.group(key).is_some_and(|g| g.serving().is_some()));
        if !covered {
            return Err(Error::CanaryWithoutActive {
                namespace: view.namespace.to_owned(),
            });
        }
    }
    let (pid, start) = d.me;
    let mut insert = Vec::new();
    for ((family, chain, public), m) in d.targets() {
        let comment = Identity {
            namespace: view.namespace.to_owned(),
            port: m.internal,
            pid,
            start,
        }
        .to_string();
        let mut redirect =
            Redirect::new(public.number, m.internal, &comment)?.with_protocol(public.protocol);
        if let Some(percent) = d.canary {
            redirect = redirect
                .with_percent(percent)
                .map_err(|_| Error::InvalidCanary { percent })?;
        }
        insert.push((family, chain, redirect));
    }
    let kept_per_group = match keep {
        Keep::Nothing => 0,
        Keep::Active => 1,
        Keep::ActiveAndStandby => 2,
    };
    let kept: Vec<&Rule> = view
        .groups
        .iter()
        .flat_map(|g| g.live_plain().into_iter().take(kept_per_group))
        .collect();
    let mut delete: Vec<Rule> = view
        .ours()
        .filter(|r| !kept.iter().any(|k| k.place() == r.place()))
        .cloned()
        .collect();
    if let Some(old) = d.moving_from {
        delete.extend(
            view.neighbours
                .iter()
                .filter(|r| r.namespace == old)
                .map(|r| (*r).clone()),
        );
    }
    Ok(Plan { insert, delete })
}

/// The refusal of a deploy whose public port a live instance of another namespace serves
/// (but the namespace it moves from), in a chain it would insert into; `None` when no
/// other namespace is in the way.
pub(crate) fn port_held(view: &View<'_>, d: &Deployment<'_>) -> Option<Error> {
    d.targets().find_map(|(key, _)| {
        let holder = view
            .held_by_others(key)
            .into_iter()
            .find(|r| Some(r.namespace.as_str()) != d.moving_from)?;
        Some(Error::PortHeld {
            port: key.2,
            chain: format!("{} {}", key.0, key.1),
            namespace: holder.namespace.clone(),
            pid: holder.pid,
            wanted: view.namespace.to_owned(),
        })
    })
}

/// The plan of a rollback, and the instance rolled back from: the head of the namespace's
/// history goes, with every rule of its owner and of dead owners. The head is the canary
/// if there is one (live or dead), else the active, if a live instance is below it to
/// take over.
///
/// [`Error::NothingToRollBack`] says why when there is nothing to go back to.
pub(crate) fn rollback(view: &View<'_>) -> Result<(Plan, Identity)> {
    let nothing = |why: String| Error::NothingToRollBack {
        namespace: view.namespace.to_owned(),
        why,
    };
    let target = match view.live_canary() {
        Some(canary) => canary,
        None => {
            let Some((group, head)) = view.groups.first().and_then(|g| Some((g, g.head()?))) else {
                return Err(nothing("it has no rules".into()));
            };
            let below = group.rules[1..].iter().any(|r| r.alive && r.is_plain());
            match (head.role, below, head.alive) {
                (Role::Canary, ..) | (_, true, _) => head.identity(),
                (_, false, true) => return Err(nothing(format!(
                    "its active instance (pid {}) has no live standby below it; deploy with a probation to keep the previous instance warm",
                    head.pid
                ))),
                (_, false, false) => return Err(nothing(format!(
                    "its active instance (pid {}) is dead and no live instance is below it; deploy a new one",
                    head.pid
                ))),
            }
        }
    };
    let plan = Plan::deleting(view, |r| r.owned_by(&target));
    Ok((plan, target))
}

/// The plan of a promotion, and the promoted canary: in every group the canary entered, a
/// plain rule of the same instance (same internal port) replaces its statistic rule at the
/// head; the first live plain rule of another instance stays below as the standby; every
/// other rule goes. [`Error::NoCanary`] without a live canary.
pub(crate) fn promote(view: &View<'_>) -> Result<(Plan, Identity)> {
    let canary = view.live_canary().ok_or_else(|| Error::NoCanary {
        namespace: view.namespace.to_owned(),
    })?;
    let mut plan = Plan::default();
    let mut kept: Vec<&Rule> = Vec::new();
    for group in &view.groups {
        let statistic = group
            .rules
            .iter()
            .find(|r| r.owned_by(&canary) && r.role == Role::Canary);
        if let Some(rule) = statistic {
            let comment = rule.identity().to_string();
            let plain = Redirect::new(rule.public_port, rule.internal_port, &comment)?
                .with_protocol(rule.protocol);
            plan.insert.push((rule.family, rule.chain, plain));
        }
        kept.extend(
            group
                .live_plain()
                .into_iter()
                .filter(|r| !r.owned_by(&canary))
                .take(1),
        );
    }
    plan.delete = view
        .ours()
        .filter(|r| !kept.iter().any(|k| k.place() == r.place()))
        .cloned()
        .collect();
    Ok((plan, canary))
}

/// The plan of an instance leaving the chain on its own (stopped by an operator, or rolled
/// back by its own failed health checks): its rules and the dead ones go, so that the
/// instance below takes new connections at once.
pub(crate) fn resign(view: &View<'_>, me: &Identity) -> Plan {
    Plan::deleting(view, |r| r.owned_by(me))
}

/// The plan at the end of a probation: the standby's rules (of the processes `standby`)
/// and the dead ones go.
pub(crate) fn end_probation(view: &View<'_>, standby: &[Identity]) -> Plan {
    Plan::deleting(view, |r| standby.iter().any(|id| r.owned_by(id)))
}

/// The plan that removes the rules of dead owners only: what an instance does when the one
/// above it has died.
pub(crate) fn remove_dead(view: &View<'_>) -> Plan {
    Plan::deleting(view, |_| false)
}

/// The plan that removes every rule of the namespace.
pub(crate) fn cleanup(view: &View<'_>) -> Plan {
    Plan::deleting(view, |_| true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::port::Port;
    use crate::view::fixture::*;
    use switcheroo_sys::Protocol;

    fn mapping(internal: u16) -> Vec<Mapping> {
        vec![Mapping {
            public: Port::tcp(8080),
            internal,
        }]
    }

    fn deployment<'a>(mappings: &'a [Mapping]) -> Deployment<'a> {
        Deployment {
            me: (99, Some(990)),
            mappings,
            routes: Routes::all(),
            canary: None,
            probation: false,
            moving_from: None,
        }
    }

    /// The pids of the deleted rules in the first group's chain (ip PREROUTING).
    fn deleted_pids(plan: &Plan) -> Vec<u32> {
        let mut pids: Vec<u32> = plan
            .delete
            .iter()
            .filter(|r| (r.family, r.chain) == (Family::Ipv4, Chain::Prerouting))
            .map(|r| r.pid)
            .collect();
        pids.sort();
        pids
    }

    #[test]
    fn a_deploy_inserts_one_rule_per_port_and_chain_and_deletes_what_its_policy_drops() {
        // (rules before, probation?, canary?) -> pids deleted in each chain
        /// (rules before, probation?, canary?, pids deleted in each chain)
        type Row = (Vec<R>, bool, Option<u8>, Vec<u32>);
        let table: Vec<Row> = vec![
            (vec![], false, None, vec![]),
            (vec![r("web", 3)], false, None, vec![3]),
            (vec![r("web", 3)], true, None, vec![]),
            (vec![r("web", 3), r("web", 2)], true, None, vec![2]),
            (vec![r("web", 3), r("web", 2)], false, None, vec![2, 3]),
            (vec![r("web", 3).dead(), r("web", 2)], true, None, vec![3]),
            (vec![r("web", 3), r("web", 2)], false, Some(10), vec![]),
            (
                vec![r("web", 4).canary(5.0), r("web", 3), r("web", 2)],
                false,
                Some(10),
                vec![4],
            ),
            (
                vec![r("web", 3), r("web", 2), r("web", 1)],
                false,
                Some(10),
                vec![1],
            ),
            (
                vec![r("web", 3), r("web", 2).dead(), r("web", 1)],
                true,
                None,
                vec![1, 2],
            ),
        ];
        for (before, probation, canary, deleted) in table {
            let rules = everywhere(before.clone());
            let view = View::new("web", &rules);
            let m = mapping(40400);
            let d = Deployment {
                probation,
                canary,
                ..deployment(&m)
            };
            let plan = deploy(&view, &d).unwrap_or_else(|e| panic!("{before:?}: {e}"));
            assert_eq!(plan.insert.len(), 4, "{before:?}");
            assert!(plan.insert.iter().all(|(_, _, r)| r.to_port == 40400
                && r.public_port == 8080
                && r.comment == "SWITCHEROO:ns=web:port=40400:pid=99:start=990"
                && r.probability.is_some() == canary.is_some()));
            assert_eq!(
                deleted_pids(&plan),
                deleted,
                "{before:?} probation {probation} canary {canary:?}"
            );
            assert_eq!(plan.delete.len(), deleted.len() * 4);
        }
    }

    #[test]
    fn a_deploy_inserts_only_into_the_chains_of_its_routes() {
        let m = mapping(40400);
        let d = Deployment {
            routes: Routes::LOCALHOST,
            ..deployment(&m)
        };
        let plan = deploy(&View::new("web", &[]), &d).unwrap();
        let places: Vec<(Family, Chain)> = plan.insert.iter().map(|(f, c, _)| (*f, *c)).collect();
        assert_eq!(
            places,
            [(Family::Ipv4, Chain::Output), (Family::Ipv6, Chain::Output)]
        );
    }

    #[test]
    fn every_port_of_a_service_gets_its_rule_with_its_own_internal_port() {
        let m = vec![
            Mapping {
                public: Port::tcp(80),
                internal: 40401,
            },
            Mapping {
                public: Port::udp(443),
                internal: 40402,
            },
        ];
        let plan = deploy(&View::new("web", &[]), &deployment(&m)).unwrap();
        assert_eq!(plan.insert.len(), 8);
        let udp: Vec<&Redirect> = plan
            .insert
            .iter()
            .map(|(_, _, r)| r)
            .filter(|r| r.protocol == Protocol::Udp)
            .collect();
        assert_eq!(udp.len(), 4);
        assert!(udp
            .iter()
            .all(|r| r.public_port == 443 && r.to_port == 40402));
    }

    #[test]
    fn a_port_held_by_a_live_instance_of_another_namespace_is_refused_naming_it() {
        let rules = everywhere(vec![r("api", 7)]);
        let view = View::new("web", &rules);
        let m = mapping(40400);
        match deploy(&view, &deployment(&m)) {
            Err(Error::PortHeld {
                namespace,
                pid,
                port,
                ..
            }) => {
                assert_eq!((namespace.as_str(), pid, port), ("api", 7, Port::tcp(8080)))
            }
            other => panic!("{other:?}"),
        }
        // Dead, or on another port or protocol: not in the way.
        for other in [
            r("api", 7).dead(),
            r("api", 7).port(Protocol::Tcp, 9090),
            r("api", 7).port(Protocol::Udp, 8080),
        ] {
            let rules = everywhere(vec![other.clone()]);
            assert!(
                deploy(&View::new("web", &rules), &deployment(&m)).is_ok(),
                "{other:?}"
            );
        }
    }

    #[test]
    fn moving_a_service_replaces_the_old_namespaces_rules_in_the_same_plan() {
        let rules = everywhere(vec![r("api", 7), r("api", 6).dead(), r("web", 3)]);
        let view = View::new("web", &rules);
        let m = mapping(40400);
        let d = Deployment {
            moving_from: Some("api"),
            ..deployment(&m)
        };
        let plan = deploy(&view, &d).unwrap();
        assert_eq!(deleted_pids(&plan), [3, 6, 7]);
        // A third namespace on the port still refuses.
        let rules = everywhere(vec![r("api", 7), r("db", 5)]);
        let d = Deployment {
            moving_from: Some("api"),
            ..deployment(&m)
        };
        assert!(matches!(
            deploy(&View::new("web", &rules), &d),
            Err(Error::PortHeld { namespace, .. }) if namespace == "db"
        ));
    }

    #[test]
    fn a_canary_needs_a_live_active_in_every_group_it_enters() {
        let m = mapping(40400);
        let d = Deployment {
            canary: Some(10),
            ..deployment(&m)
        };
        for before in [vec![], vec![r("web", 3).dead()]] {
            let rules = everywhere(before.clone());
            assert!(
                matches!(
                    deploy(&View::new("web", &rules), &d),
                    Err(Error::CanaryWithoutActive { .. })
                ),
                "{before:?}"
            );
        }
        let rules = everywhere(vec![r("web", 3)]);
        assert!(deploy(&View::new("web", &rules), &d).is_ok());
        let bad = Deployment {
            canary: Some(100),
            ..deployment(&m)
        };
        assert!(matches!(
            deploy(&View::new("web", &rules), &bad),
            Err(Error::InvalidCanary { percent: 100 })
        ));
    }

    #[test]
    fn rollback_removes_the_head_and_the_dead_or_says_why_it_cannot() {
        // rules before -> Ok(pid rolled back from, pids deleted) or Err(part of the reason)
        /// (rules before, Ok((pid rolled back from, pids deleted)) or Err(part of the reason))
        type Row = (Vec<R>, std::result::Result<(u32, Vec<u32>), &'static str>);
        let table: Vec<Row> = vec![
            (vec![r("web", 3), r("web", 2)], Ok((3, vec![3]))),
            (
                vec![r("web", 4).canary(10.0), r("web", 3), r("web", 2)],
                Ok((4, vec![4])),
            ),
            (
                vec![r("web", 4).canary(10.0).dead(), r("web", 3)],
                Ok((4, vec![4])),
            ),
            (vec![r("web", 3).dead(), r("web", 2)], Ok((3, vec![3]))),
            (
                vec![r("web", 3), r("web", 2).dead(), r("web", 1)],
                Ok((3, vec![2, 3])),
            ),
            (vec![r("web", 3)], Err("no live standby")),
            (
                vec![r("web", 3), r("web", 2).dead()],
                Err("no live standby"),
            ),
            (
                vec![r("web", 3).dead()],
                Err("is dead and no live instance"),
            ),
            (vec![], Err("no rules")),
        ];
        for (before, expected) in table {
            let rules = everywhere(before.clone());
            let view = View::new("web", &rules);
            match (rollback(&view), expected) {
                (Ok((plan, from)), Ok((pid, deleted))) => {
                    assert_eq!(from.pid, pid, "{before:?}");
                    assert_eq!(deleted_pids(&plan), deleted, "{before:?}");
                    assert!(plan.insert.is_empty());
                }
                (Err(Error::NothingToRollBack { why, .. }), Err(part)) => {
                    assert!(why.contains(part), "{before:?}: {why}")
                }
                (got, want) => panic!("{before:?}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn promote_replaces_the_canary_by_a_plain_rule_and_keeps_the_active_as_standby() {
        let rules = everywhere(vec![r("web", 4).canary(10.0), r("web", 3), r("web", 2)]);
        let view = View::new("web", &rules);
        let (plan, promoted) = promote(&view).unwrap();
        assert_eq!(promoted.pid, 4);
        assert_eq!(plan.insert.len(), 4);
        assert!(plan.insert.iter().all(|(_, _, r)| r.probability.is_none()
            && r.to_port == promoted.port
            && r.comment == promoted.to_string()));
        // The canary's statistic rule and the older standby go; pid 3 stays.
        assert_eq!(deleted_pids(&plan), [2, 4]);
        let without = everywhere(vec![r("web", 3), r("web", 2)]);
        assert!(matches!(
            promote(&View::new("web", &without)),
            Err(Error::NoCanary { .. })
        ));
        let dead = everywhere(vec![r("web", 4).canary(10.0).dead(), r("web", 3)]);
        assert!(matches!(
            promote(&View::new("web", &dead)),
            Err(Error::NoCanary { .. })
        ));
    }

    #[test]
    fn resign_end_of_probation_dead_removal_and_cleanup_delete_what_they_name_and_the_dead() {
        let rules = everywhere(vec![
            r("web", 4),
            r("web", 3).dead(),
            r("web", 2),
            r("api", 9),
        ]);
        let view = View::new("web", &rules);
        assert_eq!(deleted_pids(&resign(&view, &id("web", 4))), [3, 4]);
        assert_eq!(deleted_pids(&end_probation(&view, &[id("web", 2)])), [2, 3]);
        assert_eq!(deleted_pids(&remove_dead(&view)), [3]);
        assert_eq!(deleted_pids(&cleanup(&view)), [2, 3, 4]);
        // Nothing of another namespace, ever.
        for plan in [resign(&view, &id("api", 9)), cleanup(&view)] {
            assert!(plan.delete.iter().all(|r| r.namespace == "web"));
        }
        let clean = everywhere(vec![r("web", 4)]);
        assert!(remove_dead(&View::new("web", &clean)).is_empty());
    }
}
