//! The receiving end of socket activation: a listening socket inherited as fd 3.

use std::io;
use std::net::TcpListener;
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
    let ours = std::env::var("LISTEN_PID")
        .ok()
        .and_then(|p| p.parse::<u32>().ok())
        == Some(std::process::id());
    let count = std::env::var("LISTEN_FDS")
        .ok()
        .and_then(|n| n.parse::<u32>().ok())
        .unwrap_or(0);
    if !ours || count == 0 || TAKEN.swap(true, Ordering::SeqCst) {
        return Ok(None);
    }
    let not_a_listener = |what: &str| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("LISTEN_FDS is set for this process but fd 3 {what}"),
        )
    };
    // SAFETY: fstat only writes into a local stat of the right type; a closed fd yields
    // EBADF.
    let mode = unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        if libc::fstat(LISTEN_FD, &mut st) < 0 {
            return Err(not_a_listener("is not open"));
        }
        st.st_mode
    };
    let (accepting, kind, domain) = (
        int_option(libc::SO_ACCEPTCONN),
        int_option(libc::SO_TYPE),
        int_option(libc::SO_DOMAIN),
    );
    if mode & libc::S_IFMT != libc::S_IFSOCK {
        return Err(not_a_listener("is not a socket"));
    }
    if accepting == 0 || kind != libc::SOCK_STREAM {
        return Err(not_a_listener("is not a listening stream socket"));
    }
    if domain != libc::AF_INET && domain != libc::AF_INET6 {
        return Err(not_a_listener("is not a TCP socket"));
    }
    // SAFETY: fd 3 is open and a listening stream socket (checked above) that the process
    // was handed for its own use; TAKEN makes this the only owner.
    let listener = unsafe { TcpListener::from_raw_fd(LISTEN_FD) };
    nix::fcntl::fcntl(
        &listener,
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
    )?;
    Ok(Some(listener))
}

/// An integer `SOL_SOCKET` option of fd 3; 0 if it cannot be read.
fn int_option(name: libc::c_int) -> libc::c_int {
    let mut value: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `value`, a local c_int.
    let rc = unsafe {
        libc::getsockopt(
            LISTEN_FD,
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
