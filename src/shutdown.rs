//! Waiting for SIGTERM/SIGINT without a signal handler.

use crate::{Error, Result};
use nix::sys::signal::{SigSet, Signal};

/// SIGTERM and SIGINT, blocked and waited for synchronously (`sigwait(3)`), so a std
/// program can wait for them on one thread without a handler.
///
/// Call [`Shutdown::install`] first in `main`, before starting threads: the signal mask is
/// per thread and inherited, so threads started afterwards leave the signals pending for
/// [`Shutdown::wait`]. (Async programs use their runtime's signal support instead.)
#[derive(Debug)]
pub struct Shutdown {
    set: SigSet,
}

impl Shutdown {
    /// Blocks SIGTERM and SIGINT in the calling thread (`pthread_sigmask(2)`).
    pub fn install() -> Result<Shutdown> {
        let mut set = SigSet::empty();
        set.add(Signal::SIGTERM);
        set.add(Signal::SIGINT);
        set.thread_block().map_err(|errno| Error::Signal {
            op: "blocking SIGTERM and SIGINT",
            errno,
        })?;
        Ok(Shutdown { set })
    }

    /// Waits until SIGTERM or SIGINT is pending and returns its number.
    pub fn wait(&self) -> i32 {
        loop {
            // sigwait fails only for an invalid set, which this is not.
            if let Ok(signal) = self.set.wait() {
                return signal as i32;
            }
        }
    }
}
