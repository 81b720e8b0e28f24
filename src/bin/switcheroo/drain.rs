//! `run`'s drain of every port of a retiring instance: the accept queue of each TCP port
//! until it has stayed empty for the idle period, the flows of each UDP port until they
//! have been quiet as long; each bounded by the maximum.

use log::{info, warn};
use std::time::{Duration, Instant};
use switcheroo::{
    Drain, DrainTracker, FlowDrain, FlowTracker, Mapping, Protocol, Socket, Switcheroo,
};

/// One port of the instance: where it leads, and `run`'s copy of its socket while the
/// server has it too (`None` once let go, or when the server binds its ports itself).
#[derive(Debug)]
pub struct Held {
    pub mapping: Mapping,
    pub socket: Option<Socket>,
}

/// A drain in progress, per port.
#[derive(Debug)]
enum Tracker {
    Tcp(DrainTracker),
    Udp(FlowTracker),
}

/// The drains of every port still draining.
#[derive(Debug)]
pub struct Drains {
    /// Index into the held ports, and its tracker.
    trackers: Vec<(usize, Tracker)>,
    /// TCP queues are sampled every few milliseconds; UDP flows (a conntrack dump each)
    /// every few hundred.
    tcp_every: Option<Duration>,
    udp_every: Option<Duration>,
    next_tcp: Instant,
    next_udp: Instant,
}

impl Drains {
    /// Starts draining each of `held`.
    pub fn start(sw: &Switcheroo, held: &[Held], idle: Duration, max: Duration) -> Drains {
        let tcp = Drain::new().idle(idle).max_wait(max);
        let udp = FlowDrain::new().idle(idle).max_wait(max);
        let trackers: Vec<(usize, Tracker)> = held
            .iter()
            .enumerate()
            .map(|(i, h)| {
                let tracker = match h.mapping.public.protocol {
                    Protocol::Tcp => Tracker::Tcp(tcp.tracker()),
                    Protocol::Udp => Tracker::Udp(sw.track_flows(h.mapping.internal, &udp)),
                };
                (i, tracker)
            })
            .collect();
        let every = |udp: bool| {
            trackers.iter().find_map(|(_, t)| match t {
                Tracker::Tcp(t) if !udp => Some(t.interval()),
                Tracker::Udp(t) if udp => Some(t.interval()),
                _ => None,
            })
        };
        let now = Instant::now();
        Drains {
            tcp_every: every(false),
            udp_every: every(true),
            trackers,
            next_tcp: now,
            next_udp: now,
        }
    }

    /// When the next sample is due.
    pub fn next_sample(&self) -> Instant {
        match (self.tcp_every, self.udp_every) {
            (Some(_), Some(_)) => self.next_tcp.min(self.next_udp),
            (Some(_), None) => self.next_tcp,
            (None, _) => self.next_udp,
        }
    }

    /// Samples the ports that are due; true once every port has drained (or given up).
    pub fn sample(&mut self, held: &[Held]) -> bool {
        let now = Instant::now();
        let tcp_due = now >= self.next_tcp;
        let udp_due = now >= self.next_udp;
        if let (true, Some(every)) = (tcp_due, self.tcp_every) {
            self.next_tcp = now + every;
        }
        if let (true, Some(every)) = (udp_due, self.udp_every) {
            self.next_udp = now + every;
        }
        self.trackers.retain_mut(|(i, tracker)| {
            let h = &held[*i];
            match sample(h, tracker, tcp_due, udp_due) {
                Ok(Some(report)) => {
                    info!("port {} drained in {report}", h.mapping.public);
                    false
                }
                Ok(None) => true,
                Err(e) => {
                    warn!(
                        "cannot follow port {} ({e}); stopping without its drain",
                        h.mapping.public
                    );
                    false
                }
            }
        });
        self.trackers.is_empty()
    }
}

/// One sample of a port's drain, if due: the report when it is over.
fn sample(
    held: &Held,
    tracker: &mut Tracker,
    tcp_due: bool,
    udp_due: bool,
) -> Result<Option<String>, String> {
    match tracker {
        Tracker::Tcp(t) if tcp_due => {
            // Our copy of the socket if the server got it; else the queue is read from
            // /proc/net/tcp{,6} (a listening socket's rx_queue is its accept queue).
            let report = match held.socket.as_ref().and_then(Socket::tcp) {
                Some(listener) => t.poll_drain(listener),
                None => t.poll_drain_port(held.mapping.internal),
            };
            Ok(report
                .map_err(|e| format!("the accept queue: {e}"))?
                .map(|r| {
                    format!(
                        "{} ms, longest accept queue {}{}",
                        r.waited.as_millis(),
                        r.max_queue,
                        if r.timed_out { ", gave up waiting" } else { "" }
                    )
                }))
        }
        Tracker::Udp(t) if udp_due => Ok(t.poll_drain().map_err(|e| e.to_string())?.map(|r| {
            format!(
                "{} ms, {} flows{}",
                r.waited.as_millis(),
                r.flows,
                if r.timed_out {
                    format!(", gave up waiting for {} busy ones", r.busy)
                } else {
                    String::new()
                }
            )
        })),
        _ => Ok(None),
    }
}
