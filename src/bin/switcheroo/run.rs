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
use std::net::TcpListener;
use std::ops::RangeInclusive;
use std::os::fd::AsFd;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};
use switcheroo::{Change, Drain, Resignation, Routes, Switcheroo, Takeover, Tenure};
use switcheroo_sys::spawn::Activation;
use switcheroo_sys::PidFd;

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
    pub port: u16,
    pub range: RangeInclusive<u16>,
    pub routes: Routes,
    pub ready: Ready,
    pub ready_timeout: Duration,
    pub drain: Drain,
    pub kill_after: Option<Duration>,
    pub fd_name: String,
    pub record_dir: Option<PathBuf>,
    pub probation: Option<Duration>,
    pub canary: Option<u8>,
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

struct Wrapper {
    events: Events,
    sw: Switcheroo,
    /// This instance's watch over its place, from the switch on.
    tenure: Option<Tenure>,
    /// Set when the instance was rolled back: how `run` ends once the server is stopped.
    rolled_back: Option<Failure>,
    /// Our copy of the listening socket, while the server has it too.
    listener: Option<TcpListener>,
    name: String,
    port: u16,
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

        let mut builder = Switcheroo::builder(config.namespace.clone(), config.port)
            .routes(config.routes)
            .port_range(config.range.clone());
        if let Some(dir) = &config.record_dir {
            builder = builder.record_dir(dir);
        }
        let sw = builder.build()?;
        let (listener, takeover) = sw.begin()?;
        let port = takeover.port();

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
        let listener = (!binds_itself).then_some(listener);
        let name = config.command[0].to_string_lossy().into_owned();
        let child = Activation::new(config.command[0].clone(), args)
            .env(env)
            .spawn(listener.as_ref().map(|l| l.as_fd()))
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
        info!(
            "started {name} (pid {child}) on internal port {port}; waiting until it is ready ({})",
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
            listener,
            name,
            port,
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
                    return match self.rolled_back.take() {
                        Some(failure) => Err(failure),
                        None => Ok(status),
                    }
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
                    match ready::http_probe(self.port, path, timeout) {
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
                    self.listener = None;
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
        info!(
                "{name} is ready: port {public} -> {port} in {us} µs ({attempts} attempt{s}); replaced {removed} rules, signalled {signalled:?}",
                name = self.name,
                public = config.port,
                port = report.port,
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
            "READY=1\nSTATUS=port {} -> {} ({} pid {})",
            config.port, self.port, self.name, self.events.child
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
                Event::ChildExited(status) => return self.server_exited(config, status),
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
                    match ready::http_probe(self.port, path, HEALTH_INTERVAL) {
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
    fn server_exited(&mut self, config: &Config, status: WaitStatus) -> State {
        self.listener = None;
        let public = config.port;
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
                "{} exited 0 on its own while serving; port {public} refuses connections until the next deploy",
                self.name
            ),
            _ => error!(
                "{} {} while serving; port {public} refuses connections until the next deploy",
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

    /// SIGTERM/SIGINT after the switch: keep the server accepting until its accept queue
    /// has stayed empty for the idle period (a second signal cuts it short).
    fn drain(&mut self, config: &Config, why: Retire) -> State {
        self.tell_manager("STOPPING=1");
        let mut signal = match why {
            Retire::Signal(signal) => {
                info!(
                    "got {signal}: waiting until the accept queue of port {} stays empty, then stopping {}",
                    self.port, self.name
                );
                Some(signal)
            }
            Retire::Removed => {
                info!(
                    "waiting until the accept queue of port {} stays empty, then stopping {}",
                    self.port, self.name
                );
                None
            }
        };
        let mut tracker = config.drain.tracker();
        loop {
            // Our copy of the socket if the server got it; else the queue is read from
            // /proc/net/tcp{,6} (a listening socket's rx_queue is its accept queue).
            let sample = match &self.listener {
                Some(listener) => tracker.check(listener),
                None => tracker.check_port(self.port),
            };
            match sample {
                Ok(Some(report)) => {
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
                    break;
                }
                Ok(None) => {}
                Err(e) => {
                    warn!("cannot read the accept queue ({e}); stopping without a drain");
                    break;
                }
            }
            match self
                .events
                .next(Some(Instant::now() + tracker.interval()), None)
            {
                Event::ChildExited(status) => {
                    info!("{} {} during the drain", self.name, describe_status(status));
                    self.listener = None;
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
        State::Stopping {
            signal: signal.unwrap_or(Signal::SIGTERM),
            kill_after: config.kill_after,
        }
    }

    /// Forwards `signal`, lets go of our copy of the listener (so that nobody holds a
    /// socket that nobody accepts on), and waits for the server; SIGKILL after
    /// `kill_after`.
    fn stop(&mut self, signal: Signal, kill_after: Option<Duration>) -> State {
        self.forward(signal);
        self.listener = None;
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
