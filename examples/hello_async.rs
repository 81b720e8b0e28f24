//! `hello` on tokio and axum: the same service as `examples/hello.rs`, showing how an async
//! server embeds switcheroo. The library needs no runtime: the std listener from `begin` is
//! handed to tokio with `TcpListener::from_std`, and the drain is polled from a task with
//! [`switcheroo::DrainTracker`]. Its place in the chain (probation, canary, rollback) is
//! followed with [`switcheroo::Tenure`]'s pollable form: its file descriptors are awaited
//! with `AsyncFd`, its deadline with `sleep_until`, and `check` says what changed.
//!
//! `hello_async [--namespace NAME] [--port PORT] [--range MIN-MAX] [--probation DURATION]
//! [--canary PERCENT]`

use axum::extract::{Query, State};
use axum::routing::get;
use axum::Router;
use std::collections::HashMap;
use std::future::IntoFuture;
use std::os::fd::{AsFd, OwnedFd};
use std::time::Duration;
use switcheroo::{Change, Drain, Switcheroo, Tenure};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
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
    let mut tenure = Tenure::new(&sw, &report)?;
    println!("ready pid={} port={}", me.pid, me.port);

    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let why = loop {
        // The descriptors to watch change with the place (the pidfd of the instance
        // above): take them afresh each round. Tokio deprecated `with_interest` (its
        // replacement is an unsafe fn) because a borrowed fd could be closed under the
        // reactor; these are owned duplicates, which nothing else closes.
        #[allow(deprecated)]
        let fds: Vec<AsyncFd<OwnedFd>> = tenure
            .fds()
            .iter()
            .map(|fd| AsyncFd::with_interest(fd.try_clone_to_owned()?, Interest::READABLE))
            .collect::<std::io::Result<_>>()?;
        let deadline = tenure.deadline().map(tokio::time::Instant::from_std);
        tokio::select! {
            _ = term.recv() => break "signal 15".to_owned(),
            _ = int.recv() => break "signal 2".to_owned(),
            _ = fds[0].readable() => {},
            _ = async { fds[1].readable().await.map(drop) }, if fds.len() > 1 => {},
            _ = tokio::time::sleep_until(deadline.unwrap_or_else(tokio::time::Instant::now)), if deadline.is_some() => {},
        }
        let mut retire = None;
        while let Some(change) = tenure.check()? {
            eprintln!("place {change:?}");
            if let Change::Removed { rolled_back, .. } = change {
                retire = Some(
                    if rolled_back {
                        "rolled back"
                    } else {
                        "replaced"
                    }
                    .to_owned(),
                );
            }
        }
        if let Some(why) = retire {
            break why;
        }
    };
    if why.starts_with("signal") {
        // Stopped by an operator while in the chain: leave it first.
        tenure.resign()?;
    }
    eprintln!("retiring ({why})");

    // Keep accepting (axum still serves) until the accept queue has been idle.
    let mut drain = Drain::new().tracker();
    let drained = loop {
        if let Some(report) = drain.check(&watch)? {
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
