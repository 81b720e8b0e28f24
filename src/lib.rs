//! Zero-downtime deploys of TCP servers on Linux.
//!
//! A server that embeds switcheroo seems to listen on its public port, say 8080, but really
//! listens on a fresh internal port (say 40400); an nftables NAT REDIRECT rule maps 8080 to
//! it. To deploy, start the new executable: it binds its own internal port and, once ready,
//! atomically points 8080 at itself; older instances get SIGTERM, drain their listener,
//! finish their in-flight connections and exit. Established connections keep flowing to
//! the old process (conntrack remembers their mapping), new ones reach the new process, and
//! none is refused or reset.
//!
//! The rules live in the `ip nat` and `ip6 nat` tables that iptables-nft uses, encoded
//! exactly as iptables-nft 1.8 encodes
//!
//! ```text
//! -A OUTPUT -p tcp -m tcp --dport 8080 -m addrtype --dst-type LOCAL -m comment --comment "SWITCHEROO:ns=app:port=40400:pid=1234:start=98765" -j REDIRECT --to-ports 40400
//! ```
//!
//! so `iptables-nft-save` shows them as ordinary rules. They are written over netlink in
//! one atomic nftables transaction and deleted by kernel handle: no `iptables` binary, no
//! line numbers, no race with other writers. Needs CAP_NET_ADMIN (netlink) and, to signal
//! instances of another user, CAP_KILL.
//!
//! ```no_run
//! use std::io::Write;
//! use switcheroo::{Drain, Routes, Shutdown, Switcheroo};
//!
//! fn main() -> Result<(), Box<dyn std::error::Error>> {
//!     let shutdown = Shutdown::install()?; // before any thread starts
//!     let sw = Switcheroo::builder("myapp", 8080) // namespace, public port
//!         .routes(Routes::NETWORK | Routes::LOCALHOST) // default: both
//!         .port_range(40400..=40499) // default
//!         .build()?;
//!     let (listener, takeover) = sw.begin()?; // a listener on a free internal port
//!     let acceptor = listener.try_clone()?;
//!     std::thread::spawn(move || {
//!         for stream in acceptor.incoming().flatten() {
//!             let mut stream = stream;
//!             let _ = stream.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nhi\n");
//!         }
//!     });
//!     let report = takeover.commit()?; // one transaction; the old owners get SIGTERM
//!     println!("serving 8080 on port {}", report.port);
//!     let rules = sw.rules()?; // this namespace's rules: family, chain, handle, ports, pid
//!     assert!(rules.iter().all(|r| r.internal_port == report.port));
//!
//!     shutdown.wait(); // a newer instance took over
//!     Drain::new().wait(&listener)?; // keep accepting until the accept queue is idle
//!     Ok(())
//! }
//! ```
#![forbid(unsafe_code)]
#![deny(missing_docs, missing_debug_implementations)]
#![doc(test(attr(deny(warnings))))]

pub mod activation;
mod bind;
pub mod check;
mod comment;
mod drain;
mod duration;
mod error;
mod flows;
mod instances;
mod lock;
mod netns;
mod owner;
mod plan;
pub mod poll;
mod port;
pub mod process;
mod record;
mod registry;
mod retire;
mod role;
mod routes;
mod rule;
mod shutdown;
mod snapshot;
mod sockets;
mod switcheroo;
mod takeover;
mod tenure;
mod transact;
mod view;

pub use bind::{Bound, Socket};
pub use comment::Identity;
pub use drain::{accept_queue_of_port, Drain, DrainReport, DrainTracker};
pub use duration::parse_duration;
pub use error::{Error, Result};
pub use flows::{FlowDrain, FlowReport, FlowTracker, Flows};
pub use instances::{instances, Connections, Instance, Standing};
pub use port::{Mapping, Port};
pub use registry::{Promotion, Rollback};
pub use role::Role;
pub use routes::Routes;
pub use rule::Rule;
pub use shutdown::Shutdown;
pub use sockets::Holder;
pub use switcheroo::{
    all_rules, cleanup, promote, rollback, Builder, Switcheroo, DEFAULT_PORT_RANGE,
};
pub use switcheroo_sys::{Chain, Family, Handle, Protocol};
pub use takeover::{Report, Takeover};
pub use tenure::{Change, Resignation, Retired, Tenure, Wake};
