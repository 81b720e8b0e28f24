//! Draining an old instance's UDP port after the switch, and forgetting its flows when it
//! leaves.
//!
//! UDP has no connections, but conntrack has flows: a REDIRECT binds each 4-tuple to the
//! internal port that got its first datagram, and keeps it there while datagrams keep
//! coming (the entry's timeout is reset by each one: `nf_conntrack_udp_timeout`, 30 s, for
//! a new flow; `nf_conntrack_udp_timeout_stream`, 120 s, once it is assured). So after a
//! switch the old instance still receives the datagrams of its flows (a QUIC connection
//! keeps its 4-tuple), and only new flows reach the new instance.
//!
//! [`FlowDrain`] (through [`Switcheroo::track_flows`](crate::Switcheroo::track_flows)) waits until the flows still mapped to
//! a port have been quiet for an idle period (bounded by a maximum), reading them from
//! conntrack. When the instance leaves,
//! [`Switcheroo::forget_flows`](crate::Switcheroo::forget_flows) (or [`Switcheroo::flows`](crate::Switcheroo::flows) and [`Flows::forget`]) deletes
//! the entries that still map to its port, while it still answers: otherwise
//! a flow that goes on would keep feeding the closed port (answered by ICMP port
//! unreachable) until its entry expired, and with it the flow would be mapped afresh, to
//! the current instance.

use crate::error::Result;
use crate::registry::Registry;
use std::time::{Duration, Instant};
use switcheroo_sys::conntrack::Entry;
use switcheroo_sys::{Family, Protocol};

/// Waits until the UDP flows that conntrack maps to a port have been quiet for a while.
///
/// The application keeps serving its socket while the drain runs; the drain only reads
/// conntrack (a dump filtered by the kernel to the port's flows, both families), which
/// needs CAP_NET_ADMIN.
///
/// Conntrack keeps time in whole seconds: a flow whose entry has `r` seconds left of the
/// state's timeout `T` has been quiet for more than `T - r - 1` seconds. So the idle period
/// is counted in whole seconds, at least 1. Defaults: idle 1 s, at most 30 s (a flow that
/// never pauses, a QUIC connection kept busy, holds the old instance until then), sampled
/// every 250 ms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlowDrain {
    idle: Duration,
    max_wait: Duration,
    interval: Duration,
}

/// How a flow drain ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlowReport {
    /// How long the drain took.
    pub waited: Duration,
    /// Whether it ended because `max_wait` ran out rather than because the flows were quiet.
    pub timed_out: bool,
    /// The flows still mapped to the port at the end (quiet ones, or busy ones when it
    /// timed out).
    pub flows: usize,
    /// The flows that were still busy at the end (0 unless it timed out).
    pub busy: usize,
}

impl Default for FlowDrain {
    fn default() -> Self {
        FlowDrain {
            idle: Duration::from_secs(1),
            max_wait: Duration::from_secs(30),
            interval: Duration::from_millis(250),
        }
    }
}

impl FlowDrain {
    /// A drain with the defaults.
    pub fn new() -> Self {
        Self::default()
    }

    /// How long every flow must have been quiet (rounded up to whole seconds, at least 1).
    #[must_use]
    pub fn idle(mut self, idle: Duration) -> Self {
        self.idle = idle;
        self
    }

    /// The longest the drain waits, quiet or not.
    #[must_use]
    pub fn max_wait(mut self, max_wait: Duration) -> Self {
        self.max_wait = max_wait;
        self
    }

    /// How often conntrack is read.
    #[must_use]
    pub fn interval(mut self, interval: Duration) -> Self {
        self.interval = interval.max(Duration::from_millis(10));
        self
    }

    /// A drain of `port` in `registry`'s network namespace; the clock starts now.
    pub(crate) fn tracker(&self, registry: &Registry, port: u16) -> FlowTracker {
        FlowTracker {
            drain: *self,
            registry: registry.clone(),
            port,
            started: Instant::now(),
            timeouts: None,
        }
    }
}

/// A flow drain in progress; see [`Switcheroo::track_flows`](crate::Switcheroo::track_flows).
#[derive(Debug, Clone)]
pub struct FlowTracker {
    drain: FlowDrain,
    registry: Registry,
    port: u16,
    started: Instant,
    timeouts: Option<UdpTimeouts>,
}

impl FlowTracker {
    /// Blocks until every UDP flow that conntrack maps to the port has been quiet for the
    /// idle period (or there is none), or `max_wait` has passed.
    pub fn wait(&mut self) -> Result<FlowReport> {
        loop {
            if let Some(report) = self.poll_drain()? {
                return Ok(report);
            }
            std::thread::sleep(self.drain.interval);
        }
    }

    /// How long to wait between samples.
    pub fn interval(&self) -> Duration {
        self.drain.interval
    }

    /// Reads the port's flows once. `Some(report)` when the drain is over.
    pub fn poll_drain(&mut self) -> Result<Option<FlowReport>> {
        let timeouts = match self.timeouts {
            Some(t) => t,
            None => *self.timeouts.insert(UdpTimeouts::read(&self.registry)?),
        };
        let entries = flows_to(&self.registry, self.port)?;
        let idle_secs = self.drain.idle.as_secs_f64().ceil().max(1.0) as u32;
        let busy = entries
            .iter()
            .filter(|e| timeouts.quiet_secs(e.assured(), e.timeout) < idle_secs)
            .count();
        let waited = self.started.elapsed();
        let report = |timed_out| FlowReport {
            waited,
            timed_out,
            flows: entries.len(),
            busy,
        };
        if busy == 0 {
            return Ok(Some(report(false)));
        }
        Ok((waited >= self.drain.max_wait).then(|| report(true)))
    }
}

/// The UDP flows (both families) that conntrack maps to `port` in the registry's network
/// namespace.
fn flows_to(registry: &Registry, port: u16) -> Result<Vec<Entry>> {
    registry.with_conn(|conn| {
        let mut all = Vec::new();
        for family in Family::ALL {
            all.extend(conn.conntrack_to_port(family, Protocol::Udp, port)?);
        }
        Ok(all)
    })
}

/// The UDP timeouts of conntrack in the service's network namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct UdpTimeouts {
    /// `nf_conntrack_udp_timeout`: a flow not assured yet.
    new: u32,
    /// `nf_conntrack_udp_timeout_stream`: an assured flow.
    stream: u32,
}

impl UdpTimeouts {
    /// The kernel's defaults, for when the sysctls cannot be read.
    const DEFAULT: UdpTimeouts = UdpTimeouts {
        new: 30,
        stream: 120,
    };

    /// Reads the sysctls from `/proc/sys/net/netfilter` as the service's network namespace
    /// sees them (they are per namespace).
    fn read(registry: &Registry) -> Result<UdpTimeouts> {
        let read = |name: &str| -> Option<u32> {
            std::fs::read_to_string(format!("/proc/sys/net/netfilter/{name}"))
                .ok()?
                .trim()
                .parse()
                .ok()
        };
        let (new, stream) = registry.in_netns(|| {
            (
                read("nf_conntrack_udp_timeout"),
                read("nf_conntrack_udp_timeout_stream"),
            )
        })?;
        if new.is_none() || stream.is_none() {
            log::debug!(
                "conntrack's UDP timeouts are not readable; assuming the defaults {:?}",
                Self::DEFAULT
            );
        }
        Ok(UdpTimeouts {
            new: new.unwrap_or(Self::DEFAULT.new),
            stream: stream.unwrap_or(Self::DEFAULT.stream),
        })
    }

    /// Whole seconds a flow has certainly been quiet, from its entry's state and the
    /// seconds `left` of its timeout: the last datagram reset the timeout to the state's
    /// full one, and the kernel reports what is left rounded down. An entry with a timeout
    /// of its own (a conntrack timeout policy) counts as busy, so the drain waits for it
    /// until `max_wait`.
    fn quiet_secs(&self, assured: bool, left: Option<u32>) -> u32 {
        let full = if assured { self.stream } else { self.new };
        match left {
            Some(left) => full.saturating_sub(left.saturating_add(1)),
            None => 0,
        }
    }
}

/// The UDP flows that conntrack maps to one internal port, as read at one moment; see
/// [`Switcheroo::flows`](crate::Switcheroo::flows).
#[derive(Debug)]
pub struct Flows {
    registry: Registry,
    port: u16,
    entries: Vec<Entry>,
}

impl Flows {
    /// The internal port the flows map to.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// How many flows there were.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether there were none.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Deletes the entries read, the most recently active first and all in one go (one
    /// `sendmsg` per 64), and returns how many were deleted (the others had expired).
    /// No entry for the port appears after the read once the instance's rules are gone:
    /// conntrack maps a new flow by the rules, which lead elsewhere.
    pub fn forget(self) -> Result<usize> {
        let Flows {
            registry,
            port,
            entries,
        } = self;
        registry.with_conn(|conn| {
            let forgotten = conn.delete_conntrack_all(&entries)?;
            if forgotten > 0 {
                log::debug!(
                    "namespace {}: forgot {forgotten} UDP flows of port {port}",
                    registry.namespace()
                );
            }
            Ok(forgotten)
        })
    }
}

/// The UDP flows that conntrack maps to the internal port `port`, the most recently active
/// first; see [`Switcheroo::flows`](crate::Switcheroo::flows).
pub(crate) fn read(registry: &Registry, port: u16) -> Result<Flows> {
    let mut entries = flows_to(registry, port)?;
    // The most recently active first, and among those the assured (long-lived) ones: a
    // flow of one datagram and its answer is as recent, but over.
    let timeouts = UdpTimeouts::read(registry)?;
    entries.sort_by_key(|e| (timeouts.quiet_secs(e.assured(), e.timeout), !e.assured()));
    Ok(Flows {
        registry: registry.clone(),
        port,
        entries,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quiet_seconds_are_a_lower_bound_from_the_state_timeout() {
        let t = UdpTimeouts {
            new: 30,
            stream: 120,
        };
        let quiet = |left, assured| t.quiet_secs(assured, left);
        // Just refreshed (the kernel rounds what is left down): quiet for less than 1 s.
        assert_eq!(quiet(Some(30), false), 0);
        assert_eq!(quiet(Some(29), false), 0);
        assert_eq!(quiet(Some(28), false), 1);
        assert_eq!(quiet(Some(119), true), 0);
        assert_eq!(quiet(Some(100), true), 19);
        // A timeout policy longer than the sysctl, or no timeout at all: busy.
        assert_eq!(quiet(Some(500), false), 0);
        assert_eq!(quiet(None, true), 0);
    }
}
