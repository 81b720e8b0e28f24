//! The configuration of one service: namespace, public ports, routes and internal range,
//! the network namespace it acts in; and the operations on its rules.

use crate::bind::{self, Bound, Socket};
use crate::check::{self, Finding, Target};
use crate::comment::valid_namespace;
use crate::error::{Error, Result};
use crate::flows::{self, FlowDrain, FlowTracker, Flows};
use crate::netns::NetNs;
use crate::port::{Mapping, Port};
use crate::record::Records;
use crate::registry::{Promotion, Registry, Rollback};
use crate::routes::Routes;
use crate::rule::Rule;
use crate::takeover::Takeover;
use crate::transact::MAX_ATTEMPTS;
use std::collections::HashSet;
use std::net::TcpListener;
use std::ops::RangeInclusive;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use switcheroo_sys::Protocol;

/// The default internal port range.
pub const DEFAULT_PORT_RANGE: RangeInclusive<u16> = 40400..=40499;

/// A service that is reached on one or more public ports (TCP or UDP) and served by
/// whichever instance committed last, in one network namespace. All the ports of an
/// instance are switched together, in one transaction.
///
/// The network namespace is decided when the `Switcheroo` is built: the one of the thread
/// that calls [`Builder::build`], or the one given to [`Builder::netns`]. Every socket it
/// creates (the netfilter netlink socket, the internal listener) is created there, and the
/// commit lock and the commit record belong to it, whichever thread calls later. A thread
/// that sits in another namespace can still use it; creating a socket from there enters
/// the namespace on a helper thread, which needs CAP_SYS_ADMIN.
///
/// Cheap to clone; clones share one netfilter netlink socket, opened on first use and kept
/// open: closing it right after a commit would wait for the kernel to destroy the deleted
/// rules (an RCU grace period, 15-30 ms).
#[derive(Debug, Clone)]
pub struct Switcheroo {
    ports: Vec<Port>,
    routes: Routes,
    range: RangeInclusive<u16>,
    registry: Registry,
}

/// Configures a [`Switcheroo`]; see [`Switcheroo::builder`].
#[derive(Debug)]
#[must_use]
pub struct Builder {
    namespace: String,
    ports: Vec<Port>,
    routes: Routes,
    range: RangeInclusive<u16>,
    max_attempts: u32,
    netns: Option<OwnedFd>,
    record_dir: Option<PathBuf>,
}

impl Builder {
    /// Adds public TCP port `port` to the service.
    pub fn tcp(self, port: u16) -> Self {
        self.port(Port::tcp(port))
    }

    /// Adds public UDP port `port` to the service (QUIC, DNS, ...). The instance gets a
    /// UDP socket on an internal port for it; conntrack keeps each flow (4-tuple) on the
    /// instance that got its first datagram.
    pub fn udp(self, port: u16) -> Self {
        self.port(Port::udp(port))
    }

    /// Adds a public port to the service.
    pub fn port(mut self, port: Port) -> Self {
        self.ports.push(port);
        self
    }

    /// Which traffic to redirect: [`Routes::NETWORK`] (PREROUTING), [`Routes::LOCALHOST`]
    /// (OUTPUT), or both (the default).
    pub fn routes(mut self, routes: Routes) -> Self {
        self.routes = routes;
        self
    }

    /// The range internal ports are chosen from (default `40400..=40499`). It must not
    /// contain the public port or 0. Every instance of the namespace needs its own port, so
    /// the range bounds how many can overlap during deploys.
    pub fn port_range(mut self, range: RangeInclusive<u16>) -> Self {
        self.range = range;
        self
    }

    /// How many attempts `commit` and `cleanup` make when the ruleset keeps changing under
    /// them (default 32, at least 1): every read interrupted by a change and every batch
    /// the kernel refuses because of one counts. Past that they fail with
    /// [`Error::Conflict`], having changed nothing.
    pub fn max_attempts(mut self, attempts: u32) -> Self {
        self.max_attempts = attempts.max(1);
        self
    }

    /// The network namespace to act in, as an open namespace file (`/run/netns/NAME`,
    /// `/proc/PID/ns/net`), like google/nftables' `WithNetNSFd`. Default: the namespace of
    /// the thread that calls [`Builder::build`]. The `Switcheroo` keeps the file open.
    pub fn netns(mut self, fd: impl Into<OwnedFd>) -> Self {
        self.netns = Some(fd.into());
        self
    }

    /// Keep a record of each commit in `dir`, so that the next commit of the service in
    /// the same network namespace can skip the dumps of its chains when nothing else has
    /// changed the ruleset since (with 10,000 foreign rules in PREROUTING that is most of
    /// the cost of a commit). Off by default. The directory must belong to the effective
    /// user and be writable by nobody else; it is created with mode 0700 if missing, and
    /// is not used otherwise. Records are keyed by the network namespace's cookie and the
    /// boot id, at most 64 are kept (see the README). A systemd unit would give
    /// `RuntimeDirectory=switcheroo` and pass `/run/switcheroo`.
    pub fn record_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.record_dir = Some(dir.into());
        self
    }

    /// Validates the configuration and decides the network namespace (opening its file).
    /// Touches neither the ruleset nor any port.
    ///
    /// Errors: [`Error::InvalidNamespace`], [`Error::NoPorts`], [`Error::InvalidPort`],
    /// [`Error::DuplicatePort`], [`Error::InvalidRange`], [`Error::PortInRange`],
    /// [`Error::NoRoutes`], [`Error::InvalidNetns`] (the given fd
    /// is not a network namespace), [`Error::Netns`] (`/proc` is not mounted).
    pub fn build(self) -> Result<Switcheroo> {
        if !valid_namespace(&self.namespace) {
            return Err(Error::InvalidNamespace {
                namespace: self.namespace,
            });
        }
        if self.ports.is_empty() {
            return Err(Error::NoPorts);
        }
        if self.ports.iter().any(|p| p.number == 0) {
            return Err(Error::InvalidPort);
        }
        for (i, port) in self.ports.iter().enumerate() {
            if self.ports[..i].contains(port) {
                return Err(Error::DuplicatePort { port: *port });
            }
        }
        let (start, end) = (*self.range.start(), *self.range.end());
        let invalid = |why| Err(Error::InvalidRange { start, end, why });
        if start > end {
            return invalid("the range is reversed or empty; give MIN-MAX with MIN <= MAX");
        }
        if start == 0 {
            return invalid(
                "port 0 cannot be bound as a fixed port; start the range at 1 or above",
            );
        }
        if let Some(port) = self.ports.iter().find(|p| self.range.contains(&p.number)) {
            return Err(Error::PortInRange {
                port: port.number,
                range: self.range,
            });
        }
        if self.routes.is_empty() {
            return Err(Error::NoRoutes);
        }
        let netns = match self.netns {
            Some(fd) => NetNs::from_fd(fd)?,
            None => NetNs::current()?,
        };
        Ok(Switcheroo {
            ports: self.ports,
            routes: self.routes,
            range: self.range,
            registry: Registry::new(
                self.namespace,
                netns,
                self.max_attempts,
                self.record_dir.map(Records::new),
            ),
        })
    }
}

impl Switcheroo {
    /// Starts configuring the service `namespace` (1-64 characters of `[A-Za-z0-9_.-]`; it
    /// tells this service's rules from every other rule) on TCP port `public_port`. More
    /// ports can be added with [`Builder::tcp`] and [`Builder::udp`].
    pub fn builder(namespace: impl Into<String>, public_port: u16) -> Builder {
        Switcheroo::service(namespace).tcp(public_port)
    }

    /// Starts configuring the service `namespace` without a port: add its ports with
    /// [`Builder::tcp`] and [`Builder::udp`] (all of them are switched together), then bind
    /// a socket for each with [`Switcheroo::begin_all`].
    ///
    /// ```no_run
    /// let sw = switcheroo::Switcheroo::service("web").tcp(80).tcp(443).udp(443).build()?;
    /// let (sockets, takeover) = sw.begin_all()?;
    /// assert_eq!(sockets.len(), 3);
    /// // ... serve HTTP, HTTPS and HTTP/3 on sockets[0], [1] and [2] ...
    /// takeover.commit()?;
    /// # Ok::<(), switcheroo::Error>(())
    /// ```
    pub fn service(namespace: impl Into<String>) -> Builder {
        Builder {
            namespace: namespace.into(),
            ports: Vec::new(),
            routes: Routes::default(),
            range: DEFAULT_PORT_RANGE,
            max_attempts: MAX_ATTEMPTS,
            netns: None,
            record_dir: None,
        }
    }

    /// The namespace.
    pub fn namespace(&self) -> &str {
        self.registry.namespace()
    }

    /// The first public port (the only one of a service made with
    /// [`Switcheroo::builder`]).
    pub fn public_port(&self) -> u16 {
        self.ports[0].number
    }

    /// The public ports, in the order they were given.
    pub fn ports(&self) -> &[Port] {
        &self.ports
    }

    /// The routes.
    pub fn routes(&self) -> Routes {
        self.routes
    }

    /// The internal port range.
    pub fn port_range(&self) -> RangeInclusive<u16> {
        self.range.clone()
    }

    /// The retry budget of a transaction.
    pub fn max_attempts(&self) -> u32 {
        self.registry.max_attempts()
    }

    /// The namespace's hold on its network namespace's ruleset.
    pub(crate) fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Binds a listener on a free internal port and returns it with the [`Takeover`] that
    /// will point the public port at it. Nothing in the ruleset changes: serve on the
    /// listener, then call [`Takeover::commit`] once ready. Dropping the takeover instead
    /// leaves every rule as it was.
    ///
    /// The listener is dual-stack (`[::]:port`, also accepting IPv4), or IPv4 only where the
    /// host has IPv6 disabled, in the service's network namespace. Ports that switcheroo
    /// rules (of any namespace) still route to are skipped. Reads the ruleset, so it needs
    /// CAP_NET_ADMIN.
    ///
    /// [`Error::NotOneTcpPort`] for a service with other ports than one TCP port: use
    /// [`Switcheroo::begin_all`].
    pub fn begin(&self) -> Result<(TcpListener, Takeover)> {
        if !matches!(
            self.ports[..],
            [Port {
                protocol: Protocol::Tcp,
                ..
            }]
        ) {
            return Err(Error::NotOneTcpPort {
                ports: self.port_list(),
            });
        }
        let (mut bound, takeover) = self.begin_all()?;
        match bound.pop().map(|b| b.socket) {
            Some(Socket::Tcp(listener)) => Ok((listener, takeover)),
            _ => unreachable!("begin_all binds one socket per port, of the port's protocol"),
        }
    }

    /// Binds a socket for each public port of the service, each on its own free internal
    /// port (a TCP listener or an unconnected UDP socket, dual-stack), and returns them in
    /// the order the ports were given, with the [`Takeover`] that will point all the
    /// public ports at them in one transaction. Nothing in the ruleset changes; dropping
    /// the takeover leaves every rule as it was. Ports that switcheroo rules (of any
    /// namespace) still route to are skipped. Reads the ruleset, so it needs CAP_NET_ADMIN.
    pub fn begin_all(&self) -> Result<(Vec<Bound>, Takeover)> {
        // The ports every switcheroo rule leads to, of any namespace: a dead instance's
        // rule still routes there, and a socket bound to it would get those connections.
        let mut taken: HashSet<u16> = self
            .registry
            .read()?
            .iter()
            .map(|r| r.internal_port)
            .collect();
        let mut bound = Vec::with_capacity(self.ports.len());
        for public in &self.ports {
            let socket = self.registry.in_netns(|| {
                bind::bind_free(public.protocol, &self.range, &taken, self.namespace())
            })??;
            let addr = match &socket {
                Socket::Tcp(l) => l.local_addr(),
                Socket::Udp(s) => s.local_addr(),
            };
            let internal = addr.map_err(|e| Error::Bind { port: 0, source: e })?.port();
            log::debug!(
                "namespace {}: bound internal port {internal} for {public}",
                self.namespace()
            );
            taken.insert(internal);
            bound.push(Bound {
                public: *public,
                internal,
                socket,
            });
        }
        let mappings = bound.iter().map(Bound::mapping).collect();
        Ok((
            bound,
            Takeover::new(self.registry.clone(), self.routes, mappings),
        ))
    }

    /// The ports as `80/tcp, 443/udp`.
    pub(crate) fn port_list(&self) -> String {
        let list: Vec<String> = self.ports.iter().map(Port::to_string).collect();
        list.join(", ")
    }

    /// This namespace's rules, in every (family, chain), each chain top down, with their
    /// roles and whether their owners are alive. Four filtered dumps; needs CAP_NET_ADMIN.
    pub fn rules(&self) -> Result<Vec<Rule>> {
        self.registry.rules()
    }

    /// Deletes every rule of this namespace, by handle, in one transaction, and returns how
    /// many there were. Processes are not signalled. Other rules are not touched; the
    /// tables and chains stay.
    pub fn cleanup(&self) -> Result<usize> {
        self.registry.cleanup()
    }

    /// Rolls the service back in one transaction: deletes its head instance's rules in
    /// every chain (the canary if there is one, else the active, if a live standby is
    /// below it, which then takes every new connection) and any rules of dead owners, then
    /// sends the rolled-back instance SIGTERM (after its identity check) so that it
    /// retires. [`Error::NothingToRollBack`] says why when there is nothing to go back to;
    /// the ruleset is then unchanged.
    pub fn rollback(&self) -> Result<Rollback> {
        self.registry.rollback()
    }

    /// Makes the live canary the active in one transaction: a plain rule of the canary's
    /// instance replaces its statistic rule at the head of each chain, the previous active
    /// stays below as the standby, and an older standby's rules and those of dead owners
    /// go (their live owners get SIGTERM). The promoted instance's probation, if it watches
    /// with a [`Tenure`](crate::Tenure), decides when the standby retires.
    /// [`Error::NoCanary`] without a live canary; the ruleset is then unchanged.
    pub fn promote(&self) -> Result<Promotion> {
        self.registry.promote()
    }

    /// The UDP flows that conntrack maps to the internal port `port` (both families) in
    /// the service's network namespace, the most recently active first, to
    /// [`forget`](Flows::forget) as the instance behind `port` leaves. Forget them while
    /// still answering, answer for a few milliseconds more, then close: a flow that goes
    /// on is then mapped afresh, to the instance that serves now, instead of feeding a
    /// closed port until its entry expires. Only a datagram that is waiting in the socket
    /// at the instant its flow goes is answered from the internal port, which its client
    /// drops. Needs CAP_NET_ADMIN.
    pub fn flows(&self, port: u16) -> Result<Flows> {
        flows::read(&self.registry, port)
    }

    /// A drain of the UDP flows that conntrack maps to the internal port `port`: call
    /// [`FlowTracker::poll_drain`] every [`FlowTracker::interval`] from any event loop until
    /// it returns a report, or block in [`FlowTracker::wait`]. The clock starts now.
    pub fn track_flows(&self, port: u16, drain: &FlowDrain) -> FlowTracker {
        drain.tracker(&self.registry, port)
    }

    /// [`Switcheroo::flows`] and [`Flows::forget`] in one call: deletes the conntrack
    /// entries that map UDP flows to the internal port `port`, and returns how many there
    /// were.
    pub fn forget_flows(&self, port: u16) -> Result<usize> {
        self.flows(port)?.forget()
    }

    /// Deletes the conntrack entries in CLOSE state (TCP connections that ended in a reset)
    /// that map to the internal ports of `mappings`, both families, and returns how many
    /// there were.
    ///
    /// A server that resets connections as it stops (a keep-alive connection closed with a
    /// request unread) leaves such entries for 10 s, and conntrack sends a new SYN from
    /// the same client port along one of them, to a port nobody listens on any more,
    /// instead of redirecting it afresh: the client is refused. A retiring instance calls
    /// this while it stops, and once it has. The connections are over; nothing else is
    /// touched. Needs CAP_NET_ADMIN.
    pub fn forget_closed(&self, mappings: &[Mapping]) -> Result<usize> {
        self.registry.with_conn(|conn| {
            let mut forgotten = 0;
            for m in mappings
                .iter()
                .filter(|m| m.public.protocol == Protocol::Tcp)
            {
                for family in switcheroo_sys::Family::ALL {
                    let closed: Vec<_> = conn
                        .conntrack_to_port(family, Protocol::Tcp, m.internal)?
                        .into_iter()
                        .filter(|e| e.is_closed())
                        .collect();
                    if !closed.is_empty() {
                        forgotten += conn.delete_conntrack_all(&closed)?;
                    }
                }
            }
            Ok(forgotten)
        })
    }

    /// Whether a deploy of this service would be refused because a live instance of
    /// another namespace serves one of its public ports (but `moving_from`, the namespace
    /// a deploy may move the service from): the refusal the commit would return
    /// ([`Error::PortHeld`]), or `None`. Reads the ruleset only; the commit decides again
    /// under its lock.
    pub fn port_held(&self, moving_from: Option<&str>) -> Result<Option<Error>> {
        let rules = self.registry.read()?;
        let view = crate::view::View::new(self.namespace(), &rules);
        // Only the public ports matter to the question; internal ports are not chosen yet.
        let mappings: Vec<Mapping> = self
            .ports
            .iter()
            .map(|p| Mapping {
                public: *p,
                internal: 0,
            })
            .collect();
        let deployment = crate::plan::Deployment {
            me: crate::owner::this_process(),
            mappings: &mappings,
            routes: self.routes,
            canary: None,
            probation: false,
            moving_from,
        };
        Ok(crate::plan::port_held(&view, &deployment))
    }

    /// The connections (TCP, not yet closed) and UDP flows that conntrack maps to the
    /// internal ports of `mappings` in the service's network namespace: what an instance
    /// still serves. One filtered dump per family and port; needs CAP_NET_ADMIN.
    pub fn connections(&self, mappings: &[Mapping]) -> Result<crate::instances::Connections> {
        self.registry
            .with_conn(|conn| crate::instances::count(conn, mappings))
    }

    /// [`check::diagnose`] for this service (its namespace, ports and internal range) in
    /// its network namespace: read-only.
    pub fn diagnose(&self) -> Result<Vec<Finding>> {
        let target = Target {
            namespace: Some(self.namespace().to_owned()),
            ports: self.ports.clone(),
            range: self.range.clone(),
        };
        self.registry.in_netns(|| check::diagnose(&target))?
    }
}

/// Every switcheroo rule in the calling thread's network namespace, of every service
/// namespace, in the order of the dumps (IPv4 before IPv6, PREROUTING before OUTPUT, each
/// chain top down). Opens its own netfilter socket; needs CAP_NET_ADMIN.
///
/// ```no_run
/// for rule in switcheroo::all_rules()? {
///     println!("{} {} {} {} -> {} pid {} alive {}", rule.namespace, rule.family,
///         rule.chain, rule.public_port, rule.internal_port, rule.pid, rule.alive);
/// }
/// # Ok::<(), switcheroo::Error>(())
/// ```
pub fn all_rules() -> Result<Vec<Rule>> {
    let mut conn = switcheroo_sys::Conn::open()?;
    Ok(crate::transact::read(&mut conn, MAX_ATTEMPTS)?.rules)
}

/// Deletes every rule of the service `namespace` in the calling thread's network
/// namespace, whatever its public port, in one transaction, and returns how many there
/// were; processes are not signalled. The same as [`Switcheroo::cleanup`] without a
/// configured service.
///
/// Errors: [`Error::InvalidNamespace`] before anything is read; then as `cleanup`.
pub fn cleanup(namespace: &str) -> Result<usize> {
    Registry::here(namespace)?.cleanup()
}

/// [`Switcheroo::rollback`] for the service `namespace` in the calling thread's network
/// namespace, without a configured service (what `switcheroo rollback` runs).
pub fn rollback(namespace: &str) -> Result<Rollback> {
    Registry::here(namespace)?.rollback()
}

/// [`Switcheroo::promote`] for the service `namespace` in the calling thread's network
/// namespace (what `switcheroo promote` runs).
pub fn promote(namespace: &str) -> Result<Promotion> {
    Registry::here(namespace)?.promote()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(b: Builder) -> Error {
        b.build().unwrap_err()
    }

    #[test]
    fn bad_input_is_refused_with_a_typed_error() {
        assert!(matches!(
            err(Switcheroo::builder("a:b", 80)),
            Error::InvalidNamespace { .. }
        ));
        assert!(matches!(
            err(Switcheroo::builder("a", 0)),
            Error::InvalidPort
        ));
        assert!(matches!(
            err(Switcheroo::builder("a", 80).port_range(RangeInclusive::new(50, 40))),
            Error::InvalidRange { .. }
        ));
        assert!(matches!(
            err(Switcheroo::builder("a", 80).port_range(0..=40)),
            Error::InvalidRange { .. }
        ));
        assert!(matches!(
            err(Switcheroo::builder("a", 8080).port_range(8000..=8100)),
            Error::PortInRange { .. }
        ));
        assert!(matches!(
            err(Switcheroo::builder("a", 80).routes(Routes::empty())),
            Error::NoRoutes
        ));
    }

    #[test]
    fn a_service_needs_distinct_ports_outside_the_range() {
        assert!(matches!(err(Switcheroo::service("a")), Error::NoPorts));
        assert!(matches!(
            err(Switcheroo::service("a").udp(53).tcp(53).udp(53)),
            Error::DuplicatePort { port } if port == Port::udp(53)
        ));
        assert!(matches!(
            err(Switcheroo::service("a").tcp(80).udp(40450)),
            Error::PortInRange { port: 40450, .. }
        ));
        let sw = Switcheroo::service("a").tcp(80).udp(80).build().unwrap();
        assert_eq!(sw.ports(), [Port::tcp(80), Port::udp(80)]);
        assert!(matches!(sw.begin(), Err(Error::NotOneTcpPort { .. })));
        let udp_only = Switcheroo::service("a").udp(53).build().unwrap();
        assert!(matches!(udp_only.begin(), Err(Error::NotOneTcpPort { .. })));
    }

    #[test]
    fn defaults() {
        let s = Switcheroo::builder("app", 8080).build().unwrap();
        assert_eq!(s.port_range(), 40400..=40499);
        assert_eq!(s.routes(), Routes::NETWORK | Routes::LOCALHOST);
    }
}
