//! The switch: one transaction that points every public port of the service at this
//! instance and removes every older rule of the namespace, then the termination of their
//! owners.

use crate::comment::Identity;
use crate::deploy::{self, Deploy};
use crate::owner::{self, terminate_all};
use crate::port::Mapping;
use crate::role::Role;
use crate::rule::owners;
use crate::rule::Rule;
use crate::{Error, Result, Switcheroo};
use log::info;
use std::time::{Duration, Instant};
use switcheroo_sys::{Chain, Family, Op, Redirect};

/// A bound but not yet public instance; see [`Switcheroo::begin`].
#[derive(Debug)]
#[must_use = "nothing is switched until commit() is called"]
pub struct Takeover {
    sw: Switcheroo,
    mappings: Vec<Mapping>,
    probation: Option<Duration>,
    canary: Option<u8>,
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
    pub(crate) fn new(sw: Switcheroo, mappings: Vec<Mapping>) -> Self {
        Takeover {
            sw,
            mappings,
            probation: None,
            canary: None,
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
    /// generation and this namespace's rules (one dump per chain, filtered in the kernel;
    /// or, with a [record directory](crate::Builder::record_dir) and an unchanged
    /// generation, each recorded rule fetched by handle), then sends ONE batch that creates
    /// the nat table and chains where missing, inserts the new redirect at the head of
    /// each chain of the routes for each public port (each rule's comment names its own
    /// internal port), deletes every older rule of the namespace by handle, and
    /// releases the lock. If the ruleset changed in between, the kernel refuses the batch
    /// whole; it is recomputed from a fresh read after a short random pause, up to
    /// [`crate::Builder::max_attempts`] attempts ([`crate::Error::Conflict`] after that,
    /// with nothing applied).
    ///
    /// Then each owner of a deleted rule is sent SIGTERM, only if its pid and start time
    /// match the rule, and never the calling process.
    pub fn commit(self) -> Result<Report> {
        let started = Instant::now();
        let sw = &self.sw;
        let (pid, start) = owner::this_process();
        let how = match (self.canary, self.probation) {
            (Some(_), _) => Deploy::Canary,
            (None, Some(_)) => Deploy::Probation,
            (None, None) => Deploy::Replace,
        };
        let mut redirects = Vec::with_capacity(self.mappings.len());
        for m in &self.mappings {
            let comment = Identity {
                namespace: sw.namespace().to_owned(),
                port: m.internal,
                pid,
                start,
            }
            .to_string();
            let mut redirect = Redirect::new(m.public.number, m.internal, &comment)?
                .with_protocol(m.public.protocol);
            if let Some(percent) = self.canary {
                redirect = redirect
                    .with_percent(percent)
                    .map_err(|_| Error::InvalidCanary { percent })?;
            }
            redirects.push(redirect);
        }
        let routes = sw.routes();
        let wanted = |chain| routes.has_chain(chain);

        let outcome = sw.with_conn(|conn, recorded| {
            sw.transaction(recorded, &wanted).run(conn, |snap, batch| {
                let kept = deploy::kept_by(snap, how);
                if how == Deploy::Canary {
                    // Every port and chain the canary enters needs an active to share with.
                    let all_have_active = Family::ALL.into_iter().all(|f| {
                        Chain::ALL
                            .into_iter()
                            .filter(|c| routes.has_chain(*c))
                            .all(|c| {
                                self.mappings
                                    .iter()
                                    .all(|m| kept.iter().any(|r| r.group() == (f, c, m.public)))
                            })
                    });
                    if !all_have_active {
                        return Err(Error::CanaryWithoutActive {
                            namespace: sw.namespace().to_owned(),
                        });
                    }
                }
                for family in Family::ALL {
                    if snap.missing.iter().any(|(f, _)| *f == family) {
                        batch.push(Op::AddTable(family));
                    }
                    for chain in Chain::ALL {
                        if snap.missing.contains(&(family, chain)) {
                            batch.push(Op::AddChain(family, chain));
                        }
                        if routes.has_chain(chain) {
                            for redirect in &redirects {
                                batch.insert_rule(family, chain, redirect.clone());
                            }
                        }
                    }
                }
                for rule in snap.ours.iter().filter(|r| !kept.contains(r)) {
                    let (family, chain, handle) = rule.place();
                    batch.push(Op::Delete(family, chain, handle));
                }
                Ok(())
            })
        })?;
        let elapsed = started.elapsed();
        let list: Vec<String> = self.mappings.iter().map(Mapping::to_string).collect();
        info!(
            "namespace {}: {} (pid {pid}); removed {} older rules in {:?} ({} attempts)",
            sw.namespace(),
            list.join(", "),
            outcome.removed.len(),
            elapsed,
            outcome.attempts,
        );

        // The instances that stay (standby, or active below a canary) keep serving: only
        // owners of deleted rules are told to go.
        let kept: Vec<Rule> = outcome
            .remaining
            .iter()
            .filter(|r| r.pid != Some(pid))
            .cloned()
            .collect();
        let leaving: Vec<Rule> = outcome
            .removed
            .iter()
            .filter(|r| !kept.iter().any(|k| k.pid == r.pid && k.start == r.start))
            .cloned()
            .collect();
        let signalled = terminate_all(owners(&leaving));
        // A dead owner's connections that its death reset stay in conntrack (CLOSE) mapped
        // to its port; a client that reuses such a port would follow one to the dead port.
        if let Err(e) = crate::history::forget_dead_owners(sw, &outcome.removed) {
            log::warn!("the switch is done, but the connections of dead instances could not be forgotten: {e}");
        }
        Ok(Report {
            port: self.port(),
            mappings: self.mappings,
            inserted: outcome.inserted,
            removed: outcome.removed,
            signalled,
            attempts: outcome.attempts,
            lock_wait: outcome.lock_wait,
            role: if how == Deploy::Canary {
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
