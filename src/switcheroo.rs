//! The configuration of one service: namespace, public port, routes and internal range;
//! and the operations on its rules.

use crate::comment::valid_namespace;
use crate::rules::{self, Rule};
use crate::takeover::Takeover;
use crate::{port, Error, Result, Routes};
use std::collections::HashSet;
use std::net::TcpListener;
use std::ops::RangeInclusive;
use std::sync::{Arc, Mutex};
use switcheroo_sys::Conn;

/// The default internal port range.
pub const DEFAULT_PORT_RANGE: RangeInclusive<u16> = 40400..=40499;

/// A service that is reached on a public port and served by whichever instance committed
/// last. Cheap to clone; clones share one netfilter netlink socket, opened on first use in
/// the network namespace of the thread that uses it first, and kept open: closing it right
/// after a commit would wait for the kernel to destroy the deleted rules (an RCU grace
/// period, 15-30 ms).
#[derive(Debug, Clone)]
pub struct Switcheroo {
    namespace: String,
    public_port: u16,
    routes: Routes,
    range: RangeInclusive<u16>,
    max_attempts: u32,
    conn: Arc<Mutex<Option<Conn>>>,
}

/// Configures a [`Switcheroo`]; see [`Switcheroo::builder`].
#[derive(Debug, Clone)]
#[must_use]
pub struct Builder {
    inner: Switcheroo,
}

impl Builder {
    /// Which traffic to redirect: [`Routes::NETWORK`] (PREROUTING), [`Routes::LOCALHOST`]
    /// (OUTPUT), or both (the default).
    pub fn routes(mut self, routes: Routes) -> Self {
        self.inner.routes = routes;
        self
    }

    /// The range internal ports are chosen from (default `40400..=40499`). It must not
    /// contain the public port or 0. Every instance of the namespace needs its own port, so
    /// the range bounds how many can overlap during deploys.
    pub fn port_range(mut self, range: RangeInclusive<u16>) -> Self {
        self.inner.range = range;
        self
    }

    /// How many transactions `commit` and `cleanup` try when the ruleset keeps changing
    /// under them (default 32, at least 1). Past that they fail with [`Error::Conflict`],
    /// having changed nothing.
    pub fn max_attempts(mut self, attempts: u32) -> Self {
        self.inner.max_attempts = attempts.max(1);
        self
    }

    /// Validates the configuration. Touches neither sockets nor the ruleset.
    ///
    /// Errors: [`Error::InvalidNamespace`], [`Error::InvalidPort`], [`Error::InvalidRange`],
    /// [`Error::PortInRange`], [`Error::NoRoutes`].
    pub fn build(self) -> Result<Switcheroo> {
        let s = self.inner;
        if !valid_namespace(&s.namespace) {
            return Err(Error::InvalidNamespace {
                namespace: s.namespace,
            });
        }
        if s.public_port == 0 {
            return Err(Error::InvalidPort);
        }
        let (start, end) = (*s.range.start(), *s.range.end());
        let invalid = |why| Err(Error::InvalidRange { start, end, why });
        if start > end {
            return invalid("the range is reversed or empty; give MIN-MAX with MIN <= MAX");
        }
        if start == 0 {
            return invalid(
                "port 0 cannot be bound as a fixed port; start the range at 1 or above",
            );
        }
        if s.range.contains(&s.public_port) {
            return Err(Error::PortInRange {
                port: s.public_port,
                range: s.range,
            });
        }
        if s.routes.is_empty() {
            return Err(Error::NoRoutes);
        }
        Ok(s)
    }
}

impl Switcheroo {
    /// Starts configuring the service `namespace` (1-64 characters of `[A-Za-z0-9_.-]`; it
    /// tells this service's rules from every other rule) on `public_port`.
    pub fn builder(namespace: impl Into<String>, public_port: u16) -> Builder {
        Builder {
            inner: Switcheroo {
                namespace: namespace.into(),
                public_port,
                routes: Routes::default(),
                range: DEFAULT_PORT_RANGE,
                max_attempts: rules::MAX_ATTEMPTS,
                conn: Arc::default(),
            },
        }
    }

    /// The namespace.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// The public port.
    pub fn public_port(&self) -> u16 {
        self.public_port
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
        self.max_attempts
    }

    /// Binds a listener on a free internal port and returns it with the [`Takeover`] that
    /// will point the public port at it. Nothing in the ruleset changes: serve on the
    /// listener, then call [`Takeover::commit`] once ready. Dropping the takeover instead
    /// leaves every rule as it was.
    ///
    /// The listener is dual-stack (`[::]:port`, also accepting IPv4), or IPv4 only where the
    /// host has IPv6 disabled. Ports that rules of this namespace still route to are
    /// skipped. Reads the ruleset, so it needs CAP_NET_ADMIN.
    pub fn begin(&self) -> Result<(TcpListener, Takeover)> {
        let snap =
            self.with_conn(|conn| rules::snapshot(conn, Some(&self.namespace), |_| false))?;
        let taken: HashSet<u16> = snap.ours.iter().map(|r| r.internal_port).collect();
        let listener = port::bind_free(&self.range, &taken, &self.namespace)?;
        let port = listener
            .local_addr()
            .map_err(|e| Error::Bind { port: 0, source: e })?
            .port();
        log::debug!("namespace {}: bound internal port {port}", self.namespace);
        Ok((listener, Takeover::new(self.clone(), port)))
    }

    /// This namespace's rules, in every (family, chain), with whether their owner is alive.
    /// Four filtered dumps; needs CAP_NET_ADMIN.
    pub fn rules(&self) -> Result<Vec<Rule>> {
        Ok(self
            .with_conn(|conn| rules::snapshot(conn, Some(&self.namespace), |_| false))?
            .ours)
    }

    /// Deletes every rule of this namespace, by handle, in one transaction, and returns how
    /// many there were. Processes are not signalled. Other rules are not touched; the
    /// tables and chains stay.
    pub fn cleanup(&self) -> Result<usize> {
        self.with_conn(|conn| rules::delete_namespace(conn, &self.namespace, self.max_attempts))
    }
}

impl Switcheroo {
    /// Runs `f` on the shared socket, opening it if needed. After a failure the socket is
    /// dropped, so the next call starts from a fresh one.
    pub(crate) fn with_conn<T>(&self, f: impl FnOnce(&mut Conn) -> Result<T>) -> Result<T> {
        // A panic while holding the lock leaves at worst a socket with unread replies,
        // which sequence numbers already tell apart; keep going.
        let mut guard = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        let conn = match guard.as_mut() {
            Some(conn) => conn,
            None => guard.insert(Conn::open()?),
        };
        let result = f(conn);
        if result.is_err() {
            *guard = None;
        }
        result
    }
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
    fn defaults() {
        let s = Switcheroo::builder("app", 8080).build().unwrap();
        assert_eq!(s.port_range(), 40400..=40499);
        assert_eq!(s.routes(), Routes::NETWORK | Routes::LOCALHOST);
    }
}
