//! `switcheroo run`: start the server with the socket, wait until it is ready, switch,
//! and on SIGTERM drain, forward and pass on the server's exit status.

use crate::ready::{self, NotifySocket, Ready};
use crate::{EXIT_ERROR, EXIT_NOT_READY};
use log::{debug, error, info, warn};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{kill, SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use std::ffi::OsString;
use std::net::TcpListener;
use std::ops::RangeInclusive;
use std::os::fd::AsFd;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::process::ExitCode;
use std::time::{Duration, Instant};
use switcheroo::{Drain, Routes, Switcheroo};
use switcheroo_sys::spawn::Activation;

pub const AFTER_HELP: &str = "\
The server gets the listening socket as fd 3 with LISTEN_FDS=1, LISTEN_PID=<its pid> and
LISTEN_FDNAMES=<name> (systemd socket activation: gunicorn, uvicorn --fd 3, Node's
{fd: 3}, Go's net.FileListener, ...), and SWITCHEROO_PORT=<internal port>. With
--ready notify it also gets NOTIFY_SOCKET and must send READY=1.

If an argument contains {port}, the server binds that port itself: it gets no socket and
no LISTEN_* variables, and the drain reads the port's accept queue from /proc/net/tcp.

Run it the same way again to deploy: the new instance switches the public port to its
server once that is ready, then sends SIGTERM to the previous switcheroo, which waits
until its server's accept queue has stayed empty for --drain-idle, forwards the signal,
and exits with the server's exit status. If the new server exits or is not ready within
--ready-timeout, nothing is switched and the previous version keeps serving.

Under systemd (Type=notify), switcheroo itself sends READY=1 once it has switched.";

/// What `switcheroo run` was asked to do.
#[derive(Debug)]
pub struct Config {
    pub namespace: String,
    pub port: u16,
    pub range: RangeInclusive<u16>,
    pub routes: Routes,
    pub ready: Ready,
    pub ready_timeout: Duration,
    pub drain: Drain,
    pub kill_after: Option<Duration>,
    pub fd_name: String,
    pub command: Vec<OsString>,
}

/// Signals that end the service gracefully: drained, then forwarded.
const STOP: [Signal; 2] = [Signal::SIGTERM, Signal::SIGINT];
/// Signals passed straight on to the server (reload, log reopen, worker counts...).
const FORWARD: [Signal; 7] = [
    Signal::SIGHUP,
    Signal::SIGQUIT,
    Signal::SIGUSR1,
    Signal::SIGUSR2,
    Signal::SIGTTIN,
    Signal::SIGTTOU,
    Signal::SIGWINCH,
];

/// How the wait for readiness ended, other than with a ready server.
enum NotReady {
    Exited(WaitStatus),
    TimedOut,
    Stopped(Signal),
}

pub fn run(config: Config) -> ExitCode {
    let code = match Wrapper::start(&config) {
        Ok(mut wrapper) => wrapper.supervise(&config),
        Err(code) => code,
    };
    ExitCode::from(code)
}

struct Wrapper {
    signals: SignalFd,
    listener: Option<TcpListener>,
    child: Pid,
    name: String,
    port: u16,
    notify: Option<NotifySocket>,
    takeover: Option<switcheroo::Takeover>,
    manager: Option<String>,
}

impl Wrapper {
    /// Everything up to a running server: signals, the switch's configuration and port,
    /// the readiness socket, the child. Errors are reported here and become exit codes.
    fn start(config: &Config) -> Result<Wrapper, u8> {
        let mut mask = SigSet::empty();
        for signal in STOP.iter().chain(&FORWARD) {
            mask.add(*signal);
        }
        mask.add(Signal::SIGCHLD);
        // Blocked before the child exists so that no signal is lost; the child unblocks
        // them all before it executes the server.
        let signals = mask
            .thread_block()
            .and_then(|()| {
                SignalFd::with_flags(&mask, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC)
            })
            .map_err(|e| {
                fail(
                    EXIT_ERROR,
                    format_args!("cannot set up signal handling: {e}"),
                )
            })?;

        let sw = Switcheroo::builder(config.namespace.clone(), config.port)
            .routes(config.routes)
            .port_range(config.range.clone())
            .build()
            .map_err(|e| fail(EXIT_ERROR, e))?;
        let (listener, takeover) = sw.begin().map_err(|e| fail(EXIT_ERROR, e))?;
        let port = takeover.port();

        let notify = match config.ready {
            Ready::Notify => Some(NotifySocket::bind().map_err(|e| {
                fail(
                    EXIT_ERROR,
                    format_args!("cannot create the notify socket: {e}"),
                )
            })?),
            _ => None,
        };
        let manager = std::env::var("NOTIFY_SOCKET").ok();
        let mut env: Vec<(OsString, OsString)> = std::env::vars_os()
            .filter(|(k, _)| {
                !matches!(
                    k.to_str(),
                    Some("NOTIFY_SOCKET" | "LISTEN_FDS" | "LISTEN_PID" | "LISTEN_FDNAMES")
                )
            })
            .collect();
        env.push(("LISTEN_FDNAMES".into(), config.fd_name.clone().into()));
        env.push(("SWITCHEROO_PORT".into(), port.to_string().into()));
        if let Some(notify) = &notify {
            env.push(("NOTIFY_SOCKET".into(), notify.env_value().into()));
        }
        let args: Vec<OsString> = config.command[1..]
            .iter()
            .map(|a| with_port(a, port))
            .collect();
        // A server that is told its port binds it itself: it gets no socket, and ours
        // must be closed before it starts (the port stays ours meanwhile: begin skips the
        // ports of this namespace's rules, and the random start makes a collision with
        // another deploy unlikely).
        let binds_itself = config.command[1..].iter().any(|a| with_port(a, port) != *a);
        let listener = if binds_itself {
            drop(listener);
            None
        } else {
            Some(listener)
        };
        let name = config.command[0].to_string_lossy().into_owned();
        let child = Activation::new(config.command[0].clone(), args)
            .env(env)
            .spawn(listener.as_ref().map(|l| l.as_fd()))
            .map_err(|e| {
                fail(
                    EXIT_NOT_READY,
                    format_args!("cannot start {name}: {e}; nothing was switched"),
                )
            })?;
        info!(
            "started {name} (pid {child}) on internal port {port}; waiting until it is ready ({})",
            describe(&config.ready)
        );
        Ok(Wrapper {
            signals,
            listener,
            child,
            name,
            port,
            notify,
            takeover: Some(takeover),
            manager,
        })
    }

    /// From a started server to its exit: readiness, the switch, the drain on SIGTERM.
    fn supervise(&mut self, config: &Config) -> u8 {
        if let Err(why) = self.wait_ready(config) {
            return self.not_ready(why, config.ready_timeout);
        }
        let takeover = self.takeover.take().expect("switched once");
        match takeover.commit() {
            Ok(report) => info!(
                "{name} is ready: port {public} -> {port} in {us} µs ({attempts} attempt{s}); replaced {removed} rules, signalled {signalled:?}",
                name = self.name,
                public = config.port,
                port = report.port,
                us = report.elapsed.as_micros(),
                attempts = report.attempts,
                s = if report.attempts == 1 { "" } else { "s" },
                removed = report.removed.len(),
                signalled = report.signalled,
            ),
            Err(e) => {
                error!("the switch failed: {e}; stopping {}; the running version keeps serving", self.name);
                return self.stop(Signal::SIGTERM, Some(Duration::from_secs(10)));
            }
        }
        ready::notify_manager(
            self.manager.as_deref(),
            &format!(
                "READY=1\nSTATUS=port {} -> {} ({} pid {})",
                config.port, self.port, self.name, self.child
            ),
        );
        loop {
            for signal in self.pending(None) {
                if signal == Signal::SIGCHLD {
                    if let Some(status) = self.reap() {
                        return self.exited_while_serving(status, config.port);
                    }
                } else if STOP.contains(&signal) {
                    return self.shut_down(signal, config);
                } else {
                    self.forward(signal);
                }
            }
        }
    }

    /// Waits until the server is ready, exits, the timeout passes or we are told to stop.
    fn wait_ready(&mut self, config: &Config) -> Result<(), NotReady> {
        let started = Instant::now();
        let deadline = started + config.ready_timeout;
        let mut next_probe = started;
        loop {
            let now = Instant::now();
            match &config.ready {
                Ready::Delay(delay) if now >= started + *delay => return Ok(()),
                Ready::Http(path) if now >= next_probe => {
                    let timeout = deadline
                        .saturating_duration_since(now)
                        .min(Duration::from_secs(1))
                        .max(Duration::from_millis(1));
                    match ready::http_probe(self.port, path, timeout) {
                        Ok(true) => return Ok(()),
                        Ok(false) => debug!("GET {path}: not 2xx yet"),
                        Err(e) => debug!("GET {path}: {e}"),
                    }
                    next_probe = Instant::now() + Duration::from_millis(100);
                }
                _ => {}
            }
            let now = Instant::now();
            let wake = match &config.ready {
                Ready::Delay(delay) => (started + *delay).min(deadline),
                Ready::Http(_) => next_probe.min(deadline),
                Ready::Notify => deadline,
            };
            // Signals first, even past the deadline: a server that exited is reported as
            // such, not as a timeout.
            for signal in self.pending(Some(wake.saturating_duration_since(now))) {
                if signal == Signal::SIGCHLD {
                    if let Some(status) = self.reap() {
                        return Err(NotReady::Exited(status));
                    }
                } else if STOP.contains(&signal) {
                    return Err(NotReady::Stopped(signal));
                } else {
                    self.forward(signal);
                }
            }
            if let Some(notify) = &self.notify {
                if notify.ready(self.child) {
                    return Ok(());
                }
            }
            if Instant::now() >= deadline {
                return Err(NotReady::TimedOut);
            }
        }
    }

    fn not_ready(&mut self, why: NotReady, timeout: Duration) -> u8 {
        match why {
            NotReady::Exited(status) => {
                self.listener = None;
                error!(
                    "{} {} before it was ready; nothing was switched, the running version keeps serving",
                    self.name,
                    describe_status(status)
                );
                EXIT_NOT_READY
            }
            NotReady::TimedOut => {
                let hint = match &self.notify {
                    Some(_) => "; if it does not speak sd_notify, use --ready http:/PATH or --ready delay:DURATION",
                    None => "",
                };
                error!(
                    "{} was not ready after {timeout:?}{hint}; stopping it; nothing was switched, the running version keeps serving",
                    self.name
                );
                self.stop(Signal::SIGTERM, Some(Duration::from_secs(10)));
                EXIT_NOT_READY
            }
            NotReady::Stopped(signal) => {
                info!(
                    "got {signal} before the switch; stopping {}; nothing was switched",
                    self.name
                );
                self.stop(signal, None)
            }
        }
    }

    /// SIGTERM/SIGINT after the switch: drain, forward, wait, pass the status on.
    fn shut_down(&mut self, signal: Signal, config: &Config) -> u8 {
        ready::notify_manager(self.manager.as_deref(), "STOPPING=1");
        info!(
            "got {signal}: waiting until the accept queue of port {} stays empty, then stopping {}",
            self.port, self.name
        );
        // Our copy of the socket if the server got it; else the queue is read from
        // /proc/net/tcp{,6} (a listening socket's rx_queue is its accept queue).
        let listener = self.listener.take();
        let mut tracker = config.drain.tracker();
        let report = loop {
            let sample = match &listener {
                Some(listener) => tracker.check(listener),
                None => proc_accept_queue(self.port).map(|queued| tracker.check_len(queued)),
            };
            match sample {
                Ok(Some(report)) => break Some(report),
                Ok(None) => {}
                Err(e) => {
                    warn!("cannot read the accept queue ({e}); stopping without a drain");
                    break None;
                }
            }
            let mut again = false;
            for pending in self.pending(Some(tracker.interval())) {
                if pending == Signal::SIGCHLD {
                    if let Some(status) = self.reap() {
                        info!("{} {} during the drain", self.name, describe_status(status));
                        return exit_code(status);
                    }
                } else if STOP.contains(&pending) {
                    again = true;
                } else {
                    self.forward(pending);
                }
            }
            if again {
                info!("got {signal} again: stopping without waiting for the drain");
                break None;
            }
        };
        drop(listener);
        if let Some(report) = report {
            info!(
                "drained in {} ms (longest accept queue {}{})",
                report.waited.as_millis(),
                report.max_queue,
                if report.timed_out {
                    ", gave up waiting"
                } else {
                    ""
                }
            );
        }
        self.stop(signal, config.kill_after)
    }

    /// Forwards `signal`, lets go of our copy of the listener (so that nobody holds a
    /// socket that nobody accepts on), waits for the server and returns its exit code;
    /// SIGKILL after `kill_after`.
    fn stop(&mut self, signal: Signal, kill_after: Option<Duration>) -> u8 {
        self.forward(signal);
        self.listener = None;
        let deadline = kill_after.map(|d| Instant::now() + d);
        let mut killed = false;
        loop {
            if let Some(status) = self.reap() {
                info!("{} {}", self.name, describe_status(status));
                return exit_code(status);
            }
            let timeout = match deadline {
                Some(d) if !killed => Some(d.saturating_duration_since(Instant::now())),
                _ => None,
            };
            if timeout == Some(Duration::ZERO) {
                warn!(
                    "{} still runs {:?} after {signal}: SIGKILL",
                    self.name,
                    kill_after.unwrap_or_default()
                );
                self.forward(Signal::SIGKILL);
                killed = true;
                continue;
            }
            for pending in self.pending(timeout) {
                if pending != Signal::SIGCHLD {
                    self.forward(pending);
                }
            }
        }
    }

    fn exited_while_serving(&mut self, status: WaitStatus, public: u16) -> u8 {
        self.listener = None;
        match status {
            WaitStatus::Exited(_, 0) => warn!(
                "{} exited 0 on its own while serving; port {public} refuses connections until the next deploy",
                self.name
            ),
            _ => error!(
                "{} {} while serving; port {public} refuses connections until the next deploy",
                self.name,
                describe_status(status)
            ),
        }
        exit_code(status)
    }

    /// Waits up to `timeout` (forever with `None`) for signals and returns those pending.
    fn pending(&mut self, timeout: Option<Duration>) -> Vec<Signal> {
        let timeout = match timeout {
            None => PollTimeout::NONE,
            Some(t) => PollTimeout::try_from(t.as_millis().max(1).min(i32::MAX as u128) as i32)
                .unwrap_or(PollTimeout::MAX),
        };
        let mut fds = vec![PollFd::new(self.signals.as_fd(), PollFlags::POLLIN)];
        if let Some(notify) = &self.notify {
            fds.push(PollFd::new(notify.fd(), PollFlags::POLLIN));
        }
        if let Err(e) = poll(&mut fds, timeout) {
            if e != nix::errno::Errno::EINTR {
                warn!("poll: {e}");
            }
        }
        drop(fds);
        let mut signals = Vec::new();
        while let Ok(Some(info)) = self.signals.read_signal() {
            if let Ok(signal) = Signal::try_from(info.ssi_signo as i32) {
                signals.push(signal);
            }
        }
        signals
    }

    fn forward(&self, signal: Signal) {
        debug!("forwarding {signal} to {}", self.child);
        if let Err(e) = kill(self.child, signal) {
            warn!(
                "cannot send {signal} to {} (pid {}): {e}",
                self.name, self.child
            );
        }
    }

    /// The server's status if it has exited (reaping it), else `None`.
    fn reap(&self) -> Option<WaitStatus> {
        match waitpid(self.child, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) => None,
            Ok(status @ (WaitStatus::Exited(..) | WaitStatus::Signaled(..))) => Some(status),
            Ok(_) => None,
            // ECHILD: already reaped, which only this function does.
            Err(_) => Some(WaitStatus::Exited(self.child, EXIT_ERROR.into())),
        }
    }
}

/// The accept queue of the listening sockets on `port` in this network namespace, from
/// `/proc/net/tcp` and `/proc/net/tcp6` (0 when nothing listens there any more).
fn proc_accept_queue(port: u16) -> std::io::Result<u32> {
    let mut queued = 0;
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let text = match std::fs::read_to_string(table) {
            Ok(text) => text,
            // No IPv6 in this kernel.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        queued += listen_queue(&text, port);
    }
    Ok(queued)
}

/// Sums the rx_queue of the LISTEN (state 0A) lines for `port` of a /proc/net/tcp table.
fn listen_queue(table: &str, port: u16) -> u32 {
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let local = fields.nth(1)?;
            let state = fields.nth(1)?;
            let queues = fields.next()?;
            let local_port = u16::from_str_radix(local.rsplit_once(':')?.1, 16).ok()?;
            let rx = u32::from_str_radix(queues.split_once(':')?.1, 16).ok()?;
            (state == "0A" && local_port == port).then_some(rx)
        })
        .sum()
}

/// Logs an error and returns the exit code for it.
fn fail(code: u8, message: impl std::fmt::Display) -> u8 {
    error!("{message}");
    code
}

/// `arg` with every `{port}` replaced by the internal port.
fn with_port(arg: &OsString, port: u16) -> OsString {
    let bytes = arg.as_bytes();
    let port = port.to_string();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i..].starts_with(b"{port}") {
            out.extend_from_slice(port.as_bytes());
            i += b"{port}".len();
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    OsString::from_vec(out)
}

fn describe(ready: &Ready) -> String {
    match ready {
        Ready::Notify => "READY=1 on NOTIFY_SOCKET".to_owned(),
        Ready::Http(path) => format!("GET {path} answers 2xx"),
        Ready::Delay(d) => format!("after {d:?}"),
    }
}

fn describe_status(status: WaitStatus) -> String {
    match status {
        WaitStatus::Exited(_, code) => format!("exited with status {code}"),
        WaitStatus::Signaled(_, signal, _) => format!("was killed by {signal}"),
        other => format!("ended ({other:?})"),
    }
}

/// The server's exit code, or 128 + the signal that killed it, as shells report it.
fn exit_code(status: WaitStatus) -> u8 {
    match status {
        WaitStatus::Exited(_, code) => code as u8,
        WaitStatus::Signaled(_, signal, _) => 128u8.wrapping_add(signal as u8),
        _ => EXIT_ERROR,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_placeholder() {
        assert_eq!(
            with_port(&"--bind=[::]:{port}".into(), 40401),
            "--bind=[::]:40401"
        );
        assert_eq!(with_port(&"{port}{port}".into(), 7), "77");
        assert_eq!(with_port(&"{por}".into(), 7), "{por}");
    }

    #[test]
    fn proc_net_tcp_listen_queue() {
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000:9D90 00000000:0000 0A 00000000:00000003 00:00000000 00000000     0        0 1 1 0 100 0 0 10 0
   1: 0100007F:9D90 0100007F:A000 01 00000000:00000005 00:00000000 00000000     0        0 2 1 0 20 4 30 10 -1
   2: 00000000:1F90 00000000:0000 0A 00000000:00000007 00:00000000 00000000     0        0 3 1 0 100 0 0 10 0
";
        assert_eq!(listen_queue(table, 0x9D90), 3);
        assert_eq!(listen_queue(table, 0x1F90), 7);
        assert_eq!(listen_queue(table, 1), 0);
        // A real listener: two connections nobody accepted.
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let _a = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        let _b = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        assert_eq!(proc_accept_queue(port).unwrap(), 2);
    }

    #[test]
    fn exit_codes() {
        let pid = Pid::from_raw(1);
        assert_eq!(exit_code(WaitStatus::Exited(pid, 0)), 0);
        assert_eq!(exit_code(WaitStatus::Exited(pid, 42)), 42);
        assert_eq!(
            exit_code(WaitStatus::Signaled(pid, Signal::SIGKILL, false)),
            137
        );
    }
}
