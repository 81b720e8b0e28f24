//! Redeploys `hello` under load and reports what the clients saw.
//!
//! Run by `ci/demo` inside a throwaway network namespace: starts `hello` (a sibling binary
//! of this one), drives HTTP load at 127.0.0.1:8080 and [::1]:8080 with new connections
//! and keep-alive connections, starts a new `hello` every `--interval-ms` for `--deploys`
//! times (each new one takes over and SIGTERMs the old one, which drains and exits), and
//! prints a table. Exits 1 if any request failed or any old instance did not exit cleanly.
//!
//! `demo [--deploys N] [--interval-ms MS] [--clients N] [--keepalive-clients N]`

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

struct Args {
    deploys: usize,
    interval: Duration,
    clients: usize,
    keepalive: usize,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        deploys: 20,
        interval: Duration::from_millis(500),
        clients: 6,
        keepalive: 2,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or(format!("{flag} needs a value"));
        let num = |v: String| v.parse::<u64>().map_err(|e| format!("{flag}: {e}"));
        match flag.as_str() {
            "--deploys" => a.deploys = num(value()?)? as usize,
            "--interval-ms" => a.interval = Duration::from_millis(num(value()?)?),
            "--clients" => a.clients = num(value()?)? as usize,
            "--keepalive-clients" => a.keepalive = num(value()?)? as usize,
            _ => return Err(format!("unknown argument {flag}")),
        }
    }
    Ok(a)
}

/// A running `hello`: its pid, port, the time its commit took, and the process.
struct Instance {
    child: Child,
    pid: u32,
    commit: Option<Duration>,
}

fn start_hello() -> Result<Instance, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let hello = exe.with_file_name("hello");
    let mut child = Command::new(&hello)
        .args(["--namespace", "demo", "--port", "8080"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("starting {}: {e}", hello.display()))?;
    let stdout = child.stdout.take().expect("piped");
    let stderr = child.stderr.take().expect("piped");
    let (tx, rx) = mpsc::channel();
    let tx2 = tx.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx2.send(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut commit = None;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = rx
            .recv_timeout(left)
            .map_err(|_| "hello did not print its ready line within 10 s".to_string())?;
        // hello reports its switch on stderr: "switched port=P in Nus ..."
        if let Some(us) = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix("in=").and_then(|v| v.strip_suffix("us")))
        {
            commit = us.parse().ok().map(Duration::from_micros);
        }
        if let Some(rest) = line.strip_prefix("ready pid=") {
            let pid = rest.split_whitespace().next().and_then(|p| p.parse().ok());
            let pid = pid.ok_or(format!("bad ready line {line:?}"))?;
            // The commit line precedes the ready line; give stderr a moment to catch up.
            while commit.is_none() {
                match rx.recv_timeout(Duration::from_millis(50)) {
                    Ok(l) => {
                        commit = l
                            .split_whitespace()
                            .find_map(|w| w.strip_prefix("in=").and_then(|v| v.strip_suffix("us")))
                            .and_then(|v| v.parse().ok())
                            .map(Duration::from_micros)
                    }
                    Err(_) => break,
                }
            }
            return Ok(Instance { child, pid, commit });
        }
        if line.starts_with("error:") {
            return Err(format!("hello failed: {line}"));
        }
    }
}

/// Waits for an instance that was told to leave; true if it exited 0 in time.
fn reap(mut inst: Instance, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        match inst.child.try_wait() {
            Ok(Some(status)) => return status.success(),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            _ => {
                let _ = inst.child.kill();
                let _ = inst.child.wait();
                return false;
            }
        }
    }
}

fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(2);
        }
    };
    if let Err(e) = run(&args) {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

fn run(args: &Args) -> Result<(), String> {
    let mut current = start_hello()?;
    let mut commits = Vec::new();
    commits.extend(current.commit);
    let targets: [SocketAddr; 2] = [
        "127.0.0.1:8080".parse().unwrap(),
        "[::1]:8080".parse().unwrap(),
    ];
    let loads: Vec<lab::load::Load> = targets
        .iter()
        .map(|t| {
            let mut plan = lab::load::Plan::new(*t);
            plan.close_clients = args.clients.div_ceil(2);
            plan.keepalive_clients = args.keepalive.div_ceil(2);
            lab::load::Load::start(&plan)
        })
        .collect();
    let mut reapers = Vec::new();
    let mut pids = vec![current.pid];
    for i in 1..=args.deploys {
        std::thread::sleep(args.interval);
        let next = start_hello()?;
        commits.extend(next.commit);
        pids.push(next.pid);
        eprintln!(
            "deploy {i:>2}: pid {} took over from pid {}",
            next.pid, current.pid
        );
        let old = std::mem::replace(&mut current, next);
        reapers.push(std::thread::spawn(move || {
            reap(old, Duration::from_secs(30))
        }));
    }
    std::thread::sleep(args.interval);
    let stats: Vec<_> = loads.into_iter().map(lab::load::Load::stop).collect();
    let clean_exits = reapers
        .into_iter()
        .filter_map(|r| r.join().ok())
        .filter(|ok| *ok)
        .count();
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(current.pid as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let last_ok = reap(current, Duration::from_secs(30));

    let ok: u64 = stats.iter().map(|s| s.ok()).sum();
    let failed: u64 = stats.iter().map(|s| s.failed()).sum();
    commits.sort();
    let median = commits.get(commits.len() / 2).copied();
    let max = commits.last().copied();
    let fmt = |d: Option<Duration>| {
        d.map_or("n/a".into(), |d| format!("{:.0} µs", d.as_secs_f64() * 1e6))
    };
    println!();
    println!("| deploys | requests | failed requests | old instances exited 0 | commit median | commit max |");
    println!("|--------:|---------:|----------------:|-----------------------:|--------------:|-----------:|");
    println!(
        "| {} | {} | {} | {}/{} | {} | {} |",
        args.deploys,
        ok + failed,
        failed,
        clean_exits,
        args.deploys,
        fmt(median),
        fmt(max)
    );
    for s in &stats {
        for (kind, msg) in s.samples.lock().unwrap().iter() {
            println!("failure: {kind:?}: {msg}");
        }
    }
    if failed > 0 || clean_exits != args.deploys || !last_ok {
        return Err(format!(
            "{failed} failed requests, {} of {} old instances did not exit cleanly",
            args.deploys - clean_exits,
            args.deploys
        ));
    }
    Ok(())
}
