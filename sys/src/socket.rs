//! The netlink socket itself: libmnl's `mnl_socket`, opened close-on-exec.
//!
//! The `mnl` crate's `Socket` opens without `SOCK_CLOEXEC`, so a program that forks and
//! executes a child (a server starting workers, a test starting a process) would hand the
//! child a copy of the socket. Besides the leak, anything the socket owns (the commit
//! lock is a table owned by it) would then live as long as the child, not as long as the
//! process that took it. So the socket is opened here with `mnl_socket_open2`.

use std::io;
use std::os::fd::BorrowedFd;
use std::ptr::NonNull;

use mnl::mnl_sys;

/// An open, bound `NETLINK_NETFILTER` socket; closed on drop.
#[derive(Debug)]
pub(crate) struct NetlinkSocket(NonNull<mnl_sys::mnl_socket>);

// SAFETY: the socket is an fd with libmnl's small struct around it (the fd and the bound
// address); nothing in it is tied to the thread that opened it, and the owner uses it
// through `&`/`&mut` only, so moving it to another thread is sound.
unsafe impl Send for NetlinkSocket {}

impl NetlinkSocket {
    /// `socket(AF_NETLINK, SOCK_RAW | SOCK_CLOEXEC, NETLINK_NETFILTER)`, then `bind(2)`
    /// with a port id chosen by the kernel.
    pub fn open_netfilter() -> io::Result<Self> {
        Self::open_netfilter_groups(0)
    }

    /// The same, subscribed to the multicast `groups` (a bit mask, `1 << (group - 1)`).
    pub fn open_netfilter_groups(groups: u32) -> io::Result<Self> {
        // SAFETY: plain arguments; returns an owned socket or NULL with errno set.
        let raw = unsafe { mnl_sys::mnl_socket_open2(libc::NETLINK_NETFILTER, libc::SOCK_CLOEXEC) };
        let socket = NonNull::new(raw)
            .map(NetlinkSocket)
            .ok_or_else(io::Error::last_os_error)?;
        // SAFETY: the socket is open; bind takes groups and the port id by value.
        let r = unsafe {
            mnl_sys::mnl_socket_bind(socket.0.as_ptr(), groups, mnl_sys::MNL_SOCKET_AUTOPID)
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(socket)
    }

    /// The socket's file descriptor, for socket options.
    pub fn fd(&self) -> BorrowedFd<'_> {
        // SAFETY: the socket is open for the lifetime of `self`; get_fd only reads it.
        let fd = unsafe { mnl_sys::mnl_socket_get_fd(self.0.as_ptr()) };
        // SAFETY: `fd` stays open while `self` is borrowed.
        unsafe { BorrowedFd::borrow_raw(fd) }
    }

    /// The port id the kernel bound the socket to.
    pub fn portid(&self) -> u32 {
        // SAFETY: the socket is open; the call only reads the bound address.
        unsafe { mnl_sys::mnl_socket_get_portid(self.0.as_ptr()) }
    }

    /// Sends one buffer to the kernel (`sendto(2)`); the number of bytes sent.
    pub fn send(&self, data: &[u8]) -> io::Result<usize> {
        // SAFETY: the socket is open; `data` is valid for reads of `data.len()` bytes.
        let n = unsafe {
            mnl_sys::mnl_socket_sendto(self.0.as_ptr(), data.as_ptr().cast(), data.len())
        };
        usize::try_from(n).map_err(|_| io::Error::last_os_error())
    }

    /// Receives one datagram from the kernel into `buf` (`recvfrom(2)`); its length.
    pub fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: the socket is open; `buf` is valid for writes of `buf.len()` bytes.
        let n = unsafe {
            mnl_sys::mnl_socket_recvfrom(self.0.as_ptr(), buf.as_mut_ptr().cast(), buf.len())
        };
        usize::try_from(n).map_err(|_| io::Error::last_os_error())
    }
}

impl Drop for NetlinkSocket {
    fn drop(&mut self) {
        // SAFETY: we own the socket, and it is closed exactly once, here.
        unsafe { mnl_sys::mnl_socket_close(self.0.as_ptr()) };
    }
}
