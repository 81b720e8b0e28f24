//! Waiting for SIGTERM/SIGINT without a signal handler.

use crate::error::{Error, Result};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use std::os::fd::{AsFd, BorrowedFd};

/// SIGTERM and SIGINT, blocked and read from a signalfd (`signalfd(2)`), so a std program
/// can wait for them on one thread without a handler, alone ([`Shutdown::wait`]) or
/// together with other file descriptors (it is [`AsFd`]; [`Shutdown::try_take`] reads one
/// when it is readable), e.g. in [`Tenure::wait`](crate::Tenure::wait).
///
/// Call [`Shutdown::install`] first in `main`, before starting threads: the signal mask is
/// per thread and inherited, so threads started afterwards leave the signals pending for
/// the signalfd. (Async programs use their runtime's signal support instead.)
#[derive(Debug)]
pub struct Shutdown {
    fd: SignalFd,
}

impl Shutdown {
    /// Blocks SIGTERM and SIGINT in the calling thread (`pthread_sigmask(2)`) and opens a
    /// signalfd for them.
    pub fn install() -> Result<Shutdown> {
        let mut set = SigSet::empty();
        set.add(Signal::SIGTERM);
        set.add(Signal::SIGINT);
        set.thread_block().map_err(|errno| Error::Signal {
            op: "blocking SIGTERM and SIGINT",
            errno,
        })?;
        let fd = SignalFd::with_flags(&set, SfdFlags::SFD_CLOEXEC | SfdFlags::SFD_NONBLOCK)
            .map_err(|errno| Error::Signal {
                op: "opening a signalfd for SIGTERM and SIGINT",
                errno,
            })?;
        Ok(Shutdown { fd })
    }

    /// Waits until SIGTERM or SIGINT arrives and returns its number.
    pub fn wait(&self) -> i32 {
        loop {
            if let Some(signal) = self.try_take() {
                return signal;
            }
            let mut fds = [nix::poll::PollFd::new(
                self.fd.as_fd(),
                nix::poll::PollFlags::POLLIN,
            )];
            // EINTR or a spurious wake-up: read again.
            let _ = nix::poll::poll(&mut fds, nix::poll::PollTimeout::NONE);
        }
    }

    /// The pending SIGTERM or SIGINT, if one has arrived; never blocks.
    pub fn try_take(&self) -> Option<i32> {
        match self.fd.read_signal() {
            Ok(Some(info)) => Some(info.ssi_signo as i32),
            _ => None,
        }
    }
}

impl AsFd for Shutdown {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}
