//! UDP clients: long-lived flows and new flows, each datagram waiting for its answer.

use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The version in an answer `v<N> pid=<P> ...`.
pub fn version(answer: &str) -> Option<usize> {
    answer.strip_prefix('v')?.split(' ').next()?.parse().ok()
}

/// One UDP client's record: for each datagram (numbered), the version that answered and
/// when, and how many times it had to be sent again.
#[derive(Default)]
pub struct FlowLog {
    pub answers: Vec<(Instant, usize)>,
    /// Datagrams that had to be sent more than once (their first copy or its answer was
    /// lost).
    pub resent: usize,
    pub lost: Vec<String>,
}

/// Sends `payload` on `socket` (connected) and waits for the answer that ends with it,
/// sending again every 100 ms, 20 times at most. `None` if it never came.
pub fn ask(socket: &UdpSocket, payload: &str, resent: &mut usize) -> Option<String> {
    socket
        .set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let mut buf = [0u8; 512];
    for attempt in 0..20 {
        if attempt == 1 {
            *resent += 1;
        }
        if socket.send(payload.as_bytes()).is_err() {
            std::thread::sleep(Duration::from_millis(100));
            continue;
        }
        let deadline = Instant::now() + Duration::from_millis(100);
        while Instant::now() < deadline {
            match socket.recv(&mut buf) {
                Ok(n) => {
                    let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                    // An answer to an earlier copy of an earlier datagram: skip it.
                    if text.ends_with(&format!(" {payload}")) {
                        return Some(text);
                    }
                }
                Err(_) => break,
            }
        }
    }
    None
}

/// The unspecified address of `target`'s family, any port: what a client binds.
fn unspecified(target: &SocketAddr) -> SocketAddr {
    if target.is_ipv4() {
        "0.0.0.0:0".parse().unwrap()
    } else {
        "[::]:0".parse().unwrap()
    }
}

/// A client on one long-lived flow (one connected socket: one 4-tuple), a datagram every
/// 3 ms, each waiting for its answer.
pub fn long_lived_flow(target: SocketAddr, id: usize, stop: Arc<AtomicBool>) -> FlowLog {
    let any = unspecified(&target);
    let socket = UdpSocket::bind(any).unwrap();
    socket.connect(target).unwrap();
    let mut log = FlowLog::default();
    let mut seq = 0;
    while !stop.load(Ordering::SeqCst) {
        let payload = format!("flow{id} {seq}");
        match ask(&socket, &payload, &mut log.resent).and_then(|a| version(&a)) {
            Some(v) => log.answers.push((Instant::now(), v)),
            None => log.lost.push(payload),
        }
        seq += 1;
        std::thread::sleep(Duration::from_millis(3));
    }
    log
}

/// A client whose every datagram is a new flow (a new socket each time), as DNS clients do.
pub fn new_flows(target: SocketAddr, id: usize, stop: Arc<AtomicBool>) -> FlowLog {
    let any = unspecified(&target);
    let mut log = FlowLog::default();
    let mut seq = 0;
    while !stop.load(Ordering::SeqCst) {
        let socket = UdpSocket::bind(any).unwrap();
        socket.connect(target).unwrap();
        let payload = format!("new{id} {seq}");
        match ask(&socket, &payload, &mut log.resent).and_then(|a| version(&a)) {
            Some(v) => log.answers.push((Instant::now(), v)),
            None => log.lost.push(payload),
        }
        seq += 1;
        std::thread::sleep(Duration::from_millis(2));
    }
    log
}

/// UDP clients on `port` of 127.0.0.1 and ::1: 4 on long-lived flows ([`long_lived_flow`])
/// and 2 on new flows ([`new_flows`]), alternating the two addresses. Start it from a
/// thread inside the server's network namespace.
pub struct UdpLoad {
    stop: Arc<AtomicBool>,
    flows: Vec<std::thread::JoinHandle<FlowLog>>,
    fresh: Vec<std::thread::JoinHandle<FlowLog>>,
}

impl UdpLoad {
    pub fn start(port: u16) -> UdpLoad {
        let targets: [SocketAddr; 2] = [
            SocketAddr::from(([127, 0, 0, 1], port)),
            SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, port)),
        ];
        let stop = Arc::new(AtomicBool::new(false));
        let spawn = |n: usize, client: fn(SocketAddr, usize, Arc<AtomicBool>) -> FlowLog| {
            (0..n)
                .map(|id| {
                    let stop = stop.clone();
                    std::thread::spawn(move || client(targets[id % 2], id, stop))
                })
                .collect()
        };
        UdpLoad {
            flows: spawn(4, long_lived_flow),
            fresh: spawn(2, new_flows),
            stop,
        }
    }

    /// Stops the clients; what the long-lived flows and the new-flow clients saw.
    pub fn stop(self) -> (Vec<FlowLog>, Vec<FlowLog>) {
        self.stop.store(true, Ordering::SeqCst);
        let join = |v: Vec<std::thread::JoinHandle<FlowLog>>| -> Vec<FlowLog> {
            v.into_iter().map(|t| t.join().unwrap()).collect()
        };
        (join(self.flows), join(self.fresh))
    }
}
