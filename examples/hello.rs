//! `hello`: a small HTTP/1.1 server that deploys with switcheroo. std only.
//!
//! `hello [--namespace NAME] [--port PORT] [--range MIN-MAX] [--hold-ms N] [--no-drain]`
//! (defaults `hello`, 8080, 40400-40499; `--hold-ms` waits between begin and commit,
//! `--no-drain` closes the listener at once on SIGTERM, for comparison only). Every request gets `200` with the body `hello from pid <pid> port <internal
//! port>`; `GET /sleep?ms=N` answers after N ms. After its commit it prints
//! `ready pid=<pid> port=<port>` on stdout. Start a second one and the first gets SIGTERM:
//! it keeps accepting until its accept queue has been idle (switcheroo::Drain), answers
//! what is in flight (the next response on a keep-alive connection says
//! `Connection: close`), and exits 0. On error it prints `error: <message>` and exits 1.

use std::io::{self, Read, Write};
use std::net::{Shutdown as NetShutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};
use switcheroo::{Drain, Shutdown, Switcheroo};

/// How long a keep-alive connection may sit idle after shutdown began before it is closed.
const IDLE_AFTER_SHUTDOWN: Duration = Duration::from_millis(500);
/// How long in-flight requests get to finish after the listener closed.
const FINISH_TIMEOUT: Duration = Duration::from_secs(30);
const POLL: Duration = Duration::from_millis(50);

#[derive(Default)]
struct State {
    shutting_down: AtomicBool,
    stop_accepting: AtomicBool,
    active: Mutex<usize>,
    idle: Condvar,
}

struct Args {
    namespace: String,
    port: u16,
    range: Option<(u16, u16)>,
    hold: Option<Duration>,
    drain: bool,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        namespace: "hello".into(),
        port: 8080,
        range: None,
        hold: None,
        drain: true,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        // Closes the listener at once on SIGTERM: only to measure what the drain prevents.
        if flag == "--no-drain" {
            args.drain = false;
            continue;
        }
        let value = it.next().ok_or(format!("{flag} needs a value"))?;
        let number = |v: &str| v.parse::<u16>().map_err(|e| format!("{flag} {v:?}: {e}"));
        match flag.as_str() {
            "--namespace" => args.namespace = value,
            "--port" => args.port = number(&value)?,
            // Waits between begin and commit, to show what a crash in between leaves.
            "--hold-ms" => {
                let ms = value.parse().map_err(|e| format!("--hold-ms {value:?}: {e}"))?;
                args.hold = Some(Duration::from_millis(ms));
            }
            "--range" => {
                let (min, max) = value
                    .split_once('-')
                    .ok_or(format!("--range {value:?}: expected MIN-MAX"))?;
                args.range = Some((number(min)?, number(max)?));
            }
            _ => return Err(format!("unknown argument {flag}; usage: hello [--namespace NAME] [--port PORT] [--range MIN-MAX] [--hold-ms N] [--no-drain]")),
        }
    }
    Ok(args)
}

fn main() {
    if let Err(e) = run() {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    // First, before any thread exists, so that every thread leaves SIGTERM to `wait`.
    let shutdown = Shutdown::install()?;
    let args = parse_args()?;
    let mut builder = Switcheroo::builder(args.namespace.clone(), args.port);
    if let Some((min, max)) = args.range {
        builder = builder.port_range(min..=max);
    }
    let sw = builder.build()?;
    let (listener, takeover) = sw.begin()?;
    let port = takeover.port();
    let body = format!("hello from pid {} port {port}", std::process::id());

    let state = Arc::new(State::default());
    let acceptor = {
        let listener = listener.try_clone()?;
        let state = state.clone();
        let body = body.clone();
        std::thread::spawn(move || accept_loop(listener, &state, &body))
    };

    if let Some(hold) = args.hold {
        eprintln!("bound port={port}; holding {hold:?} before commit");
        std::thread::sleep(hold);
    }
    let report = takeover.commit()?;
    eprintln!(
        "switched port={} in={}us attempts={} removed={} signalled={:?}",
        report.port,
        report.elapsed.as_micros(),
        report.attempts,
        report.removed.len(),
        report.signalled
    );
    println!("ready pid={} port={port}", std::process::id());
    io::stdout().flush()?;

    let signal = shutdown.wait();
    eprintln!("signal {signal}: draining port {port}");
    state.shutting_down.store(true, Ordering::SeqCst);
    if args.drain {
        let drained = Drain::new().wait(&listener)?;
        eprintln!(
            "drained in {:?} (longest queue {}{})",
            drained.waited,
            drained.max_queue,
            if drained.timed_out { ", timed out" } else { "" }
        );
    }
    stop_accepting(&listener, &state, port);
    let _ = acceptor.join();
    drop(listener);

    let active = state.active.lock().unwrap_or_else(|p| p.into_inner());
    let (active, _) = state
        .idle
        .wait_timeout_while(active, FINISH_TIMEOUT, |n| *n > 0)
        .unwrap_or_else(|p| p.into_inner());
    if *active > 0 {
        return Err(format!(
            "{} connections still open after {FINISH_TIMEOUT:?}",
            *active
        )
        .into());
    }
    Ok(())
}

/// Wakes the acceptor, which is blocked in accept(2), with a connection of our own; it
/// sees the flag and returns, dropping its copy of the listener.
fn stop_accepting(listener: &TcpListener, state: &State, port: u16) {
    state.stop_accepting.store(true, Ordering::SeqCst);
    let local = listener.local_addr().map(|a| a.is_ipv6()).unwrap_or(true);
    let wake = if local {
        TcpStream::connect(("::1", port)).or_else(|_| TcpStream::connect(("127.0.0.1", port)))
    } else {
        TcpStream::connect(("127.0.0.1", port))
    };
    drop(wake);
}

fn accept_loop(listener: TcpListener, state: &Arc<State>, body: &str) {
    for stream in listener.incoming() {
        if state.stop_accepting.load(Ordering::SeqCst) {
            break;
        }
        let Ok(stream) = stream else { continue };
        *state.active.lock().unwrap_or_else(|p| p.into_inner()) += 1;
        let state = state.clone();
        let body = body.to_owned();
        std::thread::spawn(move || {
            let _ = serve(stream, &state, &body);
            let mut active = state.active.lock().unwrap_or_else(|p| p.into_inner());
            *active -= 1;
            state.idle.notify_all();
        });
    }
}

/// Serves one connection: requests in turn until the client closes, asks to close, or
/// shutdown began.
fn serve(mut stream: TcpStream, state: &State, body: &str) -> io::Result<()> {
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(POLL))?;
    let mut buf = Vec::new();
    loop {
        let Some(head) = read_head(&mut stream, &mut buf, state)? else {
            return Ok(());
        };
        let head = String::from_utf8_lossy(&head).into_owned();
        let mut lines = head.split("\r\n");
        let request_line = lines.next().unwrap_or_default();
        let mut parts = request_line.split_whitespace();
        let (_method, target, version) = (parts.next(), parts.next().unwrap_or("/"), parts.next());
        let mut client_close = version == Some("HTTP/1.0");
        let mut content_length = 0usize;
        for line in lines {
            let Some((name, value)) = line.split_once(':') else {
                continue;
            };
            let value = value.trim().to_ascii_lowercase();
            match name.trim().to_ascii_lowercase().as_str() {
                "connection" if value == "close" => client_close = true,
                "connection" if value == "keep-alive" => client_close = false,
                "content-length" => content_length = value.parse().unwrap_or(0),
                _ => {}
            }
        }
        discard_body(&mut stream, &mut buf, content_length)?;
        if let Some(ms) = sleep_ms(target) {
            std::thread::sleep(Duration::from_millis(ms));
        }
        // Checked after the work: a request that was in flight at SIGTERM still gets its
        // answer, and the answer tells the client to go elsewhere next time.
        let close = client_close || state.shutting_down.load(Ordering::SeqCst);
        let response = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n{}\r\n{body}",
            body.len(),
            if close { "Connection: close\r\n" } else { "" }
        );
        stream.write_all(response.as_bytes())?;
        if close {
            let _ = stream.shutdown(NetShutdown::Write);
            return Ok(());
        }
    }
}

/// Reads up to the end of a request head. `None` when the client closed, or when the
/// connection sat idle (no request started) for a while after shutdown began.
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
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                if buf.is_empty() && state.shutting_down.load(Ordering::SeqCst) {
                    let since = *idle_since.get_or_insert_with(Instant::now);
                    if since.elapsed() >= IDLE_AFTER_SHUTDOWN {
                        return Ok(None);
                    }
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

fn discard_body(stream: &mut TcpStream, buf: &mut Vec<u8>, mut len: usize) -> io::Result<()> {
    let take = len.min(buf.len());
    buf.drain(..take);
    len -= take;
    let mut chunk = [0u8; 4096];
    while len > 0 {
        match stream.read(&mut chunk[..len.min(4096)]) {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => len -= n,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
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
