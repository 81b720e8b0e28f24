//! `switcheroo run`: start the server with the socket, wait until it is ready, switch,
//! and on SIGTERM drain, forward and pass on the server's exit status.
//!
//! A state machine: [`Events::next`] is the one place that waits (signals, the server's
//! exit through its pidfd, the notify socket, timers), and each state is one method of
//! [`Wrapper`] that returns the next state. Every way to end without the server's own
//! status is a [`Failure`] with its exit code.

use crate::ready::{self, NotifySocket, Ready};
use crate::{EXIT_ERROR, EXIT_NOT_READY, EXIT_ROLLED_BACK};
use log::{debug, error, info, warn};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{kill, SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use std::collections::VecDeque;
use std::ffi::OsString;
use std::ops::RangeInclusive;
use std::os::fd::AsFd;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};
use switcheroo::{
    Change, Drain, DrainTracker, FlowDrain, FlowTracker, Mapping, Port, Protocol, Resignation,
    Routes, Socket, Switcheroo, Takeover, Tenure,
};
use switcheroo_sys::spawn::Activation;
use switcheroo_sys::PidFd;

pub const AFTER_HELP: &str = "\
The server gets one socket per --port, in the order given, as fds 3, 4, ... with
LISTEN_FDS=<count>, LISTEN_PID=<its pid> and LISTEN_FDNAMES=<names> (systemd socket
activation: gunicorn, uvicorn --fd 3, Node's {fd: 3}, Go's net.FileListener, ...): a
listening TCP socket for PORT or PORT/tcp, an unconnected UDP socket for PORT/udp (as
systemd passes one for ListenDatagram=). A port's name is NAME from NAME=PORT, else
--fd-name, else the namespace (as systemd names every socket of a unit after the unit).
SWITCHEROO_PORT=<internal port of the first> and SWITCHEROO_PORTS=<PORT/PROTO=INTERNAL,...>
say where they are. With --ready notify it also gets NOTIFY_SOCKET and must send READY=1.

With --notify-replaced SIGNAL, the server gets SIGNAL (and SWITCHEROO_REPLACED_SIGNAL
names it) as soon as it is replaced, before the drain: a server that then answers every
request with `Connection: close` moves its keep-alive clients away before SIGTERM, so
none of them sends a request on a connection the server is closing.

If an argument contains {port} (one port) or {port:NAME} (NAME, or PORT/PROTO, of a
--port), the server binds its ports itself: it gets no socket and no LISTEN_* variables,
and the drain reads the accept queues from /proc/net/tcp.

A UDP port drains by its flows: conntrack keeps each flow (4-tuple) on the instance that
got its first datagram, so the old server goes on getting the datagrams of its flows
until they have been quiet for --drain-idle (rounded up to whole seconds, conntrack's
resolution) or --drain-max has passed; once it has exited, the flows still mapped to its
port are forgotten, so that they continue on the new instance.

Run it the same way again to deploy: the new instance switches the public port to its
server once that is ready, then sends SIGTERM to the previous switcheroo, which waits
until its server's accept queue has stayed empty for --drain-idle, forwards the signal,
and exits with the server's exit status. If the new server exits or is not ready within
--ready-timeout, nothing is switched, the previous version keeps serving, and run exits 3;
if the switch itself fails, the server is stopped and run exits 1.

With --probation, the previous instance stays warm below this one: if this one's server
exits, or fails 3 health checks in a row (--ready http:/PATH, probed every second), the
previous one serves again and run exits 4 saying which pid serves; a run that
`switcheroo rollback` removed exits 4 too. Stopped with SIGTERM while it serves, run first
removes its own rules, so that an instance below takes new connections at once.

Under systemd (Type=notify), switcheroo itself sends READY=1 once it has switched.";

/// Failed health checks in a row, during a probation, that roll an instance back.
pub const HEALTH_FAILURES: u32 = 3;
/// How often the health path is probed during a probation.
const HEALTH_INTERVAL: Duration = Duration::from_secs(1);

/// What `switcheroo run` was asked to do.
#[derive(Debug)]
pub struct Config {
    pub namespace: String,
    pub ports: Vec<PortArg>,
    pub range: RangeInclusive<u16>,
    pub routes: Routes,
    pub ready: Ready,
    pub ready_timeout: Duration,
    pub drain_idle: Duration,
    pub drain_max: Duration,
    pub kill_after: Option<Duration>,
    pub notify_replaced: Option<Signal>,
    pub fd_name: String,
    pub record_dir: Option<PathBuf>,
    pub probation: Option<Duration>,
    pub canary: Option<u8>,
    pub command: Vec<OsString>,
}

/// One `--port [NAME=]PORT[/tcp|/udp]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortArg {
    pub name: Option<String>,
    pub port: Port,
}

impl PortArg {
    /// Parses `[NAME=]PORT[/tcp|/udp]`; NAME is 1-64 characters of `[A-Za-z0-9_.-]` (it
    /// goes into the colon-separated LISTEN_FDNAMES).
    pub fn parse(s: &str) -> Result<PortArg, String> {
        let (name, port) = match s.split_once('=') {
            Some((name, port)) => {
                let valid = (1..=64).contains(&name.len())
                    && name
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b));
                if !valid {
                    return Err(format!(
                        "{s:?}: the name {name:?} must be 1-64 characters of [A-Za-z0-9_.-]"
                    ));
                }
                (Some(name.to_owned()), port)
            }
            None => (None, s),
        };
        Ok(PortArg {
            name,
            port: port.parse()?,
        })
    }
}

impl Config {
    /// The name of each port in LISTEN_FDNAMES, in order.
    fn names(&self) -> Vec<String> {
        self.ports
            .iter()
            .map(|p| p.name.clone().unwrap_or_else(|| self.fd_name.clone()))
            .collect()
    }

    /// Checks what clap cannot: distinct names, and placeholders that name a port.
    pub fn check(&self) -> Result<(), String> {
        for (i, p) in self.ports.iter().enumerate() {
            if let Some(name) = &p.name {
                if self.ports[..i]
                    .iter()
                    .any(|q| q.name.as_ref() == Some(name))
                {
                    return Err(format!("the port name {name:?} is given twice"));
                }
            }
        }
        let mappings: Vec<(Option<String>, Mapping)> = self
            .ports
            .iter()
            .map(|p| {
                let internal = 1;
                (
                    p.name.clone(),
                    Mapping {
                        public: p.port,
                        internal,
                    },
                )
            })
            .collect();
        for arg in &self.command[1..] {
            with_ports(arg, &mappings)?;
        }
        Ok(())
    }
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

/// How long a server that is stopped because the deploy failed gets before SIGKILL.
const ABORT_GRACE: Duration = Duration::from_secs(10);

/// Every way `run` ends other than with the server's own exit status. The message says
/// what happened and what still serves; [`Failure::exit_code`] is what a deploy script
/// sees.
#[derive(Debug, thiserror::Error)]
pub enum Failure {
    /// Setting up the wrapper itself failed (signals, the notify socket).
    #[error("{0}")]
    Setup(String),
    /// The library refused (bad input, permissions, netfilter) before anything started.
    #[error("{0}; nothing was switched")]
    Switcheroo(#[from] switcheroo::Error),
    /// The server could not be started.
    #[error("cannot start {name}: {source}; nothing was switched")]
    Spawn {
        name: String,
        source: std::io::Error,
    },
    /// The server exited before it was ready.
    #[error("{name} {status} before it was ready; nothing was switched, the running version keeps serving")]
    ExitedBeforeReady { name: String, status: String },
    /// The server was not ready in time; it was stopped.
    #[error("{name} was not ready after {timeout:?}{hint}; it was stopped, nothing was switched, the running version keeps serving")]
    NotReady {
        name: String,
        timeout: Duration,
        hint: &'static str,
    },
    /// SIGTERM or SIGINT arrived before the switch; the server was stopped.
    #[error("got {signal} before the switch; {name} was stopped, nothing was switched")]
    StoppedBeforeSwitch { name: String, signal: Signal },
    /// The server was ready but the switch failed; the server was stopped.
    #[error("the switch failed: {source}; {name} was stopped, the running version keeps serving")]
    SwitchFailed {
        name: String,
        source: switcheroo::Error,
    },
    /// This instance was rolled back; the server was stopped.
    #[error("{name} was rolled back ({why}); {serving} serves now")]
    RolledBack {
        name: String,
        why: String,
        serving: String,
    },
}

impl Failure {
    /// 1 for an error of switcheroo itself, 3 when the new server did not become ready
    /// (or was told to stop first): in both cases nothing was switched. 4 when the
    /// instance was rolled back after its switch.
    pub fn exit_code(&self) -> u8 {
        match self {
            Failure::Setup(_) | Failure::Switcheroo(_) | Failure::SwitchFailed { .. } => EXIT_ERROR,
            Failure::Spawn { .. }
            | Failure::ExitedBeforeReady { .. }
            | Failure::NotReady { .. }
            | Failure::StoppedBeforeSwitch { .. } => EXIT_NOT_READY,
            Failure::RolledBack { .. } => EXIT_ROLLED_BACK,
        }
    }
}

pub fn run(config: Config) -> ExitCode {
    let result = Wrapper::start(&config).and_then(|(wrapper, takeover)| {
        let mut wrapper = wrapper;
        wrapper.drive(&config, State::WaitingReady(takeover))
    });
    match result {
        Ok(status) => ExitCode::from(exit_code(status)),
        Err(failure) => {
            error!("{failure}");
            ExitCode::from(failure.exit_code())
        }
    }
}

/// Where the wrapper is in the life of its server.
enum State {
    /// The server runs on the internal port; the public port still leads elsewhere.
    WaitingReady(Takeover),
    /// The public port leads to the server.
    Serving,
    /// Retiring: waiting until the accept queue stays empty.
    Draining(Retire),
    /// The signal goes to the server; waiting for it to exit.
    Stopping {
        signal: Signal,
        kill_after: Option<Duration>,
    },
    /// The server exited with this status.
    Exited(WaitStatus),
}

/// Why the wrapper retires.
#[derive(Debug, Clone, Copy)]
enum Retire {
    /// SIGTERM or SIGINT arrived (from an operator, or from the deployer that replaced
    /// this instance): forwarded after the drain. Another one cuts the drain short.
    Signal(Signal),
    /// This instance's rules are gone (replaced or rolled back). The deployer's SIGTERM
    /// usually follows; it is the one forwarded, and only a second one cuts the drain short.
    Removed,
}

/// What woke the wrapper up.
#[derive(Debug)]
enum Event {
    Signal(Signal),
    ChildExited(WaitStatus),
    /// The notify socket has messages.
    Notified,
    /// The tenure's notifications or watched pidfd are readable, or its deadline passed:
    /// call `Tenure::check`.
    Tenure,
    /// The deadline passed.
    Timeout,
}

/// The one event source: a signalfd, the server's pidfd and the notify socket, polled
/// together up to a deadline.
struct Events {
    signals: SignalFd,
    pending: VecDeque<Signal>,
    child: Pid,
    child_fd: PidFd,
    child_state: ChildState,
    notify: Option<NotifySocket>,
}

/// Whether the server's exit has been seen and reported.
#[derive(Debug, Clone, Copy, PartialEq)]
enum ChildState {
    Running,
    /// Reaped; not yet returned by [`Events::next`].
    Exited(WaitStatus),
    /// Returned once; its pidfd is no longer watched.
    Reported,
}

impl Events {
    /// Waits until something happens or `deadline` passes (never, with `None`), watching
    /// `tenure` too when given.
    fn next(&mut self, deadline: Option<Instant>, tenure: Option<&Tenure>) -> Event {
        let tenure_deadline = tenure.and_then(Tenure::deadline);
        let deadline = match (deadline, tenure_deadline) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        loop {
            if let ChildState::Exited(status) = self.child_state {
                self.child_state = ChildState::Reported;
                return Event::ChildExited(status);
            }
            if let Some(signal) = self.pending.pop_front() {
                return Event::Signal(signal);
            }
            let timeout = match deadline {
                None => PollTimeout::NONE,
                Some(d) => {
                    let left = d.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        if tenure_deadline.is_some_and(|t| t <= Instant::now()) {
                            return Event::Tenure;
                        }
                        return Event::Timeout;
                    }
                    // Rounded up, so that a wake-up is never early.
                    let ms = left.as_micros().div_ceil(1000).min(i32::MAX as u128) as i32;
                    PollTimeout::try_from(ms).unwrap_or(PollTimeout::MAX)
                }
            };
            let watch_child = self.child_state == ChildState::Running;
            let mut fds = vec![PollFd::new(self.signals.as_fd(), PollFlags::POLLIN)];
            if watch_child {
                fds.push(PollFd::new(self.child_fd.as_fd(), PollFlags::POLLIN));
            }
            if let Some(notify) = &self.notify {
                fds.push(PollFd::new(notify.fd(), PollFlags::POLLIN));
            }
            let first_tenure_fd = fds.len();
            for fd in tenure.map(Tenure::fds).unwrap_or_default() {
                fds.push(PollFd::new(fd, PollFlags::POLLIN));
            }
            if let Err(e) = poll(&mut fds, timeout) {
                if e != nix::errno::Errno::EINTR {
                    warn!("poll: {e}");
                }
                continue;
            }
            let ready: Vec<bool> = fds
                .iter()
                .map(|fd| fd.revents().is_some_and(|r| !r.is_empty()))
                .collect();
            drop(fds);
            if watch_child && ready[1] {
                if let Some(status) = self.reap() {
                    self.child_state = ChildState::Exited(status);
                    continue;
                }
            }
            if ready[0] {
                while let Ok(Some(info)) = self.signals.read_signal() {
                    if let Ok(signal) = Signal::try_from(info.ssi_signo as i32) {
                        self.pending.push_back(signal);
                    }
                }
                continue;
            }
            if ready[first_tenure_fd..].iter().any(|r| *r) {
                return Event::Tenure;
            }
            if self.notify.is_some() && ready[first_tenure_fd - 1] {
                return Event::Notified;
            }
        }
    }

    /// The server's status if it has exited (reaping it).
    fn reap(&self) -> Option<WaitStatus> {
        match waitpid(self.child, Some(WaitPidFlag::WNOHANG)) {
            Ok(status @ (WaitStatus::Exited(..) | WaitStatus::Signaled(..))) => Some(status),
            Ok(_) => None,
            // ECHILD: reaped already, which only this function does.
            Err(_) => Some(WaitStatus::Exited(self.child, EXIT_ERROR.into())),
        }
    }
}

/// One port of the instance: where it leads, and our copy of its socket while the
/// server has it too (`None` once let go, or when the server binds its ports itself).
struct Held {
    mapping: Mapping,
    socket: Option<Socket>,
}

struct Wrapper {
    events: Events,
    sw: Switcheroo,
    ports: Vec<Held>,
    /// This instance's watch over its place, from the switch on.
    tenure: Option<Tenure>,
    /// Set when the instance was rolled back: how `run` ends once the server is stopped.
    rolled_back: Option<Failure>,
    name: String,
    /// The internal port of the first TCP port: the one `--ready http:` probes.
    http_port: Option<u16>,
    manager: Option<String>,
}

impl Wrapper {
    /// Everything up to a running server: signals, the switch's configuration and port,
    /// the readiness socket, the child.
    fn start(config: &Config) -> Result<(Wrapper, Takeover), Failure> {
        let mut mask = SigSet::empty();
        for signal in STOP.iter().chain(&FORWARD) {
            mask.add(*signal);
        }
        // Blocked before the child exists so that no signal is lost; the child unblocks
        // them all before it executes the server.
        let signals = mask
            .thread_block()
            .and_then(|()| {
                SignalFd::with_flags(&mask, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC)
            })
            .map_err(|e| Failure::Setup(format!("cannot set up signal handling: {e}")))?;

        config.check().map_err(Failure::Setup)?;
        let mut builder = Switcheroo::service(config.namespace.clone())
            .routes(config.routes)
            .port_range(config.range.clone());
        for p in &config.ports {
            builder = builder.port(p.port);
        }
        if let Some(dir) = &config.record_dir {
            builder = builder.record_dir(dir);
        }
        let sw = builder.build()?;
        // What would make the deploy look fine and fail anyway (a firewall that drops
        // redirected connections): said once, at the start.
        let target = switcheroo::check::Target {
            ports: config.ports.iter().map(|p| p.port).collect(),
            range: config.range.clone(),
        };
        match switcheroo::check::check(&target) {
            Ok(findings) => {
                for f in switcheroo::check::blockers(&findings) {
                    warn!(
                        "{}; fix: {} (switcheroo check says more)",
                        f.what,
                        f.fix.as_deref().unwrap_or("-")
                    );
                }
            }
            Err(e) => debug!("the host check failed: {e}"),
        }
        let http_port = config
            .ports
            .iter()
            .position(|p| p.port.protocol == Protocol::Tcp);
        if matches!(config.ready, Ready::Http(_)) && http_port.is_none() {
            return Err(Failure::Setup(
                "--ready http:/PATH probes a TCP port, and every --port is UDP; use --ready notify or delay:D".into(),
            ));
        }
        let (bound, takeover) = sw.begin_all()?;
        let mappings: Vec<Mapping> = bound.iter().map(|b| b.mapping()).collect();
        let http_port = http_port.map(|i| mappings[i].internal);
        let port = mappings[0].internal;

        let notify = match config.ready {
            Ready::Notify => Some(
                NotifySocket::bind()
                    .map_err(|e| Failure::Setup(format!("cannot create the notify socket: {e}")))?,
            ),
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
        env.push(("LISTEN_FDNAMES".into(), config.names().join(":").into()));
        env.push(("SWITCHEROO_PORT".into(), port.to_string().into()));
        let list: Vec<String> = mappings
            .iter()
            .map(|m| format!("{}={}", m.public, m.internal))
            .collect();
        env.push(("SWITCHEROO_PORTS".into(), list.join(",").into()));
        if let Some(signal) = config.notify_replaced {
            env.push(("SWITCHEROO_REPLACED_SIGNAL".into(), signal.as_str().into()));
        }
        if let Some(notify) = &notify {
            env.push(("NOTIFY_SOCKET".into(), notify.env_value().into()));
        }
        let named: Vec<(Option<String>, Mapping)> = config
            .ports
            .iter()
            .zip(&mappings)
            .map(|(p, m)| (p.name.clone(), *m))
            .collect();
        let args: Vec<OsString> = config.command[1..]
            .iter()
            .map(|a| with_ports(a, &named))
            .collect::<Result<_, _>>()
            .map_err(Failure::Setup)?;
        // A server that is told its ports binds them itself: it gets no socket, and ours
        // must be closed before it starts (the ports stay ours meanwhile: begin skips the
        // ports of this namespace's rules, and the random start makes a collision with
        // another deploy unlikely).
        let binds_itself = args.iter().zip(&config.command[1..]).any(|(a, b)| a != b);
        let ports: Vec<Held> = bound
            .into_iter()
            .map(|b| Held {
                mapping: b.mapping(),
                socket: (!binds_itself).then_some(b.socket),
            })
            .collect();
        let fds: Vec<_> = ports
            .iter()
            .filter_map(|h| h.socket.as_ref().map(|s| s.as_fd()))
            .collect();
        let name = config.command[0].to_string_lossy().into_owned();
        let child = Activation::new(config.command[0].clone(), args)
            .env(env)
            .spawn(&fds)
            .map_err(|source| Failure::Spawn {
                name: name.clone(),
                source,
            })?;
        // Our child stays a zombie until we reap it, so its pid cannot be reused before
        // the pidfd refers to it.
        let child_fd = PidFd::open(child.as_raw() as u32).map_err(|e| {
            let _ = kill(child, Signal::SIGKILL);
            let _ = waitpid(child, None);
            Failure::Setup(format!(
                "cannot watch {name} (pid {child}) with a pidfd: {e} (Linux 5.3+)"
            ))
        })?;
        drop(fds);
        let list: Vec<String> = mappings.iter().map(Mapping::to_string).collect();
        info!(
            "started {name} (pid {child}) on {}; waiting until it is ready ({})",
            list.join(", "),
            describe(&config.ready)
        );
        let wrapper = Wrapper {
            sw,
            tenure: None,
            rolled_back: None,
            events: Events {
                signals,
                pending: VecDeque::new(),
                child,
                child_fd,
                child_state: ChildState::Running,
                notify,
            },
            ports,
            name,
            http_port,
            manager,
        };
        Ok((wrapper, takeover))
    }

    /// Runs the states from `state` until the server has exited.
    fn drive(&mut self, config: &Config, mut state: State) -> Result<WaitStatus, Failure> {
        loop {
            state = match state {
                State::WaitingReady(takeover) => self.wait_ready(config, takeover)?,
                State::Serving => self.serve(config),
                State::Draining(why) => self.drain(config, why),
                State::Stopping { signal, kill_after } => self.stop(signal, kill_after),
                State::Exited(status) => {
                    self.forget_flows();
                    self.let_go();
                    return match self.rolled_back.take() {
                        Some(failure) => Err(failure),
                        None => Ok(status),
                    };
                }
            };
        }
    }

    /// Waits until the server is ready, then switches. Any other end stops the server and
    /// is a failure: nothing was switched.
    fn wait_ready(&mut self, config: &Config, takeover: Takeover) -> Result<State, Failure> {
        let started = Instant::now();
        let deadline = started + config.ready_timeout;
        let mut next_probe = started;
        loop {
            let now = Instant::now();
            let ready = match &config.ready {
                Ready::Delay(delay) => now >= started + *delay,
                Ready::Http(path) if now >= next_probe => {
                    let timeout = deadline
                        .saturating_duration_since(now)
                        .min(Duration::from_secs(1))
                        .max(Duration::from_millis(1));
                    next_probe = now + Duration::from_millis(100);
                    let port = self.http_port.expect("checked in start");
                    match ready::http_probe(port, path, timeout) {
                        Ok(true) => true,
                        Ok(false) => {
                            debug!("GET {path}: not 2xx yet");
                            false
                        }
                        Err(e) => {
                            debug!("GET {path}: {e}");
                            false
                        }
                    }
                }
                _ => false,
            };
            if ready {
                return self.switch(config, takeover);
            }
            let wake = match &config.ready {
                Ready::Delay(delay) => (started + *delay).min(deadline),
                Ready::Http(_) => next_probe.min(deadline),
                Ready::Notify => deadline,
            };
            match self.events.next(Some(wake), None) {
                Event::ChildExited(status) => {
                    self.let_go();
                    return Err(Failure::ExitedBeforeReady {
                        name: self.name.clone(),
                        status: describe_status(status),
                    });
                }
                Event::Signal(signal) if STOP.contains(&signal) => {
                    info!("got {signal} before the switch; stopping {}", self.name);
                    self.stop(signal, Some(ABORT_GRACE));
                    return Err(Failure::StoppedBeforeSwitch {
                        name: self.name.clone(),
                        signal,
                    });
                }
                Event::Signal(signal) => self.forward(signal),
                Event::Notified => {
                    let child = self.events.child;
                    if self.events.notify.as_ref().is_some_and(|n| n.ready(child)) {
                        return self.switch(config, takeover);
                    }
                }
                Event::Tenure => {}
                Event::Timeout if Instant::now() >= deadline => {
                    let hint = match &config.ready {
                        Ready::Notify => "; if it does not speak sd_notify, use --ready http:/PATH or --ready delay:DURATION",
                        _ => "",
                    };
                    warn!(
                        "{} was not ready after {:?}; stopping it",
                        self.name, config.ready_timeout
                    );
                    self.stop(Signal::SIGTERM, Some(ABORT_GRACE));
                    return Err(Failure::NotReady {
                        name: self.name.clone(),
                        timeout: config.ready_timeout,
                        hint,
                    });
                }
                Event::Timeout => {}
            }
        }
    }

    /// The server is ready: point the public port at it. A failed switch stops it.
    fn switch(&mut self, config: &Config, mut takeover: Takeover) -> Result<State, Failure> {
        if let Some(probation) = config.probation {
            takeover = takeover.probation(probation);
        }
        if let Some(percent) = config.canary {
            takeover = takeover.canary(percent);
        }
        let report = match takeover.commit() {
            Ok(report) => report,
            Err(source) => {
                error!("the switch failed: {source}; stopping {}", self.name);
                self.stop(Signal::SIGTERM, Some(ABORT_GRACE));
                return Err(Failure::SwitchFailed {
                    name: self.name.clone(),
                    source,
                });
            }
        };
        let ports: Vec<String> = report
            .mappings
            .iter()
            .map(|m| format!("port {} -> {}", m.public, m.internal))
            .collect();
        info!(
                "{name} is ready: {ports} in {us} µs ({attempts} attempt{s}); replaced {removed} rules, signalled {signalled:?}",
                name = self.name,
                ports = ports.join(", "),
                us = report.elapsed.as_micros(),
                attempts = report.attempts,
                s = if report.attempts == 1 { "" } else { "s" },
                removed = report.removed.len(),
                signalled = report.signalled,
        );
        if let Some(percent) = config.canary {
            info!(
                "{} is the canary: it takes {percent}% of new connections",
                self.name
            );
        }
        match Tenure::new(&self.sw, &report) {
            Ok(tenure) => self.tenure = Some(tenure),
            // The switch is done and serves; only the watch over it is missing.
            Err(e) => warn!("cannot watch this instance's place in the chain: {e}; a probation or rollback will not be followed"),
        }
        self.tell_manager(&format!(
            "READY=1\nSTATUS={} ({} pid {})",
            ports.join(", "),
            self.name,
            self.events.child
        ));
        Ok(State::Serving)
    }

    /// Serving until told to stop, replaced or rolled back (or until the server exits on
    /// its own), following this instance's place in the chain and, during a probation,
    /// its health.
    fn serve(&mut self, config: &Config) -> State {
        let mut failures = 0;
        let mut next_probe = Instant::now() + HEALTH_INTERVAL;
        loop {
            let probing = matches!(config.ready, Ready::Http(_))
                && self.tenure.as_ref().is_some_and(|t| t.deadline().is_some());
            let deadline = probing.then_some(next_probe);
            match self.events.next(deadline, self.tenure.as_ref()) {
                Event::ChildExited(status) => return self.server_exited(status),
                Event::Signal(signal) if STOP.contains(&signal) => {
                    // An operator's stop while serving: leave the chain first, so that an
                    // instance below takes new connections at once. Replaced or rolled
                    // back, the rules are gone already, and resign says by what.
                    match self.tenure.as_mut().map(Tenure::resign) {
                        Some(Ok(Resignation::Left { rules })) => {
                            info!("removed this instance's {rules} rules before stopping")
                        }
                        Some(Ok(Resignation::AlreadyRemoved {
                            rolled_back,
                            serving,
                        })) => self.removed(rolled_back, serving),
                        Some(Err(e)) => warn!("could not remove this instance's rules: {e}"),
                        None => {}
                    }
                    return State::Draining(Retire::Signal(signal));
                }
                Event::Signal(signal) => self.forward(signal),
                Event::Notified => self.discard_notifications(),
                Event::Tenure => {
                    if let Some(next) = self.follow_tenure() {
                        return next;
                    }
                }
                Event::Timeout => {
                    let Ready::Http(path) = &config.ready else {
                        continue;
                    };
                    next_probe = Instant::now() + HEALTH_INTERVAL;
                    let port = self.http_port.expect("checked in start");
                    match ready::http_probe(port, path, HEALTH_INTERVAL) {
                        Ok(true) => failures = 0,
                        other => {
                            failures += 1;
                            warn!(
                                "health check {failures}/{HEALTH_FAILURES} during the probation failed: {}",
                                match other {
                                    Ok(_) => format!("GET {path} did not answer 2xx"),
                                    Err(e) => format!("GET {path}: {e}"),
                                }
                            );
                        }
                    }
                    if failures >= HEALTH_FAILURES {
                        return self.roll_back(format!(
                            "{HEALTH_FAILURES} health checks in a row failed during the probation"
                        ));
                    }
                }
            }
        }
    }

    /// Handles what the tenure reports; the next state when this instance must retire.
    fn follow_tenure(&mut self) -> Option<State> {
        let tenure = self.tenure.as_mut()?;
        loop {
            let change = match tenure.check() {
                Ok(Some(change)) => change,
                Ok(None) => return None,
                Err(e) => {
                    warn!("reading this instance's place in the chain: {e}");
                    return None;
                }
            };
            match change {
                Change::Removed {
                    rolled_back,
                    serving,
                } => {
                    self.removed(rolled_back, serving);
                    // The deployer sends SIGTERM too; whichever comes first starts the drain.
                    return Some(State::Draining(Retire::Removed));
                }
                Change::Active { after } => match after {
                    Some(pid) => info!("pid {pid} above this instance is gone: {} takes every new connection again", self.name),
                    None => info!("{} takes every new connection", self.name),
                },
                Change::Below { role, above } => {
                    info!("pid {above} now takes new connections before {} ({role})", self.name)
                }
                Change::Promoted => info!("{} was promoted: it takes every new connection", self.name),
                Change::ProbationPassed { retired } => {
                    info!("the probation passed; the previous instance retires (signalled {retired:?})")
                }
            }
        }
    }

    /// This instance's rules were removed: says by what; a rollback sets the exit status.
    fn removed(&mut self, rolled_back: bool, serving: Option<u32>) {
        let serving = serving.map_or("nobody".to_owned(), |p| format!("pid {p}"));
        if rolled_back {
            info!("{} was rolled back; {serving} serves now", self.name);
            self.rolled_back = Some(Failure::RolledBack {
                name: self.name.clone(),
                why: "its rules were removed for an older instance".into(),
                serving,
            });
        } else {
            info!("{} was replaced; {serving} serves now", self.name);
        }
    }

    /// The server exited while serving. During a probation the standby below takes over:
    /// this instance leaves the chain and `run` exits 4; otherwise its status is passed on.
    fn server_exited(&mut self, status: WaitStatus) -> State {
        self.let_go();
        let public = self.public_ports();
        let below_warm = self.tenure.as_ref().is_some_and(|t| t.deadline().is_some());
        if let Some(tenure) = &mut self.tenure {
            if let Err(e) = tenure.resign() {
                warn!("could not remove this instance's rules: {e}");
            }
        }
        if below_warm {
            let why = format!(
                "its server {} during the probation",
                describe_status(status)
            );
            self.rolled_back = Some(Failure::RolledBack {
                name: self.name.clone(),
                why,
                serving: self.serving_now(),
            });
            return State::Exited(status);
        }
        match status {
            WaitStatus::Exited(_, 0) => warn!(
                "{} exited 0 on its own while serving; {public} refuses connections until the next deploy",
                self.name
            ),
            _ => error!(
                "{} {} while serving; {public} refuses connections until the next deploy",
                self.name,
                describe_status(status)
            ),
        }
        State::Exited(status)
    }

    /// Rolls this instance back on its own (its health failed during the probation): its
    /// rules go, the standby below serves again, and the server drains and stops.
    fn roll_back(&mut self, why: String) -> State {
        if let Some(tenure) = &mut self.tenure {
            if let Err(e) = tenure.resign() {
                warn!("could not remove this instance's rules: {e}");
            }
        }
        let serving = self.serving_now();
        warn!("{}: {why}; rolling back, {serving} serves now", self.name);
        self.rolled_back = Some(Failure::RolledBack {
            name: self.name.clone(),
            why,
            serving,
        });
        State::Draining(Retire::Removed)
    }

    /// Who gets new connections now, for messages.
    fn serving_now(&self) -> String {
        match self.sw.rules() {
            Ok(rules) => rules
                .iter()
                .find(|r| r.alive && r.weight.is_none())
                .and_then(|r| r.pid)
                .map_or("nobody".to_owned(), |p| format!("pid {p}")),
            Err(e) => format!("(unknown: {e})"),
        }
    }

    /// SIGTERM/SIGINT after the switch: keep the server accepting until the accept queue
    /// of each TCP port has stayed empty for the idle period, and answering until the
    /// flows of each UDP port have been quiet for it (a second signal cuts it short).
    fn drain(&mut self, config: &Config, why: Retire) -> State {
        self.tell_manager("STOPPING=1");
        if let Some(replaced) = config.notify_replaced {
            // Before the drain: keep-alive clients still send on their connections, and a
            // server told so answers them with `Connection: close` until SIGTERM.
            info!("telling {} it is being replaced ({replaced})", self.name);
            self.forward(replaced);
        }
        let what = "waiting until the accept queues stay empty and the UDP flows quiet";
        let mut signal = match why {
            Retire::Signal(signal) => {
                info!(
                    "got {signal}: {what} ({}), then stopping {}",
                    self.public_ports(),
                    self.name
                );
                Some(signal)
            }
            Retire::Removed => {
                info!(
                    "{what} ({}), then stopping {}",
                    self.public_ports(),
                    self.name
                );
                None
            }
        };
        let tcp = Drain::new()
            .idle(config.drain_idle)
            .max_wait(config.drain_max);
        let udp = FlowDrain::new()
            .idle(config.drain_idle)
            .max_wait(config.drain_max);
        let mut trackers: Vec<(usize, Tracker)> = self
            .ports
            .iter()
            .enumerate()
            .map(|(i, held)| {
                let tracker = match held.mapping.public.protocol {
                    Protocol::Tcp => Tracker::Tcp(tcp.tracker()),
                    Protocol::Udp => Tracker::Udp(udp.tracker(&self.sw, held.mapping.internal)),
                };
                (i, tracker)
            })
            .collect();
        // TCP queues are sampled every few milliseconds; UDP flows (a conntrack dump
        // each) every few hundred.
        let every = |udp: bool| {
            trackers.iter().find_map(|(_, tracker)| match tracker {
                Tracker::Tcp(t) if !udp => Some(t.interval()),
                Tracker::Udp(t) if udp => Some(t.interval()),
                _ => None,
            })
        };
        let (tcp_every, udp_every) = (every(false), every(true));
        let wake = tcp_every.into_iter().chain(udp_every).min();
        let wake = wake.expect("a service has at least one port");
        let mut next_udp = Instant::now();
        loop {
            let now = Instant::now();
            let udp_due = now >= next_udp;
            if let (true, Some(every)) = (udp_due, udp_every) {
                next_udp = now + every;
            }
            trackers.retain_mut(|(i, tracker)| {
                let held = &self.ports[*i];
                match self.sample(held, tracker, udp_due) {
                    Ok(Some(report)) => {
                        info!("port {} drained in {report}", held.mapping.public);
                        false
                    }
                    Ok(None) => true,
                    Err(e) => {
                        warn!(
                            "cannot follow port {} ({e}); stopping without its drain",
                            held.mapping.public
                        );
                        false
                    }
                }
            });
            if trackers.is_empty() {
                break;
            }
            match self.events.next(Some(Instant::now() + wake), None) {
                Event::ChildExited(status) => {
                    info!("{} {} during the drain", self.name, describe_status(status));
                    self.let_go();
                    return State::Exited(status);
                }
                Event::Signal(stop) if STOP.contains(&stop) && signal.is_none() => {
                    // The deployer's SIGTERM, after its rules were seen to go.
                    signal = Some(stop);
                }
                Event::Signal(again) if STOP.contains(&again) => {
                    info!("got {again} again: stopping without waiting for the drain");
                    break;
                }
                Event::Signal(other) => self.forward(other),
                Event::Notified => self.discard_notifications(),
                Event::Timeout | Event::Tenure => {}
            }
        }
        // Before the signal: from here on a datagram of a flow that was ours starts a new
        // flow, on the instance that serves now, and is answered from the public port;
        // only a datagram the server is handling at this very moment is answered from the
        // internal port, which its client drops. After the signal the server would be
        // gone for a while before its exit is seen, and every busy flow would lose its
        // datagrams to the closed port meanwhile.
        self.forget_flows();
        State::Stopping {
            signal: signal.unwrap_or(Signal::SIGTERM),
            kill_after: config.kill_after,
        }
    }

    /// One sample of a port's drain; UDP only when `udp_due` (each is a conntrack dump).
    fn sample(
        &self,
        held: &Held,
        tracker: &mut Tracker,
        udp_due: bool,
    ) -> Result<Option<String>, String> {
        match tracker {
            Tracker::Tcp(t) => {
                // Our copy of the socket if the server got it; else the queue is read
                // from /proc/net/tcp{,6} (a listening socket's rx_queue is its accept
                // queue).
                let report = match held.socket.as_ref().and_then(Socket::tcp) {
                    Some(listener) => t.check(listener),
                    None => t.check_port(held.mapping.internal),
                };
                Ok(report
                    .map_err(|e| format!("the accept queue: {e}"))?
                    .map(|r| {
                        format!(
                            "{} ms, longest accept queue {}{}",
                            r.waited.as_millis(),
                            r.max_queue,
                            if r.timed_out { ", gave up waiting" } else { "" }
                        )
                    }))
            }
            Tracker::Udp(t) if udp_due => Ok(t.check().map_err(|e| e.to_string())?.map(|r| {
                format!(
                    "{} ms, {} flows{}",
                    r.waited.as_millis(),
                    r.flows,
                    if r.timed_out {
                        format!(", gave up waiting for {} busy ones", r.busy)
                    } else {
                        String::new()
                    }
                )
            })),
            Tracker::Udp(_) => Ok(None),
        }
    }

    /// Lets go of our copies of the sockets, so that nobody holds a socket that nobody
    /// serves.
    fn let_go(&mut self) {
        for held in &mut self.ports {
            held.socket = None;
        }
    }

    /// Forgets the UDP flows still mapped to this instance's ports, once its rules are
    /// out of the chain, so that they continue on the instance that serves now.
    fn forget_flows(&mut self) {
        if self.tenure.is_none() {
            return; // never switched: no flow was ever redirected here
        }
        for held in &self.ports {
            if held.mapping.public.protocol != Protocol::Udp {
                continue;
            }
            let port = held.mapping.internal;
            match self.sw.forget_flows(port) {
                Ok(0) => {}
                Ok(n) => info!("forgot {n} UDP flows of internal port {port}"),
                Err(e) => warn!("cannot forget the UDP flows of internal port {port}: {e}"),
            }
        }
    }

    /// The public ports, as `port 80/tcp, port 443/udp`.
    fn public_ports(&self) -> String {
        let list: Vec<String> = self
            .ports
            .iter()
            .map(|h| format!("port {}", h.mapping.public))
            .collect();
        list.join(", ")
    }

    /// Forwards `signal`, lets go of our copies of the sockets (so that nobody holds a
    /// socket that nobody serves), and waits for the server; SIGKILL after `kill_after`.
    fn stop(&mut self, signal: Signal, kill_after: Option<Duration>) -> State {
        self.forward(signal);
        self.let_go();
        let mut deadline = kill_after.map(|d| Instant::now() + d);
        loop {
            match self.events.next(deadline, None) {
                Event::ChildExited(status) => {
                    info!("{} {}", self.name, describe_status(status));
                    return State::Exited(status);
                }
                Event::Tenure => {}
                Event::Timeout => {
                    warn!(
                        "{} still runs {:?} after {signal}: SIGKILL",
                        self.name,
                        kill_after.unwrap_or_default()
                    );
                    self.forward(Signal::SIGKILL);
                    deadline = None;
                }
                Event::Signal(other) => self.forward(other),
                Event::Notified => self.discard_notifications(),
            }
        }
    }

    fn discard_notifications(&self) {
        if let Some(notify) = &self.events.notify {
            notify.ready(self.events.child);
        }
    }

    fn forward(&self, signal: Signal) {
        let child = self.events.child;
        debug!("forwarding {signal} to {child}");
        // The pidfd names exactly our server, even after it exited (then ESRCH).
        if let Err(e) = self.events.child_fd.send_signal(signal as i32) {
            if e != nix::errno::Errno::ESRCH {
                warn!("cannot send {signal} to {} (pid {child}): {e}", self.name);
            }
        }
    }

    /// Tells the service manager that started `switcheroo run` (when `NOTIFY_SOCKET` was
    /// set) how it is doing.
    fn tell_manager(&self, state: &str) {
        if let Some(socket) = &self.manager {
            if let Err(e) = switcheroo::activation::notify_to(socket, state) {
                warn!("could not notify the service manager at {socket}: {e}");
            }
        }
    }
}

/// A drain in progress, per port.
enum Tracker {
    Tcp(DrainTracker),
    Udp(FlowTracker),
}

/// `arg` with every `{port}` (only with one port) and `{port:X}` (X the NAME of a port,
/// or its PORT/PROTO, or its PORT for TCP) replaced by that port's internal port.
fn with_ports(arg: &OsString, ports: &[(Option<String>, Mapping)]) -> Result<OsString, String> {
    let bytes = arg.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let rest = &bytes[i..];
        let placeholder = if rest.starts_with(b"{port}") {
            Some((b"{port}".len(), None))
        } else if rest.starts_with(b"{port:") {
            rest.iter().position(|b| *b == b'}').map(|end| {
                let key = String::from_utf8_lossy(&rest[b"{port:".len()..end]).into_owned();
                (end + 1, Some(key))
            })
        } else {
            None
        };
        let Some((len, key)) = placeholder else {
            out.push(bytes[i]);
            i += 1;
            continue;
        };
        let mapping = match &key {
            None if ports.len() == 1 => &ports[0].1,
            None => {
                return Err(format!(
                    "{{port}} in {:?} is ambiguous with {} ports; name one: {{port:NAME}} or {{port:PORT/PROTO}}",
                    arg.to_string_lossy(),
                    ports.len()
                ))
            }
            Some(key) => {
                let spec: Option<Port> = key.parse().ok();
                &ports
                    .iter()
                    .find(|(name, m)| name.as_deref() == Some(key) || spec == Some(m.public))
                    .ok_or_else(|| {
                        format!(
                            "{{port:{key}}} in {:?} names no --port (give NAME=PORT, or write the PORT/PROTO of one)",
                            arg.to_string_lossy()
                        )
                    })?
                    .1
            }
        };
        out.extend_from_slice(mapping.internal.to_string().as_bytes());
        i += len;
    }
    Ok(OsString::from_vec(out))
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

    fn mapping(public: Port, internal: u16) -> Mapping {
        Mapping { public, internal }
    }

    #[test]
    fn port_placeholder() {
        let one = [(None, mapping(Port::tcp(80), 40401))];
        let with_port = |arg: &str| with_ports(&arg.into(), &one).unwrap();
        assert_eq!(with_port("--bind=[::]:{port}"), "--bind=[::]:40401");
        assert_eq!(with_port("{port}{port}"), "4040140401");
        assert_eq!(with_port("{por}"), "{por}");
        assert_eq!(with_port("{port:80}"), "40401");
    }

    #[test]
    fn named_port_placeholders() {
        let ports = [
            (Some("http".to_owned()), mapping(Port::tcp(80), 7)),
            (None, mapping(Port::udp(443), 8)),
            (Some("h2".to_owned()), mapping(Port::tcp(443), 9)),
        ];
        let sub = |arg: &str| with_ports(&arg.into(), &ports);
        assert_eq!(
            sub("{port:http},{port:443/udp},{port:h2},{port:443}").unwrap(),
            "7,8,9,9"
        );
        assert!(sub("{port}").unwrap_err().contains("ambiguous"));
        assert!(sub("{port:nope}").unwrap_err().contains("names no --port"));
        assert_eq!(sub("{port:unclosed").unwrap(), "{port:unclosed");
    }

    #[test]
    fn port_arguments() {
        assert_eq!(
            PortArg::parse("h3=443/udp"),
            Ok(PortArg {
                name: Some("h3".into()),
                port: Port::udp(443)
            })
        );
        assert_eq!(
            PortArg::parse("8080"),
            Ok(PortArg {
                name: None,
                port: Port::tcp(8080)
            })
        );
        for bad in ["a:b=80", "=80", "x=0", "x=80/sctp", "x=y"] {
            assert!(PortArg::parse(bad).is_err(), "{bad}");
        }
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

    #[test]
    fn every_failure_exits_non_zero() {
        let name = String::from("server");
        let failures = [
            Failure::Setup("x".into()),
            Failure::Switcheroo(switcheroo::Error::InvalidPort),
            Failure::Spawn {
                name: name.clone(),
                source: std::io::ErrorKind::NotFound.into(),
            },
            Failure::ExitedBeforeReady {
                name: name.clone(),
                status: "exited with status 0".into(),
            },
            Failure::NotReady {
                name: name.clone(),
                timeout: Duration::from_secs(1),
                hint: "",
            },
            Failure::StoppedBeforeSwitch {
                name: name.clone(),
                signal: Signal::SIGTERM,
            },
            Failure::SwitchFailed {
                name: name.clone(),
                source: switcheroo::Error::NoRoutes,
            },
            Failure::RolledBack {
                name,
                why: "x".into(),
                serving: "pid 1".into(),
            },
        ];
        let codes: Vec<u8> = failures.iter().map(Failure::exit_code).collect();
        assert_eq!(codes, [1, 1, 3, 3, 3, 3, 1, 4]);
    }
}
