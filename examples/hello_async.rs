//! `hello` on tokio and axum: the same service as `examples/hello.rs`, showing how an async
//! server embeds switcheroo. The library needs no runtime: the std listener from `begin` is
//! handed to tokio with `TcpListener::from_std`, and the drain is polled from a task with
//! [`switcheroo::DrainTracker`]. Its place in the chain (probation, canary, rollback) is
//! followed with [`switcheroo::Tenure`]'s pollable form (its file descriptors, its
//! deadline, `poll_change`) on a thread of the example's own, which sends the changes to the
//! async task over a channel.
//!
//! `hello_async [--namespace NAME] [--port PORT] [--range MIN-MAX] [--probation DURATION]
//! [--canary PERCENT]`

use axum::extract::{Query, State};
use axum::routing::get;
use axum::Router;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use std::collections::HashMap;
use std::future::IntoFuture;
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::time::Duration;
use switcheroo::{Change, Drain, Switcheroo, Tenure};
use tokio::signal::unix::{signal, SignalKind};

#[derive(Clone, Copy)]
struct Me {
    pid: u32,
    port: u16,
}

async fn hello(State(me): State<Me>, Query(q): Query<HashMap<String, String>>) -> String {
    if let Some(ms) = q.get("ms").and_then(|v| v.parse().ok()) {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    format!("hello from pid {} port {}", me.pid, me.port)
}

fn arg_value(args: &[String], flag: &str) -> Option<String> {
    args.iter()
        .position(|a| a == flag)
        .and_then(|i| args.get(i + 1).cloned())
}

async fn run() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let namespace = arg_value(&args, "--namespace").unwrap_or_else(|| "hello".into());
    let port: u16 = arg_value(&args, "--port").map_or(Ok(8080), |p| p.parse())?;
    let mut builder = Switcheroo::builder(namespace, port);
    if let Some(range) = arg_value(&args, "--range") {
        let (min, max) = range.split_once('-').ok_or("--range takes MIN-MAX")?;
        builder = builder.port_range(min.parse()?..=max.parse()?);
    }
    let sw = builder.build()?;

    let (std_listener, takeover) = sw.begin()?;
    std_listener.set_nonblocking(true)?;
    // A second descriptor of the same socket, to watch its accept queue while axum owns the
    // listener. It is dropped before axum closes the listener, so the socket really closes.
    let watch = std_listener.as_fd().try_clone_to_owned()?;
    let listener = tokio::net::TcpListener::from_std(std_listener)?;
    let me = Me {
        pid: std::process::id(),
        port: takeover.port(),
    };
    let app = Router::new()
        .route("/", get(hello))
        .route("/sleep", get(hello))
        .fallback(hello)
        .with_state(me);
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(
        axum::serve(listener, app)
            .with_graceful_shutdown(async {
                let _ = stop_rx.await;
            })
            .into_future(),
    );

    let mut takeover = takeover;
    if let Some(probation) = arg_value(&args, "--probation") {
        takeover = takeover.probation(switcheroo::parse_duration(&probation)?);
    }
    if let Some(percent) = arg_value(&args, "--canary") {
        takeover = takeover.canary(percent.parse()?);
    }
    let report = tokio::task::spawn_blocking(move || takeover.commit()).await??;
    eprintln!(
        "switched port={} in={}us attempts={} role={} removed={}",
        report.port,
        report.elapsed.as_micros(),
        report.attempts,
        report.role,
        report.removed.len()
    );
    let tenure = Tenure::new(&sw, &report)?;
    println!("ready pid={} port={}", me.pid, me.port);

    // The tenure is followed on a thread of its own with its pollable form (its fds, its
    // deadline, `poll_change`), plus a socket that wakes the thread when this task is done.
    let (wake, woken) = UnixStream::pair()?;
    let (changes_tx, mut changes) = tokio::sync::mpsc::unbounded_channel();
    let follower = std::thread::spawn(move || follow(tenure, woken, changes_tx));
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let why = loop {
        tokio::select! {
            _ = term.recv() => break "signal 15",
            _ = int.recv() => break "signal 2",
            change = changes.recv() => match change {
                Some(Change::Removed { rolled_back: true, .. }) => break "rolled back",
                Some(Change::Removed { .. }) => break "replaced",
                Some(change) => eprintln!("place {change:?}"),
                // The follower stopped on an error, which its join reports below.
                None => break "the tenure's error",
            },
        }
    };
    drop(wake);
    let mut tenure = follower
        .join()
        .map_err(|_| "the tenure thread panicked")??;
    if why.starts_with("signal") {
        // Stopped by an operator while in the chain: leave it first.
        tenure.resign()?;
    }
    eprintln!("retiring ({why})");

    // Keep accepting (axum still serves) until the accept queue has been idle.
    let mut drain = Drain::new().tracker();
    let drained = loop {
        if let Some(report) = drain.poll_drain(&watch)? {
            break report;
        }
        tokio::time::sleep(drain.interval()).await;
    };
    eprintln!("drained in {:?}", drained.waited);
    drop(watch);
    // Graceful shutdown: stop accepting, let in-flight requests finish, close keep-alive
    // connections after their current response.
    let _ = stop_tx.send(());
    tokio::time::timeout(Duration::from_secs(30), server).await???;
    Ok(())
}

#[tokio::main]
async fn main() {
    if let Err(e) = run().await {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

/// Follows this instance's place until `woken` is closed (or the tenure fails), sending
/// every change; returns the tenure for a last `resign`.
fn follow(
    mut tenure: Tenure,
    woken: UnixStream,
    changes: tokio::sync::mpsc::UnboundedSender<Change>,
) -> switcheroo::Result<Tenure> {
    loop {
        while let Some(change) = tenure.poll_change()? {
            let _ = changes.send(change);
        }
        let timeout = match tenure.deadline() {
            None => PollTimeout::NONE,
            Some(until) => {
                let left = until.saturating_duration_since(std::time::Instant::now());
                PollTimeout::try_from(left.as_millis().min(i32::MAX as u128) as i32 + 1)
                    .unwrap_or(PollTimeout::MAX)
            }
        };
        let mut fds: Vec<PollFd<'_>> = std::iter::once(woken.as_fd())
            .chain(tenure.fds())
            .map(|fd| PollFd::new(fd, PollFlags::POLLIN))
            .collect();
        let _ = poll(&mut fds, timeout);
        if fds[0].revents().is_some_and(|r| !r.is_empty()) {
            drop(fds);
            return Ok(tenure);
        }
    }
}
