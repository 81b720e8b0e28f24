//! The errors of switcheroo: one variant per thing a caller can act on.

use std::ops::RangeInclusive;

/// What went wrong, and what to do about it. Every error from input validation is returned
/// before anything touches the ruleset.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The namespace is not 1-64 characters of `[A-Za-z0-9_.-]`.
    #[error("invalid namespace {namespace:?}: use 1 to 64 characters of A-Z, a-z, 0-9, '_', '.' and '-'")]
    InvalidNamespace {
        /// The namespace as given.
        namespace: String,
    },
    /// The public port is 0.
    #[error("invalid public port 0: give the port clients connect to (1-65535)")]
    InvalidPort,
    /// The internal port range is empty, reversed, or contains port 0.
    #[error("invalid port range {start}-{end}: {why}")]
    InvalidRange {
        /// First port of the range as given.
        start: u16,
        /// Last port of the range as given.
        end: u16,
        /// What is wrong with it.
        why: &'static str,
    },
    /// The public port lies inside the internal range, so an instance could bind it.
    #[error("public port {port} lies inside the internal port range {}-{}: choose a range that excludes it", .range.start(), .range.end())]
    PortInRange {
        /// The public port.
        port: u16,
        /// The internal range.
        range: RangeInclusive<u16>,
    },
    /// A service was built without any public port.
    #[error("the service has no public port: add one with Builder::tcp or Builder::udp")]
    NoPorts,
    /// The same public port (and protocol) was given twice.
    #[error("public port {port} is given twice: each (port, protocol) belongs to a service once")]
    DuplicatePort {
        /// The port given twice.
        port: crate::port::Port,
    },
    /// [`Switcheroo::begin`](crate::Switcheroo::begin) returns one TCP listener, but the
    /// service has other ports.
    #[error("begin() binds one TCP listener, but the service has the ports {ports}: use begin_all(), which binds a socket for each")]
    NotOneTcpPort {
        /// The service's ports, as `80/tcp, 443/udp`.
        ports: String,
    },
    /// No route was selected.
    #[error("no routes selected: use Routes::NETWORK, Routes::LOCALHOST or both")]
    NoRoutes,
    /// Every port of the range is bound by some socket or used by a rule of this namespace.
    #[error("no free port in {}-{}: every port is bound or used by a rule of namespace {namespace:?}; widen the range or stop stale instances", .range.start(), .range.end())]
    PortRangeExhausted {
        /// The internal range.
        range: RangeInclusive<u16>,
        /// The namespace.
        namespace: String,
    },
    /// Creating or binding the listener failed for a reason other than a busy port.
    #[error("binding the internal listener on port {port}: {source}")]
    Bind {
        /// The port tried.
        port: u16,
        /// The system error.
        source: std::io::Error,
    },
    /// Netlink refused for lack of privilege: the process needs CAP_NET_ADMIN in its network
    /// namespace.
    #[error(transparent)]
    PermissionDenied(switcheroo_sys::Error),
    /// The kernel lacks nf_tables, nat chains or the xtables compat layer.
    #[error(transparent)]
    Unsupported(switcheroo_sys::Error),
    /// The chains kept changing under the transaction until the retry budget ran out.
    /// Nothing was applied: the ruleset is as it was before the call.
    #[error("gave up after {attempts} attempts because the ruleset kept changing (last: {source}); nothing was applied, try again")]
    Conflict {
        /// How many transactions were tried.
        attempts: u32,
        /// The last conflict.
        source: switcheroo_sys::Error,
    },
    /// Any other netlink failure.
    #[error(transparent)]
    Netlink(switcheroo_sys::Error),
    /// Another instance of the namespace kept its commit lock for too long (it is stopped
    /// or hung); nothing was changed. Only a process with CAP_NET_ADMIN in the network
    /// namespace can hold the lock.
    #[error("namespace {namespace:?}: another instance has held the commit lock for {waited:?}; check for a stopped or hung instance (`nft list tables` shows the lock as table inet switcheroo-lock-{namespace} while it is held), then retry")]
    Busy {
        /// The namespace.
        namespace: String,
        /// How long this call waited.
        waited: std::time::Duration,
    },
    /// A duration that does not parse (see [`parse_duration`](crate::parse_duration)).
    #[error("invalid duration {text:?}: {why}")]
    InvalidDuration {
        /// The text as given.
        text: String,
        /// What is wrong with it.
        why: &'static str,
    },
    /// A canary share outside 1-99 percent.
    #[error("invalid canary share {percent}%: give 1 to 99 (the percent of new connections the new instance takes)")]
    InvalidCanary {
        /// The share as given.
        percent: u8,
    },
    /// A canary deploy found no live active instance to share the port with.
    #[error("namespace {namespace:?} has no live active instance for a canary to share new connections with; deploy without --canary first")]
    CanaryWithoutActive {
        /// The namespace.
        namespace: String,
    },
    /// A live instance of another namespace serves the public port in a chain the deploy
    /// would insert into: the new rule would take its new connections. Nothing was changed.
    #[error("public port {port} ({chain}) is served by pid {pid} of namespace {namespace:?}; a deploy of namespace {wanted:?} would take its new connections. Deploy it with namespace {namespace:?}, or move the service to {wanted:?} explicitly (run --move-from {namespace}, Takeover::moving_from); nothing was changed")]
    PortHeld {
        /// The public port.
        port: crate::port::Port,
        /// The family and chain, as `ip PREROUTING`.
        chain: String,
        /// The namespace that serves it.
        namespace: String,
        /// The pid of its instance there.
        pid: u32,
        /// The namespace of the refused deploy.
        wanted: String,
    },
    /// A rollback found nothing to go back to; nothing was changed.
    #[error("nothing to roll back to in namespace {namespace:?}: {why}")]
    NothingToRollBack {
        /// The namespace.
        namespace: String,
        /// What the namespace's rules are.
        why: String,
    },
    /// A promotion found no live canary; nothing was changed.
    #[error("namespace {namespace:?} has no live canary to promote")]
    NoCanary {
        /// The namespace.
        namespace: String,
    },
    /// The file given to [`Builder::netns`](crate::Builder::netns) is not a network
    /// namespace.
    #[error(
        "the file given as network namespace is not one: open /run/netns/NAME or /proc/PID/ns/net"
    )]
    InvalidNetns,
    /// The network namespace could not be determined or entered.
    #[error("{op}: {source}")]
    Netns {
        /// What was being done.
        op: String,
        /// The system error.
        source: std::io::Error,
    },
    /// Setting up signal handling failed.
    #[error("{op}: {errno}")]
    Signal {
        /// What was being done.
        op: &'static str,
        /// The system error.
        errno: nix::errno::Errno,
    },
}

impl Error {
    /// Whether the error is about the input (a namespace, port, range, route, share or
    /// duration that is not valid): the caller must change what it asked for; nothing was
    /// touched.
    pub fn is_bad_input(&self) -> bool {
        matches!(
            self,
            Error::InvalidNamespace { .. }
                | Error::InvalidPort
                | Error::InvalidRange { .. }
                | Error::PortInRange { .. }
                | Error::NoPorts
                | Error::DuplicatePort { .. }
                | Error::NotOneTcpPort { .. }
                | Error::NoRoutes
                | Error::InvalidDuration { .. }
                | Error::InvalidCanary { .. }
                | Error::InvalidNetns
        )
    }
}

impl From<switcheroo_sys::Error> for Error {
    /// A conflict becomes [`Error::Conflict`] only where attempts are counted (the
    /// transaction's retry loop); one that reaches this conversion stays a netlink error,
    /// whose message says to retry.
    fn from(e: switcheroo_sys::Error) -> Self {
        use switcheroo_sys::Error as Sys;
        match e {
            Sys::PermissionDenied { .. } => Error::PermissionDenied(e),
            Sys::Unsupported { .. } => Error::Unsupported(e),
            e => Error::Netlink(e),
        }
    }
}

/// `Result` with switcheroo's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
