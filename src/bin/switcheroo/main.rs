//! `switcheroo`: zero-downtime deploys for servers in any language.
//!
//! `switcheroo run` binds the internal port, hands the listening socket to the server as
//! fd 3 (systemd socket activation), waits until the server is ready, then points the
//! public port at it in one transaction; the previous instance's `switcheroo run` gets
//! SIGTERM, waits until its server has emptied the accept queue, forwards the signal and
//! exits with the server's status.

mod ready;
mod run;

use clap::{Args, Parser, Subcommand};
use log::error;
use std::ffi::OsString;
use std::io::Write;
use std::ops::RangeInclusive;
use std::process::ExitCode;
use std::time::Duration;
use switcheroo::{Routes, Rule};

/// Exit status for an error of switcheroo itself (permissions, netfilter, bad input, a
/// failed switch).
const EXIT_ERROR: u8 = 1;
/// Exit status when the new server never became ready: nothing was switched.
const EXIT_NOT_READY: u8 = 3;
/// Exit status of a `run` whose instance was rolled back (by `switcheroo rollback`, by
/// failed health checks or by its server's exit during the probation): the previous
/// instance serves again.
const EXIT_ROLLED_BACK: u8 = 4;

const AFTER_HELP: &str = "\
Examples:
  # before the first deploy: will the firewall let redirected connections in?
  switcheroo check -p 8080

  # serve 8080 with gunicorn; run the same line again to deploy a new version
  switcheroo run --port 8080 --ready http:/healthz -- gunicorn app:app

  # a server that only takes a port number: {port} is replaced by the internal port
  switcheroo run --namespace api --port 443 --ready delay:2s -- ./server --listen-port {port}

  # HTTP, HTTPS and HTTP/3 switched together: fds 3, 4, 5, LISTEN_FDNAMES=http:https:h3
  switcheroo run -n web -p http=80 -p https=443 -p h3=443/udp -- ./server

  # a DNS server: the UDP socket as fd 3, the TCP listener as fd 4
  switcheroo run -n dns -p 53/udp -p 53/tcp --ready delay:1s -- ./dns-server

  # keep the previous version warm for 5 minutes; roll back at once if this one dies
  switcheroo run --port 8080 --probation 5m --ready http:/healthz -- ./server
  switcheroo rollback            # back to the previous version, in one transaction

  # send 10% of new connections to the new version first
  switcheroo run --port 8080 --canary 10 --probation 5m -- ./server
  switcheroo promote             # it takes every new connection; or: switcheroo rollback

  switcheroo status --json
  switcheroo cleanup --namespace api

Exit status:
  0        run: the server exited 0; status, cleanup: success; check: nothing blocks
  1        an error of switcheroo itself (permissions, netfilter, bad input), or run's
           switch failed (the new server is stopped); nothing changed, the old version
           keeps serving
  2        bad arguments
  3        run: the new server failed to start, exited, was not ready in time or was told
           to stop before the switch; nothing was switched and the old version keeps
           serving
  4        run: this instance was rolled back (switcheroo rollback, 3 failed health checks
           or its server's exit during the probation); the previous instance serves again
  1        rollback: nothing to roll back to; promote: no live canary (the ruleset is
           unchanged; the message says why); check: a blocker was found
  N        run: the server's own exit status, or 128+signal if a signal ended it

Logging goes to stderr; RUST_LOG=debug (or warn, ...) sets the level, info by default.
Needs CAP_NET_ADMIN (and CAP_KILL to stop instances of other users).";

#[derive(Parser, Debug)]
#[command(
    name = "switcheroo",
    version,
    about = "Zero-downtime deploys of TCP and UDP servers: an atomic nftables REDIRECT of the public ports to the newest instance",
    after_help = AFTER_HELP
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Diagnose this host before the first deploy, changing nothing: the kernel's parts,
    /// IPv6, every firewall chain on the input hook (would it drop a redirected
    /// connection? then the exact fix), the internal range against the ephemeral ports,
    /// conntrack's headroom. Exits 1 when something blocks
    Check(CheckArgs),
    /// Start COMMAND with a fresh listening socket as fd 3, switch the public port to it
    /// once it is ready, and stop the previous instance gracefully
    #[command(after_help = run::AFTER_HELP)]
    Run(Box<RunArgs>),
    /// List every switcheroo rule in this network namespace, with its role
    Status(StatusArgs),
    /// Delete the namespace's head in one transaction (the canary, else the active if a
    /// live standby is below it); its owner retires
    Rollback(NamespaceArgs),
    /// Make the namespace's canary the active in one transaction; the previous active
    /// becomes the standby (the canary's --probation decides when it retires)
    Promote(NamespaceArgs),
    /// Delete a namespace's rules (processes are not signalled)
    Cleanup(CleanupArgs),
}

#[derive(Args, Debug)]
struct RunArgs {
    /// The service's name; its instances replace each other ([A-Za-z0-9_.-], 1-64 chars)
    #[arg(long, short = 'n', default_value = "default")]
    namespace: String,
    /// A public port clients connect to: `[NAME=]PORT[/tcp|/udp]` (TCP by default).
    /// Repeat it for a service with several ports, all switched together; the server gets
    /// one socket per port, as fds 3, 4, ... in this order
    #[arg(long, short = 'p', required = true, value_name = "[NAME=]PORT[/PROTO]", value_parser = run::PortArg::parse)]
    port: Vec<run::PortArg>,
    /// Internal ports to choose from, MIN-MAX
    #[arg(long, default_value = "40400-40499", value_parser = parse_range)]
    range: RangeInclusive<u16>,
    /// Which traffic to redirect: network (PREROUTING), localhost (OUTPUT), or both
    #[arg(long, value_delimiter = ',', default_value = "network,localhost", value_parser = parse_route)]
    routes: Vec<Routes>,
    /// When the server is ready: `notify` (it sends READY=1 to $NOTIFY_SOCKET, the
    /// sd_notify protocol), `http:/PATH` (GET PATH on the internal port answers 2xx), or
    /// `delay:DURATION` (it is assumed ready after that long)
    #[arg(long, default_value = "notify", value_parser = ready::Ready::parse)]
    ready: ready::Ready,
    /// How long to wait for readiness before giving up (nothing is switched then)
    #[arg(long, default_value = "60s", value_parser = ready::parse_duration)]
    ready_timeout: Duration,
    /// Keep the previous instance warm below this one for DURATION after the switch: if
    /// this one's server exits (or, with --ready http:/PATH, fails 3 health checks in a
    /// row, probed every second) meanwhile, the previous one serves again and run exits 4;
    /// after it, the previous one retires. With --canary, it starts at the promotion
    #[arg(long, value_name = "DURATION", value_parser = ready::parse_duration)]
    probation: Option<Duration>,
    /// Take PERCENT (1-99) of new connections above the active instance instead of all of
    /// them; `switcheroo promote` or `switcheroo rollback` decide what follows
    #[arg(long, value_name = "PERCENT", value_parser = clap::value_parser!(u8).range(1..=99))]
    canary: Option<u8>,
    /// On SIGTERM/SIGINT, forward the signal once the accept queues have been empty (and
    /// the UDP flows quiet: whole seconds, at least 1) this long
    #[arg(long, default_value = "200ms", value_parser = ready::parse_duration)]
    drain_idle: Duration,
    /// ... or after this long at most
    #[arg(long, default_value = "5s", value_parser = ready::parse_duration)]
    drain_max: Duration,
    /// After forwarding SIGTERM/SIGINT, send SIGKILL if the server has not exited within
    /// this long (default: wait for as long as it takes)
    #[arg(long, value_parser = ready::parse_duration)]
    kill_after: Option<Duration>,
    /// Send SIGNAL (e.g. USR1) to the server as soon as this instance is replaced, before
    /// the drain, so that it can answer `Connection: close` from then on (see below)
    #[arg(long, value_name = "SIGNAL", value_parser = parse_signal)]
    notify_replaced: Option<nix::sys::signal::Signal>,
    /// The name in LISTEN_FDNAMES of each port given without NAME= (default: the
    /// namespace)
    #[arg(long)]
    fd_name: Option<String>,
    /// Keep a record of each commit in DIR (a directory of this user only, created if
    /// missing) so that the next deploy can skip dumping chains that hold many foreign
    /// rules; off by default. Under systemd: RuntimeDirectory=switcheroo and
    /// --record-dir /run/switcheroo
    #[arg(long, value_name = "DIR")]
    record_dir: Option<std::path::PathBuf>,
    /// The server and its arguments; `{port}` (or `{port:NAME}` with several ports) in an
    /// argument becomes that internal port, and the server then binds its ports itself
    /// instead of getting the sockets as fds 3, 4, ...
    #[arg(
        required = true,
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "COMMAND"
    )]
    command: Vec<OsString>,
}

#[derive(Args, Debug)]
struct CheckArgs {
    /// The service; without --port, its public ports are read from its rules
    #[arg(long, short = 'n', default_value = "default")]
    namespace: String,
    /// A public port, as for run: `[NAME=]PORT[/tcp|/udp]` (repeatable)
    #[arg(long, short = 'p', value_name = "[NAME=]PORT[/PROTO]", value_parser = run::PortArg::parse)]
    port: Vec<run::PortArg>,
    /// Internal ports to choose from, MIN-MAX
    #[arg(long, default_value = "40400-40499", value_parser = parse_range)]
    range: RangeInclusive<u16>,
    /// Print {"findings": [...], "blockers": N} as JSON
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
struct StatusArgs {
    /// Only this namespace's rules
    #[arg(long, short = 'n')]
    namespace: Option<String>,
    /// Print {"rules": [...]} as JSON
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
struct NamespaceArgs {
    /// The service's name
    #[arg(long, short = 'n', default_value = "default")]
    namespace: String,
}

#[derive(Args, Debug)]
struct CleanupArgs {
    /// The namespace whose rules to delete
    #[arg(long, short = 'n')]
    namespace: String,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format_target(false)
        .init();
    let result = match cli.command {
        Command::Check(args) => return check(args),
        Command::Run(args) => return run::run((*args).into()),
        Command::Status(args) => status(args),
        Command::Cleanup(args) => switcheroo::cleanup(&args.namespace).map(|n| {
            println!("removed {n} rules of namespace {}", args.namespace);
        }),
        Command::Rollback(args) => switcheroo::rollback(&args.namespace).map(|r| {
            println!(
                "namespace {}: rolled back from pid {} to pid {} (removed {} rules, signalled {:?})",
                args.namespace,
                r.from.unwrap_or(0),
                r.serving.map_or("-".to_owned(), |p| p.to_string()),
                r.removed.len(),
                r.signalled
            );
        }),
        Command::Promote(args) => switcheroo::promote(&args.namespace).map(|p| {
            println!(
                "namespace {}: pid {} is the active now; standby {}",
                args.namespace,
                p.promoted,
                p.standby.map_or("none".to_owned(), |s| format!("pid {s}"))
            );
        }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e}");
            ExitCode::from(EXIT_ERROR)
        }
    }
}

impl From<RunArgs> for run::Config {
    fn from(a: RunArgs) -> Self {
        run::Config {
            fd_name: a.fd_name.unwrap_or_else(|| a.namespace.clone()),
            namespace: a.namespace,
            ports: a.port,
            range: a.range,
            routes: a.routes.into_iter().fold(Routes::empty(), |all, r| all | r),
            ready: a.ready,
            ready_timeout: a.ready_timeout,
            drain_idle: a.drain_idle,
            drain_max: a.drain_max,
            kill_after: a.kill_after,
            notify_replaced: a.notify_replaced,
            record_dir: a.record_dir,
            probation: a.probation,
            canary: a.canary,
            command: a.command,
        }
    }
}

fn check(args: CheckArgs) -> ExitCode {
    let mut ports: Vec<switcheroo::Port> = args.port.iter().map(|p| p.port).collect();
    if ports.is_empty() {
        match switcheroo::all_rules() {
            Ok(rules) => {
                for rule in rules.iter().filter(|r| r.namespace == args.namespace) {
                    if !ports.contains(&rule.public()) {
                        ports.push(rule.public());
                    }
                }
            }
            Err(e) => {
                error!("{e}");
                return ExitCode::from(EXIT_ERROR);
            }
        }
    }
    let target = switcheroo::check::Target {
        ports,
        range: args.range,
    };
    let findings = match switcheroo::check::check(&target) {
        Ok(findings) => findings,
        Err(e) => {
            error!("{e}");
            return ExitCode::from(EXIT_ERROR);
        }
    };
    let blockers = switcheroo::check::blockers(&findings).count();
    let text = if args.json {
        let items: Vec<String> = findings
            .iter()
            .map(|f| {
                format!(
                    "{{\"level\":\"{}\",\"topic\":\"{}\",\"what\":{},\"fix\":{},\"keep\":{}}}",
                    f.level.to_string().to_lowercase(),
                    f.topic,
                    json_string(&f.what),
                    f.fix.as_deref().map_or("null".to_owned(), json_string),
                    f.keep.as_deref().map_or("null".to_owned(), json_string)
                )
            })
            .collect();
        format!(
            "{{\"findings\":[{}],\"blockers\":{blockers}}}\n",
            items.join(",")
        )
    } else {
        let mut text = String::new();
        for f in &findings {
            text.push_str(&format!("{:<8} {:<9} {}\n", f.level, f.topic, f.what));
            if let Some(fix) = &f.fix {
                text.push_str(&format!("{:<8} {:<9} fix:  {fix}\n", "", ""));
            }
            if let Some(keep) = &f.keep {
                text.push_str(&format!("{:<8} {:<9} keep: {keep}\n", "", ""));
            }
        }
        text.push_str(&match blockers {
            0 => "nothing blocks a deploy\n".to_owned(),
            n => format!("{n} blocker(s): fix them before the first deploy\n"),
        });
        text
    };
    let _ = std::io::stdout().lock().write_all(text.as_bytes());
    if blockers == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_ERROR)
    }
}

fn status(args: StatusArgs) -> switcheroo::Result<()> {
    let mut rules = switcheroo::all_rules()?;
    if let Some(ns) = &args.namespace {
        rules.retain(|r| &r.namespace == ns);
    }
    let mut out = std::io::stdout().lock();
    let text = if args.json {
        json(&rules)
    } else {
        table(&rules)
    };
    // A closed stdout (`| head`) is not an error worth a message.
    let _ = out.write_all(text.as_bytes());
    Ok(())
}

fn table(rules: &[Rule]) -> String {
    let mut rows = vec![[
        "NAMESPACE".to_owned(),
        "FAMILY".to_owned(),
        "CHAIN".to_owned(),
        "PROTO".to_owned(),
        "PORT".to_owned(),
        "INTERNAL".to_owned(),
        "PID".to_owned(),
        "ROLE".to_owned(),
    ]];
    for r in rules {
        rows.push([
            r.namespace.clone(),
            r.family.to_string(),
            r.chain.to_string(),
            r.protocol.to_string(),
            r.public_port.to_string(),
            r.internal_port.to_string(),
            r.pid.map_or("-".to_owned(), |p| p.to_string()),
            r.role_name(),
        ]);
    }
    let mut widths = [0; 8];
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let mut text = String::new();
    for row in &rows {
        let line: Vec<String> = row
            .iter()
            .zip(widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        text.push_str(line.join("  ").trim_end());
        text.push('\n');
    }
    text
}

fn json(rules: &[Rule]) -> String {
    let items: Vec<String> = rules
        .iter()
        .map(|r| {
            format!(
                "{{\"namespace\":{},\"family\":\"{}\",\"chain\":\"{}\",\"handle\":{},\"protocol\":\"{}\",\"port\":{},\"internal_port\":{},\"pid\":{},\"start\":{},\"alive\":{},\"role\":{}{}}}",
                json_string(&r.namespace),
                r.family,
                r.chain,
                r.handle.get(),
                r.protocol,
                r.public_port,
                r.internal_port,
                r.pid.map_or("null".to_owned(), |p| p.to_string()),
                r.start.map_or("null".to_owned(), |s| s.to_string()),
                r.alive,
                json_string(&if r.alive { r.role.to_string() } else { "dead".to_owned() }),
                r.weight.map_or(String::new(), |w| format!(",\"weight\":{w}")),
            )
        })
        .collect();
    format!("{{\"rules\":[{}]}}\n", items.join(","))
}

/// A signal by name, `USR1` or `SIGUSR1`; not one that stops or kills.
fn parse_signal(s: &str) -> Result<nix::sys::signal::Signal, String> {
    use nix::sys::signal::Signal;
    let name = if s.starts_with("SIG") {
        s.to_owned()
    } else {
        format!("SIG{s}")
    };
    let signal: Signal = name
        .parse()
        .map_err(|_| format!("{s:?} is not a signal name (USR1, HUP, WINCH, ...)"))?;
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

fn json_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn parse_range(s: &str) -> Result<RangeInclusive<u16>, String> {
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

fn parse_route(s: &str) -> Result<Routes, String> {
    match s {
        "network" => Ok(Routes::NETWORK),
        "localhost" => Ok(Routes::LOCALHOST),
        _ => Err(format!("{s:?}: expected network or localhost")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn run_arguments() {
        let cli = Cli::try_parse_from([
            "switcheroo",
            "run",
            "-p",
            "8080",
            "--range",
            "41000-41010",
            "--routes",
            "localhost",
            "--ready",
            "http:/health",
            "--",
            "server",
            "--port",
            "{port}",
        ])
        .unwrap();
        let Command::Run(args) = cli.command else {
            panic!("not run")
        };
        let config = run::Config::from(*args);
        assert_eq!(config.range, 41000..=41010);
        assert_eq!(config.routes, Routes::LOCALHOST);
        assert_eq!(config.namespace, "default");
        assert_eq!(config.command, ["server", "--port", "{port}"]);
        assert!(Cli::try_parse_from(["switcheroo", "run", "-p", "8080"]).is_err());
        assert!(
            Cli::try_parse_from(["switcheroo", "run", "-p", "8080", "--range", "9-", "x"]).is_err()
        );
    }

    #[test]
    fn several_ports_and_their_names() {
        let parse = |extra: &[&str]| {
            let mut argv = vec!["switcheroo", "run", "-n", "web"];
            argv.extend_from_slice(extra);
            let cli = Cli::try_parse_from(argv).map_err(|e| e.to_string())?;
            let Command::Run(args) = cli.command else {
                panic!("not run")
            };
            let config = run::Config::from(*args);
            config.check()?;
            Ok::<_, String>(config)
        };
        let config = parse(&["-p", "http=80", "-p", "443/udp", "--", "server"]).unwrap();
        let ports: Vec<String> = config.ports.iter().map(|p| p.port.to_string()).collect();
        assert_eq!(ports, ["80/tcp", "443/udp"]);
        assert_eq!(config.ports[0].name.as_deref(), Some("http"));
        let err = parse(&["-p", "a=80", "-p", "a=81", "--", "server"]).unwrap_err();
        assert!(err.contains("given twice"), "{err}");
        let err = parse(&["-p", "80", "-p", "81", "--", "s", "{port}"]).unwrap_err();
        assert!(err.contains("ambiguous"), "{err}");
        assert!(parse(&["-p", "80", "-p", "x=81", "--", "s", "{port:x}", "{port:80}"]).is_ok());
        assert!(parse(&["-p", "80/sctp", "--", "s"]).is_err());
    }

    #[test]
    fn json_is_escaped() {
        assert_eq!(json_string("a\"b\\c\n"), "\"a\\\"b\\\\c\\u000a\"");
        assert_eq!(json(&[]), "{\"rules\":[]}\n");
    }
}
