//! `switcheroo`: zero-downtime deploys for servers in any language.
//!
//! `switcheroo run` binds the internal ports, hands the sockets to the server as fds 3,
//! 4, ... (systemd socket activation), waits until the server is ready, then points the
//! public ports at it in one transaction; the previous instance's `switcheroo run` gets
//! SIGTERM, waits until its server has emptied the accept queues, stops it and exits with
//! its status.

mod args;
mod drain;
mod exit;
mod hold;
mod machine;
mod probe;
mod report;
mod tree;

use args::{namespace, range, PortArg, RunArgs};
use clap::{Args, CommandFactory, Parser, Subcommand};
use exit::Exit;
use log::error;
use std::ffi::OsString;
use std::io::Write;
use std::ops::RangeInclusive;
use std::process::ExitCode;

const AFTER_HELP: &str = "\
Examples:
  # before the first deploy: will the firewall let redirected connections in?
  switcheroo check -p 8080

  # serve 8080 with gunicorn; run the same line again to deploy a new version
  switcheroo run --port 8080 --ready http:/healthz -- gunicorn app:app

  # a server that only takes a port number: {port} is replaced by the internal port
  switcheroo run --namespace api --port 443 --ready https:/ -- ./server --listen-port {port}

  # nginx: its config from a template with the internal port; it stops gracefully on QUIT
  switcheroo run -n web -p 8080 --ready http:/ --stop-signal QUIT -- \\
      sh -c 'sed s/@PORT@/$SWITCHEROO_PORT/ nginx.conf.in > nginx.conf && exec nginx -c $PWD/nginx.conf'

  # HTTP, HTTPS and HTTP/3 switched together: fds 3, 4, 5, LISTEN_FDNAMES=http:https:h3
  switcheroo run -n web -p http=80 -p https=443 -p h3=443/udp -- ./server

  # keep the previous version warm for 5 minutes; roll back at once if this one dies
  switcheroo run --port 8080 --probation 5m --ready http:/healthz -- ./server
  switcheroo rollback            # back to the previous version, in one transaction

  # send 10% of new connections to the new version first
  switcheroo run --port 8080 --canary 10 --probation 5m -- ./server
  switcheroo promote             # it takes every new connection; or: switcheroo rollback

  switcheroo status              # every instance: role, since when, connections
  switcheroo cleanup --namespace api

Exit status:
  0        run: the server exited 0; status, cleanup, rollback, promote: done;
           check: nothing blocks
  1        an error of switcheroo itself (permissions, netfilter, a port another
           namespace serves), or run's switch failed (the new server is stopped);
           rollback: nothing to roll back to; promote: no live canary; check: a
           blocker was found. Nothing changed, the old version keeps serving
  2        bad arguments (nothing was started or changed)
  3        run: the new server failed to start, exited, was not ready in time or was told
           to stop before the switch; nothing was switched and the old version keeps
           serving
  4        run: this instance was rolled back (switcheroo rollback, 3 failed health checks
           or its server's exit during the probation); the previous instance serves again
  N        run: the server's own exit status, or 128+signal if a signal ended it

Logging goes to stderr; RUST_LOG=debug (or warn, ...) sets the level, info by default.
Needs CAP_NET_ADMIN (and CAP_KILL to stop instances of other users).";

const RUN_AFTER_HELP: &str = "\
Options go before the command, then --, then the command: switcheroo run -p 8080 -- ./server
--flag. Whatever follows the command is the server's.

The server gets one socket per --port, in the order given, as fds 3, 4, ... with
LISTEN_FDS=<count>, LISTEN_PID=<its pid> and LISTEN_FDNAMES=<names> (systemd socket
activation: gunicorn, uvicorn --fd 3, Node's {fd: 3}, Go's net.FileListener, puma's
bind to tcp://[::]:$SWITCHEROO_PORT, ...): a listening TCP socket for PORT or PORT/tcp, an
unconnected UDP socket for PORT/udp. A port's name is NAME from NAME=PORT, else --fd-name,
else the namespace. SWITCHEROO_PORT=<internal port of the first> and
SWITCHEROO_PORTS=<PORT/PROTO=INTERNAL,...> say where they are. With --ready notify it
also gets NOTIFY_SOCKET and must send READY=1.

If an argument contains {port} (one port) or {port:NAME} (NAME, or PORT/PROTO, of a
--port), the server binds its ports itself: it gets no socket and no LISTEN_* variables.
A server that reads its port from a config file gets it from SWITCHEROO_PORT: through
its own environment substitution (Caddy's {$SWITCHEROO_PORT}), or a template rendered by
`sh -c '... && exec server'`.

With --notify-replaced SIGNAL, the server gets SIGNAL as soon as it is replaced, before
the drain, so that it can answer `Connection: close` while its keep-alive clients still
send. After the drain the server gets --stop-signal (TERM; QUIT for nginx). `run` is the
subreaper of the server: processes it forks stay with `run`, which exits only when the
last has (or sends SIGKILL to all of them after --kill-after).

Run it the same way again to deploy: the new instance switches the public ports to its
server once that is ready; the previous one drains, stops its server and exits with its
status. If the new server exits, is told to stop, or is not ready within --ready-timeout,
nothing is switched and run exits 3 at once; if the switch fails, run exits 1. A public
port that a live instance of another namespace serves is refused (exit 1) unless
--move-from names that namespace.

With --probation, the previous instance stays warm below this one: if this one's server
exits, or fails 3 health checks in a row, the previous one serves again and run exits 4.
Stopped with SIGTERM while it serves, run first removes its own rules, so that an instance
below takes new connections at once.

Under systemd (Type=notify), switcheroo itself sends READY=1 once it has switched, and
keeps STATUS= current (serving, standby, canary, draining with N connections).";

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
    /// connection? then the exact fix), who else is on the public ports, the internal
    /// range against the ephemeral ports, conntrack's headroom. Exits 1 when something
    /// blocks
    Check(CheckArgs),
    /// Start COMMAND with a fresh listening socket as fd 3, switch the public port to it
    /// once it is ready, and stop the previous instance gracefully
    #[command(after_help = RUN_AFTER_HELP)]
    Run(Box<RunArgs>),
    /// List every instance in this network namespace: its role (canary, active, standby,
    /// dead, or draining out of the chains), since when, its ports and the connections it
    /// still holds; --rules lists the rules instead
    Status(StatusArgs),
    /// Delete the namespace's head in one transaction (the canary, else the active if a
    /// live standby is below it); its owner retires
    Rollback(NamespaceArgs),
    /// Make the namespace's canary the active in one transaction; the previous active
    /// becomes the standby (the canary's --probation decides when it retires)
    Promote(NamespaceArgs),
    /// Delete a namespace's rules (processes are not signalled)
    Cleanup(CleanupArgs),
    /// Do nothing until SIGTERM, reaping every process that ends up as its child: the
    /// process of a holder container that owns the network and pid namespaces releases
    /// join (`docker run --network container:H --pid container:H`), in an image without
    /// a shell
    Hold,
    /// Write the man pages (man1/) and shell completions (bash, zsh, fish) into DIR: for
    /// packagers
    #[command(hide = true)]
    Generate {
        /// Where to write them
        dir: std::path::PathBuf,
    },
}

#[derive(Args, Debug)]
struct CheckArgs {
    /// The service that is to deploy; without --port, its public ports are read from its
    /// rules
    #[arg(long, short = 'n', default_value = "default", value_parser = namespace)]
    namespace: String,
    /// A public port, as for run: `[NAME=]PORT[/tcp|/udp]` (repeatable)
    #[arg(long, short = 'p', value_name = "[NAME=]PORT[/PROTO]", value_parser = PortArg::parse)]
    port: Vec<PortArg>,
    /// Internal ports to choose from, MIN-MAX
    #[arg(long, default_value = "40400-40499", value_parser = range)]
    range: RangeInclusive<u16>,
    /// Print {"findings": [...], "blockers": N} as JSON
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
struct StatusArgs {
    /// Only this namespace's instances (or rules)
    #[arg(long, short = 'n', value_parser = namespace)]
    namespace: Option<String>,
    /// List the rules, one line per rule, family and chain, instead of the instances
    #[arg(long)]
    rules: bool,
    /// Print {"instances": [...], "rules": [...]} as JSON
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
struct NamespaceArgs {
    /// The service's name
    #[arg(long, short = 'n', default_value = "default", value_parser = namespace)]
    namespace: String,
}

#[derive(Args, Debug)]
struct CleanupArgs {
    /// The namespace whose rules to delete
    #[arg(long, short = 'n', value_parser = namespace)]
    namespace: String,
}

fn main() -> ExitCode {
    let argv: Vec<OsString> = std::env::args_os().collect();
    let cli = match Cli::try_parse_from(&argv) {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return match e.kind() {
                clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion => {
                    Exit::Success
                }
                _ => Exit::Usage,
            }
            .into();
        }
    };
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format_target(false)
        .init();
    let exit = match cli.command {
        Command::Check(args) => check(args),
        Command::Run(args) => match args::Config::new(*args, &argv) {
            Ok(config) => machine::run(config),
            Err(e) => {
                let mut cmd = Cli::command();
                let usage = cmd
                    .find_subcommand_mut("run")
                    .map(|run| run.render_usage().to_string())
                    .unwrap_or_default();
                error!("switcheroo run: {e}");
                eprintln!("{usage}");
                Exit::Usage
            }
        },
        Command::Status(args) => done(status(args)),
        Command::Hold => hold::hold(),
        Command::Generate { dir } => match generate(&dir) {
            Ok(()) => Exit::Success,
            Err(e) => {
                error!(
                    "writing the man pages and completions into {}: {e}",
                    dir.display()
                );
                Exit::Failed
            }
        },
        Command::Cleanup(args) => done(switcheroo::cleanup(&args.namespace).map(|n| {
            println!("removed {n} rules of namespace {}", args.namespace);
        })),
        Command::Rollback(args) => done(switcheroo::rollback(&args.namespace).map(|r| {
            println!(
                "namespace {}: rolled back from pid {} to {} (removed {} rules, signalled {:?})",
                args.namespace,
                r.from,
                r.serving
                    .map_or("nobody".to_owned(), |p| format!("pid {p}")),
                r.removed.len(),
                r.signalled
            );
        })),
        Command::Promote(args) => done(switcheroo::promote(&args.namespace).map(|p| {
            println!(
                "namespace {}: pid {} is the active now; standby {}",
                args.namespace,
                p.promoted,
                p.standby.map_or("none".to_owned(), |s| format!("pid {s}"))
            );
        })),
    };
    exit.into()
}

/// The exit of a command that either did its work or failed with the library's error.
fn done(result: switcheroo::Result<()>) -> Exit {
    match result {
        Ok(()) => Exit::Success,
        Err(e) => {
            error!("{e}");
            if e.is_bad_input() {
                Exit::Usage
            } else {
                Exit::Failed
            }
        }
    }
}

/// The man pages (`switcheroo.1`, `switcheroo-run.1`, ...) under `dir/man1`, and the
/// completions under `dir/completions` (`switcheroo.bash`, `_switcheroo`,
/// `switcheroo.fish`), from the same definitions that parse the command line.
fn generate(dir: &std::path::Path) -> std::io::Result<()> {
    use clap_complete::Shell;
    let man = dir.join("man1");
    let completions = dir.join("completions");
    std::fs::create_dir_all(&man)?;
    std::fs::create_dir_all(&completions)?;
    let cmd = Cli::command();
    let page = |cmd: clap::Command, name: String| -> std::io::Result<()> {
        let mut out = Vec::new();
        clap_mangen::Man::new(cmd).render(&mut out)?;
        std::fs::write(man.join(format!("{name}.1")), out)
    };
    page(cmd.clone(), "switcheroo".into())?;
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        let name = format!("switcheroo-{}", sub.get_name());
        page(sub.clone().name(name.clone()), name)?;
    }
    for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
        clap_complete::generate_to(shell, &mut Cli::command(), "switcheroo", &completions)?;
    }
    Ok(())
}

fn check(args: CheckArgs) -> Exit {
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
                return Exit::Failed;
            }
        }
    }
    let target = switcheroo::check::Target {
        namespace: Some(args.namespace),
        ports,
        range: args.range,
    };
    let findings = match switcheroo::check::diagnose(&target) {
        Ok(findings) => findings,
        Err(e) => {
            error!("{e}");
            return Exit::Failed;
        }
    };
    let blockers = switcheroo::check::blockers(&findings).count();
    let text = if args.json {
        report::findings_json(&findings, blockers)
    } else {
        report::findings_text(&findings, blockers)
    };
    // A closed stdout (`| head`) is not an error worth a message.
    let _ = std::io::stdout().lock().write_all(text.as_bytes());
    if blockers == 0 {
        Exit::Success
    } else {
        Exit::Failed
    }
}

fn status(args: StatusArgs) -> switcheroo::Result<()> {
    let mut rules = switcheroo::all_rules()?;
    if let Some(ns) = &args.namespace {
        rules.retain(|r| &r.namespace == ns);
    }
    let text = if args.rules && !args.json {
        report::rule_table(&rules)
    } else {
        let instances = switcheroo::instances(args.namespace.as_deref())?;
        if args.json {
            report::status_json(&instances, &rules)
        } else {
            report::instance_table(&instances)
        }
    };
    let _ = std::io::stdout().lock().write_all(text.as_bytes());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(argv: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(argv)
    }

    fn config(argv: &[&str]) -> Result<args::Config, String> {
        let cli = parse(argv).map_err(|e| e.to_string())?;
        let Command::Run(a) = cli.command else {
            panic!("not run")
        };
        let os: Vec<OsString> = argv.iter().map(OsString::from).collect();
        args::Config::new(*a, &os)
    }

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn run_arguments() {
        let c = config(&[
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
            "--stop-signal",
            "QUIT",
            "--",
            "server",
            "--port",
            "{port}",
        ])
        .unwrap();
        assert_eq!(c.range, 41000..=41010);
        assert_eq!(c.routes, switcheroo::Routes::LOCALHOST);
        assert_eq!(c.namespace, "default");
        assert_eq!(c.stop_signal, nix::sys::signal::Signal::SIGQUIT);
        assert_eq!(c.program, "server");
        assert!(c.binds_itself());
        assert!(
            c.misplaced.is_empty(),
            "after --, everything is the server's"
        );
    }

    #[test]
    fn an_unknown_option_before_the_command_is_an_error_not_the_command() {
        let err = parse(&[
            "switcheroo",
            "run",
            "-p",
            "8099",
            "--stop-signl",
            "QUIT",
            "--",
            "server",
        ])
        .unwrap_err();
        assert_eq!(err.kind(), clap::error::ErrorKind::UnknownArgument, "{err}");
        assert!(parse(&[
            "switcheroo",
            "run",
            "-p",
            "8080",
            "--range",
            "9-",
            "--",
            "x"
        ])
        .is_err());
        for bad in [
            &["switcheroo", "run", "-n", "web/v2", "-p", "80", "--", "x"][..],
            &[
                "switcheroo",
                "run",
                "-p",
                "80",
                "--ready",
                "http://localhost/",
                "--",
                "x",
            ],
            &[
                "switcheroo",
                "run",
                "-p",
                "80",
                "--stop-signal",
                "NOPE",
                "--",
                "x",
            ],
            &[
                "switcheroo",
                "run",
                "-p",
                "80",
                "--drain-idle",
                "soon",
                "--",
                "x",
            ],
            &["switcheroo", "cleanup", "-n", "no:colons"],
        ] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn options_after_the_command_get_a_hint_about_the_order() {
        let err = config(&["switcheroo", "run", "server", "-p", "8091"]).unwrap_err();
        assert!(err.contains("--port is missing"), "{err}");
        assert!(err.contains("switcheroo run -p 8091 -- server"), "{err}");
        let c = config(&[
            "switcheroo",
            "run",
            "-p",
            "80",
            "server",
            "--ready",
            "http:/",
        ])
        .unwrap();
        assert_eq!(c.misplaced, ["--ready http:/"]);
        let err = config(&["switcheroo", "run", "-p", "80"]).unwrap_err();
        assert!(err.contains("no server to run"), "{err}");
    }

    #[test]
    fn several_ports_and_their_names() {
        let c = config(&[
            "switcheroo",
            "run",
            "-n",
            "web",
            "-p",
            "http=80",
            "-p",
            "443/udp",
            "--",
            "server",
        ])
        .unwrap();
        let ports: Vec<String> = c.ports.iter().map(|p| p.port.to_string()).collect();
        assert_eq!(ports, ["80/tcp", "443/udp"]);
        assert_eq!(c.names(), ["http", "web"]);
        let err =
            config(&["switcheroo", "run", "-p", "a=80", "-p", "a=81", "--", "s"]).unwrap_err();
        assert!(err.contains("given twice"), "{err}");
        let err = config(&[
            "switcheroo",
            "run",
            "-p",
            "80",
            "-p",
            "81",
            "--",
            "s",
            "{port}",
        ])
        .unwrap_err();
        assert!(err.contains("ambiguous"), "{err}");
        assert!(config(&[
            "switcheroo",
            "run",
            "-p",
            "80",
            "-p",
            "x=81",
            "--",
            "s",
            "{port:x}",
            "{port:80}"
        ])
        .is_ok());
        assert!(parse(&["switcheroo", "run", "-p", "80/sctp", "--", "s"]).is_err());
        let err = config(&[
            "switcheroo",
            "run",
            "-p",
            "53/udp",
            "--ready",
            "http:/",
            "--",
            "s",
        ])
        .unwrap_err();
        assert!(err.contains("probes a TCP port"), "{err}");
    }
}
