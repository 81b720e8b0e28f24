//! An instance's watch over its place in the chain after its commit.
//!
//! The ruleset is the registry: an instance learns where it stands (active, standby below
//! a newer active, active below a canary, canary) by reading it, and it learns that the
//! ruleset changed from nf_tables' own notifications. What it must act on:
//!
//! - the instance directly above its rules dies (a pidfd becomes readable): it deletes the
//!   dead rules, so its own are the head again, and serves as before;
//! - it set a probation and the time is up: it deletes the standby's rules and sends the
//!   standby SIGTERM (after the identity check);
//! - it was the canary and got promoted: the probation starts now (or, without one, the
//!   previous active retires at once);
//! - its rules are gone: it was replaced or rolled back, and retires.
//!
//! No thread, no runtime: [`Tenure::wait`] blocks (together with a [`Shutdown`]), and
//! [`Tenure::fds`], [`Tenure::deadline`] and [`Tenure::poll_change`] let any event loop
//! drive it, as [`Drain`](crate::Drain) and [`DrainTracker`](crate::DrainTracker) do.

use crate::comment::Identity;
use crate::error::Result;
use crate::owner;
use crate::poll::{self, Source, Token};
use crate::registry::Registry;
use crate::role::Role;
use crate::rule::{owners, GroupKey, Rule};
use crate::shutdown::Shutdown;
use crate::switcheroo::Switcheroo;
use crate::takeover::Report;
use crate::view::View;
use log::{debug, info};
use std::os::fd::{AsFd, BorrowedFd};
use std::time::{Duration, Instant};
use switcheroo_sys::monitor::{Monitor, Notification};
use switcheroo_sys::{Chain, Family, Handle, PidFd};

/// A change of this instance's place, as [`Tenure::poll_change`] and [`Tenure::wait`]
/// report it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// This instance's rules are the head again: the instance above them (pid `after`)
    /// died or left, and its rules are gone.
    Active {
        /// The pid of the instance that was above.
        after: Option<u32>,
    },
    /// Another instance (pid `above`) now gets new connections before this one, which is
    /// now in `role` (the standby below a newer active, or the active below a canary).
    Below {
        /// This instance's role now.
        role: Role,
        /// The instance above.
        above: u32,
    },
    /// This instance was the canary and is the active now.
    Promoted,
    /// The probation this instance set is over: the standby's rules were deleted and the
    /// standby was sent SIGTERM (the pids signalled).
    ProbationPassed {
        /// The standby processes sent SIGTERM.
        retired: Vec<u32>,
    },
    /// This instance's rules are gone: it was replaced, rolled back, or its rules were
    /// deleted by hand. It should retire (drain, finish, exit).
    Removed {
        /// Whether the instance that now gets new connections is older than this one:
        /// this one was rolled back.
        rolled_back: bool,
        /// The pid of the instance that now gets new connections, if any.
        serving: Option<u32>,
    },
}

/// What [`Tenure::resign`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resignation {
    /// This instance's rules (`rules` of them) were in the chain and are deleted now.
    Left {
        /// How many there were.
        rules: usize,
    },
    /// They were gone already: the instance was replaced, or rolled back (then
    /// `rolled_back`), and `serving` gets new connections now.
    AlreadyRemoved {
        /// Whether the instance that gets new connections now is older than this one.
        rolled_back: bool,
        /// Its pid.
        serving: Option<u32>,
    },
}

/// Why an instance must retire, as [`Tenure::until_retired`] reports it. `Display`
/// gives `signal 15, left the chain`, `replaced, pid 123 serves`, `rolled back, pid 99
/// serves` (or `nobody serves`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Retired {
    /// SIGTERM or SIGINT (its number) arrived while its rules were in the chain; they are
    /// deleted now, so an instance below takes new connections at once.
    Signal(i32),
    /// Its rules are gone: replaced, or rolled back (`rolled_back`); `serving` gets new
    /// connections now. Also what a signal finds when a deployer or a rollback deleted the
    /// rules first.
    Removed {
        /// Whether the instance that serves now is older than this one.
        rolled_back: bool,
        /// Its pid.
        serving: Option<u32>,
    },
}

impl std::fmt::Display for Retired {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Retired::Signal(signal) => write!(f, "signal {signal}, left the chain"),
            Retired::Removed {
                rolled_back,
                serving,
            } => {
                let how = if *rolled_back {
                    "rolled back"
                } else {
                    "replaced"
                };
                match serving {
                    Some(pid) => write!(f, "{how}, pid {pid} serves"),
                    None => write!(f, "{how}, nobody serves"),
                }
            }
        }
    }
}

/// What [`Tenure::wait`] woke up for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Wake {
    /// SIGTERM or SIGINT (its number), from the [`Shutdown`].
    Signal(i32),
    /// A change of place.
    Change(Change),
}

/// The instance directly above this one's rules, watched through a pidfd.
#[derive(Debug)]
struct Watched {
    id: Identity,
    fd: PidFd,
}

/// A standby to retire when the time is up.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Probation {
    standby: Vec<Identity>,
    until: Instant,
}

/// This instance's watch over its place in the chain after its commit: see [`Tenure::new`]
/// and the README's "When a release is bad".
///
/// ```no_run
/// use std::time::Duration;
/// use switcheroo::{Change, Shutdown, Switcheroo, Tenure, Wake};
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let shutdown = Shutdown::install()?;
/// let sw = Switcheroo::builder("myapp", 8080).build()?;
/// let (listener, takeover) = sw.begin()?;
/// // ... serve on the listener ...
/// let report = takeover.probation(Duration::from_secs(600)).commit()?;
/// let mut tenure = Tenure::new(&sw, &report)?;
/// loop {
///     match tenure.wait(&shutdown)? {
///         Wake::Signal(_) => {
///             tenure.resign()?; // stopped while serving: the standby takes over at once
///             break;
///         }
///         Wake::Change(Change::Removed { .. }) => break, // replaced or rolled back
///         Wake::Change(other) => eprintln!("{other:?}"), // standby, active again, ...
///     }
/// }
/// // ... drain the listener, finish, exit 0 ...
/// # drop(listener);
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct Tenure {
    registry: Registry,
    me: Identity,
    monitor: Monitor,
    /// The group of this instance's first rule: where its place is read.
    group: GroupKey,
    /// The role of this instance's rules, `None` once they are gone.
    role: Option<Role>,
    /// Where this instance's rules were last seen.
    handles: Vec<(Family, Chain, Handle)>,
    above: Option<Watched>,
    probation: Option<Probation>,
    /// The probation asked for at the commit, for after a promotion.
    configured: Option<Duration>,
    /// The ruleset changed in a way that concerns the namespace: read it again.
    stale: bool,
    /// Once the rules are gone: the mark that tells `switcheroo status` this process is
    /// draining, and since when.
    retired: Option<crate::instances::Mark>,
}

/// Tokens of [`Tenure::wait`]'s sources.
const SHUTDOWN: Token = Token(0);
const TENURE: Token = Token(1);

impl Tenure {
    /// Starts watching the place of the instance that made `report` (this process) in
    /// `sw`'s namespace: subscribes to nf_tables' notifications in the service's network
    /// namespace (CAP_NET_ADMIN, one netlink socket), reads the rules once, and takes over
    /// the probation the commit asked for, if it kept a standby.
    pub fn new(sw: &Switcheroo, report: &Report) -> Result<Tenure> {
        let (pid, start) = owner::this_process();
        let me = Identity {
            namespace: sw.namespace().to_owned(),
            port: report.port,
            pid,
            start,
        };
        let registry = sw.registry().clone();
        let monitor = registry.in_netns(Monitor::open)??;
        let probation = match (report.role, report.probation) {
            (Role::Active, Some(d)) if !report.kept.is_empty() => Some(Probation {
                standby: owners(&report.kept),
                until: Instant::now() + d,
            }),
            _ => None,
        };
        if let Some(p) = &probation {
            info!(
                "namespace {}: probation of {:?}: pid {:?} stays warm below",
                me.namespace,
                report.probation.unwrap_or_default(),
                p.standby.iter().map(|id| id.pid).collect::<Vec<_>>()
            );
        }
        let first = report.inserted.first().ok_or_else(|| {
            crate::error::Error::Netlink(switcheroo_sys::Error::Protocol {
                op: "starting a tenure".into(),
                why: "the commit's report holds no inserted rule".into(),
            })
        })?;
        let mut tenure = Tenure {
            registry,
            me,
            monitor,
            group: first.group(),
            role: Some(report.role),
            handles: report.inserted.iter().map(Rule::place).collect(),
            above: None,
            probation,
            configured: report.probation,
            stale: true,
            retired: None,
        };
        // The first read only learns the place; a change since the commit is reported
        // by the next poll.
        if let Some(change) = tenure.refresh()? {
            debug!(
                "namespace {}: right after the commit: {change:?}",
                tenure.me.namespace
            );
            tenure.stale = true;
        }
        Ok(tenure)
    }

    /// This instance's role, or `None` once its rules are gone.
    pub fn role(&self) -> Option<Role> {
        self.role
    }

    /// When the probation this instance set ends, if one runs.
    pub fn deadline(&self) -> Option<Instant> {
        self.probation.as_ref().map(|p| p.until)
    }

    /// The file descriptors to poll for readability (the notification socket, and the
    /// pidfd of the instance above, if any); call [`Tenure::poll_change`] when one is
    /// readable or the [deadline](Tenure::deadline) has passed.
    pub fn fds(&self) -> Vec<BorrowedFd<'_>> {
        let mut fds = vec![self.monitor.as_fd()];
        if let Some(above) = &self.above {
            fds.push(above.fd.as_fd());
        }
        fds
    }

    /// Handles whatever is ready, without blocking: notifications, the death of the
    /// instance above, the end of the probation. Returns one change at a time; call again
    /// until it returns `None`.
    pub fn poll_change(&mut self) -> Result<Option<Change>> {
        self.drain_notifications();
        if let Some(above) = &self.above {
            if poll::readable_now(above.fd.as_fd()) {
                debug!(
                    "namespace {}: pid {} above this instance exited",
                    self.me.namespace, above.id.pid
                );
                self.stale = true;
            }
        }
        if let Some(p) = &self.probation {
            if Instant::now() >= p.until {
                let standby = p.standby.clone();
                self.probation = None;
                return self.end_probation(&standby).map(Some);
            }
        }
        if self.stale {
            return self.refresh();
        }
        Ok(None)
    }

    /// Waits until SIGTERM/SIGINT arrives on `shutdown` or this instance's place changes.
    /// A signal is reported first.
    pub fn wait(&mut self, shutdown: &Shutdown) -> Result<Wake> {
        loop {
            if let Some(signal) = shutdown.try_take() {
                return Ok(Wake::Signal(signal));
            }
            if let Some(change) = self.poll_change()? {
                return Ok(Wake::Change(change));
            }
            let mut sources = vec![Source::readable(SHUTDOWN, shutdown.as_fd())];
            sources.extend(
                self.fds()
                    .into_iter()
                    .map(|fd| Source::readable(TENURE, fd)),
            );
            // Whatever woke it (or an error of poll(2) itself, which only a signal or an
            // exhausted kernel cause), the loop looks again.
            let _ = poll::wait(&sources, self.deadline());
        }
    }

    /// Follows this instance's place until it must retire, and says why: its rules are
    /// gone ([`Change::Removed`]), or SIGTERM/SIGINT arrived on `shutdown`, in which case
    /// it [resigns](Tenure::resign) first. Every other change (standby, active again,
    /// promoted, probation passed) is handed to `on_change`; the tenure has acted on it
    /// already. What a blocking server does between its commit and its drain.
    pub fn until_retired(
        &mut self,
        shutdown: &Shutdown,
        mut on_change: impl FnMut(&Change),
    ) -> Result<Retired> {
        loop {
            match self.wait(shutdown)? {
                Wake::Signal(signal) => {
                    return Ok(match self.resign()? {
                        Resignation::Left { .. } => Retired::Signal(signal),
                        Resignation::AlreadyRemoved {
                            rolled_back,
                            serving,
                        } => Retired::Removed {
                            rolled_back,
                            serving,
                        },
                    })
                }
                Wake::Change(Change::Removed {
                    rolled_back,
                    serving,
                }) => {
                    return Ok(Retired::Removed {
                        rolled_back,
                        serving,
                    })
                }
                Wake::Change(other) => on_change(&other),
            }
        }
    }

    /// Deletes this instance's rules (and any of dead owners) in one transaction, as an
    /// instance stopped by an operator while it serves should: the instance below, if
    /// any, takes new connections at once instead of clients being refused. When the
    /// rules were gone already (a deployer or a rollback deletes them before it sends
    /// SIGTERM), says by what, as [`Change::Removed`] would.
    pub fn resign(&mut self) -> Result<Resignation> {
        let changed = self.registry.resign(&self.me)?;
        let applied = changed.applied;
        let rules = applied
            .removed
            .iter()
            .filter(|r| r.owned_by(&self.me))
            .count();
        let resignation = if rules > 0 {
            info!(
                "namespace {}: pid {} left the chain ({rules} rules)",
                self.me.namespace, self.me.pid
            );
            Resignation::Left { rules }
        } else {
            let (rolled_back, serving) = fate(&applied.after, self.group, &self.handles);
            Resignation::AlreadyRemoved {
                rolled_back,
                serving,
            }
        };
        self.leave();
        Ok(resignation)
    }

    /// The rules are gone: no place, no watch, no probation; and the mark for `status`.
    fn leave(&mut self) {
        self.role = None;
        self.probation = None;
        self.above = None;
        if self.retired.is_none() {
            self.retired = crate::instances::Mark::retired(&self.registry, &self.me);
        }
    }

    /// Reads what is pending on the notification socket; anything about the namespace's
    /// rules (or lost notifications) makes the next poll read the ruleset.
    fn drain_notifications(&mut self) {
        loop {
            match self.monitor.next(Some(Duration::ZERO)) {
                Ok(None) => return,
                Ok(Some(notification)) => {
                    if concerns(&notification, &self.me.namespace) {
                        self.stale = true;
                    }
                }
                Err(e) => {
                    // ENOBUFS: notifications were lost; the ruleset tells the truth.
                    debug!("namespace {}: notifications: {e}", self.me.namespace);
                    self.stale = true;
                    return;
                }
            }
        }
    }

    /// Reads the chains and acts on what they say of this instance's place.
    fn refresh(&mut self) -> Result<Option<Change>> {
        self.stale = false;
        loop {
            let rules = self.registry.read()?;
            let view = View::new(&self.me.namespace, &rules);
            match place(&view, &self.me) {
                Place::Gone => {
                    if self.role.is_none() {
                        return Ok(None);
                    }
                    let (rolled_back, serving) = fate(&rules, self.group, &self.handles);
                    self.leave();
                    return Ok(Some(Change::Removed {
                        rolled_back,
                        serving,
                    }));
                }
                Place::BelowDead => {
                    // The instance above died: its rules go, and this one moves up.
                    let gone = self.registry.remove_dead()?.applied.removed;
                    info!(
                        "namespace {}: removed {} rules of dead instances above pid {}",
                        self.me.namespace,
                        gone.len(),
                        self.me.pid
                    );
                }
                Place::At {
                    role,
                    above,
                    below,
                    handles,
                    group,
                } => {
                    self.handles = handles;
                    self.group = group;
                    let before_above = self.above.as_ref().map(|w| w.id.clone());
                    if above != before_above {
                        self.watch(above.clone());
                        if self.above.is_none() && above.is_some() {
                            // It exited between the read and the pidfd: read again.
                            continue;
                        }
                    }
                    let before = self.role.replace(role);
                    let change = change(before, before_above.as_ref(), role, above.as_ref());
                    if change == Some(Change::Promoted) {
                        self.probation = promoted_probation(self.configured, below);
                    }
                    return Ok(change);
                }
            }
        }
    }

    /// Opens a pidfd on the instance above (checked to be the process its rule names).
    fn watch(&mut self, above: Option<Identity>) {
        self.above = above.and_then(|id| {
            let fd = PidFd::open(id.pid).ok()?;
            // Opened first, checked second: if the pid was reused in between, the start
            // time differs; if it exits later, the pidfd tells.
            owner::is_alive(&id).then_some(Watched { id, fd })
        });
    }

    fn end_probation(&mut self, standby: &[Identity]) -> Result<Change> {
        let retired = self.registry.end_probation(standby)?.signalled;
        info!(
            "namespace {}: probation over; retired {retired:?}",
            self.me.namespace
        );
        self.stale = true;
        Ok(Change::ProbationPassed { retired })
    }
}

/// Whether a notification can concern `namespace`'s rules (or lost track of them).
fn concerns(notification: &Notification, namespace: &str) -> bool {
    let ours = |entry: &switcheroo_sys::RuleEntry| {
        entry.redirect.as_ref().is_some_and(|r| {
            Identity::parse(&r.comment).is_some_and(|id| id.namespace == namespace)
        })
    };
    match notification {
        Notification::NewRule(entry) | Notification::DelRule(entry) => ours(entry),
        Notification::DelTable(_, name) => name == switcheroo_sys::TABLE,
        _ => false,
    }
}

/// Where an instance stands, read from a view of its namespace.
#[derive(Debug, Clone, PartialEq)]
enum Place {
    /// Its rules are gone.
    Gone,
    /// A rule of a dead owner is above it: that rule must go first (it takes the
    /// connections this instance should get, and refuses them).
    BelowDead,
    /// In the chain, in `role`, below the instance `above` (none: it is the head).
    At {
        role: Role,
        above: Option<Identity>,
        /// The first live plain rule of another instance below it: the standby of a
        /// promotion.
        below: Option<Identity>,
        handles: Vec<(Family, Chain, Handle)>,
        group: GroupKey,
    },
}

/// The place of `me` in `view`, read in the group of its first rule (all its ports move
/// together).
fn place(view: &View<'_>, me: &Identity) -> Place {
    let mine = view.owned_by(me);
    let Some(first) = mine.first() else {
        return Place::Gone;
    };
    let Some(group) = view.group(first.group()) else {
        return Place::Gone;
    };
    let position = group.rules.iter().position(|r| r.owned_by(me)).unwrap_or(0);
    let over = &group.rules[..position];
    if over.iter().any(|r| !r.alive) {
        return Place::BelowDead;
    }
    let below = group.rules[position + 1..]
        .iter()
        .find(|r| r.alive && r.is_plain() && !r.owned_by(me))
        .map(|r| r.identity());
    Place::At {
        role: first.role,
        above: over.last().map(|r| r.identity()),
        below,
        handles: mine.iter().map(|r| r.place()).collect(),
        group: first.group(),
    }
}

/// What changed between the place before (`before` role and the instance `before_above`)
/// and now.
fn change(
    before: Option<Role>,
    before_above: Option<&Identity>,
    role: Role,
    above: Option<&Identity>,
) -> Option<Change> {
    if before == Some(Role::Canary) && role == Role::Active {
        return Some(Change::Promoted);
    }
    match (above, before_above) {
        (None, Some(old)) => Some(Change::Active {
            after: Some(old.pid),
        }),
        (Some(new), old) if Some(new) != old => Some(Change::Below {
            role,
            above: new.pid,
        }),
        _ if Some(role) != before => match above {
            Some(a) => Some(Change::Below { role, above: a.pid }),
            None => Some(Change::Active { after: None }),
        },
        _ => None,
    }
}

/// The probation a promoted canary starts: the standby below it retires after the
/// probation asked for at the commit, or at once without one.
fn promoted_probation(configured: Option<Duration>, below: Option<Identity>) -> Option<Probation> {
    let standby = below?;
    Some(Probation {
        standby: vec![standby],
        until: Instant::now() + configured.unwrap_or_default(),
    })
}

/// With an instance's rules gone from `rules` (every switcheroo rule of the chains): whether
/// it was rolled back, and who gets new connections now in its group (`group`, of any
/// namespace: a move hands the port to another name). Handles only grow: a head with a
/// smaller handle than the instance had in the same chain is older, so the instance was
/// rolled back.
fn fate(
    rules: &[Rule],
    group: GroupKey,
    handles: &[(Family, Chain, Handle)],
) -> (bool, Option<u32>) {
    let serving = rules
        .iter()
        .find(|r| r.group() == group && r.alive && r.is_plain());
    let rolled_back = serving.is_some_and(|s| {
        handles
            .iter()
            .any(|(f, c, h)| (s.family, s.chain) == (*f, *c) && s.handle < *h)
    });
    (rolled_back, serving.map(|r| r.pid))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::view::fixture::*;
    use switcheroo_sys::Protocol;

    fn at(rules: &[Rule], me: u32) -> Place {
        place(&View::new("web", rules), &id("web", me))
    }

    fn role_and_above(p: &Place) -> (Role, Option<u32>, Option<u32>) {
        match p {
            Place::At {
                role, above, below, ..
            } => (
                *role,
                above.as_ref().map(|a| a.pid),
                below.as_ref().map(|b| b.pid),
            ),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn an_instance_reads_its_role_and_the_instances_around_it() {
        // (rules, me) -> (role, pid above, pid below)
        type Row = (Vec<R>, u32, (Role, Option<u32>, Option<u32>));
        let table: Vec<Row> = vec![
            (vec![r("web", 3)], 3, (Role::Active, None, None)),
            (
                vec![r("web", 4), r("web", 3)],
                3,
                (Role::Standby, Some(4), None),
            ),
            (
                vec![r("web", 4), r("web", 3)],
                4,
                (Role::Active, None, Some(3)),
            ),
            (
                vec![r("web", 5).canary(10.0), r("web", 4)],
                4,
                (Role::Active, Some(5), None),
            ),
            (
                vec![r("web", 5).canary(10.0), r("web", 4), r("web", 3)],
                5,
                (Role::Canary, None, Some(4)),
            ),
            (
                vec![r("api", 9), r("web", 4)],
                4,
                (Role::Active, None, None),
            ),
        ];
        for (rules, me, expected) in table {
            let rules = everywhere(rules.clone());
            assert_eq!(
                role_and_above(&at(&rules, me)),
                expected,
                "{me} in {rules:?}"
            );
        }
    }

    #[test]
    fn a_dead_instance_above_must_go_first_and_a_missing_rule_means_gone() {
        let rules = everywhere(vec![r("web", 4).dead(), r("web", 3)]);
        assert_eq!(at(&rules, 3), Place::BelowDead);
        let below_dead = everywhere(vec![r("web", 4), r("web", 3).dead()]);
        assert_eq!(role_and_above(&at(&below_dead, 4)).0, Role::Active);
        assert_eq!(at(&rules, 7), Place::Gone);
    }

    #[test]
    fn each_move_of_the_place_is_one_change() {
        let a = |pid| id("web", pid);
        use Change::*;
        // (role before, above before, role now, above now) -> change
        type Row = (
            Option<Role>,
            Option<Identity>,
            Role,
            Option<Identity>,
            Option<Change>,
        );
        let table: Vec<Row> = vec![
            (Some(Role::Active), None, Role::Active, None, None),
            (
                Some(Role::Active),
                None,
                Role::Standby,
                Some(a(5)),
                Some(Below {
                    role: Role::Standby,
                    above: 5,
                }),
            ),
            (
                Some(Role::Standby),
                Some(a(5)),
                Role::Active,
                None,
                Some(Active { after: Some(5) }),
            ),
            (
                Some(Role::Standby),
                Some(a(5)),
                Role::Standby,
                Some(a(6)),
                Some(Below {
                    role: Role::Standby,
                    above: 6,
                }),
            ),
            (Some(Role::Canary), None, Role::Active, None, Some(Promoted)),
            (
                Some(Role::Active),
                None,
                Role::Active,
                Some(a(7)),
                Some(Below {
                    role: Role::Active,
                    above: 7,
                }),
            ),
            (
                Some(Role::Standby),
                Some(a(5)),
                Role::Standby,
                Some(a(5)),
                None,
            ),
            (None, None, Role::Active, None, Some(Active { after: None })),
        ];
        for (role_before, above_before, role, above, expected) in table {
            assert_eq!(
                change(role_before, above_before.as_ref(), role, above.as_ref()),
                expected,
                "{role_before:?} below {above_before:?} -> {role} below {above:?}"
            );
        }
    }

    #[test]
    fn a_promotion_retires_the_standby_after_the_probation_or_at_once() {
        let before = Instant::now();
        let p = promoted_probation(Some(Duration::from_secs(60)), Some(id("web", 3))).unwrap();
        assert_eq!(p.standby, [id("web", 3)]);
        assert!(p.until >= before + Duration::from_secs(60));
        let at_once = promoted_probation(None, Some(id("web", 3))).unwrap();
        assert!(at_once.until <= Instant::now());
        assert_eq!(
            promoted_probation(Some(Duration::from_secs(60)), None),
            None
        );
    }

    #[test]
    fn a_removed_instance_learns_whether_it_was_rolled_back_and_who_serves() {
        // The handles of pid 4's rules (fixture: the top rule of a chain of n has 100 + n).
        let mine = everywhere(vec![r("web", 4), r("web", 3)]);
        let handles: Vec<_> = mine
            .iter()
            .filter(|r| r.pid == 4)
            .map(Rule::place)
            .collect();
        let group = mine[0].group();
        // Rolled back: the older instance (a smaller handle) serves again.
        let back = everywhere(vec![r("web", 3)]);
        assert_eq!(fate(&back, group, &handles), (true, Some(3)));
        // Replaced: a newer instance (handles grow) on top.
        let newer = everywhere(vec![r("web", 6), r("web", 5), r("web", 4), r("web", 3)]);
        let replaced: Vec<Rule> = newer
            .into_iter()
            .filter(|r| r.pid != 4 && r.pid != 3 && r.pid != 5)
            .collect();
        assert_eq!(fate(&replaced, group, &handles), (false, Some(6)));
        // Moved to another namespace: it serves the same group now.
        let moved = everywhere(vec![r("api", 8), r("x", 1), r("x", 2)]);
        let moved: Vec<Rule> = moved.into_iter().filter(|r| r.namespace == "api").collect();
        let (_, serving) = fate(&moved, group, &handles);
        assert_eq!(serving, Some(8));
        assert_eq!(fate(&[], group, &handles), (false, None));
        // Another port's rules say nothing of this group.
        let other = everywhere(vec![r("web", 9).port(Protocol::Udp, 8080)]);
        assert_eq!(fate(&other, group, &handles), (false, None));
    }

    #[test]
    fn notifications_about_other_namespaces_are_ignored() {
        use switcheroo_sys::Redirect;
        let entry = |comment: &str| switcheroo_sys::RuleEntry {
            family: Family::Ipv4,
            chain: Chain::Output,
            handle: Handle::for_tests(1),
            redirect: Some(Redirect::new(8080, 40400, comment).unwrap()),
        };
        let web = entry("SWITCHEROO:ns=web:port=40400:pid=1:start=1");
        let api = entry("SWITCHEROO:ns=api:port=40400:pid=1:start=1");
        assert!(concerns(&Notification::NewRule(web.clone()), "web"));
        assert!(concerns(&Notification::DelRule(web), "web"));
        assert!(!concerns(&Notification::NewRule(api), "web"));
        assert!(concerns(&Notification::DelTable(2, "nat".into()), "web"));
        assert!(!concerns(&Notification::NewGen, "web"));
    }
}
