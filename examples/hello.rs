//! `hello`: a small HTTP/1.1 server that deploys with switcheroo, std only.
//!
//! ```text
//! hello [--namespace NAME] [--port PORT] [--range MIN-MAX] [--record-dir DIR]
//!       [--probation DURATION] [--canary PERCENT] [--hold-ms N] [--no-drain]
//! ```
//!
//! Defaults: namespace `hello`, public port 8080, internal ports 40400-40499, both routes,
//! no commit record (`--record-dir` turns it on; see `Builder::record_dir`).
//! Every request gets `200` with the body `hello from pid <pid> port <internal port>`;
//! `GET /sleep?ms=N` answers the same after N ms. Once its commit is done it prints
//! `ready pid=<pid> port=<port>` on stdout.
//!
//! Start a second one and the first gets SIGTERM (and sees its rules go): it prints
//! `retiring (<why>): draining port <port>`, keeps accepting until its accept queue has
//! been idle for a while ([`switcheroo::Drain`]), then stops accepting, answers every
//! request that has started to arrive (the next response on a keep-alive connection
//! carries `Connection: close`), closes keep-alive connections that stay idle, and exits 0.
//! On error it prints `error: <message>` on stderr and exits 1.
//!
//! With `--probation 4s` the previous instance stays warm below the new one for 4 s (it
//! prints `place below pid=<new>`), takes over again if the new one dies meanwhile
//! (`place active after=<pid>`), and retires when the probation passes. With
//! `--canary 10` the new instance takes 10% of new connections above the active
//! (`switcheroo promote` / `rollback` decide its fate; `--probation` then applies from its
//! promotion). Stopped by SIGTERM while it serves, an instance first removes its own rules,
//! so that an instance below takes new connections at once.
//!
//! Run by `switcheroo run` (socket activation: `LISTEN_FDS`/`LISTEN_PID` name it), it
//! serves the socket on fd 3 instead, switches nothing itself, sends `READY=1` to
//! `NOTIFY_SOCKET` when that is set, and drains the same way on SIGTERM.
//!
//! Two flags exist for tests and benchmarks: `--hold-ms N` waits N ms between `begin` and
//! `commit` (to show that a crash in between leaves the ruleset alone), and `--no-drain`
//! stops accepting at once on SIGTERM (to measure what the drain prevents).

use std::io::{self, Read, Write};
use std::net::{Shutdown as NetShutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};
use switcheroo::{Change, Drain, Shutdown, Switcheroo, Tenure};

const USAGE: &str = "usage: hello [--namespace NAME] [--port PORT] [--range MIN-MAX] [--record-dir DIR] [--probation DURATION] [--canary PERCENT] [--hold-ms N] [--no-drain]";

/// How long a keep-alive connection with no request in progress stays open after shutdown
/// began. A client that sends its next request within this window still gets an answer
/// (with `Connection: close`); after it, the server closes the connection.
const IDLE_AFTER_SHUTDOWN: Duration = Duration::from_secs(1);
/// How long in-flight connections get to finish once the listener is closed.
const FINISH_TIMEOUT: Duration = Duration::from_secs(30);
/// Connections read with this timeout, so that they notice shutdown while idle.
const POLL: Duration = Duration::from_millis(50);

struct Args {
    namespace: String,
    port: u16,
    range: Option<(u16, u16)>,
    record_dir: Option<String>,
    probation: Option<Duration>,
    canary: Option<u8>,
    hold: Option<Duration>,
    drain: bool,
}

/// Only rejects what does not parse; whether the values make sense is for the library to
/// say (a reversed range, port 0, a bad namespace: `build` returns a typed error).
fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        namespace: "hello".into(),
        port: 8080,
        range: None,
        record_dir: None,
        probation: None,
        canary: None,
        hold: None,
        drain: true,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        match flag.as_str() {
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            "--no-drain" => {
                args.drain = false;
                continue;
            }
            _ => {}
        }
        let value = it
            .next()
            .ok_or_else(|| format!("{flag} needs a value; {USAGE}"))?;
        let port = |v: &str| {
            v.parse::<u16>()
                .map_err(|e| format!("{flag} {value:?}: {v:?} is not a port number: {e}"))
        };
        match flag.as_str() {
            "--namespace" => args.namespace = value.clone(),
            "--record-dir" => args.record_dir = Some(value.clone()),
            "--probation" => {
                args.probation = Some(
                    switcheroo::parse_duration(&value).map_err(|e| format!("--probation: {e}"))?,
                )
            }
            "--canary" => {
                args.canary = Some(
                    value
                        .parse()
                        .map_err(|e| format!("--canary {value:?}: {e}"))?,
                )
            }
            "--port" => args.port = port(&value)?,
            "--range" => {
                let (min, max) = value
                    .split_once('-')
                    .ok_or_else(|| format!("--range {value:?}: expected MIN-MAX"))?;
                args.range = Some((port(min)?, port(max)?));
            }
            "--hold-ms" => {
                let ms = value
                    .parse()
                    .map_err(|e| format!("--hold-ms {value:?}: {e}"))?;
                args.hold = Some(Duration::from_millis(ms));
            }
            _ => return Err(format!("unknown argument {flag:?}; {USAGE}")),
        }
    }
    Ok(args)
}

/// What the acceptor and the connection threads share with `main`.
#[derive(Default)]
struct State {
    /// Set when SIGTERM/SIGINT arrived: responses say `Connection: close` from now on.
    shutting_down: AtomicBool,
    /// Set when the drain is over: the acceptor returns at its next wake-up.
    stop_accepting: AtomicBool,
    /// Connections being served.
    open: Mutex<usize>,
    all_closed: Condvar,
}

fn main() {
    if let Err(e) = run() {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    // First, before any thread exists: every thread inherits the blocked signals, so
    // SIGTERM stays pending for `shutdown.wait()` instead of killing the process.
    let shutdown = Shutdown::install()?;
    let args = parse_args()?;
    // Under `switcheroo run` (or systemd) the socket is handed over as fd 3 and the
    // command does the switch; otherwise this process binds and switches itself.
    let (listener, takeover) = match switcheroo::activation::listener()? {
        Some(listener) => (listener, None),
        None => {
            let mut builder = Switcheroo::builder(args.namespace.as_str(), args.port);
            if let Some((min, max)) = args.range {
                builder = builder.port_range(min..=max);
            }
            if let Some(dir) = &args.record_dir {
                builder = builder.record_dir(dir);
            }
            let sw = builder.build()?;
            let (listener, takeover) = sw.begin()?;
            (listener, Some((sw, takeover)))
        }
    };
    let port = listener.local_addr()?.port();
    let pid = std::process::id();
    let body: Arc<str> = format!("hello from pid {pid} port {port}").into();

    // Serve before the commit: the first connection the new rule sends here must find
    // someone accepting.
    let state = Arc::new(State::default());
    let acceptor = {
        let listener = listener.try_clone()?;
        let (state, body) = (state.clone(), body.clone());
        std::thread::spawn(move || accept_loop(listener, state, body))
    };

    if let Some(hold) = args.hold {
        eprintln!("bound port={port}; holding {hold:?} before commit");
        std::thread::sleep(hold);
    }
    let mut tenure = match takeover {
        Some((sw, mut takeover)) => {
            if let Some(probation) = args.probation {
                takeover = takeover.probation(probation);
            }
            if let Some(percent) = args.canary {
                takeover = takeover.canary(percent);
            }
            let report = takeover.commit()?;
            eprintln!(
                "switched port={} in={}us attempts={} lock_wait={}us role={} kept={:?} removed={} signalled={:?}",
                report.port,
                report.elapsed.as_micros(),
                report.attempts,
                report.lock_wait.as_micros(),
                report.role,
                report.kept.iter().map(|r| r.pid).collect::<std::collections::BTreeSet<_>>(),
                report.removed.len(),
                report.signalled
            );
            Some(Tenure::new(&sw, &report)?)
        }
        None => {
            let notified = switcheroo::activation::notify("READY=1")?;
            eprintln!("activated port={port} notified={notified}");
            None
        }
    };
    let mut stdout = io::stdout().lock();
    writeln!(stdout, "ready pid={pid} port={port}")?;
    stdout.flush()?;
    drop(stdout);

    let why = match tenure.as_mut() {
        None => format!("signal {}", shutdown.wait()),
        Some(tenure) => serve_in_place(tenure, &shutdown)?,
    };
    state.shutting_down.store(true, Ordering::SeqCst);
    // Printed once the flag is set: from here on every response says `Connection: close`.
    eprintln!("retiring ({why}): draining port {port}");
    if args.drain {
        // The acceptor goes on accepting meanwhile: connections the old rule mapped here
        // just before the switch are still arriving.
        let drained = Drain::new().wait(&listener)?;
        eprintln!(
            "drained in {:?}{}",
            drained.waited,
            if drained.timed_out {
                " (timed out)"
            } else {
                ""
            }
        );
    }
    state.stop_accepting.store(true, Ordering::SeqCst);
    if wake(port) {
        let _ = acceptor.join();
    } else {
        // The acceptor stays blocked in accept(2) and keeps its copy of the listener
        // until the process exits; the in-flight connections still get their answers.
        eprintln!("could not wake the acceptor on port {port}; it stays until exit");
    }
    drop(listener);

    let open = state.open.lock().unwrap_or_else(|p| p.into_inner());
    let (open, _) = state
        .all_closed
        .wait_timeout_while(open, FINISH_TIMEOUT, |n| *n > 0)
        .unwrap_or_else(|p| p.into_inner());
    if *open > 0 {
        return Err(format!("{} connections still open after {FINISH_TIMEOUT:?}", *open).into());
    }
    Ok(())
}

/// Serves (the acceptor runs) while following this instance's place in the chain, until it
/// must retire; returns why. Stopped by an operator while in the chain, it leaves the
/// chain first, so that an instance below takes new connections at once.
fn serve_in_place(tenure: &mut Tenure, shutdown: &Shutdown) -> switcheroo::Result<String> {
    let retired = tenure.until_retired(shutdown, |change| match change {
        Change::Active { after } => eprintln!("place active after={}", after.unwrap_or(0)),
        Change::Below { role, above } => eprintln!("place below pid={above} role={role}"),
        Change::Promoted => eprintln!("place promoted"),
        Change::ProbationPassed { retired } => eprintln!("probation passed retired={retired:?}"),
        Change::Removed { .. } => {}
    })?;
    Ok(retired.to_string())
}

/// Makes one connection to our own internal port, so that the acceptor, blocked in
/// accept(2), returns and sees `stop_accepting` (std has no way to interrupt accept).
/// The connection goes straight to the internal port: the REDIRECT rule only matches the
/// public one. The listener is dual-stack, or IPv6-only where `bindv6only` is set.
fn wake(port: u16) -> bool {
    ["127.0.0.1", "::1"].iter().any(|host| {
        let addr = (*host, port);
        std::net::ToSocketAddrs::to_socket_addrs(&addr)
            .ok()
            .and_then(|mut a| a.next())
            .is_some_and(|a| TcpStream::connect_timeout(&a, Duration::from_secs(1)).is_ok())
    })
}

fn accept_loop(listener: TcpListener, state: Arc<State>, body: Arc<str>) {
    loop {
        match listener.accept() {
            // Whatever was accepted is served, even once stopping: it may be a client's
            // connection that arrived just before the wake-up one (which sends nothing
            // and closes, so serving it costs one read).
            Ok((stream, _)) => {
                *state.open.lock().unwrap_or_else(|p| p.into_inner()) += 1;
                let (state, body) = (state.clone(), body.clone());
                std::thread::spawn(move || {
                    let _ = serve(stream, &state, &body);
                    *state.open.lock().unwrap_or_else(|p| p.into_inner()) -= 1;
                    state.all_closed.notify_all();
                });
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            // E.g. EMFILE: back off instead of spinning; the connection stays queued.
            Err(_) => std::thread::sleep(POLL),
        }
        if state.stop_accepting.load(Ordering::SeqCst) {
            return;
        }
    }
}

/// Serves one connection: requests in turn until the client closes or asks to, or until
/// shutdown began (then the response in progress is the last one).
fn serve(mut stream: TcpStream, state: &State, body: &str) -> io::Result<()> {
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(POLL))?;
    let mut buf = Vec::new();
    while let Some(head) = read_head(&mut stream, &mut buf, state)? {
        let request = Request::parse(&head);
        discard(&mut stream, &mut buf, request.content_length)?;
        if let Some(ms) = request.sleep_ms {
            std::thread::sleep(Duration::from_millis(ms));
        }
        // Checked after the work: a request in flight at SIGTERM is still answered, and
        // the answer tells the client to open its next connection elsewhere.
        let close = request.close || state.shutting_down.load(Ordering::SeqCst);
        let response = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n{}\r\n{body}",
            body.len(),
            if close { "Connection: close\r\n" } else { "" },
        );
        stream.write_all(response.as_bytes())?;
        if close {
            let _ = stream.shutdown(NetShutdown::Write);
            return Ok(());
        }
    }
    Ok(())
}

/// What `serve` needs to know of a request head.
struct Request {
    close: bool,
    content_length: usize,
    sleep_ms: Option<u64>,
}

impl Request {
    fn parse(head: &[u8]) -> Request {
        let head = String::from_utf8_lossy(head);
        let mut lines = head.split("\r\n");
        let mut parts = lines.next().unwrap_or_default().split_whitespace();
        let (target, version) = (parts.nth(1).unwrap_or("/"), parts.next());
        let mut request = Request {
            // HTTP/1.0 closes unless asked to keep alive; HTTP/1.1 keeps alive.
            close: version == Some("HTTP/1.0"),
            content_length: 0,
            sleep_ms: sleep_ms(target),
        };
        for line in lines {
            let Some((name, value)) = line.split_once(':') else {
                continue;
            };
            let value = value.trim();
            if name.eq_ignore_ascii_case("connection") {
                if value.eq_ignore_ascii_case("close") {
                    request.close = true;
                } else if value.eq_ignore_ascii_case("keep-alive") {
                    request.close = false;
                }
            } else if name.eq_ignore_ascii_case("content-length") {
                request.content_length = value.parse().unwrap_or(0);
            }
        }
        request
    }
}

/// `N` of `/sleep?ms=N`.
fn sleep_ms(target: &str) -> Option<u64> {
    let (path, query) = target.split_once('?')?;
    if path != "/sleep" {
        return None;
    }
    query
        .split('&')
        .find_map(|kv| kv.strip_prefix("ms=")?.parse().ok())
}

fn timed_out(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted
    )
}

/// Reads up to the end of a request head (pipelined bytes stay in `buf`). `None` when the
/// client closed, or when no request had started to arrive for `IDLE_AFTER_SHUTDOWN`
/// after shutdown began.
fn read_head(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
    state: &State,
) -> io::Result<Option<Vec<u8>>> {
    let mut idle_since: Option<Instant> = None;
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = buf[..end].to_vec();
            buf.drain(..end + 4);
            return Ok(Some(head));
        }
        match stream.read(&mut chunk) {
            Ok(0) => return Ok(None),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if timed_out(&e) => {
                if buf.is_empty() && state.shutting_down.load(Ordering::SeqCst) {
                    let since = *idle_since.get_or_insert_with(Instant::now);
                    if since.elapsed() >= IDLE_AFTER_SHUTDOWN {
                        return Ok(None);
                    }
                }
            }
            Err(e) => return Err(e),
        }
    }
}

/// Reads and drops a request body of `len` bytes, part of which may be in `buf` already.
fn discard(stream: &mut TcpStream, buf: &mut Vec<u8>, len: usize) -> io::Result<()> {
    let buffered = len.min(buf.len());
    buf.drain(..buffered);
    let mut left = len - buffered;
    let mut chunk = [0u8; 4096];
    while left > 0 {
        let want = left.min(chunk.len());
        match stream.read(&mut chunk[..want]) {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => left -= n,
            Err(e) if timed_out(&e) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
