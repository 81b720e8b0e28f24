//! Serialising the transactions of one namespace.
//!
//! Two instances of a namespace that commit at the same moment must not both insert
//! without seeing each other. The ruleset generation would catch that, but binding every
//! batch to the generation lets any busy foreign writer (a tight netlink loop changes it
//! every few microseconds) starve us. Instead, the instances of a namespace take turns on a
//! lock, and the lock is an object of the ruleset itself: an empty `inet` table named
//! `switcheroo-lock-<namespace>`, created owned by the committing socket
//! (`NFT_TABLE_F_OWNER`, Linux 5.12). So
//!
//! - only a process with CAP_NET_ADMIN in the network namespace can hold it, the same
//!   privilege a commit needs (an unprivileged user can neither create nor delete it);
//! - the kernel refuses every other socket to touch it and `nft flush ruleset` skips it;
//! - it belongs to the same network namespace as the rules, whichever thread asks;
//! - the kernel deletes it when its socket closes, so a holder killed at any instant
//!   releases it;
//! - the commit batch deletes it as its last operation: the release is part of the
//!   transaction.
//!
//! A commit's first attempt does not wait for the lock: its batch creates the lock table
//! as its first operation and deletes it as its last, and is bound to the generation of
//! its read. The kernel refuses it whole if another socket holds the lock or anything
//! changed since the read; only then is the lock taken in a transaction of its own, as
//! above, and held across the next read.
//!
//! Foreign writers need no lock: our batch deletes only handles it read and inserts at the
//! head, so they cannot make it do anything wrong, only fail (ENOENT) and retry. On a
//! kernel without owned tables (before 5.12) there is no lock, and every batch is bound to
//! the generation instead: correct, but a busy foreign writer can then slow a commit down.

use crate::error::{Error, Result};
use log::{debug, warn};
use nix::errno::Errno;
use std::time::{Duration, Instant};
use switcheroo_sys::{Batch, Conn, Op, OwnedTable};

/// How long a commit waits for another instance of its namespace. A commit holds the lock
/// for about a millisecond (longer only while dumping chains of many thousand rules);
/// waiting this long means the holder is stopped or hung.
const WAIT: Duration = Duration::from_secs(10);

/// The outcome of taking the lock.
#[derive(Debug)]
pub(crate) enum Lock {
    /// Held through this table; the transaction's batch deletes it.
    Held(OwnedTable),
    /// This kernel has no owned tables: batches must be bound to the generation.
    Unavailable,
}

impl Lock {
    /// The table that is the lock of `namespace`.
    pub fn table(namespace: &str) -> Result<OwnedTable> {
        Ok(OwnedTable::new(format!("switcheroo-lock-{namespace}"))?)
    }

    /// The operations that take and release the lock of `namespace` inside one batch, at
    /// its start and its end: the batch is refused whole while another socket holds the
    /// lock, and leaves it free.
    pub fn within_batch(namespace: &str) -> Result<(Op, Op)> {
        let table = Lock::table(namespace)?;
        Ok((
            Op::AddOwnedTable(table.clone()),
            Op::DeleteOwnedTable(table),
        ))
    }

    /// Takes the lock of `namespace` on `conn`, waiting up to [`WAIT`] while another
    /// socket holds it. Returns how long it waited for the other holder: zero when the
    /// lock was free.
    pub fn acquire(conn: &mut Conn, namespace: &str) -> Result<(Lock, Duration)> {
        let table = Lock::table(namespace)?;
        let mut batch = Batch::new(None);
        batch.push(Op::AddOwnedTable(table.clone()));
        let started = Instant::now();
        let mut waited = false;
        loop {
            match conn.apply(&batch) {
                Ok(_) if !waited => return Ok((Lock::Held(table), Duration::ZERO)),
                Ok(_) => {
                    let waited = started.elapsed();
                    debug!("namespace {namespace}: lock acquired after {waited:?}");
                    return Ok((Lock::Held(table), waited));
                }
                Err(e) if e.is_held() => {
                    waited = true;
                    if started.elapsed() > WAIT {
                        warn!("namespace {namespace}: another instance has held the commit lock for {WAIT:?}");
                        return Err(Error::Busy {
                            namespace: namespace.to_owned(),
                            waited: started.elapsed(),
                        });
                    }
                    std::thread::sleep(Duration::from_micros(rand::random_range(200..=1000)));
                }
                Err(switcheroo_sys::Error::Kernel {
                    errno: Errno::EOPNOTSUPP,
                    ..
                }) => {
                    debug!("namespace {namespace}: no owned tables in this kernel (before Linux 5.12); binding batches to the generation instead of locking");
                    return Ok((Lock::Unavailable, started.elapsed()));
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// The operation that releases the lock, for the end of a batch.
    pub fn release_op(&self) -> Option<Op> {
        match self {
            Lock::Held(table) => Some(Op::DeleteOwnedTable(table.clone())),
            Lock::Unavailable => None,
        }
    }

    /// Releases the lock on its own, when no batch of the transaction was applied.
    pub fn release(self, conn: &mut Conn) -> Result<()> {
        if let Some(op) = self.release_op() {
            let mut batch = Batch::new(None);
            batch.push(op);
            conn.apply(&batch)?;
        }
        Ok(())
    }

    /// Whether batches must carry the generation they were computed at.
    pub fn needs_generation(&self) -> bool {
        matches!(self, Lock::Unavailable)
    }
}
