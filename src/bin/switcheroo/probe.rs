//! How `run` learns that the new server is ready: the sd_notify socket it listens on, and
//! the HTTP(S) probe of the health path. Neither ever blocks: the probe is a non-blocking
//! connection that the state machine advances when its socket is ready, so that the
//! server's exit and SIGTERM are seen at once, whatever the probe is waiting for.

use log::debug;
use nix::sys::socket::{self, sockopt, ControlMessageOwned, MsgFlags, UnixAddr};
use nix::unistd::Pid;
use std::io::{self, IoSliceMut, Read, Write};
use std::net::{Ipv4Addr, SocketAddrV4, TcpStream};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::UnixDatagram;
use std::sync::Arc;
use std::time::{Duration, Instant};
use switcheroo::poll::{Source, Token};

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

/// How one probe ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// The health path answered 2xx.
    Healthy,
    /// Anything else, said as a person would: `GET /healthz answered 503 Service
    /// Unavailable`, `connection refused`, `no answer within 1s`, ...
    Unhealthy(String),
}

/// One `GET path` over a non-blocking connection to the internal port, plain or TLS.
#[derive(Debug)]
pub struct Probe {
    stream: TcpStream,
    tls: Option<rustls::ClientConnection>,
    connected: bool,
    request: Vec<u8>,
    written: usize,
    response: Vec<u8>,
    path: String,
    deadline: Instant,
    timeout: Duration,
}

/// The most of an answer read: the status line and enough of the body to say why.
const ANSWER_MAX: usize = 1024;

impl Probe {
    /// Starts connecting to `127.0.0.1:port` (which also reaches a dual-stack listener);
    /// the probe fails as unhealthy if it has no verdict within `timeout`.
    pub fn start(port: u16, path: &str, tls: bool, timeout: Duration) -> io::Result<Probe> {
        use nix::sys::socket::{AddressFamily, SockFlag, SockType, SockaddrIn};
        let fd = socket::socket(
            AddressFamily::Inet,
            SockType::Stream,
            SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
            None,
        )?;
        let addr = SockaddrIn::from(SocketAddrV4::new(Ipv4Addr::LOCALHOST, port));
        match socket::connect(fd.as_raw_fd(), &addr) {
            Ok(()) | Err(nix::errno::Errno::EINPROGRESS) => {}
            Err(e) => return Err(e.into()),
        }
        let tls = if tls {
            let name = rustls::pki_types::ServerName::try_from("localhost")
                .map_err(|e| io::Error::other(e.to_string()))?;
            Some(
                rustls::ClientConnection::new(tls_config(), name)
                    .map_err(|e| io::Error::other(e.to_string()))?,
            )
        } else {
            None
        };
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: localhost:{port}\r\nUser-Agent: switcheroo\r\nConnection: close\r\n\r\n"
        )
        .into_bytes();
        Ok(Probe {
            stream: TcpStream::from(fd),
            tls,
            connected: false,
            request,
            written: 0,
            response: Vec::new(),
            path: path.to_owned(),
            deadline: Instant::now() + timeout,
            timeout,
        })
    }

    /// When the probe gives up.
    pub fn deadline(&self) -> Instant {
        self.deadline
    }

    /// What to wait for: the connection to finish, room to write, or the answer.
    pub fn source(&self, token: Token) -> Source<'_> {
        let wants_write = !self.connected
            || match &self.tls {
                Some(tls) => tls.wants_write(),
                None => self.written < self.request.len(),
            };
        if wants_write {
            Source::writable(token, self.stream.as_fd())
        } else {
            Source::readable(token, self.stream.as_fd())
        }
    }

    /// Does what can be done without blocking; the verdict once there is one (or once the
    /// deadline has passed).
    pub fn advance(&mut self) -> Option<Verdict> {
        match self.step() {
            Ok(Some(verdict)) => Some(verdict),
            Ok(None) if Instant::now() >= self.deadline => Some(Verdict::Unhealthy(format!(
                "GET {}: no answer within {:?}",
                self.path, self.timeout
            ))),
            Ok(None) => None,
            Err(e) => Some(Verdict::Unhealthy(format!(
                "GET {}: {}",
                self.path,
                describe(&e)
            ))),
        }
    }

    fn step(&mut self) -> io::Result<Option<Verdict>> {
        if !self.connected {
            match socket::getsockopt(&self.stream, sockopt::SocketError)? {
                0 => {}
                errno => return Err(io::Error::from_raw_os_error(errno)),
            }
            // Still connecting: getpeername fails until the handshake is done.
            if self.stream.peer_addr().is_err() {
                return Ok(None);
            }
            self.connected = true;
        }
        let mut buf = [0u8; ANSWER_MAX];
        match &mut self.tls {
            None => {
                while self.written < self.request.len() {
                    match self.stream.write(&self.request[self.written..]) {
                        Ok(n) => self.written += n,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
                        Err(e) => return Err(e),
                    }
                }
                loop {
                    match self.stream.read(&mut buf) {
                        Ok(0) => return Ok(Some(verdict(&self.response, &self.path, false, true))),
                        Ok(n) => {
                            self.response.extend_from_slice(&buf[..n]);
                            if let Some(v) = verdict_if_complete(&self.response, &self.path, false)
                            {
                                return Ok(Some(v));
                            }
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
                        Err(e) => return Err(e),
                    }
                }
            }
            Some(tls) => {
                if self.written == 0 {
                    // Buffered until the handshake is done.
                    tls.writer().write_all(&self.request)?;
                    self.written = self.request.len();
                }
                loop {
                    while tls.wants_write() {
                        match tls.write_tls(&mut self.stream) {
                            Ok(_) => {}
                            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
                            Err(e) => return Err(e),
                        }
                    }
                    match tls.reader().read(&mut buf) {
                        Ok(0) => return Ok(Some(verdict(&self.response, &self.path, true, true))),
                        Ok(n) => {
                            self.response.extend_from_slice(&buf[..n]);
                            if let Some(v) = verdict_if_complete(&self.response, &self.path, true) {
                                return Ok(Some(v));
                            }
                            continue;
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                        Err(e) => return Err(e),
                    }
                    match tls.read_tls(&mut self.stream) {
                        Ok(0) => return Ok(Some(verdict(&self.response, &self.path, true, true))),
                        Ok(_) => {
                            tls.process_new_packets()
                                .map_err(|e| io::Error::other(format!("TLS: {e}")))?;
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
                        Err(e) => return Err(e),
                    }
                }
            }
        }
    }
}

/// The verdict once the status line and a little of the body are in.
fn verdict_if_complete(response: &[u8], path: &str, tls: bool) -> Option<Verdict> {
    let line_done = response.windows(2).any(|w| w == b"\r\n");
    (line_done && (response.len() >= ANSWER_MAX || is_2xx(response)))
        .then(|| verdict(response, path, tls, false))
}

fn is_2xx(response: &[u8]) -> bool {
    response.starts_with(b"HTTP/1.") && response.get(9) == Some(&b'2')
}

/// The verdict on what was read of the answer to `GET path` (`closed`: the server closed
/// the connection).
fn verdict(response: &[u8], path: &str, tls: bool, closed: bool) -> Verdict {
    if is_2xx(response) {
        return Verdict::Healthy;
    }
    if response.is_empty() && closed {
        return Verdict::Unhealthy(format!(
            "GET {path}: the connection was closed without an answer"
        ));
    }
    // A TLS record (alert or handshake) where HTTP was expected.
    if !tls && matches!(response.first(), Some(0x15 | 0x16)) {
        return Verdict::Unhealthy(format!(
            "GET {path}: the server answered with TLS; probe it with --ready https:{path}"
        ));
    }
    let text = String::from_utf8_lossy(response);
    let status = text.lines().next().unwrap_or_default();
    if !status.starts_with("HTTP/") {
        return Verdict::Unhealthy(format!(
            "GET {path}: not an HTTP answer: {:?}",
            status.chars().take(60).collect::<String>()
        ));
    }
    let status = status.split_once(' ').map_or(status, |(_, s)| s);
    let mut why = format!("GET {path} answered {status}");
    if !tls && text.contains("HTTPS") {
        why.push_str(&format!(
            " (its answer speaks of HTTPS: probe it with --ready https:{path})"
        ));
    }
    Verdict::Unhealthy(why)
}

/// An error as a person would say it.
fn describe(e: &io::Error) -> String {
    match e.kind() {
        io::ErrorKind::ConnectionRefused => "connection refused".into(),
        io::ErrorKind::ConnectionReset => "connection reset".into(),
        _ => e.to_string(),
    }
}

/// A TLS client that takes whatever certificate the server shows: the probe talks to the
/// server it just started, on its own internal port, and only asks whether it answers.
fn tls_config() -> Arc<rustls::ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map(|b| {
            b.dangerous()
                .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
                .with_no_client_auth()
        });
    // Invariant: ring's default provider supports the default protocol versions.
    Arc::new(config.expect("ring supports TLS 1.2 and 1.3"))
}

/// Accepts any certificate, but still checks that the handshake is signed by its key.
#[derive(Debug)]
struct AnyCertificate(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    /// Runs a probe to its verdict, waiting on its source.
    fn verdict(mut probe: Probe) -> Verdict {
        loop {
            if let Some(v) = probe.advance() {
                return v;
            }
            let token = Token(0);
            let _ = switcheroo::poll::wait(&[probe.source(token)], Some(probe.deadline()));
        }
    }

    /// A one-shot server that answers the first connection with `answer` (none: closes).
    fn server(answer: Option<&'static [u8]>) -> u16 {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf);
            if let Some(a) = answer {
                let _ = s.write_all(a);
            }
        });
        port
    }

    #[test]
    fn a_2xx_is_healthy_and_anything_else_says_what_it_was() {
        let ok = server(Some(b"HTTP/1.1 204 No Content\r\n\r\n"));
        assert_eq!(
            verdict(Probe::start(ok, "/", false, Duration::from_secs(5)).unwrap()),
            Verdict::Healthy
        );
        let bad = server(Some(
            b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n",
        ));
        assert_eq!(
            verdict(Probe::start(bad, "/healthz", false, Duration::from_secs(5)).unwrap()),
            Verdict::Unhealthy("GET /healthz answered 400 Bad Request".into())
        );
        let https = server(Some(
            b"HTTP/1.0 400 Bad Request\r\n\r\nClient sent an HTTP request to an HTTPS server.\n",
        ));
        let Verdict::Unhealthy(why) =
            verdict(Probe::start(https, "/", false, Duration::from_secs(5)).unwrap())
        else {
            panic!("healthy?")
        };
        assert!(why.contains("--ready https:/"), "{why}");
        let closed = server(None);
        assert_eq!(
            verdict(Probe::start(closed, "/", false, Duration::from_secs(5)).unwrap()),
            Verdict::Unhealthy("GET /: the connection was closed without an answer".into())
        );
    }

    #[test]
    fn a_refused_or_silent_server_is_unhealthy_without_blocking() {
        let free = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = free.local_addr().unwrap().port();
        drop(free);
        assert_eq!(
            verdict(Probe::start(port, "/", false, Duration::from_secs(5)).unwrap()),
            Verdict::Unhealthy("GET /: connection refused".into())
        );
        // Accepted by the kernel, never answered: the verdict comes at the deadline.
        let silent = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = silent.local_addr().unwrap().port();
        let started = Instant::now();
        let mut probe = Probe::start(port, "/", false, Duration::from_millis(200)).unwrap();
        assert_eq!(
            probe.advance(),
            None,
            "no verdict before the deadline, and no wait"
        );
        assert!(started.elapsed() < Duration::from_millis(100));
        assert_eq!(
            verdict(probe),
            Verdict::Unhealthy("GET /: no answer within 200ms".into())
        );
    }
}
