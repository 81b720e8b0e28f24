//! The state of a listening TCP socket, read without accepting from it.

use nix::errno::Errno;
use std::os::fd::{AsFd, AsRawFd};

/// `TCP_LISTEN` of the kernel's TCP state enum (`include/net/tcp_states.h`).
const TCP_LISTEN: u8 = 10;

/// The number of connections waiting in the accept queue of a listening TCP socket.
///
/// Linux reports it in `tcpi_unacked` of `getsockopt(TCP_INFO)` when the socket is in
/// LISTEN state (`tcpi_sacked` then holds the backlog limit). ENOTSOCK/ENOPROTOOPT: not a
/// TCP socket.
pub fn accept_queue_len(listener: &impl AsFd) -> Result<u32, Errno> {
    // SAFETY: tcp_info is plain integers; all zeros is a valid value.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: `info` and `len` are valid for writes of `len` bytes; the kernel writes at most
    // `len` bytes and updates `len`.
    let r = unsafe {
        libc::getsockopt(
            listener.as_fd().as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        )
    };
    Errno::result(r)?;
    if info.tcpi_state != TCP_LISTEN {
        return Err(Errno::EINVAL);
    }
    Ok(info.tcpi_unacked)
}
