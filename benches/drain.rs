//! Failed connections per 1,000 deploys under load: an old instance that closes its
//! listener as soon as it is replaced, against one that drains with [`switcheroo::Drain`],
//! side by side in one run; and how long a drain takes.
//!
//! `cargo bench --bench drain [-- --deploys N]` (root: it runs in a network namespace of
//! its own, made with unshare(2), that disappears with the process).
//!
//! Instances are listeners in this process, each switched in with the library exactly as a
//! server would; the load generator of `tests/load` keeps about a few thousand new
//! connections per second on 127.0.0.1:8080.

#[path = "../tests/load/mod.rs"]
mod load;

use std::io::{Read, Write};
use std::net::TcpListener;
use std::os::fd::AsFd;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use switcheroo::{Drain, Switcheroo};

#[derive(Clone, Copy, Debug, PartialEq)]
enum Retire {
    CloseAtOnce,
    Drain,
}

struct Instance {
    listener: Arc<TcpListener>,
    acceptor: JoinHandle<()>,
}

fn serve(listener: Arc<TcpListener>, port: u16) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let body = format!("hello from pid {} port {port}", std::process::id());
        let response = format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        // accept() fails with EINVAL once the listener is shut down.
        while let Ok((mut stream, _)) = listener.accept() {
            let response = response.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 1024];
                let mut seen = Vec::new();
                while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => seen.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = stream.write_all(response.as_bytes());
            });
        }
    })
}

fn deploy(sw: &Switcheroo) -> (Instance, Duration) {
    let (listener, takeover) = sw.begin().expect("begin");
    let listener = Arc::new(listener);
    let acceptor = serve(listener.clone(), takeover.port());
    let report = takeover.commit().expect("commit");
    (Instance { listener, acceptor }, report.elapsed)
}

/// Retires an instance the way an old process would after SIGTERM; returns the drain time.
fn retire(old: Instance, how: Retire) -> Duration {
    let waited = match how {
        Retire::CloseAtOnce => Duration::ZERO,
        Retire::Drain => Drain::new().wait(&old.listener).expect("drain").waited,
    };
    // shutdown(2) on a listening socket wakes the acceptor, and resets whatever is still
    // queued: exactly what closing the listener does.
    let _ = nix::sys::socket::shutdown(
        std::os::fd::AsRawFd::as_raw_fd(&old.listener.as_fd()),
        nix::sys::socket::Shutdown::Both,
    );
    let _ = old.acceptor.join();
    waited
}

struct Outcome {
    requests: u64,
    failed: u64,
    drains: Vec<Duration>,
    elapsed: Duration,
}

fn run(how: Retire, deploys: usize, interval: Duration) -> Outcome {
    let sw = Switcheroo::builder("bench", 8080).build().expect("config");
    let (mut current, _) = deploy(&sw);
    let mut plan = load::Plan::new("127.0.0.1:8080".parse().unwrap());
    plan.close_clients = 6;
    plan.keepalive_clients = 0;
    let load = load::Load::start(&plan);
    let started = Instant::now();
    let mut retiring = Vec::new();
    for _ in 0..deploys {
        std::thread::sleep(interval);
        let (next, _) = deploy(&sw);
        let old = std::mem::replace(&mut current, next);
        retiring.push(std::thread::spawn(move || retire(old, how)));
    }
    std::thread::sleep(Duration::from_millis(300));
    let stats = load.stop();
    let drains = retiring
        .into_iter()
        .map(|h| h.join().expect("retire"))
        .collect();
    retire(current, Retire::CloseAtOnce);
    sw.cleanup().expect("cleanup");
    Outcome {
        requests: stats.ok() + stats.failed(),
        failed: stats.failed(),
        drains,
        elapsed: started.elapsed(),
    }
}

fn enter_private_netns() -> Result<(), String> {
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
        .map_err(|e| format!("unshare(CLONE_NEWNET): {e} (run as root)"))?;
    let ok = std::process::Command::new("ip")
        .args(["link", "set", "lo", "up"])
        .status()
        .map_err(|e| format!("ip link set lo up: {e}"))?
        .success();
    ok.then_some(())
        .ok_or_else(|| "ip link set lo up failed".into())
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if !args.iter().any(|a| a == "--bench") {
        println!("drain bench: skipped under `cargo test`; run `cargo bench --bench drain`");
        return;
    }
    let deploys = args
        .iter()
        .position(|a| a == "--deploys")
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    if let Err(e) = enter_private_netns() {
        eprintln!("drain bench: {e}");
        std::process::exit(1);
    }
    let interval = Duration::from_millis(25);
    println!("{deploys} deploys per mode, one every {interval:?}, 6 client threads, new connection per request");
    println!();
    println!("| old instance | requests | conn/s | failed | failed per 1,000 deploys | drain median | drain max |");
    println!("|---|---:|---:|---:|---:|---:|---:|");
    let mut per_1000 = Vec::new();
    for how in [Retire::CloseAtOnce, Retire::Drain] {
        let mut o = run(how, deploys, interval);
        o.drains.sort();
        let rate = o.requests as f64 / o.elapsed.as_secs_f64();
        let p = o.failed as f64 * 1000.0 / deploys as f64;
        per_1000.push(p);
        let ms = |d: Option<&Duration>| {
            d.map_or("-".into(), |d| format!("{:.0} ms", d.as_secs_f64() * 1e3))
        };
        println!(
            "| {} | {} | {:.0} | {} | {:.1} | {} | {} |",
            match how {
                Retire::CloseAtOnce => "closes at once",
                Retire::Drain => "drains (switcheroo::Drain)",
            },
            o.requests,
            rate,
            o.failed,
            p,
            if how == Retire::Drain {
                ms(o.drains.get(o.drains.len() / 2))
            } else {
                "-".into()
            },
            if how == Retire::Drain {
                ms(o.drains.last())
            } else {
                "-".into()
            },
        );
    }
    println!();
    println!(
        "target: 0 failed connections with the drain: {}",
        if per_1000[1] == 0.0 { "met" } else { "NOT met" }
    );
}
