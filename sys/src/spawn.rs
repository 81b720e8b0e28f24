//! Starting a child process that inherits sockets as fds 3, 4, ..., the way systemd's
//! socket activation hands them over (`LISTEN_FDS`, `LISTEN_PID`, `LISTEN_FDNAMES`).
//!
//! `LISTEN_PID` must name the child itself, which only the child knows, and the sockets
//! must land on fds 3, 4, ... without a copy left anywhere else; `std::process::Command` can do
//! neither without `pre_exec`. So this is a small fork/exec of its own: everything that
//! allocates (argument and environment arrays, the resolved path) is prepared before
//! `fork`, and the child calls only async-signal-safe functions until `execve`.

use nix::unistd::Pid;
use std::ffi::{CString, OsStr, OsString};
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// The fd the first activated socket lands on (`SD_LISTEN_FDS_START`).
pub const LISTEN_FD: RawFd = 3;
/// The most sockets one child is given.
pub const MAX_SOCKETS: usize = 64;

const PID_PREFIX: &[u8] = b"LISTEN_PID=";
/// Room for the prefix, the longest pid in decimal and the NUL.
const PID_VAR_LEN: usize = PID_PREFIX.len() + 20 + 1;

/// A program to start with sockets on fds 3, 4, ...
#[derive(Debug)]
pub struct Activation {
    program: OsString,
    args: Vec<OsString>,
    env: Vec<(OsString, OsString)>,
}

impl Activation {
    /// `program` with `args` (not including argv\[0\], which is `program`), looked up in
    /// `PATH` of `env` unless it contains a `/`.
    pub fn new(program: impl Into<OsString>, args: Vec<OsString>) -> Self {
        Activation {
            program: program.into(),
            args,
            env: Vec::new(),
        }
    }

    /// The whole environment of the child, in order. `LISTEN_FDS` and `LISTEN_PID` are
    /// added; any `LISTEN_PID` or `LISTEN_FDS` given here is dropped.
    pub fn env(mut self, env: Vec<(OsString, OsString)>) -> Self {
        self.env = env;
        self
    }

    /// Forks, puts `sockets` on fds 3, 4, ... in the child, in order (clearing
    /// close-on-exec there only) and sets `LISTEN_FDS` to their number and `LISTEN_PID`
    /// to the child's pid (without sockets: neither, and no `LISTEN_*` variable at all),
    /// unblocks every signal, restores SIGPIPE's default action, asks for SIGTERM should
    /// this process die first (so an orphan never keeps serving unseen), clears the
    /// ambient capabilities, marks every other fd above them close-on-exec, and executes
    /// the program. Returns once the program runs, or the reason it could not.
    pub fn spawn(&self, sockets: &[BorrowedFd<'_>]) -> io::Result<Pid> {
        if sockets.len() > MAX_SOCKETS {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{} sockets: at most {MAX_SOCKETS} can be passed",
                    sockets.len()
                ),
            ));
        }
        let path = resolve(&self.program, &self.env)?;
        let path = cstring(path.as_os_str())?;
        let mut argv = vec![cstring(&self.program)?];
        for arg in &self.args {
            argv.push(cstring(arg)?);
        }
        let mut envp = Vec::with_capacity(self.env.len() + 2);
        for (key, value) in &self.env {
            if key == "LISTEN_PID"
                || key == "LISTEN_FDS"
                || (sockets.is_empty() && key == "LISTEN_FDNAMES")
            {
                continue;
            }
            let mut var = key.as_bytes().to_vec();
            var.push(b'=');
            var.extend_from_slice(value.as_bytes());
            envp.push(CString::new(var).map_err(|_| nul_error())?);
        }
        let mut pid_var = [0u8; PID_VAR_LEN];
        pid_var[..PID_PREFIX.len()].copy_from_slice(PID_PREFIX);
        if !sockets.is_empty() {
            let count = format!("LISTEN_FDS={}", sockets.len());
            envp.push(CString::new(count).expect("no NUL"));
        }

        let argv_ptrs: Vec<*const libc::c_char> = argv
            .iter()
            .map(|a| a.as_ptr())
            .chain(std::iter::once(std::ptr::null()))
            .collect();
        let mut envp_ptrs: Vec<*const libc::c_char> = envp.iter().map(|e| e.as_ptr()).collect();
        if !sockets.is_empty() {
            envp_ptrs.push(pid_var.as_ptr().cast());
        }
        envp_ptrs.push(std::ptr::null());

        // fds 3 .. 3 + n are about to be replaced in the child: every fd it still needs
        // moves above them first, so that no dup2 there overwrites a source.
        let first_free = LISTEN_FD + sockets.len() as RawFd;
        let sources: Vec<OwnedFd> = sockets
            .iter()
            .map(|fd| dup_at_least(*fd, first_free))
            .collect::<io::Result<_>>()?;
        let source_fds: Vec<RawFd> = sources.iter().map(AsRawFd::as_raw_fd).collect();
        // The child reports a failed execve through this pipe; a successful one closes it.
        let (report_read, pipe_write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
        let report_write = dup_at_least(pipe_write.as_fd(), first_free)?;
        // Only the copy goes to the child; no other write end may stay open here, or the
        // read below would wait for an EOF that never comes.
        drop(pipe_write);
        let write_fd = report_write.as_raw_fd();
        let parent = std::process::id();

        // SAFETY: between fork and execve/_exit the child only calls async-signal-safe
        // functions (dup2, getpid, sigprocmask, signal, prctl, getppid, kill,
        // syscall(close_range), execve, write, _exit) on memory prepared before the fork and
        // not freed until after it returns in the parent (`path`, `argv`, `envp` and their
        // pointer arrays, `source_fds`, `pid_var`), and formats the pid into `pid_var`
        // without allocating.
        let pid = unsafe { libc::fork() };
        if pid < 0 {
            return Err(io::Error::last_os_error());
        }
        if pid == 0 {
            // SAFETY: in the child, see above; never returns.
            unsafe {
                child(
                    &source_fds,
                    write_fd,
                    parent,
                    &mut pid_var,
                    path.as_ptr(),
                    argv_ptrs.as_ptr(),
                    envp_ptrs.as_ptr(),
                )
            }
        }
        drop(report_write);
        drop(sources);
        let mut report = File::from(report_read);
        let mut errno = [0u8; 4];
        let mut got = 0;
        while got < errno.len() {
            match report.read(&mut errno[got..]) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        let pid = Pid::from_raw(pid);
        if got == 0 {
            return Ok(pid);
        }
        // The child reported why execve failed and exited: reap it.
        let _ = nix::sys::wait::waitpid(pid, None);
        Err(io::Error::from_raw_os_error(i32::from_ne_bytes(errno)))
    }
}

/// The child's side of [`Activation::spawn`]: `sources` are the sockets' fds, all above
/// 3 + their number.
///
/// # Safety
/// Only to be called in the child right after `fork`, with pointers to NUL-terminated
/// strings and NULL-terminated arrays that stay valid (they were allocated before fork).
unsafe fn child(
    sources: &[RawFd],
    report_fd: RawFd,
    parent: u32,
    pid_var: &mut [u8; PID_VAR_LEN],
    path: *const libc::c_char,
    argv: *const *const libc::c_char,
    envp: *const *const libc::c_char,
) -> ! {
    let fail = |report_fd: RawFd| -> ! {
        let errno = io::Error::last_os_error()
            .raw_os_error()
            .unwrap_or(libc::EINVAL);
        let bytes = errno.to_ne_bytes();
        // SAFETY: write(2) is async-signal-safe and reads 4 bytes of a live local.
        unsafe { libc::write(report_fd, bytes.as_ptr().cast(), bytes.len()) };
        // SAFETY: _exit(2) is async-signal-safe and ends the child without running
        // anything of the parent's (no atexit handlers, no destructors).
        unsafe { libc::_exit(127) }
    };
    for (i, source) in sources.iter().enumerate() {
        // SAFETY: dup2(2) on integer fds; the target is below every source, and the new
        // fd has close-on-exec clear.
        if unsafe { libc::dup2(*source, LISTEN_FD + i as RawFd) } < 0 {
            fail(report_fd);
        }
    }
    // Everything else we hold (the netlink socket, the notify socket, the drain's copies
    // of the sockets, the copies above) stays here. Old kernels lack close_range: then
    // only the descriptors opened close-on-exec are kept from the child, as Rust opens
    // them.
    let first = LISTEN_FD + sources.len() as RawFd;
    // SAFETY: close_range(2) with CLOSE_RANGE_CLOEXEC only sets flags on fds.
    unsafe {
        libc::syscall(
            libc::SYS_close_range,
            first as libc::c_uint,
            libc::c_uint::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        )
    };
    // SAFETY: all zeros is a valid sigset_t, and sigemptyset initialises it anyway.
    let mut empty: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `empty` is a live local sigset_t.
    unsafe { libc::sigemptyset(&mut empty) };
    // SAFETY: sigprocmask(2) reads the local set; a NULL old set is allowed.
    if unsafe { libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut()) } < 0 {
        fail(report_fd);
    }
    // Rust ignores SIGPIPE; ignored signals stay ignored across execve.
    // SAFETY: signal(2) with SIG_DFL installs no handler of ours.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    // SAFETY: prctl(2) on integers.
    if unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) } < 0 {
        fail(report_fd);
    }
    // Capabilities granted to us as ambient ones (CAP_NET_ADMIN, CAP_KILL for a non-root
    // user) are for the switch, not for the server. Kernels before 4.3 have no ambient
    // set: nothing to clear there.
    // SAFETY: prctl(2) on integers.
    unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
        )
    };
    // The parent may have died before PR_SET_PDEATHSIG took effect.
    // SAFETY: getppid(2) takes nothing and cannot fail.
    if unsafe { libc::getppid() } as u32 != parent {
        // SAFETY: getpid(2) and kill(2) on our own pid.
        unsafe { libc::kill(libc::getpid(), libc::SIGTERM) };
    }
    // SAFETY: getpid(2) takes nothing and cannot fail.
    let pid = unsafe { libc::getpid() } as u32;
    write_decimal(&mut pid_var[PID_PREFIX.len()..], pid);
    // SAFETY: `path`, `argv` and `envp` are NUL-terminated strings and NULL-terminated
    // arrays allocated before fork (the caller's contract); execve only returns on failure.
    unsafe { libc::execve(path, argv, envp) };
    fail(report_fd)
}

/// Writes `n` in decimal followed by a NUL; `buf` holds at least 11 bytes.
fn write_decimal(buf: &mut [u8], mut n: u32) {
    let mut digits = [0u8; 10];
    let mut len = 0;
    loop {
        digits[len] = b'0' + (n % 10) as u8;
        len += 1;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    for (i, d) in digits[..len].iter().rev().enumerate() {
        buf[i] = *d;
    }
    buf[len] = 0;
}

/// A close-on-exec copy of `fd` numbered `min` or above.
fn dup_at_least(fd: BorrowedFd<'_>, min: RawFd) -> io::Result<OwnedFd> {
    let moved = nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(min))?;
    // SAFETY: F_DUPFD_CLOEXEC returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(moved) })
}

fn cstring(s: &OsStr) -> io::Result<CString> {
    CString::new(s.as_bytes()).map_err(|_| nul_error())
}

fn nul_error() -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        "an argument or environment variable contains a NUL byte",
    )
}

/// The program's path: as given when it contains a `/`, else the first executable file
/// of that name in the `PATH` of `env` (or `/usr/local/bin:/usr/bin:/bin`).
fn resolve(program: &OsStr, env: &[(OsString, OsString)]) -> io::Result<PathBuf> {
    if program.is_empty() {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "empty command"));
    }
    if program.as_bytes().contains(&b'/') {
        return Ok(PathBuf::from(program));
    }
    let path = env
        .iter()
        .find(|(k, _)| k == "PATH")
        .map(|(_, v)| v.clone())
        .unwrap_or_else(|| OsString::from("/usr/local/bin:/usr/bin:/bin"));
    for dir in std::env::split_paths(&path) {
        let candidate = Path::new(&dir).join(program);
        if let Ok(meta) = candidate.metadata() {
            if meta.is_file() && meta.permissions().mode() & 0o111 != 0 {
                return Ok(candidate);
            }
        }
    }
    Err(io::Error::new(
        io::ErrorKind::NotFound,
        format!("{} not found in PATH", program.to_string_lossy()),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimal() {
        let mut buf = [0xffu8; 11];
        write_decimal(&mut buf, 0);
        assert_eq!(&buf[..2], b"0\0");
        write_decimal(&mut buf, 4_294_967_295);
        assert_eq!(&buf[..11], b"4294967295\0");
        write_decimal(&mut buf, 1234);
        assert_eq!(&buf[..5], b"1234\0");
    }

    /// The `socket:[inode]` name of `fd` in this process.
    fn socket_name(fd: BorrowedFd<'_>) -> String {
        std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))
            .unwrap()
            .display()
            .to_string()
    }

    #[test]
    fn child_sees_the_sockets_on_fds_3_and_4_in_order_and_its_own_pid() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let out = tempfile_path();
        let script = format!(
            "test \"$LISTEN_PID\" = $$ && test \"$LISTEN_FDS\" = 2 && \
             {{ readlink /proc/self/fd/3; readlink /proc/self/fd/4; }} > {0}; ls /proc/self/fd > {0}.fds",
            out.display()
        );
        let act = Activation::new("sh", vec!["-c".into(), script.into()])
            .env(std::env::vars_os().collect());
        // Given in the order UDP, TCP: that is the order they land in.
        let pid = act.spawn(&[udp.as_fd(), listener.as_fd()]).unwrap();
        let status = nix::sys::wait::waitpid(pid, None).unwrap();
        assert_eq!(status, nix::sys::wait::WaitStatus::Exited(pid, 0));
        let links = std::fs::read_to_string(&out).unwrap();
        let expected = format!(
            "{}\n{}\n",
            socket_name(udp.as_fd()),
            socket_name(listener.as_fd())
        );
        assert_eq!(links, expected);
        // Only stdio, fds 3 and 4, and the fd ls itself opens to list the directory.
        let fds = std::fs::read_to_string(out.with_extension("fds")).unwrap();
        let fds: Vec<&str> = fds.lines().collect();
        assert_eq!(fds.len(), 6, "{fds:?}");
        let _ = std::fs::remove_file(&out);
        let _ = std::fs::remove_file(out.with_extension("fds"));
    }

    #[test]
    fn a_missing_program_is_reported_not_run() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let err = Activation::new("/nonexistent/program", vec![])
            .spawn(&[listener.as_fd()])
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
        let err = Activation::new("no-such-program-anywhere", vec![])
            .spawn(&[listener.as_fd()])
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
    }

    #[test]
    fn without_a_listener_nothing_is_passed() {
        let out = tempfile_path().with_extension("none");
        let script = format!(
            "test -z \"$LISTEN_PID$LISTEN_FDS$LISTEN_FDNAMES\" && ! test -e /proc/self/fd/3 && echo ok > {}",
            out.display()
        );
        let env = vec![
            ("LISTEN_FDNAMES".into(), "stale".into()),
            ("PATH".into(), std::env::var_os("PATH").unwrap()),
        ];
        let pid = Activation::new("sh", vec!["-c".into(), script.into()])
            .env(env)
            .spawn(&[])
            .unwrap();
        let status = nix::sys::wait::waitpid(pid, None).unwrap();
        assert_eq!(status, nix::sys::wait::WaitStatus::Exited(pid, 0));
        assert_eq!(std::fs::read_to_string(&out).unwrap(), "ok\n");
        let _ = std::fs::remove_file(&out);
    }

    fn tempfile_path() -> PathBuf {
        std::env::temp_dir().join(format!("switcheroo-spawn-{}", std::process::id()))
    }
}
