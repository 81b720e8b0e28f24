//! Process handles that cannot be confused with a later process of the same pid
//! (`pidfd_open(2)`, `pidfd_send_signal(2)`), and the socket option the netlink socket needs.

use nix::errno::Errno;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

/// A pidfd: a file descriptor that refers to one process for as long as it is open, even
/// after that process exits and its pid is reused.
#[derive(Debug)]
pub struct PidFd(OwnedFd);

impl PidFd {
    /// `pidfd_open(pid, 0)`. ESRCH: no such process. ENOSYS: the kernel is older than 5.3
    /// (the caller falls back to a pid-based check).
    pub fn open(pid: u32) -> Result<Self, Errno> {
        let pid = libc::pid_t::try_from(pid).map_err(|_| Errno::ESRCH)?;
        // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1; it touches
        // no memory of ours.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0 as libc::c_uint) };
        let fd = Errno::result(fd)?;
        let fd = libc::c_int::try_from(fd).map_err(|_| Errno::EBADF)?;
        // SAFETY: the syscall succeeded, so `fd` is a new descriptor that nothing else owns.
        Ok(PidFd(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    /// `pidfd_send_signal(fd, sig, NULL, 0)`: signals exactly the process this pidfd refers
    /// to. ESRCH: it has exited.
    pub fn send_signal(&self, signal: libc::c_int) -> Result<(), Errno> {
        // SAFETY: a valid pidfd, a signal number, a NULL siginfo (allowed: the kernel fills
        // in a default) and no flags.
        let r = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                self.0.as_raw_fd(),
                signal,
                std::ptr::null::<libc::siginfo_t>(),
                0 as libc::c_uint,
            )
        };
        Errno::result(r).map(drop)
    }
}

impl std::os::fd::AsFd for PidFd {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        std::os::fd::AsFd::as_fd(&self.0)
    }
}

/// `SO_RCVTIMEO` on the netlink socket, so a lost reply becomes EAGAIN instead of a hang.
pub(crate) fn set_recv_timeout(
    fd: std::os::fd::BorrowedFd<'_>,
    timeout: Duration,
) -> Result<(), Errno> {
    let tv = nix::sys::time::TimeVal::new(
        timeout.as_secs() as libc::time_t,
        timeout.subsec_micros() as libc::suseconds_t,
    );
    nix::sys::socket::setsockopt(&fd, nix::sys::socket::sockopt::ReceiveTimeout, &tv)
}
