//! Readiness of the new server, the sd_notify protocol on both sides, and durations.

use log::debug;
use nix::sys::socket::{self, sockopt, ControlMessageOwned, MsgFlags, UnixAddr};
use nix::unistd::Pid;
use std::io::{self, IoSliceMut, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::UnixDatagram;
use std::time::Duration;

/// How `switcheroo run` learns that the new server is ready.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ready {
    /// The server sends `READY=1` to `$NOTIFY_SOCKET` (sd_notify(3)).
    Notify,
    /// `GET path` on the internal port answers 2xx.
    Http(String),
    /// Assumed ready after this long.
    Delay(Duration),
}

impl Ready {
    pub fn parse(s: &str) -> Result<Ready, String> {
        if s == "notify" {
            Ok(Ready::Notify)
        } else if let Some(path) = s.strip_prefix("http:") {
            if !path.starts_with('/') || path.bytes().any(|b| b <= b' ' || b == 0x7f) {
                return Err(format!(
                    "{path:?}: the health path starts with / and has no spaces, e.g. http:/healthz"
                ));
            }
            Ok(Ready::Http(path.to_owned()))
        } else if let Some(delay) = s.strip_prefix("delay:") {
            Ok(Ready::Delay(parse_duration(delay)?))
        } else {
            Err(format!(
                "{s:?}: expected notify, http:/PATH or delay:DURATION"
            ))
        }
    }
}

/// A duration as the command takes it (`250ms`, `2s`, `1m`, or seconds); the message of
/// the library's error for clap.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    switcheroo::parse_duration(s).map_err(|e| e.to_string())
}

/// One `GET path` against the internal port; `Ok(true)` on a 2xx status line.
pub fn http_probe(port: u16, path: &str, timeout: Duration) -> io::Result<bool> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let mut stream = TcpStream::connect_timeout(&addr, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: localhost:{port}\r\nUser-Agent: switcheroo\r\nConnection: close\r\n\r\n"
    )?;
    let mut head = [0u8; 12];
    let mut got = 0;
    while got < head.len() {
        match stream.read(&mut head[got..])? {
            0 => break,
            n => got += n,
        }
    }
    let line = String::from_utf8_lossy(&head[..got]);
    debug!("health check GET {path}: {line:?}");
    Ok(line.starts_with("HTTP/1.") && line.get(9..10) == Some("2"))
}

/// The socket a server reports readiness to, at an abstract address (no file to clean
/// up, reachable from a chroot), which accepts only messages from the server or its
/// descendants.
#[derive(Debug)]
pub struct NotifySocket {
    socket: UnixDatagram,
    name: String,
}

impl NotifySocket {
    pub fn bind() -> io::Result<NotifySocket> {
        let name = format!(
            "switcheroo/notify/{}/{}",
            std::process::id(),
            rand::random::<u32>()
        );
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())?;
        let socket = UnixDatagram::bind_addr(&addr)?;
        socket.set_nonblocking(true)?;
        socket::setsockopt(&socket, sockopt::PassCred, &true)?;
        Ok(NotifySocket { socket, name })
    }

    /// The value of `NOTIFY_SOCKET` for the server.
    pub fn env_value(&self) -> String {
        format!("@{}", self.name)
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.socket.as_fd()
    }

    /// Reads the pending messages; true if one of `main`'s process tree said `READY=1`.
    pub fn ready(&self, main: Pid) -> bool {
        let mut ready = false;
        let mut buf = [0u8; 4096];
        loop {
            let mut cmsg = nix::cmsg_space!(nix::libc::ucred);
            let mut iov = [IoSliceMut::new(&mut buf)];
            let msg = match socket::recvmsg::<UnixAddr>(
                self.socket.as_raw_fd(),
                &mut iov,
                Some(&mut cmsg),
                MsgFlags::MSG_DONTWAIT,
            ) {
                Ok(msg) => msg,
                Err(_) => return ready,
            };
            let sender = msg.cmsgs().ok().and_then(|mut c| {
                c.find_map(|c| match c {
                    ControlMessageOwned::ScmCredentials(cred) => Some(cred.pid()),
                    _ => None,
                })
            });
            let len = msg.bytes;
            let text = String::from_utf8_lossy(&buf[..len]);
            match sender {
                Some(pid) if descends_from(Pid::from_raw(pid), main) => {
                    debug!("notify from pid {pid}: {text:?}");
                    ready |= text.lines().any(|l| l == "READY=1");
                }
                _ => debug!("notify from {sender:?} (not the server) ignored: {text:?}"),
            }
        }
    }
}

/// Whether `pid` is `main` or one of its descendants (by the parent links in /proc).
fn descends_from(mut pid: Pid, main: Pid) -> bool {
    for _ in 0..64 {
        if pid == main {
            return true;
        }
        match switcheroo::process::Stat::of(pid.as_raw() as u32) {
            Ok(stat) if stat.parent > 1 => pid = Pid::from_raw(stat.parent as i32),
            _ => return false,
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes() {
        assert_eq!(Ready::parse("notify"), Ok(Ready::Notify));
        assert_eq!(
            Ready::parse("http:/healthz?x=1"),
            Ok(Ready::Http("/healthz?x=1".into()))
        );
        assert_eq!(
            Ready::parse("delay:1500ms"),
            Ok(Ready::Delay(Duration::from_millis(1500)))
        );
        assert!(Ready::parse("http:healthz").is_err());
        assert!(Ready::parse("http:/a b").is_err());
        assert!(Ready::parse("tcp").is_err());
    }

    #[test]
    fn notify_accepts_the_server_and_ignores_strangers() {
        let notify = NotifySocket::bind().unwrap();
        let me = Pid::this();
        let send = |state| switcheroo::activation::notify_to(&notify.env_value(), state).unwrap();
        send("STATUS=starting");
        assert!(!notify.ready(me));
        send("STATUS=up\nREADY=1\n");
        assert!(notify.ready(me));
        // Sent from outside the server's tree: this process is not a descendant of a
        // child it started.
        let mut other = std::process::Command::new("sleep")
            .arg("10")
            .spawn()
            .unwrap();
        send("READY=1");
        assert!(!notify.ready(Pid::from_raw(other.id() as i32)));
        let _ = other.kill();
        let _ = other.wait();
    }
}
