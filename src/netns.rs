//! The network namespace a [`Switcheroo`](crate::Switcheroo) acts in, decided once.
//!
//! Rules, the commit lock and the commit record all live in one network namespace, and the
//! sockets that reach them belong to the namespace of the thread that creates them. A
//! thread can sit in any namespace (`setns(2)` moves threads one by one), so "the current
//! namespace" must not be asked again on every call: it is decided when a `Switcheroo` is
//! built, kept as an open namespace file (which also keeps the namespace alive), and every
//! socket of that `Switcheroo` is created in it.

use crate::error::{Error, Result};
use nix::sched::CloneFlags;
use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::sync::Arc;

/// The path that names the calling thread's network namespace (`/proc/self/ns/net` would
/// name the main thread's).
const THREAD_NETNS: &str = "/proc/thread-self/ns/net";

/// An open network namespace file, and the identity of the namespace while it is open.
#[derive(Debug, Clone)]
pub(crate) struct NetNs {
    fd: Arc<OwnedFd>,
    /// Device and inode of the nsfs file. While `fd` is open the namespace cannot die, so
    /// no other namespace can have this identity meanwhile (after it, the inode is reused
    /// at once, which is why nothing outlives the `NetNs` keyed by it).
    id: (u64, u64),
}

impl NetNs {
    /// The namespace of the calling thread.
    pub fn current() -> Result<NetNs> {
        let file = File::open(THREAD_NETNS).map_err(|source| Error::Netns {
            op: format!("opening {THREAD_NETNS} (switcheroo needs /proc mounted)"),
            source,
        })?;
        Self::from_fd(file.into())
    }

    /// The namespace `fd` refers to (`/run/netns/NAME`, `/proc/PID/ns/net`, ...).
    pub fn from_fd(fd: OwnedFd) -> Result<NetNs> {
        match switcheroo_sys::netns::is_network_namespace(&fd) {
            Ok(true) => {}
            Ok(false) | Err(nix::errno::Errno::ENOTTY | nix::errno::Errno::EINVAL) => {
                return Err(Error::InvalidNetns)
            }
            Err(e) => {
                return Err(Error::Netns {
                    op: "asking the kind of a namespace file (NS_GET_NSTYPE)".into(),
                    source: e.into(),
                })
            }
        }
        let meta = File::from(fd.try_clone().map_err(|source| Error::Netns {
            op: "duplicating the namespace file descriptor".into(),
            source,
        })?)
        .metadata()
        .map_err(|source| Error::Netns {
            op: "reading the namespace file's identity (fstat)".into(),
            source,
        })?;
        Ok(NetNs {
            fd: Arc::new(fd),
            id: (meta.dev(), meta.ino()),
        })
    }

    /// Whether the calling thread is in this namespace.
    fn holds_calling_thread(&self) -> Result<bool> {
        let meta = std::fs::metadata(THREAD_NETNS).map_err(|source| Error::Netns {
            op: format!("reading {THREAD_NETNS}"),
            source,
        })?;
        Ok((meta.dev(), meta.ino()) == self.id)
    }

    /// Runs `f` in this namespace: on the calling thread if it is there, else on a
    /// short-lived thread that enters it first (`setns(2)`, which needs CAP_SYS_ADMIN; the
    /// sockets `f` creates stay in the namespace whichever thread uses them later).
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T> {
        if self.holds_calling_thread()? {
            return Ok(f());
        }
        std::thread::scope(|s| {
            s.spawn(|| {
                nix::sched::setns(self.fd.as_fd(), CloneFlags::CLONE_NEWNET).map_err(|e| {
                    Error::Netns {
                        op: "entering the service's network namespace from a thread in another one (setns(2) needs CAP_SYS_ADMIN)".into(),
                        source: e.into(),
                    }
                })?;
                Ok(f())
            })
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_calling_thread_is_in_its_own_namespace() {
        let ns = NetNs::current().unwrap();
        assert!(ns.holds_calling_thread().unwrap());
        assert_eq!(ns.run(|| 7).unwrap(), 7);
    }

    #[test]
    fn a_file_that_is_not_a_network_namespace_is_refused() {
        let file = File::open("/proc/self/stat").unwrap();
        assert!(matches!(
            NetNs::from_fd(file.into()),
            Err(Error::InvalidNetns)
        ));
        let mnt = File::open("/proc/thread-self/ns/mnt").unwrap();
        assert!(matches!(
            NetNs::from_fd(mnt.into()),
            Err(Error::InvalidNetns)
        ));
    }
}
