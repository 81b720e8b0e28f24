//! The tables and base chains that iptables-nft uses for NAT, and rule handles.

use crate::nftnl::ChainObj;
use crate::rule::cstring;
use nftnl::nftnl_sys as sys;
use std::fmt;

/// The table iptables-nft keeps its NAT rules in, for both families.
pub const TABLE: &str = "nat";

/// An address family with its own `nat` table (`ip nat`, `ip6 nat`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Family {
    /// IPv4: the `ip` family (`NFPROTO_IPV4`), what `iptables-nft` edits.
    Ipv4,
    /// IPv6: the `ip6` family (`NFPROTO_IPV6`), what `ip6tables-nft` edits.
    Ipv6,
}

impl Family {
    /// Both families, IPv4 first.
    pub const ALL: [Family; 2] = [Family::Ipv4, Family::Ipv6];

    /// The netfilter protocol family number carried in `nfgenmsg.nfgen_family`.
    pub fn nfproto(self) -> u8 {
        match self {
            Family::Ipv4 => libc::NFPROTO_IPV4 as u8,
            Family::Ipv6 => libc::NFPROTO_IPV6 as u8,
        }
    }

    /// The nft name of the family: `ip` or `ip6`.
    pub fn name(self) -> &'static str {
        match self {
            Family::Ipv4 => "ip",
            Family::Ipv6 => "ip6",
        }
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A base chain of the `nat` table that switcheroo inserts its redirect into.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Chain {
    /// `PREROUTING`, hook prerouting: connections that arrive from the network.
    Prerouting,
    /// `OUTPUT`, hook output: connections the host makes to itself.
    Output,
}

impl Chain {
    /// Both chains, PREROUTING first.
    pub const ALL: [Chain; 2] = [Chain::Prerouting, Chain::Output];

    /// The chain of this name (`PREROUTING` or `OUTPUT`), if it is one of ours.
    pub fn from_name(name: &str) -> Option<Chain> {
        Chain::ALL.into_iter().find(|c| c.name() == name)
    }

    /// The chain name iptables-nft uses.
    pub fn name(self) -> &'static str {
        match self {
            Chain::Prerouting => "PREROUTING",
            Chain::Output => "OUTPUT",
        }
    }

    /// The netfilter hook number the base chain is attached to.
    pub(crate) fn hooknum(self) -> u32 {
        match self {
            Chain::Prerouting => libc::NF_INET_PRE_ROUTING as u32,
            Chain::Output => libc::NF_INET_LOCAL_OUT as u32,
        }
    }

    /// The priority iptables-nft gives both NAT base chains (`NF_IP_PRI_NAT_DST`).
    pub(crate) fn priority(self) -> i32 {
        -100
    }
}

/// The libnftnl object of a nat base chain named `name` on `chain`'s hook, as iptables-nft
/// creates `chain`: type nat, priority -100, policy accept.
pub(crate) fn base_chain(chain: Chain, name: &str) -> ChainObj {
    let mut c = ChainObj::new();
    c.set_str(sys::NFTNL_CHAIN_TABLE as u16, &cstring(TABLE));
    c.set_str(sys::NFTNL_CHAIN_NAME as u16, &cstring(name));
    c.set_u32(sys::NFTNL_CHAIN_HOOKNUM as u16, chain.hooknum());
    c.set_s32(sys::NFTNL_CHAIN_PRIO as u16, chain.priority());
    c.set_u32(sys::NFTNL_CHAIN_POLICY as u16, libc::NF_ACCEPT as u32);
    c.set_str(sys::NFTNL_CHAIN_TYPE as u16, c"nat");
    c
}

impl fmt::Display for Chain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The handle the kernel gave a rule: stable for the rule's lifetime, unique in its table,
/// never reused while the table exists. Handles come only from the kernel (a dump or the echo
/// of an insert); this type cannot be made up from outside this crate except by parsing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Handle(pub(crate) u64);

impl Handle {
    /// The raw handle number, as `nft -a` and `iptables-nft -L --line-numbers` show it.
    pub fn get(self) -> u64 {
        self.0
    }

    /// A handle that names no rule, for unit tests of code that only compares handles
    /// (feature `test-support`, which no release build enables). A batch must never
    /// delete by such a handle: it may name a rule inserted earlier in the same batch.
    #[cfg(feature = "test-support")]
    pub const fn for_tests(raw: u64) -> Handle {
        Handle(raw)
    }
}

impl fmt::Display for Handle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}
