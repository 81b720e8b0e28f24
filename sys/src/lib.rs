//! nftables over netlink for switcheroo.
//!
//! This crate is the one place where switcheroo touches raw pointers and netlink buffers.
//! It builds rules with libnftnl exactly as iptables-nft 1.8 encodes
//! `-p tcp -m tcp --dport P -m addrtype --dst-type LOCAL -m comment --comment C -j REDIRECT --to-ports Q`
//! (and `-p udp -m udp`), dumps and parses the rules of one chain (filtered by table and chain in the kernel),
//! and sends atomic batches whose rules are deleted by kernel handle.
//!
//! ```no_run
//! use switcheroo_sys::{Batch, Chain, Conn, Family, Redirect};
//!
//! # fn main() -> Result<(), switcheroo_sys::Error> {
//! let mut conn = Conn::open()?;
//! let generation = conn.generation()?;
//! let existing = conn.list_rules(Family::Ipv4, Chain::Output)?;
//! let mut batch = Batch::new(Some(generation));
//! batch.insert_rule(Family::Ipv4, Chain::Output, Redirect::new(8080, 40400, "example")?);
//! for rule in existing.iter().filter(|r| r.redirect.is_some()) {
//!     batch.delete_rule(Family::Ipv4, Chain::Output, rule.handle);
//! }
//! let applied = conn.apply(&batch)?;
//! println!("inserted with handles {:?}", applied.inserted);
//! # Ok(())
//! # }
//! ```
#![deny(unsafe_op_in_unsafe_fn)]
#![deny(clippy::undocumented_unsafe_blocks)]
#![deny(missing_docs, missing_debug_implementations)]
#![doc(test(attr(deny(warnings))))]

pub mod activation;
mod attr;
mod batch;
mod conn;
pub mod conntrack;
pub mod diag;
mod error;
mod listen;
pub mod monitor;
pub mod netns;
mod nftnl;
mod pidfd;
mod rule;
pub mod ruleset;
mod socket;
#[cfg(feature = "spawn")]
pub mod spawn;
mod table;
mod xt;

pub use batch::{Batch, Op, OwnedTable};
pub use conn::{Applied, Conn};
pub use error::Error;
pub use listen::accept_queue_len;
pub use pidfd::PidFd;
pub use rule::{parse_rule_message, Protocol, Redirect, RuleEntry, COMMENT_MAX};
pub use table::{Chain, Family, Handle, TABLE};
