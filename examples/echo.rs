//! `echo`: a service on several ports, TCP and UDP, that says who answered; std only.
//!
//! ```text
//! echo [--namespace NAME] [--port PORT[/udp]]... [--tag TEXT] [--range MIN-MAX]
//!      [--drain-max DURATION] [--probation DURATION] [--no-drain]
//! ```
//!
//! Defaults: namespace `echo`, the ports 8080/tcp and 5353/udp, tag `echo`. All its ports
//! are switched in one transaction. A TCP connection gets one line,
//! `<tag> pid=<pid> port=<public port>`, and is closed; a UDP datagram is answered with
//! `<tag> pid=<pid> ` followed by the datagram's own bytes (a DNS-like request/response, or
//! a numbered probe). Once its commit is done it prints `ready pid=<pid> port=<first
//! internal port>` on stdout.
//!
//! When a newer instance replaces it, each TCP listener drains as `hello`'s does
//! ([`switcheroo::Drain`]); each UDP socket goes on answering the flows conntrack still
//! maps to it until they have been quiet for a second ([`switcheroo::FlowDrain`], at most
//! `--drain-max`, default 30 s), then forgets its flows while it still answers
//! ([`switcheroo::Switcheroo::forget_flows`]: a flow that goes on is mapped afresh, to the
//! current instance), answers for 10 ms more what was already on its way, prints
//! `udp <port> drained ...` and closes. Then it exits 0.
//!
//! `--no-drain` is for benchmarks: a replaced instance closes its sockets at once and
//! forgets nothing, as a server that knows nothing of its flows would (to measure what the
//! drain and the forgetting prevent).
//!
//! Run by `switcheroo run` it serves the sockets passed as fds 3, 4, ... (in `--port`
//! order), sends `READY=1`, and on SIGTERM (which the command sends after its own drain,
//! UDP flows included) answers what is queued and exits.

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use std::io::{self, Write};
use std::net::{TcpListener, UdpSocket};
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;
use switcheroo::{Drain, FlowDrain, Port, Shutdown, Socket, Switcheroo, Tenure};

const USAGE: &str = "usage: echo [--namespace NAME] [--port PORT[/udp]]... [--tag TEXT] [--range MIN-MAX] [--drain-max DURATION] [--probation DURATION] [--no-drain]";

struct Args {
    namespace: String,
    ports: Vec<Port>,
    tag: String,
    range: Option<(u16, u16)>,
    drain_max: Duration,
    probation: Option<Duration>,
    drain: bool,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        namespace: "echo".into(),
        ports: Vec::new(),
        tag: "echo".into(),
        range: None,
        drain_max: Duration::from_secs(30),
        probation: None,
        drain: true,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "-h" || flag == "--help" {
            println!("{USAGE}");
            std::process::exit(0);
        }
        if flag == "--no-drain" {
            args.drain = false;
            continue;
        }
        let value = it
            .next()
            .ok_or_else(|| format!("{flag} needs a value; {USAGE}"))?;
        let duration = |v: &str| switcheroo::parse_duration(v).map_err(|e| format!("{flag}: {e}"));
        match flag.as_str() {
            "--namespace" => args.namespace = value,
            "--port" => args.ports.push(value.parse()?),
            "--tag" => args.tag = value,
            "--drain-max" => args.drain_max = duration(&value)?,
            "--probation" => args.probation = Some(duration(&value)?),
            "--range" => {
                let range = value
                    .split_once('-')
                    .and_then(|(a, b)| Some((a.parse().ok()?, b.parse().ok()?)));
                args.range =
                    Some(range.ok_or_else(|| format!("--range {value:?}: expected MIN-MAX"))?);
            }
            _ => return Err(format!("unknown argument {flag:?}; {USAGE}")),
        }
    }
    if args.ports.is_empty() {
        args.ports = vec![Port::tcp(8080), Port::udp(5353)];
    }
    Ok(args)
}

fn main() {
    if let Err(e) = run() {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

/// One served socket: its serving thread and how to stop it.
struct Served {
    /// What the answers name: the public port, or the socket's name under activation.
    label: String,
    internal: u16,
    socket: Socket,
    stop: Arc<AtomicBool>,
    udp: Arc<UdpState>,
    thread: JoinHandle<io::Result<()>>,
}

/// What a UDP socket's serving thread shares with the retiring one.
#[derive(Default)]
struct UdpState {
    /// Set once the flows are forgotten: every answer after it goes to a datagram that
    /// arrived before, and leaves from the internal port (its client drops it).
    forgotten: AtomicBool,
    late: std::sync::atomic::AtomicUsize,
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let shutdown = Shutdown::install()?;
    let args = parse_args()?;
    let pid = std::process::id();
    let (sockets, takeover) = match switcheroo::activation::sockets()? {
        Some(passed) => (passed, None),
        None => {
            let mut builder = Switcheroo::service(args.namespace.as_str());
            for port in &args.ports {
                builder = builder.port(*port);
            }
            if let Some((min, max)) = args.range {
                builder = builder.port_range(min..=max);
            }
            let sw = builder.build()?;
            let (bound, takeover) = sw.begin_all()?;
            let sockets = bound
                .into_iter()
                .map(|b| (b.public.number.to_string(), b.socket))
                .collect();
            (sockets, Some((sw, takeover)))
        }
    };

    // Serve before the commit: the first connection or datagram the new rules send here
    // must find someone answering.
    let mut served = Vec::new();
    for (label, socket) in sockets {
        let stop = Arc::new(AtomicBool::new(false));
        let udp = Arc::new(UdpState::default());
        let greeting = format!("{} pid={pid}", args.tag);
        let (thread, internal) = match &socket {
            Socket::Tcp(l) => {
                let (l, stop) = (l.try_clone()?, stop.clone());
                let line = format!("{greeting} port={label}\n");
                let internal = l.local_addr()?.port();
                (
                    std::thread::spawn(move || serve_tcp(l, &line, &stop)),
                    internal,
                )
            }
            Socket::Udp(u) => {
                let (u, stop, state) = (u.try_clone()?, stop.clone(), udp.clone());
                let prefix = format!("{greeting} ");
                let internal = u.local_addr()?.port();
                (
                    std::thread::spawn(move || serve_udp(u, &prefix, &stop, &state)),
                    internal,
                )
            }
        };
        served.push(Served {
            label,
            internal,
            socket,
            stop,
            udp,
            thread,
        });
    }

    let sw = match takeover {
        Some((sw, mut takeover)) => {
            if let Some(probation) = args.probation {
                takeover = takeover.probation(probation);
            }
            let report = takeover.commit()?;
            let mappings: Vec<String> = report.mappings.iter().map(|m| m.to_string()).collect();
            eprintln!(
                "switched {} in={}us removed={} signalled={:?}",
                mappings.join(", "),
                report.elapsed.as_micros(),
                report.removed.len(),
                report.signalled
            );
            let tenure = Tenure::new(&sw, &report)?;
            Some((sw, tenure))
        }
        None => {
            switcheroo::activation::notify("READY=1")?;
            None
        }
    };
    let mut stdout = io::stdout().lock();
    writeln!(stdout, "ready pid={pid} port={}", served[0].internal)?;
    stdout.flush()?;
    drop(stdout);

    let why = match sw {
        None => {
            // Under `switcheroo run`: the command drained before it forwarded the signal.
            let signal = shutdown.wait();
            for s in &served {
                s.stop.store(true, Ordering::SeqCst);
            }
            for s in served {
                s.thread.join().map_err(|_| "a serving thread panicked")??;
            }
            eprintln!("stopped by signal {signal}");
            return Ok(());
        }
        Some((sw, mut tenure)) => {
            let why = tenure.until_retired(&shutdown, |change| eprintln!("place {change:?}"))?;
            (sw, why)
        }
    };
    let (sw, why) = why;
    eprintln!("retiring ({why})");
    if !args.drain {
        for s in &served {
            s.stop.store(true, Ordering::SeqCst);
        }
        for s in served {
            drop(s.socket);
            s.thread.join().map_err(|_| "a serving thread panicked")??;
        }
        return Ok(());
    }
    // Every socket drains at once, each in its own way.
    let drain_max = args.drain_max;
    std::thread::scope(
        |scope| -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
            let handles: Vec<_> = served
                .into_iter()
                .map(|s| {
                    let sw = sw.clone();
                    scope.spawn(move || retire(s, &sw, drain_max))
                })
                .collect();
            for h in handles {
                h.join().map_err(|_| "a retiring thread panicked")??;
            }
            Ok(())
        },
    )
    .map_err(|e| e.to_string())?;
    Ok(())
}

/// Drains one socket, stops its serving thread, and for UDP forgets its flows.
fn retire(
    s: Served,
    sw: &Switcheroo,
    drain_max: Duration,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    match &s.socket {
        Socket::Tcp(listener) => {
            let drained = Drain::new().max_wait(drain_max).wait(listener)?;
            s.stop.store(true, Ordering::SeqCst);
            s.thread.join().map_err(|_| "panicked")??;
            eprintln!(
                "tcp {} drained in {}ms timed_out={}",
                s.label,
                drained.waited.as_millis(),
                drained.timed_out
            );
        }
        Socket::Udp(_) => {
            let drained = sw
                .track_flows(s.internal, &FlowDrain::new().max_wait(drain_max))
                .wait()?;
            // Forgotten while still answering: a datagram of a flow that was ours now
            // starts a new flow on the current instance; only one that is queued here at
            // this instant is answered from the internal port (counted as late).
            let forgotten = sw.forget_flows(s.internal)?;
            s.udp.forgotten.store(true, Ordering::SeqCst);
            // Datagrams on their way here when the flows went are answered, then stop.
            std::thread::sleep(Duration::from_millis(10));
            s.stop.store(true, Ordering::SeqCst);
            s.thread.join().map_err(|_| "panicked")??;
            let late = s.udp.late.load(Ordering::SeqCst);
            eprintln!(
                "udp {} drained in {}ms flows={} busy={} timed_out={} forgotten={forgotten} late={late}",
                s.label,
                drained.waited.as_millis(),
                drained.flows,
                drained.busy,
                drained.timed_out
            );
        }
    }
    Ok(())
}

/// Whether `fd` becomes readable within 50 ms.
fn readable(fd: impl AsFd) -> bool {
    let mut fds = [PollFd::new(fd.as_fd(), PollFlags::POLLIN)];
    matches!(poll(&mut fds, PollTimeout::from(50u16)), Ok(n) if n > 0)
}

fn serve_tcp(listener: TcpListener, line: &str, stop: &AtomicBool) -> io::Result<()> {
    listener.set_nonblocking(true)?;
    loop {
        // Whatever is queued is served, even once stopping.
        while let Ok((mut stream, _)) = listener.accept() {
            let _ = stream.write_all(line.as_bytes());
        }
        if stop.load(Ordering::SeqCst) {
            return Ok(());
        }
        readable(&listener);
    }
}

/// Answers datagrams until `stop`, and what is queued then.
fn serve_udp(
    socket: UdpSocket,
    prefix: &str,
    stop: &AtomicBool,
    state: &UdpState,
) -> io::Result<()> {
    socket.set_nonblocking(true)?;
    loop {
        answer_queued(&socket, prefix, state)?;
        if stop.load(Ordering::SeqCst) {
            return Ok(());
        }
        readable(&socket);
    }
}

/// Answers every datagram queued on `socket`.
fn answer_queued(socket: &UdpSocket, prefix: &str, state: &UdpState) -> io::Result<()> {
    let mut buf = [0u8; 2048];
    let mut answer = Vec::with_capacity(4096);
    loop {
        match socket.recv_from(&mut buf) {
            Ok((n, from)) => {
                answer.clear();
                answer.extend_from_slice(prefix.as_bytes());
                answer.extend_from_slice(&buf[..n]);
                let _ = socket.send_to(&answer, from);
                if state.forgotten.load(Ordering::Relaxed) {
                    state.late.fetch_add(1, Ordering::Relaxed);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            // An ICMP error of an earlier answer (the client went away): not ours to
            // worry about.
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
