//! The switch: one transaction that points the public port at this instance and removes
//! every older rule of the namespace, then the termination of their owners.

use crate::comment::Identity;
use crate::owner::{self, Termination};
use crate::rule::Rule;
use crate::{Result, Switcheroo};
use log::{info, warn};
use std::time::{Duration, Instant};
use switcheroo_sys::{Chain, Family, Op, Redirect};

/// A bound but not yet public instance; see [`Switcheroo::begin`].
#[derive(Debug)]
#[must_use = "nothing is switched until commit() is called"]
pub struct Takeover {
    sw: Switcheroo,
    port: u16,
}

/// What [`Takeover::commit`] did.
#[derive(Debug, Clone)]
pub struct Report {
    /// The internal port the public port now leads to.
    pub port: u16,
    /// The rules inserted, one per (family, chain) of the routes, with the handles the
    /// kernel gave them.
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
    /// Time from the call to the applied transaction (before signalling).
    pub elapsed: Duration,
}

impl Takeover {
    pub(crate) fn new(sw: Switcheroo, port: u16) -> Self {
        Takeover { sw, port }
    }

    /// The internal port of this instance.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Points the public port at this instance, atomically.
    ///
    /// Takes the namespace's commit lock (an nftables table owned by the socket; only a
    /// process with CAP_NET_ADMIN can hold it, and a dead holder releases it), reads the
    /// generation and this namespace's rules (one dump per chain, filtered in the kernel;
    /// or, with a [record directory](crate::Builder::record_dir) and an unchanged
    /// generation, each recorded rule fetched by handle), then sends ONE batch that creates
    /// the nat table and chains where missing, inserts the new redirect at the head of
    /// each chain of the routes, deletes every older rule of the namespace by handle, and
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
        let comment = Identity {
            namespace: sw.namespace().to_owned(),
            port: self.port,
            pid,
            start,
        }
        .to_string();
        let redirect = Redirect::new(sw.public_port(), self.port, &comment)?;
        let routes = sw.routes();
        let wanted = |chain| routes.has_chain(chain);

        let outcome = sw.with_conn(|conn, recorded| {
            sw.transaction(recorded, &wanted).run(conn, |snap, batch| {
                for family in Family::ALL {
                    if snap.missing.iter().any(|(f, _)| *f == family) {
                        batch.push(Op::AddTable(family));
                    }
                    for chain in Chain::ALL {
                        if snap.missing.contains(&(family, chain)) {
                            batch.push(Op::AddChain(family, chain));
                        }
                        if routes.has_chain(chain) {
                            batch.insert_rule(family, chain, redirect.clone());
                        }
                    }
                }
                for rule in &snap.ours {
                    let (family, chain, handle) = rule.place();
                    batch.push(Op::Delete(family, chain, handle));
                }
                Ok(())
            })
        })?;
        let elapsed = started.elapsed();
        info!(
            "namespace {}: port {} now leads to {} (pid {pid}); removed {} older rules in {:?} ({} attempts)",
            sw.namespace(),
            sw.public_port(),
            self.port,
            outcome.removed.len(),
            elapsed,
            outcome.attempts,
        );

        let signalled = terminate_owners(&outcome.removed);
        Ok(Report {
            port: self.port,
            inserted: outcome.inserted,
            removed: outcome.removed,
            signalled,
            attempts: outcome.attempts,
            lock_wait: outcome.lock_wait,
            elapsed,
        })
    }
}

/// SIGTERMs the distinct owners of `removed`, each after its identity check.
fn terminate_owners(removed: &[Rule]) -> Vec<u32> {
    let mut owners: Vec<Identity> = removed.iter().filter_map(Rule::identity).collect();
    owners.sort_by_key(|id| (id.pid, id.start));
    owners.dedup_by_key(|id| (id.pid, id.start));
    let mut signalled = Vec::new();
    for id in owners {
        match owner::terminate(&id) {
            Termination::Signalled => {
                info!("sent SIGTERM to pid {} (port {})", id.pid, id.port);
                signalled.push(id.pid);
            }
            Termination::Gone | Termination::Myself => {}
            Termination::Reused => warn!(
                "pid {} of a removed rule now belongs to another process; not signalled",
                id.pid
            ),
            Termination::Unverifiable => warn!(
                "rule for port {} names pid {} without a start time (an older switcheroo); its owner cannot be verified and was not signalled",
                id.port, id.pid
            ),
            Termination::Failed(e) => warn!("could not signal pid {}: {e} (CAP_KILL is needed for another user's process)", id.pid),
        }
    }
    signalled
}
