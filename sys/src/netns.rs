//! Network namespace identity: the cookie the kernel gives each namespace, and whether a
//! file descriptor refers to a network namespace at all.

use nix::errno::Errno;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};

/// `SO_NETNS_COOKIE` (`asm-generic/socket.h`, Linux 5.14); the libc crate does not carry it.
const SO_NETNS_COOKIE: libc::c_int = 71;
/// `NS_GET_NSTYPE` (`linux/nsfs.h`: `_IO(0xb7, 0x3)`, Linux 4.11).
const NS_GET_NSTYPE: libc::c_ulong = 0xb703;

/// The cookie of the network namespace that `socket` belongs to (`getsockopt(SOL_SOCKET,
/// SO_NETNS_COOKIE)`): a 64-bit number the kernel hands out once per namespace from a
/// counter and never reuses until reboot. ENOPROTOOPT before Linux 5.14.
pub fn cookie(socket: BorrowedFd<'_>) -> Result<u64, Errno> {
    let mut value: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `value`, a local u64, and updates
    // `len`.
    let r = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&mut value as *mut u64).cast(),
            &mut len,
        )
    };
    Errno::result(r)?;
    if len as usize != std::mem::size_of::<u64>() {
        return Err(Errno::EINVAL);
    }
    Ok(value)
}

/// Whether `fd` refers to a network namespace (`ioctl(NS_GET_NSTYPE)` answers
/// `CLONE_NEWNET`), such as `/proc/<pid>/ns/net` or `/run/netns/<name>`. ENOTTY: not a
/// namespace file at all.
pub fn is_network_namespace(fd: impl AsFd) -> Result<bool, Errno> {
    // SAFETY: NS_GET_NSTYPE takes no argument and only returns a value.
    let r = unsafe { libc::ioctl(fd.as_fd().as_raw_fd(), NS_GET_NSTYPE as _) };
    Ok(Errno::result(r)? == libc::CLONE_NEWNET)
}
