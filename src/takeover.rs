//! The switch: one transaction that points every public port of the service at this
//! instance and removes every older rule of the namespace, then the termination of their
//! owners.

use crate::error::Result;
use crate::owner;
use crate::plan::{self, Deployment};
use crate::port::Mapping;
use crate::registry::Registry;
use crate::role::Role;
use crate::routes::Routes;
use crate::rule::Rule;
use log::info;
use std::time::{Duration, Instant};

/// A bound but not yet public instance; see [`Switcheroo::begin`](crate::Switcheroo::begin).
#[derive(Debug)]
#[must_use = "nothing is switched until commit() is called"]
pub struct Takeover {
    registry: Registry,
    routes: Routes,
    mappings: Vec<Mapping>,
    probation: Option<Duration>,
    canary: Option<u8>,
    moving_from: Option<String>,
}

/// What [`Takeover::commit`] did.
#[derive(Debug, Clone)]
pub struct Report {
    /// The internal port the (first) public port now leads to.
    pub port: u16,
    /// Each public port and the internal port it now leads to.
    pub mappings: Vec<Mapping>,
    /// The rules inserted, one per public port and (family, chain) of the routes, with the
    /// handles the kernel gave them.
    pub inserted: Vec<Rule>,
    /// The older rules of the namespace that the same transaction deleted.
    pub removed: Vec<Rule>,
    /// The processes that were sent SIGTERM: owners of removed rules whose identity (pid
    /// and start time) was confirmed.
    pub signalled: Vec<u32>,
    /// How many attempts were made (more than 1 when the ruleset changed under one: an
    /// interrupted dump and a refused batch count alike).
    pub attempts: u32,
    /// How long the commit waited for another instance of the namespace to finish its own
    /// (zero when the lock was free).
    pub lock_wait: Duration,
    /// The role the new rules took: [`Role::Active`], or [`Role::Canary`] for a canary.
    pub role: Role,
    /// The rules kept below the new ones: with a probation, the previous active (now the
    /// standby); for a canary, the active and the standby.
    pub kept: Vec<Rule>,
    /// The probation asked for with [`Takeover::probation`].
    pub probation: Option<Duration>,
    /// Time from the call to the applied transaction (before signalling).
    pub elapsed: Duration,
}

impl Takeover {
    pub(crate) fn new(registry: Registry, routes: Routes, mappings: Vec<Mapping>) -> Self {
        Takeover {
            registry,
            routes,
            mappings,
            probation: None,
            canary: None,
            moving_from: None,
        }
    }

    /// Keeps the previous active instance warm below this one for `probation` after the
    /// commit: its rules stay as the standby, it keeps its listener and is not signalled.
    /// If this instance dies meanwhile, the standby (watching it through a
    /// [`Tenure`](crate::Tenure)) deletes its rules and serves again; when the probation
    /// passes, this instance's [`Tenure`](crate::Tenure) deletes the standby's rules and
    /// sends it SIGTERM. For a canary, the probation starts when it is promoted.
    pub fn probation(mut self, probation: Duration) -> Self {
        self.probation = Some(probation);
        self
    }

    /// Commits this instance as a canary: its rules take `percent` of new connections
    /// (1-99; `-m statistic --mode random`, one draw per connection, which conntrack then
    /// keeps where it started) above the active, which keeps the rest. The active and the
    /// standby stay, an earlier canary is replaced. [`promote`](crate::promote) makes it
    /// the active, [`rollback`](crate::rollback) removes it.
    pub fn canary(mut self, percent: u8) -> Self {
        self.canary = Some(percent);
        self
    }

    /// Moves the service from the namespace `old` to this one: the commit also deletes every
    /// rule of `old` in the same transaction, and `old`'s instances retire as if replaced
    /// (SIGTERM after their identity check). Without it, a public port that a live
    /// instance of another namespace serves refuses the commit
    /// ([`Error::PortHeld`](crate::Error::PortHeld)).
    pub fn moving_from(mut self, old: impl Into<String>) -> Self {
        self.moving_from = Some(old.into());
        self
    }

    /// The internal port of this instance for the (first) public port.
    pub fn port(&self) -> u16 {
        self.mappings[0].internal
    }

    /// Each public port and the internal port it will lead to.
    pub fn mappings(&self) -> &[Mapping] {
        &self.mappings
    }

    /// Points every public port of the service at this instance, atomically.
    ///
    /// Takes the namespace's commit lock (an nftables table owned by the socket; only a
    /// process with CAP_NET_ADMIN can hold it, and a dead holder releases it), reads the
    /// switcheroo rules of the nat chains (one dump per chain, filtered in the kernel; or,
    /// with a [record directory](crate::Builder::record_dir) and an unchanged generation,
    /// each recorded rule fetched by handle), then sends ONE batch that creates the nat
    /// table and chains where missing, inserts the new redirect at the head of each chain
    /// of the routes for each public port (each rule's comment names its own internal
    /// port), deletes every older rule of the namespace by handle (but the standby a
    /// probation keeps, or the active and standby a canary keeps), and releases the lock.
    /// If the ruleset changed in between, the kernel refuses the batch whole; it is
    /// recomputed from a fresh read after a short random pause, up to
    /// [`crate::Builder::max_attempts`] attempts ([`crate::Error::Conflict`] after that,
    /// with nothing applied).
    ///
    /// Then each owner of a deleted rule that has no rule left is sent SIGTERM, only if its
    /// pid and start time match the rule, and never the calling process; the connections
    /// conntrack still maps to dead owners' ports are forgotten.
    ///
    /// Refused with nothing changed: [`crate::Error::PortHeld`] when a live instance of
    /// another namespace serves one of the public ports (see [`Takeover::moving_from`]),
    /// [`crate::Error::CanaryWithoutActive`], [`crate::Error::InvalidCanary`].
    pub fn commit(self) -> Result<Report> {
        let started = Instant::now();
        let me = owner::this_process();
        let deployment = Deployment {
            me,
            mappings: &self.mappings,
            routes: self.routes,
            canary: self.canary,
            probation: self.probation.is_some(),
            moving_from: self.moving_from.as_deref(),
        };
        let changed = self.registry.transact(Some(self.routes), |view| {
            Ok((plan::deploy(view, &deployment)?, ()))
        })?;
        let elapsed = changed.applied_at.saturating_duration_since(started);
        let applied = changed.applied;
        let list: Vec<String> = self.mappings.iter().map(Mapping::to_string).collect();
        info!(
            "namespace {}: {} (pid {}); removed {} older rules in {:?} ({} attempts)",
            self.registry.namespace(),
            list.join(", "),
            me.0,
            applied.removed.len(),
            elapsed,
            applied.attempts,
        );
        let kept: Vec<Rule> = applied
            .remaining
            .into_iter()
            .filter(|r| r.pid != me.0)
            .collect();
        Ok(Report {
            port: self.port(),
            mappings: self.mappings,
            inserted: applied.inserted,
            removed: applied.removed,
            signalled: changed.signalled,
            attempts: applied.attempts,
            lock_wait: applied.lock_wait,
            role: if self.canary.is_some() {
                Role::Canary
            } else {
                Role::Active
            },
            kept,
            probation: self.probation,
            elapsed,
        })
    }
}
