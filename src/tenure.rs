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
//! [`Tenure::fds`], [`Tenure::deadline`] and [`Tenure::check`] let any event loop drive
//! it, as [`Drain`](crate::Drain) and [`DrainTracker`](crate::DrainTracker) do.

use crate::comment::Identity;
use crate::history;
use crate::owner::{self, terminate_all};
use crate::role::Role;
use crate::rule::owners;
use crate::rule::Rule;
use crate::takeover::Report;
use crate::transaction;
use crate::{Result, Shutdown, Switcheroo};
use log::{debug, info, warn};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use std::os::fd::{AsFd, BorrowedFd};
use std::time::{Duration, Instant};
use switcheroo_sys::monitor::{Event, Monitor};
use switcheroo_sys::{Chain, Family, Handle, PidFd};

/// A change of this instance's place, as [`Tenure::check`] and [`Tenure::wait`] report it.
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
#[derive(Debug, Clone)]
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
    sw: Switcheroo,
    me: Identity,
    monitor: Monitor,
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
}

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
        let monitor = sw.in_netns(Monitor::open)??;
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
        let mut tenure = Tenure {
            sw: sw.clone(),
            me,
            monitor,
            role: Some(report.role),
            handles: report
                .inserted
                .iter()
                .map(|r| (r.family, r.chain, r.handle))
                .collect(),
            above: None,
            probation,
            configured: report.probation,
            stale: true,
        };
        // The first read only learns the place; a change since the commit is reported
        // by the next check.
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
    /// pidfd of the instance above, if any); call [`Tenure::check`] when one is readable
    /// or the [deadline](Tenure::deadline) has passed.
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
    pub fn check(&mut self) -> Result<Option<Change>> {
        self.drain_notifications()?;
        if let Some(above) = &self.above {
            if readable(above.fd.as_fd()) {
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
            if let Some(change) = self.check()? {
                return Ok(Wake::Change(change));
            }
            let timeout = match self.deadline() {
                None => PollTimeout::NONE,
                Some(until) => {
                    let left = until.saturating_duration_since(Instant::now());
                    let ms = left.as_micros().div_ceil(1000).min(i32::MAX as u128) as i32;
                    PollTimeout::try_from(ms).unwrap_or(PollTimeout::MAX)
                }
            };
            let mut fds: Vec<PollFd<'_>> = std::iter::once(shutdown.as_fd())
                .chain(self.fds())
                .map(|fd| PollFd::new(fd, PollFlags::POLLIN))
                .collect();
            // EINTR or a spurious wake-up: look again.
            let _ = poll(&mut fds, timeout);
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
        let me = self.me.clone();
        let outcome = history::remove(&self.sw, |r| r.owned_by(&me))?;
        let rules = outcome.removed.iter().filter(|r| r.owned_by(&me)).count();
        let resignation = if rules > 0 {
            info!(
                "namespace {}: pid {} left the chain ({rules} rules)",
                me.namespace, me.pid
            );
            Resignation::Left { rules }
        } else {
            let (rolled_back, serving) = self.fate(&outcome.remaining);
            Resignation::AlreadyRemoved {
                rolled_back,
                serving,
            }
        };
        self.role = None;
        self.probation = None;
        self.above = None;
        Ok(resignation)
    }

    /// Reads what is pending on the notification socket; anything about the namespace's
    /// rules (or lost notifications) makes the next check read the ruleset.
    fn drain_notifications(&mut self) -> Result<()> {
        loop {
            match self.monitor.next(Some(Duration::ZERO)) {
                Ok(None) => return Ok(()),
                Ok(Some(event)) => {
                    if self.concerns(&event) {
                        self.stale = true;
                    }
                }
                Err(e) => {
                    // ENOBUFS: notifications were lost; the ruleset tells the truth.
                    debug!("namespace {}: notifications: {e}", self.me.namespace);
                    self.stale = true;
                    return Ok(());
                }
            }
        }
    }

    fn concerns(&self, event: &Event) -> bool {
        let ours = |entry: &switcheroo_sys::RuleEntry| {
            entry.redirect.as_ref().is_some_and(|r| {
                crate::comment::Identity::parse(&r.comment)
                    .is_some_and(|id| id.namespace == self.me.namespace)
            })
        };
        match event {
            Event::NewRule(entry) | Event::DelRule(entry) => ours(entry),
            Event::DelTable(_, name) => name == switcheroo_sys::TABLE,
            _ => false,
        }
    }

    /// Reads the namespace's rules and acts on what they say.
    fn refresh(&mut self) -> Result<Option<Change>> {
        self.stale = false;
        loop {
            let rules = self.sw.with_conn(|conn, recorded| {
                Ok(transaction::read(
                    conn,
                    Some(self.sw.namespace()),
                    self.sw.max_attempts(),
                    recorded,
                )?
                .ours)
            })?;
            let mine: Vec<&Rule> = rules.iter().filter(|r| r.owned_by(&self.me)).collect();
            let Some(first) = mine.first() else {
                return Ok(self.removed(&rules));
            };
            // The instance directly above, among the rules for the public port and chain of
            // this instance's first rule (all its ports move together).
            let chain: Vec<&Rule> = rules
                .iter()
                .filter(|r| r.group() == first.group())
                .collect();
            let position = chain.iter().position(|r| r.owned_by(&self.me)).unwrap_or(0);
            let over = &chain[..position];
            if over.iter().any(|r| !r.alive) {
                // The instance above died: its rules go, and this one moves up.
                let gone = history::remove(&self.sw, |_| false)?.removed;
                info!(
                    "namespace {}: removed {} rules of dead instances above pid {}",
                    self.me.namespace,
                    gone.len(),
                    self.me.pid
                );
                continue;
            }
            self.handles = mine.iter().map(|r| (r.family, r.chain, r.handle)).collect();
            let role = first.role;
            let above = over.last().and_then(|r| r.identity());
            let before = (self.role, self.above.as_ref().map(|w| w.id.clone()));
            if above != before.1 {
                self.watch(above.clone());
                if self.above.is_none() && above.is_some() {
                    // It exited between the read and the pidfd: read again.
                    continue;
                }
            }
            self.role = Some(role);
            return Ok(self.changed(before, role, above, &chain, position));
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

    /// What a read says changed, and what follows from it.
    fn changed(
        &mut self,
        (old_role, old_above): (Option<Role>, Option<Identity>),
        role: Role,
        above: Option<Identity>,
        chain: &[&Rule],
        position: usize,
    ) -> Option<Change> {
        if old_role == Some(Role::Canary) && role == Role::Active {
            // Promoted: the standby below is the previous active, whose fate is this
            // instance's probation.
            let below: Vec<Identity> = chain[position + 1..]
                .iter()
                .filter(|r| r.alive && r.weight.is_none())
                .take(1)
                .filter_map(|r| r.identity())
                .collect();
            match self.configured {
                Some(d) if !below.is_empty() => {
                    self.probation = Some(Probation {
                        standby: below,
                        until: Instant::now() + d,
                    })
                }
                _ if !below.is_empty() => {
                    self.probation = Some(Probation {
                        standby: below,
                        until: Instant::now(),
                    })
                }
                _ => {}
            }
            return Some(Change::Promoted);
        }
        match (&above, &old_above) {
            (None, Some(old)) => Some(Change::Active {
                after: Some(old.pid),
            }),
            (Some(new), old) if Some(new) != old.as_ref() => Some(Change::Below {
                role,
                above: new.pid,
            }),
            _ if Some(role) != old_role => match above {
                Some(a) => Some(Change::Below { role, above: a.pid }),
                None => Some(Change::Active { after: None }),
            },
            _ => None,
        }
    }

    /// This instance's rules are gone: by whom.
    fn removed(&mut self, rules: &[Rule]) -> Option<Change> {
        self.role.take()?;
        self.above = None;
        self.probation = None;
        let (rolled_back, serving) = self.fate(rules);
        Some(Change::Removed {
            rolled_back,
            serving,
        })
    }

    /// With this instance's rules gone from `rules`: whether it was rolled back, and who
    /// gets new connections now.
    fn fate(&self, rules: &[Rule]) -> (bool, Option<u32>) {
        let serving = rules.iter().find(|r| r.alive && r.weight.is_none());
        // Handles only grow: a head with a smaller handle than ours had in the same chain
        // is older than this instance, so this instance was rolled back.
        let rolled_back = serving.is_some_and(|s| {
            self.handles
                .iter()
                .any(|(f, c, h)| (s.family, s.chain) == (*f, *c) && s.handle < *h)
        });
        (rolled_back, serving.and_then(|r| r.pid))
    }

    fn end_probation(&mut self, standby: &[Identity]) -> Result<Change> {
        let removed =
            history::remove(&self.sw, |r| standby.iter().any(|id| r.owned_by(id)))?.removed;
        let retired = terminate_all(owners(&removed));
        info!(
            "namespace {}: probation over; retired {retired:?}",
            self.me.namespace
        );
        self.stale = true;
        Ok(Change::ProbationPassed { retired })
    }
}

/// Whether `fd` is readable now.
fn readable(fd: BorrowedFd<'_>) -> bool {
    let mut fds = [PollFd::new(fd, PollFlags::POLLIN)];
    match poll(&mut fds, PollTimeout::ZERO) {
        Ok(n) => n > 0,
        Err(e) => {
            warn!("poll: {e}");
            false
        }
    }
}
