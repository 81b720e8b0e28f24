//! How the command ends: every exit status, decided in one place.

use nix::sys::wait::WaitStatus;
use std::process::ExitCode;

/// Why the command ends. [`Exit::code`] is the one place exit statuses are decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// Done as asked (`status`, `cleanup`, `rollback`, `promote`; `check` found no blocker).
    Success,
    /// An error of switcheroo itself (permissions, netfilter, a switch that failed, nothing
    /// to roll back to, a blocker found by `check`): nothing was changed.
    Failed,
    /// Bad arguments: nothing was started or changed.
    Usage,
    /// `run`: the new server never became ready (it failed to start, exited, timed out, or
    /// `run` was told to stop first): nothing was switched.
    NotReady,
    /// `run`: this instance was rolled back; the previous one serves again.
    RolledBack,
    /// `run`: the server ended after serving, with this status.
    Server(WaitStatus),
}

impl Exit {
    /// The exit status: 0, 1, 2, 3, 4, or the server's own (128 + the signal that killed
    /// it, as shells report it).
    pub fn code(self) -> u8 {
        match self {
            Exit::Success => 0,
            Exit::Failed => 1,
            Exit::Usage => 2,
            Exit::NotReady => 3,
            Exit::RolledBack => 4,
            Exit::Server(WaitStatus::Exited(_, code)) => code as u8,
            Exit::Server(WaitStatus::Signaled(_, signal, _)) => 128u8.wrapping_add(signal as u8),
            // Stopped or traced servers are never reported as ended.
            Exit::Server(_) => 1,
        }
    }
}

impl From<Exit> for ExitCode {
    fn from(exit: Exit) -> ExitCode {
        ExitCode::from(exit.code())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::signal::Signal;
    use nix::unistd::Pid;

    #[test]
    fn every_way_to_end_has_its_status() {
        let pid = Pid::from_raw(1);
        let table = [
            (Exit::Success, 0),
            (Exit::Failed, 1),
            (Exit::Usage, 2),
            (Exit::NotReady, 3),
            (Exit::RolledBack, 4),
            (Exit::Server(WaitStatus::Exited(pid, 0)), 0),
            (Exit::Server(WaitStatus::Exited(pid, 42)), 42),
            (
                Exit::Server(WaitStatus::Signaled(pid, Signal::SIGKILL, false)),
                137,
            ),
            (
                Exit::Server(WaitStatus::Signaled(pid, Signal::SIGTERM, false)),
                143,
            ),
        ];
        for (exit, code) in table {
            assert_eq!(exit.code(), code, "{exit:?}");
        }
    }
}
