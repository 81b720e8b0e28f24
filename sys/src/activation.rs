//! The receiving end of socket activation: sockets inherited as fds 3, 4, ...

use std::io;
use std::net::{TcpListener, UdpSocket};
use std::os::fd::{FromRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};

const LISTEN_FD: RawFd = 3;
static TAKEN: AtomicBool = AtomicBool::new(false);

/// Takes ownership of the TCP listening socket that `switcheroo run` (or systemd) passed
/// as fd 3, when `LISTEN_PID` is this process and `LISTEN_FDS` is at least 1. Returns
/// `Ok(None)` when nothing was passed, and after the first call that returned it (so fd 3
/// is never owned twice). Fails when the variables say a socket was passed but fd 3 is
/// not a listening TCP socket. Marks fd 3 close-on-exec.
pub fn take_listener() -> io::Result<Option<TcpListener>> {
    let Some(count) = passed_count() else {
        return Ok(None);
    };
    if count == 0 || TAKEN.swap(true, Ordering::SeqCst) {
        return Ok(None);
    }
    match take(LISTEN_FD)? {
        Passed::Tcp(listener) => Ok(Some(listener)),
        Passed::Udp(_) => Err(not_ours(LISTEN_FD, "is a UDP socket, not a TCP listener")),
    }
}

/// One inherited socket.
#[derive(Debug)]
pub enum Passed {
    /// A listening TCP socket.
    Tcp(TcpListener),
    /// A UDP socket.
    Udp(UdpSocket),
}

/// Takes ownership of every socket passed as fds 3 .. 3 + `LISTEN_FDS`, when `LISTEN_PID`
/// is this process, with their names from `LISTEN_FDNAMES` (colon-separated; `unknown`
/// where it names fewer). `Ok(None)` when nothing was passed, and after the first call
/// that returned them. Fails when one of them is not a listening TCP socket or a UDP
/// socket. Marks them close-on-exec.
pub fn take_sockets() -> io::Result<Option<Vec<(String, Passed)>>> {
    let Some(count) = passed_count() else {
        return Ok(None);
    };
    if count == 0 || TAKEN.swap(true, Ordering::SeqCst) {
        return Ok(None);
    }
    let names = std::env::var("LISTEN_FDNAMES").unwrap_or_default();
    let mut names = names.split(':');
    let mut out = Vec::new();
    for i in 0..count {
        let fd = LISTEN_FD + i as RawFd;
        let name = names.next().filter(|n| !n.is_empty()).unwrap_or("unknown");
        out.push((name.to_owned(), take(fd)?));
    }
    Ok(Some(out))
}

/// `LISTEN_FDS` when `LISTEN_PID` names this process.
fn passed_count() -> Option<u32> {
    let ours = std::env::var("LISTEN_PID")
        .ok()
        .and_then(|p| p.parse::<u32>().ok())
        == Some(std::process::id());
    let count = std::env::var("LISTEN_FDS")
        .ok()
        .and_then(|n| n.parse::<u32>().ok())
        .unwrap_or(0);
    // A count past the fds a process can have is not a count of ours.
    (ours && count <= 1024).then_some(count)
}

fn not_ours(fd: RawFd, what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        format!("LISTEN_FDS is set for this process but fd {fd} {what}"),
    )
}

/// Takes `fd`, checked to be a listening TCP socket or a UDP socket of an IP family.
fn take(fd: RawFd) -> io::Result<Passed> {
    // SAFETY: fstat only writes into a local stat of the right type; a closed fd yields
    // EBADF.
    let mode = unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        if libc::fstat(fd, &mut st) < 0 {
            return Err(not_ours(fd, "is not open"));
        }
        st.st_mode
    };
    if mode & libc::S_IFMT != libc::S_IFSOCK {
        return Err(not_ours(fd, "is not a socket"));
    }
    let (accepting, kind, domain) = (
        int_option(fd, libc::SO_ACCEPTCONN),
        int_option(fd, libc::SO_TYPE),
        int_option(fd, libc::SO_DOMAIN),
    );
    if domain != libc::AF_INET && domain != libc::AF_INET6 {
        return Err(not_ours(fd, "is not an IPv4 or IPv6 socket"));
    }
    let passed = match kind {
        libc::SOCK_STREAM if accepting != 0 => {
            // SAFETY: `fd` is open and a listening stream socket (checked above) that the
            // process was handed for its own use; TAKEN makes this the only owner.
            Passed::Tcp(unsafe { TcpListener::from_raw_fd(fd) })
        }
        libc::SOCK_DGRAM => {
            // SAFETY: `fd` is open and a datagram socket of an IP family (checked above),
            // handed to the process for its own use; TAKEN makes this the only owner.
            Passed::Udp(unsafe { UdpSocket::from_raw_fd(fd) })
        }
        _ => {
            return Err(not_ours(
                fd,
                "is neither a listening TCP socket nor a UDP socket",
            ))
        }
    };
    let cloexec = nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC);
    match &passed {
        Passed::Tcp(l) => nix::fcntl::fcntl(l, cloexec)?,
        Passed::Udp(u) => nix::fcntl::fcntl(u, cloexec)?,
    };
    Ok(passed)
}

/// An integer `SOL_SOCKET` option of `fd`; 0 if it cannot be read.
fn int_option(fd: RawFd, name: libc::c_int) -> libc::c_int {
    let mut value: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `value`, a local c_int.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            name,
            (&mut value as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if rc < 0 {
        0
    } else {
        value
    }
}
