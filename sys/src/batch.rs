//! One nftables transaction: a begin message that carries the ruleset generation the batch
//! was computed against, the operations, and an end message. The kernel applies all of it
//! or none of it.

use crate::nftnl::{AlignedBuf, ChainObj, Object, TableObj};
use crate::rule::{cstring, rule_in};
use crate::{Chain, Family, Handle, Redirect, TABLE};
use nftnl::nftnl_sys as sys;
use std::fmt;

/// One operation of a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Create the `nat` table of a family if it does not exist, as iptables-nft does
    /// (`NFT_MSG_NEWTABLE` with `NLM_F_CREATE`).
    AddTable(Family),
    /// Create a nat base chain as iptables-nft does: type nat, the chain's hook, priority
    /// -100, policy accept.
    AddChain(Family, Chain),
    /// Insert a redirect at the head of a chain; the kernel echoes it back with its handle.
    Insert(Family, Chain, Redirect),
    /// Delete the rule with this handle from a chain.
    Delete(Family, Chain, Handle),
}

impl Op {
    pub(crate) fn context(&self) -> crate::error::Context {
        use crate::error::Context;
        match self {
            Op::AddTable(_) | Op::AddChain(..) => Context::NatChain,
            Op::Insert(..) => Context::Insert,
            Op::Delete(..) => Context::Delete,
        }
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Op::AddTable(family) => write!(f, "creating table {family} {TABLE}"),
            Op::AddChain(family, chain) => write!(f, "creating chain {family} {TABLE} {chain}"),
            Op::Insert(family, chain, r) => write!(
                f,
                "inserting redirect {} -> {} into {family} {TABLE} {chain}",
                r.public_port, r.to_port
            ),
            Op::Delete(family, chain, handle) => {
                write!(
                    f,
                    "deleting rule handle {handle} from {family} {TABLE} {chain}"
                )
            }
        }
    }
}

/// A transaction under construction.
#[derive(Debug, Clone, Default)]
pub struct Batch {
    genid: Option<u32>,
    ops: Vec<Op>,
}

const MSG_NEWTABLE: u16 = libc::NFT_MSG_NEWTABLE as u16;
const MSG_NEWCHAIN: u16 = libc::NFT_MSG_NEWCHAIN as u16;
const MSG_NEWRULE: u16 = libc::NFT_MSG_NEWRULE as u16;
const MSG_DELRULE: u16 = libc::NFT_MSG_DELRULE as u16;
const F_CREATE: u16 = libc::NLM_F_CREATE as u16;
const F_ACK: u16 = libc::NLM_F_ACK as u16;
const F_ECHO: u16 = libc::NLM_F_ECHO as u16;

impl Batch {
    /// An empty batch. With `Some(generation)` the kernel rejects the whole batch with
    /// ERESTART ([`crate::Error::Conflict`]) if the ruleset changed since that generation
    /// was read with [`crate::Conn::generation`].
    pub fn new(genid: Option<u32>) -> Self {
        Batch {
            genid,
            ops: Vec::new(),
        }
    }

    /// Queues an operation.
    pub fn push(&mut self, op: Op) {
        self.ops.push(op);
    }

    /// Queues an insert of `redirect` at the head of `family`'s nat `chain`.
    pub fn insert_rule(&mut self, family: Family, chain: Chain, redirect: Redirect) {
        self.push(Op::Insert(family, chain, redirect));
    }

    /// Queues the deletion of the rule `handle` from `family`'s nat `chain`.
    pub fn delete_rule(&mut self, family: Family, chain: Chain, handle: Handle) {
        self.push(Op::Delete(family, chain, handle));
    }

    /// The queued operations, in order.
    pub fn ops(&self) -> &[Op] {
        &self.ops
    }

    /// The generation the batch is bound to.
    pub fn generation(&self) -> Option<u32> {
        self.genid
    }

    /// Writes the batch into `buf`: the begin message has sequence number `seq`, operation
    /// `i` has `seq + 1 + i`, the end message follows. Every operation asks for an ack;
    /// inserts also ask for an echo, which carries the new rule's handle.
    pub(crate) fn encode(&self, seq: u32, buf: &mut AlignedBuf) {
        buf.clear();
        buf.put_batch_delimiter(true, seq, self.genid);
        for (i, op) in self.ops.iter().enumerate() {
            let seq = seq.wrapping_add(1 + i as u32);
            match op {
                Op::AddTable(family) => {
                    let mut table = TableObj::new();
                    table.set_str(sys::NFTNL_TABLE_NAME as u16, &cstring(TABLE));
                    put(buf, MSG_NEWTABLE, *family, F_CREATE | F_ACK, seq, &table);
                }
                Op::AddChain(family, chain) => {
                    let mut c = ChainObj::new();
                    c.set_str(sys::NFTNL_CHAIN_TABLE as u16, &cstring(TABLE));
                    c.set_str(sys::NFTNL_CHAIN_NAME as u16, &cstring(chain.name()));
                    c.set_u32(sys::NFTNL_CHAIN_HOOKNUM as u16, chain.hooknum());
                    c.set_s32(sys::NFTNL_CHAIN_PRIO as u16, chain.priority());
                    c.set_u32(sys::NFTNL_CHAIN_POLICY as u16, libc::NF_ACCEPT as u32);
                    c.set_str(sys::NFTNL_CHAIN_TYPE as u16, c"nat");
                    put(buf, MSG_NEWCHAIN, *family, F_CREATE | F_ACK, seq, &c);
                }
                Op::Insert(family, chain, redirect) => {
                    let rule = redirect.to_object(*family, *chain);
                    // No NLM_F_APPEND and no position: the kernel inserts at the head.
                    put(
                        buf,
                        MSG_NEWRULE,
                        *family,
                        F_CREATE | F_ACK | F_ECHO,
                        seq,
                        &rule,
                    );
                }
                Op::Delete(family, chain, handle) => {
                    let mut rule = rule_in(*chain);
                    rule.set_u64(sys::NFTNL_RULE_HANDLE as u16, handle.0);
                    put(buf, MSG_DELRULE, *family, F_ACK, seq, &rule);
                }
            }
        }
        let end = seq.wrapping_add(1 + self.ops.len() as u32);
        buf.put_batch_delimiter(false, end, None);
    }

    /// The batch as bytes, as it would be sent with first sequence number `seq`.
    pub fn to_bytes(&self, seq: u32) -> Vec<u8> {
        let mut buf = AlignedBuf::default();
        self.encode(seq, &mut buf);
        buf.as_bytes().to_vec()
    }
}

fn put(buf: &mut AlignedBuf, kind: u16, family: Family, flags: u16, seq: u32, obj: &dyn Object) {
    buf.put(kind, family.nfproto(), flags, seq, Some(obj));
}
