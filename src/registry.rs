//! One service namespace's hold on the ruleset of one network namespace: the netlink socket
//! (opened in that network namespace, shared by clones), the commit lock and record, and
//! the operations on the namespace's rules. Each operation is a [`plan`] applied by one
//! transaction ([`Transaction::run`]), followed by the same step ([`retire`]).

use crate::bind;
use crate::comment::{valid_namespace, Identity};
use crate::error::{Error, Result};
use crate::netns::NetNs;
use crate::plan::{self, Plan};
use crate::record::{Key, Records};
use crate::retire;
use crate::routes::Routes;
use crate::rule::Rule;
use crate::snapshot::Remembered;
use crate::transact::{self, Applied, Transaction, MAX_ATTEMPTS};
use crate::view::View;
use log::{info, warn};
use std::sync::{Arc, Mutex};
use switcheroo_sys::Conn;

/// What [`Switcheroo::rollback`](crate::Switcheroo::rollback) and
/// [`rollback`](crate::rollback) did.
#[derive(Debug, Clone)]
pub struct Rollback {
    /// The instance rolled back from: the canary, or the active.
    pub from: u32,
    /// The rules the transaction deleted: the rolled-back instance's, and any of dead
    /// owners.
    pub removed: Vec<Rule>,
    /// The processes sent SIGTERM (the rolled-back instance, after its identity check).
    pub signalled: Vec<u32>,
    /// The pid of the instance that takes every new connection now.
    pub serving: Option<u32>,
}

/// What [`Switcheroo::promote`](crate::Switcheroo::promote) and
/// [`promote`](crate::promote) did.
#[derive(Debug, Clone)]
pub struct Promotion {
    /// The pid of the canary that is now the active.
    pub promoted: u32,
    /// The previous active, kept below as the standby (the promoted instance's probation
    /// decides when it retires).
    pub standby: Option<u32>,
    /// The rules the transaction deleted: the canary's statistic rules, an older standby's,
    /// and any of dead owners.
    pub removed: Vec<Rule>,
    /// The processes sent SIGTERM (owners of deleted live rules, after their identity check).
    pub signalled: Vec<u32>,
}

/// A namespace's hold on one network namespace's ruleset; cheap to clone (clones share the
/// socket).
#[derive(Debug, Clone)]
pub(crate) struct Registry {
    namespace: String,
    netns: NetNs,
    max_attempts: u32,
    records: Option<Records>,
    link: Arc<Mutex<Option<Link>>>,
}

/// The open netlink socket, the key of the commit record of its network namespace, and
/// what the last transaction on it left.
#[derive(Debug)]
struct Link {
    conn: Conn,
    key: Option<Key>,
    memory: Option<Remembered>,
}

/// What a transaction did, and the owners it then signalled.
#[derive(Debug)]
pub(crate) struct Changed<T> {
    pub applied: Applied<T>,
    /// When the transaction was applied (before the owners were signalled).
    pub applied_at: std::time::Instant,
    pub signalled: Vec<u32>,
}

impl Registry {
    pub fn new(
        namespace: String,
        netns: NetNs,
        max_attempts: u32,
        records: Option<Records>,
    ) -> Registry {
        Registry {
            namespace,
            netns,
            max_attempts,
            records,
            link: Arc::default(),
        }
    }

    /// The registry of `namespace` in the calling thread's network namespace, without a
    /// record. [`Error::InvalidNamespace`] before anything is opened.
    pub fn here(namespace: &str) -> Result<Registry> {
        if !valid_namespace(namespace) {
            return Err(Error::InvalidNamespace {
                namespace: namespace.to_owned(),
            });
        }
        Ok(Registry::new(
            namespace.to_owned(),
            NetNs::current()?,
            MAX_ATTEMPTS,
            None,
        ))
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    pub fn max_attempts(&self) -> u32 {
        self.max_attempts
    }

    /// Runs `f` on the shared socket, opening it in the network namespace if needed, with
    /// the commit record of that namespace when records are on. After a failure the socket
    /// is dropped (releasing anything it held), so the next call starts from a fresh one,
    /// again in the same namespace.
    pub fn with_conn<T>(&self, f: impl FnOnce(&mut Conn) -> Result<T>) -> Result<T> {
        self.with_link(|conn, _, _| f(conn))
    }

    /// [`Registry::with_conn`] with the commit record (when records are on) and the memory
    /// of the last transaction on the socket.
    fn with_link<T>(
        &self,
        f: impl FnOnce(&mut Conn, Option<(&Records, &Key)>, &mut Option<Remembered>) -> Result<T>,
    ) -> Result<T> {
        // A panic while holding the lock leaves at worst a socket with unread replies,
        // which sequence numbers already tell apart; keep going.
        let mut guard = self.link.lock().unwrap_or_else(|p| p.into_inner());
        let link = match guard.as_mut() {
            Some(link) => link,
            None => {
                let conn = self.netns.run(Conn::open)??;
                let key = match (&self.records, conn.netns_cookie()) {
                    (Some(_), Ok(cookie)) => Key::new(cookie, &self.namespace),
                    (Some(_), Err(e)) => {
                        log::debug!("no commit record: the network namespace's cookie is unavailable ({e}; Linux 5.14+)");
                        None
                    }
                    (None, _) => None,
                };
                guard.insert(Link {
                    conn,
                    key,
                    memory: None,
                })
            }
        };
        let record = match (&self.records, &link.key) {
            (Some(records), Some(key)) => Some((records, key)),
            _ => None,
        };
        let result = f(&mut link.conn, record, &mut link.memory);
        if result.is_err() {
            *guard = None;
        }
        result
    }

    /// Runs `f` in the network namespace (to create a socket or read a per-namespace file
    /// there).
    pub fn in_netns<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T> {
        self.netns.run(f)
    }

    /// Every switcheroo rule of the nat chains (of every namespace), chain by chain, top
    /// down, with roles and liveness: the generation, then four filtered dumps, unless the
    /// generation is still the one the socket's last read or transaction left (see
    /// [`transact::read_remembering`]).
    pub fn read(&self) -> Result<Vec<Rule>> {
        self.with_link(|conn, _, memory| {
            Ok(transact::read_remembering(conn, self.max_attempts, memory)?.rules)
        })
    }

    /// This namespace's rules.
    pub fn rules(&self) -> Result<Vec<Rule>> {
        let mut rules = self.read()?;
        rules.retain(|r| r.namespace == self.namespace);
        Ok(rules)
    }

    /// Applies the plan that `plan` makes from a fresh view of the chains, in one
    /// transaction (see [`Transaction::run`]).
    fn apply<T>(
        &self,
        inserts_into: Option<Routes>,
        plan: impl FnMut(&View<'_>) -> Result<(Plan, T)>,
    ) -> Result<Applied<T>> {
        self.with_link(|conn, record, memory| {
            Transaction {
                namespace: &self.namespace,
                max_attempts: self.max_attempts,
                record,
                inserts_into,
            }
            .run(conn, memory, plan)
        })
    }

    /// [`Registry::apply`], then retires what the transaction removed: SIGTERM to each
    /// owner left without a rule (after its identity check), and the connections of dead
    /// owners forgotten. Only the transaction can fail; what follows it is logged.
    pub fn transact<T>(
        &self,
        inserts_into: Option<Routes>,
        plan: impl FnMut(&View<'_>) -> Result<(Plan, T)>,
    ) -> Result<Changed<T>> {
        let applied = self.apply(inserts_into, plan)?;
        let applied_at = std::time::Instant::now();
        let mut applied = applied;
        let leaving = retire::leaving(&applied.removed, &applied.after);
        let signalled = retire::signal(&leaving, &mut applied.owners);
        let dead = retire::dead_ports(&applied.removed);
        if !dead.is_empty() {
            let forgotten = self
                .in_netns(|| {
                    dead.iter()
                        .filter(|(_, protocol, port)| bind::in_use(*protocol, *port))
                        .map(|(_, protocol, port)| (*protocol, *port))
                        .collect::<Vec<_>>()
                })
                .and_then(|rebound| {
                    self.with_conn(|conn| {
                        retire::forget_dead(conn, &dead, |protocol, port| {
                            rebound.contains(&(protocol, port))
                        });
                        Ok(())
                    })
                });
            if let Err(e) = forgotten {
                warn!("namespace {}: the transaction is done, but the connections of dead instances could not be forgotten: {e}", self.namespace);
            }
        }
        Ok(Changed {
            applied,
            applied_at,
            signalled,
        })
    }

    /// Rolls the namespace back; see [`plan::rollback`].
    pub fn rollback(&self) -> Result<Rollback> {
        let changed = self.transact(None, |view| {
            let (plan, from) = plan::rollback(view)?;
            Ok((plan, from))
        })?;
        let from = changed.applied.value.pid;
        let serving = View::new(&self.namespace, &changed.applied.after)
            .groups
            .first()
            .and_then(|g| g.serving())
            .map(|r| r.pid);
        info!(
            "namespace {}: rolled back from pid {from} to {}",
            self.namespace,
            serving.map_or("nobody".to_owned(), |p| format!("pid {p}"))
        );
        Ok(Rollback {
            from,
            removed: changed.applied.removed,
            signalled: changed.signalled,
            serving,
        })
    }

    /// Promotes the namespace's canary; see [`plan::promote`].
    pub fn promote(&self) -> Result<Promotion> {
        let changed = self.transact(None, plan::promote)?;
        let promoted = changed.applied.value.pid;
        let standby = changed
            .applied
            .remaining
            .iter()
            .find(|r| r.alive && r.pid != promoted)
            .map(|r| r.pid);
        info!(
            "namespace {}: promoted the canary pid {promoted} to active",
            self.namespace
        );
        Ok(Promotion {
            promoted,
            standby,
            removed: changed.applied.removed,
            signalled: changed.signalled,
        })
    }

    /// Deletes every rule of the namespace; returns how many there were. Nobody is
    /// signalled: the owners learn it from the ruleset if they watch it.
    pub fn cleanup(&self) -> Result<usize> {
        let applied = self.apply(None, |view| Ok((plan::cleanup(view), ())))?;
        let removed = applied.removed.len();
        if removed > 0 {
            info!("namespace {}: removed {removed} rules", self.namespace);
        }
        Ok(removed)
    }

    /// Deletes the rules of `me` and of dead owners (an instance leaving on its own).
    pub fn resign(&self, me: &Identity) -> Result<Changed<()>> {
        self.transact(None, |view| Ok((plan::resign(view, me), ())))
    }

    /// Deletes the standby's rules and those of dead owners (the end of a probation); the
    /// standby gets SIGTERM.
    pub fn end_probation(&self, standby: &[Identity]) -> Result<Changed<()>> {
        self.transact(None, |view| Ok((plan::end_probation(view, standby), ())))
    }

    /// Deletes the rules of dead owners (the instance above died).
    pub fn remove_dead(&self) -> Result<Changed<()>> {
        self.transact(None, |view| Ok((plan::remove_dead(view), ())))
    }
}
