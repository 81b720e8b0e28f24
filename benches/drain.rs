//! Failed connections per 1,000 deploys under load: `hello` that closes its listener as
//! soon as it gets SIGTERM (`--no-drain`) against `hello` that drains with
//! [`switcheroo::Drain`], side by side in one run; and how long a drain takes.
//!
//! `cargo build --release --example hello && cargo bench --bench drain [-- --deploys N]
//! [--conntrack-time-wait S]` as root. Each row runs in a fresh network namespace of its own
//! (unshare(2)), which disappears with the process. Deploys are real processes, as in
//! production: each new `hello` takes over and SIGTERMs the previous one, while client
//! threads open a new connection per request, from 1,000 loopback addresses and from one.

use lab::bench::{arg, hello_path};

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

struct Instance {
    child: Child,
    stderr: BufReader<std::process::ChildStderr>,
}

fn start(drain: bool) -> Instance {
    let mut cmd = Command::new(hello_path());
    // A wide range: at one deploy every ~60 ms a 100-port range runs out of ports without
    // TIME_WAIT leftovers within seconds, and reusing one refuses connections whatever the
    // old instance does; real deploys are minutes apart.
    cmd.args(["--namespace", "drainbench", "--range", "41000-48999"]);
    if !drain {
        cmd.arg("--no-drain");
    }
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start hello");
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).expect("ready line");
    if !line.starts_with("ready") {
        let mut err = String::new();
        let _ = std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err);
        panic!("hello did not start: {err}");
    }
    Instance {
        stderr: BufReader::new(child.stderr.take().unwrap()),
        child,
    }
}

/// Waits for a replaced instance to exit; returns its drain time if it reported one.
fn reap(mut old: Instance) -> Option<Duration> {
    let mut drained = None;
    for line in (&mut old.stderr).lines().map_while(Result::ok) {
        if let Some(rest) = line.strip_prefix("drained in ") {
            let ms: Option<f64> = rest
                .split_whitespace()
                .next()
                .and_then(|v| v.strip_suffix("ms"))
                .and_then(|v| v.parse().ok());
            drained = ms.map(|ms| Duration::from_secs_f64(ms / 1e3));
        }
    }
    let _ = old.child.wait();
    drained
}

struct Outcome {
    requests: u64,
    failed: u64,
    drains: Vec<Duration>,
    elapsed: Duration,
}

fn run(drain: bool, deploys: usize, interval: Duration, sources: u32, time_wait: u32) -> Outcome {
    // Each row in a fresh network namespace: conntrack entries of the previous row would
    // otherwise still fill the table.
    if let Err(e) = enter_private_netns(time_wait) {
        eprintln!("drain bench: {e}");
        std::process::exit(1);
    }
    let mut current = start(drain);
    let mut plan = lab::load::Plan::new("127.0.0.1:8080".parse().unwrap());
    plan.close_clients = 6;
    plan.keepalive_clients = 0;
    plan.sources = sources;
    let load = lab::load::Load::start(&plan);
    let started = Instant::now();
    let mut reapers: Vec<JoinHandle<Option<Duration>>> = Vec::new();
    for _ in 0..deploys {
        std::thread::sleep(interval);
        let next = start(drain);
        let old = std::mem::replace(&mut current, next);
        reapers.push(std::thread::spawn(move || reap(old)));
    }
    std::thread::sleep(Duration::from_millis(300));
    let stats = load.stop();
    for (kind, msg) in stats.samples.lock().unwrap().iter().take(3) {
        eprintln!(
            "  sample failure ({}): {kind:?}: {msg}",
            if drain { "drain" } else { "close" }
        );
    }
    let drains = reapers
        .into_iter()
        .filter_map(|r| r.join().ok().flatten())
        .collect();
    let _ = current.child.kill();
    let _ = current.child.wait();
    Outcome {
        requests: stats.ok() + stats.failed(),
        failed: stats.failed(),
        drains,
        elapsed: started.elapsed(),
    }
}

fn enter_private_netns(time_wait: u32) -> Result<(), String> {
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
        .map_err(|e| format!("unshare(CLONE_NEWNET): {e} (run as root)"))?;
    let ok = Command::new("ip")
        .args(["link", "set", "lo", "up"])
        .status()
        .map_err(|e| format!("ip link set lo up: {e}"))?
        .success();
    if !ok {
        return Err("ip link set lo up failed".into());
    }
    // The redirect needs a conntrack entry per connection, kept 120 s after the close by
    // default: at this bench's ~15,000 new connections a second from 1,000 addresses that is
    // far more than nf_conntrack_max (262,144 here), and a full table drops SYNs. A server
    // with such a rate sizes the table or this timeout; the bench shortens the timeout in
    // its own namespace (`--conntrack-time-wait S`, default 5).
    std::fs::write(
        "/proc/sys/net/netfilter/nf_conntrack_tcp_timeout_time_wait",
        time_wait.to_string(),
    )
    .map_err(|e| format!("setting the conntrack TIME_WAIT timeout: {e}"))
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if !args.iter().any(|a| a == "--bench") {
        println!("drain bench: skipped under `cargo test`; run `cargo bench --bench drain`");
        return;
    }
    if !hello_path().exists() {
        eprintln!(
            "drain bench: {} is missing; run `cargo build --release --example hello` first",
            hello_path().display()
        );
        std::process::exit(1);
    }
    let deploys: usize = arg(&args, "--deploys", 200);
    let time_wait: u32 = arg(&args, "--conntrack-time-wait", 5);
    let interval = Duration::from_millis(50);
    println!("{deploys} deploys of hello per mode, one every {interval:?} (plus start-up), 6 client threads, new connection per request, conntrack TIME_WAIT {time_wait} s\n");
    println!("| old instance on SIGTERM | client addresses | requests | conn/s | failed | failed per 1,000 deploys | drain median | drain max |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    let mut per_1000 = Vec::new();
    // 1,000 client addresses as real traffic has them; one address as the worst case, where
    // a client opening thousands of connections a second reuses its ports within seconds.
    for sources in [1000, 0] {
        for drain in [false, true] {
            let mut o = run(drain, deploys, interval, sources, time_wait);
            o.drains.sort();
            let p = o.failed as f64 * 1000.0 / deploys as f64;
            per_1000.push((sources, drain, p));
            let ms = |d: Option<&Duration>| {
                d.map_or("-".into(), |d| format!("{:.0} ms", d.as_secs_f64() * 1e3))
            };
            println!(
                "| {} | {} | {} | {:.0} | {} | {:.1} | {} | {} |",
                if drain {
                    "drains (switcheroo::Drain)"
                } else {
                    "closes at once (--no-drain)"
                },
                sources.max(1),
                o.requests,
                o.requests as f64 / o.elapsed.as_secs_f64(),
                o.failed,
                p,
                ms(o.drains.get(o.drains.len() / 2)),
                ms(o.drains.last()),
            );
        }
    }
    let drained_ok = per_1000
        .iter()
        .filter(|(_, d, _)| *d)
        .all(|(_, _, p)| *p == 0.0);
    println!(
        "\ntarget: 0 failed connections with the drain: {}",
        if drained_ok { "met" } else { "NOT met" }
    );
}
