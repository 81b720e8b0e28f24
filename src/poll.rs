//! Waiting for any of several file descriptors, each named by a [`Token`], up to a
//! deadline: the one wait that [`Tenure::wait`](crate::Tenure::wait) and the `switcheroo`
//! command's state machine share (a signalfd, pidfds, the notification socket, probes).
//!
//! As in mio, what is ready comes back as tokens, never as positions in an array of
//! `pollfd`s; unlike mio, there is no registry to keep in sync: each wait takes the
//! sources that matter in the current state.

use std::io;
use std::os::fd::BorrowedFd;
use std::time::Instant;

/// A caller's name for a source.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Token(pub usize);

/// What to wait for on a source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Interest {
    /// Data to read, a connection to accept, a signal, a process exit (pidfd).
    Readable,
    /// Room to write, or a non-blocking connect that finished.
    Writable,
}

/// One file descriptor to wait on.
#[derive(Debug, Clone, Copy)]
pub struct Source<'a> {
    /// The name it is reported by.
    pub token: Token,
    /// The file descriptor.
    pub fd: BorrowedFd<'a>,
    /// What to wait for.
    pub interest: Interest,
}

impl<'a> Source<'a> {
    /// `fd`, readable, reported as `token`.
    pub fn readable(token: Token, fd: BorrowedFd<'a>) -> Source<'a> {
        Source {
            token,
            fd,
            interest: Interest::Readable,
        }
    }

    /// `fd`, writable, reported as `token`.
    pub fn writable(token: Token, fd: BorrowedFd<'a>) -> Source<'a> {
        Source {
            token,
            fd,
            interest: Interest::Writable,
        }
    }
}

/// Waits (`poll(2)`) until one of `sources` is ready or `deadline` passes (never, with
/// `None`), and returns the tokens of the ready ones in the order of `sources`: empty when
/// the deadline passed first. A deadline that has passed already still gets one look
/// without waiting, so what is ready is reported even to a caller whose work on the clock
/// outlasts its period (else that caller would never see its sources again). An error or
/// hang-up on a source counts as ready (the read or write that follows reports it). A
/// signal that interrupts the wait (EINTR) restarts it with the time that is left.
pub fn wait(sources: &[Source<'_>], deadline: Option<Instant>) -> io::Result<Vec<Token>> {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    loop {
        let timeout = match deadline {
            None => PollTimeout::NONE,
            Some(deadline) => {
                let left = deadline.saturating_duration_since(Instant::now());
                // Rounded up, so that a wake-up is never early; zero once it passed.
                let ms = left.as_micros().div_ceil(1000).min(i32::MAX as u128) as i32;
                PollTimeout::try_from(ms).unwrap_or(PollTimeout::MAX)
            }
        };
        let mut fds: Vec<PollFd<'_>> = sources
            .iter()
            .map(|s| {
                let flags = match s.interest {
                    Interest::Readable => PollFlags::POLLIN,
                    Interest::Writable => PollFlags::POLLOUT,
                };
                PollFd::new(s.fd, flags)
            })
            .collect();
        match poll(&mut fds, timeout) {
            Ok(0) if deadline.is_some_and(|d| Instant::now() >= d) => return Ok(Vec::new()),
            Ok(0) => continue,
            Ok(_) => {
                return Ok(sources
                    .iter()
                    .zip(&fds)
                    .filter(|(_, fd)| fd.revents().is_some_and(|r| !r.is_empty()))
                    .map(|(s, _)| s.token)
                    .collect())
            }
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

/// Whether `fd` is readable now, without waiting.
pub(crate) fn readable_now(fd: BorrowedFd<'_>) -> bool {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let mut fds = [PollFd::new(fd, PollFlags::POLLIN)];
    poll(&mut fds, PollTimeout::ZERO).is_ok_and(|n| n > 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::fd::AsFd;
    use std::os::unix::net::UnixStream;
    use std::time::Duration;

    #[test]
    fn ready_sources_come_back_by_token_and_a_deadline_ends_the_wait() {
        let (mut a, b) = UnixStream::pair().unwrap();
        let (c, _d) = UnixStream::pair().unwrap();
        let sources = [
            Source::readable(Token(7), b.as_fd()),
            Source::readable(Token(9), c.as_fd()),
        ];
        let soon = Some(Instant::now() + Duration::from_millis(20));
        assert_eq!(wait(&sources, soon).unwrap(), []);
        a.write_all(b"x").unwrap();
        assert_eq!(wait(&sources, None).unwrap(), [Token(7)]);
        let writable = [Source::writable(Token(1), c.as_fd())];
        assert_eq!(wait(&writable, None).unwrap(), [Token(1)]);
        assert!(readable_now(b.as_fd()));
        assert!(!readable_now(c.as_fd()));
    }

    #[test]
    fn a_deadline_that_has_passed_still_reports_what_is_ready() {
        let (mut a, b) = UnixStream::pair().unwrap();
        let sources = [Source::readable(Token(3), b.as_fd())];
        let passed = Some(Instant::now() - Duration::from_millis(50));
        assert_eq!(wait(&sources, passed).unwrap(), []);
        a.write_all(b"x").unwrap();
        assert_eq!(wait(&sources, passed).unwrap(), [Token(3)]);
    }
}
