//! The `switcheroo` command, run as a user runs it, inside a test's network namespace.

use crate::{switcheroo_bin, Hello, Netns};
use std::process::{Command, ExitStatus, Output};

/// `switcheroo run` started in `ns` with `args` (options, `--`, server); waits until it
/// logs that it switched. `pid` is the wrapper's, `port` the (first) internal port.
pub fn run(ns: &Netns, args: &[&str]) -> Hello {
    run_with_env(ns, &[], args)
}

/// [`run`] with extra environment variables.
pub fn run_with_env(ns: &Netns, env: &[(&str, &str)], args: &[&str]) -> Hello {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &ns.name])
        .arg(switcheroo_bin())
        .arg("run")
        .args(args)
        .envs(env.iter().copied());
    let mut h = Hello::start_with(cmd, "switch log line", |line| {
        let rest = line.split_once(" is ready: port ")?.1;
        // `port 8080/tcp -> 40401 in ...`, or `port 53/udp -> 40401, port 53/tcp -> ...`
        let port = rest.split_once(" -> ")?.1.split([' ', ',']).next()?;
        Some((0, port.parse().ok()?))
    });
    // `ip netns exec` executes the command in its own process: the child is the wrapper.
    h.pid = h.child.id();
    h
}

/// `switcheroo run` started in `ns` with `args`, returned as soon as it logs `started`
/// (its server runs, nothing is switched yet).
pub fn run_started(ns: &Netns, args: &[&str]) -> Hello {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &ns.name])
        .arg(switcheroo_bin())
        .arg("run")
        .args(args);
    let mut h = Hello::start_with(cmd, "started line", |line| {
        line.contains("] started ").then_some((0, 0))
    });
    h.pid = h.child.id();
    h
}

/// `switcheroo run` that is expected to end by itself; its exit and output.
pub fn run_to_end(ns: &Netns, args: &[&str]) -> (ExitStatus, String) {
    let out = switcheroo(ns, &[&["run"], args].concat());
    (out.status, text(&out))
}

/// Any `switcheroo` subcommand in `ns`.
pub fn switcheroo(ns: &Netns, args: &[&str]) -> Output {
    let bin = switcheroo_bin();
    ns.exec(&[&[bin.to_str().expect("utf-8 path")], args].concat())
}

/// Standard output and error together.
pub fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The pid of the server a wrapper started, from its `started NAME (pid N)` line.
pub fn server_pid(h: &mut Hello) -> u32 {
    let line = h.line_containing("] started ");
    line.split_once(" (pid ")
        .and_then(|(_, rest)| rest.split(')').next()?.parse().ok())
        .unwrap_or_else(|| panic!("no server pid in {line:?}"))
}

/// Whether `program check...` runs; a missing tool fails the test under CI (`CI=true`),
/// else the test skips with the reason.
pub fn have(program: &str, check: &[&str], what: &str) -> bool {
    let ok = Command::new(program)
        .args(check)
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        let reason = format!("{what} is not installed (ci/setup installs it)");
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("{reason}; CI=true forbids skipping");
        }
        eprintln!("skipped: {reason}");
    }
    ok
}
