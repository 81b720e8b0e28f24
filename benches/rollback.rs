//! A bad release that dies: how fast the previous instance takes the port back, and how
//! many connections fail, with a probation (the standby takes over) and without one (the
//! port leads nowhere until the next deploy), side by side in one run.
//!
//! `cargo build --release --example hello && cargo bench --bench rollback [-- --crashes N]`
//! as root. Runs in a network namespace of its own (unshare(2)). `hello` instances are real
//! processes; the new one is SIGKILLed while client threads open new connections from
//! 1,000 loopback addresses at about 3,000 a second.
//!
//! Time to restore: from the SIGKILL to the kernel's notification that the dead instance's
//! rules were deleted (the standby's are then the head), read from nf_tables' own
//! notifications. Failed connections per crash: requests that failed and ended within the
//! window after the SIGKILL.

use lab::bench::{arg, hello_path};

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use switcheroo_sys::monitor::{Monitor, Notification};

/// The window after a crash in which failed connections are counted.
const WINDOW: Duration = Duration::from_secs(1);

/// Starts `hello` with `args`; returns it and its pid once it is ready.
fn start(args: &[&str]) -> (Child, u32) {
    let mut child = Command::new(hello_path())
        .args(["--namespace", "rollbackbench", "--range", "41000-48999"])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start hello");
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).expect("ready line");
    let pid = line
        .strip_prefix("ready pid=")
        .and_then(|r| r.split_whitespace().next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("hello did not start: {line:?}"));
    (child, pid)
}

fn kill9(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// Waits until the rules of `pid` are deleted (the kernel's notification), at most 5 s.
fn deleted(monitor: &mut Monitor, pid: u32) -> Option<Instant> {
    let needle = format!(":pid={pid}:");
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        match monitor.next(Some(Duration::from_millis(100))) {
            Ok(Some(Notification::DelRule(entry)))
                if entry
                    .redirect
                    .as_ref()
                    .is_some_and(|r| r.comment.contains(&needle)) =>
            {
                return Some(Instant::now())
            }
            Ok(_) => {}
            Err(e) => panic!("notifications: {e}"),
        }
    }
    None
}

/// The failed requests that ended within `WINDOW` after each instant of `crashes`.
fn failed_per_crash(samples: &[lab::load::Sample], crashes: &[Instant]) -> Vec<usize> {
    crashes
        .iter()
        .map(|&at| {
            samples
                .iter()
                .filter(|s| s.result.is_err() && s.done >= at && s.done < at + WINDOW)
                .count()
        })
        .collect()
}

fn summary(mut v: Vec<usize>) -> (usize, f64, usize) {
    v.sort();
    let mean = v.iter().sum::<usize>() as f64 / v.len().max(1) as f64;
    (v[v.len() / 2], mean, *v.last().unwrap_or(&0))
}

fn enter_private_netns() {
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
        .unwrap_or_else(|e| panic!("unshare(CLONE_NEWNET): {e} (run as root)"));
    let ok = Command::new("ip")
        .args(["link", "set", "lo", "up"])
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "ip link set lo up");
    // Keep the conntrack table small at thousands of connections a second (see the drain
    // bench); only this namespace's.
    std::fs::write(
        "/proc/sys/net/netfilter/nf_conntrack_tcp_timeout_time_wait",
        "5",
    )
    .expect("conntrack TIME_WAIT timeout");
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if !args.iter().any(|a| a == "--bench") {
        println!("rollback bench: skipped under `cargo test`; run `cargo bench --bench rollback`");
        return;
    }
    if !hello_path().exists() {
        eprintln!(
            "rollback bench: {} is missing; run `cargo build --release --example hello` first",
            hello_path().display()
        );
        std::process::exit(1);
    }
    let crashes: usize = arg(&args, "--crashes", 50);
    enter_private_netns();
    let mut monitor = Monitor::open().expect("nf_tables notifications");

    let mut plan = lab::load::Plan::new("127.0.0.1:8080".parse().unwrap());
    plan.close_clients = 3;
    plan.keepalive_clients = 0;
    plan.sources = 1000;
    plan.pause = Duration::from_micros(700);
    plan.timeline = true;
    plan.timeout = Duration::from_secs(2);

    // With a probation: A serves; each round B deploys over it with a probation and is
    // SIGKILLed; A takes the port back.
    let (mut a, _) = start(&[]);
    let load = lab::load::Load::start(&plan);
    let started = Instant::now();
    let mut restore = Vec::new();
    let mut on_crashes = Vec::new();
    for _ in 0..crashes {
        let (mut b, b_pid) = start(&["--probation", "60s"]);
        std::thread::sleep(Duration::from_millis(300));
        let killed = Instant::now();
        kill9(&mut b);
        match deleted(&mut monitor, b_pid) {
            Some(at) => restore.push(at - killed),
            None => eprintln!("rollback bench: pid {b_pid}'s rules were not deleted within 5 s"),
        }
        on_crashes.push(killed);
        std::thread::sleep(WINDOW);
    }
    let on_elapsed = started.elapsed();
    let stats = load.stop();
    let on_samples = stats.timeline.lock().unwrap().clone();
    kill9(&mut a);

    // Without a probation: B replaces the current instance (which retires), then dies;
    // nothing serves until the next deploy, which starts the next round.
    let (mut current, _) = start(&[]);
    let load = lab::load::Load::start(&plan);
    let off_rounds = crashes.min(20);
    let mut off_crashes = Vec::new();
    for _ in 0..off_rounds {
        let (mut b, _) = start(&[]);
        std::thread::sleep(Duration::from_millis(300));
        let killed = Instant::now();
        kill9(&mut b);
        off_crashes.push(killed);
        std::thread::sleep(WINDOW);
        kill9(&mut current);
        current = start(&[]).0;
        std::thread::sleep(Duration::from_millis(300));
    }
    let stats = load.stop();
    let off_samples = stats.timeline.lock().unwrap().clone();
    kill9(&mut current);

    restore.sort();
    let ms = |d: Duration| format!("{:.1} ms", d.as_secs_f64() * 1e3);
    let rate = on_samples.len() as f64 / on_elapsed.as_secs_f64();
    println!(
        "## a bad release SIGKILLed: {crashes} crashes with a probation, {off_rounds} without\n"
    );
    println!(
        "time from SIGKILL to the standby's rules being the head: median {}, max {} (over {} crashes)\n",
        restore.get(restore.len() / 2).copied().map_or("-".into(), ms),
        restore.last().copied().map_or("-".into(), ms),
        restore.len()
    );
    println!(
        "failed connections in the {} s after each SIGKILL, at {rate:.0} new connections/s from 1,000 client addresses:\n",
        WINDOW.as_secs()
    );
    println!("| probation | crashes | failed per crash, median | mean | max |");
    println!("|---|---:|---:|---:|---:|");
    let (m, mean, max) = summary(failed_per_crash(&on_samples, &on_crashes));
    println!("| on: the standby takes the port back | {crashes} | {m} | {mean:.1} | {max} |");
    let (m, mean, max) = summary(failed_per_crash(&off_samples, &off_crashes));
    println!(
        "| off: nothing serves until the next deploy | {off_rounds} | {m} | {mean:.1} | {max} |"
    );
}
