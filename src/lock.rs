//! Serialising the transactions of one namespace.
//!
//! Two instances of a namespace that commit at the same moment must not both insert
//! without seeing each other. The ruleset generation would catch that, but binding every
//! batch to the generation lets any busy foreign writer (a tight netlink loop changes it
//! every few microseconds) starve us. Instead, the instances of a namespace take turns: the
//! lock is an abstract unix socket, `@switcheroo/<namespace>`, which the kernel scopes to the
//! network namespace (the same one the rules live in) and releases when its holder exits,
//! crashed or not. Foreign writers need no lock: our batch deletes only handles it read and
//! inserts at the head, so they cannot make it do anything wrong, only fail (ENOENT) and
//! retry.

use crate::{Error, Result};
use log::{debug, warn};
use std::io;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixListener};
use std::time::{Duration, Instant};

/// How long a commit waits for another instance of its namespace. A commit holds the lock
/// for well under a millisecond; waiting this long means the holder is stuck (stopped or
/// hung in the kernel).
const WAIT: Duration = Duration::from_secs(10);

/// The held lock; released on drop.
#[derive(Debug)]
pub(crate) struct NamespaceLock(#[allow(dead_code)] UnixListener);

impl NamespaceLock {
    pub fn acquire(namespace: &str) -> Result<NamespaceLock> {
        let name = format!("switcheroo/{namespace}");
        let addr = SocketAddr::from_abstract_name(name.as_bytes())
            .map_err(|e| lock_error(namespace, e))?;
        let started = Instant::now();
        let mut waited = false;
        loop {
            match UnixListener::bind_addr(&addr) {
                Ok(sock) => {
                    if waited {
                        debug!(
                            "namespace {namespace}: lock acquired after {:?}",
                            started.elapsed()
                        );
                    }
                    return Ok(NamespaceLock(sock));
                }
                Err(e) if e.kind() == io::ErrorKind::AddrInUse => {
                    if started.elapsed() > WAIT {
                        warn!("namespace {namespace}: another instance has held the commit lock for {WAIT:?}");
                        return Err(Error::Busy {
                            namespace: namespace.to_owned(),
                            waited: WAIT,
                        });
                    }
                    waited = true;
                    std::thread::sleep(Duration::from_micros(rand::random_range(200..=1000)));
                }
                Err(e) => return Err(lock_error(namespace, e)),
            }
        }
    }
}

fn lock_error(namespace: &str, source: io::Error) -> Error {
    Error::Lock {
        namespace: namespace.to_owned(),
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lock_is_exclusive_and_released_on_drop() {
        let ns = format!("locktest-{}", std::process::id());
        let held = NamespaceLock::acquire(&ns).unwrap();
        let addr = SocketAddr::from_abstract_name(format!("switcheroo/{ns}").as_bytes()).unwrap();
        assert_eq!(
            UnixListener::bind_addr(&addr).unwrap_err().kind(),
            io::ErrorKind::AddrInUse
        );
        drop(held);
        NamespaceLock::acquire(&ns).unwrap();
    }
}
