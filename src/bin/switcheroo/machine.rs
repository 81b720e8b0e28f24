//! `switcheroo run` as one state machine: [`Run::next_event`] is the one place that waits
//! (signals, the server's exit, the notify socket, the probe, the tenure, timers: sources
//! named by tokens, [`switcheroo::poll::wait`], the wait the library's `Tenure` uses too),
//! and [`Run::step`] is the one transition function, `(State, Event) -> State`, one method
//! per state. How `run` ends travels in the states (an [`Ending`]) down to
//! [`State::Done`], whose [`Exit`] decides the status.

use crate::args::{Config, Ready};
use crate::drain::{Drains, Held};
use crate::exit::Exit;
use crate::probe::{NotifySocket, Probe, Verdict};
use crate::tree;
use log::{debug, error, info, warn};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::wait::WaitStatus;
use nix::unistd::Pid;
use std::collections::VecDeque;
use std::ffi::OsString;
use std::os::fd::AsFd;
use std::time::{Duration, Instant};
use switcheroo::poll::{Source, Token};
use switcheroo::{Change, Mapping, Protocol, Resignation, Switcheroo, Takeover, Tenure};
use switcheroo_sys::spawn::Activation;
use switcheroo_sys::PidFd;

/// Failed health checks in a row, during a probation, that roll an instance back.
pub const HEALTH_FAILURES: u32 = 3;
/// How often the health path is probed during a probation (and how long a probe may take).
const HEALTH_INTERVAL: Duration = Duration::from_secs(1);
/// How often the readiness probe is repeated until the server answers 2xx.
const READY_PROBE_INTERVAL: Duration = Duration::from_millis(100);
/// How long one readiness probe may take.
const READY_PROBE_TIMEOUT: Duration = Duration::from_secs(1);
/// How long a server that never served (not ready, stopped before the switch, a failed
/// switch) gets to exit after its stop signal before SIGKILL: it holds no client.
const ABORT_GRACE: Duration = Duration::from_secs(1);
/// After this long without READY=1 (with --ready notify), a hint names the other modes.
const NOTIFY_HINT_AFTER: Duration = Duration::from_secs(5);
/// How often a retiring instance says what it still holds.
const PROGRESS_EVERY: Duration = Duration::from_secs(5);
/// How often a stopping instance forgets the connections its server reset (see
/// [`Switcheroo::forget_closed`]): a client that reuses such a connection's port within
/// 10 s would otherwise be sent to the closed port. At least this far apart; further
/// after a slow sweep (a conntrack dump walks the whole table: see [`Chores::swept`]).
const SWEEP_EVERY: Duration = Duration::from_millis(100);

/// Signals that end the service gracefully: drained, then the stop signal.
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

/// Tokens of the sources [`Run::next_event`] waits on.
const SIGNALS: Token = Token(0);
const SERVER: Token = Token(1);
const NOTIFY: Token = Token(2);
const PROBE: Token = Token(3);
const TENURE: Token = Token(4);

/// Every way `run` ends other than with the server's own exit status. The message says
/// what happened and what still serves; [`Failure::exit`] is what a deploy script sees.
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
    #[error("{name} was not ready after {timeout:?}{last}{hint}; it was stopped, nothing was switched, the running version keeps serving")]
    NotReady {
        name: String,
        timeout: Duration,
        /// `; the last probe: GET / answered 400 Bad Request`, or nothing.
        last: String,
        hint: &'static str,
    },
    /// SIGTERM or SIGINT arrived before the switch; the server was stopped.
    #[error("told to stop ({signal}) before the switch; {name} was stopped, nothing was switched")]
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
    /// How `run` ends for this failure.
    pub fn exit(&self) -> Exit {
        match self {
            Failure::Switcheroo(e) if e.is_bad_input() => Exit::Usage,
            Failure::Setup(_) | Failure::Switcheroo(_) | Failure::SwitchFailed { .. } => {
                Exit::Failed
            }
            Failure::Spawn { .. }
            | Failure::ExitedBeforeReady { .. }
            | Failure::NotReady { .. }
            | Failure::StoppedBeforeSwitch { .. } => Exit::NotReady,
            Failure::RolledBack { .. } => Exit::RolledBack,
        }
    }
}

/// How `run` will end once the server's tree is gone.
#[derive(Debug)]
pub enum Ending {
    /// With the server's own status.
    Status,
    /// With this failure, whatever the server's status.
    Failure(Failure),
}

/// Where the wrapper is in the life of its server.
pub enum State {
    /// The server runs on the internal ports; the public ports still lead elsewhere.
    Starting(Starting),
    /// The public ports lead to the server (or it is the standby or the canary).
    Serving(Serving),
    /// Out of the chain: waiting until the accept queues stay empty and the flows quiet.
    Draining(Draining),
    /// The stop signal went to the server; waiting for it to exit.
    Stopping(Stopping),
    /// The server exited; waiting for the processes it left behind.
    Reaping(Reaping),
    /// Done.
    Done(Exit),
}

pub struct Starting {
    takeover: Takeover,
    since: Instant,
    deadline: Instant,
    probe: Option<Box<Probe>>,
    next_probe: Instant,
    /// The last probe's verdict, for the message at the timeout.
    last: Option<String>,
    hinted: bool,
}

pub struct Serving {
    /// Health checks, during a probation with a probing --ready.
    health: Option<Health>,
}

pub struct Health {
    failures: u32,
    probe: Option<Box<Probe>>,
    next: Instant,
}

pub struct Draining {
    drains: Drains,
    /// The deployer's SIGTERM arrived (it follows the removal of the rules): a second
    /// one cuts the drain short.
    signalled: bool,
    ending: Ending,
}

pub struct Stopping {
    chores: Chores,
    ending: Ending,
}

pub struct Reaping {
    status: WaitStatus,
    chores: Chores,
    ending: Ending,
}

/// What a stopping instance does on a clock, in one place: its deadline is the soonest of
/// them, and [`Chores::due`] moves on each one that is due, so none can be forgotten.
#[derive(Debug, Clone, Copy)]
pub struct Chores {
    /// SIGKILL to the whole tree (`--kill-after`), once.
    kill_at: Option<Instant>,
    /// Say what the instance still holds.
    report_at: Instant,
    /// Forget the connections the server reset.
    sweep_at: Instant,
}

/// The chores that were due.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Due {
    kill: bool,
    report: bool,
    sweep: bool,
}

impl Chores {
    fn new(kill_at: Option<Instant>, now: Instant) -> Chores {
        Chores {
            kill_at,
            report_at: now + PROGRESS_EVERY,
            sweep_at: now + SWEEP_EVERY,
        }
    }

    /// The soonest chore.
    fn next(&self) -> Instant {
        let next = self.report_at.min(self.sweep_at);
        self.kill_at.map_or(next, |k| k.min(next))
    }

    /// The chores due at `now`, each moved on to its next time (the kill to never).
    fn due(&mut self, now: Instant) -> Due {
        let mut due = Due::default();
        if self.kill_at.is_some_and(|at| now >= at) {
            self.kill_at = None;
            due.kill = true;
        }
        if now >= self.report_at {
            self.report_at = now + PROGRESS_EVERY;
            due.report = true;
        }
        if now >= self.sweep_at {
            self.sweep_at = now + SWEEP_EVERY;
            due.sweep = true;
        }
        due
    }

    /// A sweep ended at `now` after `took`: the next one comes [`SWEEP_EVERY`] later, or
    /// four times what this one took if that is longer, so that dumping a large conntrack
    /// table costs a stopping `run` at most a fifth of its time.
    fn swept(&mut self, now: Instant, took: Duration) {
        self.sweep_at = now + SWEEP_EVERY.max(took * 4);
    }
}

/// What woke the wrapper up.
#[derive(Debug)]
pub enum Event {
    Signal(Signal),
    /// The server itself exited (reaped).
    ServerExited(WaitStatus),
    /// A process of the server's tree left to `run` exited (reaped).
    Reaped,
    /// The notify socket has messages.
    Notified,
    /// The probe's socket is ready.
    Probe,
    /// The tenure's notifications or watched pidfd are readable.
    Tenure,
    /// The state's deadline passed.
    Timer,
}

/// The server `run` started.
struct Server {
    pid: Pid,
    fd: PidFd,
    name: String,
    /// Reaped, with this status.
    exited: Option<WaitStatus>,
}

/// Everything a state acts on.
pub struct Run {
    config: Config,
    sw: Switcheroo,
    held: Vec<Held>,
    server: Server,
    signals: SignalFd,
    notify: Option<NotifySocket>,
    /// `NOTIFY_SOCKET` of `run` itself (under systemd, Type=notify).
    manager: Option<String>,
    /// This instance's watch over its place, from the switch on.
    tenure: Option<Tenure>,
    /// The internal port of the first TCP port: the one `--ready http(s):` probes.
    probe_port: Option<u16>,
    pending: VecDeque<Event>,
}

/// Runs `config` to its end.
pub fn run(config: Config) -> Exit {
    let (mut run, mut state) = match Run::start(config) {
        Ok(started) => started,
        Err(failure) => {
            error!("{failure}");
            return failure.exit();
        }
    };
    loop {
        if let State::Done(exit) = state {
            return exit;
        }
        let event = run.next_event(&state);
        state = run.step(state, event);
    }
}

impl Run {
    /// Everything up to a running server: signals, the subreaper, the service and its
    /// ports, the readiness socket, the child.
    fn start(config: Config) -> Result<(Run, State), Failure> {
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
            .map_err(|e| Failure::Setup(format!("cannot set up signal handling: {e}")))?;
        tree::become_subreaper().map_err(Failure::Setup)?;

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
        if !config.misplaced.is_empty() {
            warn!(
                "{} after the command {:?} {} passed to the server; options of run go before the command (switcheroo run [OPTIONS] -- COMMAND ...)",
                config.misplaced.join(" "),
                config.program.to_string_lossy(),
                if config.misplaced.len() == 1 { "is" } else { "are" }
            );
        }
        // A port another namespace serves is refused before anything starts (the commit
        // refuses it again, under its lock, should one appear meanwhile).
        if let Some(held) = sw.port_held(config.move_from.as_deref())? {
            return Err(Failure::Switcheroo(held));
        }
        warn_about_the_host(&sw);
        let (bound, takeover) = sw.begin_all()?;
        let mappings: Vec<Mapping> = bound.iter().map(|b| b.mapping()).collect();
        let probe_port = config
            .ports
            .iter()
            .position(|p| p.port.protocol == Protocol::Tcp)
            .map(|i| mappings[i].internal);
        let notify = match config.ready {
            Ready::Notify => Some(
                NotifySocket::bind()
                    .map_err(|e| Failure::Setup(format!("cannot create the notify socket: {e}")))?,
            ),
            _ => None,
        };
        let env = environment(&config, &mappings, notify.as_ref());
        // A server that is told its ports binds them itself: it gets no socket, and ours
        // must be closed before it starts (the ports stay ours meanwhile: begin skips the
        // ports of switcheroo rules, and the random start makes a collision with another
        // deploy unlikely).
        let binds_itself = config.binds_itself();
        let held: Vec<Held> = bound
            .into_iter()
            .map(|b| Held {
                mapping: b.mapping(),
                socket: (!binds_itself).then_some(b.socket),
            })
            .collect();
        let fds: Vec<_> = held
            .iter()
            .filter_map(|h| h.socket.as_ref().map(|s| s.as_fd()))
            .collect();
        let name = config.program.to_string_lossy().into_owned();
        let pid = Activation::new(config.program.clone(), config.render_args(&mappings))
            .env(env)
            .spawn(&fds)
            .map_err(|source| Failure::Spawn {
                name: name.clone(),
                source,
            })?;
        drop(fds);
        // Our child stays a zombie until we reap it, so its pid cannot be reused before
        // the pidfd refers to it.
        let fd = PidFd::open(pid.as_raw() as u32).map_err(|e| {
            let _ = nix::sys::signal::kill(pid, Signal::SIGKILL);
            let _ = nix::sys::wait::waitpid(pid, None);
            Failure::Setup(format!(
                "cannot watch {name} (pid {pid}) with a pidfd: {e} (Linux 5.3+)"
            ))
        })?;
        let list: Vec<String> = mappings.iter().map(Mapping::to_string).collect();
        info!(
            "started {name} (pid {pid}) on {}; waiting until it is ready ({})",
            list.join(", "),
            config.ready
        );
        let now = Instant::now();
        let state = State::Starting(Starting {
            takeover,
            since: now,
            deadline: now + config.ready_timeout,
            probe: None,
            next_probe: now,
            last: None,
            hinted: false,
        });
        let run = Run {
            manager: std::env::var("NOTIFY_SOCKET").ok(),
            config,
            sw,
            held,
            server: Server {
                pid,
                fd,
                name,
                exited: None,
            },
            signals,
            notify,
            tenure: None,
            probe_port,
            pending: VecDeque::new(),
        };
        run.tell_manager(&format!(
            "STATUS=starting {} (pid {pid}); waiting until {}",
            run.server.name, run.config.ready
        ));
        Ok((run, state))
    }

    /// Waits for the next thing that happens in `state`: the sources that matter there,
    /// up to its deadline.
    fn next_event(&mut self, state: &State) -> Event {
        loop {
            if let Some(event) = self.pending.pop_front() {
                return event;
            }
            let mut sources = vec![Source::readable(SIGNALS, self.signals.as_fd())];
            if self.server.exited.is_none() {
                sources.push(Source::readable(SERVER, self.server.fd.as_fd()));
            }
            let mut deadline = None;
            let mut sooner = |at: Instant| {
                deadline = Some(deadline.map_or(at, |d: Instant| d.min(at)));
            };
            match state {
                State::Starting(s) => {
                    if let Some(notify) = &self.notify {
                        sources.push(Source::readable(NOTIFY, notify.fd()));
                    }
                    match &s.probe {
                        Some(probe) => {
                            sources.push(probe.source(PROBE));
                            sooner(probe.deadline());
                        }
                        None if self.config.ready.probe().is_some() => sooner(s.next_probe),
                        None => {}
                    }
                    if let Ready::Delay(delay) = self.config.ready {
                        sooner(s.since + delay);
                    }
                    if matches!(self.config.ready, Ready::Notify) && !s.hinted {
                        sooner(s.since + NOTIFY_HINT_AFTER);
                    }
                    sooner(s.deadline);
                }
                State::Serving(s) => {
                    if let Some(tenure) = &self.tenure {
                        for fd in tenure.fds() {
                            sources.push(Source::readable(TENURE, fd));
                        }
                        if let Some(at) = tenure.deadline() {
                            sooner(at);
                        }
                    }
                    if let Some(health) = &s.health {
                        match &health.probe {
                            Some(probe) => {
                                sources.push(probe.source(PROBE));
                                sooner(probe.deadline());
                            }
                            None => sooner(health.next),
                        }
                    }
                }
                State::Draining(d) => sooner(d.drains.next_sample()),
                State::Stopping(s) => sooner(s.chores.next()),
                State::Reaping(r) => sooner(r.chores.next()),
                State::Done(_) => {}
            }
            let ready = match switcheroo::poll::wait(&sources, deadline) {
                Ok(ready) => ready,
                Err(e) => {
                    warn!("poll: {e}");
                    continue;
                }
            };
            drop(sources);
            if ready.is_empty() {
                return Event::Timer;
            }
            for token in ready {
                match token {
                    SIGNALS => self.read_signals(),
                    SERVER => self.reap(),
                    NOTIFY => self.pending.push_back(Event::Notified),
                    PROBE => self.pending.push_back(Event::Probe),
                    TENURE if !self.pending.iter().any(|e| matches!(e, Event::Tenure)) => {
                        self.pending.push_back(Event::Tenure)
                    }
                    _ => {}
                }
            }
            // A source that is ready again and again must not starve the clock either.
            if deadline.is_some_and(|d| Instant::now() >= d) {
                self.pending.push_back(Event::Timer);
            }
        }
    }

    fn read_signals(&mut self) {
        while let Ok(Some(info)) = self.signals.read_signal() {
            match Signal::try_from(info.ssi_signo as i32) {
                Ok(Signal::SIGCHLD) => self.reap(),
                Ok(signal) => self.pending.push_back(Event::Signal(signal)),
                Err(_) => {}
            }
        }
    }

    /// Reaps whatever child exited: the server (once), or a process of its tree.
    fn reap(&mut self) {
        let reaped = tree::reap(self.server.pid);
        if let Some(status) = reaped.server {
            if self.server.exited.is_none() {
                self.server.exited = Some(status);
                self.pending.push_back(Event::ServerExited(status));
                return;
            }
        }
        self.pending.push_back(Event::Reaped);
    }

    /// The one transition function.
    fn step(&mut self, state: State, event: Event) -> State {
        debug!("event {event:?}");
        match state {
            State::Starting(s) => self.starting(s, event),
            State::Serving(s) => self.serving(s, event),
            State::Draining(d) => self.draining(d, event),
            State::Stopping(s) => self.stopping(s, event),
            State::Reaping(r) => self.reaping(r, event),
            done @ State::Done(_) => done,
        }
    }

    fn starting(&mut self, mut s: Starting, event: Event) -> State {
        match event {
            Event::Signal(signal) if STOP.contains(&signal) => {
                info!(
                    "got {signal} before the switch; stopping {}",
                    self.server.name
                );
                self.abort(Failure::StoppedBeforeSwitch {
                    name: self.server.name.clone(),
                    signal,
                })
            }
            Event::Signal(signal) => {
                self.forward(signal);
                State::Starting(s)
            }
            Event::ServerExited(status) => {
                let failure = Failure::ExitedBeforeReady {
                    name: self.server.name.clone(),
                    status: describe_status(status),
                };
                self.server_gone(status, Ending::Failure(failure))
            }
            Event::Notified => {
                let ready = self
                    .notify
                    .as_ref()
                    .is_some_and(|n| n.ready(self.server.pid));
                if ready {
                    self.switch(s.takeover)
                } else {
                    State::Starting(s)
                }
            }
            Event::Probe | Event::Timer => {
                let now = Instant::now();
                if let Some(verdict) = s.probe.as_mut().and_then(|p| p.advance()) {
                    s.probe = None;
                    s.next_probe = now + READY_PROBE_INTERVAL;
                    match verdict {
                        Verdict::Healthy => return self.switch(s.takeover),
                        Verdict::Unhealthy(why) => {
                            debug!("not ready yet: {why}");
                            s.last = Some(why);
                        }
                    }
                }
                if let Ready::Delay(delay) = self.config.ready {
                    if now >= s.since + delay {
                        return self.switch(s.takeover);
                    }
                }
                if now >= s.deadline {
                    let hint = match self.config.ready {
                        Ready::Notify => "; if it does not speak sd_notify, use --ready http:/PATH, https:/PATH or delay:DURATION",
                        _ => "",
                    };
                    let last = s
                        .last
                        .map_or(String::new(), |l| format!("; the last probe: {l}"));
                    warn!(
                        "{} was not ready after {:?}; stopping it",
                        self.server.name, self.config.ready_timeout
                    );
                    return self.abort(Failure::NotReady {
                        name: self.server.name.clone(),
                        timeout: self.config.ready_timeout,
                        last,
                        hint,
                    });
                }
                if matches!(self.config.ready, Ready::Notify)
                    && !s.hinted
                    && now >= s.since + NOTIFY_HINT_AFTER
                {
                    s.hinted = true;
                    warn!(
                        "{} has not sent READY=1 to NOTIFY_SOCKET after {NOTIFY_HINT_AFTER:?}; if it does not speak sd_notify, use --ready http:/PATH, https:/PATH or delay:DURATION (waiting up to {:?})",
                        self.server.name, self.config.ready_timeout
                    );
                }
                if s.probe.is_none() && now >= s.next_probe {
                    s.probe = self.start_probe(READY_PROBE_TIMEOUT);
                    if s.probe.is_none() {
                        s.next_probe = now + READY_PROBE_INTERVAL;
                    }
                }
                State::Starting(s)
            }
            Event::Reaped | Event::Tenure => State::Starting(s),
        }
    }

    /// Starts a probe of the health path, if the ready mode has one.
    fn start_probe(&self, timeout: Duration) -> Option<Box<Probe>> {
        let (path, tls) = self.config.ready.probe()?;
        // Invariant: Config::new refuses a probing --ready without a TCP port.
        let port = self.probe_port?;
        match Probe::start(port, path, tls, timeout) {
            Ok(probe) => Some(Box::new(probe)),
            Err(e) => {
                debug!("cannot start a probe of port {port}: {e}");
                None
            }
        }
    }

    /// The server is ready: point the public ports at it. A failed switch stops it.
    fn switch(&mut self, takeover: Takeover) -> State {
        let mut takeover = takeover;
        if let Some(probation) = self.config.probation {
            takeover = takeover.probation(probation);
        }
        if let Some(percent) = self.config.canary {
            takeover = takeover.canary(percent);
        }
        if let Some(old) = &self.config.move_from {
            takeover = takeover.moving_from(old.clone());
        }
        let report = match takeover.commit() {
            Ok(report) => report,
            Err(source) => {
                error!("the switch failed: {source}; stopping {}", self.server.name);
                return self.abort(Failure::SwitchFailed {
                    name: self.server.name.clone(),
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
            name = self.server.name,
            ports = ports.join(", "),
            us = report.elapsed.as_micros(),
            attempts = report.attempts,
            s = if report.attempts == 1 { "" } else { "s" },
            removed = report.removed.len(),
            signalled = report.signalled,
        );
        if let Some(percent) = self.config.canary {
            info!(
                "{} is the canary: it takes {percent}% of new connections",
                self.server.name
            );
        }
        match Tenure::new(&self.sw, &report) {
            Ok(tenure) => self.tenure = Some(tenure),
            // The switch is done and serves; only the watch over it is missing.
            Err(e) => warn!("cannot watch this instance's place in the chain: {e}; a probation or rollback will not be followed"),
        }
        self.tell_manager(&format!("READY=1\n{}", self.serving_status()));
        let health =
            (self.config.probation.is_some() && self.config.ready.probe().is_some()).then(|| {
                Health {
                    failures: 0,
                    probe: None,
                    next: Instant::now() + HEALTH_INTERVAL,
                }
            });
        State::Serving(Serving { health })
    }

    /// `STATUS=` for a serving instance: its role and ports.
    fn serving_status(&self) -> String {
        let role = self
            .tenure
            .as_ref()
            .and_then(Tenure::role)
            .map_or("serving".to_owned(), |r| match r {
                switcheroo::Role::Active => "serving (active)".to_owned(),
                switcheroo::Role::Standby => "standby: warm below a newer release".to_owned(),
                switcheroo::Role::Canary => format!(
                    "canary: {}% of new connections",
                    self.config.canary.unwrap_or(0)
                ),
                switcheroo::Role::Extra => "out of place (extra)".to_owned(),
            });
        format!(
            "STATUS={role}; {} (pid {})",
            self.port_list(),
            self.server.pid
        )
    }

    fn serving(&mut self, mut s: Serving, event: Event) -> State {
        match event {
            Event::Signal(signal) if STOP.contains(&signal) => {
                // An operator's stop while serving: leave the chain first, so that an
                // instance below takes new connections at once. Replaced or rolled back,
                // the rules are gone already, and resign says by what.
                let ending = match self.tenure.as_mut().map(Tenure::resign) {
                    Some(Ok(Resignation::Left { rules })) => {
                        info!("removed this instance's {rules} rules before stopping");
                        Ending::Status
                    }
                    Some(Ok(Resignation::AlreadyRemoved {
                        rolled_back,
                        serving,
                    })) => self.removed(rolled_back, serving),
                    Some(Err(e)) => {
                        warn!("could not remove this instance's rules: {e}");
                        Ending::Status
                    }
                    None => Ending::Status,
                };
                info!("got {signal}");
                self.drain(true, ending)
            }
            Event::Signal(signal) => {
                self.forward(signal);
                State::Serving(s)
            }
            Event::ServerExited(status) => self.exited_while_serving(status),
            Event::Tenure => self.follow_tenure(s),
            Event::Probe | Event::Timer => {
                if self
                    .tenure
                    .as_ref()
                    .and_then(Tenure::deadline)
                    .is_some_and(|at| Instant::now() >= at)
                {
                    return self.follow_tenure(s);
                }
                let probation = self.tenure.as_ref().is_some_and(|t| t.deadline().is_some());
                if !probation {
                    s.health = None;
                }
                let Some(health) = s.health.as_mut() else {
                    return State::Serving(s);
                };
                if let Some(verdict) = health.probe.as_mut().and_then(|p| p.advance()) {
                    health.probe = None;
                    match verdict {
                        Verdict::Healthy => health.failures = 0,
                        Verdict::Unhealthy(why) => {
                            health.failures += 1;
                            warn!(
                                "health check {}/{HEALTH_FAILURES} during the probation failed: {why}",
                                health.failures
                            );
                        }
                    }
                    if health.failures >= HEALTH_FAILURES {
                        return self.roll_back(format!(
                            "{HEALTH_FAILURES} health checks in a row failed during the probation"
                        ));
                    }
                }
                if health.probe.is_none() && Instant::now() >= health.next {
                    health.next = Instant::now() + HEALTH_INTERVAL;
                    health.probe = self.start_probe(HEALTH_INTERVAL);
                }
                State::Serving(s)
            }
            Event::Notified | Event::Reaped => State::Serving(s),
        }
    }

    /// Handles what the tenure reports; retires when this instance must.
    fn follow_tenure(&mut self, s: Serving) -> State {
        let Some(tenure) = self.tenure.as_mut() else {
            return State::Serving(s);
        };
        loop {
            let change = match tenure.poll_change() {
                Ok(Some(change)) => change,
                Ok(None) => break,
                Err(e) => {
                    warn!("reading this instance's place in the chain: {e}");
                    break;
                }
            };
            let name = &self.server.name;
            match change {
                Change::Removed {
                    rolled_back,
                    serving,
                } => {
                    let ending = self.removed(rolled_back, serving);
                    // The deployer sends SIGTERM too; whichever comes first starts the drain.
                    return self.drain(false, ending);
                }
                Change::Active { after } => match after {
                    Some(pid) => info!("pid {pid} above this instance is gone: {name} takes every new connection again"),
                    None => info!("{name} takes every new connection"),
                },
                Change::Below { role, above } => {
                    info!("pid {above} now takes new connections before {name} ({role})")
                }
                Change::Promoted => info!("{name} was promoted: it takes every new connection"),
                Change::ProbationPassed { retired } => {
                    info!("the probation passed; the previous instance retires (signalled {retired:?})")
                }
            }
        }
        self.tell_manager(&self.serving_status());
        State::Serving(s)
    }

    /// This instance's rules were removed: says by what; a rollback is a failure.
    fn removed(&self, rolled_back: bool, serving: Option<u32>) -> Ending {
        let serving = serving.map_or("nobody".to_owned(), |p| format!("pid {p}"));
        if rolled_back {
            info!("{} was rolled back; {serving} serves now", self.server.name);
            Ending::Failure(Failure::RolledBack {
                name: self.server.name.clone(),
                why: "its rules were removed for an older instance".into(),
                serving,
            })
        } else {
            info!("{} was replaced; {serving} serves now", self.server.name);
            Ending::Status
        }
    }

    /// The server exited while serving. During a probation the standby below takes over:
    /// this instance leaves the chain and `run` exits 4; otherwise its status is passed on.
    fn exited_while_serving(&mut self, status: WaitStatus) -> State {
        self.let_go();
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
            let failure = Failure::RolledBack {
                name: self.server.name.clone(),
                why,
                serving: self.serving_now(),
            };
            return self.server_gone(status, Ending::Failure(failure));
        }
        let public = self.port_list();
        match status {
            WaitStatus::Exited(_, 0) => warn!(
                "{} exited 0 on its own while serving; {public} refuse connections until the next deploy",
                self.server.name
            ),
            _ => error!(
                "{} {} while serving; {public} refuse connections until the next deploy",
                self.server.name,
                describe_status(status)
            ),
        }
        self.server_gone(status, Ending::Status)
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
        warn!(
            "{}: {why}; rolling back, {serving} serves now",
            self.server.name
        );
        let failure = Failure::RolledBack {
            name: self.server.name.clone(),
            why,
            serving,
        };
        self.drain(false, Ending::Failure(failure))
    }

    /// Who gets new connections now, for messages.
    fn serving_now(&self) -> String {
        match self.sw.rules() {
            Ok(rules) => rules
                .iter()
                .find(|r| r.alive && r.weight.is_none())
                .map_or("nobody".to_owned(), |r| format!("pid {}", r.pid)),
            Err(e) => format!("(unknown: {e})"),
        }
    }

    /// Out of the chain: tells the server (--notify-replaced) and starts draining every
    /// port. `signalled`: the stop signal already arrived (an operator's), so the next one
    /// cuts the drain short.
    fn drain(&mut self, signalled: bool, ending: Ending) -> State {
        self.tell_manager("STOPPING=1\nSTATUS=draining: waiting until the accept queues stay empty and the UDP flows quiet");
        if let Some(replaced) = self.config.notify_replaced {
            // Before the drain: keep-alive clients still send on their connections, and a
            // server told so answers them with `Connection: close` until it stops.
            info!(
                "telling {} it is being replaced ({replaced})",
                self.server.name
            );
            self.forward(replaced);
        }
        info!(
            "waiting until the accept queues stay empty and the UDP flows quiet ({}), then stopping {} with {}",
            self.port_list(),
            self.server.name,
            self.config.stop_signal
        );
        let drains = Drains::start(
            &self.sw,
            &self.held,
            self.config.drain_idle,
            self.config.drain_max,
        );
        State::Draining(Draining {
            drains,
            signalled,
            ending,
        })
    }

    fn draining(&mut self, mut d: Draining, event: Event) -> State {
        match event {
            Event::Signal(signal) if STOP.contains(&signal) && !d.signalled => {
                // The deployer's SIGTERM, after its rules were seen to go.
                d.signalled = true;
                State::Draining(d)
            }
            Event::Signal(signal) if STOP.contains(&signal) => {
                info!("got {signal} again: stopping without waiting for the drain");
                self.stop(d.ending)
            }
            Event::Signal(signal) => {
                self.forward(signal);
                State::Draining(d)
            }
            Event::ServerExited(status) => {
                info!(
                    "{} {} during the drain",
                    self.server.name,
                    describe_status(status)
                );
                self.let_go();
                self.server_gone(status, d.ending)
            }
            Event::Timer => {
                if d.drains.sample(&self.held) {
                    self.stop(d.ending)
                } else {
                    State::Draining(d)
                }
            }
            Event::Reaped | Event::Notified | Event::Probe | Event::Tenure => State::Draining(d),
        }
    }

    /// The drain is over: forgets the UDP flows, sends the stop signal, lets go of the
    /// sockets, and waits for the server.
    fn stop(&mut self, ending: Ending) -> State {
        // Before the signal: from here on a datagram of a flow that was ours starts a new
        // flow, on the instance that serves now, and is answered from the public port;
        // only a datagram the server is handling at this very moment is answered from the
        // internal port, which its client drops. After the signal the server would be
        // gone for a while before its exit is seen, and every busy flow would lose its
        // datagrams to the closed port meanwhile.
        self.forget_flows();
        self.forward(self.config.stop_signal);
        self.let_go();
        let now = Instant::now();
        State::Stopping(Stopping {
            chores: Chores::new(self.config.kill_after.map(|d| now + d), now),
            ending,
        })
    }

    /// Stops a server that never served (nothing was switched, or the switch failed).
    fn abort(&mut self, failure: Failure) -> State {
        self.forward(self.config.stop_signal);
        self.let_go();
        let now = Instant::now();
        State::Stopping(Stopping {
            chores: Chores::new(Some(now + ABORT_GRACE), now),
            ending: Ending::Failure(failure),
        })
    }

    fn stopping(&mut self, mut s: Stopping, event: Event) -> State {
        match event {
            Event::ServerExited(status) => {
                info!("{} {}", self.server.name, describe_status(status));
                self.server_gone_by(status, s.ending, s.chores.kill_at)
            }
            Event::Signal(signal) => {
                self.forward(signal);
                State::Stopping(s)
            }
            Event::Timer => {
                let who = format!("{} (pid {})", self.server.name, self.server.pid);
                self.do_chores(&mut s.chores, "after its stop signal", &who);
                State::Stopping(s)
            }
            Event::Reaped | Event::Notified | Event::Probe | Event::Tenure => State::Stopping(s),
        }
    }

    /// The chores that are due, for the server (`who`).
    fn do_chores(&self, chores: &mut Chores, when: &str, who: &str) {
        let due = chores.due(Instant::now());
        if due.kill {
            self.kill_tree(when);
        }
        if due.sweep {
            let started = Instant::now();
            self.sweep();
            let took = started.elapsed();
            debug!("the sweep took {took:?}");
            chores.swept(Instant::now(), took);
        }
        if due.report {
            self.report_progress(who);
        }
    }

    /// The server exited: done once its tree is gone too, else waiting for it, until
    /// `kill_at` (the stop signal's `--kill-after`) or, for a server that exited by
    /// itself, `--kill-after` from now.
    fn server_gone(&mut self, status: WaitStatus, ending: Ending) -> State {
        let kill_at = self.config.kill_after.map(|d| Instant::now() + d);
        self.server_gone_by(status, ending, kill_at)
    }

    fn server_gone_by(
        &mut self,
        status: WaitStatus,
        ending: Ending,
        kill_at: Option<Instant>,
    ) -> State {
        let left = tree::descendants(std::process::id());
        if left.is_empty() {
            return self.finish(status, ending);
        }
        info!(
            "{} {}; waiting for the {} process{} it left ({}) to finish",
            self.server.name,
            describe_status(status),
            left.len(),
            if left.len() == 1 { "" } else { "es" },
            left.iter()
                .map(u32::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        );
        State::Reaping(Reaping {
            status,
            chores: Chores::new(kill_at, Instant::now()),
            ending,
        })
    }

    fn reaping(&mut self, mut r: Reaping, event: Event) -> State {
        match event {
            Event::Signal(signal) if STOP.contains(&signal) => {
                let n = tree::signal_all(self.config.stop_signal);
                info!(
                    "got {signal}: sent {} to the {n} remaining processes",
                    self.config.stop_signal
                );
                State::Reaping(r)
            }
            Event::Reaped | Event::Timer => {
                let reaped = tree::reap(self.server.pid);
                let left = tree::descendants(std::process::id());
                if !reaped.children_left && left.is_empty() {
                    return self.finish(r.status, r.ending);
                }
                let who = format!(
                    "the {} process{} {} left ({})",
                    left.len(),
                    if left.len() == 1 { "" } else { "es" },
                    self.server.name,
                    left.iter()
                        .map(u32::to_string)
                        .collect::<Vec<_>>()
                        .join(", ")
                );
                self.do_chores(&mut r.chores, "after the stop signal", &who);
                State::Reaping(r)
            }
            Event::Signal(_)
            | Event::ServerExited(_)
            | Event::Notified
            | Event::Probe
            | Event::Tenure => State::Reaping(r),
        }
    }

    /// SIGKILL to the server and every process of its tree.
    fn kill_tree(&self, when: &str) {
        let n = tree::signal_all(Signal::SIGKILL);
        warn!(
            "{} and its processes still run {:?} {when}: sent SIGKILL to {n}",
            self.server.name,
            self.config.kill_after.unwrap_or(ABORT_GRACE)
        );
    }

    /// Says what the retiring instance still holds (log and `STATUS=`).
    fn report_progress(&self, who: &str) {
        let mappings: Vec<Mapping> = self.held.iter().map(|h| h.mapping).collect();
        match self.sw.connections(&mappings) {
            Ok(c) if c.total() > 0 => {
                info!("draining: {who} still serves {c} on {}", self.port_list());
                self.tell_manager(&format!("STATUS=draining: {who} still serves {c}"));
            }
            Ok(_) => {
                info!("draining: {who} holds no connection any more and has not exited yet");
                self.tell_manager(&format!("STATUS=stopping: waiting for {who} to exit"));
            }
            Err(e) => debug!("cannot count the connections: {e}"),
        }
    }

    /// Forgets the connections the server reset as it stops (see
    /// [`Switcheroo::forget_closed`]).
    fn sweep(&self) {
        if self.tenure.is_none() {
            return; // never switched: no connection was ever redirected here
        }
        let mappings: Vec<Mapping> = self.held.iter().map(|h| h.mapping).collect();
        match self.sw.forget_closed(&mappings) {
            Ok(0) => {}
            Ok(n) => debug!("forgot {n} connections {} reset", self.server.name),
            Err(e) => debug!(
                "cannot forget the connections {} reset: {e}",
                self.server.name
            ),
        }
    }

    /// The end: the server and its tree are gone.
    fn finish(&mut self, status: WaitStatus, ending: Ending) -> State {
        self.forget_flows();
        self.sweep();
        self.let_go();
        State::Done(match ending {
            Ending::Status => Exit::Server(status),
            Ending::Failure(failure) => {
                error!("{failure}");
                failure.exit()
            }
        })
    }

    /// Lets go of our copies of the sockets, so that nobody holds a socket that nobody
    /// serves.
    fn let_go(&mut self) {
        for held in &mut self.held {
            held.socket = None;
        }
    }

    /// Forgets the UDP flows still mapped to this instance's ports, once its rules are
    /// out of the chain, so that they continue on the instance that serves now.
    fn forget_flows(&mut self) {
        if self.tenure.is_none() {
            return; // never switched: no flow was ever redirected here
        }
        for held in &self.held {
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
    fn port_list(&self) -> String {
        let list: Vec<String> = self
            .held
            .iter()
            .map(|h| format!("port {}", h.mapping.public))
            .collect();
        list.join(", ")
    }

    fn forward(&self, signal: Signal) {
        let pid = self.server.pid;
        debug!("sending {signal} to {pid}");
        // The pidfd names exactly our server, even after it exited (then ESRCH).
        if let Err(e) = self.server.fd.send_signal(signal as i32) {
            if e != nix::errno::Errno::ESRCH {
                warn!(
                    "cannot send {signal} to {} (pid {pid}): {e}",
                    self.server.name
                );
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

/// Logs what would make the deploy look fine and fail anyway: a firewall that drops
/// redirected connections, a process listening on the public port itself.
fn warn_about_the_host(sw: &Switcheroo) {
    use switcheroo::check::Level;
    match sw.diagnose() {
        Ok(findings) => {
            for f in findings.iter().filter(|f| {
                f.level == Level::Blocker || (f.level == Level::Warning && f.topic == "public")
            }) {
                warn!(
                    "{}; fix: {} (switcheroo check says more)",
                    f.what,
                    f.fix.as_deref().unwrap_or("-")
                );
            }
        }
        Err(e) => debug!("the host check failed: {e}"),
    }
}

/// The server's environment: ours, without what would mislead it, with the sockets'
/// names and ports, and the notify socket when it is to speak sd_notify.
fn environment(
    config: &Config,
    mappings: &[Mapping],
    notify: Option<&NotifySocket>,
) -> Vec<(OsString, OsString)> {
    let mut env: Vec<(OsString, OsString)> = std::env::vars_os()
        .filter(|(k, _)| {
            !matches!(
                k.to_str(),
                Some("NOTIFY_SOCKET" | "LISTEN_FDS" | "LISTEN_PID" | "LISTEN_FDNAMES")
            )
        })
        .collect();
    env.push(("LISTEN_FDNAMES".into(), config.names().join(":").into()));
    env.push((
        "SWITCHEROO_PORT".into(),
        mappings[0].internal.to_string().into(),
    ));
    let list: Vec<String> = mappings
        .iter()
        .map(|m| format!("{}={}", m.public, m.internal))
        .collect();
    env.push(("SWITCHEROO_PORTS".into(), list.join(",").into()));
    if let Some(signal) = config.notify_replaced {
        env.push(("SWITCHEROO_REPLACED_SIGNAL".into(), signal.as_str().into()));
    }
    if let Some(notify) = notify {
        env.push(("NOTIFY_SOCKET".into(), notify.env_value().into()));
    }
    env
}

pub fn describe_status(status: WaitStatus) -> String {
    match status {
        WaitStatus::Exited(_, code) => format!("exited with status {code}"),
        WaitStatus::Signaled(_, signal, _) => format!("was killed by {signal}"),
        other => format!("ended ({other:?})"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_failure_says_how_run_ends() {
        let name = String::from("server");
        let table = [
            (Failure::Setup("x".into()), Exit::Failed),
            (
                Failure::Switcheroo(switcheroo::Error::NoRoutes),
                Exit::Usage,
            ),
            (
                Failure::Switcheroo(switcheroo::Error::NoCanary {
                    namespace: "a".into(),
                }),
                Exit::Failed,
            ),
            (
                Failure::Spawn {
                    name: name.clone(),
                    source: std::io::ErrorKind::NotFound.into(),
                },
                Exit::NotReady,
            ),
            (
                Failure::ExitedBeforeReady {
                    name: name.clone(),
                    status: "exited with status 0".into(),
                },
                Exit::NotReady,
            ),
            (
                Failure::NotReady {
                    name: name.clone(),
                    timeout: Duration::from_secs(1),
                    last: String::new(),
                    hint: "",
                },
                Exit::NotReady,
            ),
            (
                Failure::StoppedBeforeSwitch {
                    name: name.clone(),
                    signal: Signal::SIGTERM,
                },
                Exit::NotReady,
            ),
            (
                Failure::SwitchFailed {
                    name: name.clone(),
                    source: switcheroo::Error::NoRoutes,
                },
                Exit::Failed,
            ),
            (
                Failure::RolledBack {
                    name,
                    why: "x".into(),
                    serving: "pid 1".into(),
                },
                Exit::RolledBack,
            ),
        ];
        for (failure, exit) in table {
            assert_eq!(failure.exit(), exit, "{failure}");
        }
    }

    #[test]
    fn every_chore_moves_on_when_it_is_due_so_the_deadline_does_too() {
        let t0 = Instant::now();
        let mut chores = Chores::new(Some(t0 + Duration::from_secs(1)), t0);
        assert_eq!(chores.next(), t0 + SWEEP_EVERY);
        assert_eq!(chores.due(t0), Due::default());
        let at = chores.next();
        let due = chores.due(at);
        assert_eq!(
            due,
            Due {
                sweep: true,
                ..Due::default()
            }
        );
        assert!(chores.next() > at, "the deadline moved on");
        let later = t0 + Duration::from_secs(6);
        assert_eq!(
            chores.due(later),
            Due {
                kill: true,
                report: true,
                sweep: true
            }
        );
        assert!(chores.next() > later);
        assert_eq!(chores.kill_at, None, "the kill happens once");
        // Whatever time it is, a due() at the deadline leaves a deadline in the future.
        for step in 0..100 {
            let now = chores.next();
            chores.due(now);
            assert!(chores.next() > now, "step {step}");
        }
    }

    #[test]
    fn a_slow_sweep_pushes_the_next_one_back() {
        let t0 = Instant::now();
        let mut chores = Chores::new(None, t0);
        let at = chores.next();
        assert!(chores.due(at).sweep);
        // A quick sweep: the next one SWEEP_EVERY after it ended.
        let ended = at + Duration::from_millis(5);
        chores.swept(ended, Duration::from_millis(5));
        assert_eq!(chores.next(), ended + SWEEP_EVERY);
        // A sweep of 300 ms (a large conntrack table): the next one 1.2 s after it ended,
        // not at once again.
        let at = chores.next();
        assert!(chores.due(at).sweep);
        let ended = at + Duration::from_millis(300);
        chores.swept(ended, Duration::from_millis(300));
        assert_eq!(chores.next(), ended + Duration::from_millis(1200));
    }

    #[test]
    fn messages_say_what_happened_and_what_serves() {
        let exited = Failure::ExitedBeforeReady {
            name: "true".into(),
            status: describe_status(WaitStatus::Exited(Pid::from_raw(1), 0)),
        };
        assert_eq!(
            exited.to_string(),
            "true exited with status 0 before it was ready; nothing was switched, the running version keeps serving"
        );
        let stopped = Failure::StoppedBeforeSwitch {
            name: "server".into(),
            signal: Signal::SIGTERM,
        };
        assert!(stopped
            .to_string()
            .starts_with("told to stop (SIGTERM) before the switch"));
        let timeout = Failure::NotReady {
            name: "s".into(),
            timeout: Duration::from_secs(20),
            last: "; the last probe: GET /healthz answered 400 Bad Request".into(),
            hint: "",
        };
        assert!(timeout.to_string().contains(
            "not ready after 20s; the last probe: GET /healthz answered 400 Bad Request"
        ));
    }
}
