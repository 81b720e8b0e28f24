//! The process behind a rule: is it alive, is it still the process that wrote the rule, and
//! terminating it only then.

use crate::comment::Identity;
use crate::process::Stat;
use log::{info, warn};
use nix::errno::Errno;
use std::collections::HashMap;
use std::sync::Mutex;
use switcheroo_sys::PidFd;

/// The start time of `pid` (field 22 of `/proc/<pid>/stat`), if it runs: a process that
/// has exited but is not reaped yet (a zombie, e.g. under a PID 1 that does not reap) does
/// not run.
pub(crate) fn start_time(pid: u32) -> Option<u64> {
    Stat::of(pid)
        .ok()
        .filter(Stat::running)
        .map(|s| s.start_time)
}

/// This process, as its rules name it. Read once per process: a pid and its start time
/// never change (a forked child has another pid, and reads its own).
pub(crate) fn this_process() -> (u32, Option<u64>) {
    static CACHE: Mutex<Option<(u32, Option<u64>)>> = Mutex::new(None);
    let pid = std::process::id();
    let mut cache = CACHE.lock().unwrap_or_else(|p| p.into_inner());
    match *cache {
        Some((cached, start)) if cached == pid => (pid, start),
        _ => {
            let me = (pid, start_time(pid));
            *cache = Some(me);
            me
        }
    }
}

/// Whether the process named by `id` runs, given its start time `now` (`None`: no such
/// running process). Rules without a start time (the Go original's) count as alive when the
/// pid runs.
pub(crate) fn matches(id: &Identity, now: Option<u64>) -> bool {
    match (now, id.start) {
        (Some(now), Some(then)) => now == then,
        (Some(_), None) => true,
        (None, _) => false,
    }
}

/// Whether the process named by a rule is running: same pid and, when the rule records
/// one, same start time.
pub(crate) fn is_alive(id: &Identity) -> bool {
    matches(id, start_time(id.pid))
}

/// The owners named by one read of the ruleset, each looked at once however many rules name
/// it (an instance has a rule per port, chain and family): a pidfd opened first, then one
/// read of `/proc/<pid>/stat`. While the pidfd is held it names that very process, so a
/// later signal needs no second look (see [`Owners::terminate`]).
#[derive(Debug, Default)]
pub(crate) struct Owners {
    seen: HashMap<u32, Seen>,
}

/// One pid as a read found it.
#[derive(Debug)]
struct Seen {
    /// Its start time, if it ran when it was read.
    start: Option<u64>,
    /// A pidfd opened before that read (none for this process, or without pidfds).
    fd: Option<PidFd>,
}

impl Owners {
    fn look(&mut self, pid: u32) -> &Seen {
        self.seen.entry(pid).or_insert_with(|| {
            let (me, start) = this_process();
            if pid == me {
                return Seen { start, fd: None };
            }
            // Opened first, read second: the start time read is that of the process the
            // pidfd names (a pid reused in between shows another start time).
            let fd = PidFd::open(pid).ok();
            Seen {
                start: start_time(pid),
                fd,
            }
        })
    }

    /// Whether `id`'s process runs (see [`is_alive`]). This process is alive without a
    /// look at `/proc`.
    pub fn is_alive(&mut self, id: &Identity) -> bool {
        matches(id, self.look(id.pid).start)
    }

    /// [`terminate`] for an owner this read looked at: through the pidfd it opened before
    /// it read the start time, so without reading it again.
    pub fn terminate(&mut self, id: &Identity) -> Termination {
        if id.pid == std::process::id() {
            return Termination::Myself;
        }
        let Some(expected) = id.start else {
            return Termination::Unverifiable;
        };
        let seen = self.look(id.pid);
        match (seen.start, &seen.fd) {
            (None, _) => Termination::Gone,
            (Some(now), _) if now != expected => Termination::Reused,
            (Some(_), Some(fd)) => match fd.send_signal(SIGTERM) {
                Ok(()) => Termination::Signalled,
                Err(Errno::ESRCH) => Termination::Gone,
                Err(e) => Termination::Failed(e),
            },
            // No pidfd (before Linux 5.3): the check and the signal the long way.
            (Some(_), None) => terminate(id),
        }
    }
}

const SIGTERM: i32 = nix::sys::signal::Signal::SIGTERM as i32;

/// What happened when the owner of a removed rule was to be terminated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Termination {
    /// SIGTERM was delivered to the process that wrote the rule.
    Signalled,
    /// The process had already exited.
    Gone,
    /// The pid now belongs to another process, which was left alone.
    Reused,
    /// The rule records no start time (the Go original's format): not signalled.
    Unverifiable,
    /// The rule names the calling process itself: never signalled.
    Myself,
    /// Signalling failed (e.g. EPERM without CAP_KILL for another user's process).
    Failed(Errno),
}

/// Sends SIGTERM to the process that wrote a rule, after checking it is that process.
///
/// With a pidfd (Linux 5.3+) the check and the signal refer to the same process: the pidfd
/// is opened first, then the start time of the pid is compared; if the pid was reused in
/// between, the start time differs, and if the process exits after the check, the signal
/// fails with ESRCH instead of reaching a newcomer. Without pidfds the same check is done
/// with `kill(2)`, which leaves a window of microseconds in which the pid could be reused.
pub(crate) fn terminate(id: &Identity) -> Termination {
    if id.pid == std::process::id() {
        return Termination::Myself;
    }
    let Some(expected) = id.start else {
        return Termination::Unverifiable;
    };
    let pidfd = match PidFd::open(id.pid) {
        Ok(fd) => Some(fd),
        Err(Errno::ESRCH) => return Termination::Gone,
        Err(Errno::ENOSYS) => None,
        Err(e) => return Termination::Failed(e),
    };
    match start_time(id.pid) {
        None => return Termination::Gone,
        Some(now) if now != expected => return Termination::Reused,
        Some(_) => {}
    }
    let sent = match &pidfd {
        Some(fd) => fd.send_signal(SIGTERM),
        None => nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(id.pid as i32),
            nix::sys::signal::Signal::SIGTERM,
        ),
    };
    match sent {
        Ok(()) => Termination::Signalled,
        Err(Errno::ESRCH) => Termination::Gone,
        Err(e) => Termination::Failed(e),
    }
}

/// SIGTERMs each of `leaving`, after its identity check (through `owners`, the read that
/// found them); returns the pids signalled.
pub(crate) fn terminate_all(leaving: &[Identity], owners: &mut Owners) -> Vec<u32> {
    let mut signalled = Vec::new();
    for id in leaving {
        match owners.terminate(id) {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_has_a_start_time_and_is_alive() {
        let (pid, start) = this_process();
        assert!(start.is_some());
        let id = Identity {
            namespace: "t".into(),
            port: 1,
            pid,
            start,
        };
        assert!(is_alive(&id));
        assert!(Owners::default().is_alive(&id));
        assert_eq!(terminate(&id), Termination::Myself);
        assert_eq!(Owners::default().terminate(&id), Termination::Myself);
        let older = Identity {
            start: start.map(|s| s + 1),
            ..id
        };
        assert!(!is_alive(&older));
    }

    #[test]
    fn an_owner_read_once_is_signalled_through_its_pidfd_and_a_reused_pid_is_not() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let pid = child.id();
        let start = start_time(pid);
        let id = |start| Identity {
            namespace: "t".into(),
            port: 1,
            pid,
            start,
        };
        let mut owners = Owners::default();
        assert!(owners.is_alive(&id(start)));
        assert_eq!(
            owners.terminate(&id(start.map(|s| s + 1))),
            Termination::Reused
        );
        assert_eq!(owners.terminate(&id(None)), Termination::Unverifiable);
        assert_eq!(owners.terminate(&id(start)), Termination::Signalled);
        let status = child.wait().unwrap();
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(status.signal(), Some(15));
    }

    #[test]
    fn an_owner_matches_by_start_time_when_the_rule_has_one() {
        let id = |start| Identity {
            namespace: "t".into(),
            port: 1,
            pid: 7,
            start,
        };
        assert!(matches(&id(Some(5)), Some(5)));
        assert!(!matches(&id(Some(5)), Some(6)), "the pid was reused");
        assert!(!matches(&id(Some(5)), None), "no such process");
        assert!(matches(&id(None), Some(6)), "the Go original's rule");
        assert!(!matches(&id(None), None));
    }
}
