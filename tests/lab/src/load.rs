//! A small HTTP load generator for redeploy tests, the demo and the drain bench: client
//! threads loop connect-request-read against one address, some with a new connection per
//! request, some over keep-alive connections, and count every request that was not
//! answered with a complete `200`.
//!
//! Used by `tests/`, `examples/demo.rs` and `benches/`.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How a failed request failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Failure {
    /// connect() was refused (RST to the SYN).
    Refused,
    /// The connection was reset while the request was in flight.
    Reset,
    /// The connection closed before a complete response.
    CutShort,
    /// No answer within the timeout.
    Timeout,
    /// An answer other than a complete 200.
    BadResponse,
    /// Anything else.
    Other,
}

fn classify(e: &io::Error) -> Failure {
    match e.kind() {
        io::ErrorKind::ConnectionRefused => Failure::Refused,
        io::ErrorKind::ConnectionReset
        | io::ErrorKind::ConnectionAborted
        | io::ErrorKind::BrokenPipe => Failure::Reset,
        io::ErrorKind::UnexpectedEof => Failure::CutShort,
        io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => Failure::Timeout,
        io::ErrorKind::InvalidData => Failure::BadResponse,
        _ => Failure::Other,
    }
}

/// One request, when the plan asks for a timeline.
#[derive(Debug, Clone)]
pub struct Sample {
    /// When the request started (before connecting, for a new connection).
    pub at: Instant,
    /// When it ended (answered or failed).
    pub done: Instant,
    /// Whether it opened a new connection (the redirect decides where those go).
    pub new_connection: bool,
    /// The pid that answered, or how it failed.
    pub result: Result<u32, Failure>,
}

/// Counters shared by the client threads.
#[derive(Debug, Default)]
pub struct Stats {
    /// Every request, with `Plan::timeline`.
    pub timeline: Mutex<Vec<Sample>>,
    pub ok: AtomicU64,
    pub failed: AtomicU64,
    /// Failures of requests sent on a reused keep-alive connection (the server closed it
    /// as the request went out: the keep-alive race, which only the server can avoid).
    pub failed_reused: AtomicU64,
    /// The first few failures, with what they were.
    pub samples: Mutex<Vec<(Failure, String)>>,
    /// Distinct pids that answered, in order of first answer.
    pub pids: Mutex<Vec<u32>>,
}

impl Stats {
    fn record(&self, result: Result<u32, io::Error>) {
        match result {
            Ok(pid) => {
                self.ok.fetch_add(1, Ordering::Relaxed);
                let mut pids = self.pids.lock().unwrap();
                if pids.last() != Some(&pid) && !pids.contains(&pid) {
                    pids.push(pid);
                }
            }
            Err(e) => {
                self.failed.fetch_add(1, Ordering::Relaxed);
                let mut samples = self.samples.lock().unwrap();
                if samples.len() < 20 {
                    samples.push((classify(&e), e.to_string()));
                }
            }
        }
    }

    pub fn ok(&self) -> u64 {
        self.ok.load(Ordering::Relaxed)
    }

    pub fn failed(&self) -> u64 {
        self.failed.load(Ordering::Relaxed)
    }
}

/// The counters of several loads, added up.
#[derive(Debug, Default)]
pub struct Totals {
    pub ok: u64,
    pub failed: u64,
    /// Of `failed`, those on a reused keep-alive connection.
    pub failed_reused: u64,
    /// The first failures of each load.
    pub samples: Vec<(Failure, String)>,
    /// Every pid that answered.
    pub answered: Vec<u32>,
}

impl Totals {
    pub fn of(stats: &[Arc<Stats>]) -> Totals {
        Totals {
            ok: stats.iter().map(|s| s.ok()).sum(),
            failed: stats.iter().map(|s| s.failed()).sum(),
            failed_reused: stats
                .iter()
                .map(|s| s.failed_reused.load(Ordering::Relaxed))
                .sum(),
            samples: stats
                .iter()
                .flat_map(|s| s.samples.lock().unwrap().clone())
                .collect(),
            answered: stats
                .iter()
                .flat_map(|s| s.pids.lock().unwrap().clone())
                .collect(),
        }
    }
}

/// What to run.
#[derive(Debug, Clone)]
pub struct Plan {
    pub target: SocketAddr,
    /// Threads that open a new connection per request (`Connection: close`).
    pub close_clients: usize,
    /// Threads that reuse keep-alive connections.
    pub keepalive_clients: usize,
    /// Pause between requests of one thread (zero: as fast as possible).
    pub pause: Duration,
    /// With an IPv4 loopback target: bind each new connection to one of this many source
    /// addresses (127.1.0.1, 127.1.1.1, ...), as many clients would come from; 0: the
    /// kernel's choice (127.0.0.1 for everything).
    pub sources: u32,
    pub timeout: Duration,
    /// Record every request in `Stats::timeline`.
    pub timeline: bool,
}

impl Plan {
    pub fn new(target: SocketAddr) -> Self {
        Plan {
            target,
            close_clients: 4,
            keepalive_clients: 2,
            pause: Duration::ZERO,
            timeout: Duration::from_secs(10),
            sources: 0,
            timeline: false,
        }
    }
}

/// Loads on `127.0.0.1:8080` and `[::1]:8080`, each with two clients that open a new
/// connection per request and one keep-alive client, recording every request. Call it
/// from a thread inside the server's network namespace.
pub fn timeline_on_both_loopbacks() -> Vec<Load> {
    ["127.0.0.1:8080", "[::1]:8080"]
        .iter()
        .map(|t| {
            let mut plan = Plan::new(t.parse().expect("address"));
            plan.close_clients = 2;
            plan.keepalive_clients = 1;
            plan.timeline = true;
            Load::start(&plan)
        })
        .collect()
}

/// Stops `loads`; every request they made, in start order.
pub fn stop_all(loads: Vec<Load>) -> Vec<Sample> {
    let mut all: Vec<Sample> = loads
        .into_iter()
        .flat_map(|l| l.stop().timeline.lock().unwrap().clone())
        .collect();
    all.sort_by_key(|s| s.at);
    all
}

/// Running load; `stop` ends it and returns the counters.
pub struct Load {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    pub stats: Arc<Stats>,
    pub started: Instant,
}

impl Load {
    pub fn start(plan: &Plan) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let stats = Arc::new(Stats::default());
        let mut threads = Vec::new();
        for i in 0..plan.close_clients + plan.keepalive_clients {
            let keepalive = i >= plan.close_clients;
            let (stop, stats, plan) = (stop.clone(), stats.clone(), plan.clone());
            threads.push(std::thread::spawn(move || {
                client(&plan, keepalive, &stop, &stats)
            }));
        }
        Load {
            stop,
            threads,
            stats,
            started: Instant::now(),
        }
    }

    pub fn stop(self) -> Arc<Stats> {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            let _ = t.join();
        }
        self.stats
    }
}

fn client(plan: &Plan, keepalive: bool, stop: &AtomicBool, stats: &Stats) {
    let mut conn: Option<BufReader<TcpStream>> = None;
    let mut n: u32 = rand_start();
    while !stop.load(Ordering::Relaxed) {
        n = n.wrapping_add(1);
        let at = Instant::now();
        let new_connection = !keepalive || conn.is_none();
        let result = if keepalive {
            keepalive_request(plan, &mut conn)
        } else if plan.sources > 0 {
            connect_from(plan, n % plan.sources)
                .and_then(|s| request(&mut BufReader::new(s), false).map(|(pid, _)| pid))
        } else {
            connect(plan).and_then(|s| request(&mut BufReader::new(s), false).map(|(pid, _)| pid))
        };
        if plan.timeline {
            let sample = Sample {
                at,
                done: Instant::now(),
                new_connection,
                result: result.as_ref().map(|p| *p).map_err(classify),
            };
            stats.timeline.lock().unwrap().push(sample);
        }
        if result.is_err() && !new_connection {
            stats.failed_reused.fetch_add(1, Ordering::Relaxed);
        }
        stats.record(result);
        if !plan.pause.is_zero() {
            std::thread::sleep(plan.pause);
        }
    }
}

fn connect(plan: &Plan) -> io::Result<TcpStream> {
    let s = TcpStream::connect_timeout(&plan.target, plan.timeout)?;
    s.set_read_timeout(Some(plan.timeout))?;
    s.set_write_timeout(Some(plan.timeout))?;
    s.set_nodelay(true)?;
    Ok(s)
}

/// A different starting source address per thread.
fn rand_start() -> u32 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0)
}

/// Connects from loopback source address number `i` (127.1.0.1 + 256·i, wrapping into
/// the second and third octets), so that connections spread over many client addresses.
fn connect_from(plan: &Plan, i: u32) -> io::Result<TcpStream> {
    use nix::sys::socket::{
        bind, connect as nix_connect, setsockopt, socket, sockopt, AddressFamily, SockFlag,
        SockType, SockaddrIn,
    };
    use std::net::{Ipv4Addr, SocketAddrV4};
    use std::os::fd::AsRawFd;
    let SocketAddr::V4(target) = plan.target else {
        return connect(plan);
    };
    let src = Ipv4Addr::new(127, 1 + (i / 250 % 250) as u8, (i % 250) as u8 + 1, 1);
    let fd = socket(
        AddressFamily::Inet,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    // connect(2) honours the send timeout.
    let timeout = nix::sys::time::TimeVal::new(plan.timeout.as_secs() as i64, 0);
    setsockopt(&fd, sockopt::SendTimeout, &timeout)?;
    bind(fd.as_raw_fd(), &SockaddrIn::from(SocketAddrV4::new(src, 0)))?;
    nix_connect(fd.as_raw_fd(), &SockaddrIn::from(target))?;
    let s = TcpStream::from(fd);
    s.set_read_timeout(Some(plan.timeout))?;
    s.set_write_timeout(Some(plan.timeout))?;
    s.set_nodelay(true)?;
    Ok(s)
}

fn keepalive_request(plan: &Plan, conn: &mut Option<BufReader<TcpStream>>) -> io::Result<u32> {
    let reused = conn.is_some();
    if conn.is_none() {
        *conn = Some(BufReader::new(connect(plan)?));
    }
    let reader = conn.as_mut().expect("set above");
    match request(reader, true) {
        Ok((pid, keep)) => {
            if !keep {
                *conn = None;
            }
            Ok(pid)
        }
        Err(e) => {
            *conn = None;
            // Which connection it failed on matters: a reused one that the server closed
            // as the request went out is the keep-alive race.
            let on = if reused {
                "a reused keep-alive connection"
            } else {
                "a new connection"
            };
            Err(io::Error::new(e.kind(), format!("{e} (on {on})")))
        }
    }
}

/// Sends `GET /` and reads one response. Returns the pid that answered and whether the
/// connection may be reused.
fn request(reader: &mut BufReader<TcpStream>, keepalive: bool) -> io::Result<(u32, bool)> {
    let req: &[u8] = if keepalive {
        b"GET / HTTP/1.1\r\nHost: switcheroo\r\n\r\n"
    } else {
        b"GET / HTTP/1.1\r\nHost: switcheroo\r\nConnection: close\r\n\r\n"
    };
    reader.get_mut().write_all(req)?;
    let mut status = String::new();
    if reader.read_line(&mut status)? == 0 {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    if !status.starts_with("HTTP/1.1 200") {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("status {status:?}"),
        ));
    }
    let (mut len, mut close) = (None, !keepalive);
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        let lower = line.to_ascii_lowercase();
        if let Some(v) = lower.strip_prefix("content-length:") {
            len = v.trim().parse::<usize>().ok();
        } else if lower == "connection: close" {
            close = true;
        }
    }
    let len = len.ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "no Content-Length"))?;
    let mut body = vec![0; len];
    reader.read_exact(&mut body)?;
    let body = String::from_utf8_lossy(&body);
    let pid = body
        .strip_prefix("hello from pid ")
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|p| p.parse().ok())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, format!("body {body:?}")))?;
    Ok((pid, !close))
}
