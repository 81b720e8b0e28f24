//! `switcheroo run`'s arguments: what clap parses, what it cannot check (port names,
//! placeholders, the order of options and command), and the `{port}` templates of the
//! server's arguments. Every mistake here is found before anything starts (exit 2).

use clap::Args;
use nix::sys::signal::Signal;
use std::ffi::{OsStr, OsString};
use std::ops::RangeInclusive;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::PathBuf;
use std::time::Duration;
use switcheroo::{Mapping, Port, Routes};

/// How `switcheroo run` learns that the new server is ready.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ready {
    /// The server sends `READY=1` to `$NOTIFY_SOCKET` (sd_notify(3)).
    Notify,
    /// `GET path` on the internal port answers 2xx, over plain HTTP/1.1 ...
    Http(String),
    /// ... or over TLS (the certificate is not verified: it is the server's own).
    Https(String),
    /// Assumed ready after this long.
    Delay(Duration),
}

impl Ready {
    /// `notify`, `http:/PATH`, `https:/PATH` or `delay:DURATION`.
    pub fn parse(s: &str) -> Result<Ready, String> {
        let path = |p: &str, scheme: &str| -> Result<String, String> {
            if p.starts_with("//") {
                return Err(format!(
                    "{s:?}: give only the path ({scheme}:/PATH, e.g. {scheme}:/healthz): the probe always connects to the new server's own internal port"
                ));
            }
            if !p.starts_with('/') || p.bytes().any(|b| b <= b' ' || b == 0x7f) {
                return Err(format!(
                    "{s:?}: the health path starts with / and has no spaces, e.g. {scheme}:/healthz"
                ));
            }
            Ok(p.to_owned())
        };
        if s == "notify" {
            Ok(Ready::Notify)
        } else if let Some(p) = s.strip_prefix("https:") {
            Ok(Ready::Https(path(p, "https")?))
        } else if let Some(p) = s.strip_prefix("http:") {
            Ok(Ready::Http(path(p, "http")?))
        } else if let Some(delay) = s.strip_prefix("delay:") {
            Ok(Ready::Delay(duration(delay)?))
        } else {
            Err(format!(
                "{s:?}: expected notify, http:/PATH, https:/PATH or delay:DURATION"
            ))
        }
    }

    /// The health path and whether it is probed over TLS, for the probing modes.
    pub fn probe(&self) -> Option<(&str, bool)> {
        match self {
            Ready::Http(path) => Some((path, false)),
            Ready::Https(path) => Some((path, true)),
            _ => None,
        }
    }
}

impl std::fmt::Display for Ready {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Ready::Notify => f.write_str("READY=1 on NOTIFY_SOCKET"),
            Ready::Http(path) => write!(f, "GET {path} answers 2xx"),
            Ready::Https(path) => write!(f, "GET {path} over TLS answers 2xx"),
            Ready::Delay(d) => write!(f, "after {d:?}"),
        }
    }
}

/// The arguments of `switcheroo run`.
#[derive(Args, Debug)]
pub struct RunArgs {
    /// The service's name; its instances replace each other ([A-Za-z0-9_.-], 1-64 chars)
    #[arg(long, short = 'n', default_value = "default", value_parser = namespace)]
    pub namespace: String,
    /// A public port clients connect to: `[NAME=]PORT[/tcp|/udp]` (TCP by default).
    /// Repeat it for a service with several ports, all switched together; the server gets
    /// one socket per port, as fds 3, 4, ... in this order
    #[arg(long, short = 'p', value_name = "[NAME=]PORT[/PROTO]", value_parser = PortArg::parse)]
    pub port: Vec<PortArg>,
    /// Internal ports to choose from, MIN-MAX
    #[arg(long, default_value = "40400-40499", value_parser = range)]
    pub range: RangeInclusive<u16>,
    /// Which traffic to redirect: network (PREROUTING), localhost (OUTPUT), or both
    #[arg(long, value_delimiter = ',', default_value = "network,localhost", value_parser = route)]
    pub routes: Vec<Routes>,
    /// When the server is ready: `notify` (it sends READY=1 to $NOTIFY_SOCKET, the
    /// sd_notify protocol), `http:/PATH` (GET PATH on the internal port answers 2xx),
    /// `https:/PATH` (the same over TLS, certificate not verified), or `delay:DURATION`
    /// (it is assumed ready after that long)
    #[arg(long, default_value = "notify", value_parser = Ready::parse)]
    pub ready: Ready,
    /// How long to wait for readiness before giving up (nothing is switched then)
    #[arg(long, default_value = "60s", value_parser = duration)]
    pub ready_timeout: Duration,
    /// Keep the previous instance warm below this one for DURATION after the switch: if
    /// this one's server exits (or, with --ready http(s):/PATH, fails 3 health checks in
    /// a row, probed every second) meanwhile, the previous one serves again and run exits
    /// 4; after it, the previous one retires. With --canary, it starts at the promotion
    #[arg(long, value_name = "DURATION", value_parser = duration)]
    pub probation: Option<Duration>,
    /// Take PERCENT (1-99) of new connections above the active instance instead of all of
    /// them; `switcheroo promote` or `switcheroo rollback` decide what follows
    #[arg(long, value_name = "PERCENT", value_parser = clap::value_parser!(u8).range(1..=99))]
    pub canary: Option<u8>,
    /// Move the service from namespace NS to this one: the switch also removes NS's rules,
    /// and NS's instances retire as if replaced. Without it, a public port that a live
    /// instance of another namespace serves is refused
    #[arg(long, value_name = "NS", value_parser = namespace)]
    pub move_from: Option<String>,
    /// On SIGTERM/SIGINT, stop the server once the accept queues have been empty (and
    /// the UDP flows quiet: whole seconds, at least 1) this long
    #[arg(long, default_value = "200ms", value_parser = duration)]
    pub drain_idle: Duration,
    /// ... or after this long at most
    #[arg(long, default_value = "5s", value_parser = duration)]
    pub drain_max: Duration,
    /// The signal that stops the server after the drain: TERM, or what the server takes
    /// as "finish and exit" (QUIT for nginx, WINCH for Apache httpd, ...)
    #[arg(long, value_name = "SIGNAL", default_value = "TERM", value_parser = stop_signal)]
    pub stop_signal: Signal,
    /// After the stop signal, send SIGKILL to the server and every process it started if
    /// they have not all exited within this long (default: wait as long as they serve)
    #[arg(long, value_parser = duration)]
    pub kill_after: Option<Duration>,
    /// Send SIGNAL (e.g. USR1) to the server as soon as this instance is replaced, before
    /// the drain, so that it can answer `Connection: close` from then on (see below)
    #[arg(long, value_name = "SIGNAL", value_parser = notice_signal)]
    pub notify_replaced: Option<Signal>,
    /// The name in LISTEN_FDNAMES of each port given without NAME= (default: the
    /// namespace)
    #[arg(long, value_parser = port_name)]
    pub fd_name: Option<String>,
    /// Keep a record of each commit in DIR (a directory of this user only, created if
    /// missing) so that the next deploy can skip dumping chains that hold many foreign
    /// rules; off by default. Under systemd: RuntimeDirectory=switcheroo and
    /// --record-dir /run/switcheroo
    #[arg(long, value_name = "DIR")]
    pub record_dir: Option<PathBuf>,
    /// The server and its arguments, after `--`; `{port}` (or `{port:NAME}` with several
    /// ports) in an argument becomes that internal port, and the server then binds its
    /// ports itself instead of getting the sockets as fds 3, 4, ...
    #[arg(trailing_var_arg = true, value_name = "COMMAND")]
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
            Some((name, port)) => (
                Some(port_name(name).map_err(|e| format!("{s:?}: {e}"))?),
                port,
            ),
            None => (None, s),
        };
        Ok(PortArg {
            name,
            port: port.parse()?,
        })
    }
}

/// A name in LISTEN_FDNAMES: 1-64 characters of `[A-Za-z0-9_.-]`.
pub fn port_name(name: &str) -> Result<String, String> {
    let valid = (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b));
    if valid {
        Ok(name.to_owned())
    } else {
        Err(format!(
            "the name {name:?} must be 1-64 characters of [A-Za-z0-9_.-]"
        ))
    }
}

/// A service namespace, checked as the library checks it.
pub fn namespace(s: &str) -> Result<String, String> {
    let valid = (1..=64).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b));
    if valid {
        Ok(s.to_owned())
    } else {
        Err(format!(
            "{s:?} is not a namespace: use 1 to 64 characters of A-Z, a-z, 0-9, '_', '.' and '-' (a namespace names a service, e.g. web; give a release as the unit instance or path instead)"
        ))
    }
}

/// A duration as the command takes it (`250ms`, `2s`, `1m`, or seconds).
pub fn duration(s: &str) -> Result<Duration, String> {
    switcheroo::parse_duration(s).map_err(|e| e.to_string())
}

/// `MIN-MAX`.
pub fn range(s: &str) -> Result<RangeInclusive<u16>, String> {
    let (min, max) = s
        .split_once('-')
        .ok_or_else(|| format!("{s:?}: expected MIN-MAX, e.g. 40400-40499"))?;
    let port = |p: &str| {
        p.trim()
            .parse::<u16>()
            .map_err(|_| format!("{p:?} is not a port number (1-65535)"))
    };
    Ok(port(min)?..=port(max)?)
}

/// `network` or `localhost`.
pub fn route(s: &str) -> Result<Routes, String> {
    match s {
        "network" => Ok(Routes::NETWORK),
        "localhost" => Ok(Routes::LOCALHOST),
        _ => Err(format!("{s:?}: expected network or localhost")),
    }
}

/// A signal by name, `USR1` or `SIGUSR1`, or number.
fn signal(s: &str) -> Result<Signal, String> {
    if let Ok(n) = s.parse::<i32>() {
        return Signal::try_from(n).map_err(|_| format!("{s}: no such signal"));
    }
    let name = if s.starts_with("SIG") {
        s.to_owned()
    } else {
        format!("SIG{s}")
    };
    name.parse()
        .map_err(|_| format!("{s:?} is not a signal name (TERM, QUIT, INT, USR1, HUP, WINCH, ...)"))
}

/// The signal that stops the server: anything it can catch or not, but not one that
/// pauses it.
pub fn stop_signal(s: &str) -> Result<Signal, String> {
    let signal = signal(s)?;
    if matches!(
        signal,
        Signal::SIGSTOP
            | Signal::SIGTSTP
            | Signal::SIGTTIN
            | Signal::SIGTTOU
            | Signal::SIGCONT
            | Signal::SIGCHLD
    ) {
        return Err(format!(
            "{s}: this signal does not end a process; give the one the server exits on (TERM, QUIT, INT, ...)"
        ));
    }
    Ok(signal)
}

/// A notice for the server: not one that stops or kills it.
pub fn notice_signal(s: &str) -> Result<Signal, String> {
    let signal = signal(s)?;
    if matches!(
        signal,
        Signal::SIGKILL | Signal::SIGSTOP | Signal::SIGTERM | Signal::SIGINT
    ) {
        return Err(format!(
            "{s}: choose a signal the server can take as a notice, not one that stops it"
        ));
    }
    Ok(signal)
}

/// What `switcheroo run` was asked to do, checked.
#[derive(Debug)]
pub struct Config {
    pub namespace: String,
    pub ports: Vec<PortArg>,
    pub range: RangeInclusive<u16>,
    pub routes: Routes,
    pub ready: Ready,
    pub ready_timeout: Duration,
    pub probation: Option<Duration>,
    pub canary: Option<u8>,
    pub move_from: Option<String>,
    pub drain_idle: Duration,
    pub drain_max: Duration,
    pub stop_signal: Signal,
    pub kill_after: Option<Duration>,
    pub notify_replaced: Option<Signal>,
    pub fd_name: String,
    pub record_dir: Option<PathBuf>,
    pub program: OsString,
    pub args: Vec<Template>,
    /// Options of `run` that stand after the command without a `--` before it: they go
    /// to the server, which may or may not mean them.
    pub misplaced: Vec<String>,
}

/// Long and short options of `run`, for the hints about their order.
const RUN_OPTIONS: &[&str] = &[
    "-n",
    "--namespace",
    "-p",
    "--port",
    "--range",
    "--routes",
    "--ready",
    "--ready-timeout",
    "--probation",
    "--canary",
    "--move-from",
    "--drain-idle",
    "--drain-max",
    "--stop-signal",
    "--kill-after",
    "--notify-replaced",
    "--fd-name",
    "--record-dir",
];

/// Whether `arg` is an option of `run` (`--ready`, `--ready=...`, `-p`, `-p8080`).
fn is_run_option(arg: &OsStr) -> bool {
    let arg = arg.to_string_lossy();
    let glued_port = arg
        .strip_prefix("-p")
        .is_some_and(|rest| rest.starts_with(|c: char| c.is_ascii_digit()));
    glued_port
        || RUN_OPTIONS
            .iter()
            .any(|o| arg == *o || (o.starts_with("--") && arg.starts_with(&format!("{o}="))))
}

impl Config {
    /// Checks what clap cannot; `argv` is the whole command line, for the hints about the
    /// order of options and command. The error says what is wrong and what to write.
    pub fn new(a: RunArgs, argv: &[OsString]) -> Result<Config, String> {
        let Some((program, rest)) = a.command.split_first() else {
            return Err(
                "no server to run: give it after the options and `--`, e.g. switcheroo run -p 8080 -- ./server".into(),
            );
        };
        // Was the command set apart by `--`? Then whatever follows is the server's.
        let separated = argv.iter().any(|s| s == "--");
        let mut misplaced: Vec<String> = Vec::new();
        if !separated {
            let mut it = rest.iter().peekable();
            while let Some(arg) = it.next() {
                if !is_run_option(arg) {
                    continue;
                }
                let mut option = arg.to_string_lossy().into_owned();
                // `-p 8091`, not `-p8091` or `--port=8091`: the value is the next word.
                if RUN_OPTIONS.contains(&option.as_str()) {
                    if let Some(value) = it.next() {
                        option = format!("{option} {}", value.to_string_lossy());
                    }
                }
                misplaced.push(option);
            }
        }
        if a.port.is_empty() {
            let hint = if misplaced
                .iter()
                .any(|o| o.starts_with("-p") || o.starts_with("--port"))
            {
                format!(
                    "; {} stands after the command {:?}, so it was taken as the server's argument: options of run go first, then --, then the command: switcheroo run {} -- {}",
                    misplaced.join(" "),
                    program.to_string_lossy(),
                    misplaced.join(" "),
                    program.to_string_lossy(),
                )
            } else {
                String::new()
            };
            return Err(format!(
                "--port is missing: give each public port with -p PORT[/tcp|/udp]{hint}"
            ));
        }
        for (i, p) in a.port.iter().enumerate() {
            if let Some(name) = &p.name {
                if a.port[..i].iter().any(|q| q.name.as_ref() == Some(name)) {
                    return Err(format!("the port name {name:?} is given twice"));
                }
            }
        }
        let args: Vec<Template> = rest.iter().map(|a| Template::parse(a)).collect();
        for template in &args {
            template.validate(&a.port)?;
        }
        if a.ready.probe().is_some()
            && !a
                .port
                .iter()
                .any(|p| p.port.protocol == switcheroo::Protocol::Tcp)
        {
            return Err(
                "--ready http(s):/PATH probes a TCP port, and every --port is UDP; use --ready notify or delay:DURATION".into(),
            );
        }
        Ok(Config {
            fd_name: a.fd_name.unwrap_or_else(|| a.namespace.clone()),
            namespace: a.namespace,
            ports: a.port,
            range: a.range,
            routes: a.routes.into_iter().fold(Routes::empty(), |all, r| all | r),
            ready: a.ready,
            ready_timeout: a.ready_timeout,
            probation: a.probation,
            canary: a.canary,
            move_from: a.move_from,
            drain_idle: a.drain_idle,
            drain_max: a.drain_max,
            stop_signal: a.stop_signal,
            kill_after: a.kill_after,
            notify_replaced: a.notify_replaced,
            record_dir: a.record_dir,
            program: program.clone(),
            args,
            misplaced,
        })
    }

    /// The name of each port in LISTEN_FDNAMES, in order.
    pub fn names(&self) -> Vec<String> {
        self.ports
            .iter()
            .map(|p| p.name.clone().unwrap_or_else(|| self.fd_name.clone()))
            .collect()
    }

    /// Whether the server binds its ports itself (an argument names one with `{port}`).
    pub fn binds_itself(&self) -> bool {
        self.args.iter().any(Template::has_ports)
    }

    /// The server's arguments with every placeholder replaced by its internal port.
    pub fn render_args(&self, mappings: &[Mapping]) -> Vec<OsString> {
        self.args
            .iter()
            .map(|t| t.render(&self.ports, mappings))
            .collect()
    }
}

/// One argument of the server, with its `{port}` and `{port:X}` placeholders.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    parts: Vec<Part>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Text(Vec<u8>),
    /// `{port}` (`None`) or `{port:X}`.
    Port(Option<String>),
}

impl Template {
    /// Splits `arg` at its placeholders: `{port}` and `{port:X}`; anything else, an
    /// unclosed `{port:` included, is text.
    pub fn parse(arg: &OsStr) -> Template {
        let bytes = arg.as_bytes();
        let mut parts = Vec::new();
        let mut text = Vec::new();
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
            match placeholder {
                Some((len, key)) => {
                    if !text.is_empty() {
                        parts.push(Part::Text(std::mem::take(&mut text)));
                    }
                    parts.push(Part::Port(key));
                    i += len;
                }
                None => {
                    text.push(bytes[i]);
                    i += 1;
                }
            }
        }
        if !text.is_empty() {
            parts.push(Part::Text(text));
        }
        Template { parts }
    }

    fn has_ports(&self) -> bool {
        self.parts.iter().any(|p| matches!(p, Part::Port(_)))
    }

    fn text(&self) -> String {
        let mut s = String::new();
        for part in &self.parts {
            match part {
                Part::Text(t) => s.push_str(&String::from_utf8_lossy(t)),
                Part::Port(None) => s.push_str("{port}"),
                Part::Port(Some(k)) => s.push_str(&format!("{{port:{k}}}")),
            }
        }
        s
    }

    /// Which `--port` (by position) a placeholder names: `{port}` with exactly one port,
    /// `{port:NAME}`, `{port:PORT/PROTO}` or `{port:PORT}` (TCP).
    fn index(&self, key: &Option<String>, ports: &[PortArg]) -> Result<usize, String> {
        match key {
            None if ports.len() == 1 => Ok(0),
            None => Err(format!(
                "{{port}} in {:?} is ambiguous with {} ports; name one: {{port:NAME}} or {{port:PORT/PROTO}}",
                self.text(),
                ports.len()
            )),
            Some(key) => {
                let spec: Option<Port> = key.parse().ok();
                ports
                    .iter()
                    .position(|p| p.name.as_deref() == Some(key) || spec == Some(p.port))
                    .ok_or_else(|| {
                        format!(
                            "{{port:{key}}} in {:?} names no --port (give NAME=PORT, or write the PORT/PROTO of one)",
                            self.text()
                        )
                    })
            }
        }
    }

    /// Checks that every placeholder names a port.
    pub fn validate(&self, ports: &[PortArg]) -> Result<(), String> {
        for part in &self.parts {
            if let Part::Port(key) = part {
                self.index(key, ports)?;
            }
        }
        Ok(())
    }

    /// The argument with each placeholder replaced by its port's internal port
    /// (`mappings` in the order of `ports`). Validated first, so every placeholder
    /// resolves.
    pub fn render(&self, ports: &[PortArg], mappings: &[Mapping]) -> OsString {
        let mut out = Vec::new();
        for part in &self.parts {
            match part {
                Part::Text(t) => out.extend_from_slice(t),
                Part::Port(key) => {
                    // Invariant: validated by Config::new.
                    let i = self.index(key, ports).unwrap_or(0);
                    out.extend_from_slice(mappings[i].internal.to_string().as_bytes());
                }
            }
        }
        OsString::from_vec(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn port(s: &str) -> PortArg {
        PortArg::parse(s).unwrap()
    }

    fn mapping(public: Port, internal: u16) -> Mapping {
        Mapping { public, internal }
    }

    #[test]
    fn ready_modes_and_their_mistakes() {
        assert_eq!(Ready::parse("notify"), Ok(Ready::Notify));
        assert_eq!(
            Ready::parse("http:/healthz?x=1"),
            Ok(Ready::Http("/healthz?x=1".into()))
        );
        assert_eq!(Ready::parse("https:/"), Ok(Ready::Https("/".into())));
        assert_eq!(
            Ready::parse("delay:1500ms"),
            Ok(Ready::Delay(Duration::from_millis(1500)))
        );
        let err = Ready::parse("http://localhost/").unwrap_err();
        assert!(err.contains("give only the path"), "{err}");
        for bad in ["http:healthz", "http:/a b", "tcp", "delay:soon", "https:x"] {
            assert!(Ready::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_single_port_placeholder() {
        let ports = [port("80")];
        let one = [mapping(Port::tcp(80), 40401)];
        let render = |arg: &str| Template::parse(OsStr::new(arg)).render(&ports, &one);
        assert_eq!(render("--bind=[::]:{port}"), "--bind=[::]:40401");
        assert_eq!(render("{port}{port}"), "4040140401");
        assert_eq!(render("{por}"), "{por}");
        assert_eq!(render("{port:80}"), "40401");
        assert!(!Template::parse(OsStr::new("{por}")).has_ports());
    }

    #[test]
    fn named_port_placeholders() {
        let ports = [port("http=80"), port("443/udp"), port("h2=443")];
        let mappings = [
            mapping(Port::tcp(80), 7),
            mapping(Port::udp(443), 8),
            mapping(Port::tcp(443), 9),
        ];
        let t = Template::parse(OsStr::new(
            "{port:http},{port:443/udp},{port:h2},{port:443}",
        ));
        assert_eq!(t.validate(&ports), Ok(()));
        assert_eq!(t.render(&ports, &mappings), "7,8,9,9");
        let ambiguous = Template::parse(OsStr::new("{port}"))
            .validate(&ports)
            .unwrap_err();
        assert!(ambiguous.contains("ambiguous"), "{ambiguous}");
        let unknown = Template::parse(OsStr::new("{port:nope}"))
            .validate(&ports)
            .unwrap_err();
        assert!(unknown.contains("names no --port"), "{unknown}");
        assert_eq!(
            Template::parse(OsStr::new("{port:unclosed")).render(&ports, &mappings),
            "{port:unclosed"
        );
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
    fn namespaces_signals_and_durations_are_checked_before_anything_starts() {
        assert!(namespace("web").is_ok());
        assert!(namespace("web/v2").unwrap_err().contains("not a namespace"));
        assert!(namespace("").is_err());
        assert_eq!(stop_signal("QUIT"), Ok(Signal::SIGQUIT));
        assert_eq!(stop_signal("SIGTERM"), Ok(Signal::SIGTERM));
        assert_eq!(stop_signal("3"), Ok(Signal::SIGQUIT));
        assert!(stop_signal("STOP").is_err());
        assert!(stop_signal("BOGUS").is_err());
        assert_eq!(notice_signal("USR1"), Ok(Signal::SIGUSR1));
        assert!(notice_signal("TERM").is_err());
        assert!(duration("2x").is_err());
        assert_eq!(duration("250ms"), Ok(Duration::from_millis(250)));
        assert!(range("9-").is_err());
        assert!(route("lan").is_err());
    }

    #[test]
    fn run_options_are_recognised_in_every_spelling() {
        for yes in [
            "-p",
            "-p8080",
            "--port",
            "--port=80",
            "--ready",
            "--stop-signal=QUIT",
            "-n",
        ] {
            assert!(is_run_option(OsStr::new(yes)), "{yes}");
        }
        for no in [
            "--listen",
            "-x",
            "--portable",
            "8080",
            "-",
            "-nodaemon",
            "-port",
        ] {
            assert!(!is_run_option(OsStr::new(no)), "{no}");
        }
    }
}
